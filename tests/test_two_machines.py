"""Two machines on one run id, through the lease in the output bucket (soundpatch/lease.py),
and two runs on one edit, through its claim there (soundpatch/edit_claims.py).

Each "machine" is a Batch with a runs folder of its own (its journal, its run lock), both
writing outputs to one bucket on the real S3 server: what two workers, or a laptop and a
server, share.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from soundpatch.batch import Batch
from soundpatch.journal import JournalTail, merge, read_events, restore, split_lines
from soundpatch.locks import RunBusy
from soundpatch.manifest import load_manifest
from soundpatch.s3 import S3Uri
from tests.jobs import environment, hosted_config, report, start, wait_for, write_job
from tests.test_crash import copied_creates
from tests.test_storage import wav_bytes


@pytest.fixture
def job(tmp_path, aws_env, monkeypatch) -> Path:
    monkeypatch.setenv("EACHLABS_API_KEY", "k")
    aws_env.bucket("stage")
    aws_env.bucket("shared-out")
    (tmp_path / "fx.wav").write_bytes(wav_bytes(3.0))
    # An edit and a run of this test's own: the bucket outlives each test (one S3 server for the session).
    prompt = f"a latch clicking shut ({tmp_path.name})"
    (tmp_path / "m.csv").write_text(f"id,input,start,end,prompt\na,fx.wav,1,1.5,{prompt}\n")
    return tmp_path / "m.csv"


def machine(
    job: Path, sim, aws_env, name: str, run_id: str | None = None, lease_seconds: float = 60, **overrides
) -> Batch:
    """A machine of its own (its runs folder) on the test's run (named after its folder)."""
    lease = {"storage.s3.lease_seconds": lease_seconds, **overrides}
    cfg = hosted_config(sim, aws_env.endpoint, "s3://shared-out/takes/", job.parent / name / "runs", **lease)
    batch = Batch(load_manifest(job), cfg, run_id or job.parent.name)
    batch.claims.folder = (
        job.parent / name / "claims"
    )  # its own /tmp: this machine's locks (locks.py) are not the other's
    return batch


def dry_run(job: Path, sim, aws_env, name: str, run_id: str, **overrides) -> dict:
    """What `soundpatch run --dry-run` counts on a machine of its own, the edits' claims read."""
    cfg = hosted_config(sim, aws_env.endpoint, "s3://shared-out/takes/", job.parent / name / "runs", **overrides)
    batch = Batch(load_manifest(job), cfg, run_id, dry_run=True)
    try:
        return batch.estimate(batch.manifest.edits)
    finally:
        batch.close()


def freeze(batch: Batch) -> None:
    """The machine of `batch` stops (a paused VM, a partitioned worker): its lease is no
    longer renewed."""
    batch.lease._stop.set()
    batch.lease._keeper.join()


def wake(batch: Batch) -> None:
    """... and goes on: it renews its lease again."""
    batch.lease._stop = threading.Event()
    batch.lease._keeper = threading.Thread(target=batch.lease._keep, daemon=True)
    batch.lease._keeper.start()


def died(batch: Batch) -> None:
    """The process of `batch` is gone: its lease is no longer renewed nor given back, and the
    kernel dropped its run lock."""
    freeze(batch)
    batch.run_lock.release()


def test_a_run_going_on_one_machine_is_refused_on_another_until_it_ends(job, aws_env, simulator):
    sim = simulator(latency=0.05, fill="tone")
    first = machine(job, sim, aws_env, "server")
    with pytest.raises(RunBusy) as refused:
        machine(job, sim, aws_env, "laptop")
    assert f"Run {job.parent.name} is going on another machine (process " in str(refused.value)
    lease = r"its lease in the bucket was renewed [01] s ago and lapses 60 s after that\); wait for it to end"
    assert re.search(lease, str(refused.value))
    other = machine(job, sim, aws_env, "laptop", run_id="other")  # another run id is free
    assert other.lease is not None and other.lease.holds()
    other.close()

    [outcome] = [first.process(e) for e in first.manifest.edits]
    first.close()
    assert outcome.status == "succeeded"
    assert aws_env.keys("shared-out", f"takes/.soundpatch/runs/{job.parent.name}/lease") == []  # given back
    second = machine(job, sim, aws_env, "laptop")  # free now: it goes on with the run
    try:
        [again] = [second.process(e) for e in second.manifest.edits]
    finally:
        second.close()
    assert again.status == "skipped_done" and sim.stats.creates == 1


