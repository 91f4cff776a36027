"""Inputs from and outputs to S3-compatible storage and the web, and never paying twice.

Every S3 call goes to a real S3-compatible server process (moto's server mode) over HTTP
on loopback; hosted predictions go to the provider simulator over HTTP; https inputs
come from a real HTTP server on loopback.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import random
import re
import socket
import ssl
import threading
import unicodedata
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import trustme

from soundpatch import storage
from soundpatch.batch import Batch
from soundpatch.config import load_config
from soundpatch.errors import ConfigError, RowError
from soundpatch.manifest import load_manifest
from soundpatch.storage import LocalFolder
from tests.jobs import clean_env, run_in_process, seeded_prefect_home, soundpatch


def wav_bytes(seconds: float, rate: int = 22050, channels: int = 1, freq: float = 220.0, subtype="PCM_16") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.2 * np.sin(2 * np.pi * freq * t)
    buf = io.BytesIO()
    sf.write(buf, np.repeat(tone[:, None], channels, axis=1), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def put(s3, bucket: str, key: str, data: bytes) -> None:
    s3.client.put_object(Bucket=s3.bucket(bucket), Key=key, Body=data)


def get(s3, uri: str) -> bytes:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def hosted(tmp_path: Path, sim, endpoint: str, **overrides):
    return load_config(
        overrides={
            "provider.name": "eachlabs",
            "provider.base_url": sim.base_url,
            "provider.poll_seconds": 0.05,
            "provider.max_poll_seconds": 0.2,
            "limits.requests_per_minute": 6000,
            "storage.s3.endpoint_url": endpoint,
            "storage.staging": "s3://stage/clips/",
            "runs_dir": str(tmp_path / "runs"),
            **overrides,
        }
    )


def run(manifest: Path, cfg, run_id: str, force: bool = False):
    batch = Batch(load_manifest(manifest), cfg, run_id, force=force)
    try:
        return [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()


def each_labs_job(tmp_path: Path, aws_env, monkeypatch, rows: str) -> None:
    """An Each Labs job on a 3 s fx.wav: manifest m.csv with `rows` (id,input,start,end,prompt),
    its key in the environment, clips staged in s3://stage/."""
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    (tmp_path / "fx.wav").write_bytes(wav_bytes(3.0))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\n" + rows)
    aws_env.bucket("stage")


def job_behind_a_bucket_policy(tmp_path: Path, aws_env, fault_proxy, monkeypatch, rows: str, bucket: str, denied):
    """An Each Labs job on fx.wav (manifest m.csv with `rows`, outputs meant for `bucket`)
    and a proxy in front of the S3 server answering 403 AccessDenied to the PUTs whose path
    `denied(path)` names, as a bucket policy denying some writes would."""
    each_labs_job(tmp_path, aws_env, monkeypatch, rows)
    aws_env.bucket(bucket)
    return fault_proxy(lambda method, path, signed: (403, "AccessDenied") if method == "PUT" and denied(path) else None)


# ---------------------------------------------------------------------- the whole job, as users run it


