"""Recordings hours long (an archive's tapes, a night of radio): a row holds its own result,
not copies of the recording, and a batch holds no more results at once than the machine
can spare (soundpatch/audio.py, soundpatch/result_memory.py)."""

from __future__ import annotations

import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf

from soundpatch.batch import Batch
from soundpatch.config import load_config
from soundpatch.manifest import load_manifest
from soundpatch.result_memory import ResultMemory
from tests.jobs import run_in_process


def tape(path, seconds: int, rate: int = 44100) -> np.ndarray:
    samples = np.random.default_rng(0).integers(-3000, 3000, (rate * seconds, 2)).astype(np.int16)
    sf.write(path, samples, rate, subtype="PCM_16")
    return samples


def test_a_long_recording_s_rows_and_their_file_hold_no_copy_of_it_each(tmp_path):
    # An archive's recordings run for hours (635 MB of samples an hour in 16-bit stereo).
    # A row's result was a copy of the recording, encoded, then decoded again to check it;
    # the file of several rows held every row's result at once. Now a row holds its encoded
    # file and blocks of it, and the combined file each row's region only: what the run
    # allocates at most stays near two recordings' worth, however many rows it has (it was
    # 9.1 with these 5 rows, and grew by one for each row of the file; 2.1 now).
    rate = 44100
    samples = tape(tmp_path / "tape.wav", 240, rate)
    size = samples.nbytes
    # Dropouts of 20 ms: the local engine rebuilds them from a few seconds around each.
    rows = [f"d{i},tape.wav,{20 + 40 * i},{20.02 + 40 * i},fill the dropout,fixed" for i in range(5)]
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,output\n" + "\n".join(rows) + "\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    tracemalloc.start()
    try:
        outcomes, _, _ = run_in_process(tmp_path / "m.csv", cfg, "tape")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [o.status for o in outcomes] == ["succeeded"] * 5
    assert all(o.combined.endswith("fixed.wav") for o in outcomes)
    fixed = sf.read(tmp_path / "out" / "fixed.wav", dtype="int16")[0]
    changed = np.flatnonzero((fixed != samples).any(axis=1))
    assert {int(f // rate) for f in changed} <= {20 + 40 * i for i in range(5)} and len(changed) > 0
    assert peak < 2.5 * size, f"{peak / size:.2f} recordings' worth allocated at once"


def test_results_wait_for_room_and_one_larger_than_all_of_it_goes_alone():
    memory = ResultMemory(limit=100)
    inside, most, lock = [0], [0], threading.Lock()

    def result(nbytes: int) -> None:
        with memory.holding(nbytes):
            with lock:
                inside[0] += nbytes
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= nbytes

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(result, [60] * 6 + [500] * 2))
    assert most[0] == 500 and memory.most == 100 and memory.held == 0  # never two of 60, never 500 beside another
    small = ResultMemory(limit=100)
    with small.holding(60), small.holding(40):  # what fits goes at once
        assert small.held == 100


def test_a_batch_of_long_recordings_holds_no_more_results_at_once_than_it_may(tmp_path):
    samples = tape(tmp_path / "tape.wav", 60)
    rows = [f"d{i},tape.wav,{5 + 10 * i},{5.02 + 10 * i},fill the dropout" for i in range(5)]
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\n" + "\n".join(rows) + "\n")
    room = 1.5 * samples.nbytes / 2**20  # for one such result
    cfg = load_config(
        overrides={
            "output.uri": str(tmp_path / "out"),
            "runs_dir": str(tmp_path / "runs"),
            "limits.results_memory_mb": room,
        }
    )
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "tapes")
    try:
        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(batch.process, batch.manifest.edits))
    finally:
        batch.close()
    assert [o.status for o in outcomes] == ["succeeded"] * 5
    assert batch.result_memory.most == samples.nbytes  # each held it, one at a time


def test_the_default_room_is_a_quarter_of_the_memory_this_process_may_use(monkeypatch, tmp_path):
    from soundpatch import result_memory

    assert result_memory.machine_share() >= result_memory.FLOOR_BYTES
    pod = tmp_path / "memory.max"
    pod.write_text(f"{8 << 30}\n")  # a container held to 8 GiB: a quarter of that
    monkeypatch.setattr(result_memory, "CGROUP_LIMITS", (str(pod),))
    assert result_memory.machine_share() == max(result_memory.FLOOR_BYTES, min(_physical(), 8 << 30) // 4)
    pod.write_text(f"{2 << 30}\n")  # a small one: 1 GiB all the same
    assert result_memory.machine_share() == result_memory.FLOOR_BYTES
    pod.write_text("max\n")  # no limit: the machine's
    assert result_memory.machine_share() == max(result_memory.FLOOR_BYTES, _physical() // 4)


def _physical() -> int:
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
