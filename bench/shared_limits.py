"""What sharing limits through Prefect costs: acquisition latency and pacing precision.

    python bench/shared_limits.py [--rpm 120] [--creates 60] [--threads 4]

Starts `prefect server start` on loopback (its own PREFECT_HOME), then measures, in the
same run:

1. latency of one acquisition when a slot is free: Prefect's `rate_limit` (an HTTP round
   trip to the server) against soundpatch's local RateLimiter.acquire;
2. pacing when saturated: `--threads` threads taking `--creates` slots of a shared rate
   limit set to `--rpm`, through Prefect's `rate_limit` and through what a soundpatch run
   does (its local pacing, then flows/shared_limits.py's acquisition): achieved rate /
   configured rate, and the largest gap between two grants against the ideal interval
   (see PrefectHQ/prefect issue 15618 on clients sleeping past the moment a slot frees).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from servers import free_port


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    prefect = Path(sys.executable).parent / "prefect"
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("the Prefect server did not start")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=float, default=120)
    parser.add_argument("--creates", type=int, default=60)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--slots", type=int, default=1, help="the shared rate limit's slots (its burst)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="soundpatch-bench-prefect-"))
    proc, api = start_server(home)
    os.environ["PREFECT_API_URL"] = api
    os.environ["PREFECT_HOME"] = str(home / "client")
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.concurrency.sync import rate_limit

        from flows.shared_limits import PrefectSharedLimits
        from soundpatch.limits import RateLimiter

        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="bench-free", limit=100000, slot_decay_per_second=1000.0)
            )
            for name in ("bench-paced",):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(
                        name=name, limit=args.slots, slot_decay_per_second=args.rpm / 60 * RateLimiter.HEADROOM
                    )
                )

        rate_limit("bench-free", strict=True)  # warm the client up
        free = []
        for _ in range(50):
            t = time.perf_counter()
            rate_limit("bench-free", strict=True)
            free.append(time.perf_counter() - t)
        local = RateLimiter(10**7)
        local_free = []
        for _ in range(1000):
            t = time.perf_counter()
            local.acquire()
            local_free.append(time.perf_counter() - t)

        def saturate(acquire) -> tuple[float, float]:
            grants: list[float] = []
            lock = threading.Lock()
            left = [args.creates]

            def worker() -> None:
                while True:
                    with lock:
                        if left[0] == 0:
                            return
                        left[0] -= 1
                    acquire()
                    with lock:
                        grants.append(time.monotonic())

            threads = [threading.Thread(target=worker) for _ in range(args.threads)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            grants.sort()
            achieved = (len(grants) - 1) / (grants[-1] - grants[0]) * 60
            gaps = [b - a for a, b in zip(grants, grants[1:], strict=False)]
            return achieved / args.rpm, max(gaps) / (60 / args.rpm)

        prefect_only = saturate(lambda: rate_limit("bench-paced", strict=True))
        # What a run does: its own pacing, then soundpatch's acquisition of the shared slot.
        shared = PrefectSharedLimits("bench-run", args.rpm, 8, burst=args.slots)
        paced = RateLimiter(args.rpm, shared=shared.create)
        with_local = saturate(paced.acquire)

        print(
            f"Prefect {api} (its own server process), {args.threads} threads, {args.creates} grants at {args.rpm:g}/min"
        )
        print()
        print("| measure | result |")
        print("|---|---|")
        print(
            f"| local RateLimiter.acquire, slot free: p50 / p95 | {pct(local_free, 0.5) * 1e6:.1f} / "
            f"{pct(local_free, 0.95) * 1e6:.1f} µs |"
        )
        print(
            f"| Prefect rate_limit, slot free: p50 / p95 | {statistics.median(free) * 1e3:.1f} / "
            f"{pct(free, 0.95) * 1e3:.1f} ms |"
        )
        print(f"| saturated, Prefect rate_limit alone: achieved / configured rate | {prefect_only[0]:.3f} |")
        print(f"| saturated, Prefect alone: largest gap / ideal interval | {prefect_only[1]:.2f} |")
        print(f"| saturated, soundpatch (local pacing + shared slot): achieved / configured | {with_local[0]:.3f} |")
        print(f"| saturated, soundpatch: largest gap / ideal interval | {with_local[1]:.2f} |")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
