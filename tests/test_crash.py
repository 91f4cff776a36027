"""Kill it at any moment, run it again: nothing lost, nothing paid twice.

The simulator runs in this test process, so it outlives every `soundpatch run` it serves
and counts every create it ever saw.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from soundpatch import interrupt
from soundpatch.batch import Batch
from soundpatch.config import S3Config, load_config
from soundpatch.manifest import load_manifest
from soundpatch.s3 import S3, S3Uri
from tests.jobs import (
    AFTER_STAGING,
    AT_DECODE,
    KEY,
    dying,
    environment,
    events,
    finish,
    finish_every_row,
    kill_group,
    report,
    soundpatch,
    start,
    wait_for,
    write_job,
)


@pytest.mark.parametrize("provider", ["eachlabs", "fal"])
def test_sigkill_after_every_create_then_rerun_pays_each_prediction_once(
    job_dir, aws_env, simulator, tmp_path_factory, provider
):
    sim = simulator(latency=8.0, fill="tone")  # slower than the kill
    write_job(job_dir, sim, aws_env, rows=16, concurrency=16, provider_name=provider)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(job_dir, env, "kill9")
    wait_for(lambda: len(events(job_dir, "kill9", "created")) == 16, 90, "16 acknowledged creates")
    kill_group(proc)
    assert sim.stats.accepted == 16

    again = finish(job_dir, env, "kill9")
    assert again.returncode == 0, again.stdout + again.stderr
    assert sim.stats.creates == 16 and sim.stats.accepted == 16  # not one more create
    assert sorted(sim.stats.prompts) == [f"take {i:02d}" for i in range(16)]
    rows = report(job_dir, "kill9")
    assert list(rows["status"]) == ["succeeded"] * 16
    assert rows["cost_usd"].sum() == pytest.approx(16 * 0.20)
    assert list(rows["attempts"]) == [1] * 16  # the create each sent before the kill, none after
    assert all(Path(p).is_file() for p in rows["output"])
    assert aws_env.keys("stage", "clips/kill9/") == []  # clips staged before the kill are gone too


def test_a_killed_run_run_again_without_its_run_id_collects_what_it_paid_for(
    job_dir, aws_env, simulator, tmp_path_factory
):
    # Killed with 8 predictions in flight, then the same command again, without --run-id
    # (as one does after a crash, or as the next night's run does): a new run id, which sent
    # those 8 edits again and paid for each a second time ($4.00 for 12 rows, not $2.40).
    sim = simulator(latency=8.0, fill="tone")  # slower than the kill
    write_job(job_dir, sim, aws_env, rows=12, concurrency=8)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(job_dir, env, "killed")
    wait_for(lambda: len(events(job_dir, "killed", "created")) == 8, 90, "8 acknowledged creates")
    kill_group(proc)
    assert sim.stats.accepted == 8

    dry = soundpatch("run", "job.csv", "--config", "job.yaml", "--dry-run", cwd=job_dir, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert re.search(r"paid earlier, to collect \(no new cost\) +8\s", dry.stdout), dry.stdout
    assert re.search(r"predictions to send +4\s", dry.stdout) and "$0.80 (budget" in dry.stdout, dry.stdout

    again = soundpatch("run", "job.csv", "--config", "job.yaml", cwd=job_dir, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sim.stats.creates == 12 and sim.stats.accepted == 12  # 4 more, for the rows never sent
    run_id = re.search(r"Run id (\S+)", again.stdout + again.stderr, re.I).group(1)
    rows = report(job_dir, run_id)
    assert list(rows["status"]) == ["succeeded"] * 12
    assert rows["cost_usd"].sum() == pytest.approx(4 * 0.20)  # the killed run paid for the other 8
    assert (rows["cost_usd"] == 0).sum() == 8
    assert all(Path(p).is_file() for p in rows["output"])
    said = "8 results were made from predictions that run killed paid for and never collected"
    assert said in again.stdout, again.stdout
    # And the killed run, taken up again, finds every edit made: nothing more is sent.
    done = finish(job_dir, env, "killed")
    assert done.returncode == 0 and sim.stats.creates == 12, done.stdout + done.stderr
    assert list(report(job_dir, "killed")["status"]) == ["skipped_done"] * 12


def test_a_run_resumed_on_a_machine_without_its_journal_neither_pays_twice_nor_passes_its_budget(
    job_dir, aws_env, simulator, tmp_path_factory
):
    # A worker in a container dies, and its runs/ folder with it; the flow run's retry runs
    # on a fresh machine. The outputs (and the journal's copy) are in a bucket.
    sim = simulator(latency=8.0, fill="tone")  # slower than the kill
    write_job(job_dir, sim, aws_env, rows=12, concurrency=8)
    aws_env.bucket("made")
    aws_env.bucket("stage-moved")  # its own: what it leaves behind, should it fail, is no other test's
    # 8 in flight at once: until a cost comes in, each counts half again as dear (limits.py).
    config = (job_dir / "job.yaml").read_text().replace("budget_usd: 100", "budget_usd: 2.4")
    config = config.replace("s3://stage/clips/", "s3://stage-moved/clips/")
    (job_dir / "job.yaml").write_text(config + "output: {uri: 's3://made/takes/'}\n")
    proc = start(job_dir, environment(tmp_path_factory.mktemp("prefect")), "moved")
    wait_for(lambda: copied_creates(aws_env, "made", "takes/.soundpatch/runs/moved/") == 8, 90, "8 creates copied")
    kill_group(proc)
    assert sim.stats.accepted == 8
    shutil.rmtree(job_dir / "runs")  # the machine is gone

    env = environment(tmp_path_factory.mktemp("prefect"))
    # At once, the new machine cannot tell the first one is gone: its lease (60 s) has not lapsed.
    early = finish(job_dir, env, "moved")
    assert early.returncode == 2 and "Run moved is going on another machine (process" in early.stderr, early.stderr
    assert sim.stats.creates == 8
    # Knowing it is gone, one can say so: a lease silent for 3 s is taken up (the test's wait).
    config = (job_dir / "job.yaml").read_text().replace("{s3: {endpoint_url:", "{s3: {lease_seconds: 3, endpoint_url:")
    (job_dir / "job.yaml").write_text(config.replace("budget_usd: 2.4", "budget_usd: 2.0"))  # $0.40 left
    lease, s3 = S3Uri("made", "takes/.soundpatch/runs/moved/lease"), S3(S3Config(endpoint_url=aws_env.endpoint))
    wait_for(lambda: s3.age(lease)[1] > 3, 10, "the lost machine's lease to lapse")
    dry = soundpatch("run", "job.csv", "--config", "job.yaml", "--run-id", "moved", "--dry-run", cwd=job_dir, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert re.search(r"paid earlier, to collect \(no new cost\) +8\s", dry.stdout), dry.stdout
    assert "$1.60 spent by" in dry.stdout
    assert not (job_dir / "runs" / "moved" / "journal.jsonl").exists()  # a dry run only reads the copy

    again = finish(job_dir, env, "moved")
    assert again.returncode == 3, again.stdout + again.stderr  # the budget stopped two rows
    # The 8 paid for on the lost machine are collected, and only $0.40 was left for the rest.
    assert sim.stats.creates == 10 and sim.stats.accepted == 10
    rows = report(job_dir, "moved")
    assert sorted(rows["status"]) == ["skipped_budget"] * 2 + ["succeeded"] * 10
    assert rows["cost_usd"].sum() == pytest.approx(2.0)
    summary = json.loads((job_dir / "runs" / "moved" / "report.json").read_text())["summary"]
    went_on = "went on from the journal's copy in the bucket (8 rows begun elsewhere)"
    assert any(went_on in n for n in summary["notes"]), summary["notes"]
    # Once the run ends, its whole journal replaces the rows' copies.
    assert aws_env.keys("made", "takes/.soundpatch/runs/") == ["takes/.soundpatch/runs/moved/journal.jsonl"]
    assert aws_env.keys("stage-moved") == []  # the lost machine's staged clip is gone too


def copied_creates(s3, bucket: str, run: str) -> int:
    """Predictions whose id the journal's copy in the bucket holds."""
    copies = [s3.client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in s3.keys(bucket, run + "rows/")]
    return sum(b'"event": "created"' in copy for copy in copies)


