"""The Stability AI provider against the simulator speaking Stability's protocol (real HTTP).

One synchronous multipart call per edit, answered with the audio: no bucket, no prediction
id. The simulator's "tone" model writes a sine whose pitch comes from the seed into the
masked seconds, so each test can predict the samples that should come back.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import trustme

from soundpatch.answers import AnswerShelf
from soundpatch.batch import Batch
from soundpatch.config import load_config
from soundpatch.journal import Journal
from soundpatch.manifest import load_manifest
from soundpatch.providers import PaidAnswer, hosted
from tests.jobs import AT_DECODE, assert_key_nowhere, clean_env, dying, soundpatch, synth
from tests.test_eachlabs import assert_result_is_right
from tests.test_storage import speaking_tls

KEY = "sk-stability-5e4d3c2b1a"
PRICE = 0.20


@pytest.fixture
def local_library(tmp_path: Path) -> Path:
    """Local files only (nothing needs a bucket): a 2.5 s mono 48 kHz effect, a 30 s stereo
    24-bit loop, a 4-minute 22.05 kHz FLAC tape."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "fx.wav", synth(2.5, 48000, 1), 48000, subtype="PCM_16")
    sf.write(audio / "loop.wav", synth(30.0, 44100, 2, 1), 44100, subtype="PCM_24")
    sf.write(audio / "tape.flac", synth(240.0, 22050, 1, 2), 22050, subtype="PCM_16")
    (tmp_path / "mix.csv").write_text(
        "id,input,start,end,prompt,seed\n"
        "fx,audio/fx.wav,1.20,1.65,metal clang,11\n"
        "loop,audio/loop.wav,10.0,14.5,brass stab,222\n"
        "tape,audio/tape.flac,3:52.5,3:56,applause,333\n"
    )
    return tmp_path


def stability_config(tmp_path: Path, sim, **overrides):
    return load_config(
        overrides={
            "provider.name": "stability",
            "provider.base_url": sim.base_url,
            "output.uri": str(tmp_path / "outputs"),
            "runs_dir": str(tmp_path / "runs"),
            "limits.requests_per_minute": 6000,
            **overrides,
        }
    )


def run_batch(tmp_path: Path, sim, run_id: str = "t", threads: int = 1, manifest: str = "mix.csv", **overrides):
    batch = Batch(load_manifest(tmp_path / manifest), stability_config(tmp_path, sim, **overrides), run_id)
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(batch.process, batch.manifest.edits)), batch
    finally:
        batch.close()


def journal(batch: Batch) -> list[dict]:
    return [json.loads(line) for line in batch.journal.path.read_text().splitlines()]


@pytest.mark.parametrize(("fmt", "shift_ms", "min_snr"), [("wav", 0, 35), ("mp3", 37, 18)])
def test_every_kind_of_input_comes_back_right_with_no_bucket_at_all(
    local_library, simulator, monkeypatch, fmt, shift_ms, min_snr
):
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    sim = simulator(latency=0.2, fill="tone", result_format=fmt, shift_ms=shift_ms, api_key=KEY)
    outcomes, _ = run_batch(local_library, sim)
    for o in outcomes:
        assert_result_is_right(local_library, None, o, min_snr)  # outside the region bit for bit, tone inside
        assert o.cost_usd == pytest.approx(PRICE) and o.attempts == 1 and o.provider == "stability"
    assert sim.stats.accepted == 3 and sim.billed() == pytest.approx(3 * PRICE)
    assert sorted(sim.stats.prompts) == ["applause", "brass stab", "metal clang"]


