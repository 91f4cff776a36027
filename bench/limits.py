"""How fully soundpatch uses a provider's rate limit without tripping it.

    python bench/limits.py [--rpm 600] [--seconds 30] [--window 10]

`soundpatch simulate`, in its own process as a provider would be, limits creates to
--rpm per minute, counted over a sliding --window (as providers do, shortened so the
bench runs in seconds; soundpatch is told the same window, `limits.rate_window_seconds`).
soundpatch's Each Labs client is configured with the same rate and driven by enough
concurrent rows to saturate it. Printed: the create rate achieved over the sustained
part of the run divided by the limit (utilization; target >= 0.97) and the 429s
received as a share of creates (target <= 1%).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from servers import s3_server, simulator

from soundpatch.batch import Batch
from soundpatch.config import load_config
from soundpatch.manifest import load_manifest


def run(args: argparse.Namespace, rows: int, endpoint: str, sim_url: str) -> dict:
    """Every row through one Batch, as the flow runs them; the simulator's counts after."""
    with httpx.Client() as client:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            sf.write(work / "fx.wav", np.full((6 * 8000, 1), 0.1, np.float32), 8000)
            (work / "m.csv").write_text(
                "id,input,start,end,prompt\n" + "".join(f"r{i},fx.wav,1,1.5,p{i}\n" for i in range(rows))
            )
            cfg = load_config(
                overrides={
                    "provider.name": "eachlabs",
                    "provider.base_url": sim_url,
                    "provider.poll_seconds": 0.1,
                    "limits.requests_per_minute": args.rpm,
                    "limits.rate_window_seconds": args.window,
                    "limits.concurrency": args.concurrency,
                    "limits.budget_usd": 1e6,
                    "storage.s3.endpoint_url": endpoint,
                    "storage.staging": "s3://stage/clips/",
                    "output.uri": str(work / "out"),
                    "runs_dir": str(work / "runs"),
                }
            )
            batch = Batch(load_manifest(work / "m.csv"), cfg, "bench")
            with ThreadPoolExecutor(batch.rows_at_once) as pool:  # as the flow does
                outcomes = list(pool.map(batch.process, batch.manifest.edits))
            batch.close()
        stats = client.get(f"{sim_url}/_sim/stats?times=1").json()
    stats["succeeded"] = sum(o.status == "succeeded" for o in outcomes)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=float, default=600)
    parser.add_argument("--seconds", type=float, default=30, help="how long to keep the limit saturated")
    parser.add_argument("--window", type=float, default=10, help="the provider's counting window, seconds")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", EACHLABS_API_KEY="bench")
    rows = int(args.rpm / 60 * args.seconds)
    sim_options = ("--latency", "0.2", "--fill", "tone", "--price", "0")
    sim_options += ("--rpm", str(args.rpm), "--rate-window", str(args.window))
    with s3_server("stage") as endpoint, simulator(*sim_options) as sim_url:
        stats = run(args, rows, endpoint, sim_url)
    times = sorted(stats["accepted_times"])
    # The sustained part: skip the first and last two seconds.
    steady = [t for t in times if times[0] + 2 <= t <= times[-1] - 2]
    achieved = (len(steady) - 1) / (steady[-1] - steady[0]) * 60 if len(steady) > 2 else 0.0
    creates, limited = stats["creates"], stats["rate_limited"]
    print(f"{'limit (creates/min)':28s} {args.rpm:10.0f}")
    print(f"{'rows (succeeded)':28s} {rows:10d} ({stats['succeeded']})")
    print(f"{'achieved (creates/min)':28s} {achieved:10.1f}")
    print(f"{'utilization':28s} {achieved / args.rpm:10.3f}   target >= 0.97")
    print(f"{'429s / creates':28s} {limited:5d} / {creates:<5d} = {limited / max(creates, 1):.2%}   target <= 1%")


if __name__ == "__main__":
    main()
