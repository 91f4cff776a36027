"""`soundpatch` as users run it: a subprocess, Prefect's ephemeral server, real files.

Each run that reaches Prefect takes several seconds (the ephemeral server starts and
stops), so these tests share what they can.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundpatch import demo_audio
from soundpatch.journal import JOURNAL_FILE
from tests.jobs import SCRIPT, clean_env, soundpatch, wait_for

REPO = Path(__file__).resolve().parents[1]
REPORT_COLUMNS = [
    "row_id",
    "input",
    "start",
    "end",
    "prompt",
    "seed",
    "provider",
    "status",
    "cost_usd",
    "output",
    "prediction_id",
    "attempts",
    "error",
]


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    # Not seeded (tests.jobs.seeded_prefect_home): the first run here makes Prefect's database,
    # as a user's first run on a new machine does.
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    return tmp_path


def run(workdir: Path, prefect_home: Path, *args: str) -> subprocess.CompletedProcess:
    return soundpatch(*args, cwd=workdir, env=clean_env(PREFECT_HOME=str(prefect_home)))


def assert_clean(proc: subprocess.CompletedProcess) -> None:
    for stream in (proc.stdout, proc.stderr):
        assert "Traceback" not in stream
        assert "ERROR" not in stream, stream


def journal_events(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "journal.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def prefect_task_runs(home: Path, flow_run: str) -> dict[str, str]:
    """The task runs of the flow run named `flow_run` in the Prefect database under `home`,
    as {name: state type}."""
    [database] = home.glob("*.db")
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = db.execute(
            "SELECT t.name, t.state_type FROM task_run t JOIN flow_run f ON t.flow_run_id = f.id WHERE f.name = ?",
            (flow_run,),
        ).fetchall()
    return dict(rows)


def test_restoration_example_end_to_end_and_resume(workdir, prefect_home):
    proc = run(workdir, prefect_home, "run", "manifests/restoration.csv", "--run-id", "e2e")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert_clean(proc)
    assert "succeeded" in proc.stdout and "prompt is recorded but does not steer it" in proc.stdout

    run_dir = workdir / "runs" / "e2e"
    report = pd.read_csv(run_dir / "report.csv")
    assert list(report.columns[: len(REPORT_COLUMNS)]) == REPORT_COLUMNS
    assert list(report["status"]) == ["succeeded"] * 6
    assert report["cost_usd"].sum() == 0.0
    assert "note" in report.columns  # an unknown manifest column, carried through
    summary = json.loads((run_dir / "report.json").read_text())["summary"]
    assert summary["by_status"]["succeeded"] == 6
    page = (run_dir / "report.html").read_text()
    cards = json.loads(page.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    assert [r["status"] for r in cards["rows"]] == ["succeeded"] * 6 and len(cards["media"]) == 6
    assert list(report["checks"]) == ["ok"] * 6 and (report["outside_max_diff"] == 0).all()

    for row in report.itertuples():
        source = workdir / "manifests" / row.input
        before, rate = sf.read(source, dtype="int16", always_2d=True)
        a, b = round(row.start * rate), round(row.end * rate)
        # Each row's own result (its edit goes into the recording's file with the others'):
        # its region and a second each side, not a copy of the whole recording.
        lo, hi = max(0, a - rate), min(len(before), b + rate)
        metadata = json.loads(Path(row.output + ".json").read_text())
        assert metadata["excerpt_frames"] == f"{lo}-{hi}/{len(before)}"
        after, out_rate = sf.read(row.output, dtype="int16", always_2d=True)
        assert (out_rate, after.shape) == (rate, before[lo:hi].shape)
        assert np.array_equal(before[lo:a], after[: a - lo]) and np.array_equal(before[b:hi], after[b - lo :])
        assert not np.array_equal(before[a:b], after[a - lo : b - lo])
        assert metadata["row_id"] == row.row_id and metadata["region"] == f"{row.start:g}-{row.end:g}"
        assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert Path(row.output).parent.name == Path(row.input).stem + ".rows"  # each row's own result

    # One restored file per recording (the rows name it): every row's region from that row's
    # result, and the rest of the recording as it was, bit for bit.
    for source_name, rows in report.groupby("input"):
        [combined] = set(rows["combined"])
        assert Path(combined) == workdir / "outputs" / "e2e" / (Path(source_name).stem + ".wav")
        before, rate = sf.read(workdir / "manifests" / source_name, dtype="int16", always_2d=True)
        after, _ = sf.read(combined, dtype="int16", always_2d=True)
        untouched = np.ones(len(before), bool)
        for row in rows.itertuples():
            a, b = round(row.start * rate), round(row.end * rate)
            lo = max(0, a - rate)
            own = sf.read(row.output, dtype="int16", always_2d=True)[0]
            assert np.array_equal(after[a:b], own[a - lo : b - lo])
            untouched[a:b] = False
        assert np.array_equal(before[untouched], after[untouched]) and not np.array_equal(before, after)
        assert json.loads(Path(combined + ".json").read_text())["rows"] == ",".join(rows["row_id"])
    assert "2 files hold the edits of several rows of one recording each" in proc.stdout
    # Prefect's history of the run, kept in PREFECT_HOME's database by the temporary server
    # (which writes the task runs' states in batches, the last as it stops): every row's.
    assert prefect_task_runs(prefect_home, "soundpatch e2e") == {f"row {r}": "COMPLETED" for r in report["row_id"]}

    sent = len(journal_events(run_dir, "sending"))
    again = run(workdir, prefect_home, "run", "manifests/restoration.csv", "--run-id", "e2e")
    assert again.returncode == 0, again.stderr
    assert len(journal_events(run_dir, "sending")) == sent  # nothing was redone
    assert list(pd.read_csv(run_dir / "report.csv")["status"]) == ["succeeded"] * 6

    (run_dir / "report.csv").unlink()
    rendered = run(workdir, prefect_home, "report", "e2e")
    assert rendered.returncode == 0, rendered.stderr
    rerendered = pd.read_csv(run_dir / "report.csv")
    assert list(rerendered["row_id"]) == list(report["row_id"])
    assert list(rerendered["combined"]) == list(report["combined"])


def test_a_file_for_several_rows_says_which_of_its_edits_it_lacks(workdir, prefect_home):
    # A row of the recording that did not finish leaves its region as the input has it;
    # the file holds the others' edits, and the run says which one is missing.
    (workdir / "manifests" / "partly.csv").write_text(
        "id,input,start,end,prompt,output\n"
        "late,audio/music_damaged.flac,4.2,4.25,music,fixed/{stem}\n"
        "early,audio/music_damaged.flac,2.729,2.736,music,fixed/{stem}\n"
        "beyond,audio/music_damaged.flac,30,31,music,fixed/{stem}\n"
    )
    proc = run(workdir, prefect_home, "run", "manifests/partly.csv", "--run-id", "partly")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert_clean(proc)
    assert (
        "fixed/music_damaged.wav holds 2 of its 3 rows' edits: beyond (invalid) did not finish, so its region "
        "is as in the input" in " ".join(proc.stdout.split())
    )
    report = pd.read_csv(workdir / "runs" / "partly" / "report.csv", keep_default_na=False).set_index("row_id")
    combined = workdir / "outputs" / "fixed" / "music_damaged.wav"
    assert list(report["combined"]) == [str(combined), str(combined), ""]
    assert json.loads((combined.parent / "music_damaged.wav.json").read_text())["rows"] == "early,late"
    before, rate = sf.read(workdir / "manifests" / "audio" / "music_damaged.flac", dtype="int16", always_2d=True)
    after, _ = sf.read(combined, dtype="int16", always_2d=True)
    differs = np.flatnonzero(np.any(before != after, axis=1))
    assert differs.min() >= round(2.729 * rate) and differs.max() < round(4.25 * rate)


def test_bad_rows_get_reasons_and_the_rest_of_the_batch_completes(workdir, prefect_home):
    proc = run(workdir, prefect_home, "run", "manifests/bad_rows.csv", "--run-id", "bad")
    assert proc.returncode == 1
    assert_clean(proc)
    report = pd.read_csv(workdir / "runs" / "bad" / "report.csv").set_index("row_id")
    assert report.loc["fine", "status"] == "succeeded"
    expected = {
        "missing-file": "does not exist",
        "past-the-end": "is only 5.000 s long",
        "backwards": "not after its start",
        "not-a-number": "not a number of seconds",
        "no-prompt": "prompt is empty",
        "ftp-input": "ftp:// is not supported",
    }
    for row_id, reason in expected.items():
        assert report.loc[row_id, "status"] == "invalid"
        assert reason in report.loc[row_id, "error"].lower() or reason in report.loc[row_id, "error"]
        assert report.loc[row_id, "cost_usd"] == 0
    assert len(journal_events(workdir / "runs" / "bad", "sending")) == 1  # only the valid row was sent


def five_rows_for_two(workdir: Path) -> None:
    """A manifest of five rows at $0.50 each, and a budget of $1.00."""
    (workdir / "priced.yaml").write_text(
        "provider: {name: local, price_usd: 0.5}\nlimits: {budget_usd: 1.0, concurrency: 4}\n"
    )
    rows = "\n".join(f"r{i},manifests/audio/voice_damaged.flac,1.7,1.72,voice" for i in range(5))
    (workdir / "five.csv").write_text("id,input,start,end,prompt\n" + rows + "\n")


@pytest.mark.parametrize("loud", [("--verbose",), ()], ids=["--verbose", "PREFECT_LOGGING_LEVEL=INFO"])
def test_prefects_own_logs_when_asked_for_are_sent_before_its_temporary_server_stops(workdir, prefect_home, loud):
    # With Prefect's logs going to its API (--verbose, or PREFECT_LOGGING_LEVEL=INFO as
    # Prefect users often set), those still queued when the temporary server stopped were
    # sent at exit, to nothing, retried for over a minute after the summary: then "---
    # Error logging to API --- All connection attempts failed" on stderr.
    env = clean_env(PREFECT_HOME=str(prefect_home), **({} if loud else {"PREFECT_LOGGING_LEVEL": "INFO"}))
    proc = soundpatch("run", "manifests/restoration.csv", "--run-id", "loud", *loud, cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Task run 'row " in proc.stdout + proc.stderr  # Prefect's own logs are shown
    assert "Error logging to API" not in proc.stderr and "connection attempts failed" not in proc.stderr


def test_budget_cap_skips_rows_and_exits_3(workdir, prefect_home):
    five_rows_for_two(workdir)
    proc = run(workdir, prefect_home, "run", "five.csv", "--config", "priced.yaml", "--run-id", "money")
    assert proc.returncode == 3, proc.stderr
    report = pd.read_csv(workdir / "runs" / "money" / "report.csv")
    assert sorted(report["status"]) == ["skipped_budget"] * 3 + ["succeeded"] * 2
    assert report["cost_usd"].sum() == pytest.approx(1.0)
    assert (report.loc[report.status == "skipped_budget", "cost_usd"] == 0).all()
    # What finishing costs, and how: the run's command, as it says, makes the three and pays
    # for nothing twice.
    said = " ".join(proc.stdout.split())
    assert (
        "The 3 results the budget stopped would cost about $1.50 more: soundpatch run five.csv with the options it "
        "had, --run-id money and --budget 2.50 makes them, keeping what is done."
    ) in said
    # So do the report (for scripts, report.json; for people, report.html) and its rendering again.
    run_dir = workdir / "runs" / "money"
    finish = json.loads((run_dir / "report.json").read_text())["summary"]["to_finish"]
    assert finish == {"failed": 0, "stopped": 3, "more_usd": pytest.approx(1.5), "budget_usd": 2.5}
    page = (run_dir / "report.html").read_text()
    assert (
        '<p class="finish">The 3 results the budget stopped would cost about $1.50 more: soundpatch run five.csv with '
        "the options it had and --run-id money (or the flow, run_id money), with a budget of $2.50, makes them, "
        "keeping what is done.</p>"
    ) in page
    for made in ("report.html", "report.json"):
        (run_dir / made).unlink()
    rendered = run(workdir, prefect_home, "report", "money", "--config", "priced.yaml")
    assert rendered.returncode == 3 and "--budget 2.50 makes them" in " ".join(rendered.stdout.split())
    assert 'class="finish"' in (run_dir / "report.html").read_text()
    assert json.loads((run_dir / "report.json").read_text())["summary"]["to_finish"] == finish
    proc = run(
        workdir, prefect_home, "run", "five.csv", "--config", "priced.yaml", "--run-id", "money", "--budget", "2.50"
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = pd.read_csv(workdir / "runs" / "money" / "report.csv")
    assert sorted(report["status"]) == ["succeeded"] * 5 and report["cost_usd"].sum() == pytest.approx(2.5)
    assert len(journal_events(workdir / "runs" / "money", "sending")) == 5
    assert "the budget stopped" not in proc.stdout
    assert 'class="finish"' not in (run_dir / "report.html").read_text()
    # The same limits set on the command line, key by key, with the results elsewhere and as
    # FLAC (--set); an option (--budget) goes over a --set of the same key.
    proc = run(
        workdir,
        prefect_home,
        "run",
        "five.csv",
        *("--set", "provider.price_usd=0.5", "--set", "limits.budget_usd=0.2", "--budget", "1.5"),
        *("--set", f"output.uri={workdir / 'elsewhere'}/", "--set", "output.format=flac", "--run-id", "set"),
    )
    assert proc.returncode == 3, proc.stderr
    report = pd.read_csv(workdir / "runs" / "set" / "report.csv")
    assert sorted(report["status"]) == ["skipped_budget"] * 2 + ["succeeded"] * 3
    assert sorted(p.name for p in (workdir / "elsewhere" / "set").glob("*.flac")) == sorted(
        Path(o).name for o in report["output"].dropna()
    )


def test_a_run_whose_output_is_no_longer_read_goes_on_to_its_end_and_its_exit_status(workdir, prefect_home):
    """`soundpatch run ... | head`, or a log pipe that broke: the run does not depend on its reader."""
    five_rows_for_two(workdir)
    env = clean_env(PREFECT_HOME=str(prefect_home))
    command = [str(SCRIPT), "run", "five.csv", "--config", "priced.yaml", "--run-id", "unread"]
    with open(workdir / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=stderr)
        proc.stdout.close()  # gone before the first line
        assert proc.wait(timeout=300) == 3  # the budget's exit status, not 1 for "rows failed"
    assert "Traceback" not in (workdir / "stderr.txt").read_text()
    report = pd.read_csv(workdir / "runs" / "unread" / "report.csv")
    assert sorted(report["status"]) == ["skipped_budget"] * 3 + ["succeeded"] * 2


def test_dry_run_and_validate_spend_nothing_and_write_nothing(workdir, prefect_home):
    for args in (
        ["run", "manifests/sfx_variations.yaml", "--dry-run"],
        ["validate", "manifests/bad_rows.csv"],
    ):
        proc = run(workdir, prefect_home, *args)
        assert_clean(proc)
        assert "expected cost" in proc.stdout
    assert proc.returncode == 1 and "does_not_exist.wav" in proc.stdout
    assert not (workdir / "runs").exists() and not (workdir / "outputs").exists()
    (workdir / "priced.yaml").write_text("provider: {price_usd: 0.2}\nlimits: {budget_usd: 1.0}\n")
    dry = run(workdir, prefect_home, "run", "manifests/sfx_variations.yaml", "--dry-run", "--config", "priced.yaml")
    assert dry.returncode == 0, dry.stderr
    # 4 rows, 2 + 2 + 3 + 2 variations = 9 predictions at $0.20, over a $1.00 budget.
    assert "$1.80" in dry.stdout and "above the budget" in dry.stdout
    assert "about 5 of 9 predictions fit in it" in " ".join(dry.stdout.split())
    restoration = run(workdir, prefect_home, "validate", "manifests/restoration.csv")
    assert restoration.returncode == 0 and "files holding several rows' edits  2" in restoration.stdout
    # Where the results go, as the template makes it (its rows' edits go into two files; the
    # run id is made when the run starts), so that a name is seen before anything is paid.
    unwrapped = "".join(restoration.stdout.split())
    assert f"firstresultgoesto{workdir}/outputs/<runid>/music_damaged.wav(and1more)" in unwrapped
    named = run(workdir, prefect_home, "run", "manifests/sfx_variations.yaml", "--dry-run", "--run-id", "night-1")
    assert f"{workdir}/outputs/night-1/whoosh_impact-metal-v1.wav(and8more)" in "".join(named.stdout.split())
    (workdir / "manifests" / "typo.csv").write_text(
        "id,input,start,end,prompt,sead\nt,audio/whoosh_impact.wav,1,1.2,a gong,4\n"
    )
    typo = run(workdir, prefect_home, "validate", "manifests/typo.csv")
    assert typo.returncode == 0 and "The column 'sead' is not one soundpatch reads" in typo.stdout
    assert "Did you mean 'seed'?" in typo.stdout
    # A hosted provider whose key is not set here: the estimate, which needs no key, says the
    # run would stop before sending anything (clean_env has no provider key).
    (workdir / "hosted.yaml").write_text("provider: {name: stability}\n")
    keyless = run(workdir, prefect_home, "validate", "manifests/sfx_variations.yaml", "--config", "hosted.yaml")
    assert keyless.returncode == 0 and "$1.80" in keyless.stdout
    assert (
        "note: The run itself would stop before sending anything: the stability provider needs an API key: "
        "set the environment variable STABILITY_API_KEY"
    ) in keyless.stdout
    # The same options as run's: what the estimate is of, given the way the run would be given it.
    given = run(
        workdir, prefect_home, "validate", "manifests/sfx_variations.yaml", "--provider", "stability", "--rpm", "3",
        "--concurrency", "2", "--budget", "1",
    )  # fmt: skip
    assert given.returncode == 0, given.stderr
    said = " ".join(given.stdout.split())
    assert "$1.80 (budget $1.00)" in said and "provider stability" in said and "about 5 of 9 predictions" in said
    assert "expected wall time 2 min 55 s" in said  # 9 creates at 3 a minute, the last one 15 s
    assert not (workdir / "runs").exists() and not (workdir / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope.csv"], "does not exist"),
        (["run", "take[2].csv"], "Manifest take[2].csv does not exist"),
        (["run", "manifests/restoration.csv", "--config", "nope.yaml"], "Cannot read config file"),
        (
            ["run", "manifests/restoration.csv", "--concurrency", "0"],
            "Option --concurrency (limits.concurrency): 0 should be greater than or equal to 1.",
        ),
        (
            ["run", "manifests/restoration.csv", "--budget", "lots"],
            "invalid float value: 'lots' (see soundpatch run --help)",
        ),
        # Options of a command it does not have point at that command's help (they pointed
        # at "soundpatch soundpatch --help"), and options of none at soundpatch's own.
        (["run", "manifests/restoration.csv", "--runs-dir", "x"], "--runs-dir x (see soundpatch run --help)."),
        (["validate", "manifests/restoration.csv", "--nope"], "--nope (see soundpatch validate --help)."),
        (["--nope"], "Unrecognized arguments: --nope (see soundpatch --help)."),
        (["run", "manifests/restoration.csv", "--set", "colour=blue"], "--set colour is not a known key."),
        (
            # A misspelt section: the key as set is named, not "Config key 'limit'" (no file has it).
            ["run", "manifests/restoration.csv", "--set", "limit.budget_usd=1"],
            "--set limit.budget_usd is not a known key; did you mean 'limits.budget_usd'?",
        ),
        (
            # What is set is not said back: a key set by mistake may be a secret.
            ["validate", "manifests/restoration.csv", "--set", "provider.api_key=sk-live-4242"],
            "--set provider.api_key is not a known key: API keys never live in config files; put the key in an "
            "environment variable and name that variable in 'provider.api_key_env'",
        ),
        (
            # The key itself where its variable's name goes: "set the environment variable sk-live-..." printed it.
            ["run", "manifests/restoration.csv", "--provider", "eachlabs", "--set", "provider.api_key_env=sk-live-42"],
            "--set provider.api_key_env: the value given is not an environment variable's name",
        ),
        (["validate", "manifests/restoration.csv", "--set", "output.uri"], "--set output.uri is not KEY=VALUE"),
        (["run", "manifests/restoration.csv", "--run-id", "../escape"], "Run id"),
        (["report", "no-such-run"], "No run 'no-such-run'"),
        (
            ["run", "manifests/restoration.csv", "--provider", "eachlabs"],
            "set the environment variable EACHLABS_API_KEY",
        ),
    ],
)
def test_unusable_input_exits_2_with_one_sentence(workdir, prefect_home, args, message):
    proc = run(workdir, prefect_home, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "sk-live" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one sentence, on one line


def test_a_configured_prefect_server_that_does_not_answer_is_named_before_anything_runs(workdir, prefect_home):
    # It was "The run stopped unexpectedly (RuntimeError: Failed to reach API at ...)", with
    # a pointer to errors.log and to resuming a run that had not begun.
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # (closed again: nothing listens there)
    env = clean_env(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    before = sorted((workdir / "outputs").rglob("*"))
    began = time.monotonic()
    proc = soundpatch("run", "manifests/restoration.csv", "--run-id", "away", cwd=workdir, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"error: Prefect's server at http://127.0.0.1:{port}/api (PREFECT_API_URL) does not answer (ConnectError: "
        "[Errno 111] Connection refused); start it, or unset PREFECT_API_URL to run on a temporary server of the "
        "run's own. Nothing was sent."
    )
    assert time.monotonic() - began < 30
    assert not (workdir / "runs" / "away" / "journal.jsonl").exists()
    assert sorted((workdir / "outputs").rglob("*")) == before


def test_the_report_of_a_run_that_stopped_before_its_first_row_says_so(tmp_path):
    (tmp_path / "runs" / "early").mkdir(parents=True)  # its folder and lock made, then it stopped
    (tmp_path / "runs" / "early" / "run.lock").touch()
    shown = soundpatch("report", "early", cwd=tmp_path, env=clean_env())
    assert shown.returncode == 2
    assert shown.stderr.strip() == (
        "error: Run 'early' recorded nothing in runs/early (it stopped before its first row began)."
    )


def test_the_report_of_a_run_that_ended_before_writing_one_is_rendered_from_its_journal(tmp_path):
    from soundpatch.journal import Journal
    from soundpatch.outcome import Outcome
    from tests.jobs import clean_env, soundpatch

    journal = Journal(tmp_path / "runs" / "crashed")  # killed before its report: a journal, no report.json
    journal.write("run_started", total=2, kept=0)
    for row, status in (("a", "succeeded"), ("b", "failed")):
        o = Outcome(row, "fx.wav", 1.0, 1.5, "a gong", 1, "eachlabs", status=status, cost_usd=0.2, error="boom")
        journal.write("outcome", row, outcome=o.to_dict())
    journal.close()
    # ... and it was killed with money out: a prediction to collect, a create in doubt. Its
    # report said "spent $0.40" and nothing of them.
    journal = Journal(tmp_path / "runs" / "crashed")
    for row, event in (("c", "created"), ("d", "creating")):
        journal.write("sending", row, provider="eachlabs", request="q", identity=row, clip={})
        journal.write("creating", row)
        if event == "created":
            journal.write("created", row, prediction_id="p-" + row)
    journal.close()
    shown = soundpatch("report", "crashed", cwd=tmp_path, env=clean_env())
    assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr
    assert "spent" in shown.stdout and "$0.40" in shown.stdout and "wall time" not in shown.stdout
    assert (tmp_path / "runs" / "crashed" / "report.html").exists()
    said = (
        "note: Run crashed stopped before it finished: 1 row with a prediction paid for and not collected and 1 "
        "row whose create went out with no answer (it may exist), about $0.40 at price_usd, not in the spent "
        "above; the same command with --run-id crashed collects what was paid for, at no new cost."
    )
    assert said in " ".join(shown.stdout.split()), shown.stdout
    assert said[6:] in json.loads((tmp_path / "runs" / "crashed" / "report.json").read_text())["summary"]["notes"]
    again = soundpatch("report", "crashed", cwd=tmp_path, env=clean_env())  # once, however often rendered
    assert again.returncode == 1 and " ".join(again.stdout.split()).count(said) == 1, again.stdout
    # While a process runs it, nothing is said of it: what it has out is its own business.
    from soundpatch.locks import RunLock

    running = RunLock(tmp_path / "runs" / "crashed").acquire()
    try:
        shown = soundpatch("report", "crashed", cwd=tmp_path, env=clean_env())
    finally:
        running.release()
    assert shown.returncode == 1 and "stopped before it finished" not in shown.stdout, shown.stdout


def test_report_without_a_run_id_renders_the_latest_and_an_unknown_one_names_those_there(tmp_path):
    """`soundpatch report` right after a run needs no id; a mistyped id says which runs there are."""
    import os

    from soundpatch.journal import Journal
    from soundpatch.outcome import Outcome

    for age, run_id in enumerate(("newest", "older", "oldest")):
        journal = Journal(tmp_path / "runs" / run_id)
        journal.write("run_started", total=1, kept=0)
        o = Outcome("a", "fx.wav", 1.0, 1.5, "a gong", 1, "local", status="succeeded", output=f"out/{run_id}.wav")
        journal.write("outcome", "a", outcome=o.to_dict())
        journal.close()
        stamp = 1_700_000_000 - 3600 * age
        os.utime(journal.path, (stamp, stamp))
    (tmp_path / "runs" / "not-a-run").mkdir()  # no journal: not offered

    latest = soundpatch("report", cwd=tmp_path, env=clean_env())
    assert latest.returncode == 0, latest.stderr
    assert "soundpatch run newest" in latest.stdout and (tmp_path / "runs" / "newest" / "report.html").exists()
    assert not (tmp_path / "runs" / "older" / "report.html").exists()

    typo = soundpatch("report", "newst", cwd=tmp_path, env=clean_env())
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert typo.stderr.strip() == (
        "error: No run 'newst' in runs (looked for runs/newst); the latest there: newest, older, oldest."
    )

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    none = soundpatch("report", cwd=empty, env=clean_env())
    assert none.returncode == 2 and none.stderr.strip() == "error: No run in runs to report on."


def test_the_summary_puts_rows_that_ended_for_the_same_reason_on_one_line(tmp_path, capsys):
    from dataclasses import asdict

    from soundpatch.cli import _print_summary
    from soundpatch.config import load_config
    from soundpatch.outcome import Outcome, to_finish

    def ended(row: str, status: str, error: str = "") -> Outcome:
        return Outcome(row, "fx.wav", 1.0, 1.5, "a gong", 1, "stability", status=status, error=error)

    refused = "Stability AI refused the create: HTTP 401 unauthorized (check the API key)."
    outcomes = [ended("ok", "succeeded"), *(ended(f"r{i}", "failed", refused) for i in range(30))]
    outcomes += [ended("late", "failed", "Could not download the result."), ended("odd", "invalid", refused)]
    outcomes += [ended(f"x{i}", "invalid", f"Reason {i}.") for i in range(8)]
    summary = {"run_id": "grouped", "spent_usd": 0.0, "budget_usd": 10.0, "output_uri": "./outputs/"}
    summary["to_finish"] = asdict(to_finish(outcomes, 0.0, lambda name: load_config().provider.price))  # as the flow
    _print_summary(summary, outcomes, tmp_path)
    said = capsys.readouterr().out
    lines = [line.strip() for line in said.splitlines() if line.startswith("  ")]
    assert lines == [
        f"failed r0, r1, r2 and 27 more rows: {refused}",
        "failed late: Could not download the result.",
        f"invalid odd: {refused}",  # the same words, another status: a line of its own
        *(f"invalid x{i}: Reason {i}." for i in range(5)),
        f"... 3 more rows in {tmp_path / 'report.csv'}",
    ]
    # Then how to try the failed ones again (the invalid ones are the manifest's to mend).
    assert " ".join(said.split()).endswith(
        "soundpatch run its manifest with the options it had and --run-id grouped tries the 31 failed results "
        "again, keeping what is done."
    )


def journal_writer(run_dir: Path, now: list[float]) -> Callable[..., None]:
    """Writes the run's journal events as the journal does, stamped with the time `now[0]`."""

    def event(kind: str, row: str | None = None, **fields: Any) -> None:
        line = {"t": now[0], "event": kind, **({"row": row} if row else {}), **fields}
        with open(run_dir / JOURNAL_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")

    return event


def watched_line(tmp_path: Path, capsys, total: int, typical: dict[str, float] | None = None):
    """A progress watcher of the run in `tmp_path`, its clock `now[0]`: (its journal's event
    writer, the clock, the live line as it would print now, the watcher)."""
    from soundpatch.pace import Pace
    from soundpatch.progress import ProgressWatcher

    watcher = ProgressWatcher(tmp_path, total=total, budget=50.0)
    now = [time.time()]  # this attempt's events come after the watcher began
    watcher.pace = Pace(window_seconds=60, clock=lambda: now[0], typical=typical)

    def line() -> str:
        watcher._print_line()
        return capsys.readouterr().err.strip()

    return journal_writer(tmp_path, now), now, line, watcher


def test_the_progress_line_counts_each_rows_last_outcome_as_the_journal_grows(tmp_path, capsys):
    from soundpatch.journal import Journal
    from soundpatch.progress import ProgressWatcher

    journal, watcher = Journal(tmp_path), ProgressWatcher(tmp_path, total=3, budget=1.0)

    def outcome(row: str, status: str, cost: float) -> None:
        journal.write("outcome", row, outcome={"row_id": row, "status": status, "cost_usd": cost})

    journal.write("run_started", total=3, kept=0)
    for row in ("a", "b", "c"):
        journal.write("sending", row, provider="local")
    assert watcher._state()[3] == 0  # the local engine's rows wait for a slot (limits.concurrency) ...
    for row in ("a", "b", "c"):
        journal.write("computing", row)  # ... and are in flight once they have one
    outcome("a", "failed", 0.2)
    assert watcher._state() == (
        1,
        1,
        0.2,
        2,
        0,
        0,
        0,
        0,
        0,
    )  # done, failed, spent, in flight, waiting (run, disk, budget, memory), being spliced and saved
    # Its prediction back, a row is no longer in flight: its result is spliced and saved. The
    # last rows' were "0 in flight" with the run not done, and nothing said what it was doing.
    journal.write("predicted", "b", prediction_id="", cost_usd=0.0)
    assert watcher._state()[3:] == (1, 0, 0, 0, 0, 1)
    watcher._print_line()
    assert capsys.readouterr().err.strip().endswith("$0.20 spent, 1 in flight, 1 being spliced and saved")
    outcome("b", "succeeded", 0.2)
    # A resumed run: row a again, its outcome carries the row's running total.
    journal.write("sending", "a", provider="local")
    journal.write("computing", "a")
    assert watcher._state() == (2, 1, 0.4, 2, 0, 0, 0, 0, 0)
    outcome("a", "succeeded", 0.4)
    outcome("c", "invalid", 0.0)
    done, bad, spent, flying, waiting, short, on_budget, on_memory, finishing = watcher._state()
    assert (done, bad, round(spent, 9), flying, waiting, short, on_budget, on_memory, finishing) == (
        3,
        1,
        0.6,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    # Rows waiting for another machine's run that is making the same edit (edit_claims.py).
    journal.write("waiting", "d", on="nightly-2")
    journal.write("waiting", "e", on="nightly-2")
    assert watcher._state()[3:8] == (0, 2, 0, 0, 0)
    journal.write("sending", "d", provider="local")  # its claim was let go without a result: made here
    journal.write("computing", "d")
    outcome("e", "skipped_done", 0.0)  # reused
    assert watcher._state()[3:8] == (1, 0, 0, 0, 0)
    # Rows waiting for room on disk while rows in flight hold it (disk_room.py).
    journal.write("waiting_for_disk", "f")
    journal.write("waiting_for_disk", "g")
    watcher._print_line()
    assert capsys.readouterr().err.strip().endswith("1 in flight, 2 waiting for disk space for their results")
    journal.write("sending", "f", provider="local")
    journal.write("computing", "f")
    outcome("g", "failed", 0.0)  # refused: no room came
    assert watcher._state()[3:8] == (2, 0, 0, 0, 0)
    outcome("f", "succeeded", 0.0)
    # Rows waiting while predictions in flight hold what is left of the budget (limits.py).
    journal.write("waiting_for_budget", "h")
    journal.write("waiting_for_budget", "i")
    watcher._print_line()
    said = capsys.readouterr().err.strip()
    assert said.endswith("1 in flight, 2 waiting on the budget until predictions in flight settle what they cost")
    journal.write("sending", "h", provider="local")  # one cost nothing: its money came back
    journal.write("computing", "h")
    outcome("i", "skipped_budget", 0.0)  # the others cost their price: none left for it
    assert watcher._state()[3:8] == (2, 0, 0, 0, 0)
    outcome("h", "succeeded", 0.0)
    # Rows waiting for room to decode their recordings while other rows hold theirs (memory_room.py).
    for row in ("m", "n", "o"):
        journal.write("waiting_for_memory", row)
    watcher._print_line()
    said = capsys.readouterr().err.strip()
    assert said.endswith("1 in flight, 3 waiting for memory to read their recordings in")
    journal.write("memory_granted", "m")  # room came: read in, not yet sent
    journal.write("sending", "n", provider="local")
    journal.write("computing", "n")
    outcome("o", "failed", 0.0)  # its recording could not be read in
    assert watcher._state()[3:8] == (2, 0, 0, 0, 0)
    outcome("m", "succeeded", 0.0)
    outcome("n", "succeeded", 0.0)
    # Then the files several rows of one recording share are made (combine.py).
    journal.write("combining", files=2)
    journal.write("combined", name="fixed/a.wav", output="/o/fixed/a.wav", rows=["a"], missing=[])
    watcher._print_line()
    assert capsys.readouterr().err.strip().endswith("1 in flight, files of several rows made: 1/2")
    journal.write("combined", name="fixed/b.wav", output="", rows=[], missing=["b"])  # none of its rows finished
    watcher._print_line()
    assert capsys.readouterr().err.strip().endswith("1 in flight, files of several rows made: 1/2 (1 not made)")
    # An attempt that ended while rows waited: the next attempt starts them over.
    for kind, row in (
        ("waiting", "j"),
        ("waiting_for_disk", "k"),
        ("waiting_for_budget", "l"),
        ("waiting_for_memory", "p"),
    ):
        journal.write(kind, row)
    assert watcher._state()[4:8] == (1, 1, 1, 1)
    journal.write("run_started", total=3, kept=0)
    assert watcher._state()[3:8] == (0, 0, 0, 0, 0)
    journal.close()


def test_the_time_left_goes_by_the_pace_sent_rows_have_been_ending_at_lately(tmp_path, capsys):
    event, now, line, _ = watched_line(tmp_path, capsys, total=100)
    event("run_started", total=100)
    for row in range(20):  # rows already done or invalid end at once: no pace to go by
        event("outcome", f"skip{row}", outcome={"status": "skipped_done" if row % 2 else "invalid"})
    for row in range(40):  # 40 rows sent; 16 predictions in flight (limits.concurrency), the rest wait
        event("sending", f"r{row}", provider="eachlabs")
    for row in range(16):
        event("creating", f"r{row}")
    assert line().endswith("$0.00 spent, 16 in flight")
    now[0] += 30  # 30 s after the first was sent, 6 have ended: 5 s a row, 74 rows to go
    for row in range(6):
        event("predicted", f"r{row}")
        event("outcome", f"r{row}", outcome={"status": "succeeded", "cost_usd": 0.2})
    assert line().endswith("$1.20 spent, 10 in flight, about 6 min 10 s left")
    now[0] += 120  # nothing ended in the last minute: no pace to go by
    assert line().endswith("10 in flight")
    # A resumed run: what its earlier attempt left in flight is sent again, at a pace of its own.
    event("run_started", total=100)
    assert line().endswith("0 in flight")
    event("sending", "r6", provider="eachlabs")
    event("created", "r6", prediction_id="p6", resumed=True)  # collected, not created again
    assert line().endswith("1 in flight")


def test_the_time_left_of_a_local_engine_and_a_hosted_model_together_is_the_slower_one_s(tmp_path, capsys):
    # A restoration batch: 20 rows of clicks for the local engine, ended within a second, and
    # 6 of dropouts for a model, some 15 s each. One pace for both said "about 2.0 s left"
    # with 3 of the model's rows 15 s from ending.
    event, now, line, watcher = watched_line(tmp_path, capsys, total=26, typical={"eachlabs": 15.0})
    event("run_started", total=26, providers={"local": 20, "eachlabs": 6})
    for row in range(6):
        event("sending", f"m{row}", provider="eachlabs")
        event("creating", f"m{row}")
    for row in range(20):
        event("sending", f"c{row}", provider="local")
    now[0] += 1
    for row in range(20):
        event("outcome", f"c{row}", outcome={"status": "succeeded", "provider": "local"})
    # The model's rows have no pace yet, but all of them are out: the last sent has what a
    # prediction typically takes left to go.
    assert line().endswith("6 in flight, about 14.0 s left")
    now[0] += 14  # 15 s in, 3 of the model's rows ended: 5 s a row at that pace, 3 to go
    for row in range(3):
        event("predicted", f"m{row}")
        event("outcome", f"m{row}", outcome={"status": "succeeded", "provider": "eachlabs", "cost_usd": 0.2})
    assert line().endswith("3 in flight, about 15.0 s left")
    # A run whose journal does not say its providers (an older flow): one pace for all, as before.
    event("run_started", total=26)
    for row in range(3, 6):
        event("sending", f"m{row}", provider="eachlabs")
    now[0] += 6
    for row in range(3, 5):
        event("outcome", f"m{row}", outcome={"status": "succeeded", "provider": "eachlabs", "cost_usd": 0.2})
    for row in range(20):
        event("outcome", f"c{row}", outcome={"status": "invalid", "provider": "local"})  # not sent: no pace
    event("outcome", "m5", outcome={"status": "failed", "provider": "eachlabs"})
    watcher._state()  # (the journal read)
    assert watcher.pace.seconds_left(1) == pytest.approx(6 / 3)


def test_a_few_rows_for_a_model_have_a_time_left_by_what_its_rows_took_so_far(tmp_path, capsys):
    # Four rows of dropouts for a model, two at a time: too few ends for a pace. Once the last
    # two are out, they take what the first two took (create to ended), not the typical time.
    event, now, line, _ = watched_line(tmp_path, capsys, total=4, typical={"eachlabs": 15.0})
    event("run_started", total=4, providers={"eachlabs": 4})
    for row in range(2):
        event("sending", f"m{row}", provider="eachlabs")
        event("creating", f"m{row}")
    assert line().endswith("2 in flight, about 30.0 s left")  # a first wave: 15 s, then 2 more, 2 at a time
    now[0] += 24
    for row in range(2):
        event("outcome", f"m{row}", outcome={"status": "succeeded", "provider": "eachlabs", "cost_usd": 0.2})
        event("sending", f"m{row + 2}", provider="eachlabs")
    assert line().endswith("0 in flight")  # sent, waiting for their turn: nothing to go by
    for row in range(2, 4):
        event("creating", f"m{row}")
    now[0] += 4
    assert line().endswith("about 20.0 s left")  # 24 s a row, the last out 4 s ago
    now[0] += 30  # running late: nothing rather than something wrong
    assert line().endswith("2 in flight")


def test_a_batch_s_first_wave_has_a_time_left_by_what_a_prediction_typically_takes(tmp_path, capsys):
    # 100 rows for a model, 16 predictions at a time: until 3 had ended (some 15 s) the line
    # said nothing of the time left. Now the first in flight ends when a prediction typically
    # does, and the 84 rows behind them go 16 at a time.
    event, now, line, _ = watched_line(tmp_path, capsys, total=100, typical={"eachlabs": 15.0})
    event("run_started", total=100, providers={"eachlabs": 100})
    for row in range(40):  # sent; 16 have their create out (limits.concurrency), the rest wait for a slot
        event("sending", f"r{row}", provider="eachlabs")
    assert line().endswith("0 in flight")  # none in flight yet: nothing to go by
    for row in range(16):
        event("creating", f"r{row}")
    now[0] += 5
    assert line().endswith("16 in flight, about 1 min 29 s left")  # 10 s + 84 x 15 s / 16
    now[0] += 11  # the first is late: nothing rather than something wrong
    assert line().endswith("16 in flight")
    for row in range(3):  # three ended: the pace they ended at from here on, as before
        event("outcome", f"r{row}", outcome={"status": "succeeded", "provider": "eachlabs", "cost_usd": 0.2})
    assert line().endswith("13 in flight, about 8 min 37 s left")  # 97 rows at 3 in 16 s


def test_a_batch_held_back_by_the_rate_limit_has_the_time_its_creates_take_to_go_out(tmp_path, capsys):
    # 100 rows, 40 predictions allowed in flight, creates at 60 a minute: one goes out a
    # second, each answered 15 s later. 5 s in only 5 are in flight: going 5 at a time, the
    # line said "about 4 min 55 s left" (10 s + 95 x 15 s / 5). The last create goes out at
    # 99 s, its answer 15 s on.
    event, now, line, _ = watched_line(tmp_path, capsys, total=100, typical={"eachlabs": 15.0})
    event("run_started", total=100, providers={"eachlabs": 100}, limits={"concurrency": 40, "per_minute": 60})
    for row in range(80):  # rows at once: twice the predictions in flight
        event("sending", f"r{row}", provider="eachlabs")
    for second in range(27):
        if second == 5:
            assert line().endswith("5 in flight, about 1 min 50 s left")  # 95 creates at 1 a second + 15 s
        event("creating", f"r{second}")
        if second >= 15:
            event("outcome", f"r{second - 15}", outcome={"status": "succeeded", "provider": "eachlabs"})
        now[0] += 1
    # 27 s in, 12 rows have ended, one a second since the first did: 88 to go at that pace.
    # Counted from the first row sent, the line said "about 3 min 18 s left" (88 x 27 s / 12).
    assert line().endswith("15 in flight, about 1 min 28 s left")


def test_a_batch_held_back_by_its_concurrency_goes_that_many_at_a_time(tmp_path, capsys):
    # 40 rows, 8 predictions in flight, creates at 100 a second: a wave of 8 at a time.
    event, now, line, _ = watched_line(tmp_path, capsys, total=40, typical={"eachlabs": 15.0})
    event("run_started", total=40, providers={"eachlabs": 40}, limits={"concurrency": 8, "per_minute": 6000})
    for row in range(16):
        event("sending", f"r{row}", provider="eachlabs")
    for row in range(3):  # not all in flight yet: 8 at a time after the first ends, not 3
        event("creating", f"r{row}")
    now[0] += 5
    assert line().endswith("3 in flight, about 1 min 19 s left")  # 10 s + 37 x 15 s / 8
    for row in range(3, 8):
        event("creating", f"r{row}")
    now[0] += 10
    for row in range(8):  # the first wave ends together
        event("outcome", f"r{row}", outcome={"status": "succeeded", "provider": "eachlabs"})
    now[0] += 0.5
    # 8 ends in half a second is not the pace of the 32 rows after them: 8 at a time at most,
    # each taking what these took (11.9 s: 3 of 15 s, 5 of 10 s). Without that, "about 2.0 s left".
    assert line().endswith("0 in flight, about 47.5 s left")  # 32 x 11.875 s / 8


def test_the_local_engine_s_time_left_is_not_held_to_the_limits_of_a_hosted_model():
    # The local engine sends no create: 60 creates a minute do not make its 100 rows take 96 s.
    from soundpatch.pace import Pace

    now = [1000.0]
    pace = Pace(clock=lambda: now[0], typical={"local": 0.5})
    pace.restarted({"local": 100}, {"concurrency": 8, "per_minute": 60})
    for row in range(4):  # worked on as its cores allow
        pace.sent(now[0], "local", f"c{row}")
        pace.created(now[0], f"c{row}")
    assert pace.seconds_left(100) == pytest.approx(0.5 + 96 * 0.5 / 4)


def test_the_live_line_fits_the_terminal_and_says_less_before_it_loses_the_count(tmp_path):
    # At 80 columns rich cut the line from its start: "inp… 0 failed or invalid · $0.00 of
    # $10.00 · 0 in flight · files of several ro…", without the bar or the rows done.
    from soundpatch.pace import Pace
    from soundpatch.progress import ProgressWatcher

    watcher = ProgressWatcher(tmp_path, total=400, budget=100.0)
    now = [time.time()]
    watcher.pace = Pace(window_seconds=60, clock=lambda: now[0])

    event = journal_writer(tmp_path, now)

    def shown(width: int) -> tuple[str, int]:
        """What the line says beside the bar, and the columns the whole line takes as rich
        lays it out: "inpainting", the bar, the count (" 12/400"), this, the time so far."""
        bar, detail = watcher._live_line(width, *watcher._state())
        return detail, len("inpainting") + bar + len("  0/400") + len(detail) + len("0:01:05") + 4

    assert shown(80)[0] == "starting Prefect..."
    event("run_started", total=400)
    for row in range(40):
        event("sending", f"r{row}", provider="eachlabs")
        event("creating", f"r{row}")
    now[0] += 30  # 8 rows ended in 30 s: 392 to go at that pace
    for row in range(8):
        event("outcome", f"r{row}", outcome={"status": "failed" if row == 0 else "succeeded", "cost_usd": 0.2})
    assert watcher._state()[0] == 8
    left = watcher._left(8, "{}")
    assert left
    assert shown(200) == (f"1 failed or invalid · $1.60 of $100.00 · 32 in flight · about {left} left", shown(200)[1])
    assert shown(200)[1] < 200
    assert shown(80)[0] == f"1 failed · $1.60/$100.00 · ~{left} left"  # shorter, "in flight" goes first
    assert shown(60)[0] == "1 failed · $1.60/$100.00"
    assert shown(45)[0] == "1 failed"
    for width in (200, 120, 100, 80, 60, 45):
        assert shown(width)[1] < width  # the last column is left free: writing there wraps the line
    # Near the cap, rows wait for what predictions in flight cost (limits.py): said, and said
    # shorter before the time left goes.
    for row in range(40, 43):
        event("waiting_for_budget", f"r{row}")
    full = f"1 failed or invalid · $1.60 of $100.00 · 32 in flight · 3 waiting on the budget · about {left} left"
    assert shown(200)[0] == full
    assert shown(100)[0] == f"1 failed · $1.60/$100.00 · 3 on budget · ~{left} left"
    for width in (200, 120, 100, 80, 60, 45):
        assert shown(width)[1] < width
    # Rows of long recordings waiting for room to read theirs in (memory_room.py), until they have it.
    for row in range(43, 45):
        event("waiting_for_memory", f"r{row}")
    event("memory_granted", "r43")
    assert shown(200)[0] == full.replace(" · about", " · 1 waiting for memory · about")
    event("memory_granted", "r44")
    assert shown(200)[0] == full
    # Predictions back, their results being spliced and saved: out of flight, and said so.
    for row in range(8, 10):
        event("predicted", f"r{row}")
    saving = full.replace("32 in flight", "30 in flight · 2 splicing and saving")
    assert shown(200)[0] == saving
    assert shown(120)[0] == f"1 failed · $1.60/$100.00 · 30 in flight · 2 saving · 3 on budget · ~{left} left"
    assert shown(100)[0] == f"1 failed · $1.60/$100.00 · 3 on budget · ~{left} left"  # (with "in flight")
    for width in (200, 120, 100, 80, 60, 45):
        assert shown(width)[1] < width


def test_the_progress_line_says_prefect_is_starting_until_this_attempts_flow_begins(tmp_path, capsys, monkeypatch):
    from flows.ephemeral import new_database
    from soundpatch.journal import Journal
    from soundpatch.progress import ProgressWatcher

    journal = Journal(tmp_path)
    journal.write("run_started", total=2, kept=0)  # an earlier attempt of the run
    journal.write("outcome", "a", outcome={"row_id": "a", "status": "succeeded", "cost_usd": 0.2})
    journal.write("outcome", "b", outcome={"row_id": "b", "status": "failed", "cost_usd": 0.2})
    time.sleep(0.05)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    assert new_database()  # nothing there yet: the server makes it first
    watcher = ProgressWatcher(tmp_path, total=2, budget=1.0, new_database=new_database())
    watcher._print_line()
    assert capsys.readouterr().err.strip() == (
        "progress: starting Prefect (a first run here also sets up its database)..."
    )
    watcher._print_line(final=True)  # a flow that never began: its error says why, not this
    assert capsys.readouterr().err == ""
    journal.write("run_started", total=2, kept=1)  # this attempt's flow begins
    # a is kept; b, failed in the earlier attempt, is done again: not done until it ends
    # again (the whole bar was full from the start of a rerun), its cost still spent.
    watcher._print_line()
    assert capsys.readouterr().err.strip() == "progress: 1/2 done, 0 failed or invalid, $0.40 spent, 0 in flight"
    journal.write("sending", "b", provider="local")
    journal.write("outcome", "b", outcome={"row_id": "b", "status": "succeeded", "cost_usd": 0.4})
    watcher._print_line()
    assert capsys.readouterr().err.strip() == "progress: 2/2 done, 0 failed or invalid, $0.60 spent, 0 in flight"
    watcher._print_line(final=True)  # the run's end, with nothing new since: not said twice
    assert capsys.readouterr().err == ""
    journal.write("outcome", "b", outcome={"row_id": "b", "status": "failed", "cost_usd": 0.4})
    watcher._print_line(final=True)
    assert capsys.readouterr().err.strip() == "progress: 2/2 done, 1 failed or invalid, $0.60 spent, 0 in flight"
    journal.close()

    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "prefect.db").write_bytes(b"")
    assert not new_database()
    assert "starting Prefect..." in ProgressWatcher(tmp_path, total=2, budget=1.0)._starting


def in_a_terminal(
    *args: str, cwd: Path, env: dict[str, str], columns: int = 160, timeout: float = 300
) -> tuple[int, str]:
    """The command run in a terminal (a pseudo-terminal) `columns` wide, as users watch its
    live line; what it showed, colours and cursor moves taken out."""
    import os
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(SCRIPT), *args], cwd=cwd, env={**env, "TERM": "xterm-256color", "COLUMNS": str(columns)},
        stdin=follower, stdout=follower, stderr=follower, start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    seen, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the command ended: its terminal is closed
                    break
                if not chunk:
                    break
                seen += chunk
        else:
            raise AssertionError(f"still running after {timeout} s: {bytes(seen[-2000:])!r}")
        shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode("utf-8", "replace"))
        return proc.wait(timeout=30), shown.replace("\r\n", "\n").replace("\r", "\n")
    finally:
        proc.kill() if proc.poll() is None else None
        os.close(leader)


