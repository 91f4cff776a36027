"""Does a run's memory stay flat however long the manifest, or the recording?

    python bench/memory.py [--rows 250,1000,2500]
    python bench/memory.py --minutes 10,30,60 [--rows 6]
    python bench/memory.py --tapes 16 --minutes 5 [--limit-mb 200]

Runs `soundpatch run` (the embedded local engine, default config: 8 predictions in flight,
16 rows worked on at once) on manifests of each length: one 6 s clip, a 5 ms region per
row, each row its own seed (so each is its own edit, nothing is reused). Samples every
0.1 s how much memory the soundpatch process and its temporary Prefect server hold, and
prints their peaks, with each peak as a ratio to the shortest manifest's (flat is 1.0).

With `--minutes`: one recording of each length (16-bit stereo at 44.1 kHz, 10.6 MB of
samples a minute), `--rows` 20 ms dropouts spread over it, every row naming one output
file (the restored recording, made from the rows' results, each row's own result beside
it). Prints the peak of the soundpatch process as a ratio to the recording's samples:
what a row holds of a recording, not how many rows there are, sets it.

With `--tapes N`: N recordings of `--minutes` each, a row each, worked on 16 at once (the
default concurrency, 8). Run twice: with `limits.inputs_memory_mb` past all of them (as
every row held its recording before that key) and at `--limit-mb`. Prints both peaks and
wall times, and their ratios.

Prefect's database is created (and migrated) by a one-row run first, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SERVER = "flows.prefect_server"


def rss_mb(pid: int) -> float:
    """Resident memory of one process now, in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def server_of(pid: int) -> int | None:
    for child in children(pid):
        try:
            if SERVER in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                return child
        except OSError:
            continue
    return None


def measured_run(work: Path, env: dict[str, str], manifest: str, run_id: str, *options: str) -> dict[str, float]:
    """Run the command; its wall time and the peaks of both processes' resident memory."""
    script = Path(sys.executable).parent / "soundpatch"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(script), "run", manifest, "--run-id", run_id, *options],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peaks = {"soundpatch": 0.0, "server": 0.0}
    done = threading.Event()

    def sample() -> None:
        server = None
        while not done.wait(0.1):
            peaks["soundpatch"] = max(peaks["soundpatch"], rss_mb(proc.pid))
            server = server or server_of(proc.pid)
            if server is not None:
                peaks["server"] = max(peaks["server"], rss_mb(server))

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(out + err)
    summary = json.loads((work / "runs" / run_id / "report.json").read_text())["summary"]
    return {"wall": time.perf_counter() - t0, "flow": summary["wall_seconds"], **peaks}