def test_a_crashed_run_is_taken_back_at_once_with_its_runs_folder_and_after_its_lease_lapses_elsewhere(
    job, aws_env, simulator
):
    sim = simulator(latency=0.05, fill="tone")
    died(machine(job, sim, aws_env, "server", lease_seconds=3))
    again = machine(job, sim, aws_env, "server", lease_seconds=3)  # the same command, after the crash
    died(again)
    with pytest.raises(RunBusy, match=r"renewed [01] s ago and lapses 3 s after that"):
        machine(job, sim, aws_env, "laptop", lease_seconds=3)
    uri = S3Uri("shared-out", f"takes/.soundpatch/runs/{job.parent.name}/lease")
    wait_for(lambda: again.s3.age(uri)[1] > 3.0, 10, "the lease to lapse")
    machine(job, sim, aws_env, "laptop", lease_seconds=3).close()


def test_a_machine_that_stopped_renewing_loses_the_run_and_sends_nothing_more(job, aws_env, simulator):
    sim = simulator(latency=0.05, fill="tone")
    frozen = machine(job, sim, aws_env, "worker-1", lease_seconds=3)
    freeze(frozen)
    uri = S3Uri("shared-out", f"takes/.soundpatch/runs/{job.parent.name}/lease")
    wait_for(lambda: frozen.s3.age(uri)[1] > 3.0, 10, "the lease to lapse")

    retry = machine(job, sim, aws_env, "worker-2", lease_seconds=3)  # the flow run's retry, on another worker
    wake(frozen)  # its next renewal finds the lease taken
    wait_for(lambda: frozen.lease.lost, 5, "the old holder to find its lease taken")
    [late] = [frozen.process(e) for e in frozen.manifest.edits]
    assert late.status == "failed" and late.cost_usd == 0 and sim.stats.creates == 0
    assert late.error.startswith("Not started: another machine took up this run after its lease in the bucket lapsed")
    try:
        [made] = [retry.process(e) for e in retry.manifest.edits]
        # The old holder ends: the journal's copy and the lease are the retry's now, left alone.
        frozen.close()
        copy = f"takes/.soundpatch/runs/{job.parent.name}/"
        assert [k.rsplit("/", 2)[1] for k in aws_env.keys("shared-out", copy + "rows/")] == ["a"]
        assert aws_env.keys("shared-out", copy + "journal.jsonl") == [] and retry.lease.holds()
    finally:
        retry.close()
    assert made.status == "succeeded" and sim.stats.creates == 1


def test_a_holder_that_cannot_renew_stops_sending_before_its_lease_could_lapse(job, aws_env, simulator):
    sim = simulator(latency=0.05, fill="tone")
    cut_off = machine(job, sim, aws_env, "worker", lease_seconds=3)
    assert cut_off.lease.holds()
    freeze(cut_off)  # its renewals stop reaching the bucket
    time.sleep(2.1)  # two thirds of its lease
    try:
        [outcome] = [cut_off.process(e) for e in cut_off.manifest.edits]
    finally:
        cut_off.close()
    assert outcome.status == "failed" and sim.stats.creates == 0
    assert "the run's lease in the bucket could not be renewed for 2 s" in outcome.error


def test_a_store_without_conditional_writes_runs_without_a_lease_and_says_so(job, aws_env, simulator, fault_proxy):
    sim = simulator(latency=0.05, fill="tone")
    older = fault_proxy(lambda method, path, signed: (501, "NotImplemented") if path.endswith("/lease") else None)
    cfg = hosted_config(sim, older.endpoint, "s3://shared-out/takes/", job.parent / "runs")
    batch = Batch(load_manifest(job), cfg, job.parent.name)
    try:
        [outcome] = [batch.process(e) for e in batch.manifest.edits]
    finally:
        batch.close()
    assert outcome.status == "succeeded" and batch.lease is None
    [note] = [n for n in batch.notes() if "conditional writes" in n]
    assert note.startswith("The output store does not do conditional writes (") and "at the same time" in note


