"""`soundpatch runs`: what the runs in the runs folder made and spent, one killed with money out among them.

Whole commands as users run them, against the provider simulator over HTTP and an S3
server on loopback: a finished run, a run killed the moment its first paid answer came in
(paid for, not collected), then resumed.
"""

from __future__ import annotations

import json
import time

from soundpatch.locks import RunLock
from tests.jobs import AT_DECODE, clean_env, dying, environment, soundpatch, write_job


def shown(text: str) -> str:
    return " ".join(text.split())


def test_runs_says_what_each_run_made_and_spent_and_what_a_killed_one_has_out(
    job_dir, aws_env, simulator, tmp_path_factory
):
    sim = simulator(latency=0.2, fill="tone")
    write_job(job_dir, sim, aws_env, rows=2, concurrency=1)
    env = environment(tmp_path_factory.mktemp("prefect"))
    job = ("job.csv", "--config", "job.yaml")
    done = soundpatch("run", *job, "--run-id", "night-1", cwd=job_dir, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    # The first row again, forced: killed as its paid answer is decoded ($0.20 out).
    (job_dir / "first.csv").write_text("".join((job_dir / "job.csv").read_text().splitlines(keepends=True)[:2]))
    died = dying(
        AT_DECODE, "run", "first.csv", "--config", "job.yaml", "--run-id", "night-2", "--force", cwd=job_dir, env=env
    )
    assert died.returncode == 137, died.stdout + died.stderr
    assert sim.stats.accepted == 3

    listed = soundpatch("runs", "--config", "job.yaml", cwd=job_dir, env=env)
    assert listed.returncode == 0 and not listed.stderr, listed.stderr
    lines = [shown(line) for line in listed.stdout.splitlines()]
    assert lines[0] == "Runs in runs, the latest first:"
    assert lines[1].startswith("night-2 ") and lines[1].endswith("$0.00 stopped (about $0.20 out): 1 not done"), lines
    assert lines[2] == "first.csv, eachlabs"
    assert lines[3].startswith("night-1 ") and lines[3].endswith("$0.40 finished: 2 succeeded"), lines
    assert lines[5] == "2 runs: $0.40 spent."
    assert shown(listed.stdout).endswith(
        "note: Run night-2 stopped with 1 prediction paid for (or maybe paid for) and not collected, about $0.20 "
        "not in its spent: soundpatch run first.csv with the options it had and --run-id night-2 collects them at no "
        "new cost."
    )

    as_json = soundpatch("runs", "--config", "job.yaml", "--json", cwd=job_dir, env=env)
    runs = {r["run_id"]: r for r in json.loads(as_json.stdout)}
    assert runs["night-1"]["state"] == "finished" and runs["night-1"]["spent_usd"] == 0.4
    assert runs["night-1"]["by_status"]["succeeded"] == 2 and runs["night-1"]["results"] == 2
    assert runs["night-2"]["state"] == "stopped" and runs["night-2"]["spent_usd"] == 0.0
    assert (runs["night-2"]["out_rows"], runs["night-2"]["out_usd"]) == (1, 0.2)
    assert runs["night-2"]["started_at"] > runs["night-1"]["started_at"]

    # While a process runs it, it is going: what it has out is in flight.
    holding = RunLock(job_dir / "runs" / "night-2").acquire()
    try:
        going = soundpatch("runs", "--config", "job.yaml", cwd=job_dir, env=env)
    finally:
        holding.release()
    assert "$0.00 going: 1 not done" in shown(going.stdout) and "note:" not in going.stdout, going.stdout

    # Resumed: the paid answer is collected at no new cost, and the run is finished.
    resumed = soundpatch(
        "run", "first.csv", "--config", "job.yaml", "--run-id", "night-2", "--force", cwd=job_dir, env=env
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sim.stats.accepted == 3  # what was paid for before is collected, not created again
    again = shown(soundpatch("runs", "--config", "job.yaml", cwd=job_dir, env=env).stdout)
    assert "night-2 " in again and "$0.20 finished: 1 succeeded first.csv, eachlabs night-1" in again, again
    assert again.endswith("2 runs: $0.60 spent."), again

    later = soundpatch("runs", "--config", "job.yaml", "--since", "2999-01-01", cwd=job_dir, env=env)
    assert later.returncode == 0 and shown(later.stdout) == "No runs in runs begun since 2999-01-01."
    # A time back from now, as a user asks for what the last day or week cost.
    lately = shown(soundpatch("runs", "--config", "job.yaml", "--since", "1h", cwd=job_dir, env=env).stdout)
    assert lately.startswith("Runs in runs begun in the last 1h, the latest first:") and lately.endswith(
        "2 runs: $0.60 spent."
    ), lately
    none = soundpatch("runs", "--config", "job.yaml", "--since", "0m", cwd=job_dir, env=env)
    assert shown(none.stdout) == "No runs in runs begun in the last 0m."
    bad = soundpatch("runs", "--config", "job.yaml", "--since", "last week", cwd=job_dir, env=env)
    assert bad.returncode == 2 and shown(bad.stderr) == (
        "error: --since last week is not a day or time, as in --since 2026-12-01, 2026-12-01T18:00, today, "
        "yesterday, or a time back from now: 7d, 12h, 30m."
    )


def test_since_takes_a_day_a_time_today_yesterday_or_a_time_back_from_now():
    import datetime

    from soundpatch.cli import _since

    now = datetime.datetime(2026, 12, 5, 10, 30, tzinfo=datetime.UTC).timestamp()
    midnight = datetime.datetime(2026, 12, 5, tzinfo=datetime.UTC).timestamp()
    assert _since("2026-12-01", now)[0] == datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC).timestamp()
    assert _since("2026-12-01T18:00", now)[0] == datetime.datetime(2026, 12, 1, 18, tzinfo=datetime.UTC).timestamp()
    assert _since("today", now)[0] == midnight
    assert _since(" Yesterday ", now)[0] == midnight - 86400
    assert _since("7d", now)[0] == now - 7 * 86400
    assert _since("2w", now)[0] == now - 14 * 86400
    assert _since("12h", now)[0] == now - 12 * 3600
    assert _since("30 m", now)[0] == now - 1800
    assert _since("1.5d", now)[0] == now - 1.5 * 86400
    assert _since(" 7d ", now)[1] == " begun in the last 7d"
    assert _since("yesterday", now)[1] == " begun since yesterday"
    assert _since("2026-12-01", now)[1] == " begun since 2026-12-01"


def test_runs_made_by_a_worker_elsewhere_are_listed_from_their_journal_s_copy_in_the_bucket(
    job_dir, aws_env, simulator, tmp_path_factory
):
    # A nightly deployment's worker (its own machine, its own runs/) writes into a bucket; the
    # user lists the nights from a laptop that never ran any.
    sim = simulator(latency=0.2, fill="tone")
    write_job(job_dir, sim, aws_env, rows=2, concurrency=1)
    aws_env.bucket("nightly")
    # A lease of 10 s, renewed every sixth of it: the killed run's lapses 8.3 to 10 s after
    # the kill. With 3 s, a listing that took its 2 s and more on a busy machine saw it lapsed.
    config = (job_dir / "job.yaml").read_text().replace("{s3: {endpoint_url:", "{s3: {lease_seconds: 10, endpoint_url:")
    (job_dir / "job.yaml").write_text(config + "output: {uri: 's3://nightly/takes/'}\n")
    env = environment(tmp_path_factory.mktemp("prefect"))
    done = soundpatch("run", "job.csv", "--config", "job.yaml", "--run-id", "night-1", cwd=job_dir, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    (job_dir / "first.csv").write_text("".join((job_dir / "job.csv").read_text().splitlines(keepends=True)[:2]))
    args = ("run", "first.csv", "--config", "job.yaml", "--run-id", "night-2", "--force")
    died = dying(AT_DECODE, *args, cwd=job_dir, env=env)  # paid for its answer, then killed
    killed_at = time.monotonic()
    assert died.returncode == 137, died.stdout + died.stderr

    laptop = tmp_path_factory.mktemp("laptop")
    (laptop / "job.yaml").write_text((job_dir / "job.yaml").read_text())
    listed = soundpatch("runs", "--config", "job.yaml", cwd=laptop, env=env)
    assert listed.returncode == 0 and not listed.stderr, listed.stderr
    text = shown(listed.stdout)
    assert text.startswith("Runs in runs and s3://nightly/takes/, the latest first:"), text
    elsewhere = "made on another machine: its journal's copy in the bucket"
    # The killed run's lease has not lapsed yet: as far as anyone can tell, it goes on.
    assert f"$0.00 going: no results eachlabs, {elsewhere} night-1 " in text, text
    assert f"$0.40 finished: 2 succeeded job.csv, eachlabs, {elsewhere} 2 runs: $0.40 spent." in text, text
    assert not (laptop / "runs").exists()  # only read

    time.sleep(max(0.0, killed_at + 10.5 - time.monotonic()))  # its lease has lapsed now
    later = shown(soundpatch("runs", "--config", "job.yaml", cwd=laptop, env=env).stdout)
    assert f"$0.00 stopped (about $0.20 out): no results eachlabs, {elsewhere}" in later, later
    assert "note: Run night-2 stopped with 1 prediction paid for" in later, later

    # On the worker, the same run is one run, from both journals.
    here = json.loads(soundpatch("runs", "--config", "job.yaml", "--json", cwd=job_dir, env=env).stdout)
    assert [(r["run_id"], r["journal"], r["state"], r["results"], r["out_rows"]) for r in here] == [
        ("night-2", "here", "stopped", 1, 1),
        ("night-1", "here", "finished", 2, 0),
    ]


def test_an_interrupted_run_s_rows_it_never_started_are_not_done_not_failed(tmp_path):
    # Ctrl-C as a run began: its 20 rows end `failed` with "Not started: the run was
    # interrupted; ...", and `runs` said "finished: 20 failed" of a night that tried nothing.
    from soundpatch.config import load_config
    from soundpatch.journal import Journal
    from soundpatch.past_runs import past_runs

    runs = tmp_path / "runs"
    journal = Journal(runs / "night")
    journal.write("run_started", total=3, kept=0, manifest="nightly.yaml", providers={"local": 3})
    journal.write("outcome", "a", outcome={"row_id": "a", "status": "succeeded", "cost_usd": 0.0, "provider": "local"})
    never = "Not started: the run was interrupted; run it again with --run-id night"  # (as the run says it)
    for row in ("b", "c"):
        journal.write("outcome", row, outcome={"row_id": row, "status": "failed", "error": never})
    journal.close()
    [night] = past_runs(runs, load_config(overrides={"runs_dir": str(runs)}))
    assert (night.state, night.by_status["succeeded"], night.by_status["failed"], night.not_done) == (
        "stopped",
        1,
        0,
        2,
    )

    (tmp_path / "job.yaml").write_text(f"runs_dir: {runs}\n")
    listed = soundpatch("runs", "--config", "job.yaml", cwd=tmp_path, env=clean_env())
    assert "$0.00 stopped: 1 succeeded, 2 not done" in shown(listed.stdout), listed.stdout + listed.stderr