def test_s3_in_s3_out_with_report_in_the_bucket_and_a_second_run_spends_nothing(
    tmp_path, aws_env, simulator, tmp_path_factory
):
    archive = {f"archive/take{i}.wav": wav_bytes(3.0, freq=200 + 50 * i) for i in range(3)}
    for key, data in archive.items():
        put(aws_env, "library", key, data)
    put(aws_env, "library", "archive/nested/skip.wav", wav_bytes(3.0))  # `*` stays in its folder
    put(aws_env, "library", "archive/notes.txt", b"not matched")
    aws_env.bucket("stage")
    aws_env.bucket("results")
    prompt = 'pluie légère, 雨 — "quoted", 100%'
    (tmp_path / "job.csv").write_text(
        "input,start,end,prompt,seed\n"
        "s3://library/archive/*.wav,1.0,1.5,door slam,7\n"
        f's3://library/archive/take1.wav,0.5,0.8,"{prompt.replace(chr(34), 2 * chr(34))}",9\n'
        f's3://library/archive/take1.wav,0.5,0.8,"{prompt.replace(chr(34), 2 * chr(34))}",9\n',
        encoding="utf-8",
    )
    sim = simulator(latency=0.05, fill="tone", price=0.2)
    (tmp_path / "job.yaml").write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.05, max_poll_seconds: 0.2}}\n"
        "limits: {concurrency: 4, requests_per_minute: 6000, budget_usd: 5}\n"
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
        "output: {uri: 's3://results/edits/'}\n"
    )
    env = clean_env(
        EACHLABS_API_KEY="k",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        PREFECT_HOME=str(seeded_prefect_home(tmp_path_factory.mktemp("prefect"))),
    )

    first = soundpatch("run", "job.csv", "--config", "job.yaml", "--run-id", "one", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    report = pd.read_csv(tmp_path / "runs" / "one" / "report.csv", keep_default_na=False)
    assert len(report) == 5  # three takes from the pattern, the prompted row and its twin
    assert sorted(report["status"]) == ["skipped_done"] + ["succeeded"] * 4, report[["status", "error"]]
    assert sim.stats.accepted == 4  # the identical row was sent once
    assert report["cost_usd"].sum() == pytest.approx(0.8)
    twin = report[report["status"] == "skipped_done"].iloc[0]
    assert twin["cost_usd"] == 0 and twin["reused_from"].startswith("s3://results/edits/one/")

    keys = set(aws_env.keys("results", "edits/one/"))
    assert {"edits/one/report.csv", "edits/one/report.json", "edits/one/report.html"} <= keys
    assert all(o.startswith("s3://results/edits/one/") for o in report["output"])
    assert not any("nested" in i for i in report["input"])
    assert "report in bucket" in first.stdout

    # The prompted row's object: its metadata tells where it came from, the prompt survives.
    row = report[(report["prompt"] == prompt) & (report["status"] == "succeeded")].iloc[0]
    bucket, key = row["output"][len("s3://") :].split("/", 1)
    head = aws_env.client.head_object(Bucket=bucket, Key=key)
    meta = head["Metadata"]
    assert head["ContentType"] == "audio/wav"
    assert unquote(meta["prompt"]) == prompt
    assert meta["row_id"] == row["row_id"] and meta["seed"] == "9" and meta["provider"] == "eachlabs"
    assert meta["prediction_id"] == row["prediction_id"] and float(meta["cost_usd"]) == pytest.approx(0.2)
    assert meta["source_sha256"] == hashlib.sha256(archive["archive/take1.wav"]).hexdigest()
    assert meta["region"] == "0.5-0.8" and len(meta["identity"]) == 64

    # Outside the region, the result is the input bit for bit.
    before = sf.read(io.BytesIO(archive["archive/take1.wav"]), dtype="int16")[0]
    after = sf.read(io.BytesIO(get(aws_env, row["output"])), dtype="int16")[0]
    a, b = round(0.5 * 22050), round(0.8 * 22050)
    assert after.shape == before.shape
    assert np.array_equal(before[:a], after[:a]) and np.array_equal(before[b:], after[b:])

    # A new run id, the same manifest: nothing is sent, nothing is spent, all is there.
    second = soundpatch("run", "job.csv", "--config", "job.yaml", "--run-id", "two", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    again = pd.read_csv(tmp_path / "runs" / "two" / "report.csv", keep_default_na=False)
    assert (again["status"] == "skipped_done").all() and again["cost_usd"].sum() == 0
    assert sim.stats.creates == 4 and sim.billed() == pytest.approx(0.8)
    for uri in again["output"]:
        assert uri.startswith("s3://results/edits/two/") and get(aws_env, uri)
    assert "edits/two/report.html" in aws_env.keys("results", "edits/two/")

    # The estimate knows too: nothing left to pay for.
    est = soundpatch("validate", "job.csv", "--config", "job.yaml", cwd=tmp_path, env=env)
    assert "already done" in est.stdout and "$0.00" in est.stdout, est.stdout


def test_output_store_problems_stop_the_run_before_it_starts(tmp_path, aws_env, tmp_path_factory):
    (tmp_path / "in.wav").write_bytes(wav_bytes(2.0))
    (tmp_path / "job.csv").write_text("input,start,end,prompt\nin.wav,0.5,1,fill\n")
    env = clean_env(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_EC2_METADATA_DISABLED="true",
        PREFECT_HOME=str(seeded_prefect_home(tmp_path_factory.mktemp("prefect"))),
    )

    (tmp_path / "missing.yaml").write_text(
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}}}\noutput: {{uri: 's3://no-such-results/x/'}}\n"
    )
    proc = soundpatch("run", "job.csv", "--config", "missing.yaml", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bucket 'no-such-results' does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # once for the run, not once per row

    no_keys = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    no_keys["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    no_keys["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    (tmp_path / "ok.yaml").write_text(
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}}}\n"
        f"output: {{uri: 's3://{aws_env.bucket('present')}/x/'}}\n"
    )
    proc = soundpatch("run", "job.csv", "--config", "ok.yaml", cwd=tmp_path, env=no_keys)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no S3 credentials found" in proc.stderr and "s3://present/x/" in proc.stderr

    # A bucket left out says which key and how to write it ("s3:// names no bucket", before).
    (tmp_path / "nameless.yaml").write_text("output: {uri: 's3:///x/'}\n")
    proc = soundpatch("validate", "job.csv", "--config", "nameless.yaml", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = "error: output.uri 's3:///x/' names no bucket; write it as s3://bucket/prefix/."
    assert proc.stderr.strip() == said, proc.stderr


def test_wrong_credentials_are_named_as_such(tmp_path, s3_server_checking_keys, tmp_path_factory, monkeypatch):
    server = s3_server_checking_keys
    (tmp_path / "in.wav").write_bytes(wav_bytes(2.0))
    (tmp_path / "job.csv").write_text("input,start,end,prompt\nin.wav,0.5,1,fill\n")
    (tmp_path / "c.yaml").write_text(
        f"storage: {{s3: {{endpoint_url: '{server.endpoint}'}}}}\noutput: {{uri: 's3://results/x/'}}\n"
    )
    env = clean_env(
        AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG",
        AWS_SECRET_ACCESS_KEY="wrong",
        PREFECT_HOME=str(seeded_prefect_home(tmp_path_factory.mktemp("prefect"))),
    )
    proc = soundpatch("run", "job.csv", "--config", "c.yaml", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "access denied to bucket 'results'" in proc.stderr and "check the credentials" in proc.stderr

    # Reading inputs with them: each row says so (and the bucket is not asked again per row).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    rows = "".join(f"s3://lib/{i}.wav,0,1,p\n" for i in range(3))
    (tmp_path / "m.csv").write_text("input,start,end,prompt\n" + rows)
    cfg = load_config(overrides={"storage.s3.endpoint_url": server.endpoint, "runs_dir": str(tmp_path / "runs")})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "v", dry_run=True)
    est = batch.estimate(batch.manifest.edits)
    assert est["invalid"] == 3
    assert all("credentials are not valid" in reason and "InvalidAccessKeyId" in reason for *_, reason in est["errors"])


# ---------------------------------------------------------------------- in process


def test_a_failed_upload_keeps_the_paid_result_and_the_next_run_publishes_it_free(
    tmp_path, aws_env, simulator, fault_proxy, monkeypatch
):
    # A bucket policy that lets the staging and index through but denies result writes.
    rows = "a,fx.wav,1,1.5,slam\nb,fx.wav,2,2.5,creak\n"
    denied = lambda path: "/results/out/" in path and ".wav" in path  # noqa: E731
    deny = job_behind_a_bucket_policy(tmp_path, aws_env, fault_proxy, monkeypatch, rows, "results", denied)
    sim = simulator(latency=0.05, fill="tone", price=0.2)

    cfg = hosted(tmp_path, sim, deny.endpoint, **{"output.uri": "s3://results/out/"})
    outcomes = run(tmp_path / "m.csv", cfg, "denied")
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert sim.stats.accepted == 2 and deny.faults >= 2
    for o in outcomes:
        assert "access denied" in o.error and "paid result is kept at" in o.error, o.error
        assert o.cost_usd == pytest.approx(0.2)
    kept = sorted((tmp_path / "runs" / "denied" / "unpublished").rglob("*.wav"))
    assert len(kept) == 2

    cfg = hosted(tmp_path, sim, aws_env.endpoint, **{"output.uri": "s3://results/out/"})
    outcomes = run(tmp_path / "m.csv", cfg, "later")
    assert [o.status for o in outcomes] == ["skipped_done", "skipped_done"], [o.error for o in outcomes]
    assert [o.cost_usd for o in outcomes] == [0, 0] and sim.stats.creates == 2
    for o, path in zip(outcomes, kept, strict=True):
        assert o.reused_from == str(path)
        assert get(aws_env, o.output) == path.read_bytes()


def test_a_result_the_output_folder_cannot_take_is_kept_and_the_next_run_publishes_it_free(
    tmp_path, aws_env, simulator, monkeypatch
):
    # A folder where the result should go (or a full disk, a lost mount): the paid result
    # is kept in the run's folder, not lost to "Unexpected OSError".
    each_labs_job(tmp_path, aws_env, monkeypatch, "a,fx.wav,1,1.5,a latch in a folder's way\n")
    sim = simulator(latency=0.05, fill="tone", price=0.2)
    out = {"output.uri": str(tmp_path / "out")}
    (tmp_path / "out" / "blocked" / "fx-a.wav").mkdir(parents=True)  # in the way of the result
    [o] = run(tmp_path / "m.csv", hosted(tmp_path, sim, aws_env.endpoint, **out), "blocked")
    assert o.status == "failed" and o.cost_usd == pytest.approx(0.2) and sim.stats.creates == 1, o.error
    assert o.error.startswith(f"{tmp_path / 'out' / 'blocked' / 'fx-a.wav'} could not be written (Is a directory)")
    assert "the paid result is kept at" in o.error and "Unexpected" not in o.error
    [kept] = (tmp_path / "runs" / "blocked" / "unpublished").rglob("*.wav")

    [again] = run(tmp_path / "m.csv", hosted(tmp_path, sim, aws_env.endpoint, **out), "later")
    assert again.status == "skipped_done" and again.cost_usd == 0 and sim.stats.creates == 1
    assert again.reused_from == str(kept)
    assert Path(again.output).read_bytes() == kept.read_bytes()

    # When the run's own folder cannot take it either, the paid answer is kept instead,
    # and the rerun makes the result from it once the folder is mended (paid anew with
    # --force: the result above would be reused otherwise).
    (tmp_path / "out" / "lost" / "fx-a.wav").mkdir(parents=True)
    (tmp_path / "runs" / "lost" / "unpublished" / "lost" / "fx-a.wav").mkdir(parents=True)
    [lost] = run(tmp_path / "m.csv", hosted(tmp_path, sim, aws_env.endpoint, **out), "lost", force=True)
    assert lost.status == "failed" and lost.cost_usd == pytest.approx(0.2) and sim.stats.creates == 2
    assert "; keeping the result here failed too (" in lost.error
    assert lost.error.endswith(
        "the paid prediction is kept, and rerunning with --run-id lost tries it again at no new cost."
    )
    (tmp_path / "out" / "lost" / "fx-a.wav").rmdir()
    [mended] = run(tmp_path / "m.csv", hosted(tmp_path, sim, aws_env.endpoint, **out), "lost", force=True)
    assert mended.status == "succeeded" and mended.cost_usd == pytest.approx(0.2), mended.error
    assert sim.stats.creates == 2 and sim.billed() == pytest.approx(0.4)
    assert (tmp_path / "out" / "lost" / "fx-a.wav").is_file()


def test_a_create_is_not_sent_while_the_bucket_refuses_the_journal_s_copy(
    tmp_path, aws_env, simulator, fault_proxy, monkeypatch
):
    # Another machine resuming the run would not know of a create the copy does not name.
    rows = "a,fx.wav,1,1.5,a creak no one has asked for\n"
    denied = lambda path: "/.soundpatch/runs/" in path and "/rows/" in path  # noqa: E731
    deny = job_behind_a_bucket_policy(tmp_path, aws_env, fault_proxy, monkeypatch, rows, "copyless", denied)
    sim = simulator(latency=0.05, fill="tone")
    cfg = hosted(tmp_path, sim, deny.endpoint, **{"output.uri": "s3://copyless/out/"})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "refused")
    try:
        [outcome] = [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()
    assert outcome.status == "failed" and outcome.cost_usd == 0 and sim.stats.creates == 0
    assert "journal could not be copied to the bucket before the create, so nothing was sent" in outcome.error
    assert "access denied" in outcome.error
    [note] = [n for n in batch.notes() if "copy in the bucket could not be written" in n]
    assert "a rerun on this machine is not affected" in note


def test_a_create_is_not_sent_while_the_bucket_refuses_the_edit_s_claim(
    tmp_path, aws_env, simulator, fault_proxy, monkeypatch
):
    # A run on another machine making the same edit at the same time would not see it claimed.
    rows = "a,fx.wav,1,1.5,a hinge no one has oiled\n"
    denied = lambda path: "/.soundpatch/claims/" in path  # noqa: E731
    deny = job_behind_a_bucket_policy(tmp_path, aws_env, fault_proxy, monkeypatch, rows, "claimless", denied)
    sim = simulator(latency=0.05, fill="tone")
    cfg = hosted(tmp_path, sim, deny.endpoint, **{"output.uri": "s3://claimless/out/"})
    [outcome] = run(tmp_path / "m.csv", cfg, "unclaimed")
    assert outcome.status == "failed" and outcome.cost_usd == 0 and sim.stats.creates == 0
    assert outcome.error.startswith("The edit could not be claimed in the output bucket before the create, so nothing")
    assert "access denied" in outcome.error


def test_the_journal_s_copy_is_written_when_money_moves_and_ends_as_the_run_s_journal(
    tmp_path, aws_env, simulator, fault_proxy, monkeypatch
):
    each_labs_job(tmp_path, aws_env, monkeypatch, "a,fx.wav,1,1.5,steam hiss\nb,fx.wav,2,2.5,wire hum\n")
    aws_env.bucket("copied")
    puts: list[str] = []
    proxy = fault_proxy(lambda method, path, signed: puts.append(path) if method == "PUT" else None)  # passes all
    sim = simulator(latency=0.05, fill="tone")
    for provider, run_id in (("eachlabs", "paid"), ("local", "free")):
        cfg = hosted(tmp_path, sim, proxy.endpoint, **{"output.uri": "s3://copied/out/", "provider.name": provider})
        assert {o.status for o in run(tmp_path / "m.csv", cfg, run_id)} == {"succeeded"}
    # A create about to go out, its prediction id, the outcome: three copies a paid row.
    copies = [path.split("/rows/")[1].split("/")[0] for path in puts if "/paid/rows/" in path]
    assert sorted(copies) == ["a"] * 3 + ["b"] * 3
    assert not any("/free/rows/" in path for path in puts)  # the local engine spends nothing
    # And one claim of its edit a paid row (edit_claims.py), written again to name its
    # prediction once created, let go as it ended; none for the local engine.
    claims = [path for path in puts if "/.soundpatch/claims/" in path]
    assert len(claims) == 4 and len(set(claims)) == 2
    assert aws_env.keys("copied", "out/.soundpatch/claims/") == []
    # Once each run ended, its whole journal replaced its rows' copies.
    runs = "out/.soundpatch/runs/"
    assert aws_env.keys("copied", runs) == [f"{runs}free/journal.jsonl", f"{runs}paid/journal.jsonl"]
    copy = get(aws_env, f"s3://copied/{runs}paid/journal.jsonl")
    assert copy == (tmp_path / "runs" / "paid" / "journal.jsonl").read_bytes()


def test_the_report_of_a_run_made_on_another_machine_is_rendered_from_the_journal_s_copy(
    tmp_path, aws_env, simulator, monkeypatch
):
    each_labs_job(tmp_path, aws_env, monkeypatch, "a,fx.wav,1,1.5,a far gong\nb,fx.wav,2,2.5,a near gong\n")
    aws_env.bucket("worked")
    sim = simulator(latency=0.05, fill="tone")
    cfg = hosted(tmp_path, sim, aws_env.endpoint, **{"output.uri": "s3://worked/out/"})
    assert {o.status for o in run(tmp_path / "m.csv", cfg, "on-a-worker")} == {"succeeded"}
    # On a laptop: no runs/ of that run, the same config.
    (tmp_path / "laptop.yaml").write_text(
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}}}\noutput: {{uri: 's3://worked/out/'}}\n"
        "runs_dir: laptop-runs\n"
    )
    env = clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    made_there = b"<html>the worker's report, its cards' pictures drawn there</html>"
    aws_env.client.put_object(Bucket="worked", Key="out/on-a-worker/report.html", Body=made_there)
    shown = soundpatch("report", "on-a-worker", "--config", "laptop.yaml", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "the report is made from its copy in the bucket" in shown.stdout
    table = pd.read_csv(tmp_path / "laptop-runs" / "on-a-worker" / "report.csv")
    assert list(table["row_id"]) == ["a", "b"] and list(table["status"]) == ["succeeded"] * 2
    assert table["cost_usd"].sum() == pytest.approx(0.4)
    assert not (tmp_path / "laptop-runs" / "on-a-worker" / "journal.jsonl").exists()  # read, never taken as its own
    assert get(aws_env, "s3://worked/out/on-a-worker/report.html") == made_there  # its cards' pictures stay

    nowhere = soundpatch("report", "never-ran", "--config", "laptop.yaml", cwd=tmp_path, env=env)
    assert nowhere.returncode == 2 and "No run 'never-ran' in laptop-runs" in nowhere.stderr
    assert "nor in the bucket (looked for s3://worked/out/.soundpatch/runs/never-ran/)" in nowhere.stderr


def test_force_pays_again_and_another_format_is_encoded_from_the_earlier_result(
    tmp_path, aws_env, simulator, monkeypatch
):
    each_labs_job(tmp_path, aws_env, monkeypatch, "a,fx.wav,1,1.5,slam\n")
    sim = simulator(latency=0.05, fill="tone")
    out = {"output.uri": str(tmp_path / "out")}
    assert run(tmp_path / "m.csv", hosted(tmp_path, sim, aws_env.endpoint, **out), "r1")[0].status == "succeeded"
    [again] = run(tmp_path / "m.csv", hosted(tmp_path, sim, aws_env.endpoint, **out), "r2", force=True)
    assert again.status == "succeeded" and sim.stats.accepted == 2
    flac = run(tmp_path / "m.csv", hosted(tmp_path, sim, aws_env.endpoint, **out, **{"output.format": "flac"}), "r3")
    assert flac[0].status == "skipped_done" and flac[0].output.endswith(".flac") and sim.stats.accepted == 2
    wav = sf.read(again.output, dtype="int16")[0]
    assert np.array_equal(sf.read(flac[0].output, dtype="int16")[0], wav)  # the same audio, losslessly


def test_rows_of_one_recording_naming_one_file_get_it_in_the_bucket_with_all_their_edits(
    tmp_path, aws_env, simulator, monkeypatch
):
    # The restoration case with a hosted model and results in a bucket: each row's own
    # result under <name>.rows/ (its region and a second each side), then the named file
    # from the input and those results.
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    source = wav_bytes(8.0, channels=2, freq=330.0)
    put(aws_env, "tapes", "reel-1.wav", source)
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,output\n"
        "hiss,s3://tapes/reel-1.wav,5,5.5,quiet room tone,restored/{stem}\n"
        "thud,s3://tapes/reel-1.wav,1,1.25,quiet room tone,restored/{stem}\n"
    )
    aws_env.bucket("stage")
    out = aws_env.bucket("restored-out")
    sim = simulator(latency=0.05, fill="tone")
    cfg = hosted(tmp_path, sim, aws_env.endpoint, **{"output.uri": f"s3://{out}/lib/"})
    outcomes, notes, _ = run_in_process(tmp_path / "m.csv", cfg, "reels")
    assert [(o.status, o.output) for o in outcomes] == [
        ("succeeded", f"s3://{out}/lib/restored/reel-1.rows/hiss.wav"),
        ("succeeded", f"s3://{out}/lib/restored/reel-1.rows/thud.wav"),
    ]
    assert {o.combined for o in outcomes} == {f"s3://{out}/lib/restored/reel-1.wav"}
    assert sim.stats.accepted == 2  # combining pays for nothing
    before = sf.read(io.BytesIO(source), dtype="int16")[0]
    after = sf.read(io.BytesIO(get(aws_env, f"s3://{out}/lib/restored/reel-1.wav")), dtype="int16")[0]
    rate = 22050
    untouched = np.ones(len(before), bool)
    for o in outcomes:
        a, b = round(o.start * rate), round(o.end * rate)
        own = sf.read(io.BytesIO(get(aws_env, o.output)), dtype="int16")[0]
        assert len(own) == (b + rate) - (a - rate)
        assert np.array_equal(after[a:b], own[rate:-rate]) and not np.array_equal(after[a:b], before[a:b])
        assert np.array_equal(own[:rate], before[a - rate : a]) and np.array_equal(own[-rate:], before[b : b + rate])
        untouched[a:b] = False
    assert np.array_equal(after[untouched], before[untouched])
    head = aws_env.client.head_object(Bucket=out, Key="lib/restored/reel-1.wav")
    assert head["Metadata"]["rows"] == "thud,hiss" and head["Metadata"]["regions"] == "1-1.25,5-5.5"
    assert any("restored/reel-1.wav (2 rows)" in n for n in notes)

    # The same edits asked for each under its own name: made whole from the input and the
    # excerpts in the bucket, paying for nothing.
    (tmp_path / "m.csv").write_text((tmp_path / "m.csv").read_text().replace("restored/{stem}", "whole/{row_id}"))
    again, _, _ = run_in_process(tmp_path / "m.csv", cfg, "reels-whole")
    assert [o.status for o in again] == ["skipped_done", "skipped_done"], [o.error for o in again]
    assert sim.stats.accepted == 2
    for o in again:
        a, b = round(o.start * rate), round(o.end * rate)
        whole = sf.read(io.BytesIO(get(aws_env, o.output)), dtype="int16")[0]
        assert o.output == f"s3://{out}/lib/whole/{o.row_id}.wav" and len(whole) == len(before)
        assert np.array_equal(whole[a:b], after[a:b])
        assert np.array_equal(whole[:a], before[:a]) and np.array_equal(whole[b:], before[b:])


