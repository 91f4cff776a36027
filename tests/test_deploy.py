"""The nightly deployment in deploy/prefect.yaml, as a team runs it: a Prefect server, a
process work pool, `prefect deploy`, a worker picking up the flow run, and a retry of that
flow run resuming the same soundpatch run instead of starting (and paying) again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pandas as pd

from tests.jobs import SCRIPT, clean_env

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(SCRIPT.parent / "prefect")
DEPLOYMENT = "inpaint_batch/nightly-dataset"


def prefect(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def flow_run_log(api: httpx.Client, flow_run_id: str) -> list[str]:
    """The messages of a flow run's log, as the Prefect UI shows them (the worker's flow run
    process sends them as it exits; a moment more is allowed for them to be written)."""
    deadline = time.monotonic() + 20
    while True:
        logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        messages = [log["message"] for log in logs.json()]
        if any(m.startswith("progress:") for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def test_the_nightly_deployment_runs_on_a_worker_and_a_retry_resumes_its_run(tmp_path, prefect_server):
    env = clean_env(PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / "home"))
    config = tmp_path / "nightly.yaml"
    config.write_text(
        f"output: {{uri: '{tmp_path / 'dataset'}/', index: dataset/metadata.csv}}\nruns_dir: '{tmp_path / 'runs'}'\n"
    )

    prefect(env, "work-pool", "create", "soundpatch", "--type", "process")
    prefect(env, "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    api = httpx.Client(base_url=prefect_server, timeout=30)
    deployment = api.get(f"/deployments/name/{DEPLOYMENT}").json()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["parameters"]["manifest"] == "manifests/dataset_matrix.yaml"
    # Nights never overlap: a late one waits for the last instead of paying for the same edits.
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert deployment["job_variables"]["env"] == {"MALLOC_ARENA_MAX": "2"}  # (soundpatch/entry.py)
    # The flow runs in the checkout it was deployed from, where its manifest's audio is.
    assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

    # What the schedule does at 02:00, now, with this test's folders for results and runs.
    created = prefect(env, "deployment", "run", DEPLOYMENT, "--param", f"config={config}")
    flow_run_id = next(line.split()[-1] for line in created.splitlines() if "UUID" in line)
    prefect(env, "worker", "start", "--pool", "soundpatch", "--run-once")
    flow_run = api.get(f"/flow_runs/{flow_run_id}").json()
    assert flow_run["state_type"] == "COMPLETED", flow_run["state"]

    # The run id comes from the flow run, so that a retry of this flow run finds its journal.
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-" + flow_run_id[:8])
    assert flow_run["name"] == f"soundpatch {run_dir.name}"
    report = pd.read_csv(run_dir / "report.csv")
    assert list(report["status"]) == ["succeeded"] * 8  # 2 sources x 2 prompts x 2 seeds
    assert len(list((tmp_path / "dataset" / "dataset").rglob("*.wav"))) == 8
    index = pd.read_csv(tmp_path / "dataset" / "dataset" / "metadata.csv")  # the dataset's, a line a result
    assert sorted(index["file_name"]) == sorted(
        str(p.relative_to(tmp_path / "dataset" / "dataset")) for p in (tmp_path / "dataset" / "dataset").rglob("*.wav")
    )

    # The flow run's log, which the Prefect UI shows, has the run's progress: no terminal
    # shows a deployment's. Its last line comes as the rows end.
    said = flow_run_log(api, flow_run_id)
    assert "progress: 8/8 done, 0 failed or invalid, $0.00 spent, 0 in flight" in said, said

    # Retry the same flow run (what the UI's Retry does): the run is resumed, nothing redone.
    retried = api.post(
        f"/flow_runs/{flow_run_id}/set_state",
        json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
    )
    assert retried.status_code in (200, 201), retried.text
    prefect(env, "worker", "start", "--pool", "soundpatch", "--run-once")
    assert api.get(f"/flow_runs/{flow_run_id}").json()["state_type"] == "COMPLETED"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]
    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "run_started"]
    assert [(s["total"], s["kept"]) for s in starts] == [(8, 0), (8, 8)]
    assert sum(e["event"] == "outcome" for e in events) == 8  # each row done once

    # One night run with other settings than its config file's (the UI's custom run):
    # dotted keys over it, no file of its own on the worker's machine.
    elsewhere = tmp_path / "elsewhere"
    overrides = json.dumps({"output.uri": f"{elsewhere}/", "limits.budget_usd": 0.5})
    created = prefect(
        env, "deployment", "run", DEPLOYMENT, "--param", f"config={config}", "--param", f"overrides={overrides}"
    )
    custom_id = next(line.split()[-1] for line in created.splitlines() if "UUID" in line)
    prefect(env, "worker", "start", "--pool", "soundpatch", "--run-once")
    assert api.get(f"/flow_runs/{custom_id}").json()["state_type"] == "COMPLETED"
    (custom_dir,) = (p for p in (tmp_path / "runs").iterdir() if p.name.endswith("-" + custom_id[:8]))
    summary = json.loads((custom_dir / "report.json").read_text())["summary"]
    assert summary["budget_usd"] == 0.5 and summary["output_uri"] == f"{elsewhere}/"
    assert len(list((elsewhere / "dataset").rglob("*.wav"))) == 8

    # A key misspelt there fails the flow run before anything is sent, saying which.
    typo = json.dumps({"limits.budget": 5})
    created = prefect(
        env, "deployment", "run", DEPLOYMENT, "--param", f"config={config}", "--param", f"overrides={typo}"
    )
    typo_id = next(line.split()[-1] for line in created.splitlines() if "UUID" in line)
    prefect(env, "worker", "start", "--pool", "soundpatch", "--run-once")
    failed = api.get(f"/flow_runs/{typo_id}").json()
    assert failed["state_type"] == "FAILED"
    assert (
        "Override 'limits.budget' is not a known key; did you mean 'limits.budget_usd'?" in failed["state"]["message"]
    )