def test_the_live_line_in_an_80_column_terminal_keeps_its_count_and_fits(workdir, prefect_home):
    code, shown = in_a_terminal(
        "run", "manifests/restoration.csv", cwd=workdir, env=clean_env(PREFECT_HOME=str(prefect_home)), columns=80
    )
    assert code == 0, shown[-3000:]
    live = [line for line in shown.splitlines() if line.startswith("inpainting")]
    assert any("failed" in line for line in live)  # shown from the flow's start on
    for line in live:
        assert len(line) < 80 and "…" not in line, line
        assert re.search(r" [0-6]/6 .* \d:\d\d:\d\d$", line), line  # the count and the time so far, whole


@pytest.mark.parametrize("named_in", ["profile", "prefect.toml"])
def test_a_prefect_server_named_in_the_users_profile_or_project_is_used_and_no_temporary_one_is_set_up(
    workdir, tmp_path, prefect_server, named_in
):
    # `prefect config set PREFECT_API_URL=...` (or `prefect cloud login`) keeps the server in
    # the active profile, not in the environment; a project can name it in a prefect.toml
    # (or .env, or pyproject.toml) in the folder the command runs in. The live line said "a
    # first run here also sets up its database" on every such run, for a temporary server
    # started and then stopped unused.
    home = tmp_path / "home"
    home.mkdir()
    if named_in == "profile":
        profiles = f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{prefect_server}"\n'
        (home / "profiles.toml").write_text(profiles)
    else:
        (workdir / "prefect.toml").write_text(f'[api]\nurl = "{prefect_server}"\n')
    code, seen = in_a_terminal(
        "run", "manifests/restoration.csv", "--run-id", named_in, cwd=workdir, env=clean_env(PREFECT_HOME=str(home))
    )
    assert code == 0, seen[-3000:]
    assert "starting Prefect" in seen  # the live line was shown, as in a terminal
    assert "first run here" not in seen
    assert not (home / "prefect.db").exists()  # no temporary server's database
    named = {"flow_runs": {"name": {"any_": [f"soundpatch {named_in}"]}}}
    runs = httpx.post(f"{prefect_server}/flow_runs/filter", json=named, timeout=30)
    assert [r["state"]["type"] for r in runs.json()] == ["COMPLETED"]  # the run is on the team's server