def test_metadata_past_s3_s_limit_is_shortened_fairly_and_never_what_identifies_the_result(tmp_path, aws_env):
    # S3 refuses an object whose user metadata passes 2 KB: a long prompt, a long extra
    # column, a combined file's list of rows. Each is shortened to one common length and
    # marked; the identity a rerun recognises the result by stays whole.
    (tmp_path / "fx.wav").write_bytes(wav_bytes(3.0))
    prompt = "la pluie sur le toit de tôle, " * 60  # 1800 characters, more once encoded
    note = "n" * 1500
    pd.DataFrame(
        [
            {
                "id": "long",
                "input": "fx.wav",
                "start": 1,
                "end": 1.2,
                "prompt": prompt,
                "note": note,
                "output": "fixed",
            },
            {"id": "also", "input": "fx.wav", "start": 2, "end": 2.2, "prompt": "x", "note": "", "output": "fixed"},
        ]
    ).to_csv(tmp_path / "m.csv", index=False)
    out = aws_env.bucket("long-metadata")
    cfg = load_config(
        overrides={
            "output.uri": f"s3://{out}/",
            "storage.s3.endpoint_url": aws_env.endpoint,
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    outcomes, _, batch = run_in_process(tmp_path / "m.csv", cfg, "long-md")
    assert [o.status for o in outcomes] == ["succeeded", "succeeded"], [o.error for o in outcomes]
    head = aws_env.client.head_object(Bucket=out, Key="fixed.rows/long.wav")["Metadata"]
    assert sum(len(k) + len(v) for k, v in head.items()) <= 2048
    assert head["prompt-truncated"] == head["note-truncated"] == "true"
    assert prompt.startswith(unquote(head["prompt"])) and len(unquote(head["prompt"])) > 100
    assert note.startswith(head["note"]) and len(head["note"]) > 300
    identity = batch.identity(batch.check(batch.manifest.edits[0]))
    assert head["identity"] == identity and head["row_id"] == "long"
    assert outcomes[0].combined == f"s3://{out}/fixed.wav"


def test_an_output_name_too_long_for_an_s3_key_is_invalid_before_anything_is_made(tmp_path, aws_env):
    stem = "take-" + "x" * 180
    (tmp_path / f"{stem}.wav").write_bytes(wav_bytes(3.0))
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt,output\n"
        f"deep,{stem}.wav,1,1.2,x,{'{stem}/' * 6}{{row_id}}\n"  # 6 x 186 bytes, and more
        f"fine,{stem}.wav,1,1.2,x,{{stem}}/{{row_id}}\n"
    )
    out = aws_env.bucket("long-keys")
    cfg = load_config(
        overrides={"output.uri": f"s3://{out}/", "storage.s3.endpoint_url": aws_env.endpoint, "runs_dir": str(tmp_path)}
    )
    (deep, fine), _, _ = run_in_process(tmp_path / "m.csv", cfg, "keys")
    assert deep.status == "invalid" and deep.cost_usd == 0
    assert re.search(r"makes an S3 key of \d{4} bytes, where S3 takes 1024", deep.error), deep.error
    assert fine.status == "succeeded" and aws_env.keys(out, stem) == [f"{stem}/fine.wav"]


def test_names_in_any_script_are_kept_in_output_names_and_keys(tmp_path, aws_env):
    # The file as macOS names it (decomposed accents); the result is named in composed
    # form, so a rerun from another machine finds the same name.
    stem = unicodedata.normalize("NFD", "Präludium — Bach 日本")
    (tmp_path / f"{stem}.wav").write_bytes(wav_bytes(3.0))
    (tmp_path / "m.csv").write_text(f"id,input,start,end,prompt\nrow,{stem}.wav,1,1.2,x\n", encoding="utf-8")
    out = aws_env.bucket("script-names")
    cfg = load_config(
        overrides={"output.uri": f"s3://{out}/", "storage.s3.endpoint_url": aws_env.endpoint, "runs_dir": str(tmp_path)}
    )
    [outcome], _, _ = run_in_process(tmp_path / "m.csv", cfg, "names")
    assert outcome.status == "succeeded", outcome.error
    assert aws_env.keys(out, "names/") == ["names/Präludium_Bach_日本-row.wav"]
    [again], _, _ = run_in_process(tmp_path / "m.csv", cfg, "names")
    assert again.status == "skipped_done" and again.cost_usd == 0


def test_large_results_go_up_in_parts(tmp_path, aws_env):
    (tmp_path / "long.wav").write_bytes(wav_bytes(40.0, rate=48000, channels=2, subtype="PCM_24"))  # ~11.5 MB
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nlong,long.wav,20,20.05,fill\n")
    cfg = load_config(
        overrides={
            "storage.s3.endpoint_url": aws_env.endpoint,
            "storage.s3.multipart_threshold_mb": 5,
            "output.uri": f"s3://{aws_env.bucket('big')}/o/",
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    [outcome] = run(tmp_path / "m.csv", cfg, "mp")
    assert outcome.status == "succeeded", outcome.error
    bucket, key = outcome.output[len("s3://") :].split("/", 1)
    head = aws_env.client.head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # 11.5 MB in 5 MB parts
    data = get(aws_env, outcome.output)
    assert sf.info(io.BytesIO(data)).frames == 40 * 48000


def test_a_batch_s_rows_share_s3_connections_instead_of_opening_new_ones(aws_env, caplog):
    """boto3 keeps 10 connections unless told otherwise; 40 rows writing at once threw the
    rest away after each request (and warned on the terminal)."""
    from concurrent.futures import ThreadPoolExecutor

    from soundpatch.config import S3Config
    from soundpatch.s3 import S3, S3Uri

    bucket = aws_env.bucket("pool")
    s3 = S3(S3Config(endpoint_url=aws_env.endpoint), connections=40)
    gate = threading.Barrier(40)

    def put(i: int) -> None:
        gate.wait()  # all 40 requests in flight together
        s3.write(S3Uri(bucket, f"k{i}"), b"x" * 100_000, "application/octet-stream")

    with caplog.at_level("WARNING", logger="urllib3.connectionpool"):
        with ThreadPoolExecutor(40) as pool:
            list(pool.map(put, range(40)))
    assert len(aws_env.keys(bucket)) == 40
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_an_object_read_costs_one_request_and_a_folder_s_files_are_listed_at_once(tmp_path, aws_env):
    # Each row looks for its result's index record before anything else: where none is there,
    # the GET's NoSuchKey says so (a HEAD after it doubled a bucket's requests a row), and a
    # file that is there is read by its GET alone (a HEAD before it, for its version, too). And
    # validate lists the answers kept with the results once, rather than asking a row at a time.
    from soundpatch.config import S3Config
    from soundpatch.s3 import S3, S3Uri

    bucket = aws_env.bucket("looked")
    s3 = S3(S3Config(endpoint_url=aws_env.endpoint), connections=4)
    calls: list[str] = []
    s3.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    assert s3.get(S3Uri(bucket, "out/.soundpatch/results/none.json"), 1 << 20) is None
    assert calls == ["GetObject"]

    bucketed = storage.S3Prefix(s3, f"s3://{bucket}/out/")
    folder = LocalFolder(tmp_path / "out")
    for store in (bucketed, folder):
        assert store.names(".soundpatch/answers") == set()  # none yet
        store.put_file(".soundpatch/answers/a.answer", b"{}\nA", "application/octet-stream")
        store.put_file(".soundpatch/answers/b.answer", b"{}\nB", "application/octet-stream")
        store.put_file(".soundpatch/answers/deeper/c.answer", b"{}\nC", "application/octet-stream")
        store.put_file(".soundpatch/other/d.answer", b"{}\nD", "application/octet-stream")
        assert store.names(".soundpatch/answers") == {"a.answer", "b.answer"}
    calls.clear()
    bucketed.names(".soundpatch/answers")
    assert calls == ["ListObjectsV2"]
    # A file that is there (a kept answer a row found, a dataset's index) costs one GET too, and
    # the version it names is the one read: a write since then is not overwritten.
    calls.clear()
    held = bucketed.read_file(".soundpatch/answers/a.answer", 1 << 20)
    assert calls == ["GetObject"] and held is not None and held[0] == b"{}\nA", (calls, held)
    assert bucketed.put_file_if(".soundpatch/answers/a.answer", b"{}\nA2", "text/plain", held[1])
    assert not bucketed.put_file_if(".soundpatch/answers/a.answer", b"{}\nA3", "text/plain", held[1])
    assert bucketed.read_file(".soundpatch/answers/a.answer", 1 << 20)[0] == b"{}\nA2"


def test_patterns_expand_into_rows_and_identical_rows_are_sent_once(tmp_path):
    audio = tmp_path / "library"
    audio.mkdir()
    for level, name in enumerate(("a.wav", "b.wav", "c.flac"), start=1):  # different content each
        sf.write(audio / name, np.zeros((16000, 1), np.float32) + 0.01 * level, 16000, subtype="PCM_16")
    (tmp_path / "m.csv").write_text(
        "input,start,end,prompt\n"
        "library/*.wav,0.2,0.3,fill\n"
        "library/*.mp3,0.2,0.3,fill\n"
        "library/c.flac,0.2,0.3,same\nlibrary/c.flac,0.2,0.3,same\nlibrary/c.flac,0.2,0.3,same\n"
    )
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    batch = Batch(load_manifest(tmp_path / "m.csv"), cfg, "globs")
    edits = batch.manifest.edits
    assert [e.input for e in edits] == ["library/a.wav", "library/b.wav", "library/*.mp3"] + ["library/c.flac"] * 3
    assert edits[0].row_id.endswith("-a") and edits[1].row_id.endswith("-b")
    est = batch.estimate(edits)
    assert (est["predictions"], est["duplicates"], est["invalid"]) == (3, 2, 1)
    with _threads(4) as pool:
        outcomes = list(pool.map(batch.process, edits))
    batch.close()
    assert outcomes[2].status == "invalid" and "matches no files" in outcomes[2].error
    assert sorted(o.status for o in outcomes[3:]) == ["skipped_done", "skipped_done", "succeeded"]
    sent = [e for e in _events(tmp_path / "runs" / "globs") if e["event"] == "sending"]
    assert len(sent) == 3  # a.wav, b.wav and c.flac once


# ---------------------------------------------------------------------- a manifest in a bucket or on the web


def test_a_manifest_in_a_bucket_names_its_inputs_beside_it_there(tmp_path, aws_env, tmp_path_factory):
    # A nightly deployment's manifest kept with its audio, to be changed there without
    # deploying again: `soundpatch run s3://jobs/nightly/job.csv`.
    put(aws_env, "jobs", "nightly/audio/take.wav", wav_bytes(3.0, freq=300))
    for i in range(2):
        put(aws_env, "jobs", f"nightly/archive/old{i}.wav", wav_bytes(3.0, freq=400 + 100 * i))
    put(aws_env, "library", "bank/door.wav", wav_bytes(3.0, freq=500))
    put(
        aws_env,
        "jobs",
        "nightly/job.csv",
        b"id,input,start,end,prompt\n"
        b"take,audio/take.wav,1.0,1.5,fill\n"  # beside the manifest
        b"old,archive/*.wav,1.0,1.5,fill\n"  # a pattern beside it
        b"door,s3://library/bank/door.wav,1.0,1.5,fill\n"  # anywhere else
        b"gone,audio/missing.wav,1.0,1.5,fill\n",
    )
    (tmp_path / "job.yaml").write_text(f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}}}\n")
    env = clean_env(
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        PREFECT_HOME=str(seeded_prefect_home(tmp_path_factory.mktemp("prefect"))),
    )
    # An id no row has, among the rows the pattern makes: refused before Prefect starts, as for
    # any manifest (it was refused by the flow, a run folder made for nothing).
    typo = soundpatch(
        "run",
        "s3://jobs/nightly/job.csv",
        "--config",
        "job.yaml",
        "--rows",
        "old-old2",
        "--run-id",
        "t",
        cwd=tmp_path,
        env=env,
    )
    assert typo.returncode == 2 and "No row of the manifest has an id matching 'old-old2'" in typo.stderr, typo.stderr
    assert "take, old-old0, old-old1" in typo.stderr and not (tmp_path / "runs" / "t").exists()
    ran = soundpatch(
        "run", "s3://jobs/nightly/job.csv", "--config", "job.yaml", "--run-id", "n1", cwd=tmp_path, env=env
    )
    assert ran.returncode == 1, ran.stdout + ran.stderr  # the missing input's row
    assert "(5 results from s3://jobs/nightly/job.csv)" in ran.stdout  # the pattern's rows counted (it said 4)
    report = pd.read_csv(tmp_path / "runs" / "n1" / "report.csv", keep_default_na=False).set_index("row_id")
    assert report["status"].to_dict() == {
        "take": "succeeded",
        "old-old0": "succeeded",
        "old-old1": "succeeded",
        "door": "succeeded",
        "gone": "invalid",
    }, report[["status", "error"]]
    assert report.loc["gone", "error"] == "Cannot read s3://jobs/nightly/audio/missing.wav: no such object."
    assert report.loc["old-old1", "input"] == "s3://jobs/nightly/archive/old1.wav"
    # Each result is its own source's, outside the region to the bit.
    for row, key in (("take", "nightly/audio/take.wav"), ("old-old1", "nightly/archive/old1.wav")):
        source, _ = sf.read(io.BytesIO(get(aws_env, f"s3://jobs/{key}")), dtype="int16")
        result, _ = sf.read(report.loc[row, "output"], dtype="int16")
        assert np.array_equal(source[: int(0.9 * 22050)], result[: int(0.9 * 22050)])
        assert np.array_equal(source[int(1.6 * 22050) :], result[int(1.6 * 22050) :])
    listed = soundpatch("runs", "--config", "job.yaml", cwd=tmp_path, env=env).stdout
    assert "s3://jobs/nightly/job.csv, local" in " ".join(listed.split()), listed

    missing = soundpatch("validate", "s3://jobs/nightly/none.csv", "--config", "job.yaml", cwd=tmp_path, env=env)
    assert (
        missing.returncode == 2
        and missing.stderr.strip() == "error: Manifest s3://jobs/nightly/none.csv does not exist."
    )


def test_a_manifest_on_a_web_server_is_fetched_as_an_input_is(tmp_path, web_server, tmp_path_factory):
    from soundpatch.errors import ManifestError
    from soundpatch.manifest_source import fetch_manifest, read_manifest

    root, base = web_server
    (root / "jobs" / "audio").mkdir(parents=True)
    (root / "jobs" / "audio" / "take.wav").write_bytes(wav_bytes(3.0))
    (root / "jobs" / "job.yaml").write_text(
        "rows:\n  - {id: take, input: audio/take.wav, region: 1.0-1.5, prompt: fill}\n"
    )
    url = f"{base}/jobs/job.yaml?token=secret"
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})

    # Loopback is refused by default, as for an input; the token is not repeated.
    with pytest.raises(ManifestError) as refused:
        read_manifest(url, cfg.storage)
    assert str(refused.value) == (
        f"Cannot read manifest {base}/jobs/job.yaml: 127.0.0.1 is a private or local address (127.0.0.1); "
        "set storage.http.allow_private_addresses: true to allow it."
    )
    allowed = load_config(
        overrides={
            "storage.http.allow_private_addresses": True,
            "output.uri": str(tmp_path / "out"),
            "runs_dir": str(tmp_path / "runs"),
        }
    )
    [take], _, _ = run_in_process(url, allowed, "web")
    assert take.status == "succeeded" and take.input == "audio/take.wav", take.error
    with pytest.raises(ManifestError, match=r"jobs/job.yaml is over 10 B, more than a manifest is read whole"):
        fetch_manifest(url, allowed.storage, max_bytes=10)
    with pytest.raises(ManifestError, match=r"^Cannot read manifest .*/jobs/none.yaml: the server answered HTTP 404.$"):
        read_manifest(f"{base}/jobs/none.yaml", allowed.storage)

    # Run as users run it: the URL's token is in none of what the run writes or says.
    env = clean_env(PREFECT_HOME=str(seeded_prefect_home(tmp_path_factory.mktemp("prefect"))))
    ran = soundpatch(
        "run", url, "--set", "storage.http.allow_private_addresses=true", "--run-id", "w", cwd=tmp_path, env=env
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"(1 result from {base}/jobs/job.yaml)" in ran.stdout
    written = [
        p for p in (tmp_path / "runs" / "w").rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".csv")
    ]
    assert len(written) >= 3 and f"{base}/jobs/job.yaml" in (tmp_path / "runs" / "w" / "report.json").read_text()
    for said in [ran.stdout, ran.stderr, *(p.read_text() for p in written)]:
        assert "secret" not in said


