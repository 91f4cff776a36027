"""`soundpatch validate` on an archive of tapes in a bucket, against downloading them.

validate needs of each recording what its header says; it reads that by byte ranges
(soundpatch/ranged.py). Before, it downloaded each tape whole: the baseline here is that
download alone (boto3, one tape after another, as validate read them). Both go to the same
S3 server (moto, its own process on loopback) through a link answering each request
`--latency-ms` late and passing answers on at `--mb-per-second` a connection, as a network
would (loopback passes gigabytes a second, at once), which counts the bytes each took.
Also shown: validate on local copies of the same tapes (it reads each whole to hash it, for
the rows' identities).

    python bench/remote_headers.py [--tapes 6] [--minutes 5] [--mb-per-second 50] [--latency-ms 20]
                                   [--format wav|flac|mp3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import bench_credentials, metered_link, s3_server  # noqa: E402

RATE = 44100
COMMAND = Path(sys.executable).parent / "soundpatch"


FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}


def tape(path: Path, minutes: float, seed: int, format: str = "wav") -> None:
    """A tape of noise, 16-bit stereo (or an MP3 of it), written a minute at a time."""
    rng = np.random.default_rng(seed)
    container, subtype = FORMATS[format]
    with sf.SoundFile(path, "w", RATE, 2, subtype, format=container) as f:
        for _ in range(int(minutes)):
            f.write(rng.integers(-9000, 9000, (60 * RATE, 2), dtype=np.int16))


def validate(folder: Path, config: str, env: dict[str, str], manifest: str = "m.csv") -> float:
    """Seconds `soundpatch validate` took on `manifest` in `folder`, with `config` (YAML)."""
    (folder / "c.yaml").write_text(config)
    started = time.perf_counter()
    done = subprocess.run(
        [str(COMMAND), "validate", manifest, "--config", "c.yaml"], cwd=folder, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "predictions to send" not in " ".join(done.stdout.split()).lower():
        raise SystemExit(f"validate failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tapes", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--mb-per-second", type=float, default=50.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--format", choices=sorted(FORMATS), default="wav")
    args = parser.parse_args()
    env = bench_credentials()
    with tempfile.TemporaryDirectory() as tmp, s3_server("tapes") as endpoint:
        folder = Path(tmp)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        rows = ["id,input,start,end,prompt"]
        local_rows = list(rows)
        total = 0
        for i in range(args.tapes):
            path = folder / f"tape{i}.{args.format}"
            tape(path, args.minutes, i, args.format)
            total += path.stat().st_size
            s3.upload_file(str(path), "tapes", path.name)
            rows.append(f"t{i},s3://tapes/{path.name},30,30.2,tape hiss")
            local_rows.append(f"t{i},{path.name},30,30.2,tape hiss")

        with metered_link(endpoint, args.mb_per_second, args.latency_ms) as (link, meter):
            slow = boto3.client("s3", endpoint_url=link, region_name="us-east-1")
            started = time.perf_counter()
            for i in range(args.tapes):  # what validate read before: every tape, whole
                body = slow.get_object(Bucket="tapes", Key=f"tape{i}.{args.format}")["Body"]
                while body.read(1 << 20):
                    pass
            download, downloaded = time.perf_counter() - started, meter.bytes
            (folder / "m.csv").write_text("\n".join(rows) + "\n")
            remote = validate(folder, f"storage: {{s3: {{endpoint_url: '{link}'}}}}\n", env)
            read, requests = meter.bytes - downloaded, meter.requests - args.tapes
        (folder / "m.csv").write_text("\n".join(local_rows) + "\n")
        local = validate(folder, "{}\n", env)

    print(
        f"{args.tapes} tapes of {args.minutes:g} minutes (16-bit stereo {FORMATS[args.format][0]}), "
        f"{total / 1e6:.0f} MB, in a bucket "
        f"{args.mb_per_second:g} MB/s and {args.latency_ms:g} ms away"
    )
    print(f"{'measure':<52} {'seconds':>8} {'ratio':>6} {'MB read':>9}")
    print(f"{'baseline: downloading every tape (boto3)':<52} {download:8.2f} {1.0:6.2f} {downloaded / 1e6:9.1f}")
    print(f"{'soundpatch validate, tapes in the bucket':<52} {remote:8.2f} {remote / download:6.2f} {read / 1e6:9.3f}")
    print(f"{'soundpatch validate, the same tapes on local disk':<52} {local:8.2f} {local / download:6.2f}")
    print(f"(validate's requests to the bucket: {requests}, for {args.tapes} tapes)")


if __name__ == "__main__":
    main()