def test_detect_writes_the_manifest_that_fills_an_archive_s_dropouts(workdir, prefect_home):
    (workdir / "manifests" / "audio" / "broken.wav").write_bytes(b"RIFF" + bytes(40))
    found = run(workdir, prefect_home, "detect", "manifests/audio/*", "--out", "fills/dropouts.csv")
    assert found.returncode == 1, found.stdout + found.stderr  # one file could not be read
    assert "not read: Input file manifests/audio/broken.wav is not audio" in found.stderr
    assert "Traceback" not in found.stderr
    assert "Wrote 4 rows (2 recordings of 4) to fills/dropouts.csv" in found.stdout
    rows = pd.read_csv(workdir / "fills" / "dropouts.csv")
    assert rows["input"].tolist() == ["../manifests/audio/music_damaged.flac"] * 3 + [
        "../manifests/audio/voice_damaged.flac"
    ]
    # The archive's folder itself: its recordings at every depth, by their names; not the
    # liner notes, nor macOS's hidden `._` copies (not audio).
    (workdir / "manifests" / "audio" / "notes.txt").write_text("side A: 1971")
    (workdir / "manifests" / "audio" / "._music_damaged.flac").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    (workdir / "manifests" / "audio" / "box" / "tape").mkdir(parents=True)
    shutil.copy(workdir / "manifests" / "audio" / "voice_damaged.flac", workdir / "manifests/audio/box/tape/v.FLAC")
    folder = run(workdir, prefect_home, "detect", "manifests/audio", "--out", "fills/folder.csv")
    assert folder.returncode == 1 and folder.stderr.count("not read:") == 1, folder.stdout + folder.stderr
    assert "Wrote 5 rows (3 recordings of 5) to fills/folder.csv" in folder.stdout
    assert pd.read_csv(workdir / "fills" / "folder.csv")["input"].tolist() == [
        "../manifests/audio/box/tape/v.FLAC",
        *rows["input"],
    ]
    shutil.rmtree(workdir / "manifests" / "audio" / "box")
    nothing = run(workdir, prefect_home, "detect", "fills")  # manifests only
    assert nothing.returncode == 2 and "No files match fills (in a folder, its .aif/" in nothing.stderr
    (workdir / "manifests" / "audio" / "broken.wav").unlink()
    made = run(workdir, prefect_home, "run", "fills/dropouts.csv", "--run-id", "filled")
    assert_clean(made)
    assert made.returncode == 0, made.stdout + made.stderr
    again = run(workdir, prefect_home, "detect", "outputs/filled/*.wav", "--out", "fills/left.csv")
    assert again.returncode == 0 and "No dropouts found in 2 recordings; nothing written." in again.stdout
    assert not (workdir / "fills" / "left.csv").exists()
    for name in ("music_damaged", "voice_damaged"):  # outside the regions, the recording as it was
        before, rate = sf.read(workdir / "manifests" / "audio" / f"{name}.flac", dtype="int16", always_2d=True)
        after, _ = sf.read(workdir / "outputs" / "filled" / f"{name}.wav", dtype="int16", always_2d=True)
        inside = np.zeros(len(before), dtype=bool)
        for start, end in rows.loc[rows["input"].str.contains(name), ["start", "end"]].itertuples(index=False):
            inside[round(start * rate) : round(end * rate)] = True
        assert np.array_equal(before[~inside], after[~inside]) and not np.array_equal(before, after)


