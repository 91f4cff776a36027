"""The fal provider against the simulator speaking fal's queue protocol (real HTTP), with
clips staged in moto's S3 server (real HTTP), as they would be for fal to fetch."""

from __future__ import annotations

import pandas as pd
import pytest

from soundpatch.batch import Batch
from soundpatch.manifest import load_manifest
from tests.jobs import (
    assert_key_nowhere,
    clean_env,
    hosted_config,
    soundpatch,
)
from tests.test_eachlabs import assert_result_is_right

KEY = "fal-key-0a1b2c3d4e5f"
PRICE = 0.20


def run_batch(tmp_path, sim, s3, run_id: str = "t", manifest: str = "mix.csv", **overrides):
    cfg = hosted_config(
        sim,
        s3.endpoint,
        str(tmp_path / "outputs"),
        tmp_path / "runs",
        **{"provider.name": "fal", "provider.max_poll_seconds": 0.2, "limits.requests_per_minute": 6000},
        **overrides,
    )
    batch = Batch(load_manifest(tmp_path / manifest), cfg, run_id)
    try:
        return [batch.process(e) for e in batch.manifest.edits], batch
    finally:
        batch.close()


def test_every_kind_of_input_comes_back_right(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("FAL_KEY", KEY)
    sim = simulator(latency=0.2, fill="tone", result_format="mp3", shift_ms=37, api_key=KEY)
    outcomes, _ = run_batch(library, sim, aws_env)
    for o in outcomes:
        assert_result_is_right(library, aws_env, o, 18)
        assert o.cost_usd == pytest.approx(PRICE) and o.prediction_id and o.provider == "fal"
    assert len({o.prediction_id for o in outcomes}) == 4 and sim.stats.accepted == 4
    assert aws_env.keys("stage", "clips/t/") == []  # staged clips are cleaned up


@pytest.mark.parametrize(
    ("fault", "seen"),
    [
        # fal's status and its result are both polled; a 200 that is an HTML page is neither:
        # asked again.
        ({"garbled_poll_rate": 0.5, "seed": 4}, "garbled_polls"),
        # A result whole but damaged (all zeros, as a faulty cache may serve it): downloaded
        # once more, and used when the second copy is whole (with this seed, no row gets two).
        ({"corrupt_rate": 0.4, "seed": 1}, "corrupted"),
    ],
    ids=["gateway-page-polls", "damaged-downloads"],
)
def test_answers_that_come_back_unreadable_are_asked_for_again_at_no_new_cost(
    library, aws_env, simulator, monkeypatch, fault, seen
):
    monkeypatch.setenv("FAL_KEY", KEY)
    sim = simulator(latency=0.3, fill="tone", api_key=KEY, **fault)
    outcomes, batch = run_batch(library, sim, aws_env)
    for o in outcomes:
        assert_result_is_right(library, aws_env, o, 35)
        assert o.cost_usd == pytest.approx(PRICE)
    assert getattr(sim.stats, seen) > 0 and sim.stats.accepted == 4
    assert sim.stats.downloads == 4 + sim.stats.corrupted  # a damaged one is downloaded once more
    assert batch.ledger.spent_usd == pytest.approx(4 * PRICE)


def test_run_from_the_command_line_and_the_key_is_nowhere(library, aws_env, simulator):
    sim = simulator(latency=0.3, fill="local", api_key=KEY)
    (library / "fal.yaml").write_text(
        f"provider: {{name: fal, base_url: '{sim.base_url}', poll_seconds: 0.1}}\n"
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
    )
    env = clean_env(FAL_KEY=KEY, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    proc = soundpatch("run", "mix.csv", "--config", "fal.yaml", "--run-id", "fal", cwd=library, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = pd.read_csv(library / "runs" / "fal" / "report.csv")
    assert list(rows["status"]) == ["succeeded"] * 4 and rows["prediction_id"].nunique() == 4
    assert rows["cost_usd"].sum() == pytest.approx(4 * PRICE) and sim.stats.accepted == 4
    assert_key_nowhere(KEY, proc.stdout + proc.stderr, library)

    env.pop("FAL_KEY")
    proc = soundpatch("run", "mix.csv", "--config", "fal.yaml", "--run-id", "nokey", cwd=library, env=env)
    assert proc.returncode == 2 and "FAL_KEY" in proc.stderr and sim.stats.creates == 4


def test_a_refused_request_costs_nothing_and_a_failed_one_keeps_its_price(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("FAL_KEY", KEY)
    (library / "one.csv").write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,brass,5\n")
    # The model's queue refuses a 26 s clip (422 with FastAPI's details): nothing was made.
    picky = simulator(latency=0.05, fill="tone", max_seconds=20)
    (o,), _ = run_batch(library, picky, aws_env, "refused", manifest="one.csv")
    assert o.status == "failed" and "HTTP 422" in o.error and "seconds_total" in o.error and o.cost_usd == 0

    # Made, then failed at the model: fal says nothing of cost, so the price is kept.
    failing = simulator(latency=0.05, fill="tone", fail_rate=1.0)
    (o,), _ = run_batch(library, failing, aws_env, "failed", manifest="one.csv")
    assert o.status == "failed" and "simulated failure" in o.error and o.prediction_id
    assert o.cost_usd == pytest.approx(PRICE)