@pytest.mark.parametrize("provider", ["eachlabs", "fal"])
def test_a_run_that_dies_using_a_downloaded_result_finishes_it_without_fetching_it_again(
    job_dir, aws_env, simulator, tmp_path_factory, provider
):
    # Downloaded, then the process died decoding it: the rerun neither polls nor downloads
    # (the provider's result URL may have expired by then); it uses the answer kept on disk.
    sim = simulator(latency=0.2, fill="tone")
    write_job(job_dir, sim, aws_env, rows=1, concurrency=1, provider_name=provider)
    env = environment(tmp_path_factory.mktemp("prefect"))
    args = ("run", "job.csv", "--config", "job.yaml", "--run-id", "died")
    died = dying(AT_DECODE, *args, cwd=job_dir, env=env)
    assert died.returncode == 137, died.stdout + died.stderr
    assert events(job_dir, "died", "answer_kept") and not events(job_dir, "died", "outcome")
    polls, downloads = sim.stats.polls, sim.stats.downloads
    assert downloads == 1

    again = finish(job_dir, env, "died")
    assert again.returncode == 0, again.stdout + again.stderr
    row = report(job_dir, "died").iloc[0]
    assert row["status"] == "succeeded" and row["cost_usd"] == pytest.approx(0.20)
    assert (sim.stats.accepted, sim.stats.polls, sim.stats.downloads) == (1, polls, downloads)
    assert Path(row["output"]).is_file() and not any((job_dir / "runs" / "died" / "answers").iterdir())


