"""A disk too full for a row's result: the row is refused before it is paid for, in one
sentence, and a disk that fills after it was paid says so and keeps what was paid
(soundpatch/disk_room.py). The disks here are real ones, small: tmpfs mounts."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from soundpatch import audio as audio_ops
from soundpatch.answers import ANSWERS_DIR
from soundpatch.batch import Batch
from soundpatch.config import S3Config, load_config
from soundpatch.cpu import AT_ONCE
from soundpatch.disk_room import DiskRoom
from soundpatch.errors import RowError
from soundpatch.estimate import TYPICAL_SECONDS
from soundpatch.humanize import size as human_size
from soundpatch.journal import Journal, JournalUnwritable, read_events
from soundpatch.manifest import load_manifest
from soundpatch.outcome import Outcome
from soundpatch.report import parse_report, publish_reports, summarize
from soundpatch.s3 import S3
from soundpatch.storage import open_store
from tests.jobs import KEY, clean_env, hosted_config, run_in_process, soundpatch

PRICE = 0.20
MB = 1_000_000


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (MB) at a new folder; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(megabytes: int, name: str = "disk") -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small disk here (needs root): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all of `disk`'s free space but `leave` bytes. A run writing there at the
    same time may take some of that space first: then the disk is full, as asked, when the
    filler's last write finds no room (it raised, and the test's filling thread died)."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "ab", buffering=0) as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def fill_last_page(path: Path) -> None:
    """Blank lines (which a reading skips) to the end of the last page of the file at `path`
    (a journal), on a disk just filled: small lines take a file's last page for nothing,
    so the next line there needs a page the disk has not got."""
    with open(path, "ab") as f:
        try:
            f.write(b"\n" * (-path.stat().st_size % os.sysconf("SC_PAGE_SIZE")))
        except OSError as exc:  # the run's own line took that page first: it is full all the same
            if exc.errno != errno.ENOSPC:
                raise


def hosted_config_file(path: Path, sim, aws_env, runs: Path, outputs: Path) -> Path:
    """A config file for the command: Each Labs at `sim`, clips staged in the S3 server's
    s3://stage/clips/ (the bucket made here), the run's folder and outputs where given."""
    aws_env.bucket("stage")
    path.write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.05}}\n"
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
        f"runs_dir: {runs}\noutput: {{uri: {outputs}}}\n"
    )
    return path


def tape(path: Path, seconds: int, rate: int = 44100) -> np.ndarray:
    samples = np.random.default_rng(1).integers(-3000, 3000, (rate * seconds, 2)).astype(np.int16)
    sf.write(path, samples, rate, subtype="PCM_16")
    return samples


def test_validate_says_what_the_results_take_on_disk_and_when_they_would_fill_it(tmp_path, small_disk):
    # A restoration batch of a long tape: every row's result was a whole copy of the tape (40
    # dropouts of a 30-minute stereo tape took 13 GB and 76 s, where validate said nothing
    # of disk and expected 10 s; now each keeps its region and a second each side, and the
    # tape restored is the one whole copy). Validate says how much the results take, up to,
    # and where that is more than the output folder's disk has free, that rows would be refused.
    tape_bytes = tape(tmp_path / "tape.wav", 30).nbytes  # 5.3 MB of samples
    rows = "".join(f"d{i},tape.wav,{2 + 2 * i},{2.05 + 2 * i},fill the dropout,restored\n" for i in range(12))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,output\n" + rows)
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "estimate", dry_run=True)
    try:
        est = batch.estimate(batch.manifest.edits)
    finally:
        batch.close()
    outcomes, _, _ = run_in_process(tmp_path / "m.csv", cfg, "made")
    assert [o.status for o in outcomes] == ["succeeded"] * 12
    made = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*.wav"))  # 12 rows' results and the tape restored
    assert made < 2 * tape_bytes  # not 13 copies of it
    # As tight as each result's bound is (further down): its samples, and 64 KB for headers.
    assert made <= est["results_bytes"] <= 1.05 * made + 13 * 64 * 1024
    assert est["outputs_free"][0] == str(tmp_path / "out") and not [n for n in est["notes"] if "would take" in n]
    assert est["expected_seconds"] > 12 * TYPICAL_SECONDS["local"] / AT_ONCE  # writing them counts too

    disk = small_disk(48)
    (tmp_path / "c.yaml").write_text(f"output: {{uri: {disk / 'out'}}}\nruns_dir: {tmp_path / 'runs'}\n")
    proc = soundpatch("validate", "m.csv", "--config", "c.yaml", cwd=tmp_path, env=clean_env())
    said = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"results on disk up to {human_size(est['results_bytes'])} (" in said and "free in" in said
    assert (f"note: The results would take up to {human_size(est['results_bytes'])} in {disk / 'out'}, where ") in said
    assert "once the disk is full, the rows left are refused before they are sent" in said