def test_run_from_the_command_line_and_the_key_is_nowhere(local_library, simulator):
    sim = simulator(latency=0.2, fill="local", api_key=KEY)
    (local_library / "stability.yaml").write_text(f"provider: {{name: stability, base_url: '{sim.base_url}'}}\n")
    env = clean_env(STABILITY_API_KEY=KEY)
    proc = soundpatch("run", "mix.csv", "--config", "stability.yaml", "--run-id", "sa", cwd=local_library, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = pd.read_csv(local_library / "runs" / "sa" / "report.csv")
    assert list(report["status"]) == ["succeeded"] * 3 and (report["provider"] == "stability").all()
    assert report["cost_usd"].sum() == pytest.approx(3 * PRICE) and "$0.60" in proc.stdout
    assert all(Path(local_library / p).is_file() or Path(p).is_file() for p in report["output"])
    assert_key_nowhere(KEY, proc.stdout + proc.stderr, local_library)

    # Without the key: one sentence naming the variable, exit 2, nothing sent.
    args = ("run", "mix.csv", "--config", "stability.yaml", "--run-id", "nokey")
    proc = soundpatch(*args, cwd=local_library, env=clean_env())
    assert proc.returncode == 2
    assert "STABILITY_API_KEY" in proc.stderr and "Traceback" not in proc.stderr
    assert sim.stats.creates == 3


def test_refused_and_turned_away_calls_cost_nothing_and_busy_ones_are_retried(local_library, simulator, monkeypatch):
    monkeypatch.setenv("STABILITY_API_KEY", "sk-wrong")
    sim = simulator(latency=0.05, fill="tone", api_key=KEY)
    outcomes, _ = run_batch(local_library, sim, "refused")
    assert [o.status for o in outcomes] == ["failed"] * 3
    assert all(o.cost_usd == 0 and "HTTP 401" in o.error and "check the API key" in o.error for o in outcomes)
    assert "sk-wrong" not in " ".join(o.error for o in outcomes)

    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    busy = simulator(
        latency=0.05, fill="tone", api_key=KEY, rpm=60, rate_window=1.0, timeout_after_429=0.5, error_rate=0.3, seed=4
    )
    overrides = {"provider.max_retries": 12, "provider.pause_after_429_seconds": 0.5}
    outcomes, batch = run_batch(local_library, busy, "busy", threads=3, **overrides)
    assert [o.status for o in outcomes] == ["succeeded"] * 3
    assert busy.stats.rate_limited + busy.stats.server_errors > 0 and sum(o.attempts for o in outcomes) > 3
    assert sum(o.cost_usd for o in outcomes) == pytest.approx(busy.billed()) == pytest.approx(3 * PRICE)
    assert any(e["event"] == "retry" for e in journal(batch))


@pytest.mark.parametrize("cause", ["down", "wrong key"])
def test_a_provider_out_of_reach_is_sent_no_more_and_the_rerun_does_the_rest(
    local_library, simulator, monkeypatch, cause
):
    """A provider that is down, or a key it refuses: every row would fail the same way after
    its retries. Once a wave of rows has, the rest are not sent; the rerun does them."""
    rows = "".join(f"r{i},audio/fx.wav,1.2,1.65,clang {i},{i}\n" for i in range(24))
    (local_library / "many.csv").write_text("id,input,start,end,prompt,seed\n" + rows)
    monkeypatch.setenv("STABILITY_API_KEY", KEY if cause == "down" else "sk-wrong")
    sim = simulator(latency=0.05, fill="tone", api_key=KEY, error_rate=1.0 if cause == "down" else 0.0)
    knobs = {"provider.max_retries": 2, "limits.concurrency": 4}
    outcomes, batch = run_batch(local_library, sim, "reach", threads=4, manifest="many.csv", **knobs)
    assert {o.status for o in outcomes} == {"failed"} and batch.ledger.spent_usd == 0
    stopped = [o for o in outcomes if o.error.startswith("Not sent to Stability AI")]
    never_sent = [o for o in stopped if o.error.startswith("Not sent to Stability AI: the last ")]
    # The rows in flight as the wave failed (concurrency 4, and up to 3 more behind them) were
    # sent; those stopped between their tries say "Not sent to Stability AI again".
    assert len(never_sent) >= 24 - 4 - 3 and all(o.cost_usd == 0 for o in stopped)
    # The attempts column counts the creates each row sent: none for those never sent.
    assert all(o.attempts == 0 for o in never_sent)
    assert all(o.attempts >= 1 for o in outcomes if o not in never_sent)
    assert sim.stats.creates <= (24 - len(never_sent)) * (3 if cause == "down" else 1)
    why, until = ("HTTP 503", "the provider answers") if cause == "down" else ("HTTP 401", "the key is right")
    assert why in never_sent[0].error and never_sent[0].error.endswith(
        f"no more are sent this run: run it again with --run-id reach once {until}."
    )

    sim.settings.error_rate = 0.0  # it answers again (or the key is put right)
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    outcomes, _ = run_batch(local_library, sim, "reach", threads=4, manifest="many.csv", **knobs)
    assert [o.status for o in outcomes] == ["succeeded"] * 24
    assert sim.stats.accepted == 24 and sum(o.cost_usd for o in outcomes) == pytest.approx(24 * PRICE)


def test_a_provider_under_a_ca_of_its_own_is_reached_once_ssl_cert_file_names_the_ca(local_library, monkeypatch):
    """Behind a proxy that inspects TLS, every create meets a certificate this machine does
    not trust: each sent row says so and what to set (not tried again: it does not mend in
    seconds), the rest are not sent, nothing is owed; with SSL_CERT_FILE naming the CA's
    bundle the rerun makes them all."""
    from soundpatch.simulator import Simulator, SimulatorSettings

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    rows = "".join(f"r{i},audio/fx.wav,1.2,1.65,clang {i},{i}\n" for i in range(12))
    (local_library / "many.csv").write_text("id,input,start,end,prompt,seed\n" + rows)
    ca = trustme.CA()
    sim = Simulator(SimulatorSettings(latency=0.05, fill="tone", api_key=KEY))
    sim.server.socket = speaking_tls(sim.server.socket, ca)
    url = sim.base_url.replace("http:", "https:")
    with sim:
        knobs = {"provider.base_url": url, "limits.concurrency": 3}
        outcomes, batch = run_batch(local_library, sim, "tls", threads=3, manifest="many.csv", **knobs)
        assert {o.status for o in outcomes} == {"failed"} and batch.ledger.spent_usd == 0
        sent = [o for o in outcomes if not o.error.startswith("Not sent")]
        assert 3 <= len(sent) <= 5 and sim.stats.creates == 0
        assert all(
            o.error.startswith(f"Cannot connect to {url} (its TLS certificate is not trusted here: ") for o in sent
        )
        assert sent[0].error.endswith("behind a proxy that inspects TLS, set SSL_CERT_FILE to its CA bundle).")
        assert not any(e["event"] == "retry" for e in journal(batch))
        assert [o.attempts for o in sent] == [1] * len(sent) and {o.attempts for o in outcomes} == {0, 1}

        bundle = local_library / "corporate-ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        outcomes, _ = run_batch(local_library, sim, "tls", threads=3, manifest="many.csv", **knobs)
        assert [o.status for o in outcomes] == ["succeeded"] * 12, outcomes[0].error
        assert sim.stats.accepted == 12 and sum(o.cost_usd for o in outcomes) == pytest.approx(12 * PRICE)


def test_prompts_moderation_refuses_fail_alone_and_never_stop_the_run(local_library, simulator, monkeypatch):
    # Stability AI refuses a prompt its content moderation flags with a 403, as it does a
    # key. Four flagged prompts in a row (more than limits.concurrency) are each the row's
    # own failure, at no cost: not a key to check, and no reason to send the others no more.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone", api_key=KEY, flagged_word="gunshot")
    prompts = ["rain"] * 2 + ["gunshot echo"] * 4 + ["wind"] * 6
    rows = "".join(f"r{i},audio/loop.wav,{i}.0,{i}.5,{p},{i}\n" for i, p in enumerate(prompts, 1))
    (local_library / "twelve.csv").write_text("id,input,start,end,prompt,seed\n" + rows)
    outcomes, batch = run_batch(local_library, sim, "moderated", manifest="twelve.csv", **{"limits.concurrency": 3})
    assert [o.status for o in outcomes] == ["succeeded"] * 2 + ["failed"] * 4 + ["succeeded"] * 6
    for o in outcomes[2:6]:
        assert o.error.startswith("Stability AI refused the create: HTTP 403 content_moderation: Your request was")
        assert "check the API key" not in o.error and o.cost_usd == 0
    assert sim.stats.creates == 12 and batch.ledger.spent_usd == pytest.approx(8 * PRICE)


def test_a_429_timeout_is_waited_out_by_every_row_not_hammered(local_library, simulator, monkeypatch):
    # Stability answers a key over its rate with 429 and no Retry-After, then refuses it for
    # a while (60 s; 2 s here). Rows wait that long, all of them, instead of retrying into
    # the timeout until their retries run out.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone", rpm=60, rate_window=1.0, timeout_after_429=2.0)
    overrides = {"provider.max_retries": 2, "provider.pause_after_429_seconds": 2.0}
    outcomes, _ = run_batch(local_library, sim, "timeout", threads=3, **overrides)
    assert [o.status for o in outcomes] == ["succeeded"] * 3
    assert 1 <= sim.stats.rate_limited <= 3  # the first 429s, then nobody knocks during the timeout
    assert sim.billed() == pytest.approx(3 * PRICE)


def test_a_filtered_result_is_paid_for_and_says_why(local_library, simulator, monkeypatch):
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone", filter_rate=1.0)
    outcomes, _ = run_batch(local_library, sim, "filtered")
    assert [o.status for o in outcomes] == ["failed"] * 3
    assert all("content filter" in o.error and o.cost_usd == pytest.approx(PRICE) for o in outcomes)
    assert sum(o.cost_usd for o in outcomes) == pytest.approx(sim.billed())


def test_a_call_whose_answer_never_came_is_counted_and_never_sent_again(local_library, simulator, monkeypatch):
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nfx,audio/fx.wav,1.2,1.65,clang,7\n")
    sim = simulator(latency=0.05, fill="tone", slow_create_rate=1.0, slow_create_seconds=3.0)
    # The model runs (and bills); the answer comes after the client stopped waiting.
    outcomes, _ = run_batch(local_library, sim, "doubt", manifest="one.csv", **{"provider.deadline_seconds": 1.0})
    (o,) = outcomes
    assert o.status == "failed" and "counted as spent" in o.error and o.cost_usd == pytest.approx(PRICE)
    assert sim.stats.accepted == 1 and sim.billed() == pytest.approx(PRICE)

    # Rerun with the same id: the row is in doubt, so nothing is sent again.
    sim.settings.slow_create_rate = 0.0
    outcomes, _ = run_batch(local_library, sim, "doubt", manifest="one.csv")
    assert outcomes[0].status == "failed" and "counted as spent" in outcomes[0].error
    assert outcomes[0].cost_usd == pytest.approx(PRICE) and sim.stats.accepted == 1

    # Asked to, it sends it again; the report shows both prices, and so does the bill.
    outcomes, _ = run_batch(local_library, sim, "doubt", manifest="one.csv", **{"provider.resubmit_in_doubt": True})
    assert outcomes[0].status == "succeeded" and outcomes[0].cost_usd == pytest.approx(2 * PRICE)
    assert sim.stats.accepted == 2 and sim.billed() == pytest.approx(2 * PRICE)


def test_the_budget_holds_at_concurrency_16_under_5xx_timeouts_and_429_bursts(tmp_path, simulator, monkeypatch):
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    sf.write(tmp_path / "fx.wav", np.full((3 * 8000, 1), 0.1, np.float32), 8000)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt\n" + "".join(f"r{i:02d},fx.wav,1,1.5,p{i:02d}\n" for i in range(40))
    )
    sim = simulator(
        latency=0.3,
        fill="tone",
        seed=5,
        error_rate=0.2,  # 503
        slow_create_rate=0.2,  # billed, answered after the client gave up
        slow_create_seconds=3.0,
        rpm=120,
        rate_window=1.0,
        timeout_after_429=0.5,
    )
    budget = 4.0  # 20 of the 40 rows
    outcomes, batch = run_batch(
        tmp_path,
        sim,
        "stress",
        threads=16,
        manifest="m.csv",
        **{
            "provider.deadline_seconds": 1.5,
            "provider.max_retries": 8,
            "provider.pause_after_429_seconds": 0.5,
            "limits.requests_per_minute": 100000,
            "limits.budget_usd": budget,
            "limits.concurrency": 16,
        },
    )
    statuses = {o.status for o in outcomes}
    assert statuses <= {"succeeded", "failed", "skipped_budget"} and "skipped_budget" in statuses
    assert sim.stats.rate_limited > 0 and sim.stats.server_errors > 0
    spent = sum(o.cost_usd for o in outcomes)
    assert sim.billed() <= budget + 1e-9
    assert sim.billed() - 1e-9 <= spent <= budget + 1e-9
    assert batch.ledger.spent_usd == pytest.approx(spent)
    assert len(sim.stats.prompts) == len(set(sim.stats.prompts))  # never sent twice once made