def test_a_clip_staged_by_a_run_killed_right_after_the_upload_is_removed_by_the_rerun(
    job_dir, aws_env, simulator, tmp_path_factory
):
    sim = simulator(latency=0.2, fill="tone")
    write_job(job_dir, sim, aws_env, rows=1, concurrency=1)
    aws_env.bucket("stage-killed")  # its own: what it leaves behind, should it fail, is no other test's
    config = (job_dir / "job.yaml").read_text().replace("s3://stage/clips/", "s3://stage-killed/clips/")
    (job_dir / "job.yaml").write_text(config)
    env = environment(tmp_path_factory.mktemp("prefect"))
    args = ("run", "job.csv", "--config", "job.yaml", "--run-id", "staged")
    died = dying(AFTER_STAGING, *args, cwd=job_dir, env=env)
    assert died.returncode == 137, died.stdout + died.stderr
    assert len(aws_env.keys("stage-killed")) == 1 and sim.stats.creates == 0

    finish_every_row(job_dir, env, "staged", rows=1)
    assert aws_env.keys("stage-killed") == [] and sim.stats.accepted == 1


def test_a_create_whose_answer_never_came_is_not_sent_again(job_dir, aws_env, simulator, tmp_path_factory):
    sim = simulator(latency=0.2, fill="tone", slow_create_rate=1.0, slow_create_seconds=60)
    write_job(job_dir, sim, aws_env, rows=1, concurrency=1)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(job_dir, env, "doubt")
    wait_for(lambda: sim.stats.accepted == 1 and events(job_dir, "doubt", "creating"), 60, "the create")
    kill_group(proc)  # the prediction exists; we never heard of it

    sim.settings.slow_create_rate = 0.0
    again = finish(job_dir, env, "doubt")
    assert again.returncode == 1
    row = report(job_dir, "doubt").iloc[0]
    assert row["status"] == "failed" and "counted as spent" in row["error"]
    assert row["cost_usd"] == pytest.approx(0.20) and sim.stats.accepted == 1

    # Asked to, it sends it again (and the report shows both prices).
    (job_dir / "job.yaml").write_text(
        (job_dir / "job.yaml")
        .read_text()
        .replace("max_poll_seconds: 0.5", "max_poll_seconds: 0.5, resubmit_in_doubt: true")
    )
    third = finish(job_dir, env, "doubt")
    assert third.returncode == 0, third.stdout + third.stderr
    row = report(job_dir, "doubt").iloc[0]
    assert row["status"] == "succeeded" and row["cost_usd"] == pytest.approx(0.40)
    assert sim.stats.accepted == 2