def test_validate_says_when_the_file_of_several_rows_edits_would_not_fit_where_their_own_results_do(
    tmp_path, small_disk
):
    # A restoration batch's rows keep excerpts of the tape (a second each side of each
    # region); the file holding all their edits is written whole once they are done. Where
    # only the excerpts fit, validate said nothing (it went by the largest row's result)
    # and the run then said the file was not made.
    disk = small_disk(80)  # 84 MB free: 64 MB kept for the run's own files, room for the rows' excerpts
    tape(tmp_path / "tape.wav", 540)  # 95 MB of samples
    rows = "".join(f"d{i},tape.wav,{10 + 60 * i},{10.05 + 60 * i},fill the dropout,restored\n" for i in range(3))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,output\n" + rows)
    cfg = load_config(overrides={"output.uri": str(disk / "out"), "runs_dir": str(disk / "runs")})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "tight", dry_run=True)
    try:
        notes = batch.estimate(batch.manifest.edits)["notes"]
    finally:
        batch.close()
    assert not [n for n in notes if "would refuse row" in n], notes  # the rows' own results fit
    [said] = [n for n in notes if n.startswith("restored.wav, the file holding several rows' edits, would not be")]
    assert f"not enough free disk space for the file: it takes up to 97 MB in {disk / 'runs'}, where 84 MB is " in said
    assert said.endswith("run it again with the same --run-id to make it at no cost.")

    outcomes, notes, _ = run_in_process(tmp_path / "m.csv", cfg, "tight")
    assert [o.status for o in outcomes] == ["succeeded"] * 3, [o.error for o in outcomes]
    assert any(n.startswith("restored.wav was not made.") for n in notes), notes  # as validate said