def test_detect_stopped_with_ctrl_c_ends_within_the_recordings_it_is_reading(tmp_path):
    # 40 recordings, two read at a time: stopped once it is reading, what has not begun is
    # not begun (it took the rest of the archive), and nothing is written.
    music = (demo_audio.music(20.0, seed=4, smooth=True) * 20000).astype(np.int16)
    (tmp_path / "archive").mkdir()
    sf.write(tmp_path / "archive" / "take00.flac", music, 44100)
    for number in range(1, 40):
        shutil.copy(tmp_path / "archive" / "take00.flac", tmp_path / "archive" / f"take{number:02d}.flac")
    command = [str(SCRIPT), "detect", "archive", "--clicks", "--out", "fills.csv"]
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # (as a terminal's would be)
    ) as detect:
        threads = Path(f"/proc/{detect.pid}/task")
        wait_for(lambda: len(list(threads.iterdir())) >= 3, 60, "its two readers")
        time.sleep(0.5)
        assert detect.poll() is None  # still reading
        detect.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        out, said = detect.communicate(timeout=60)
    assert detect.returncode == 130 and said.strip() == "Interrupted.", out + said
    assert time.monotonic() - stopped < 4.0 and not (tmp_path / "fills.csv").exists()


def test_detect_with_clicks_writes_rows_for_clicks_too_and_the_run_leaves_none(workdir, prefect_home):
    found = run(workdir, prefect_home, "detect", "manifests/audio", "--clicks", "--out", "fills/all.csv")
    assert found.returncode == 0, found.stdout + found.stderr
    assert "Dropouts and clicks found" in found.stdout
    rows = pd.read_csv(workdir / "fills" / "all.csv")
    assert f"Wrote {len(rows)} rows (2 recordings of 3) to fills/all.csv" in found.stdout
    voice = rows[rows["input"].str.contains("voice_damaged")]
    assert voice["id"].tolist() == ["voice_damaged-dropout-1.700s", "voice_damaged-click-3.050s"]
    assert voice["note"].tolist()[1].startswith("click of ") and len(rows[rows["id"].str.contains("-click-")]) >= 2
    made = run(workdir, prefect_home, "run", "fills/all.csv", "--run-id", "declicked")
    assert_clean(made)
    assert made.returncode == 0, made.stdout + made.stderr
    again = run(workdir, prefect_home, "detect", "outputs/declicked/*.wav", "--clicks", "--out", "fills/left.csv")
    assert again.returncode == 0 and "No dropouts or clicks found in 2 recordings" in again.stdout, again.stdout
    before, rate = sf.read(workdir / "manifests/audio/voice_damaged.flac", dtype="int16", always_2d=True)
    after, _ = sf.read(workdir / "outputs/declicked/voice_damaged.wav", dtype="int16", always_2d=True)
    inside = np.zeros(len(before), dtype=bool)
    for start, end in voice[["start", "end"]].itertuples(index=False):
        inside[round(start * rate) : round(end * rate)] = True
    assert np.array_equal(before[~inside], after[~inside])
    click = slice(round(3.05 * rate), round(3.055 * rate))  # 5 ms of full-scale crackle, gone
    assert np.abs(before[click]).max() > 25000 > 4 * np.abs(after[click]).max()


