"""Two processes on one provider account share its limits through a real Prefect server.

Each run paces itself at the account's full rate; only the shared global concurrency
limits on the server keep their sum under it. The same two runs without sharing go over
(the simulated provider answers 429), which shows the test can tell the difference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.jobs import SCRIPT, clean_env

RPM = 120  # the account's limit, as the simulator enforces it over a 10 s window
ROWS = 14  # per process
IN_FLIGHT = 3


def job(workdir: Path, sim, s3, shared: bool) -> None:
    workdir.mkdir()
    rate = 48000
    t = np.arange(3 * rate) / rate
    sf.write(workdir / "fx.wav", (0.2 * np.sin(2 * np.pi * 150 * t))[:, None], rate, subtype="PCM_16")
    rows = "".join(f"{workdir.name}-{i},fx.wav,1.0,1.5,take {i},{i}\n" for i in range(ROWS))
    (workdir / "job.csv").write_text("id,input,start,end,prompt,seed\n" + rows)
    (workdir / "job.yaml").write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.2, max_poll_seconds: 0.3}}\n"
        f"limits: {{concurrency: {IN_FLIGHT}, requests_per_minute: {RPM}, budget_usd: 100, "
        f"shared: {str(shared).lower()}, shared_name: account-{os.getpid()}-{int(shared)}}}\n"
        f"storage: {{s3: {{endpoint_url: '{s3.endpoint}'}}, staging: 's3://stage/{workdir.name}/'}}\n"
    )


def client_env(tmp_path: Path, api: str, **extra: str) -> dict[str, str]:
    """The environment of a run on this account, its limits shared through the server at `api`."""
    return clean_env(
        EACHLABS_API_KEY="k",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        PREFECT_API_URL=api,
        PREFECT_HOME=str(tmp_path / "client-home"),
        **extra,
    )


def run_both(tmp_path: Path, sim, s3, api: str, shared: bool) -> None:
    env = client_env(tmp_path, api)
    procs = []
    for name in ("a", "b"):
        workdir = tmp_path / f"{name}-{int(shared)}"
        job(workdir, sim, s3, shared)
        procs.append(
            subprocess.Popen(
                [str(SCRIPT), "run", "job.csv", "--config", "job.yaml", "--run-id", "r"],
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, out + err


def test_two_processes_share_one_accounts_rate_and_concurrency(tmp_path, aws_env, simulator, prefect_server):
    aws_env.bucket("stage")
    sim = simulator(latency=1.0, fill="tone", rpm=RPM, rate_window=10)
    run_both(tmp_path, sim, aws_env, prefect_server, shared=True)
    assert sim.stats.accepted == 2 * ROWS
    assert sim.stats.rate_limited == 0, f"{sim.stats.rate_limited} creates over the account's rate"
    assert sim.stats.max_in_flight <= IN_FLIGHT

    # Predictions of 4 s: each run sends for some 20 s, so the two are sending at once even
    # where one of them took seconds longer to start (at 1 s, one was once over before the
    # other sent: neither limit was crossed, and this check could not tell).
    unshared = simulator(latency=4.0, fill="tone", rpm=RPM, rate_window=10)
    run_both(tmp_path, unshared, aws_env, prefect_server, shared=False)
    assert unshared.stats.accepted == 2 * ROWS
    assert unshared.stats.rate_limited > 0 or unshared.stats.max_in_flight > IN_FLIGHT


def test_a_shared_run_whose_prefect_server_goes_away_keeps_what_it_paid_for_and_sends_no_more(
    tmp_path, aws_env, simulator
):
    # The server sharing the limits goes away while three predictions are out. Prefect's
    # strict slot raised when it could not be given back: each of the three failed, paid for
    # and unused, and the command ended "stopped unexpectedly" (exit 2) as Prefect could not
    # record the flow run's end. Now those three are used; the rows left are not sent, each
    # saying why; the report and the exit status are the run's own. And the command ends
    # with its summary: Prefect held the process for minutes after it, trying to send the
    # server the run's events, 7 s each.
    from tests.conftest import prefect_server_process

    aws_env.bucket("stage")
    sim = simulator(latency=3.0, fill="tone")
    workdir = tmp_path / "gone"
    job(workdir, sim, aws_env, shared=True)
    journal = workdir / "runs" / "r" / "journal.jsonl"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with prefect_server_process(tmp_path / "server") as (api, server):
        # PREFECT_CLIENT_MAX_RETRIES: a server away is found in seconds, not a minute.
        env = client_env(tmp_path, api, PREFECT_CLIENT_MAX_RETRIES="1")
        with open(out, "w") as stdout, open(err, "w") as stderr:
            run = subprocess.Popen(
                [str(SCRIPT), "run", "job.csv", "--config", "job.yaml", "--run-id", "r"],
                cwd=workdir,
                env=env,
                stdout=stdout,
                stderr=stderr,
                text=True,
            )
        deadline = time.monotonic() + 120
        while not (journal.exists() and journal.read_text().count('"event": "created"') >= IN_FLIGHT):
            assert time.monotonic() < deadline and run.poll() is None, "three predictions never went out"
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        while "report" not in out.read_text():  # the summary
            assert time.monotonic() < deadline + 120 and run.poll() is None, err.read_text()[-3000:]
            time.sleep(0.2)
    assert run.wait(timeout=15) == 1, out.read_text() + err.read_text()
    said = err.read_text()
    assert f"Prefect's server at {api} does not answer (ConnectError" in said
    assert "the events and logs Prefect still held for it are dropped" in said.splitlines()[-1]
    rows = json.loads((workdir / "runs" / "r" / "report.json").read_text())["rows"]
    succeeded = [r for r in rows if r["status"] == "succeeded"]
    not_sent = [r for r in rows if r["status"] == "failed"]
    assert len(succeeded) == sim.stats.accepted >= IN_FLIGHT, said  # every prediction paid for is used
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(0.2 * sim.stats.accepted)
    assert len(succeeded) + len(not_sent) == ROWS
    for row in not_sent:
        assert row["cost_usd"] == 0 and row["error"].startswith(
            f"Not sent: the Prefect server sharing this account's limits ({api}) gave no slot of "
        ), row["error"]
        assert row["error"].endswith("run it again with --run-id r once it answers."), row["error"]
    # Prefect's own messages about its server being away: each kind once, on one line. (They
    # came for every event and slot, the event printed whole, each slot with a traceback.)
    assert "Traceback" not in said and said.count("Failed to release concurrency lease") <= 1, said
    assert said.count("Prefect artifact") <= 1, said  # the outcomes table refused: the summary is not tried
    assert said.count("Unable to connect to") <= 1 and said.count("'EventsWorker' failed to process item") <= 1, said
    assert "Error logging to API" not in said, said  # written with no line end: the progress line ran on after it
    assert "keeps concurrency leases in memory" in said  # at the start
    assert "could not be given back to the Prefect server" in said
    assert "Prefect could not record how the flow run ended" in said and "stopped unexpectedly" not in said


def test_a_row_kept_waiting_by_slots_left_held_says_how_to_free_them(tmp_path, prefect_server):
    # A Prefect server restarted with its leases in memory forgets who held the slots taken
    # before: they stay held, and runs wait for them without end. The wait says so, once a
    # minute (here every 2 s), with the command that frees them; freed, the row goes on.
    env = clean_env(PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / "client-home"))
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import logging, sys\n"
            "from flows.shared_limits import PrefectSharedLimits\n"
            "logging.getLogger('soundpatch').addHandler(logging.StreamHandler(sys.stdout))\n"
            "PrefectSharedLimits.NOTICE_SECONDS = 2.0\n"
            "limits = PrefectSharedLimits('left-held', 60, 2)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "with limits.prediction():\n"
            "    print('got a slot', flush=True)\n",
        ],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    gcl = [str(SCRIPT.parent / "prefect"), "gcl", "update", "left-held-predictions", "--active-slots"]
    try:
        assert waiter.stdout.readline().strip() == "ready", waiter.stderr.read()
        # What the restart left: both slots held, by no one.
        subprocess.run([*gcl, "2"], env=env, check=True, capture_output=True)
        waiter.stdin.write("go\n")
        waiter.stdin.flush()
        notice = waiter.stdout.readline()
        assert notice.startswith("A row has waited 2 s for a slot of the shared limit left-held-predictions"), notice
        assert "2 of its 2 slots are held" in notice
        assert "free them with `prefect gcl update left-held-predictions --active-slots 0`" in notice
        subprocess.run([*gcl, "0"], env=env, check=True, capture_output=True)
        rest, errors = waiter.communicate(timeout=90)  # the client asks again after the server's Retry-After
        assert waiter.returncode == 0, errors
        lines = rest.splitlines()
        assert lines[-1] == "got a slot" and all(n.startswith("A row has waited") for n in lines[:-1]), rest
    finally:
        waiter.kill()


def test_rows_naming_another_provider_take_that_provider_s_shared_limits(
    tmp_path, aws_env, simulator, prefect_server, monkeypatch
):
    # With limits.shared, a row naming another provider than the config's took slots of the
    # config's provider's limits: its creates were spent from that account's rate, and not
    # counted with other processes sending to its own provider.
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.shared_limits import AccountLimits
    from soundpatch import config as config_module
    from soundpatch.batch import Batch
    from soundpatch.manifest import load_manifest
    from tests.jobs import hosted_config

    aws_env.bucket("stage")
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    monkeypatch.setenv("STABILITY_API_KEY", "k")
    each, stability = simulator(latency=0.1, fill="tone"), simulator(latency=0.1, fill="tone")
    monkeypatch.setitem(config_module.DEFAULT_BASE_URLS, "stability", stability.base_url)  # the rows' provider's own
    sf.write(tmp_path / "fx.wav", np.full((3 * 8000, 1), 0.1, np.float32), 8000)
    rows = "".join(f"r{i},fx.wav,1,1.5,p{i},{'stability' if i >= 2 else ''}\n" for i in range(4))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt,provider\n" + rows)
    name = f"mixed-{os.getpid()}"
    overrides = {"limits.shared": True, "limits.shared_name": name, "limits.concurrency": 2}
    cfg = hosted_config(each, aws_env.endpoint, str(tmp_path / "out"), tmp_path / "runs", **overrides)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        shared = AccountLimits(cfg)
        batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "mixed", shared=shared)
        outcomes = [batch.process(edit) for edit in batch.manifest.edits]
        batch.close()
        with get_client(sync_client=True) as client:
            limits = {limit.name: limit.limit for limit in client.read_global_concurrency_limits(limit=200)}
    assert [o.status for o in outcomes] == ["succeeded"] * 4 and each.stats.accepted == stability.stats.accepted == 2
    assert len(shared("eachlabs").create_waits) == len(shared("stability").create_waits) == 2
    assert limits[f"{name}-predictions"] == limits["soundpatch-stability-predictions"] == 2
    assert f"{name}-creates" in limits and "soundpatch-stability-creates" in limits