def test_a_renewal_that_landed_with_its_answer_lost_keeps_the_lease(job, aws_env, simulator):
    # A renewal reaches the bucket and its answer does not come back (then boto3 sends it
    # again, and If-Match fails on the ETag the first one wrote): the lease is still ours.
    sim = simulator(latency=0.05, fill="tone")
    holder = machine(job, sim, aws_env, "worker", lease_seconds=3)
    freeze(holder)
    lease = holder.lease
    landed = lease.s3.put_if(lease.uri, lease._body(), lease._metadata, if_match=lease._etag)
    assert landed is not None and landed != lease._etag  # in the bucket, unknown to the holder
    writes = lease._writes
    wake(holder)
    wait_for(lambda: lease._writes >= writes + 2, 5, "two more renewals")
    try:
        assert not lease.lost and lease.holds()
    finally:
        holder.close()


# ---------------------------------------------------------------------- one edit, two runs


def producing(batch: Batch) -> tuple[threading.Thread, list]:
    """The manifest's rows of `batch`, going on in a thread of their own; their outcomes land in the list."""
    outcomes: list = []
    worker = threading.Thread(target=lambda: outcomes.extend(batch.process(e) for e in batch.manifest.edits))
    worker.start()
    return worker, outcomes


def side_by_side(first: Batch, second: Batch, sim) -> tuple[list, list]:
    """Both machines' rows, the second's going once the first's create is out (while it
    polls); their outcomes. Both machines are closed after."""
    try:
        worker, made = producing(first)
        wait_for(lambda: sim.stats.creates == 1, 10, "the first run's create")
        later = [second.process(e) for e in second.manifest.edits]
        worker.join()
    finally:
        first.close()
        second.close()
    return made, later


def claims_in(aws_env) -> list[str]:
    return aws_env.keys("shared-out", "takes/.soundpatch/claims/")