def test_rows_the_api_cannot_take_are_invalid_before_any_money(local_library, simulator, monkeypatch):
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "bad.csv").write_text(
        "id,input,start,end,prompt,steps,guidance_scale\n"
        "steps,audio/fx.wav,1.2,1.65,clang,12,\n"
        "guidance,audio/fx.wav,1.2,1.65,clang,,3.5\n"
        "fine,audio/fx.wav,1.2,1.65,clang,6,\n"
    )
    sim = simulator(latency=0.05, fill="tone")
    outcomes, _ = run_batch(local_library, sim, "bad", manifest="bad.csv")
    by_id = {o.row_id: o for o in outcomes}
    assert by_id["steps"].status == "invalid" and "4..8" in by_id["steps"].error
    assert by_id["guidance"].status == "invalid" and "guidance_scale" in by_id["guidance"].error
    assert by_id["fine"].status == "succeeded"
    assert sim.stats.creates == 1 and sum(o.cost_usd for o in outcomes) == pytest.approx(PRICE)


def test_a_crash_in_doubt_counts_at_the_rows_own_providers_price(local_library, simulator, monkeypatch):
    # The config's provider is the free local engine; the rows name Stability. A crash left
    # the first row's call in doubt (sent, no answer): on the rerun it counts $0.20 against
    # the budget, not the local engine's $0, so the second row no longer fits under $0.30.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "two.csv").write_text(
        "id,input,start,end,prompt,provider\n"
        "a,audio/fx.wav,1.2,1.65,clang,stability\n"
        "b,audio/fx.wav,1.0,1.5,bell,stability\n"
    )
    run_dir = local_library / "runs" / "mixed"
    crashed = Journal(run_dir)
    crashed.write("sending", "a", provider="stability")
    crashed.write("creating", "a", attempt=1)
    crashed.close()
    sim = simulator(latency=0.05, fill="tone")
    overrides = {"provider.name": "local", "limits.budget_usd": 0.30}
    outcomes, batch = run_batch(local_library, sim, "mixed", manifest="two.csv", **overrides)
    by_id = {o.row_id: o for o in outcomes}
    assert by_id["a"].status == "failed" and "counted as spent" in by_id["a"].error
    assert by_id["a"].cost_usd == pytest.approx(PRICE)
    assert by_id["b"].status == "skipped_budget" and sim.stats.creates == 0
    assert batch.ledger.spent_usd == pytest.approx(PRICE)