def simulated_job(workdir: Path, prefect_home: Path, aws_env, sim) -> dict[str, str]:
    """job.yaml: Each Labs at the simulator `sim`, clips staged in the S3 server's s3://stage/clips/;
    returns the environment a command runs in (a key, S3 credentials)."""
    aws_env.bucket("stage")
    (workdir / "job.yaml").write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.05}}\n"
        "limits: {requests_per_minute: 6000}\n"
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
    )
    return clean_env(
        PREFECT_HOME=str(prefect_home), EACHLABS_API_KEY="k", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test"
    )


def test_a_trial_of_a_few_rows_then_the_whole_batch_pays_for_each_result_once(
    workdir, prefect_home, aws_env, simulator
):
    # "Try the glass ones before paying for all of them": --rows, then the whole manifest;
    # what the trial made is reused at $0.
    sim = simulator(latency=0.05, fill="tone", price=0.2)
    env = simulated_job(workdir, prefect_home, aws_env, sim)
    job = ("manifests/sfx_variations.yaml", "--config", "job.yaml")
    guess = soundpatch("validate", *job, "--rows", "glass-*,wod-*", cwd=workdir, env=env)
    assert guess.returncode == 2 and guess.stderr.strip() == (
        "error: No row of the manifest has an id matching 'wod-*' (--rows); its rows: metal-v1, metal-v2, wood-v1 "
        "and 6 more rows."
    )
    misspelt = soundpatch("run", *job, "--rows", "wod-*", "--run-id", "typo", cwd=workdir, env=env)
    assert misspelt.returncode == 2 and "matching 'wod-*'" in misspelt.stderr  # before Prefect starts
    assert not (workdir / "runs" / "typo").exists() and sim.stats.accepted == 0
    trial = soundpatch(
        "run", *job, "--rows", "glass-*", "--rows", "metal-v1", "--run-id", "trial", cwd=workdir, env=env
    )
    assert trial.returncode == 0, trial.stdout + trial.stderr
    tried = pd.read_csv(workdir / "runs" / "trial" / "report.csv")
    assert sorted(tried["row_id"]) == ["glass-v1", "glass-v2", "glass-v3", "metal-v1"]
    assert sim.stats.accepted == 4 and tried["cost_usd"].sum() == pytest.approx(0.8)

    whole = soundpatch("run", *job, "--run-id", "whole", cwd=workdir, env=env)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    report = pd.read_csv(workdir / "runs" / "whole" / "report.csv").set_index("row_id")
    assert len(report) == 9 and sim.stats.accepted == 9  # the five the trial did not make
    assert set(report.index[report["status"] == "skipped_done"]) == set(tried["row_id"])
    assert report["cost_usd"].sum() == pytest.approx(1.0)