def warmed_up(work: Path, rate: int) -> dict[str, str]:
    """The environment of the measured runs, a Prefect home of their own in `work`, whose
    database a one-row run made first (not measured)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(work / "prefect")
    sf.write(work / "w.wav", np.zeros((rate, 2), np.int16), rate, subtype="PCM_16")
    (work / "one.csv").write_text("id,input,start,end,prompt\nw,w.wav,0.5,0.52,warm\n")
    measured_run(work, env, "one.csv", "warm")
    return env


def long_recordings(minutes: list[int], rows: int) -> None:
    rate = 44100
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = warmed_up(work, rate)
        header = "id,input,start,end,prompt,output\n"
        rng = np.random.default_rng(0)
        for length in minutes:
            with sf.SoundFile(work / f"tape{length}.wav", "w", rate, 2, "PCM_16") as f:
                for _ in range(length):  # a minute at a time: the bench itself holds little
                    f.write(rng.integers(-3000, 3000, (60 * rate, 2), dtype=np.int16))
            spread = length * 60 / (rows + 1)
            lines = [
                f"d{i},tape{length}.wav,{spread * (i + 1):.2f},{spread * (i + 1) + 0.02:.2f},fill,restored{length}"
                for i in range(rows)
            ]
            (work / f"tape{length}.csv").write_text(header + "\n".join(lines) + "\n")
            results[length] = measured_run(work, env, f"tape{length}.csv", f"tape{length}")
            (work / f"tape{length}.wav").unlink()
            print(f"  {length} min done in {results[length]['wall']:.1f} s", file=sys.stderr)
    print(f"{'minutes':>7} {'samples MB':>11} {'rows':>5} {'wall s':>8} {'soundpatch MB':>14} {'÷ samples':>10}")
    for length, r in results.items():
        samples_mb = length * 60 * rate * 4 / 2**20
        print(
            f"{length:7d} {samples_mb:11.0f} {rows:5d} {r['wall']:8.1f} {r['soundpatch']:14.0f} "
            f"{r['soundpatch'] / samples_mb:10.2f}"
        )


def many_tapes(count: int, minutes: int, limit_mb: float) -> None:
    rate = 44100
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = warmed_up(work, rate)
        header = "id,input,start,end,prompt\n"
        rng = np.random.default_rng(0)
        minute = rng.integers(-3000, 3000, (60 * rate, 2), dtype=np.int16)
        for k in range(count):
            with sf.SoundFile(work / f"tape{k}.wav", "w", rate, 2, "PCM_16") as f:
                for _ in range(minutes):
                    f.write(minute)
        middle = minutes * 30
        rows = [f"t{k},tape{k}.wav,{middle},{middle + 0.02},fill" for k in range(count)]
        (work / "tapes.csv").write_text(header + "\n".join(rows) + "\n")
        samples_mb = minutes * 60 * rate * 4 / 2**20
        runs = {}
        for label, limit in (("unlimited", 10 * count * samples_mb), (f"{limit_mb:g} MB", limit_mb)):
            runs[label] = measured_run(
                work, env, "tapes.csv", f"tapes-{len(runs)}", "--set", f"limits.inputs_memory_mb={limit}"
            )
            print(f"  {label} done in {runs[label]['wall']:.1f} s", file=sys.stderr)
    print(f"{count} recordings of {minutes} min ({samples_mb:.0f} MB of samples each), a row each")
    print(f"{'inputs_memory_mb':>17} {'wall s':>8} {'soundpatch MB':>14} {'peak ratio':>11} {'wall ratio':>11}")
    first = next(iter(runs.values()))
    for label, r in runs.items():
        print(
            f"{label:>17} {r['wall']:8.1f} {r['soundpatch']:14.0f} {r['soundpatch'] / first['soundpatch']:11.2f} "
            f"{r['wall'] / first['wall']:11.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=None, help="manifest lengths, comma-separated (with --minutes: one)")
    parser.add_argument("--minutes", default=None, help="recording lengths in minutes, comma-separated")
    parser.add_argument("--tapes", type=int, default=None, help="that many recordings of --minutes, a row each")
    parser.add_argument("--limit-mb", type=float, default=200.0, help="with --tapes: limits.inputs_memory_mb")
    args = parser.parse_args()
    if args.tapes:
        many_tapes(args.tapes, int(args.minutes or 5), args.limit_mb)
        return
    if args.minutes:
        long_recordings(sorted(int(n) for n in args.minutes.split(",")), int(args.rows or 6))
        return
    lengths = sorted(int(n) for n in (args.rows or "250,1000,2500").split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = np.arange(6 * 44100) / 44100
        tone = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.sin(2 * np.pi * 331 * t)
        sf.write(work / "fx.wav", np.stack([tone, tone], axis=1).astype(np.float32), 44100, subtype="PCM_16")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env["PREFECT_HOME"] = str(work / "prefect")
        header = "id,input,start,end,prompt,seed\n"
        (work / "one.csv").write_text(header + "w,fx.wav,2.0,2.005,warm,0\n")
        measured_run(work, env, "one.csv", "warm")
        results = {}
        for n in lengths:
            rows = "".join(f"r{i},fx.wav,2.0,2.005,fill,{i}\n" for i in range(n))
            (work / f"m{n}.csv").write_text(header + rows)
            results[n] = measured_run(work, env, f"m{n}.csv", f"rows{n}")
            print(f"  {n} rows done in {results[n]['wall']:.1f} s", file=sys.stderr)
    first = results[lengths[0]]
    print(f"{'rows':>6} {'wall s':>8} {'flow s':>8} {'soundpatch MB':>14} {'ratio':>6} {'server MB':>10} {'ratio':>6}")
    for n, r in results.items():
        print(
            f"{n:6d} {r['wall']:8.1f} {r['flow']:8.1f} {r['soundpatch']:14.0f} "
            f"{r['soundpatch'] / first['soundpatch']:6.2f} {r['server']:10.0f} {r['server'] / first['server']:6.2f}"
        )


if __name__ == "__main__":
    main()
