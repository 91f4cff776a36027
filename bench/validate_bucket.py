"""`soundpatch validate` on a dataset whose results go to a bucket, against the same with
the results in a local folder.

Before a nightly dataset run, validate asks the output store of every row whether its
result is made already (an index record: a request), and of every row for a hosted model
whether its answer is kept with the results (another). The bucket is reached through a link
answering each request `--latency-ms` late, as a bucket in another building would be (moto,
its own process on loopback, answers at once). The baseline is validate with the results in
a local folder, where each look is a file opened: the ratio is what the bucket adds.

    python bench/validate_bucket.py [--sources 2] [--prompts 25] [--seeds 20] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remote_headers import validate  # noqa: E402
from servers import bench_credentials, metered_link, s3_server  # noqa: E402

RATE = 44100
CONFIG = """provider: {{name: eachlabs, base_url: "http://127.0.0.1:9"}}
storage: {{staging: "s3://dataset/clips/", s3: {{endpoint_url: "{endpoint}"}}}}
output: {{uri: "{output}"}}
limits: {{budget_usd: 100000}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    env = bench_credentials()
    rows = args.sources * args.prompts * args.seeds
    with tempfile.TemporaryDirectory() as tmp, s3_server("dataset") as endpoint:
        folder = Path(tmp)
        rng = np.random.default_rng(1)
        for i in range(args.sources):
            sf.write(folder / f"source{i}.wav", rng.integers(-9000, 9000, (8 * RATE, 2), dtype=np.int16), RATE)
        sources = ", ".join(f"source{i}.wav" for i in range(args.sources))
        prompts = ", ".join(f"texture {i}" for i in range(args.prompts))
        seeds = ", ".join(str(i) for i in range(1, args.seeds + 1))
        (folder / "m.yaml").write_text(
            f'defaults: {{region: "2.0-4.0"}}\nmatrix:\n  input: [{sources}]\n  prompt: [{prompts}]\n'
            f"  seed: [{seeds}]\n"
        )
        local = validate(folder, CONFIG.format(endpoint=endpoint, output=folder / "outputs"), env, "m.yaml")
        with metered_link(endpoint, 1000.0, args.latency_ms) as (link, meter):
            bucket = validate(folder, CONFIG.format(endpoint=link, output="s3://dataset/night/"), env, "m.yaml")
            requests = meter.requests

    print(f"{rows} rows for a hosted model ({args.sources} sources x {args.prompts} prompts x {args.seeds} seeds)")
    print(f"{'measure':<56} {'seconds':>8} {'ratio':>6}")
    print(f"{'baseline: soundpatch validate, results in a local folder':<56} {local:8.2f} {1.0:6.2f}")
    away = f"soundpatch validate, results in a bucket {args.latency_ms:g} ms away"
    print(f"{away:<56} {bucket:8.2f} {bucket / local:6.2f}")
    print(f"(validate's requests to the bucket: {requests}, for {rows} rows)")


if __name__ == "__main__":
    main()
