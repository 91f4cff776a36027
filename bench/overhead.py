"""What soundpatch costs on top of the provider's own latency.

    python bench/overhead.py [--rows 400] [--concurrency 40] [--latency 1.0] [--outputs folder|bucket]

Against one simulator (1 s per prediction) in its own process, as a provider is, and one
S3 server (moto), in the same run:
- baseline: a minimal asyncio + httpx script that creates, polls and downloads every
  prediction with the same concurrency and poll interval, and nothing else;
- soundpatch: `soundpatch run` on a manifest of the same rows (validation, staging to S3,
  the journal, Prefect's temporary server and one task per row, splicing, the report).
Printed: both wall times and their ratio (target <= 1.10), with soundpatch's time also
split into start-up (Prefect's temporary server) and the flow itself, and the CPU time
each process used during each (the machine's cores are shared by all of them).

Prefect's database is created (and migrated) by a one-row run first, timed on its own:
that happens once per PREFECT_HOME, not on every run.

`--outputs bucket` puts soundpatch's results in the S3 server (s3://stage/out/) instead of
a folder: each result is uploaded, and the run keeps its lease and the journal's copy
there (the baseline uploads nothing, so the ratio includes the uploads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import httpx
import numpy as np
import soundfile as sf
from servers import s3_server, simulator

POLL = 0.25


async def baseline(base: str, audio_url: str, rows: int, concurrency: int) -> float:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                body = {
                    "model": "stable-audio-2-5-inpaint",
                    "version": "0.0.1",
                    "input": {
                        "prompt": f"p{i}",
                        "audio_url": audio_url,
                        "mask_start": 1,
                        "mask_end": 2,
                        "seconds_total": 6,
                        "seed": i,
                    },
                }
                headers = {"X-API-Key": "bench"}
                pid = (await client.post(f"{base}/v1/prediction", json=body, headers=headers)).json()["predictionID"]
                while True:
                    await asyncio.sleep(POLL)
                    got = (await client.get(f"{base}/v1/prediction/{pid}", headers=headers)).json()
                    if got["status"] == "success":
                        break
                await client.get(got["output"])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(rows)))
        return time.perf_counter() - t0


class CpuWatch:
    """CPU seconds used while it watches by processes whose command line holds `needle`
    (sampled every 0.2 s: the last reading before a process ends is what counts)."""

    def __init__(self, needles: dict[str, str]) -> None:
        self.needles, self.seconds = needles, dict.fromkeys(needles, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._last: dict[tuple[str, str], float] = {}
        self._first: dict[tuple[str, str], float] = {}
        self._sample(first=True)

    def __enter__(self) -> CpuWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            for label, needle in self.needles.items():
                if needle in cmd:
                    used = (int(fields[11]) + int(fields[12])) / self._tick
                    self._last[(label, pid)] = used
                    if first:
                        self._first[(label, pid)] = used
        for label in self.needles:
            self.seconds[label] = sum(v - self._first.get(k, 0.0) for k, v in self._last.items() if k[0] == label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--outputs", choices=("folder", "bucket"), default="folder")
    args = parser.parse_args()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "EACHLABS_API_KEY": "bench"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    sim_options = ("--latency", f"{args.latency:g}", "--fill", "tone", "--price", "0")
    with s3_server("stage") as endpoint, simulator(*sim_options) as sim_url, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)  # one clip: the baseline's audio_url, and the manifest's input
        sf.write(work / "fx.wav", np.full((6 * 44100, 2), 0.1, np.float32), 44100, subtype="PCM_16")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.put_object(Bucket="stage", Key="bench/clip.wav", Body=(work / "fx.wav").read_bytes())
        audio_url = s3.generate_presigned_url("get_object", Params={"Bucket": "stage", "Key": "bench/clip.wav"})
        needles = {"simulator": "simulate --port", "moto": "moto.server"}
        own = resource.getrusage(resource.RUSAGE_SELF)
        with CpuWatch(needles) as base_cpu:
            base_s = asyncio.run(baseline(sim_url, audio_url, args.rows, args.concurrency))
        after = resource.getrusage(resource.RUSAGE_SELF)
        base_cpu.seconds["client"] = after.ru_utime + after.ru_stime - own.ru_utime - own.ru_stime

        (work / "m.csv").write_text(
            "id,input,start,end,prompt,seed\n" + "".join(f"r{i},fx.wav,1.2,1.7,p{i},{i}\n" for i in range(args.rows))
        )
        (work / "c.yaml").write_text(
            f"provider: {{name: eachlabs, base_url: '{sim_url}', poll_seconds: {POLL}, "
            f"max_poll_seconds: {POLL}, price_usd: 0}}\n"
            f"limits: {{concurrency: {args.concurrency}, requests_per_minute: 1000000, "
            f"polls_per_minute: 1000000}}\n"
            f"storage: {{s3: {{endpoint_url: '{endpoint}'}}, staging: 's3://stage/clips/'}}\n"
            + ("output: {uri: 's3://stage/out/'}\n" if args.outputs == "bucket" else "")
        )
        script = Path(sys.executable).parent / "soundpatch"
        run_env = {k: v for k, v in env.items() if not k.startswith("PREFECT_")}
        run_env["PREFECT_HOME"] = str(work / "prefect")
        (work / "one.csv").write_text("id,input,start,end,prompt,seed\nw0,fx.wav,1.2,1.7,warm,0\n")

        def run(manifest: str, run_id: str) -> float:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [str(script), "run", manifest, "--config", "c.yaml", "--run-id", run_id],
                cwd=work,
                env=run_env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stdout + proc.stderr)
            return time.perf_counter() - t0

        first = run("one.csv", "warm")
        needles.update({"soundpatch": f"{script} run m.csv", "prefect server": "prefect.server.api.server:create_app"})
        with CpuWatch(needles) as cpu:
            ours = run("m.csv", "bench")
        flow = json.loads((work / "runs" / "bench" / "report.json").read_text())["summary"]["wall_seconds"]
    print(f"{'rows / concurrency / latency':34s} {args.rows} / {args.concurrency} / {args.latency:g} s")
    print(f"{'soundpatch outputs to a':34s} {args.outputs}")
    print(f"{'baseline (asyncio + httpx)':34s} {base_s:8.2f} s")
    print(f"{'soundpatch run (whole command)':34s} {ours:8.2f} s")
    print(f"{'  of which the flow':34s} {flow:8.2f} s")
    print(f"{'  start-up, shutdown, imports':34s} {ours - flow:8.2f} s")
    print(f"{'overhead ratio (whole command)':34s} {ours / base_s:8.2f}   target <= 1.10")
    print(f"{'overhead ratio (flow only)':34s} {flow / base_s:8.2f}")
    print("CPU seconds (2 cores give 2 per second of wall time):")
    print(
        f"{'  baseline: client / simulator / S3':40s} {base_cpu.seconds['client']:6.1f} / "
        f"{base_cpu.seconds['simulator']:.1f} / {base_cpu.seconds['moto']:.1f}"
    )
    print(
        f"{'  soundpatch: run / its Prefect server':40s} {cpu.seconds['soundpatch']:6.1f} / "
        f"{cpu.seconds['prefect server']:.1f}"
    )
    print(f"{'  soundpatch: simulator / S3':40s} {cpu.seconds['simulator']:6.1f} / {cpu.seconds['moto']:.1f}")
    print(f"{'first run on a new PREFECT_HOME':34s} {first:8.2f} s   (1 row; creates Prefect's database)")


if __name__ == "__main__":
    main()