def test_a_run_whose_predictions_failed_says_how_to_try_them_again_and_that_pays_only_for_what_is_made(
    workdir, prefect_home, aws_env, simulator
):
    # "failed 2" and the reasons, then what? The command that tries them again, as the run's
    # end says it: the same run id, what was done kept.
    sim = simulator(latency=0.05, fill="tone", price=0.2, fail_rate=1.0)
    env = simulated_job(workdir, prefect_home, aws_env, sim)
    job = ("run", "manifests/sfx_variations.yaml", "--config", "job.yaml", "--rows", "metal-*", "--run-id", "flaky")
    first = soundpatch(*job, cwd=workdir, env=env)
    assert first.returncode == 1, first.stdout + first.stderr
    said = " ".join(first.stdout.split())
    assert (
        "soundpatch run manifests/sfx_variations.yaml with the options it had and --run-id flaky tries the 2 failed "
        "results again, keeping what is done."
    ) in said
    assert "the budget stopped" not in said
    assert sim.stats.accepted == 2 and sim.billed() == 0.0
    sim.settings.fail_rate = 0.0
    again = soundpatch(*job, cwd=workdir, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    report = pd.read_csv(workdir / "runs" / "flaky" / "report.csv")
    assert list(report["status"]) == ["succeeded"] * 2 and report["cost_usd"].sum() == pytest.approx(0.4)
    assert sim.stats.accepted == 4 and sim.billed() == pytest.approx(0.4)
    assert "tries the" not in again.stdout


def test_rows_run_again_under_a_run_s_id_leave_its_other_rows_in_its_report(workdir, prefect_home, aws_env, simulator):
    # The report is the run's record of what it made and spent. `--rows metal-*` under the id
    # of a run that had made the glass rows wrote a report of the metal rows alone: the glass
    # ones, and the $0.60 they cost, were gone from it (and from the "spent" its budget counts).
    sim = simulator(latency=0.05, fill="tone", price=0.2)
    env = simulated_job(workdir, prefect_home, aws_env, sim)
    job = ("run", "manifests/sfx_variations.yaml", "--config", "job.yaml", "--run-id", "night")
    glass = soundpatch(*job, "--rows", "glass-*", cwd=workdir, env=env)
    assert glass.returncode == 0, glass.stdout + glass.stderr
    assert "--rows ran" not in glass.stdout  # (nothing of the run was left out: it had no other rows)
    sim.settings.fail_rate = 1.0
    metal = soundpatch(*job, "--rows", "metal-*", cwd=workdir, env=env)
    assert metal.returncode == 1, metal.stdout + metal.stderr  # the rows it ran failed
    report = pd.read_csv(workdir / "runs" / "night" / "report.csv")
    assert list(report["row_id"]) == [
        "metal-v1",
        "metal-v2",
        "glass-v1",
        "glass-v2",
        "glass-v3",
    ]  # the manifest's order
    assert list(report["status"]) == ["failed"] * 2 + ["succeeded"] * 3
    assert report["cost_usd"].sum() == pytest.approx(0.6) and sim.billed() == pytest.approx(0.6)
    said = " ".join(metal.stdout.split())
    assert "--rows ran 2 rows of run night; the report also holds the 3 other rows an earlier attempt ended" in said
    assert "$0.60 of $10.00 budget" in said and "tries the 2 failed results again" in said
    summary = json.loads((workdir / "runs" / "night" / "report.json").read_text())["summary"]
    assert summary["spent_usd"] == pytest.approx(0.6) and summary["to_finish"]["failed"] == 2

    # One of them again: its exit status is of the row it ran; metal-v2 stays in the report as it was.
    sim.settings.fail_rate = 0.0
    one = soundpatch(*job, "--rows", "metal-v1", cwd=workdir, env=env)
    assert one.returncode == 0, one.stdout + one.stderr
    report = pd.read_csv(workdir / "runs" / "night" / "report.csv").set_index("row_id")
    assert report.loc["metal-v1", "status"] == "succeeded" and report.loc["metal-v2", "status"] == "failed"
    assert len(report) == 5 and report["cost_usd"].sum() == pytest.approx(0.8) and sim.stats.accepted == 6
    assert "tries the" not in one.stdout  # (the same command has nothing more to try)
    # Rendered again from the journal, the report holds the same rows.
    again = soundpatch("report", "night", "--config", "job.yaml", cwd=workdir, env=env)
    assert again.returncode == 1, again.stdout + again.stderr  # (the run's: it holds a failed row)
    rendered = pd.read_csv(workdir / "runs" / "night" / "report.csv").set_index("row_id")
    assert sorted(rendered.index) == sorted(report.index) and rendered["cost_usd"].sum() == pytest.approx(0.8)
