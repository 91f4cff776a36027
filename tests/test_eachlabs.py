"""The Each Labs provider against the simulator (real HTTP) and moto's S3 server (real HTTP).

The simulator's "tone" model writes a sine whose pitch comes from the seed into the
masked seconds, in phase with the clip's timeline, so every test can predict exactly
which samples should come back where.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from botocore.config import Config as BotoConfig

import soundpatch.s3 as s3_module
from soundpatch.batch import Batch
from soundpatch.errors import ConfigError
from soundpatch.journal import read_events
from soundpatch.manifest import load_manifest
from soundpatch.window import plan_window
from tests.jobs import assert_key_nowhere, clean_env, hosted_config, seeded_prefect_home, soundpatch

KEY = "sk-test-9f8e7d6c5b4a"
PRICE = 0.20


def eachlabs_config(tmp_path: Path, sim, s3, rpm: float = 600, **provider):
    return hosted_config(
        sim,
        s3.endpoint,
        str(tmp_path / "outputs"),
        tmp_path / "runs",
        **{"limits.requests_per_minute": rpm, "provider.max_poll_seconds": 0.2},
        **{f"provider.{k}": v for k, v in provider.items()},
    )


def run_batch(tmp_path, sim, s3, manifest="mix.csv", run_id="t", rpm: float = 600, **provider):
    cfg = eachlabs_config(tmp_path, sim, s3, rpm, **provider)
    batch = Batch(load_manifest(tmp_path / manifest), cfg, run_id)
    try:
        return [batch.process(e) for e in batch.manifest.edits], batch
    finally:
        batch.close()


def twelve_rows(library: Path) -> Path:
    """A manifest of twelve rows, each a region of its own of the loop."""
    rows = "".join(f"r{i},audio/loop.wav,{i}.0,{i}.5,brass stab,{i}\n" for i in range(1, 13))
    (library / "twelve.csv").write_text("id,input,start,end,prompt,seed\n" + rows)
    return library / "twelve.csv"


def process_all(manifest: Path, cfg, run_id: str) -> list:
    """Every row of `manifest` through one Batch, one after another."""
    batch = Batch(load_manifest(manifest), cfg, run_id)
    try:
        return [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()


def read_source(tmp_path: Path, s3, uri: str) -> bytes:
    if uri.startswith("s3://"):
        bucket, key = uri[5:].split("/", 1)
        return s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return (tmp_path / uri).read_bytes()


def assert_result_is_right(tmp_path, s3, outcome, min_snr_db: float) -> None:
    assert outcome.status == "succeeded", outcome.error
    source = read_source(tmp_path, s3, outcome.input)
    with sf.SoundFile(io.BytesIO(source)) as f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
    before = sf.read(io.BytesIO(source), dtype="int32", always_2d=True)[0]
    after, out_rate = sf.read(outcome.output, dtype="int32", always_2d=True)
    assert (out_rate, after.shape) == (rate, (frames, channels))
    a, b = round(outcome.start * rate), round(outcome.end * rate)
    assert np.array_equal(before[:a], after[:a]) and np.array_equal(before[b:], after[b:])
    # Inside: the model's tone, in phase with the clip that was sent, beyond the crossfades.
    w = plan_window(frames, rate, a, b, context_seconds=10)
    freq = 300.0 + (outcome.seed % 700)
    expected = 0.3 * np.sin(2 * np.pi * freq * (np.arange(a, b) - w.lo) / rate)
    got = sf.read(outcome.output, dtype="float32", always_2d=True)[0][a:b, 0]
    fade = int(0.012 * rate)
    inner = slice(fade, len(expected) - fade)
    err = got[inner] - expected[inner]
    snr = 10 * np.log10(np.sum(expected[inner] ** 2) / np.sum(err**2))
    assert snr > min_snr_db, (outcome.row_id, snr)


@pytest.mark.parametrize(("fmt", "shift_ms", "min_snr"), [("wav", 0, 35), ("mp3", 0, 18), ("mp3", 37, 18)])
def test_every_kind_of_input_comes_back_right(library, aws_env, simulator, monkeypatch, fmt, shift_ms, min_snr):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.2, fill="tone", result_format=fmt, shift_ms=shift_ms)
    outcomes, _ = run_batch(library, sim, aws_env)
    for o in outcomes:
        assert_result_is_right(library, aws_env, o, min_snr)
        assert o.cost_usd == pytest.approx(PRICE) and o.prediction_id and o.attempts == 1
    assert len({o.prediction_id for o in outcomes}) == 4 and sim.stats.accepted == 4
    # The 8 s 44.1 kHz stereo WAV in the bucket needed no preparation: shared as it is.
    assert any("/inputs/bank/door.wav" in url for url in sim.stats.audio_urls)
    assert aws_env.keys("stage", "clips/t/") == []  # staged clips are cleaned up


def test_run_against_the_simulator_from_the_command_line(library, aws_env, simulator):
    sim = simulator(latency=0.3, fill="local", result_format="mp3", shift_ms=20)
    (library / "hosted.yaml").write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.1}}\n"
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
    )
    env = clean_env(EACHLABS_API_KEY=KEY, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    proc = soundpatch("run", "mix.csv", "--config", "hosted.yaml", "--run-id", "hosted", cwd=library, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = pd.read_csv(library / "runs" / "hosted" / "report.csv")
    assert list(report["status"]) == ["succeeded"] * 4
    assert (report["cost_usd"] == PRICE).all() and report["cost_usd"].sum() == pytest.approx(0.8)
    assert report["prediction_id"].nunique() == 4 and (report["attempts"] == 1).all()
    assert sim.stats.accepted == 4
    assert "$0.80" in proc.stdout
    assert_key_nowhere(KEY, proc.stdout + proc.stderr, library)


def test_the_key_can_come_from_a_prefect_secret_block(library, aws_env, simulator, tmp_path_factory):
    home = seeded_prefect_home(tmp_path_factory.mktemp("prefect-home-secret"))
    env = clean_env(
        PREFECT_HOME=str(home),
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        PREFECT_LOGGING_LEVEL="WARNING",
        DO_NOT_TRACK="1",
        # Secret.save starts Prefect's own ephemeral server, which on a new PREFECT_HOME
        # creates its database first: past Prefect's 20 s default on a busy 2-core machine.
        # (soundpatch's own temporary server waits up to 120 s.) Its telemetry, off as in
        # soundpatch's runs, only adds a write to that new database.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    save = f"from prefect.blocks.system import Secret; Secret(value={KEY!r}).save('eachlabs-key')"
    saved = subprocess.run([sys.executable, "-c", save], env=env, capture_output=True, text=True, timeout=180)
    assert saved.returncode == 0, saved.stderr[-2000:]
    sim = simulator(latency=0.1, fill="tone", api_key=KEY)  # accepts only that key
    (library / "secret.yaml").write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.1, api_key_secret: eachlabs-key}}\n"
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
    )
    (library / "one.csv").write_text("id,input,start,end,prompt\nfx,audio/fx.wav,1.2,1.65,clang\n")
    proc = soundpatch("run", "one.csv", "--config", "secret.yaml", "--run-id", "secret", cwd=library, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sim.stats.accepted == 1
    assert KEY not in proc.stdout + proc.stderr + (library / "runs" / "secret" / "journal.jsonl").read_text()


def single(tmp_path, row: str) -> str:
    (tmp_path / "one.csv").write_text("id,input,start,end,prompt,seed,steps\n" + row + "\n")
    return "one.csv"


def test_a_recording_the_output_format_cannot_hold_is_invalid_before_anything_is_paid(
    library, aws_env, simulator, monkeypatch
):
    # MP3 holds two channels at most, at 48 kHz at most: found when the row is checked,
    # not by the encoder once the prediction was paid for.
    from tests.jobs import synth

    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone")
    sf.write(library / "audio" / "surround.wav", synth(8.0, 48000, 6), 48000, subtype="PCM_16")
    sf.write(library / "audio" / "hires.wav", synth(8.0, 96000, 2), 96000, subtype="PCM_24")
    (library / "mp3.csv").write_text(
        "id,input,start,end,prompt,seed\n"
        "surround,audio/surround.wav,2,3,rain,1\n"
        "hires,audio/hires.wav,2,3,rain,2\n"
        "fx,audio/fx.wav,1.2,1.65,clang,3\n"
    )
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "out"), library / "runs", **{"output.format": "mp3"})
    batch = Batch(load_manifest(library / "mp3.csv"), cfg, "mp3")
    try:
        estimate = batch.estimate(batch.manifest.edits)
        outcomes = {o.row_id: o for o in map(batch.process, batch.manifest.edits)}
    finally:
        batch.close()
    assert [e[0] for e in estimate["errors"]] == ["surround", "hires"] and estimate["predictions"] == 1
    assert outcomes["surround"].status == "invalid" and outcomes["surround"].error == (
        "The output format MP3 cannot hold this recording (6 channels at 48000 Hz): it holds at most "
        "2 channels; choose another output.format for it."
    )
    assert outcomes["hires"].status == "invalid" and "96000 Hz" in outcomes["hires"].error
    assert outcomes["fx"].status == "succeeded", outcomes["fx"].error
    assert sim.stats.creates == 1 and batch.ledger.spent_usd == pytest.approx(PRICE)


def test_a_retry_after_is_read_as_seconds_or_as_an_http_date():
    from soundpatch.providers.hosted import retry_after

    def asked(value: str) -> float | None:
        return retry_after(httpx.Response(429, headers={"Retry-After": value}), now=1_700_000_000.0)

    assert asked("7") == 7.0 and asked("0.5") == 0.5 and asked("-3") == 0.0
    assert asked("86400") == 300.0  # a day's quota is waited in turns of five minutes, not a day at once
    assert asked("Tue, 14 Nov 2023 22:13:50 GMT") == 30.0  # 30 s after `now`
    assert asked("Tue, 14 Nov 2023 22:13:00 GMT") == 0.0  # already past
    assert asked("soon") is None and asked("nan") is None
    assert retry_after(httpx.Response(429)) is None


def test_rate_limits_are_waited_out_with_retry_after(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone", rpm=60, rate_window=1.0)  # one create per second
    outcomes, batch = run_batch(library, sim, aws_env, rpm=6000)  # sent far faster than it allows
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    assert sim.stats.rate_limited >= 1 and sim.stats.accepted == 4
    assert sum(o.attempts for o in outcomes) > 4
    events = list(read_events(batch.run_dir))
    assert any(e["event"] == "retry" and "429" in e["reason"] for e in events)


def test_a_row_waiting_its_turn_when_the_run_is_stopped_sends_nothing(library, aws_env, simulator, monkeypatch):
    from soundpatch import interrupt

    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone")
    cfg = eachlabs_config(library, sim, aws_env)
    batch = Batch(load_manifest(library / single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")), cfg, "stopped")
    limiter = batch.providers["eachlabs"].creates
    wait_for_turn = limiter.acquire

    def ctrl_c_while_waiting(give_up=None) -> float:
        waited = wait_for_turn(give_up=give_up)
        interrupt.request_stop()
        return waited

    monkeypatch.setattr(limiter, "acquire", ctrl_c_while_waiting)
    try:
        [o] = [batch.process(e) for e in batch.manifest.edits]
    finally:
        interrupt.reset()
        batch.close()
    assert o.status == "failed" and "Not started" in o.error and o.cost_usd == 0
    assert sim.stats.creates == 0 and batch.ledger.spent_usd == 0


def test_server_errors_are_retried_then_the_row_fails_without_charge(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(error_rate=1.0)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    [o], batch = run_batch(library, sim, aws_env, manifest=name, max_retries=2)
    assert o.status == "failed" and "did not take the create after 3 attempts" in o.error
    assert o.cost_usd == 0 and o.attempts == 3 and sim.stats.creates == 3
    assert batch.ledger.spent_usd == 0


def an_outage(library, aws_env, simulator, monkeypatch, run_id: str, rpm: int):
    """(the simulator, a Batch of twelve rows, three in flight) of a provider that turns
    every create away, each tried once."""
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(error_rate=1.0)
    knobs = {"limits.concurrency": 3, "provider.max_retries": 0, "limits.requests_per_minute": rpm}
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "outputs"), library / "runs", **knobs)
    return sim, Batch(load_manifest(twelve_rows(library)), cfg, run_id)


# Of an outage's twelve rows: three sent and turned away, then none sent.
OUTAGE_ERRORS = ["Each Labs did not take the create after 1 attempt"] * 3 + ["Not sent to Each Labs"] * 9


def test_rows_left_when_the_provider_is_out_of_reach_stage_nothing_and_cost_nothing(
    library, aws_env, simulator, monkeypatch
):
    # Every create turned away: once three rows in a row (limits.concurrency) have failed
    # that way, the rows left are not sent, and no clip of theirs is uploaded to staging.
    sim, batch = an_outage(library, aws_env, simulator, monkeypatch, "outage", rpm=6000)
    try:
        outcomes = [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()
    assert [o.error.split(":")[0] for o in outcomes] == OUTAGE_ERRORS
    assert sim.stats.creates == 3 and batch.ledger.spent_usd == 0 and all(o.cost_usd == 0 for o in outcomes)
    staged = [e for e in read_events(batch.run_dir) if e["event"] == "staged"]
    assert sorted(e["row"] for e in staged) == ["r1", "r2", "r3"]


def test_rows_waiting_their_turn_at_the_rate_limit_end_once_the_provider_is_out_of_reach(
    library, aws_env, simulator, monkeypatch
):
    # At 20 creates a minute a turn comes every 3 s. Every create turned away: the third
    # comes to nothing 6 s in, and the provider is out of reach. The rows that took the
    # slots the first three freed had been handed turns up to 15 s; they waited them out
    # (12 s in all) only to be told then that nothing more is sent. They end as the
    # provider is found out of reach, and the batch with them.
    sim, batch = an_outage(library, aws_env, simulator, monkeypatch, "slow-outage", rpm=20)
    began = time.monotonic()
    try:
        with ThreadPoolExecutor(batch.rows_at_once) as pool:
            outcomes = list(pool.map(batch.process, batch.manifest.edits))
    finally:
        batch.close()
    took = time.monotonic() - began
    assert sim.stats.creates == 3 and all(o.cost_usd == 0 for o in outcomes)
    assert sorted(o.error.split(":")[0] for o in outcomes) == OUTAGE_ERRORS
    assert took < 10, f"the batch took {took:.1f} s: rows waited out turns they could not use"


def test_rows_left_when_the_staging_bucket_stops_taking_clips_are_not_sent_and_cost_nothing(
    library, aws_env, simulator, fault_proxy, monkeypatch
):
    # The staging bucket fails every upload from the third row on (an outage: 500s). Each
    # row went through its own S3 retries to the same failure, a night of them on a long
    # batch; once three uploads in a row (limits.concurrency) have failed, the rows left
    # upload nothing and are not sent, saying why; the rerun, the bucket back, does them.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    monkeypatch.setattr(s3_module, "_BOTO", BotoConfig(retries={"total_max_attempts": 2, "mode": "standard"}))
    sim = simulator(latency=0.05, fill="tone")
    outage = threading.Event()
    tried = []

    def staging_down(method, path, authorized):
        if method == "PUT" and path.startswith("/stage/") and outage.is_set():
            tried.append(path)
            return 500, "InternalError"
        return None

    proxy = fault_proxy(staging_down)
    twelve = twelve_rows(library)
    knobs = {"limits.concurrency": 3, "limits.requests_per_minute": 6000}
    cfg = hosted_config(sim, proxy.endpoint, str(library / "outputs"), library / "runs", **knobs)

    outcomes = []  # the first two rows staged before the outage, the others during it
    batch = Batch(load_manifest(twelve), cfg, "bucket-down")
    try:
        for i, edit in enumerate(batch.manifest.edits):
            if i == 2:
                outage.set()
            outcomes.append(batch.process(edit))
    finally:
        batch.close()
    assert [o.status for o in outcomes] == ["succeeded"] * 2 + ["failed"] * 10
    assert all(o.error.startswith("Cannot write s3://stage/clips/bucket-down/") for o in outcomes[2:5])
    not_sent = (
        "Not sent: the last 3 clips sent to the staging bucket (s3://stage/clips/) all came to nothing, the last "
        f"one with: {outcomes[4].error.rstrip('.')}; no more are sent this run: run it again with --run-id "
        "bucket-down once the staging bucket answers."
    )
    assert [o.error for o in outcomes[5:]] == [not_sent] * 7
    assert len(tried) == 3 * 2  # three rows' uploads, each tried twice; none after
    assert sim.stats.creates == 2 and all(o.cost_usd == 0 for o in outcomes[2:])
    staged = [e["row"] for e in read_events(library / "runs" / "bucket-down") if e["event"] == "staged"]
    assert staged == ["r1", "r2", "r3", "r4", "r5"]  # the rows not sent did not even make their clip

    outage.clear()
    again = process_all(twelve, cfg, "bucket-down")
    assert [o.status for o in again] == ["skipped_done"] * 2 + ["succeeded"] * 10, [o.error for o in again]
    assert sim.stats.creates == 12  # the two made before, kept; the ten others made now


@pytest.mark.parametrize(
    ("provider", "display", "status"),
    [("eachlabs", "Each Labs", 402), ("stability", "Stability AI", 402), ("fal", "fal", 403)],
)
def test_an_account_out_of_credit_is_sent_no_more_and_the_rerun_after_a_top_up_does_the_rest(
    library, aws_env, simulator, monkeypatch, provider, display, status
):
    # The account's credit covers five predictions. Each service refuses a create past it as
    # the account's, not the row's (Each Labs and Stability AI: 402; fal: 403 "User is
    # locked. Reason: Exhausted balance"): once three rows in a row (limits.concurrency)
    # have met it, the rows left are not sent, saying what to do, and cost nothing; the
    # rerun, once the account is topped up, does them.
    for name in ("EACHLABS_API_KEY", "STABILITY_API_KEY", "FAL_KEY"):
        monkeypatch.setenv(name, KEY)
    sim = simulator(latency=0.05, fill="tone", balance=1.00)
    twelve = twelve_rows(library)
    knobs = {"provider.name": provider, "limits.concurrency": 3, "limits.requests_per_minute": 6000}
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "outputs"), library / "runs", **knobs)

    outcomes = process_all(twelve, cfg, "credit")
    assert [o.status for o in outcomes] == ["succeeded"] * 5 + ["failed"] * 7
    for o in outcomes[5:8]:
        assert o.error.startswith(f"{display[0].upper()}{display[1:]} refused the create: HTTP {status} "), o.error
        assert o.error.endswith("(the account is out of credit: top it up)."), o.error
        assert "check the API key" not in o.error
    last = display + outcomes[7].error.rstrip(".")[len(display) :]  # as the provider's sentence began
    not_sent = (
        f"Not sent to {display}: the last 3 creates to it all came to nothing, the last one with: "
        f"{last}; no more are sent this run: run it again with --run-id credit once "
        "the account has credit again."
    )
    assert [o.error for o in outcomes[8:]] == [not_sent] * 4
    assert sim.stats.creates == 8 and sim.stats.out_of_credit == 3  # none sent after the third refusal
    assert all(o.cost_usd == 0 for o in outcomes[5:]) and sum(o.cost_usd for o in outcomes) == pytest.approx(1.00)
    assert sim.billed() == pytest.approx(1.00)

    sim.top_up(2.00)
    again = process_all(twelve, cfg, "credit")
    assert [o.status for o in again] == ["skipped_done"] * 5 + ["succeeded"] * 7, [o.error for o in again]
    assert sim.stats.creates == 15 and sim.billed() == pytest.approx(12 * PRICE)


def test_rows_waiting_their_turn_at_the_rate_limit_are_not_sent_once_the_account_is_out_of_credit(
    library, aws_env, simulator, monkeypatch
):
    # Rows side by side, as the flow runs them, at 60 creates a minute: rows that took their
    # place in the queue for the rate limit before the third refusal came were sent all the
    # same when their turn came, and refused too (here 5 refusals where 3 end it).
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone", balance=0.40)
    twelve = twelve_rows(library)
    knobs = {"limits.concurrency": 3, "limits.requests_per_minute": 60}
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "outputs"), library / "runs", **knobs)
    batch = Batch(load_manifest(twelve), cfg, "queued")
    try:
        with ThreadPoolExecutor(max_workers=6) as rows:  # twice limits.concurrency, as the flow
            outcomes = list(rows.map(batch.process, batch.manifest.edits))
    finally:
        batch.close()
    assert [o.status for o in outcomes].count("succeeded") == 2  # the credit's two predictions
    assert sim.stats.out_of_credit == 3  # none sent after the third refusal
    not_sent = [o for o in outcomes if o.error.startswith("Not sent to Each Labs")]
    assert len(not_sent) == 7 and all(o.cost_usd == 0 for o in not_sent)


def test_only_the_accounts_refusals_count_against_every_row():
    from soundpatch.providers.hosted import ACCOUNT_LOCKED, OUT_OF_CREDIT, account_problem

    assert account_problem(402, "") == OUT_OF_CREDIT
    assert account_problem(403, "User is locked. Reason: Exhausted balance. Top up your balance") == OUT_OF_CREDIT
    assert account_problem(401, "Your credit balance is too low") == OUT_OF_CREDIT
    assert account_problem(401, "Invalid or missing API key") == "check the API key"
    assert account_problem(403, "forbidden") == "check the API key"
    # Held by the provider: a new key will not help, its support will.
    assert account_problem(403, "User is locked. Reason: Admin lock") == ACCOUNT_LOCKED
    assert account_problem(401, "This account has been suspended") == ACCOUNT_LOCKED
    # A 400 is the row's, whatever its words: it may quote the prompt.
    assert account_problem(400, "prompt 'fix the stereo balance, no credits roll' is too long") is None
    assert account_problem(422, "seed must be below 4294967296") is None
    # Stability AI's 403 for a prompt its moderation flags is the row's, not the key's.
    assert account_problem(403, "content_moderation: Your request was flagged by our content moderation system") is None


def test_a_wrong_key_fails_at_once_and_is_never_echoed(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", "sk-wrong-000111")
    sim = simulator(api_key=KEY)
    [o], _ = run_batch(library, sim, aws_env, manifest=single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,"))
    assert o.status == "failed" and "HTTP 401" in o.error and "check the API key" in o.error
    assert "sk-wrong-000111" not in o.error
    assert o.attempts == 1 and sim.stats.creates == 1 and o.cost_usd == 0

    # The key mended, the run goes on: the row's outcome counts every create it sent, in
    # this attempt and the one before, as its cost counts all it paid (it said 1).
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    [o], _ = run_batch(library, sim, aws_env, manifest=single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,"))
    assert o.status == "succeeded", o.error
    assert o.attempts == 2 and sim.stats.creates == 2 and o.cost_usd == pytest.approx(PRICE)


def test_a_request_the_provider_refuses_fails_with_its_message(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(max_seconds=10)  # this "provider" takes at most 10 s clips
    [o], _ = run_batch(library, sim, aws_env, manifest=single(library, "loop,audio/loop.wav,10,14.5,stab,1,"))
    assert o.status == "failed" and "HTTP 400" in o.error and "between 6 and 10" in o.error
    assert o.attempts == 1 and o.cost_usd == 0


def test_a_failed_prediction_fails_the_row_with_the_providers_reason(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(fail_rate=1.0)
    [o], batch = run_batch(library, sim, aws_env, manifest=single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,"))
    assert o.status == "failed" and "simulated failure" in o.error and o.prediction_id
    assert o.cost_usd == 0 and batch.ledger.spent_usd == 0  # the provider says it cost nothing


def test_a_prediction_past_its_deadline_is_cancelled_and_counted(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=60)
    [o], _ = run_batch(
        library, sim, aws_env, manifest=single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,"), deadline_seconds=1.0
    )
    assert o.status == "failed" and "was cancelled" in o.error
    assert sim.get(KEY, o.prediction_id)[1]["status"] == "cancelled"
    assert o.cost_usd == pytest.approx(PRICE)  # in doubt: kept as spent


def test_truncated_downloads_are_retried(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    sim = simulator(latency=0.05, fill="tone", truncate_rate=1.0)
    [o], _ = run_batch(library, sim, aws_env, manifest=name, max_retries=2)
    assert o.status == "failed" and "truncated" in o.error
    assert o.cost_usd == pytest.approx(PRICE) and sim.stats.accepted == 1  # paid once, not recreated
    flaky = simulator(latency=0.05, fill="tone", truncate_rate=0.5, seed=3)
    [o], _ = run_batch(library, flaky, aws_env, manifest=name, run_id="flaky")
    assert o.status == "succeeded" and flaky.stats.downloads > 1 and flaky.stats.accepted == 1


def test_a_poll_answered_with_a_gateway_page_is_asked_again_and_its_prediction_stays_owed(
    library, aws_env, simulator, monkeypatch
):
    # A status poll answered 200 with an HTML page (a gateway's, not the service's JSON).
    # Polls are free, so it is asked again. It used to fail the row with the prediction
    # made and billed and the reservation handed back: the report said $0, the budget let
    # one more through, and a rerun created the prediction again.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.3, fill="tone", garbled_poll_rate=0.5, seed=2)
    outcomes, batch = run_batch(library, sim, aws_env)
    for o in outcomes:
        assert_result_is_right(library, aws_env, o, 35)
        assert o.cost_usd == pytest.approx(PRICE)
    assert sim.stats.garbled_polls > 0 and sim.stats.accepted == 4
    retries = [e for e in read_events(batch.run_dir) if e["event"] == "poll_retry"]
    assert any("not JSON" in e.get("reason", "") for e in retries)

    # Nothing but such pages until the deadline: cancelled, and counted as spent.
    forever = simulator(latency=0.3, fill="tone", garbled_poll_rate=1.0)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    [o], batch = run_batch(library, forever, aws_env, manifest=name, run_id="pages", deadline_seconds=1.5)
    assert o.status == "failed" and "was not done after 1.5 s" in o.error, o.error
    assert o.cost_usd == pytest.approx(PRICE) and batch.ledger.spent_usd == pytest.approx(PRICE)
    assert forever.stats.accepted == 1


def test_a_create_answered_with_a_gateway_page_is_in_doubt_not_refused(library, aws_env, simulator, monkeypatch):
    # The create went through and was made (billed once done); what came back was a
    # gateway's page with a 200. It may exist: counted as spent, and neither this run nor
    # its rerun sends it again. It used to count as refused: $0 on the row, sent again.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone", garbled_create_rate=1.0)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    [o], batch = run_batch(library, sim, aws_env, manifest=name, run_id="page")
    assert o.status == "failed", o.error
    assert "The create request to Each Labs was taken but its answer could not be read" in o.error
    assert "counted as spent" in o.error and sim.stats.garbled_creates == 1 and sim.stats.accepted == 1
    assert o.cost_usd == pytest.approx(PRICE) and batch.ledger.spent_usd == pytest.approx(PRICE)

    sim.settings.garbled_create_rate = 0.0
    [o], batch = run_batch(library, sim, aws_env, manifest=name, run_id="page")
    assert o.status == "failed" and "counted as spent" in o.error and sim.stats.accepted == 1
    assert o.cost_usd == pytest.approx(PRICE)
    # Billed if the "model" fetched its clip before the failed row removed it: never more
    # than the row shows.
    assert sim.billed() <= o.cost_usd + 1e-9


def test_a_result_that_would_not_download_is_collected_by_the_rerun_not_paid_again(
    library, aws_env, simulator, monkeypatch
):
    # The provider made it and billed it; every download of it broke off. The rerun of the
    # run polls the same prediction and downloads it again: no second create, no second
    # charge, and it needs no budget left (the money is on the row already).
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    sim = simulator(latency=0.05, fill="tone", truncate_rate=1.0)
    [o], batch = run_batch(library, sim, aws_env, manifest=name, run_id="cut", max_retries=1)
    assert o.status == "failed" and "truncated" in o.error
    assert o.error.endswith(
        "the paid prediction is kept, and rerunning with --run-id cut tries it again at no new cost."
    )
    assert o.cost_usd == pytest.approx(PRICE) and sim.stats.accepted == 1 and batch.ledger.spent_usd == PRICE
    assert "1 row (fx) failed using a prediction already paid for; it is kept, and rerunning with --run-id cut" in (
        " ".join(batch.notes())
    )

    sim.settings.truncate_rate = 0.0
    cfg = eachlabs_config(library, sim, aws_env)
    cfg.limits.budget_usd = PRICE  # all of it spent by the first attempt
    again = Batch(load_manifest(library / name), cfg, "cut")
    estimate = again.estimate(again.manifest.edits)  # nothing new to pay for: the dry run says so
    assert (estimate["predictions"], estimate["to_collect"], estimate["spent_before_usd"]) == (0, 1, PRICE)
    try:
        [o] = [again.process(e) for e in again.manifest.edits]
    finally:
        again.close()
    assert_result_is_right(library, aws_env, o, 35)
    assert o.cost_usd == pytest.approx(PRICE) and o.provider_cost_usd == pytest.approx(PRICE)
    assert sim.stats.accepted == 1 and sim.billed() == pytest.approx(PRICE)
    assert again.ledger.spent_usd == pytest.approx(PRICE)


def test_a_result_on_a_host_that_cannot_be_reached_says_why_and_is_collected_later(
    library, aws_env, simulator, monkeypatch
):
    # The result is said to be on a host nothing listens at (a CDN out of reach from here):
    # the row says so, not "truncated or broke off (ConnectError)", and keeps what it paid.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    sim = simulator(latency=0.05, fill="tone", results_url=f"http://127.0.0.1:{port}")
    [o], _ = run_batch(library, sim, aws_env, manifest=name, run_id="cdn", max_retries=1)
    assert o.status == "failed" and o.cost_usd == pytest.approx(PRICE) and o.attempts == 1
    assert (
        o.error.startswith(f"Could not download the result: cannot connect to http://127.0.0.1:{port}/files/")
        and "(the connection was refused: nothing listens at that address and port)" in o.error
    )
    assert "the paid prediction is kept" in o.error

    sim.settings.results_url = None  # reachable again
    [o], _ = run_batch(library, sim, aws_env, manifest=name, run_id="cdn", max_retries=1)
    assert_result_is_right(library, aws_env, o, 35)
    assert sim.stats.accepted == 1 and sim.billed() == pytest.approx(PRICE)


def test_a_result_on_a_host_whose_certificate_is_not_trusted_is_not_fetched_again_and_again(
    library, aws_env, simulator, monkeypatch, tmp_path
):
    # The result's host (a CDN behind a proxy that inspects TLS) shows a certificate from a
    # CA this machine does not know. That does not mend in seconds: the row says so and what
    # to set after one handshake (it tried six times, with backoff), and keeps what it paid.
    import trustme

    from tests.test_storage import serve

    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    (tmp_path / "cdn").mkdir()
    cdn, base = serve(tmp_path / "cdn", ca=trustme.CA())
    handshakes = []
    accept = cdn.get_request
    cdn.get_request = lambda: handshakes.append(1) or accept()
    try:
        sim = simulator(latency=0.05, fill="tone", results_url=base)
        [o], _ = run_batch(library, sim, aws_env, manifest=name, run_id="cdn")
    finally:
        cdn.shutdown()
        cdn.server_close()
    assert o.status == "failed" and o.cost_usd == pytest.approx(PRICE), o.error
    assert o.error.startswith(f"Could not download the result: cannot connect to {base}/files/")
    assert "its TLS certificate is not trusted here" in o.error and "set SSL_CERT_FILE to its CA bundle" in o.error
    assert "the paid prediction is kept" in o.error
    assert len(handshakes) == 1

    sim.settings.results_url = None  # served from where it can be trusted
    [o], _ = run_batch(library, sim, aws_env, manifest=name, run_id="cdn")
    assert_result_is_right(library, aws_env, o, 35)
    assert sim.stats.accepted == 1 and sim.billed() == pytest.approx(PRICE)


@pytest.mark.parametrize("stage", ["_download", "keep_answer", "recover_region", "splice"])
def test_an_unexpected_error_with_a_paid_result_keeps_its_cost_and_the_rerun_collects_it(
    library, aws_env, simulator, monkeypatch, stage
):
    # Not a RowError: a bug or an environment fault after the prediction was paid for must
    # not hand the reservation back (the budget would then allow one more than it should),
    # and must not lose what was paid for: once the fault is gone (a fix, a mended disk),
    # the rerun finishes the row from the kept answer, or polls the prediction again.
    from soundpatch import audio
    from soundpatch.providers import eachlabs, hosted
    from soundpatch.purchase import Purchases

    def broken(*args, **kwargs):
        raise OSError("simulated fault")

    with monkeypatch.context() as m:
        if stage == "_download":
            m.setattr(eachlabs.EachLabs, "_download", broken)
        elif stage == "keep_answer":  # a fault past the disk's own errors, keeping the answer
            m.setattr(Purchases, "_keep_answer", broken)
        elif stage == "recover_region":
            m.setattr(hosted, "recover_region", broken)  # every hosted provider's answer
        else:
            m.setattr(audio, "patch", broken)  # soundpatch's own work on it, after the provider's
        monkeypatch.setenv("EACHLABS_API_KEY", KEY)
        sim = simulator(latency=0.05, fill="tone")
        name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
        [o], batch = run_batch(library, sim, aws_env, manifest=name)
    assert o.status == "failed" and "simulated fault" in o.error
    assert ("Unexpected OSError" if stage == "splice" else "could not be used") in o.error
    assert "the paid prediction is kept" in o.error
    assert o.cost_usd == pytest.approx(PRICE) and batch.ledger.spent_usd == pytest.approx(PRICE)
    assert sim.stats.accepted == 1
    answers = library / "runs" / "t" / "answers"
    kept_answer = stage in ("recover_region", "splice")  # the answer was on disk when it failed
    assert len(list(answers.glob("*.answer"))) == kept_answer
    downloads = sim.stats.downloads

    [o], batch = run_batch(library, sim, aws_env, manifest=name)
    assert_result_is_right(library, aws_env, o, 35)
    assert o.cost_usd == pytest.approx(PRICE) and batch.ledger.spent_usd == pytest.approx(PRICE)
    assert sim.stats.accepted == 1 and sim.billed() == pytest.approx(PRICE)
    assert sim.stats.downloads == downloads + (not kept_answer)  # the kept answer is used as it is
    assert list(answers.glob("*.answer")) == []


def test_a_paid_result_that_fails_again_says_how_to_pay_for_a_new_one(library, aws_env, simulator, monkeypatch):
    # A result soundpatch cannot use, whatever it tries: each rerun tries the same paid
    # answer again for nothing, and says how to give it up; provider.resubmit_unusable
    # does, paying once more (both prices stay on the row).
    from soundpatch.providers import hosted

    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator(latency=0.05, fill="tone")
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    with monkeypatch.context() as m:
        m.setattr(hosted, "decode_result", lambda data: (_ for _ in ()).throw(ValueError("not audio")))
        [first], _ = run_batch(library, sim, aws_env, manifest=name)
        [second], batch = run_batch(library, sim, aws_env, manifest=name)
    assert "could not be used (ValueError: not audio)" in first.error and "resubmit_unusable" not in first.error
    assert second.status == "failed" and second.error.endswith(
        "tries it again at no new cost (provider.resubmit_unusable: true pays for a new one instead)."
    )
    assert second.cost_usd == pytest.approx(PRICE) and sim.stats.accepted == 1

    [third], batch = run_batch(library, sim, aws_env, manifest=name, resubmit_unusable=True)
    assert_result_is_right(library, aws_env, third, 35)
    assert sim.stats.accepted == 2 and third.cost_usd == pytest.approx(2 * PRICE)
    assert batch.ledger.spent_usd == pytest.approx(2 * PRICE)
    kinds = [e["event"] for e in read_events(batch.run_dir)]
    assert kinds.count("set_aside") == 1


def test_a_paid_result_that_arrives_damaged_is_fetched_again_not_paid_again(library, aws_env, simulator, monkeypatch):
    # A download can arrive whole and still be damaged (a faulty cache or proxy: the right
    # length, the wrong bytes). It is fetched once more before the row fails; and a rerun
    # whose kept answer is the damaged copy fetches the prediction again by its id, instead
    # of failing on the same bytes until provider.resubmit_unusable pays for a new one.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    name = single(library, "fx,audio/fx.wav,1.2,1.65,clang,1,")
    sim = simulator(latency=0.05, fill="tone", corrupt_rate=1.0)
    [o], _ = run_batch(library, sim, aws_env, manifest=name, run_id="zeros")
    assert o.status == "failed" and "not audio that can be decoded" in o.error, o.error
    assert "the paid prediction is kept" in o.error
    assert (sim.stats.downloads, sim.stats.corrupted) == (2, 2)  # fetched once more: damaged again
    assert o.cost_usd == pytest.approx(PRICE) and sim.stats.accepted == 1

    sim.settings.corrupt_rate = 0.0
    [o], batch = run_batch(library, sim, aws_env, manifest=name, run_id="zeros")
    assert_result_is_right(library, aws_env, o, 35)
    assert o.cost_usd == pytest.approx(PRICE) and batch.ledger.spent_usd == pytest.approx(PRICE)
    assert sim.stats.accepted == 1 and sim.stats.downloads == 3 and sim.billed() == pytest.approx(PRICE)
    assert list((library / "runs" / "zeros" / "answers").glob("*.answer")) == []

    # Damaged once, then whole: the row succeeds in its first attempt, on one create.
    served = sim.file

    def damaged_once(file_name: str):
        status, data, length = served(file_name)
        return (status, bytes(len(data)), length) if sim.stats.downloads == 4 else (status, data, length)

    monkeypatch.setattr(sim, "file", damaged_once)
    name = single(library, "fx2,audio/fx.wav,1.2,1.65,clang,2,")
    [o], batch = run_batch(library, sim, aws_env, manifest=name, run_id="zeros-once")
    assert_result_is_right(library, aws_env, o, 35)
    assert o.cost_usd == pytest.approx(PRICE) and o.attempts == 1
    assert sim.stats.accepted == 2 and sim.stats.downloads == 5
    kinds = [e["event"] for e in read_events(batch.run_dir)]
    assert kinds.count("fetching_again") == 1 and kinds.count("fetched_again") == 1


def test_an_unreachable_provider_fails_rows_without_charge(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator()
    sim.stop()  # nothing listens there any more
    [o], batch = run_batch(
        library, sim, aws_env, manifest=single(library, "fx,audio/fx.wav,1.2,1.65,c,1,"), max_retries=1
    )
    assert o.status == "failed" and "cannot connect" in o.error and o.cost_usd == 0


def test_model_limits_make_rows_invalid_before_any_request(library, aws_env, simulator, monkeypatch):
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    sim = simulator()
    sf.write(library / "audio" / "long.wav", np.zeros((250 * 8000, 1), np.float32), 8000)
    (library / "limits.csv").write_text(
        "id,input,start,end,prompt,steps\n"
        "steps,audio/fx.wav,1.2,1.65,clang,9\n"
        "huge,audio/long.wav,10,210,two hundred seconds,\n"
    )
    outcomes, _ = run_batch(library, sim, aws_env, manifest="limits.csv")
    assert [o.status for o in outcomes] == ["invalid", "invalid"]
    assert "Steps 9 is outside 4..8" in outcomes[0].error and "at most 190 s" in outcomes[1].error
    assert sim.stats.creates == 0


def test_missing_key_or_staging_stops_the_run_before_it_starts(library, aws_env, simulator, monkeypatch):
    sim = simulator()
    monkeypatch.delenv("EACHLABS_API_KEY", raising=False)
    cfg = eachlabs_config(library, sim, aws_env)
    with pytest.raises(ConfigError, match="EACHLABS_API_KEY"):
        Batch(load_manifest(library / "mix.csv"), cfg, "nokey")
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    cfg.storage.staging = None
    with pytest.raises(ConfigError, match="storage.staging"):
        Batch(load_manifest(library / "mix.csv"), cfg, "nostage")
    # A dry run needs neither: it touches no provider.
    Batch(load_manifest(library / "mix.csv"), cfg, "dry", dry_run=True)


def test_a_staging_bucket_that_is_not_there_stops_the_run_before_any_row(library, aws_env, simulator, monkeypatch):
    # Said once, before the run starts: not once per row, after each row prepared its clip.
    sim = simulator()
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    cfg = eachlabs_config(library, sim, aws_env)
    cfg.storage.staging = "s3://no-such-staging/clips/"
    with pytest.raises(ConfigError, match=r"storage.staging s3://no-such-staging/clips/: bucket 'no-such-staging'"):
        Batch(load_manifest(library / "mix.csv"), cfg, "nobucket")
    assert sim.stats.creates == 0
    Batch(load_manifest(library / "mix.csv"), cfg, "dry", dry_run=True)  # a dry run touches no bucket


def test_the_simulate_command_speaks_the_protocol(tmp_path):
    """`soundpatch simulate` as users start it: create, poll, download over HTTP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sf.write(tmp_path / "clip.wav", np.zeros((6 * 44100, 2), np.float32), 44100)
    # The simulator fetches audio_url like the real service; serve the clip from loopback.
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    script = Path(sys.executable).parent / "soundpatch"
    proc = subprocess.Popen(
        [str(script), "simulate", "--port", str(port), "--latency", "0.1", "--fill", "tone", "--keep-results", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base, headers = f"http://127.0.0.1:{port}", {"X-API-Key": "k"}
    try:
        with httpx.Client(timeout=5) as client:
            wait_until(lambda: _answers(client, f"{base}/_sim/stats"))
            body = {
                "model": "stable-audio-2-5-inpaint",
                "version": "0.0.1",
                "input": {
                    "prompt": "x",
                    "audio_url": f"http://127.0.0.1:{files.server_address[1]}/clip.wav",
                    "mask_start": 2,
                    "mask_end": 3,
                    "seconds_total": 6,
                    "seed": 5,
                },
            }
            created = client.post(f"{base}/v1/prediction", json=body, headers=headers).json()
            assert created["status"] == "success"
            url = f"{base}/v1/prediction/{created['predictionID']}"
            wait_until(lambda: client.get(url, headers=headers).json()["status"] == "success")
            done = client.get(url, headers=headers).json()
            assert done["metrics"]["cost"] == pytest.approx(PRICE)
            audio, rate = sf.read(io.BytesIO(client.get(done["output"]).content), always_2d=True)
            assert rate == 44100 and audio.shape == (6 * 44100, 2)
            assert np.abs(audio[2 * 44100 : 3 * 44100]).max() > 0.2 and not np.abs(audio[: 2 * 44100]).any()
            # Results expire (--keep-results 1), so a long rehearsal's memory stays bounded;
            # the prediction itself is still known, and billed.
            time.sleep(1.2)
            client.post(f"{base}/v1/prediction", json=body, headers=headers)  # expired results go here
            assert client.get(done["output"]).status_code == 404
            assert client.get(url, headers=headers).json()["status"] == "success"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        files.shutdown()


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.ConnectError:
        return False


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_variations_of_one_clip_share_one_upload_and_leave_nothing_staged(library, aws_env, simulator, monkeypatch):
    # Bulk variation: one source and region, many prompts and seeds. The clip sent is the
    # same for all of them: uploaded once while they run at once, deleted after the last.
    monkeypatch.setenv("EACHLABS_API_KEY", KEY)
    (library / "vary.csv").write_text(
        "id,input,start,end,prompt,seed,variations\n"
        "slam,audio/loop.wav,10.0,14.5,metal door slam,5,4\n"
        "crate,audio/loop.wav,10.0,14.5,wooden crate,9,4\n"
        "other,audio/loop.wav,20.0,21.0,glass,3,1\n"  # another region: another clip
    )
    sim = simulator(latency=0.3, fill="tone")
    batch = Batch(load_manifest(library / "vary.csv"), eachlabs_config(library, sim, aws_env), "vary")
    try:
        with ThreadPoolExecutor(9) as pool:
            outcomes = list(pool.map(batch.process, batch.manifest.edits))
    finally:
        batch.close()
    for o in outcomes:
        assert_result_is_right(library, aws_env, o, 35)
    assert sim.stats.accepted == 9 and sim.stats.max_in_flight > 1
    staged = {url.split("?", 1)[0] for url in sim.stats.audio_urls}
    assert len(staged) == 2, staged  # one upload per distinct clip, not one per row
    assert aws_env.keys("stage", "clips/vary/") == []