# ---------------------------------------------------------------------- https inputs


def serve(root: Path, seen: list[tuple[str, str]] | None = None, etags: bool = False, ca: trustme.CA | None = None):
    """A real HTTP server on loopback serving `root`: Last-Modified on every file, and with
    `etags` an ETag of its content too (as nginx, CDNs and buckets give); each request's
    (method, path) appended to `seen`. With `ca`, it speaks https, with a certificate that
    CA issued."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def send_head(self):  # GET and HEAD both
            if seen is not None:
                seen.append((self.command, self.path))
            return super().send_head()

        def end_headers(self) -> None:
            path = Path(self.translate_path(self.path))
            if etags and path.is_file():
                self.send_header("ETag", f'"{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"')
            super().end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    if ca is not None:
        server.socket = speaking_tls(server.socket, ca)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"{'https' if ca else 'http'}://127.0.0.1:{server.server_address[1]}"


def speaking_tls(listening: socket.socket, ca: trustme.CA) -> ssl.SSLSocket:
    """`listening`, answering in TLS with a certificate for 127.0.0.1 that `ca` issued."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context.wrap_socket(listening, server_side=True)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def web_server(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    server, base = serve(root)
    yield root, base
    server.shutdown()
    server.server_close()


def test_web_inputs_are_fetched_with_a_cap_and_local_addresses_refused_by_default(tmp_path, web_server):
    root, base = web_server
    (root / "clip.wav").write_bytes(wav_bytes(2.0))
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,prompt\n"
        f"ok,{base}/clip.wav?token=secret,0.5,1,fill\n"
        f"missing,{base}/nope.wav,0.5,1,fill\n"
        "private,https://10.1.2.3/clip.wav,0.5,1,fill\n"
        f"tls,{base.replace('http:', 'https:')}/clip.wav,0.5,1,fill\n"
        f"closed,http://127.0.0.1:{closed_port()}/clip.wav,0.5,1,fill\n"
    )
    base_cfg = {"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")}

    refused = run(tmp_path / "m.csv", load_config(overrides=base_cfg), "default")
    assert [o.status for o in refused] == ["invalid"] * 5
    assert "private or local address (127.0.0.1)" in refused[0].error
    assert "allow_private_addresses" in refused[0].error and "secret" not in refused[0].error
    assert "private or local address (10.1.2.3)" in refused[2].error

    allowed = {**base_cfg, "storage.http.allow_private_addresses": True, "storage.http.timeout_seconds": 2}
    ok, missing, _, tls, closed = run(tmp_path / "m.csv", load_config(overrides=allowed), "allowed")
    # Why a connection failed, in words: not only its class name (ConnectError).
    assert tls.status == "invalid" and "the TLS handshake failed: [SSL: " in tls.error
    assert closed.status == "invalid" and closed.error.endswith(
        "the connection was refused: nothing listens at that address and port."
    )
    assert ok.status == "succeeded", ok.error
    before = sf.read(root / "clip.wav", dtype="int16")[0]
    after = sf.read(ok.output, dtype="int16")[0]
    assert np.array_equal(before[: int(0.5 * 22050)], after[: int(0.5 * 22050)])
    assert Path(ok.output).name.startswith("clip-")
    assert missing.status == "invalid" and "HTTP 404" in missing.error

    capped = run(tmp_path / "m.csv", load_config(overrides={**allowed, "storage.max_input_mb": 0.01}), "capped")
    # The limit as it was set; the URL as it is (it was "Http://127.0.0.1:.../clip.wav is ...").
    assert capped[0].status == "invalid" and capped[0].error == (
        f"Input {base}/clip.wav is 0.084 MB, over the 0.01 MB limit (storage.max_input_mb)."
    )