def test_a_run_that_dies_using_a_paid_answer_finishes_it_on_the_rerun_without_paying_again(local_library, simulator):
    # The answer came (Stability billed it) and the process died while decoding it: the
    # exact window where the result is paid for and exists only in memory.
    sim = simulator(latency=0.1, fill="tone", api_key=KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,brass,222\n")
    (local_library / "sa.yaml").write_text(f"provider: {{name: stability, base_url: '{sim.base_url}'}}\n")
    env = clean_env(STABILITY_API_KEY=KEY)
    args = ("run", "one.csv", "--config", "sa.yaml", "--run-id", "died")
    died = dying(AT_DECODE, *args, cwd=local_library, env=env)
    assert died.returncode == 137, died.stdout + died.stderr
    run_dir = local_library / "runs" / "died"
    kinds = [json.loads(line)["event"] for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    assert "answer_kept" in kinds and "outcome" not in kinds and sim.billed() == pytest.approx(PRICE)

    again = soundpatch(*args, cwd=local_library, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    report = pd.read_csv(run_dir / "report.csv", keep_default_na=False)
    (row,) = report.itertuples()
    assert row.status == "succeeded" and row.cost_usd == pytest.approx(PRICE)
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(PRICE)  # not sent again
    assert list((run_dir / "answers").iterdir()) == []  # the kept answer went with its outcome
    # ... and it is the right audio: the model's tone inside, the original outside bit for bit.
    result = SimpleNamespace(**row._asdict())
    result.output = str(local_library / row.output)
    assert_result_is_right(local_library, None, result, 35)


def test_a_paid_answer_a_killed_run_kept_is_used_by_the_next_run_whatever_its_id(local_library, simulator):
    # The same death as above, then the same command without --run-id (or the next night's
    # run): Stability's answer has no id to collect by, and the new run paid for the edit a
    # second time. It takes up the answer the killed run kept instead.
    sim = simulator(latency=0.1, fill="tone", api_key=KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,brass,222\n")
    (local_library / "sa.yaml").write_text(f"provider: {{name: stability, base_url: '{sim.base_url}'}}\n")
    env = clean_env(STABILITY_API_KEY=KEY)
    run = ("run", "one.csv", "--config", "sa.yaml")
    died = dying(AT_DECODE, *run, "--run-id", "died", cwd=local_library, env=env)
    assert died.returncode == 137, died.stdout + died.stderr
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(PRICE)

    dry = soundpatch(*run, "--dry-run", cwd=local_library, env=env)
    assert re.search(r"paid earlier, to collect \(no new cost\) +1\s", dry.stdout), dry.stdout
    again = soundpatch(*run, cwd=local_library, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 result was made from predictions that run died paid for and never collected" in again.stdout
    run_id = re.search(r"Run id (\S+)", again.stdout + again.stderr, re.I).group(1)
    report = pd.read_csv(local_library / "runs" / run_id / "report.csv", keep_default_na=False)
    (row,) = report.itertuples()
    assert row.status == "succeeded" and row.cost_usd == 0
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(PRICE)  # not sent again
    result = SimpleNamespace(**row._asdict())
    result.output = str(local_library / row.output)
    assert_result_is_right(local_library, None, result, 35)  # the model's tone inside, the rest bit for bit
    assert list((local_library / "runs" / run_id / "answers").iterdir()) == []  # its copy went with its outcome

    # The killed run, run again, finds the edit made.
    resumed = soundpatch(*run, "--run-id", "died", cwd=local_library, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert pd.read_csv(local_library / "runs" / "died" / "report.csv")["status"].tolist() == ["skipped_done"]
    assert sim.stats.creates == 1


def test_a_kept_answer_gone_before_it_is_taken_up_is_made_anew_once(local_library, simulator, monkeypatch):
    # Offered when the run began, then gone (the killed run's own rerun used it meanwhile):
    # the row sends its own create, and one left in doubt is not followed by another as if
    # it had been the offered answer that failed.
    sim = simulator(latency=0.1, fill="tone", api_key=KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,brass,222\n")
    (local_library / "sa.yaml").write_text(f"provider: {{name: stability, base_url: '{sim.base_url}'}}\n")
    args = ("run", "one.csv", "--config", "sa.yaml", "--run-id", "died")
    died = dying(AT_DECODE, *args, cwd=local_library, env=clean_env(STABILITY_API_KEY=KEY))
    assert died.returncode == 137 and sim.stats.creates == 1, died.stdout + died.stderr
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    cfg = stability_config(local_library, sim, **{"provider.deadline_seconds": 1.0})
    batch = Batch(load_manifest(local_library / "one.csv"), cfg, "later")
    try:
        assert batch.left_here.has(batch.identity(batch.check(batch.manifest.edits[0])))
        for kept in (local_library / "runs" / "died" / "answers").iterdir():
            kept.unlink()
        sim.settings.slow_create_rate, sim.settings.slow_create_seconds = 1.0, 3.0  # no answer in time
        [outcome] = [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()
    assert outcome.status == "failed" and "it may have been created" in outcome.error
    assert sim.stats.creates == 2 and outcome.cost_usd == pytest.approx(PRICE)  # its own, once


def test_an_answer_that_failed_its_row_is_kept_and_the_rerun_finishes_from_it(local_library, simulator, monkeypatch):
    # Stability has no prediction id to ask again: its answer, once billed, exists only as
    # the bytes that came back. A row that failed using them (a fault of ours, not a crash)
    # keeps them, and the rerun of the run finishes the row from them without a call.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,brass,222\n")
    sim = simulator(latency=0.05, fill="tone")
    with monkeypatch.context() as m:
        m.setattr(hosted, "recover_region", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
        (o,), _ = run_batch(local_library, sim, "kept", manifest="one.csv")
    assert o.status == "failed" and "could not be used (MemoryError" in o.error
    assert "the paid prediction is kept" in o.error
    assert sim.stats.creates == 1 and o.cost_usd == pytest.approx(PRICE)
    (o,), batch = run_batch(local_library, sim, "kept", manifest="one.csv", **{"limits.budget_usd": PRICE})
    assert o.status == "succeeded" and o.cost_usd == pytest.approx(PRICE), o.error
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(PRICE)
    assert batch.ledger.spent_usd == pytest.approx(PRICE)
    assert list((local_library / "runs" / "kept" / "answers").iterdir()) == []
    o.output = str(local_library / o.output)
    assert_result_is_right(local_library, None, o, 35)


def test_a_paid_answer_lost_with_the_run_is_counted_and_not_sent_again(local_library, simulator, monkeypatch):
    # Answered, and the run died before the answer was kept (reading its body): it is paid
    # for and gone, so it counts as spent like a create that was never answered.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nfx,audio/fx.wav,1.2,1.65,clang,7\n")
    crashed = Journal(local_library / "runs" / "lost")
    crashed.write("sending", "fx", provider="stability")
    crashed.write("creating", "fx", attempt=1)
    crashed.write("answered", "fx", status=200)
    crashed.close()
    sim = simulator(latency=0.05, fill="tone")
    (o,), batch = run_batch(local_library, sim, "lost", manifest="one.csv", **{"limits.budget_usd": 0.30})
    assert o.status == "failed" and "counted as spent" in o.error and o.cost_usd == pytest.approx(PRICE)
    assert sim.stats.creates == 0 and batch.ledger.spent_usd == pytest.approx(PRICE)


def test_a_kept_answer_whose_row_cannot_be_finished_still_shows_its_cost(local_library, simulator, monkeypatch):
    # Paid and kept before a crash; by the rerun its source file is gone, so the row is
    # invalid. The money was spent all the same: on the row's cost and against the budget.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nfx,audio/gone.wav,1.2,1.65,clang,7\n")
    run_dir = local_library / "runs" / "gone"
    crashed = Journal(run_dir)
    crashed.write("sending", "fx", provider="stability")
    crashed.write("creating", "fx", attempt=1)
    crashed.write("answered", "fx", status=200)
    crashed.write("answer_kept", "fx", **AnswerShelf(run_dir).keep("fx", PaidAnswer(b"RIFF....", PRICE)))
    crashed.close()
    sim = simulator(latency=0.05, fill="tone")
    (o,), batch = run_batch(local_library, sim, "gone", manifest="one.csv")
    assert o.status == "invalid" and o.cost_usd == pytest.approx(PRICE)
    assert batch.ledger.spent_usd == pytest.approx(PRICE) and sim.stats.creates == 0
    assert not AnswerShelf(run_dir).file_for("fx").exists()


class Died(BaseException):
    """The process dying: nothing after it runs (no outcome, no cleanup)."""


def died_using_the_answer(library: Path, simulator, monkeypatch, run_id: str):
    """A run of one row (loop, brass, seed 222) that Stability answered and was paid for,
    dead while decoding the answer: kept on disk, no outcome. The simulator, for counting."""
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (library / "one.csv").write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,brass,222\n")
    sim = simulator(latency=0.05, fill="tone")
    with monkeypatch.context() as m:
        m.setattr(hosted, "decode_result", lambda data: (_ for _ in ()).throw(Died()))
        with pytest.raises(Died):
            run_batch(library, sim, run_id, manifest="one.csv")
    return sim


def test_a_rerun_naming_another_provider_still_collects_what_the_first_one_made(local_library, simulator, monkeypatch):
    # Stability answered and was paid; the run died using the answer. The rerun's config
    # says local (free): the paid answer is still used, and its price still shows.
    sim = died_using_the_answer(local_library, simulator, monkeypatch, "switch")
    (o,), batch = run_batch(local_library, sim, "switch", manifest="one.csv", **{"provider.name": "local"})
    assert o.status == "succeeded" and o.provider == "stability" and "via Stability AI" in o.method
    assert o.cost_usd == pytest.approx(PRICE) and batch.ledger.spent_usd == pytest.approx(PRICE)
    assert sim.stats.creates == 1
    assert_result_is_right(local_library, None, o, 35)


def test_a_dry_run_of_a_crashed_run_says_what_resuming_it_costs(local_library):
    # The crash left "fx" in doubt and "loop" paid with its answer kept; "tape" never went.
    run_dir = local_library / "runs" / "crashed"
    crashed = Journal(run_dir)
    crashed.write("sending", "fx", provider="stability")
    crashed.write("creating", "fx", attempt=1)
    crashed.write("sending", "loop", provider="stability")
    crashed.write("creating", "loop", attempt=1)
    crashed.write("answered", "loop", status=200)
    crashed.write("answer_kept", "loop", **AnswerShelf(run_dir).keep("loop", PaidAnswer(b"RIFF....", PRICE)))
    crashed.close()
    journal_before = (run_dir / "journal.jsonl").read_text()
    (local_library / "sa.yaml").write_text("provider: {name: stability}\nlimits: {budget_usd: 0.50}\n")
    args = ("run", "mix.csv", "--config", "sa.yaml", "--run-id", "crashed", "--dry-run")
    dry = soundpatch(*args, cwd=local_library, env=clean_env())  # no key needed: nothing is sent
    assert dry.returncode == 0, dry.stdout + dry.stderr
    shown = " ".join(dry.stdout.split())
    assert "predictions to send 1" in shown
    assert "paid earlier, to collect (no new cost) 1" in shown
    assert "in doubt from earlier (not sent again) 1" in shown
    assert "$0.20 (budget $0.50; $0.40 spent by earlier attempts)" in shown
    assert "above the budget" in shown  # 0.20 more on top of 0.40 passes 0.50
    assert "about 0 of 1 prediction fit in it" in shown
    assert (run_dir / "journal.jsonl").read_text() == journal_before
    assert sorted(p.name for p in run_dir.iterdir()) == ["answers", "journal.jsonl"]  # nothing written


def test_a_disk_that_will_not_keep_the_answer_does_not_cost_the_row(local_library, simulator, monkeypatch):
    # Keeping the paid answer only guards against a crash meanwhile: if the disk refuses
    # it, the answer is used all the same and the journal says it was not kept.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,brass,222\n")

    def full(self, row_id, answer):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AnswerShelf, "keep", full)
    sim = simulator(latency=0.05, fill="tone")
    (o,), batch = run_batch(local_library, sim, "full", manifest="one.csv")
    assert_result_is_right(local_library, None, o, 35)
    assert o.cost_usd == pytest.approx(PRICE) and sim.stats.creates == 1
    (not_kept,) = [e for e in journal(batch) if e["event"] == "answer_not_kept"]
    assert "No space left on device" in not_kept["reason"]


def test_a_fault_of_ours_once_the_call_went_out_counts_it_as_spent(local_library, simulator, monkeypatch):
    # The call went out and Stability answered (and billed); then soundpatch failed on
    # its side before the answer was in hand (here: the journal's disk). The call may
    # have been made, so its price stays on the row and against the budget, and neither
    # this run nor a rerun sends it again. It used to count as a call never made.
    monkeypatch.setenv("STABILITY_API_KEY", KEY)
    (local_library / "one.csv").write_text("id,input,start,end,prompt,seed\nfx,audio/fx.wav,1.2,1.65,clang,7\n")
    write = Journal.write

    def failing(self, event, row_id=None, **fields):
        if event == "answered":
            raise OSError(5, "Input/output error")
        return write(self, event, row_id, **fields)

    sim = simulator(latency=0.05, fill="tone")
    with monkeypatch.context() as m:
        m.setattr(Journal, "write", failing)
        (o,), batch = run_batch(local_library, sim, "eio", manifest="one.csv")
    assert o.status == "failed" and "counted as spent" in o.error and "Input/output error" in o.error, o.error
    assert o.cost_usd == pytest.approx(PRICE) and batch.ledger.spent_usd == pytest.approx(PRICE)
    (o,), _ = run_batch(local_library, sim, "eio", manifest="one.csv")
    assert o.status == "failed" and "counted as spent" in o.error and o.cost_usd == pytest.approx(PRICE)
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(PRICE)


def test_a_paid_answer_for_what_a_row_no_longer_asks_is_counted_and_not_used(local_library, simulator, monkeypatch):
    # Paid, kept, and the run died using it; before the rerun the row's prompt and seed were
    # changed. The answer is for the old request: it is not spliced in as the new one. Its
    # price stays on the row and the budget, and the row is made anew.
    sim = died_using_the_answer(local_library, simulator, monkeypatch, "changed")
    one = local_library / "one.csv"
    one.write_text("id,input,start,end,prompt,seed\nloop,audio/loop.wav,10,14.5,strings,7\n")
    cfg = stability_config(local_library, sim)
    dry = Batch(load_manifest(one), cfg, "changed", dry_run=True, earlier_attempts=True)
    estimate = dry.estimate(dry.manifest.edits)
    dry.close()
    assert (estimate["predictions"], estimate["to_collect"], estimate["changed"]) == (1, 0, 1)  # the old one counted
    assert estimate["spent_before_usd"] == pytest.approx(PRICE)
    (o,), batch = run_batch(local_library, sim, "changed", manifest="one.csv")
    assert sim.stats.creates == 2 and o.status == "succeeded" and o.seed == 7
    assert o.cost_usd == pytest.approx(2 * PRICE) and batch.ledger.spent_usd == pytest.approx(2 * PRICE)
    assert_result_is_right(local_library, None, o, 35)  # seed 7's tone, not 222's
    assert "set_aside" in [e["event"] for e in journal(batch)]
    assert any("changed in the manifest after an earlier attempt" in n for n in batch.notes())
    assert list((local_library / "runs" / "changed" / "answers").iterdir()) == []


def test_a_paid_answer_is_cut_as_it_was_sent_when_the_clip_settings_changed(local_library, simulator, monkeypatch):
    # Sent with 10 s of context each side; the run died using the answer, and the rerun's
    # config asks for 3 s. The answer is still the 10 s clip's: put back with that window.
    sim = died_using_the_answer(local_library, simulator, monkeypatch, "narrower")
    (o,), batch = run_batch(local_library, sim, "narrower", manifest="one.csv", **{"provider.context_seconds": 3})
    assert sim.stats.creates == 1 and o.status == "succeeded" and o.cost_usd == pytest.approx(PRICE)
    assert "window 0.00+25 s" in o.method, o.method
    assert_result_is_right(local_library, None, o, 35)
