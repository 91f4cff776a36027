"""Two processes on one provider account share its limits through a real Prefect server.

Each run paces itself at the account's full rate; only the shared global concurrency
limits on the server keep their sum under it. The same two runs without sharing go over
(the simulated provider answers 429), which shows the test can tell the difference.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
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


def run_both(tmp_path: Path, sim, s3, api: str, shared: bool) -> None:
    env = clean_env(
        EACHLABS_API_KEY="k",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        PREFECT_API_URL=api,
        PREFECT_HOME=str(tmp_path / "client-home"),
    )
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

    unshared = simulator(latency=1.0, fill="tone", rpm=RPM, rate_window=10)
    run_both(tmp_path, unshared, aws_env, prefect_server, shared=False)
    assert unshared.stats.accepted == 2 * ROWS
    assert unshared.stats.rate_limited > 0 or unshared.stats.max_in_flight > IN_FLIGHT