def test_an_input_over_the_size_limit_is_refused_naming_the_limit_as_it_was_set(tmp_path):
    # storage.max_input_mb counts MB of 2**20 bytes: the message said "over the 2147 MB
    # limit" for the default of 2048, and "over the 0 MB limit" for 0.01.
    sf.write(tmp_path / "big.wav", np.zeros((300_000, 2), np.int16), 44100, subtype="PCM_16")  # 1.2 MB
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nr1,big.wav,1,2,x\n")
    cfg = load_config(overrides={"storage.max_input_mb": 0.5, "runs_dir": str(tmp_path / "runs")})
    [refused], _, _ = run_in_process(tmp_path / "m.csv", cfg, "big")
    assert refused.status == "invalid" and refused.cost_usd == 0
    said = f"Input file {tmp_path / 'big.wav'} is 1.1 MB, over the 0.5 MB limit (storage.max_input_mb)."
    assert refused.error == said


def unusable_bundles_stop_the_run(variable: str, tmp_path: Path, cfg, monkeypatch) -> None:
    """`variable` naming a bundle that is not there, then an empty one: each stops the run
    (tmp_path/m.csv) before any row, in one sentence."""
    monkeypatch.setenv(variable, str(tmp_path / "moved.pem"))
    with pytest.raises(ConfigError, match=rf"^{variable} names .*moved\.pem, which is not a file: point it"):
        run(tmp_path / "m.csv", cfg, "moved")
    (tmp_path / "empty.pem").write_text("")
    monkeypatch.setenv(variable, str(tmp_path / "empty.pem"))
    with pytest.raises(ConfigError, match=r"empty\.pem, which holds no certificate in PEM form"):
        run(tmp_path / "m.csv", cfg, "empty")