def test_two_runs_on_two_machines_pay_once_for_an_edit_both_ask_for(job, aws_env, simulator):
    # Two workers given overlapping slices of a library: the same edit, other run ids, at once.
    sim = simulator(latency=3.0, fill="tone")  # the second reaches the edit while the first polls
    first = machine(job, sim, aws_env, "worker-1", run_id=f"{job.parent.name}-1")
    second = machine(job, sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2")
    made, [waited] = side_by_side(first, second, sim)
    assert made[0].status == "succeeded" and made[0].cost_usd == pytest.approx(0.2)
    assert waited.status == "skipped_done" and waited.cost_usd == 0 and waited.reused_from == made[0].output
    assert sim.stats.creates == 1
    [note] = [n for n in second.notes() if n.startswith("Rows waited for")]
    assert f"run {first.run_id} (process " in note and "instead of paying for them twice" in note
    waits = [json.loads(line) for line in (second.run_dir / "journal.jsonl").read_text().splitlines()]
    assert [(e["row"], e["on"]) for e in waits if e["event"] == "waiting"] == [("a", first.run_id)]  # progress shows it
    assert claims_in(aws_env) == []  # let go as the rows ended


def test_two_machines_sending_the_same_clip_for_other_spans_pay_for_it_once(job, aws_env, simulator):
    # Two restorers on two machines mend the same passage at once, one with a click more in
    # its spans: the model is sent the same clip either way. The second waits for the answer
    # the first keeps with the results and is spliced from it.
    sim = simulator(latency=3.0, fill="tone")
    row = "id,input,start,end,damaged,prompt,seed\nfx,fx.wav,1.0,1.5,{},clean continuation (%s),7\n"
    for name, spans in (("one", "1.1-1.11"), ("two", "1.1-1.11 1.3-1.305")):  # (an edit of this test's own)
        (job.parent / f"{name}.csv").write_text(row.format(spans).replace("%s", job.parent.name))
    first = machine(job.parent / "one.csv", sim, aws_env, "worker-1", run_id=f"{job.parent.name}-1")
    second = machine(job.parent / "two.csv", sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2")
    made, [spliced] = side_by_side(first, second, sim)
    assert made[0].status == spliced.status == "succeeded", (made[0].error, spliced.error)
    assert made[0].cost_usd == pytest.approx(0.2) and spliced.cost_usd == 0
    assert sim.stats.creates == 1 and spliced.prediction_id == made[0].prediction_id
    assert spliced.damaged == "1.09-1.12 1.29-1.315"
    waits = [json.loads(line) for line in (second.run_dir / "journal.jsonl").read_text().splitlines()]
    assert [(e["row"], e["on"]) for e in waits if e["event"] == "waiting"] == [("fx", first.run_id)]
    assert claims_in(aws_env) == []  # let go as the rows ended


def test_an_edit_claimed_by_a_run_whose_machine_died_is_made_once_its_lease_lapses(job, aws_env, simulator):
    sim = simulator(latency=0.05, fill="tone")
    gone = machine(job, sim, aws_env, "worker-1", run_id=f"{job.parent.name}-1", lease_seconds=6)
    edit = gone.manifest.edits[0]
    held = gone.bucket_claims.claim(gone.identity(gone.check(edit)), give_up=lambda: False)
    held.__enter__()  # (kept in `held`: a context manager dropped lets its claim go)
    died(gone)  # between its claim and its create
    other = machine(job, sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2", lease_seconds=6)
    try:
        worker, outcomes = producing(other)
        time.sleep(1.0)
        assert sim.stats.creates == 0 and not outcomes  # it waits: that run's lease has not lapsed yet
        worker.join(timeout=15)
    finally:
        other.close()
    assert outcomes[0].status == "succeeded" and sim.stats.creates == 1
    [note] = [n for n in other.notes() if "claimed in the bucket" in n]
    assert note.startswith(f"Edits that run {gone.run_id} (process ") and "were taken over here after its lease" in note
    assert "Rows waited" not in note
    assert claims_in(aws_env) == []


def named_on_the_claim(aws_env) -> str:
    """The prediction the edit's claim in the bucket names, if any."""
    keys = claims_in(aws_env)
    head = aws_env.client.head_object(Bucket="shared-out", Key=keys[0]) if keys else {}
    return head.get("Metadata", {}).get("prediction", "")


@contextmanager
def died_after_its_create(job: Path, sim, aws_env) -> Iterator[tuple[Batch, str]]:
    """A run that claimed the edit and made its prediction (its claim names it), and then
    its machine died: its row hangs, as polling on a frozen machine would. (That run, the
    prediction it paid for.)"""
    gone = machine(job, sim, aws_env, "worker-1", run_id=f"{job.parent.name}-1", lease_seconds=6)
    with hangs_after_its_create(gone):
        wait_for(lambda: named_on_the_claim(aws_env) != "", 10, "the claim to name its prediction")
        paid_for = named_on_the_claim(aws_env)
        died(gone)
        yield gone, paid_for


@contextmanager
def hangs_after_its_create(batch: Batch) -> Iterator[None]:
    """The row of `batch` going on in a thread of its own and hanging once its prediction is
    made, as polling on a frozen machine would; let go (to fail) as the block ends."""
    thawed = threading.Event()

    def frozen(prediction_id, request):
        thawed.wait(30)
        raise OSError("this machine is gone")

    batch.provider_for(batch.manifest.edits[0])._wait = frozen
    worker, _ = producing(batch)
    try:
        yield
    finally:
        thawed.set()
        worker.join()


def test_an_edit_whose_claimant_died_after_paying_is_collected_not_paid_again(job, aws_env, simulator):
    # The run that takes the claim over collects that run's prediction, which the claim
    # names, instead of paying for the edit again.
    sim = simulator(latency=0.05, fill="tone")
    with died_after_its_create(job, sim, aws_env) as (gone, paid_for):
        # A dry run meanwhile: while that run's lease holds its result may yet come (a
        # prediction, should it not); once it lapsed, that run's prediction is to collect.
        lapses = {"storage.s3.lease_seconds": 6}  # (as the gone run's)
        est = dry_run(job, sim, aws_env, "worker-2", f"{job.parent.name}-2", **lapses)
        assert (est["predictions"], est["to_collect"]) == (1, 0)
        lease = S3Uri("shared-out", f"takes/.soundpatch/runs/{gone.run_id}/lease")
        wait_for(lambda: gone.s3.age(lease)[1] > 6.0, 15, "the gone run's lease to lapse")
        est = dry_run(job, sim, aws_env, "worker-2", f"{job.parent.name}-2", **lapses)
        assert (est["predictions"], est["to_collect"], est["expected_cost_usd"]) == (0, 1, 0)
        other = machine(job, sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2", lease_seconds=6)
        try:
            [collected] = [other.process(e) for e in other.manifest.edits]  # once that run's lease lapses
        finally:
            other.close()
    assert collected.status == "succeeded", collected.error
    assert collected.prediction_id == paid_for and collected.cost_usd == 0
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(0.2)
    assert other.ledger.spent_usd == 0
    [note] = [n for n in other.notes() if "claimed in the bucket" in n]
    assert f"1 of them was collected from the prediction run {gone.run_id} had paid for, at no new cost" in note
    assert claims_in(aws_env) == []


def test_a_collection_that_does_not_come_back_is_not_counted_as_collected(job, aws_env, simulator):
    # As above, but the prediction's result never downloads whole: the row fails, keeping
    # that prediction for a rerun (not paying for another), and the note does not say it
    # was collected.
    sim = simulator(latency=0.05, fill="tone")
    with died_after_its_create(job, sim, aws_env) as (gone, paid_for):
        sim.settings.corrupt_rate = 1.0
        other = machine(job, sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2", lease_seconds=6)
        try:
            [failed] = [other.process(e) for e in other.manifest.edits]  # once that run's lease lapses
        finally:
            other.close()
    assert failed.status == "failed" and failed.prediction_id == paid_for and failed.cost_usd == 0, failed.error
    assert sim.stats.creates == 1 and other.ledger.spent_usd == 0
    notes = " ".join(other.notes())
    assert "collected" not in notes, notes


@pytest.mark.parametrize("why", ["it failed", "another account made it"])
def test_an_edit_whose_claimant_died_after_paying_for_nothing_it_can_collect_is_made_at_once(
    job, aws_env, simulator, monkeypatch, why
):
    # As above, but the prediction the claim names is of no use to the run taking it over:
    # the provider reports it failed, or it is another account's (two people, two keys, one
    # bucket), which the provider does not show to this key. The row makes the edit in the
    # same attempt, instead of failing and waiting for a rerun.
    sim = simulator(latency=0.05, fill="tone", fail_rate=1.0 if why == "it failed" else 0.0)
    keys = {}
    if why == "another account made it":
        monkeypatch.setenv("OTHER_EACHLABS_KEY", "another account's key")
        keys = {"provider.api_key_env": "OTHER_EACHLABS_KEY"}
    with died_after_its_create(job, sim, aws_env) as (gone, paid_for):
        sim.settings.fail_rate = 0.0  # what the next run makes works
        other = machine(job, sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2", lease_seconds=6, **keys)
        try:
            [made] = [other.process(e) for e in other.manifest.edits]  # once that run's lease lapses
        finally:
            other.close()
    assert made.status == "succeeded", made.error
    assert sim.stats.creates == 2 and made.cost_usd == pytest.approx(0.2) and other.ledger.spent_usd == made.cost_usd
    events = [json.loads(line) for line in (other.run_dir / "journal.jsonl").read_text().splitlines()]
    [given_up] = [e for e in events if e["event"] == "not_collected"]
    [created] = [e for e in events if e["event"] == "created" and not e.get("resumed")]
    assert given_up["prediction_id"] == paid_for != made.prediction_id == created["prediction_id"]
    assert ("reports prediction" if why == "it failed" else "HTTP 404") in given_up["reason"]
    [note] = [n for n in other.notes() if "claimed in the bucket" in n]
    assert f"For 1 of them the prediction run {gone.run_id} had paid for had failed" in note and "collected" not in note
    assert claims_in(aws_env) == []


def doubt_named_on_the_claim(aws_env) -> str:
    """The run whose create in doubt the edit's claim in the bucket names, if any."""
    keys = claims_in(aws_env)
    head = aws_env.client.head_object(Bucket="shared-out", Key=keys[0]) if keys else {}
    return head.get("Metadata", {}).get("doubt", "")


def refused_then_sent_when_told(job: Path, sim, aws_env, doubted: str) -> None:
    """Run after run, on other machines, the edit `doubted` left in doubt is not sent (at
    once: no lease to wait for), until a run told to resubmit makes it."""
    for n in (3, 4):
        # Its dry run says so first: not a prediction to pay for (once: it does not count it).
        est = dry_run(job, sim, aws_env, f"worker-{n}", f"{job.parent.name}-{n}")
        assert (est["in_doubt"], est["predictions"], est["expected_cost_usd"]) == (1, 0, 0)
        later = machine(job, sim, aws_env, f"worker-{n}", run_id=f"{job.parent.name}-{n}", lease_seconds=6)
        began = time.monotonic()
        try:
            [refused] = [later.process(e) for e in later.manifest.edits]
        finally:
            later.close()
        assert time.monotonic() - began < 4  # (a claim naming a doubt is no one's to wait for)
        assert refused.status == "failed" and refused.cost_usd == 0 and later.ledger.spent_usd == 0
        assert f"A create for this edit went out in run {doubted} and its answer never came" in refused.error
        assert doubt_named_on_the_claim(aws_env) == doubted
        assert "sent and never heard back from was not sent again" in " ".join(later.notes())
    creates = sim.stats.creates
    resubmit = {"provider.resubmit_in_doubt": True}
    est = dry_run(job, sim, aws_env, "worker-5", f"{job.parent.name}-5", **resubmit)
    assert (est["in_doubt"], est["predictions"], est["expected_cost_usd"]) == (0, 1, pytest.approx(0.2))
    told = machine(job, sim, aws_env, "worker-5", run_id=f"{job.parent.name}-5", **{"provider.resubmit_in_doubt": True})
    try:
        [made] = [told.process(e) for e in told.manifest.edits]
    finally:
        told.close()
    assert made.status == "succeeded" and made.cost_usd == pytest.approx(0.2), made.error
    assert sim.stats.creates == creates + 1 and claims_in(aws_env) == []


def test_an_edit_whose_claimant_died_with_its_create_out_is_not_sent_by_another_machine(job, aws_env, simulator):
    # The machine died after its create went out and before any answer: the prediction may
    # exist, and be billed. The run taking the claim over learns so from that run's
    # journal's copy in the bucket, and sends nothing; nor do the runs after it.
    sim = simulator(latency=0.05, fill="tone")
    gone = machine(job, sim, aws_env, "worker-1", run_id=f"{job.parent.name}-1", lease_seconds=6)
    thawed = threading.Event()

    def out(model_input, request, attempt):
        thawed.wait(30)
        raise OSError("this machine is gone")

    gone.provider_for(gone.manifest.edits[0])._send_create = out
    worker, _ = producing(gone)
    try:
        copies = f"takes/.soundpatch/runs/{gone.run_id}/rows/"
        wait_for(lambda: aws_env.keys("shared-out", copies), 10, "the journal's copy of the create going out")
        died(gone)
        other = machine(job, sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2", lease_seconds=6)
        try:
            [refused] = [other.process(e) for e in other.manifest.edits]  # once that run's lease lapses
        finally:
            other.close()
    finally:
        thawed.set()
        worker.join()
    assert refused.status == "failed" and refused.cost_usd == 0, refused.error
    assert f"went out in run {gone.run_id} and its answer never came" in refused.error
    assert sim.stats.creates == 0 and doubt_named_on_the_claim(aws_env) == gone.run_id
    refused_then_sent_when_told(job, sim, aws_env, gone.run_id)


def test_a_create_that_timed_out_leaves_its_doubt_on_the_edit_s_claim_for_other_machines(job, aws_env, simulator):
    # No answer came in time: the row failed, counted as spent, and its run ended as usual,
    # letting its lease go. A run on another machine (the next night's, in a new container)
    # sent the edit again.
    sim = simulator(latency=0.05, fill="tone", slow_create_rate=1.0, slow_create_seconds=3)
    first = machine(job, sim, aws_env, "worker-1", run_id=f"{job.parent.name}-1", **{"provider.timeout_seconds": 1})
    try:
        [doubted] = [first.process(e) for e in first.manifest.edits]
    finally:
        first.close()
    assert doubted.status == "failed" and "it may have been created" in doubted.error
    assert doubted.cost_usd == pytest.approx(0.2) and sim.stats.creates == 1
    assert doubt_named_on_the_claim(aws_env) == first.run_id
    sim.settings.slow_create_rate = 0.0
    # Its own rerun does not send it either (as before), and the claim keeps saying so.
    again = machine(job, sim, aws_env, "worker-1", run_id=first.run_id)
    try:
        [still] = [again.process(e) for e in again.manifest.edits]
    finally:
        again.close()
    assert still.status == "failed" and "counted as spent" in still.error and sim.stats.creates == 1
    assert doubt_named_on_the_claim(aws_env) == first.run_id
    refused_then_sent_when_told(job, sim, aws_env, first.run_id)


def test_a_run_takes_back_its_own_claim_from_its_crashed_process_at_once(job, aws_env, simulator):
    sim = simulator(latency=0.05, fill="tone")
    crashed = machine(job, sim, aws_env, "server")
    edit = crashed.manifest.edits[0]
    held = crashed.bucket_claims.claim(crashed.identity(crashed.check(edit)), give_up=lambda: False)
    held.__enter__()
    died(crashed)
    again = machine(job, sim, aws_env, "server")  # the same command; the lease (60 s) is taken back at once
    try:
        worker, outcomes = producing(again)
        worker.join(timeout=15)  # not the 60 s another run would wait
    finally:
        again.close()
    assert outcomes and outcomes[0].status == "succeeded" and sim.stats.creates == 1
    assert again.bucket_claims.waited_on == {} and again.bucket_claims.taken_over == {}
    assert claims_in(aws_env) == []


def test_a_row_waiting_on_another_run_s_claim_ends_not_started_when_the_run_is_stopped(
    job, aws_env, simulator, monkeypatch
):
    sim = simulator(latency=0.05, fill="tone")
    holder = machine(job, sim, aws_env, "worker-1", run_id=f"{job.parent.name}-1")
    edit = holder.manifest.edits[0]
    held = holder.bucket_claims.claim(holder.identity(holder.check(edit)), give_up=lambda: False)
    held.__enter__()
    waiting = machine(job, sim, aws_env, "worker-2", run_id=f"{job.parent.name}-2")
    stop = threading.Event()
    monkeypatch.setattr("soundpatch.batch.stop_requested", stop.is_set)  # Ctrl-C, as interrupt.py hears it
    try:
        worker, outcomes = producing(waiting)
        wait_for(lambda: waiting.bucket_claims.waited_on, 5, "the row to wait")
        stop.set()
        worker.join(timeout=10)
    finally:
        waiting.close()
        held.__exit__(None, None, None)
        holder.close()
    assert outcomes[0].status == "failed" and outcomes[0].error.startswith("Not started: the run was interrupted")
    assert sim.stats.creates == 0 and claims_in(aws_env) == []


def test_two_workers_given_overlapping_manifests_pay_once_for_each_edit(aws_env, simulator, tmp_path_factory):
    # As users run it: two `soundpatch run` commands at once, each on a machine of its own (its
    # folder, its /tmp, its Prefect), with rows 04-07 in both manifests and one output bucket.
    sim = simulator(latency=6.0, fill="tone")  # slower than the gap between the two starts
    aws_env.bucket("stage")
    aws_env.bucket("overlap")
    procs, folders = [], []
    for n, rows in ((1, range(0, 8)), (2, range(4, 12))):
        folder = tmp_path_factory.mktemp(f"worker-{n}")
        write_job(folder, sim, aws_env, rows=12, concurrency=8)
        lines = (folder / "job.csv").read_text().splitlines()
        (folder / "job.csv").write_text("\n".join([lines[0]] + [lines[1 + i] for i in rows]) + "\n")
        (folder / "job.yaml").write_text((folder / "job.yaml").read_text() + "output: {uri: 's3://overlap/takes/'}\n")
        (folder / "fx.wav").write_bytes(wav_bytes(3.0))  # the same sound on both: the same edits
        (folder / "tmp").mkdir()
        env = {**environment(folder / "prefect"), "TMPDIR": str(folder / "tmp")}
        procs.append(start(folder, env, f"worker-{n}"))
        folders.append(folder)
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
    assert sim.stats.creates == 12  # not 16: each edit both asked for was paid for once
    first, second = (report(folder, f"worker-{n}") for n, folder in enumerate(folders, 1))
    both = pd.concat([first, second])
    assert both["cost_usd"].sum() == pytest.approx(12 * 0.20)
    assert sorted(both["status"]) == ["skipped_done"] * 4 + ["succeeded"] * 12
    assert aws_env.keys("overlap", "takes/.soundpatch/claims/") == []


def test_a_run_that_dies_between_giving_up_another_run_s_prediction_and_its_own_create_sends_it_on_rerun():
    # The journal of the run above, cut where its own create is about to go out: what the
    # rerun reads of the row must not be the other run's failed prediction to collect.
    from soundpatch.journal import states_from

    events = [
        {"event": "sending", "row": "a", "provider": "eachlabs", "request": "r", "identity": "i", "settled": True},
        {"event": "created", "row": "a", "prediction_id": "theirs", "resumed": True},
        {"event": "not_collected", "row": "a", "prediction_id": "theirs", "reason": "it failed"},
        {"event": "sending", "row": "a", "provider": "eachlabs", "request": "r", "identity": "i"},
    ]
    state = states_from(events)["a"]
    assert state.prediction_id is None and not state.settled and not state.in_doubt
    state = states_from(
        [*events, {"event": "creating", "row": "a"}, {"event": "created", "row": "a", "prediction_id": "ours"}]
    )["a"]
    assert state.prediction_id == "ours" and not state.settled  # its own: collected, and counted, as paid here


def test_a_machine_going_on_with_a_run_another_machine_went_on_with_since_knows_what_that_one_paid_for(
    job, aws_env, simulator
):
    # The run began here (the server: its journal of the run is in its runs folder), went
    # on on the laptop (which paid for the row's prediction and died before collecting it),
    # and comes back here. The server's journal lacks what the laptop did: reading only it,
    # the server paid for the row again and counted nothing of the laptop's spending
    # against the budget. It reads the bucket's copy too.
    sim = simulator(latency=0.05, fill="tone")
    first = machine(job, sim, aws_env, "server", lease_seconds=3)
    first.journal.write("run_started", total=1, kept=0, manifest=str(job))
    first.close()
    laptop = machine(job, sim, aws_env, "laptop", lease_seconds=3)
    with hangs_after_its_create(laptop):
        copy = f"takes/.soundpatch/runs/{job.parent.name}/"
        wait_for(lambda: copied_creates(aws_env, "shared-out", copy) == 1, 10, "the laptop's create to be copied")
        died(laptop)
        uri = S3Uri("shared-out", f"takes/.soundpatch/runs/{job.parent.name}/lease")
        wait_for(lambda: laptop.s3.age(uri)[1] > 3.0, 10, "the laptop's lease to lapse")
        back = machine(job, sim, aws_env, "server", lease_seconds=3)
        try:
            [o] = [back.process(e) for e in back.manifest.edits]
            notes = back.notes()
        finally:
            back.close()
    assert o.status == "succeeded", o.error
    assert sim.stats.creates == 1 and sim.billed() == pytest.approx(0.2)  # the laptop's, collected
    assert o.cost_usd == pytest.approx(0.2) and back.ledger.spent_usd == pytest.approx(0.2)
    assert any("journal's copy in the bucket knew more of 1 row than this machine's" in n for n in notes), notes


def test_a_journal_and_its_copy_put_together_keep_each_line_once_and_what_only_the_copy_has_after(tmp_path):
    # A prompt may hold a line separator (U+2028) that str.splitlines cuts at: a journal
    # is split at its newlines only, or that row's line is lost (its create with it).
    lines = [
        json.dumps({"t": 1.0, "event": "run_started"}) + "\n",
        json.dumps({"t": 2.0, "event": "creating", "row": "a", "prompt": "rain\u2028thunder"}, ensure_ascii=False)
        + "\n",
    ]
    assert split_lines("".join(lines) + '{"t": 3.0, "event": "crea') == lines  # a torn last line is left out
    created = json.dumps({"t": 2.5, "event": "created", "row": "a", "prediction_id": "p1"}) + "\n"
    other = json.dumps({"t": 0.5, "event": "creating", "row": "b"}) + "\n"  # another machine's clock
    merged, rows = merge(lines, [lines[1], created, "not json\n", other])
    assert merged == [*lines, created, other] and rows == {"a", "b"}
    assert merge(lines, lines) == (lines, set())

    # The progress display reading the journal goes on reading it once the run puts the
    # merged journal in its place.
    (tmp_path / "journal.jsonl").write_text("".join(lines))
    tail = JournalTail(tmp_path)
    assert [e["event"] for e in tail.poll()] == ["run_started", "creating"]
    restore(tmp_path, merged)
    assert [e["event"] for e in tail.poll()] == ["run_started", "creating", "created", "creating"]
    assert [e.get("prompt") for e in read_events(tmp_path)][1] == "rain\u2028thunder"
