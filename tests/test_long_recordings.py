"""Recordings hours long (an archive's tapes, a night of radio): a row holds its own result,
not copies of the recording, and rows hold their results on disk until published, not in
memory (soundpatch/audio.py, soundpatch/publish.py)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from soundpatch.batch import Batch
from soundpatch.config import load_config
from soundpatch.manifest import load_manifest
from tests.jobs import run_in_process
from tests.test_storage import serve


def tape(path, seconds: int, rate: int = 44100) -> np.ndarray:
    samples = np.random.default_rng(0).integers(-3000, 3000, (rate * seconds, 2)).astype(np.int16)
    sf.write(path, samples, rate, subtype="PCM_16")
    return samples


def all_at_once(folder, rows: list[str], run_id: str) -> tuple[list, int]:
    """The manifest `rows` (id,input,start,end,prompt) worked on all at once, one thread
    each, by the local engine: their outcomes, and the most Python allocated at once."""
    (folder / "m.csv").write_text("id,input,start,end,prompt\n" + "\n".join(rows) + "\n")
    cfg = load_config(overrides={"output.uri": str(folder / "out"), "runs_dir": str(folder / "runs")})
    batch = Batch(load_manifest(folder / "m.csv"), cfg, run_id)
    tracemalloc.start()
    try:
        with ThreadPoolExecutor(len(rows)) as pool:
            outcomes = list(pool.map(batch.process, batch.manifest.edits))
        return outcomes, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        batch.close()


def test_a_long_recording_s_rows_and_their_file_hold_no_copy_of_it_each(tmp_path):
    # An archive's recordings run for hours (635 MB of samples an hour in 16-bit stereo).
    # A row's result was a copy of the recording, encoded, then decoded again to check it;
    # the file of several rows held every row's result at once. Now a row writes its result
    # to disk a block at a time and reads it back the same way, the combined file takes each
    # row's region only, and the source is decoded from its path (not read into bytes
    # first): what the run allocates at most is the decoded recording and a little more,
    # however many rows it has (9.1 recordings' worth with these 5 rows at first, growing by
    # one for each row of the file; then 2.1, the source's bytes beside its samples; 1.14 now).
    rate = 44100
    samples = tape(tmp_path / "tape.wav", 240, rate)
    size = samples.nbytes
    # Dropouts of 20 ms: the local engine rebuilds them from a few seconds around each.
    rows = [f"d{i},tape.wav,{20 + 40 * i},{20.02 + 40 * i},fill the dropout,fixed" for i in range(5)]
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,output\n" + "\n".join(rows) + "\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    # The modules a run imports as it goes are not the recording: imported first, by a run of
    # a second's recording (run alone, this test counted them as 0.75 recordings' worth).
    sf.write(tmp_path / "second.wav", samples[:rate], rate)
    (tmp_path / "warm.csv").write_text("id,input,start,end,prompt\nw,second.wav,0.5,0.52,warm up\n")
    run_in_process(tmp_path / "warm.csv", cfg, "warm")
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
    assert peak < 1.5 * size, f"{peak / size:.2f} recordings' worth allocated at once"
    # Nor on disk: each row's own result keeps its region and a second each side (5 rows of
    # a 4-minute tape, 10 s), where each was the whole tape (5 tapes' worth besides the file).
    kept = sum(f.stat().st_size for f in (tmp_path / "out" / "fixed.rows").glob("*.wav"))
    assert kept < 0.05 * size, f"the rows' own results take {kept / size:.2f} tapes"


def test_rows_of_long_recordings_at_once_hold_their_results_on_disk_not_in_memory(tmp_path):
    # Each row's result (the whole recording, its region new) was held encoded in memory from
    # its splice until published, and read back from a memory file as large: five rows of an
    # hour's tape at once were five recordings' worth or more. Written to the run's scratch
    # folder, it is linked into place: what the rows hold at once is the recording, once.
    samples = tape(tmp_path / "tape.wav", 180)
    rows = [f"d{i},tape.wav,{15 + 30 * i},{15.02 + 30 * i},fill the dropout" for i in range(5)]
    outcomes, peak = all_at_once(tmp_path, rows, "tapes")
    assert [o.status for o in outcomes] == ["succeeded"] * 5
    assert peak < 1.5 * samples.nbytes, f"{peak / samples.nbytes:.2f} recordings' worth allocated at once"
    for i, o in enumerate(outcomes):
        result = sf.read(o.output, dtype="int16")[0]
        changed = np.flatnonzero((result != samples).any(axis=1))
        assert len(changed) and {int(f // 44100) for f in changed} == {15 + 30 * i}
        stat = os.stat(o.output)
        assert stat.st_nlink == 1  # its scratch name is gone
        assert stat.st_mode & 0o777 == 0o666 & ~_umask()  # an ordinary file, not mkstemp's 0600
    assert not (tmp_path / "runs" / "tapes" / "scratch").exists()
    assert not list((tmp_path / "out").rglob("*.part"))


def test_rows_the_local_engine_fills_from_a_passage_hold_their_windows_a_few_at_a_time(tmp_path):
    # A 50 ms dropout is filled from a passage searched for up to 90 s each side: each row
    # works on up to three minutes of the recording as floats, and searches it. Sixteen rows
    # of a 30-minute tape did so at once (3 GB resident, no sooner done); now as many rows as
    # there are cores (cpu.py). 6 rows of a 4-minute tape, 6 threads: 28 recordings' worth at
    # once before, about 12 now.
    rate = 44100
    t = np.arange(rate * 240) / rate
    music = 0.15 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t))
    samples = (np.stack([music, music], axis=1) * 32767).astype(np.int16)
    sf.write(tmp_path / "tape.wav", samples, rate, subtype="PCM_16")
    rows = [f"d{i},tape.wav,{20 + 35 * i},{20.05 + 35 * i},fill the dropout" for i in range(6)]
    outcomes, peak = all_at_once(tmp_path, rows, "passages")
    assert [o.status for o in outcomes] == ["succeeded"] * 6
    assert all(o.method.startswith("similarity (passage") for o in outcomes)  # the search ran
    assert peak < 16 * samples.nbytes, f"{peak / samples.nbytes:.1f} recordings' worth allocated at once"


@pytest.mark.parametrize("container", ["flac", "wav"])  # the format asked for the second time
def test_an_earlier_result_published_again_in_another_format_is_never_held_whole(tmp_path, container):
    # A result an earlier run made is published again, at no cost, when the same edit is
    # asked for in another format; it was decoded whole for that (a second recording's
    # worth beside the source's samples). Now it is read a block at a time as it is written.
    samples = tape(tmp_path / "tape.wav", 180)
    if container == "wav":  # a FLAC result asked for again as WAV
        sf.write(tmp_path / "tape.flac", samples, 44100, subtype="PCM_16")
        source, first, then = "tape.flac", "flac", "wav"
    else:
        source, first, then = "tape.wav", "wav", "flac"
    (tmp_path / "m.csv").write_text(f"id,input,start,end,prompt\nd,{source},60,60.02,fill the dropout\n")

    def run(fmt: str, run_id: str):
        overrides = {"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs"), "output.format": fmt}
        return run_in_process(tmp_path / "m.csv", load_config(overrides=overrides), run_id)[0][0]

    made = run(first, "first")
    assert made.status == "succeeded", made.error
    tracemalloc.start()
    try:
        again = run(then, "again")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert again.status == "skipped_done" and again.cost_usd == 0 and again.reused_from == made.output
    assert again.output.endswith(f".{then}") and sf.info(again.output).subtype == "PCM_16"
    assert np.array_equal(sf.read(again.output, dtype="int16")[0], sf.read(made.output, dtype="int16")[0])
    assert peak < 1.5 * samples.nbytes, f"{peak / samples.nbytes:.2f} recordings' worth allocated at once"


@pytest.mark.parametrize("where", ["bucket", "web"])
def test_a_long_recording_from_a_bucket_or_a_web_server_is_never_held_as_bytes(tmp_path, aws_env, where, monkeypatch):
    # A remote source was read into memory whole (a web server's chunks, then joined), then
    # decoded through a memory file as large: three recordings' worth at once beside its
    # samples. Now it is spooled to a temporary file as it arrives, hashed on the way, and
    # decoded from there.
    samples = tape(tmp_path / "tape.wav", 360)  # long enough that boto3's own ~17 MB count for little
    if where == "bucket":
        bucket = aws_env.bucket("tapes")
        aws_env.client.upload_file(str(tmp_path / "tape.wav"), bucket, "archive/tape.wav")
        source, server = f"s3://{bucket}/archive/tape.wav", None
    else:
        (tmp_path / "www").mkdir()
        (tmp_path / "tape.wav").rename(tmp_path / "www" / "tape.wav")
        server, base = serve(tmp_path / "www")
        source = f"{base}/tape.wav"
    (tmp_path / "m.csv").write_text(f"id,input,start,end,prompt\nd,{source},90,90.02,fill the dropout\n")
    cfg = load_config(
        overrides={
            "output.uri": str(tmp_path / "out"),
            "runs_dir": str(tmp_path / "runs"),
            "storage.s3.endpoint_url": aws_env.endpoint,
            "storage.http.allow_private_addresses": True,
        }
    )
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the spool goes (TMPDIR)
    tracemalloc.start()
    try:
        [outcome], _, _ = run_in_process(tmp_path / "m.csv", cfg, where)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
    assert outcome.status == "succeeded", outcome.error
    assert peak < 1.5 * samples.nbytes, f"{peak / samples.nbytes:.2f} recordings' worth allocated at once"
    result = sf.read(outcome.output, dtype="int16")[0]
    changed = np.flatnonzero((result != samples).any(axis=1))
    assert len(changed) and {int(f // 44100) for f in changed} == {90}
    assert list((tmp_path / "tmp").glob("soundpatch-input.*")) == []  # the spool is gone


def test_a_result_is_copied_into_place_where_it_cannot_be_linked(tmp_path, monkeypatch):
    # The run's folder and the outputs on different file systems (a mounted volume): a link
    # between them fails with EXDEV, and the result is copied instead.
    samples = tape(tmp_path / "tape.wav", 8)
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nd,tape.wav,4,4.02,fill the dropout\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    tried = []

    def cross_device(src, dst, *args, **kwargs):
        tried.append(src)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    [outcome], _, _ = run_in_process(tmp_path / "m.csv", cfg, "volume")
    assert outcome.status == "succeeded", outcome.error
    assert tried  # a link was tried first
    result = sf.read(outcome.output, dtype="int16")[0]
    outside = np.ones(len(samples), bool)
    outside[4 * 44100 : round(4.02 * 44100)] = False
    assert np.array_equal(result[outside], samples[outside])
    assert os.stat(outcome.output).st_mode & 0o777 == 0o666 & ~_umask()
    assert not (tmp_path / "runs" / "volume" / "scratch").exists()


def test_what_a_stopped_run_left_in_its_scratch_folder_is_cleared_when_it_goes_on(tmp_path):
    tape(tmp_path / "tape.wav", 8)
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nd,tape.wav,4,4.02,fill the dropout\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    scratch = tmp_path / "runs" / "again" / "scratch"
    scratch.mkdir(parents=True)
    (scratch / "result.x1y2.wav").write_bytes(b"\0" * 1000)  # a result being written when the machine stopped
    [outcome], _, _ = run_in_process(tmp_path / "m.csv", cfg, "again")
    assert outcome.status == "succeeded", outcome.error
    assert not scratch.exists()


def test_a_source_rewritten_while_it_is_read_is_not_taken_for_either_version(tmp_path, monkeypatch):
    # A local source is read twice (its checksum, then its samples): a file replaced in
    # between would give a result recorded under one version's checksum, made from the other.
    from soundpatch import sources

    tape(tmp_path / "tape.wav", 8)
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nd,tape.wav,4,4.02,fill the dropout\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    checksum = sources.file_sha256

    def then_rewritten(path):
        digest = checksum(path)
        sf.write(path, np.zeros((8 * 44100, 2), np.int16), 44100, subtype="PCM_16")  # an editor saving over it
        return digest

    monkeypatch.setattr(sources, "file_sha256", then_rewritten)
    [outcome], _, _ = run_in_process(tmp_path / "m.csv", cfg, "moving")
    assert outcome.status == "invalid" and outcome.cost_usd == 0  # found while validating: nothing sent
    assert "tape.wav changed while it was being read; run again once it is written" in outcome.error
    monkeypatch.setattr(sources, "file_sha256", checksum)
    [again], _, _ = run_in_process(tmp_path / "m.csv", cfg, "moving")
    assert again.status == "succeeded", again.error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


HEAPS = """
import ctypes, os, sys, threading
import numpy as np
from soundpatch.entry import _fewer_heaps

if sys.argv[1] == "bounded":
    _fewer_heaps()
start = threading.Barrier(12)

def row():
    start.wait()
    for _ in range(50):
        np.ones(4000).sum()  # 32 KB: from the thread's heap, not a mapping of its own

threads = [threading.Thread(target=row) for _ in range(12)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fdopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fflush.argtypes = [ctypes.c_void_p]
out = libc.fdopen(1, b"w")
libc.malloc_info(0, out)
libc.fflush(out)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heaps")
def test_the_command_s_row_threads_share_one_heap_a_core(tmp_path):
    # Each thread that allocates got a heap of its own, up to eight a core, kept once used:
    # a long tape's run held 2.1-2.3 GB resident where a heap a core held 1.3 GB.
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    heaps = {}
    for how in ("bounded", "as glibc does"):
        info = subprocess.run([sys.executable, "-c", HEAPS, how], capture_output=True, text=True, env=env, check=True)
        heaps[how] = info.stdout.count("<heap nr=")
    assert heaps["bounded"] <= max(2, os.cpu_count() or 2) < heaps["as glibc does"]