def test_rows_whose_results_do_not_fit_are_refused_before_they_are_paid_for(tmp_path, small_disk, aws_env, simulator):
    # Results are written whole to the run's folder before they are published. A row whose
    # result the disk cannot take was paid for, then failed with "Unexpected
    # LibsndfileError: System error.". Now it is refused before it is sent, saying so; the
    # rows that fit go on; and once there is room, the same run id finishes the rest.
    disk = small_disk(128)
    samples = tape(tmp_path / "tape.wav", 60)  # 10.6 MB of samples: up to 18 MB with its answer
    sf.write(tmp_path / "fx.wav", samples[:120000, :1], 44100, subtype="PCM_16")  # a few hundred kB
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,seed\n"
        "t1,tape.wav,10,10.5,tape hiss,1\n"
        "fx,fx.wav,1,1.5,clang,2\n"
        "t2,tape.wav,40,40.5,tape hiss,3\n"
    )
    sim = simulator(latency=0.05, fill="tone")
    hosted_config_file(tmp_path / "c.yaml", sim, aws_env, runs=disk / "runs", outputs=disk / "outputs")
    filler = fill(disk, leave=76 * MB)  # 12 MB beyond the 64 MB kept for the run's own files
    env = clean_env(EACHLABS_API_KEY=KEY, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    args = ("run", "m.csv", "--config", "c.yaml", "--run-id", "full")
    dry = soundpatch(*args, "--dry-run", cwd=tmp_path, env=env)  # the estimate says so first
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert (
        "note: The run would refuse row t1 before sending it (and any other whose result is as large): not enough "
        f"free disk space for this row's result: it takes up to 18 MB in {disk / 'runs'}, where"
    ) in " ".join(dry.stdout.split())
    proc = soundpatch(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = pd.read_csv(disk / "runs" / "full" / "report.csv").set_index("row_id")
    assert report.loc["fx", "status"] == "succeeded" and report.loc["fx", "cost_usd"] == PRICE
    for row in ("t1", "t2"):
        assert report.loc[row, "status"] == "failed"
        assert report.loc[row, "cost_usd"] == 0 and report.loc[row, "attempts"] == 0
        assert report.loc[row, "error"].startswith(
            f"Not enough free disk space for this row's result: it takes up to 18 MB in {disk / 'runs' / 'full'}"
        )
        assert report.loc[row, "error"].endswith(
            "nothing was sent: free some space (or set runs_dir, or output.uri, to a larger disk) and run it again."
        )
    assert sim.stats.accepted == 1  # the tape's rows were never sent
    # The summary says it (once, or twice where the free space it names changed between the two).
    said = [line.strip() for line in proc.stdout.splitlines() if "Not enough free disk space" in line]
    assert said and all(line.startswith(("failed t1, t2: ", "failed t1: ", "failed t2: ")) for line in said)
    assert "t1" in " ".join(said) and "t2" in " ".join(said)
    assert "Traceback" not in proc.stdout + proc.stderr

    filler.unlink()
    again = soundpatch(*args, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    report = pd.read_csv(disk / "runs" / "full" / "report.csv").set_index("row_id")
    assert list(report["status"]) == ["succeeded"] * 3
    assert sim.stats.accepted == 3 and report["cost_usd"].sum() == pytest.approx(3 * PRICE)
    for row, second in (("t1", 10), ("t2", 40)):
        result = sf.read(report.loc[row, "output"], dtype="int16")[0]
        changed = np.flatnonzero((result != samples).any(axis=1))
        assert len(changed) and {int(f // 44100) for f in changed} == {second}
    assert not (disk / "runs" / "full" / "scratch").exists()


def test_a_disk_that_fills_after_the_row_was_paid_for_says_so_and_the_rerun_collects_it(
    tmp_path, small_disk, aws_env, simulator, monkeypatch
):
    # Something else fills the disk between the row's create and its result's write: the
    # row fails saying the disk is full (libsndfile says only "System error."), keeps its
    # paid prediction, and the rerun collects it at no new cost once there is room.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    disk = small_disk(128)
    samples = tape(tmp_path / "tape.wav", 60)
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,seed\nt1,tape.wav,10,10.5,tape hiss,1\n")
    sim = simulator(latency=0.05, fill="tone")
    aws_env.bucket("stage")
    cfg = hosted_config(sim, aws_env.endpoint, str(tmp_path / "outputs"), disk / "runs")
    fillers = []
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "fills")
    write = batch.journal.write

    def filled_once_paid_for(event, *args, **fields):
        write(event, *args, **fields)
        if event == "created":  # the prediction exists: it is paid for
            fillers.append(fill(disk, leave=2 * MB))  # room for the journal's lines, not for the result

    batch.journal.write = filled_once_paid_for
    try:
        [o] = [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()
    assert o.status == "failed" and o.cost_usd == pytest.approx(PRICE)
    assert o.error.startswith(f"The disk holding {disk / 'runs' / 'fills' / 'scratch'} is full (")
    assert o.error.endswith(
        "free) and this row's result did not fit; free some space and run it again; the paid prediction is "
        "kept, and rerunning with --run-id fills tries it again at no new cost."
    )
    assert not list((disk / "runs" / "fills").glob("scratch/*"))  # nothing half-written left

    fillers[0].unlink()
    again = Batch(load_manifest(tmp_path / "m.csv"), cfg, "fills")
    try:
        [o] = [again.process(e) for e in again.manifest.edits]
    finally:
        again.close()
    assert o.status == "succeeded", o.error
    assert sim.stats.accepted == 1 and o.cost_usd == pytest.approx(PRICE) and sim.billed() == pytest.approx(PRICE)
    result = sf.read(o.output, dtype="int16")[0]
    changed = np.flatnonzero((result != samples).any(axis=1))
    assert len(changed) and {int(f // 44100) for f in changed} == {10}


def test_rows_wait_for_room_their_results_give_back_once_uploaded(tmp_path, small_disk, aws_env):
    # Results going to a bucket leave the run's disk once uploaded: with room on it for one
    # result at a time, rows in flight at once take turns instead of failing.
    disk = small_disk(128)
    samples = tape(tmp_path / "tape.wav", 60)
    rows = [f"d{i},tape.wav,{10 + 20 * i},{10.02 + 20 * i},fill the dropout" for i in range(3)]
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\n" + "\n".join(rows) + "\n")
    bucket = aws_env.bucket("tapes")
    cfg = load_config(
        overrides={
            "output.uri": f"s3://{bucket}/fixed/",
            "storage.s3.endpoint_url": aws_env.endpoint,
            "runs_dir": str(disk / "runs"),
        }
    )
    fill(disk, leave=80 * MB)  # 16 MB beyond the margin: one 10.8 MB result at a time
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "turns")
    try:
        with ThreadPoolExecutor(3) as pool:
            outcomes = list(pool.map(batch.process, batch.manifest.edits))
    finally:
        batch.close()
    assert [o.status for o in outcomes] == ["succeeded"] * 3, [o.error for o in outcomes]
    waited = [e for e in read_events(disk / "runs" / "turns") if e["event"] == "waiting_for_disk"]
    assert len(waited) >= 1
    for i, o in enumerate(outcomes):
        assert o.output.startswith(f"s3://{bucket}/fixed/")
        key = o.output.removeprefix(f"s3://{bucket}/")
        body = aws_env.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        result = sf.read(io.BytesIO(body), dtype="int16")[0]
        changed = np.flatnonzero((result != samples).any(axis=1))
        assert len(changed) and {int(f // 44100) for f in changed} == {10 + 20 * i}


def test_rows_in_flight_share_the_free_space_out(tmp_path, small_disk):
    # What one row in flight was promised is not free for the next: that one waits while
    # rows in flight hold room (they give it back as they end), until there is room for it,
    # or until none is held any more and there still is not: then it is refused.
    disk = small_disk(32)
    room = DiskRoom(disk / "runs" / "r" / "scratch", None, margin_bytes=4 * MB)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    share = (free - 4 * MB) // 2
    first, second, third = (room.for_result(share - MB, MB) for _ in range(3))
    assert first.make() and second.make()
    told, made = threading.Event(), []
    waiter = threading.Thread(target=lambda: made.append(third.make(waiting=told.set)))
    waiter.start()
    assert told.wait(5) and waiter.is_alive()
    first.written()  # its result takes its own room now: only its answer is still promised
    (disk / "result").write_bytes(b"\0" * (share - MB))
    first.close()  # published (linked: it stays on this disk)
    time.sleep(1.5)
    assert waiter.is_alive() and not made  # what the first gave back is its file's now
    (disk / "result").unlink()  # ... until it goes (a result uploaded to a bucket is removed)
    waiter.join(5)
    assert made == [True]
    assert room._promised[os.stat(disk).st_dev] == 2 * share

    # No row holds room and there is not enough: refused at once, nothing taken.
    second.close()
    third.close()
    (disk / "other").write_bytes(b"\0" * (share + MB))
    with pytest.raises(RowError, match=r"where [0-9.]+ MB is free and 4.0 MB is kept for the run's own files"):
        room.for_result(share).make()
    (disk / "other").unlink()

    # A run that stops while a row waits: it takes nothing.
    (disk / "other").write_bytes(b"\0" * (share // 2))
    held = room.for_result(share)
    assert held.make()
    stop = threading.Event()
    waiter = threading.Thread(target=lambda: made.append(room.for_result(share).make(give_up=stop.is_set)))
    waiter.start()
    time.sleep(0.5)
    stop.set()
    waiter.join(5)
    assert made[-1] is False
    held.close()
    assert room._promised == {os.stat(disk).st_dev: 0}


def test_a_local_output_folder_on_another_disk_needs_room_there_too(tmp_path, small_disk):
    # Onto the same disk a result is linked into the output folder (no room taken); onto
    # another it is copied, and that disk must have room for it as well.
    runs, outputs = small_disk(64, "runs"), small_disk(8, "outputs")
    with DiskRoom(runs / "scratch", outputs, margin_bytes=MB).for_result(10 * MB) as promise:
        with pytest.raises(RowError, match=f"it takes up to 10 MB in {outputs}, where 8.4 MB is free"):
            promise.make()
    with DiskRoom(runs / "scratch", runs / "outputs", margin_bytes=MB).for_result(10 * MB) as promise:
        promise.make()  # on the scratch folder's disk: linked, no second 10 MB


@pytest.mark.parametrize(
    ("container", "subtype", "channels"),
    [
        ("WAV", "PCM_16", 2),
        ("WAV", "PCM_24", 1),
        ("WAV", "FLOAT", 2),
        ("FLAC", "PCM_16", 2),
        ("FLAC", "PCM_24", 6),
        ("MP3", "PCM_16", 2),
        ("OGG", "PCM_16", 2),
        ("OGG", "PCM_16", 1),
    ],
)
def test_the_room_asked_for_a_result_is_never_less_than_it_takes(tmp_path, container, subtype, channels):
    # White noise: what compresses least. The bound must hold for it, and not ask for
    # much more than it takes where the samples are stored as they are.
    rate = 44100
    noise = np.random.default_rng(7).uniform(-1, 1, (rate * 20, channels)).astype(np.float32)
    dtype = {"PCM_16": np.int16, "PCM_24": np.int32, "FLOAT": np.float32}[subtype]
    like = audio_ops.Audio(np.zeros((1, channels), dtype), rate, "WAV", subtype)
    recording = audio_ops.Audio(audio_ops.from_float(noise, like), rate, "WAV", subtype)
    path = tmp_path / f"out.{container.lower()}"
    audio_ops.encode_file(recording, container, path)
    bound = audio_ops.encoded_bytes_bound(recording.info, container)
    assert path.stat().st_size <= bound
    if container in ("WAV", "FLAC"):
        assert bound <= 1.05 * path.stat().st_size


def test_a_run_clears_what_stopped_runs_left_half_written_and_leaves_running_ones_alone(tmp_path):
    # A run killed while writing results leaves them in its scratch folder; resumed, it
    # clears them, but a run never resumed left them for good (gigabytes, for long tapes:
    # space the next runs' rows are refused for). A run now clears the scratch folders of
    # runs no process is running, and says so; a running one's (its lock held by another
    # process) is left alone.
    runs = tmp_path / "runs"
    for run in ("dead", "live"):
        (runs / run / "scratch").mkdir(parents=True)
        (runs / run / "scratch" / "result.x.wav").write_bytes(b"\0" * 3 * MB)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom soundpatch.locks import RunLock\n"
            f"RunLock(Path({str(runs / 'live')!r})).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        tape(tmp_path / "tape.wav", 5)
        (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nd,tape.wav,2,2.02,fill the dropout\n")
        cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(runs)})
        outcomes, notes, _ = run_in_process(tmp_path / "m.csv", cfg, "next")
        assert [o.status for o in outcomes] == ["succeeded"]
        assert not (runs / "dead" / "scratch").exists()
        assert (runs / "live" / "scratch" / "result.x.wav").stat().st_size == 3 * MB
        assert (
            "3.0 MB of half-written results left in the scratch folders of runs that had stopped (dead) were "
            "removed: rerunning those with their --run-id makes them again from what was paid for."
        ) in notes
    finally:
        holder.kill()
        holder.wait()
    # Once the other run has stopped too, the next run clears its folder as well.
    outcomes, notes, _ = run_in_process(tmp_path / "m.csv", cfg, "after")
    assert not (runs / "live" / "scratch").exists()
    assert any(n.startswith("3.0 MB of half-written results") and "(live)" in n for n in notes)


def test_a_run_whose_own_disk_fills_up_starts_no_more_rows_says_why_and_pays_for_nothing_twice(
    tmp_path, small_disk, aws_env, simulator
):
    # The disk holding the run's journal fills up (another writer) while rows are in
    # flight. It gave "Unexpected OSError" on rows and, at start, a traceback. Now no create
    # goes out that the journal did not record first, no more rows start, the rows say why
    # in one sentence, the summary is shown (the report could not be written: a note says
    # so), and once there is room the same run id does the rest without paying twice.
    disk = small_disk(128)
    sf.write(tmp_path / "fx.wav", tape(tmp_path / "t.wav", 3)[:, :1], 44100, subtype="PCM_16")
    rows = [f"r{i}" for i in range(1, 7)]
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,seed\n" + "".join(f"{r},fx.wav,1,1.5,clang {r},{i}\n" for i, r in enumerate(rows))
    )
    sim = simulator(latency=600, fill="tone")  # every prediction held until the test lets it through
    config = hosted_config_file(tmp_path / "c.yaml", sim, aws_env, runs=disk / "runs", outputs=tmp_path / "outputs")
    config.write_text(config.read_text() + "limits: {concurrency: 1}\n")
    journal = disk / "runs" / "full" / "journal.jsonl"
    answers = journal.parent / ANSWERS_DIR
    fillers: list[Path] = []

    def fill_while_the_second_is_held() -> None:
        # The first prediction made is answered; the second, made once the first's slot is
        # free, is held by the provider while the disk fills, and answered after. Nothing of
        # this waits on timing: before, the second was held from when the test saw the first's
        # answer, and on a loaded CI machine it had sometimes been answered by then. The rows
        # after were then told of the full disk in other true words than the journal's (made
        # to happen with the test's thread 1.5 s late: "succeeded 2 failed 4").
        deadline = time.monotonic() + 120
        let_through = False
        try:
            while time.monotonic() < deadline:
                events = list(read_events(journal.parent)) if journal.exists() else []
                created = [e for e in events if e["event"] == "created"]
                if not let_through and created:
                    assert sim.answer_now() == 1  # concurrency 1: the second is made only after this one
                    let_through = True
                # The first row's paid answer leaves the answers folder just after its outcome is
                # written: filled before that, the disk had room again (a CI run: 1.1 MB, and the next
                # row was told the disk filled while it waited, not that the journal was not written).
                done = any(e["event"] == "outcome" for e in events) and not any(answers.glob("*.answer"))
                if len(created) == 2 and done:  # the second's id is in the journal: the rerun collects it
                    fillers.append(fill(disk, leave=0))
                    fill_last_page(journal)  # (its lines had gone on in a CI run: a third row was sent)
                    return
                time.sleep(0.01)
        finally:
            sim.settings.latency = 0.4  # the second is answered now (or, the disk not filled, the run ends)

    filling = threading.Thread(target=fill_while_the_second_is_held)
    filling.start()
    env = clean_env(EACHLABS_API_KEY=KEY, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    args = ("run", "m.csv", "--config", "c.yaml", "--run-id", "full")
    proc = soundpatch(*args, cwd=tmp_path, env=env)
    filling.join()
    said = " ".join(proc.stdout.replace("│", " ").split())
    assert fillers and proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "Unexpected" not in said
    assert "succeeded 1 failed 5" in said, said  # the row sent first finished before the disk filled
    journal_full = f"the run's journal {journal} could not be written: the disk holding {journal.parent} is full"
    assert f"Not started: {journal_full} (No space left on device), so no more rows start" in said
    assert "report not written (see the note below)" in said
    assert f"note: The report could not be written in {journal.parent}: the disk holding" in said
    assert f"note: {journal_full[:1].upper()}{journal_full[1:]}" in said
    sent = list(sim.stats.prompts)
    assert len(sent) == 2, sent  # the rows after the two in flight as the disk filled: never sent
    recorded = {f"clang {e['row']}" for e in read_events(journal.parent) if e["event"] == "creating"}
    assert set(sent) <= recorded, (sent, recorded)  # nothing went out that the journal had not recorded first

    fillers[0].unlink()
    again = soundpatch(*args, cwd=tmp_path, env=env)
    report = pd.read_csv(disk / "runs" / "full" / "report.csv").set_index("row_id")
    assert Counter(sim.stats.prompts) == Counter(f"clang {r}" for r in rows), sim.stats.prompts  # none paid twice
    assert again.returncode == 0 and (report["status"] == "succeeded").all(), again.stdout + again.stderr
    assert report["cost_usd"].sum() == pytest.approx(PRICE * len(rows))


def one_row_run(tmp_path: Path, runs: Path) -> subprocess.CompletedProcess:
    """`soundpatch run` of one local-engine row with its runs folder at `runs`, which it cannot
    write: exit 2, and no traceback."""
    (tmp_path / "c.yaml").write_text(f"runs_dir: {runs}\noutput: {{uri: {tmp_path / 'outputs'}}}\n")
    sf.write(tmp_path / "fx.wav", tape(tmp_path / "t.wav", 2)[:, :1], 44100, subtype="PCM_16")
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nr1,fx.wav,1,1.2,clang\n")
    proc = soundpatch("run", "m.csv", "--config", "c.yaml", "--run-id", "x", cwd=tmp_path, env=clean_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_a_full_disk_at_the_start_is_one_sentence_and_nothing_is_sent(tmp_path, small_disk):
    # The run's lock file could not be written: a traceback, before.
    disk = small_disk(2)
    fill(disk, leave=0)
    proc = one_row_run(tmp_path, disk / "runs")
    assert " ".join(proc.stderr.split()) == (
        f"error: Nothing was sent: the disk holding {disk / 'runs' / 'x'} is full (No space left on device); free "
        "some space (or set runs_dir to a larger disk) and run it again."
    )
    assert not list(tmp_path.glob("outputs/**/*.wav"))


def test_a_read_only_disk_is_not_called_full(tmp_path, small_disk):
    # A small read-only mount has little room: it was said to be "full (1.0 MB free)".
    disk = small_disk(1)
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    assert remounted.returncode == 0, remounted.stderr
    proc = one_row_run(tmp_path, disk / "runs")
    assert " ".join(proc.stderr.split()) == (
        f"error: Nothing was sent: the run's folder {disk / 'runs' / 'x'} cannot be written (Read-only file "
        "system); set runs_dir to a folder you can write to and run it again."
    )


def test_a_journal_line_cut_short_by_a_full_disk_costs_only_itself(tmp_path, small_disk):
    disk = small_disk(2)
    journal = Journal(disk / "run")
    journal.write("run_started", total=1)
    filler = fill(disk, leave=0)
    journal.write("outcome", "r1", outcome={"status": "failed", "error": "x" * 5000})  # let go: the row is over
    assert journal.broken == (
        f"the run's journal {disk / 'run' / 'journal.jsonl'} could not be written: the disk holding {disk / 'run'} "
        "is full (No space left on device)"
    )
    with pytest.raises(JournalUnwritable):  # a create is not sent unless the journal has it first
        journal.write("creating", "r2", attempt=1)
    filler.unlink()
    journal.write("created", "r2", prediction_id="p2")
    journal.close()
    assert [(e["event"], e.get("row")) for e in read_events(disk / "run")] == [("run_started", None), ("created", "r2")]


def test_a_report_the_run_folder_cannot_take_still_goes_next_to_outputs_in_a_bucket(tmp_path, small_disk, aws_env):
    # A nightly run writing a bucket, on a worker whose disk filled up: the report read is
    # the one next to the outputs, and it is there, saying that the local one is not.
    disk = small_disk(2)
    fill(disk, leave=0)
    aws_env.bucket("results")
    store = open_store("s3://results/out/", S3(S3Config(endpoint_url=aws_env.endpoint)))
    outcomes = [Outcome(row, "x.wav", 1.0, 2.0, "p", None, "eachlabs", "succeeded") for row in ("a", "b")]
    summary = summarize(outcomes, {"run_id": "nightly", "budget_usd": 10, "provider": "eachlabs", "wall_seconds": 9})
    paths = publish_reports(disk / "runs" / "nightly", outcomes, summary, store)
    assert summary["report_missing"] and summary["report_uri"] == "s3://results/out/nightly/report.html"
    assert not paths["html"].exists()
    in_bucket = aws_env.client.get_object(Bucket="results", Key="out/nightly/report.json")["Body"].read()
    rows, copied = parse_report(in_bucket)
    assert [r.row_id for r in rows] == ["a", "b"]
    assert copied["notes"] == [
        f"The report could not be written in {disk / 'runs' / 'nightly'}: the disk holding {disk / 'runs' / 'nightly'} "
        "is full (No space left on device); soundpatch report nightly writes it there from the run's journal once "
        "there is room."
    ]
    html = aws_env.client.get_object(Bucket="results", Key="out/nightly/report.html")["Body"].read().decode()
    assert "could not be written in" in html


def test_a_row_waiting_its_turn_as_the_disk_fills_up_is_not_sent(tmp_path, small_disk, aws_env, simulator, monkeypatch):
    # One slot, two rows of a long tape: the second has its room on disk made sure of and
    # waits for the slot while the first is in flight. Something else fills the disk
    # meanwhile. The second was sent as the slot came free, paid for, and failed as its
    # result did not fit (a CI run of the full-disk test further down). Now its room is
    # looked at again as its create goes out: it is not sent, it says why, and the rerun
    # makes it once there is room.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    disk = small_disk(128)
    samples = tape(tmp_path / "tape.wav", 60)  # 10.6 MB of samples: up to 18 MB with its answer
    rows = "t1,tape.wav,10,10.5,tape hiss,1\nt2,tape.wav,40,40.5,tape hiss,2\n"
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,seed\n" + rows)
    sim = simulator(latency=600, fill="tone")  # the first row's answer is held until the disk is full
    aws_env.bucket("stage")
    cfg = hosted_config(sim, aws_env.endpoint, str(tmp_path / "outputs"), disk / "runs", **{"limits.concurrency": 1})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "turns")
    try:
        with ThreadPoolExecutor(2) as pool:
            done = [pool.submit(batch.process, e) for e in batch.manifest.edits]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                events = Counter(e["event"] for e in read_events(disk / "runs" / "turns"))
                if events["sending"] == 2 and events["created"] == 1:  # both have their room; one is sent
                    break
                time.sleep(0.01)
            filler = fill(disk, leave=16 * MB)  # less than the 18 MB the second row's result may take
            sim.settings.latency = 0.05
            outcomes = {o.row_id: o for o in (d.result() for d in done)}
    finally:
        batch.close()
    created = [e["row"] for e in read_events(disk / "runs" / "turns") if e["event"] == "created"]
    assert sim.stats.accepted == 1 and sim.billed() == pytest.approx(PRICE), created  # the second was never sent
    [first] = created
    second = ({"t1", "t2"} - {first}).pop()
    assert outcomes[first].status == "succeeded", outcomes[first].error  # it fits in what is left
    o = outcomes[second]
    assert o.status == "failed" and o.cost_usd == 0 and o.attempts == 0
    assert o.error.startswith(
        f"The disk holding {disk / 'runs' / 'turns' / 'scratch'} filled up while this row waited its turn: its "
        "result takes up to 18 MB there, where "
    )
    assert o.error.endswith("is free; nothing was sent: free some space and run it again."), o.error

    filler.unlink()
    outcomes, _, _ = run_in_process(tmp_path / "m.csv", cfg, "turns")
    assert [o.status for o in outcomes] == ["skipped_done" if o.row_id == first else "succeeded" for o in outcomes]
    assert sim.stats.accepted == 2 and sim.billed() == pytest.approx(2 * PRICE)
    for o, at in zip(outcomes, (10, 40), strict=True):
        result = sf.read(o.output, dtype="int16")[0]
        changed = np.flatnonzero((result != samples).any(axis=1))
        assert len(changed) and {int(f // 44100) for f in changed} == {at}


def test_a_prediction_only_the_bucket_s_journal_copy_recorded_is_collected_by_the_rerun_not_lost(
    tmp_path, small_disk, aws_env, simulator, monkeypatch
):
    # The run's disk fills up just after a create went out: its prediction id reaches the
    # journal's copy in the bucket but not the journal here. That copy is all that says
    # the prediction exists: the run must not throw it away as it ends (it replaced the
    # rows' copies with this machine's journal), and the rerun here must read it (it read
    # only its own journal), collecting the prediction at no new cost, not counting it as
    # a create in doubt (failed, $0.20 gone for nothing).
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    disk = small_disk(128)
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,seed\nt1,fx.wav,1,1.5,a door,1\n")
    sf.write(tmp_path / "fx.wav", tape(tmp_path / "t.wav", 3), 44100, subtype="PCM_16")
    sim = simulator(latency=0.05, fill="tone")
    aws_env.bucket("stage")
    aws_env.bucket("broke-out")
    cfg = hosted_config(sim, aws_env.endpoint, "s3://broke-out/takes/", disk / "runs")
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "broke")
    fillers = []
    write = batch.journal.write

    def filled_once_creating_is_written(event, *args, **fields):
        write(event, *args, **fields)
        if event == "creating":  # on disk (and in the bucket); the create goes out next
            fillers.append(fill(disk, leave=0))
            fill_last_page(batch.journal.path)  # ... and the journal's last page too

    batch.journal.write = filled_once_creating_is_written
    try:
        [o] = [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()
    assert fillers and batch.journal.broken and o.status == "failed", o.error
    assert sim.stats.creates == 1
    here = [e["event"] for e in read_events(disk / "runs" / "broke")]
    assert "creating" in here and "created" not in here  # the id is only in the bucket

    fillers[0].unlink()
    # `soundpatch report` made here reads the copy too: the row's outcome is only there.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = clean_env(EACHLABS_API_KEY=KEY, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    reported = soundpatch("report", "broke", "--config", "c.yaml", cwd=tmp_path, env=env)
    assert reported.returncode == 1, reported.stdout + reported.stderr
    assert "The journal's copy in the bucket knew more of 1 row than this machine's journal" in reported.stdout
    assert list(pd.read_csv(disk / "runs" / "broke" / "report.csv")["status"]) == ["failed"]

    again = Batch(load_manifest(tmp_path / "m.csv"), cfg, "broke")
    try:
        [o] = [again.process(e) for e in again.manifest.edits]
        notes = again.notes()
    finally:
        again.close()
    assert o.status == "succeeded", o.error
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(PRICE)  # collected, not made again
    assert o.cost_usd == pytest.approx(PRICE) and o.attempts == 1
    assert any("journal's copy in the bucket knew more of 1 row than this machine's" in n for n in notes), notes
    # Its journal here now has what the bucket's copy had: a report made from it is whole.
    assert "created" in [e["event"] for e in read_events(disk / "runs" / "broke")]


def test_a_file_of_several_rows_the_disk_cannot_take_says_so_and_the_rerun_makes_it(tmp_path, small_disk):
    # A restoration batch's rows are done (and kept); the file holding all their repairs is
    # built after them, onto an output disk that filled meanwhile.
    outputs = small_disk(80, "outputs")
    source = tape(tmp_path / "reel.wav", 4)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,output\n"
        "hiss,reel.wav,2.5,2.7,room tone,restored/{stem}\n"
        "thud,reel.wav,1,1.2,room tone,restored/{stem}\n"
    )
    cfg = load_config(overrides={"output.uri": str(outputs), "runs_dir": str(tmp_path / "runs")})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "reel")
    try:
        outcomes = [batch.process(e) for e in batch.manifest.edits]
        assert [o.status for o in outcomes] == ["succeeded", "succeeded"], [o.error for o in outcomes]
        filler = fill(outputs, leave=0)
        batch.combine(outcomes)
        notes = batch.notes()
    finally:
        batch.close()
    assert not (outputs / "restored" / "reel.wav").exists() and not any(o.combined for o in outcomes)
    assert (
        f"restored/reel.wav was not made. {outputs / 'restored' / 'reel.wav.json'} could not be written: the disk "
        f"holding {outputs / 'restored'} is full (No space left on device); free some space and run it again with "
        "the same --run-id to make it."
    ) in notes, notes

    filler.unlink()
    again, notes, _ = run_in_process(tmp_path / "m.csv", cfg, "reel")
    assert [o.status for o in again] == ["skipped_done", "skipped_done"]
    assert {o.combined for o in again} == {str(outputs / "restored" / "reel.wav")}
    assert sf.read(outputs / "restored" / "reel.wav", dtype="int16")[0][:44100].tolist() == source[:44100].tolist()