def test_a_create_a_killed_run_never_heard_back_from_is_not_sent_by_a_run_with_a_new_id_either(
    job_dir, aws_env, simulator, tmp_path_factory
):
    # Killed with a create out, then the same command without --run-id (or the next night's
    # run): it sent that edit again, and the prediction may well exist and be billed.
    sim = simulator(latency=0.2, fill="tone", slow_create_rate=1.0, slow_create_seconds=60)
    write_job(job_dir, sim, aws_env, rows=2, concurrency=1)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(job_dir, env, "died")
    wait_for(lambda: sim.stats.accepted == 1 and events(job_dir, "died", "creating"), 60, "the create")
    kill_group(proc)  # the prediction exists; that run never heard of it
    [out] = [e["row"] for e in events(job_dir, "died", "creating")]  # (either row may have gone first)
    [other] = {"r00", "r01"} - {out}
    sim.settings.slow_create_rate = 0.0
    run = ("run", "job.csv", "--config", "job.yaml")

    dry = soundpatch(*run, "--dry-run", cwd=job_dir, env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert re.search(r"in doubt from earlier \(not sent again\) +1\s", dry.stdout), dry.stdout
    assert re.search(r"predictions to send +1\s", dry.stdout), dry.stdout

    again = soundpatch(*run, cwd=job_dir, env=env)
    assert again.returncode == 1, again.stdout + again.stderr
    run_id = re.search(r"Run id (\S+)", again.stdout + again.stderr, re.I).group(1)
    rows = report(job_dir, run_id).set_index("row_id")
    assert rows.loc[out, "status"] == "failed" and rows.loc[out, "cost_usd"] == 0
    assert "went out in run died and its answer never came" in rows.loc[out, "error"]
    assert "resubmit_in_doubt" in rows.loc[out, "error"]
    assert rows.loc[other, "status"] == "succeeded"  # the rest of the batch goes on
    assert sim.stats.accepted == 2  # the row in doubt once (the killed run's), the other once
    assert "1 row of edits that run died sent and never heard back from was not sent again" in again.stdout

    # Told to, a run sends it again; the runs after it, and the killed run's own rerun, find it made.
    told = job_dir / "told.yaml"
    told.write_text(
        (job_dir / "job.yaml")
        .read_text()
        .replace("max_poll_seconds: 0.5", "max_poll_seconds: 0.5, resubmit_in_doubt: true")
    )
    sent = soundpatch("run", "job.csv", "--config", str(told), cwd=job_dir, env=env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sim.stats.accepted == 3
    after = soundpatch(*run, cwd=job_dir, env=env)
    assert after.returncode == 0, after.stdout + after.stderr
    resumed = finish(job_dir, env, "died")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert list(report(job_dir, "died")["status"]) == ["skipped_done"] * 2
    assert sim.stats.accepted == 3  # nothing more sent


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_lets_work_in_flight_finish_and_the_rerun_does_the_rest(
    job_dir, aws_env, simulator, tmp_path_factory, stop_signal
):
    sim = simulator(latency=3.0, fill="tone")
    write_job(job_dir, sim, aws_env, rows=12, concurrency=4)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(job_dir, env, "ctrlc")
    wait_for(lambda: sim.stats.accepted >= 4, 60, "four creates")
    os.killpg(proc.pid, stop_signal)
    out, err_text = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err_text
    assert "Stopping: no new rows will start" in err_text and "Traceback" not in out + err_text
    first = report(job_dir, "ctrlc")
    done = first[first.status == "succeeded"]
    assert len(done) == sim.stats.accepted  # everything sent was collected
    assert (first.loc[first.status != "succeeded", "error"].str.contains("Not started")).all()

    finish_every_row(job_dir, env, "ctrlc", 12)
    assert sim.stats.accepted == 12


def test_a_second_ctrl_c_stops_at_once_and_the_journal_still_resumes(job_dir, aws_env, simulator, tmp_path_factory):
    sim = simulator(latency=30.0, fill="tone")
    write_job(job_dir, sim, aws_env, rows=6, concurrency=6)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(job_dir, env, "twice")
    wait_for(lambda: len(events(job_dir, "twice", "created")) == 6, 60, "six acknowledged creates")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    stopped_at = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - stopped_at < 10

    sim.settings.latency = 0.5
    finish_every_row(job_dir, env, "twice", 6)
    assert sim.stats.accepted == 6


def prefect_server_of(pid: int) -> int:
    """The pid of the temporary Prefect server the command `pid` started (flows/ephemeral.py)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command, stat = cmdline.read_bytes(), (cmdline.parent / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        if b"flows.prefect_server" in command and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            return int(cmdline.parent.name)
    raise AssertionError(f"no Prefect server started by {pid}")


def test_a_run_whose_temporary_prefect_server_dies_starts_it_again_and_ends_as_usual(
    job_dir, aws_env, simulator, tmp_path_factory
):
    # Prefect's temporary server killed mid-run (the kernel's OOM killer, a `pkill`). Left
    # dead, rows stopped starting a minute at a time, Prefect printed every event it held
    # on the terminal, 7 s apiece, and minutes after the last row the command had still not
    # ended. It is started again on the same port and database: the run ends as usual, and
    # Prefect records its end.
    sim = simulator(latency=1.0, fill="tone")
    write_job(job_dir, sim, aws_env, rows=16, concurrency=4)
    home = tmp_path_factory.mktemp("prefect")
    env = environment(home)
    proc = start(job_dir, env, "server-died")
    wait_for(lambda: len(events(job_dir, "server-died", "outcome")) >= 4, 120, "four rows done")
    os.kill(prefect_server_of(proc.pid), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert (
        "Prefect's temporary server stopped during the run (killed by SIGKILL); it was started again on the same "
        "port and database, and the run goes on." in err
    )
    assert "EventsWorker" not in err and "Unable to connect" not in err and "Traceback" not in out + err
    assert list(report(job_dir, "server-died")["status"]) == ["succeeded"] * 16
    assert sim.stats.creates == sim.stats.accepted == 16
    with closing(sqlite3.connect(home / "prefect.db")) as db:
        state = db.execute("SELECT state_type FROM flow_run WHERE name = 'soundpatch server-died'").fetchall()
    assert state == [("COMPLETED",)]


def test_on_interrupt_cancel_cancels_predictions_in_flight(job_dir, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=60.0, fill="tone")
    (job_dir / "one.csv").write_text("id,input,start,end,prompt\nr0,fx.wav,1,1.5,take\n")
    cfg = load_config(
        overrides={
            "provider.name": "eachlabs",
            "provider.base_url": sim.base_url,
            "provider.poll_seconds": 0.05,
            "provider.on_interrupt": "cancel",
            "storage.s3.endpoint_url": aws_env.endpoint,
            "storage.staging": "s3://stage/clips/",
            "output.uri": str(job_dir / "out"),
            "runs_dir": str(job_dir / "runs"),
        }
    )
    batch = Batch(load_manifest(job_dir / "one.csv"), cfg, "cancel")
    threading.Timer(1.0, interrupt.request_stop).start()
    try:
        [outcome] = [batch.process(e) for e in batch.manifest.edits]
    finally:
        interrupt.reset()
        batch.close()
    assert outcome.status == "failed" and "cancelled because the run was interrupted" in outcome.error
    assert sim.get(KEY, outcome.prediction_id)[1]["status"] == "cancelled"
