"""Everything going wrong at once, and the process killed at random points in between.

After the dust settles: every row ended with a status (and a reason if it did not
succeed), no row was ever created twice, the provider never charged more than the
budget, and the report never shows less than the provider charged.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import soundfile as sf

from soundpatch.batch import Batch
from soundpatch.manifest import load_manifest
from tests.jobs import environment, events, finish, hosted_config, kill_group, start, wait_for, write_job

ROWS = 24
BUDGET = 4.00  # 20 of the 24 rows at $0.20


def test_faults_and_random_kills_never_cost_twice_or_exceed_the_budget(job_dir, aws_env, simulator, tmp_path_factory):
    sim = simulator(
        latency=1.0,
        fill="tone",
        seed=11,
        error_rate=0.2,  # 503 on create
        poll_error_rate=0.2,  # 502 on poll
        fail_rate=0.1,  # predictions that fail
        truncate_rate=0.2,  # downloads cut short
        rpm=240,
        rate_window=2.0,  # 429 storms: 8 creates per 2 s
        slow_create_rate=0.1,
        slow_create_seconds=4.0,  # made, answered after the client gave up
    )
    # Sent faster than the provider allows, so its 429 storms hit the adaptive limiter.
    write_job(job_dir, sim, aws_env, rows=ROWS, concurrency=8, rpm=1200, timeout_seconds=2.0, max_retries=6)
    (job_dir / "job.yaml").write_text(
        (job_dir / "job.yaml").read_text().replace("budget_usd: 100", f"budget_usd: {BUDGET}")
    )
    env = environment(tmp_path_factory.mktemp("prefect"))
    rng = random.Random(5)
    for attempt in range(2):  # killed twice at random points
        proc = start(job_dir, env, "faults")
        target = len(events(job_dir, "faults", "sending")) + rng.randint(2, 8)
        wait_for(
            lambda t=target, p=proc: len(events(job_dir, "faults", "sending")) >= t or p.poll() is not None,
            120,
            f"rows in flight before kill {attempt + 1}",
        )
        if proc.poll() is None:
            kill_group(proc)
    final = finish(job_dir, env, "faults")
    assert final.returncode in (1, 3), final.stdout + final.stderr
    assert "Traceback" not in final.stdout + final.stderr

    report = pd.read_csv(job_dir / "runs" / "faults" / "report.csv", keep_default_na=False)
    assert len(report) == ROWS
    assert set(report["status"]) <= {"succeeded", "failed", "skipped_budget"}
    assert (report.loc[report.status != "succeeded", "error"].str.len() > 0).all()
    assert (report["status"] == "succeeded").sum() >= ROWS // 2
    # No row was ever created twice, across all attempts of the run.
    assert max(Counter(sim.stats.prompts).values()) == 1
    # The provider never charged more than the budget, and the report never shows less.
    assert sim.billed() <= BUDGET + 1e-9
    assert report["cost_usd"].sum() <= BUDGET + 1e-9
    assert report["cost_usd"].sum() >= sim.billed() - 1e-9
    print(
        f"\nfaults: {dict(Counter(report.status))}, report ${report.cost_usd.sum():.2f}, "
        f"provider billed ${sim.billed():.2f}, creates seen {sim.stats.creates}, "
        f"429s {sim.stats.rate_limited}, 5xx {sim.stats.server_errors}"
    )


def test_s3_throttling_is_waited_out(job_dir, aws_env, throttled_s3, simulator, monkeypatch):
    """Staging uploads, s3:// input reads and s3:// outputs through a store that answers 503 SlowDown."""
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    buf = io.BytesIO()
    sf.write(buf, np.zeros((3 * 22050, 1), np.float32), 22050, format="WAV")
    aws_env.client.put_object(Bucket=aws_env.bucket("archive"), Key="a.wav", Body=buf.getvalue())
    (job_dir / "m.csv").write_text(
        "id,input,start,end,prompt\n"
        + "".join(f"s{i},s3://archive/a.wav,1,1.5,p{i}\n" for i in range(4))
        + "".join(f"l{i},fx.wav,1,1.5,q{i}\n" for i in range(4))
    )
    sim = simulator(latency=0.05, fill="tone")
    cfg = hosted_config(sim, throttled_s3.endpoint, f"s3://{aws_env.bucket('results')}/out/", job_dir / "runs")
    batch = Batch(load_manifest(job_dir / "m.csv"), cfg, "throttled")
    with ThreadPoolExecutor(max_workers=8) as rows:  # at once, as a run's rows go: each waits out its own 503s
        outcomes = list(rows.map(batch.process, batch.manifest.edits))
    batch.close()
    assert [o.status for o in outcomes] == ["succeeded"] * 8, [o.error for o in outcomes]
    assert throttled_s3.throttled > 0 and sim.stats.accepted == 8
    results = [k for k in aws_env.keys("results", "out/throttled/") if k.endswith(".wav")]
    assert len(results) == 8 and all(o.output.startswith("s3://results/out/throttled/") for o in outcomes)