def test_an_https_input_under_a_ca_of_its_own_is_fetched_once_ssl_cert_file_names_the_ca(tmp_path, monkeypatch):
    """As behind a proxy that inspects TLS: the server's certificate comes from a CA the
    system does not know. The row says so and what to set, without trying again and again;
    with SSL_CERT_FILE naming the CA's bundle it is fetched; a bundle that is not there
    stops the run before any row, in one sentence."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ca = trustme.CA()
    root = tmp_path / "www"
    root.mkdir()
    (root / "clip.wav").write_bytes(wav_bytes(2.0))
    server, base = serve(root, ca=ca)
    handshakes = []
    accept = server.get_request
    server.get_request = lambda: handshakes.append(1) or accept()
    try:
        (tmp_path / "m.csv").write_text(f"id,input,start,end,prompt\nclip,{base}/clip.wav,0.5,1,fill\n")
        cfg = load_config(
            overrides={
                "output.uri": str(tmp_path / "out"),
                "runs_dir": str(tmp_path / "runs"),
                "storage.http.allow_private_addresses": True,
            }
        )
        (untrusted,) = run(tmp_path / "m.csv", cfg, "untrusted")
        assert untrusted.status == "invalid"
        assert f"Cannot fetch {base}/clip.wav: its TLS certificate is not trusted here: " in untrusted.error
        assert untrusted.error.endswith("behind a proxy that inspects TLS, set SSL_CERT_FILE to its CA bundle.")
        assert len(handshakes) == 1  # not tried again: a certificate does not come to be trusted in seconds

        bundle = tmp_path / "corporate-ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        (trusted,) = run(tmp_path / "m.csv", cfg, "trusted")
        assert trusted.status == "succeeded", trusted.error
        before, after = sf.read(root / "clip.wav", dtype="int16")[0], sf.read(trusted.output, dtype="int16")[0]
        assert np.array_equal(before[: int(0.5 * 22050)], after[: int(0.5 * 22050)])

        unusable_bundles_stop_the_run("SSL_CERT_FILE", tmp_path, cfg, monkeypatch)
    finally:
        server.shutdown()
        server.server_close()


def test_a_bucket_under_a_ca_of_its_own_is_written_once_aws_ca_bundle_names_the_ca(tmp_path, monkeypatch, aws_env):
    """S3 behind a proxy that inspects TLS: boto3 trusts the bundle AWS_CA_BUNDLE names. An
    S3 server whose certificate a CA of the test's own issued: without the bundle the run
    stops before any row, saying what to set; with it the results go to the bucket; a bundle
    that is not there, or holds no certificate, stops the run before any row, in one sentence
    (before: "SSLError: SSL validation failed for ...", and nothing at all of the bundle)."""
    from tests.conftest import _moto

    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, bundle = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "corporate-ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(bundle))
    (tmp_path / "fx.wav").write_bytes(wav_bytes(3.0))
    (tmp_path / "m.csv").write_text("id,input,start,end,prompt\nfx,fx.wav,1.0,1.5,fill\n")
    with _moto(tmp_path, tls=(cert, key, bundle)) as server:
        server.bucket("secure")
        cfg = load_config(
            overrides={
                "output.uri": "s3://secure/out/",
                "storage.s3.endpoint_url": server.endpoint,
                "runs_dir": str(tmp_path / "runs"),
            }
        )
        with pytest.raises(ConfigError) as untrusted:
            run(tmp_path / "m.csv", cfg, "untrusted")
        said = str(untrusted.value)
        assert "the S3 endpoint's TLS certificate is not trusted here" in said, said
        assert said.endswith("behind a proxy that inspects TLS, set AWS_CA_BUNDLE to its CA bundle."), said

        monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
        (trusted,) = run(tmp_path / "m.csv", cfg, "trusted")
        assert trusted.status == "succeeded", trusted.error
        assert trusted.output.startswith("s3://secure/out/trusted/")
        assert trusted.output.split("/", 3)[3] in server.keys("secure", "out/trusted/")

        unusable_bundles_stop_the_run("AWS_CA_BUNDLE", tmp_path, cfg, monkeypatch)


@pytest.mark.parametrize("etags", [True, False], ids=["etag", "last-modified"])
def test_a_rerun_keeps_rows_of_an_unchanged_web_input_without_downloading_it_again(tmp_path, etags):
    # A restoration batch read from a web archive, resumed: the rows already made are kept
    # on the server's word that their input is the same version (its ETag, else its
    # Last-Modified time, with the length), not by downloading every input again.
    root = tmp_path / "www"
    root.mkdir()
    seen: list[tuple[str, str]] = []
    server, base = serve(root, seen, etags)
    (root / "clip.wav").write_bytes(wav_bytes(2.0))
    (root / "door.wav").write_bytes(wav_bytes(2.0, freq=330.0))
    cfg = load_config(
        overrides={
            "output.uri": str(tmp_path / "out"),
            "runs_dir": str(tmp_path / "runs"),
            "storage.http.allow_private_addresses": True,
        }
    )

    def manifest(door_prompt: str) -> Path:
        (tmp_path / "m.csv").write_text(
            f"id,input,start,end,prompt\na,{base}/clip.wav,0.5,1,fill\nb,{base}/door.wav,0.5,1,{door_prompt}\n"
        )
        return tmp_path / "m.csv"

    try:
        first, todo, _ = resume(manifest("creak"), cfg, "w")
        assert todo == ["a", "b"] and {o.status for o in first.values()} == {"succeeded"}

        seen.clear()
        again, todo, _ = resume(manifest("whoosh"), cfg, "w")
        assert todo == ["b"] and again["a"] == first["a"] and again["b"].status == "succeeded"
        assert ("GET", "/clip.wav") not in seen and ("HEAD", "/clip.wav") in seen

        # Replaced under the same URL, with the same length: its row is made again.
        (root / "clip.wav").write_bytes(wav_bytes(2.0, freq=550.0))
        later = (root / "clip.wav").stat().st_mtime + 10  # Last-Modified counts whole seconds
        os.utime(root / "clip.wav", (later, later))
        seen.clear()
        replaced, todo, _ = resume(manifest("whoosh"), cfg, "w")
        assert todo == ["a"] and replaced["a"].status == "succeeded" and ("GET", "/clip.wav") in seen
        assert replaced["b"] == again["b"] and ("GET", "/door.wav") not in seen
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------- helpers


def _threads(n: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(n)


def _events(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]


def resume(manifest: Path, cfg, run_id: str):
    """A run as the flow makes it: rows an earlier attempt finished are kept, the rest done."""
    batch = Batch(load_manifest(manifest), cfg, run_id)
    try:
        todo, kept = batch.split()
        outcomes = kept + [batch.process(e) for e in todo]
        return {o.row_id: o for o in outcomes}, [e.row_id for e in todo], batch.notes()
    finally:
        batch.close()


def test_a_rerun_redoes_the_rows_that_changed_and_a_replaced_result_is_never_taken_for_its_edit(
    tmp_path, aws_env, simulator, fault_proxy, monkeypatch
):
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    for bucket in ("stage", "inputs", "results"):
        aws_env.bucket(bucket)
    put(aws_env, "inputs", "fx.wav", wav_bytes(3.0))
    put(aws_env, "inputs", "door.wav", wav_bytes(3.0, freq=330.0))
    requests: list[tuple[str, str]] = []
    proxy = fault_proxy(lambda method, path, signed: requests.append((method, path)))  # passes all
    sim = simulator(latency=0.05, fill="tone")  # the seed sets the pitch of what comes back
    cfg = hosted(tmp_path, sim, proxy.endpoint, **{"output.uri": "s3://results/out/"})

    def manifest(door_prompt: str, door_seed: int) -> Path:
        (tmp_path / "m.csv").write_text(
            "id,input,start,end,prompt,seed,output\n"
            "a,s3://inputs/fx.wav,1,1.5,slam,1,\n"
            f"b,s3://inputs/door.wav,1,1.5,{door_prompt},{door_seed},door\n"  # a name without the run id
            "c,s3://inputs/fx.wav,2,2.5,thud,3,\n"
        )
        return tmp_path / "m.csv"

    first, todo, _ = resume(manifest("creak", 2), cfg, "r")
    assert todo == ["a", "b", "c"] and {o.status for o in first.values()} == {"succeeded"}
    creak = get(aws_env, first["b"].output)

    # The same run id again, with b asking for something else: only b is made, and the
    # input of the rows kept is not read again (its ETag says it is the one they were made from).
    requests.clear()
    again, todo, notes = resume(manifest("whoosh", 4), cfg, "r")
    assert todo == ["b"] and sim.stats.creates == 4
    assert again["a"] == first["a"] and again["c"] == first["c"]
    assert again["b"].status == "succeeded" and again["b"].prompt == "whoosh"
    assert ("GET", "/inputs/fx.wav") not in requests and ("HEAD", "/inputs/fx.wav") in requests
    assert any("1 row (b) changed in the manifest" in n and "done again" in n for n in notes), notes
    whoosh = get(aws_env, again["b"].output)
    assert again["b"].output == first["b"].output and whoosh != creak  # the same name, replaced

    # Another run asks for creak again: its index record names door.wav, which now holds
    # whoosh. It is made again (not handed out as creak), and it is creak that comes back.
    later, _, _ = resume(manifest("creak", 2), cfg, "r2")
    assert later["a"].status == later["c"].status == "skipped_done"
    assert later["b"].status == "succeeded" and sim.stats.creates == 5
    assert get(aws_env, later["b"].output) == creak

    # An input replaced under the same key: the rows made from it are made again.
    put(aws_env, "inputs", "fx.wav", wav_bytes(3.0, freq=550.0))
    replaced, todo, notes = resume(manifest("creak", 2), cfg, "r2")
    assert todo == ["a", "c"] and sim.stats.creates == 7
    assert replaced["b"] == later["b"] and replaced["a"].status == replaced["c"].status == "succeeded"
    assert any("2 rows (a, c) changed" in n for n in notes), notes

    # An input gone since: nothing to compare with, and nothing to redo the row from. Its
    # result is kept.
    aws_env.client.delete_object(Bucket="inputs", Key="door.wav")
    _, todo, _ = resume(manifest("creak", 2), cfg, "r2")
    assert todo == [] and sim.stats.creates == 7


def test_a_shared_clip_given_back_while_another_row_takes_it_up_is_there_for_that_row(aws_env, monkeypatch):
    # The last row using a staged clip deletes it; a row staging the same clip meanwhile
    # must not be handed a URL to an object that is being deleted: it waits, then uploads.
    from soundpatch.config import S3Config
    from soundpatch.s3 import S3
    from soundpatch.staging import Staging

    aws_env.bucket("stage")
    s3 = S3(S3Config(endpoint_url=aws_env.endpoint))
    staging = Staging(s3, "s3://stage/clips/")
    first = staging.stage(b"RIFF one clip", "run")
    second = staging.stage(b"RIFF one clip", "run")  # a variation: the same clip, no new upload
    assert first.uri == second.uri and len(aws_env.keys("stage", "clips/run/")) == 1
    staging.remove(first)
    assert len(aws_env.keys("stage", "clips/run/")) == 1  # the other row still uses it

    deleting, go_on = threading.Event(), threading.Event()
    real_delete = s3.delete

    def slow_delete(uri):
        deleting.set()
        go_on.wait(10)
        real_delete(uri)

    monkeypatch.setattr(s3, "delete", slow_delete)
    last = threading.Thread(target=staging.remove, args=(second,))
    last.start()
    assert deleting.wait(10)
    taken: list = []
    joining = threading.Thread(target=lambda: taken.append(staging.stage(b"RIFF one clip", "run")))
    joining.start()
    joining.join(0.3)
    assert joining.is_alive()  # it waits for the delete under way
    go_on.set()
    last.join(10)
    joining.join(10)
    assert [taken[0].uri.key] == aws_env.keys("stage", "clips/run/")  # uploaded again after the delete
    assert get(aws_env, str(taken[0].uri)) == b"RIFF one clip"
    monkeypatch.setattr(s3, "delete", real_delete)
    staging.remove(taken[0])
    assert aws_env.keys("stage", "clips/run/") == []


def test_detect_reads_an_archive_in_a_bucket_and_keeps_each_recording_s_place(tmp_path, aws_env):
    damaged = (Path(__file__).resolve().parents[1] / "manifests" / "audio" / "music_damaged.flac").read_bytes()
    archive = aws_env.bucket("archive-detect")
    for key in ("albums/one/side_a.flac", "albums/two/side_a.flac", "albums/two/notes.txt"):
        put(aws_env, archive, key, damaged if key.endswith(".flac") else b"liner notes")
    (tmp_path / "c.yaml").write_text(f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}}}\n")
    env = clean_env(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    found = soundpatch(
        "detect", f"s3://{archive}/albums/**/*.flac", "--config", "c.yaml", "--out", "fills.csv", cwd=tmp_path, env=env
    )
    assert found.returncode == 0, found.stdout + found.stderr
    rows = pd.read_csv(tmp_path / "fills.csv")
    assert (
        rows["input"].tolist()
        == [f"s3://{archive}/albums/one/side_a.flac"] * 3 + [f"s3://{archive}/albums/two/side_a.flac"] * 3
    )
    assert rows["output"].tolist() == ["{run_id}/one/{stem}"] * 3 + ["{run_id}/two/{stem}"] * 3
    assert rows["start"].tolist()[:3] == [4.19, 5.2999, 9.09] and len(set(rows["id"])) == 6
    # The prefix itself (the closing slash): its recordings at every depth, not the notes, nor
    # a hidden macOS copy.
    put(aws_env, archive, "albums/two/._side_a.flac", b"\x00\x05\x16\x07" + bytes(80))
    prefix = soundpatch(
        "detect", f"s3://{archive}/albums/", "--config", "c.yaml", "--out", "all.csv", cwd=tmp_path, env=env
    )
    assert prefix.returncode == 0, prefix.stdout + prefix.stderr
    assert pd.read_csv(tmp_path / "all.csv").equals(rows)

    # The manifest written beside the archive, in the bucket (it was a local file under
    # ./s3:/archive-detect/, said to be "s3:/archive-detect/fills.csv"), and run from there.
    there = f"s3://{archive}/fills.csv"
    written = soundpatch(
        "detect", f"s3://{archive}/albums/", "--config", "c.yaml", "--out", there, cwd=tmp_path, env=env
    )
    assert written.returncode == 0, written.stdout + written.stderr
    assert f"to {there}. What filling them costs: soundpatch validate {there} --config c.yaml" in " ".join(
        written.stdout.split()
    )
    assert not (tmp_path / "s3:").exists()
    assert pd.read_csv(io.BytesIO(get(aws_env, there))).equals(rows)
    checked = soundpatch("validate", there, "--config", "c.yaml", cwd=tmp_path, env=env)
    assert checked.returncode == 0 and re.search(r"predictions to send +6\s", checked.stdout), checked.stdout
    # A local recording's manifest in a bucket names it whole (relative, it would be read
    # beside the manifest there).
    (tmp_path / "tapes").mkdir()
    (tmp_path / "tapes" / "side_b.flac").write_bytes(damaged)
    local = soundpatch("detect", "tapes", "--config", "c.yaml", "--out", there, cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stdout + local.stderr
    named = pd.read_csv(io.BytesIO(get(aws_env, there)))["input"]
    assert set(named) == {str(tmp_path / "tapes" / "side_b.flac")}
    # A bucket that is not there, or a web server, is said before the archive is read.
    for out, said in (
        ("s3://no-such-bucket-here/fills.csv", "bucket 'no-such-bucket-here' does not exist"),
        ("https://example.com/fills.csv", "the manifest goes to a file or an s3:// key, not to a web server"),
    ):
        refused = soundpatch(
            "detect", f"s3://{archive}/albums/", "--config", "c.yaml", "--out", out, cwd=tmp_path, env=env
        )
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
        assert "Dropouts found" not in refused.stdout


def test_output_names_are_split_into_folders_as_posix_paths_are():
    # output_name splits a rendered name as PurePosixPath did, without making one for
    # each row (a third of naming 100,000 rows): the same parts, for any mix of slashes,
    # dots and names, so a name is made safe exactly as before.
    pieces = ["/", "//", ".", "..", "...", "a", "b.c", " ", "x/", "/y", ".hidden", "é", "\\"]
    rng = random.Random(7)
    names = ["", "/", "//", "///", "//a/b", "/a//b/./c/..", "a/./b/", "./a", "../a", "a/../.."]
    names += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))) for _ in range(5000)]
    for name in names:
        assert storage._path_parts(name) == list(PurePosixPath(name).parts), name
    fields = {"run_id": "r", "row_id": "x", "stem": "s", "seed": "1", "ext": "wav"}
    assert storage.output_name("//{stem}/../../{row_id}", fields) == "_/s/x.wav"
    assert storage.output_name("/../{stem}/./x", fields) == "s/x.wav"


def test_a_result_s_name_cannot_leave_the_output_folder_through_a_link(tmp_path):
    # Names are made safe (output_name); what is left is the folder itself: a link in it
    # that points elsewhere, as a folder on the way or as the file.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = LocalFolder(tmp_path / "outputs")
    store.ready()
    (tmp_path / "outputs" / "linked").symlink_to(elsewhere)
    (tmp_path / "outputs" / "run").mkdir()
    (tmp_path / "outputs" / "run" / "take.wav").symlink_to(elsewhere / "take.wav")
    for name in ("linked/take.wav", "linked/deeper/take.wav", "run/take.wav", "run/../../x.wav", "run/.."):
        with pytest.raises(RowError, match="would leave the output folder"):
            store.uri(name)
    inside = tmp_path / "outputs" / "run"
    (inside / "within.wav").symlink_to(inside / "real.wav")  # a link that stays inside is followed
    assert store.uri("run/other.wav") == str(inside.resolve() / "other.wav")
    assert store.uri("run/within.wav") == str(inside.resolve() / "real.wav")
    assert store.uri("run/other.wav") == str(inside.resolve() / "other.wav")  # the folder remembered
    store.put("run/new.wav", b"RIFF", "audio/wav", {})
    assert (inside / "new.wav").read_bytes() == b"RIFF" and not (elsewhere / "new.wav").exists()
