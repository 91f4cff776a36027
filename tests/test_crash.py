"""Kill it at any moment, run it again: nothing lost, nothing paid twice.

The simulator runs in this test process, so it outlives every `soundpatch run` it serves
and counts every create it ever saw.
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
import pandas as pd
import pytest
import soundfile as sf

KEY = "sk-crash-test"
SCRIPT = Path(sys.executable).parent / "soundpatch"


@pytest.fixture
def workdir(tmp_path, aws_env):
    aws_env.bucket("stage")
    rate = 48000
    t = np.arange(int(3.0 * rate)) / rate
    sf.write(tmp_path / "fx.wav", (0.2 * np.sin(2 * np.pi * 150 * t))[:, None], rate, subtype="PCM_16")
    return tmp_path


def write_job(workdir: Path, sim, s3, rows: int, concurrency: int, **provider) -> None:
    lines = ["id,input,start,end,prompt,seed"]
    lines += [f"r{i:02d},fx.wav,1.0,1.5,take {i:02d},{i}" for i in range(rows)]
    (workdir / "job.csv").write_text("\n".join(lines) + "\n")
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in provider.items())
    (workdir / "job.yaml").write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.2, max_poll_seconds: 0.5"
        f"{extra}}}\n"
        f"limits: {{concurrency: {concurrency}, budget_usd: 100}}\n"
        f"storage: {{s3: {{endpoint_url: '{s3.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
    )


def environment(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        EACHLABS_API_KEY=KEY, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", PREFECT_HOME=str(prefect_home)
    )
    return env


def start(workdir: Path, env: dict[str, str], run_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(SCRIPT), "run", "job.csv", "--config", "job.yaml", "--run-id", run_id],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a kill reaches everything it started
    )


def finish(workdir: Path, env: dict[str, str], run_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), "run", "job.csv", "--config", "job.yaml", "--run-id", run_id],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def events(workdir: Path, run_id: str, kind: str) -> list[dict]:
    path = workdir / "runs" / run_id / "journal.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.endswith("}")) if e["event"] == kind]


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


def report(workdir: Path, run_id: str) -> pd.DataFrame:
    return pd.read_csv(workdir / "runs" / run_id / "report.csv")


def test_sigkill_after_every_create_then_rerun_pays_each_prediction_once(workdir, aws_env, simulator, tmp_path_factory):
    sim = simulator(latency=8.0, fill="tone")  # slower than the kill
    write_job(workdir, sim, aws_env, rows=16, concurrency=16)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(workdir, env, "kill9")
    wait_for(lambda: len(events(workdir, "kill9", "created")) == 16, 90, "16 acknowledged creates")
    kill_group(proc)
    assert sim.stats.accepted == 16

    again = finish(workdir, env, "kill9")
    assert again.returncode == 0, again.stdout + again.stderr
    assert sim.stats.creates == 16 and sim.stats.accepted == 16  # not one more create
    assert sorted(sim.stats.prompts) == [f"take {i:02d}" for i in range(16)]
    rows = report(workdir, "kill9")
    assert list(rows["status"]) == ["succeeded"] * 16
    assert rows["cost_usd"].sum() == pytest.approx(16 * 0.20)
    assert all(Path(p).is_file() for p in rows["output"])
    assert aws_env.keys("stage", "clips/") == []  # clips staged before the kill are gone too


def test_a_create_whose_answer_never_came_is_not_sent_again(workdir, aws_env, simulator, tmp_path_factory):
    sim = simulator(latency=0.2, fill="tone", slow_create_rate=1.0, slow_create_seconds=60)
    write_job(workdir, sim, aws_env, rows=1, concurrency=1)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(workdir, env, "doubt")
    wait_for(lambda: sim.stats.accepted == 1 and events(workdir, "doubt", "creating"), 60, "the create")
    kill_group(proc)  # the prediction exists; we never heard of it

    sim.settings.slow_create_rate = 0.0
    again = finish(workdir, env, "doubt")
    assert again.returncode == 1
    row = report(workdir, "doubt").iloc[0]
    assert row["status"] == "failed" and "counted as spent" in row["error"]
    assert row["cost_usd"] == pytest.approx(0.20) and sim.stats.accepted == 1

    # Asked to, it sends it again (and the report shows both prices).
    (workdir / "job.yaml").write_text(
        (workdir / "job.yaml")
        .read_text()
        .replace("max_poll_seconds: 0.5", "max_poll_seconds: 0.5, resubmit_in_doubt: true")
    )
    third = finish(workdir, env, "doubt")
    assert third.returncode == 0, third.stdout + third.stderr
    row = report(workdir, "doubt").iloc[0]
    assert row["status"] == "succeeded" and row["cost_usd"] == pytest.approx(0.40)
    assert sim.stats.accepted == 2


def test_ctrl_c_lets_work_in_flight_finish_and_the_rerun_does_the_rest(workdir, aws_env, simulator, tmp_path_factory):
    sim = simulator(latency=3.0, fill="tone")
    write_job(workdir, sim, aws_env, rows=12, concurrency=4)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(workdir, env, "ctrlc")
    wait_for(lambda: sim.stats.accepted >= 4, 60, "four creates")
    os.killpg(proc.pid, signal.SIGINT)
    out, err_text = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err_text
    assert "Stopping: no new rows will start" in err_text and "Traceback" not in out + err_text
    first = report(workdir, "ctrlc")
    done = first[first.status == "succeeded"]
    assert len(done) == sim.stats.accepted  # everything sent was collected
    assert (first.loc[first.status != "succeeded", "error"].str.contains("Not started")).all()

    again = finish(workdir, env, "ctrlc")
    assert again.returncode == 0, again.stdout + again.stderr
    assert list(report(workdir, "ctrlc")["status"]) == ["succeeded"] * 12
    assert sim.stats.accepted == 12


def test_a_second_ctrl_c_stops_at_once_and_the_journal_still_resumes(workdir, aws_env, simulator, tmp_path_factory):
    sim = simulator(latency=30.0, fill="tone")
    write_job(workdir, sim, aws_env, rows=6, concurrency=6)
    env = environment(tmp_path_factory.mktemp("prefect"))
    proc = start(workdir, env, "twice")
    wait_for(lambda: len(events(workdir, "twice", "created")) == 6, 60, "six acknowledged creates")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    stopped_at = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - stopped_at < 10

    sim.settings.latency = 0.5
    again = finish(workdir, env, "twice")
    assert again.returncode == 0, again.stdout + again.stderr
    assert list(report(workdir, "twice")["status"]) == ["succeeded"] * 6
    assert sim.stats.accepted == 6
