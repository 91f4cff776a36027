"""A model's answer for a row with damaged spans is kept with the results: changing only the
spans (or the crossfade) splices it again at no new cost, on a rerun or in another run."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from soundpatch.batch import Batch
from soundpatch.kept_answers import ANSWERS_PREFIX
from soundpatch.manifest import load_manifest
from soundpatch.providers import hosted
from tests.jobs import KEY, hosted_config, run_in_process

RATE = 48000
ROW = "id,input,start,end,damaged,prompt,seed\nfx,audio/fx.wav,1.20,1.65,{},metal clang,11\n"


def frames(*seconds: float) -> list[int]:
    return [round(s * RATE) for s in seconds]


def estimated(manifest, cfg, run_id: str) -> dict:
    batch = Batch(load_manifest(manifest), cfg, run_id=run_id, dry_run=True, earlier_attempts=True)
    try:
        return batch.estimate(batch.manifest.edits)
    finally:
        batch.close()


def test_other_spans_in_another_run_are_spliced_from_the_answer_kept_in_the_bucket(library, aws_env, simulator):
    # A restorer hears a click the first spans missed and widens one: the model is sent the
    # same clip either way, so the second run splices the answer the first paid for.
    sim = simulator(latency=0.1, fill="tone")
    aws_env.bucket("made")
    (library / "first.csv").write_text(ROW.format("1.30-1.301 1.5-1.51"))
    (library / "second.csv").write_text(ROW.format("1.30-1.302 1.4-1.41 1.5-1.51"))
    (library / "whole.csv").write_text(ROW.format(""))
    cfg = hosted_config(sim, aws_env.endpoint, "s3://made/out/", library / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        (first,), _, _ = run_in_process(library / "first.csv", cfg, "first")
        assert estimated(library / "second.csv", cfg, "second")["to_collect"] == 1  # nothing to send
        (second,), notes, _ = run_in_process(library / "second.csv", cfg, "second")
        (whole,), _, _ = run_in_process(library / "whole.csv", cfg, "whole")  # the row without spans too
    assert first.status == "succeeded" and first.cost_usd == pytest.approx(0.20), first.error
    assert second.status == whole.status == "succeeded", (second.error, whole.error)
    assert second.cost_usd == whole.cost_usd == 0.0 and sim.stats.creates == 1
    assert second.prediction_id == first.prediction_id != ""
    assert "from the answer run first paid for, kept with the results: no new cost" in second.method
    said = "1 result was spliced again from the model's answer run first paid for and kept with the results"
    assert any(said in note for note in notes), notes
    assert second.damaged == "1.29-1.312 1.39-1.42 1.49-1.52"

    # One answer kept, as the provider gave it, with no key in it.
    (key,) = aws_env.keys("made", f"out/{ANSWERS_PREFIX}/")
    kept = aws_env.client.get_object(Bucket="made", Key=key)["Body"].read()
    record = json.loads(kept.partition(b"\n")[0])
    assert record["run"] == "first" and record["provider"] == "eachlabs" and record["cost_usd"] == 0.20
    assert record["prediction_id"] == first.prediction_id and KEY.encode() not in kept

    def read(uri: str) -> np.ndarray:
        body = aws_env.client.get_object(Bucket="made", Key=uri.removeprefix("s3://made/"))["Body"].read()
        return sf.read(io.BytesIO(body), dtype="int16", always_2d=True)[0]

    before = sf.read(library / "audio" / "fx.wav", dtype="int16", always_2d=True)[0]
    after, model = read(second.output), read(whole.output)
    changed = np.flatnonzero(np.any(after != before, axis=1))
    spans = [frames(1.29, 1.312), frames(1.39, 1.42), frames(1.49, 1.52)]  # with their 10 ms fades
    assert len(changed) and all(any(lo <= i < hi for lo, hi in spans) for i in changed)  # the rest: to the bit
    for lo, hi in ((1.30, 1.302), (1.40, 1.41), (1.50, 1.51)):  # past the fades: the model's audio
        core = slice(*frames(lo, hi))
        assert np.array_equal(after[core], model[core]) and np.mean(after[core] != before[core]) > 0.9

    # The same spans again: the result itself is there.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        (again,), _, _ = run_in_process(library / "second.csv", cfg, "third")
    assert again.status == "skipped_done" and sim.stats.creates == 1


def test_spans_changed_before_a_rerun_with_the_run_id_collect_what_it_paid_for(library, aws_env, simulator):
    # The first attempt paid and failed on the way (a fault of ours); the restorer edits the
    # row's spans and runs it again with the same --run-id: its prediction is collected.
    sim = simulator(latency=0.1, fill="tone")
    (library / "m.csv").write_text(ROW.format("1.30-1.301 1.5-1.51"))
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "outputs"), library / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        mp.setattr(hosted, "decode_result", lambda data: (_ for _ in ()).throw(KeyError("a fault of ours")))
        (failed,), _, _ = run_in_process(library / "m.csv", cfg, "night")
        assert failed.status == "failed" and failed.cost_usd == pytest.approx(0.20)
        mp.undo()
        mp.setenv("EACHLABS_API_KEY", KEY)
        (library / "m.csv").write_text(ROW.format("1.30-1.302 1.5-1.51"))
        assert estimated(library / "m.csv", cfg, "night")["to_collect"] == 1
        (done,), _, _ = run_in_process(library / "m.csv", cfg, "night")
        assert done.status == "succeeded", done.error
        assert done.cost_usd == pytest.approx(0.20) and sim.stats.creates == 1  # what it cost, once
        assert done.damaged == "1.29-1.312 1.49-1.52"
        # The result is of the spans asked now: a run asking for them finds it made.
        (again,), _, _ = run_in_process(library / "m.csv", cfg, "next")
    assert again.status == "skipped_done" and sim.stats.creates == 1
    journal = (library / "runs" / "night" / "journal.jsonl").read_text()
    assert "set_aside" not in journal


def test_a_kept_answer_that_will_not_do_and_force_each_pay_for_a_new_one(library, aws_env, simulator):
    sim = simulator(latency=0.1, fill="tone")
    (library / "a.csv").write_text(ROW.format("1.30-1.301"))
    (library / "b.csv").write_text(ROW.format("1.30-1.302"))
    (library / "c.csv").write_text(ROW.format("1.30-1.303"))
    out = library / "outputs"
    cfg = hosted_config(sim, aws_env.endpoint, str(out), library / "runs", **{"splice.crossfade_ms": 5})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        (a,), _, _ = run_in_process(library / "a.csv", cfg, "a")
        (path,) = (out / ANSWERS_PREFIX).iterdir()
        path.write_bytes(b'{"run": "a", "provider": "eachlabs", "cost_usd": 0.2}\nnot audio')  # no id to fetch again
        (b,), notes, _ = run_in_process(library / "b.csv", cfg, "b")
        forced = Batch(load_manifest(library / "c.csv"), cfg, "c", force=True)
        try:
            (c,) = [forced.process(e) for e in forced.manifest.edits]
        finally:
            forced.close()
    assert a.status == b.status == c.status == "succeeded", (a.error, b.error, c.error)
    assert b.cost_usd == pytest.approx(0.20) and c.cost_usd == pytest.approx(0.20) and sim.stats.creates == 3
    assert any("1 answer kept with the results could not be used, so its row was paid for here" in n for n in notes)
    assert a.damaged == "1.295-1.306"  # the 5 ms crossfade


def test_rows_of_one_run_sending_the_same_with_other_spans_pay_once(library, aws_env, simulator):
    # A restorer compares span choices side by side, beside the row without spans: the model
    # is sent the same clip for all three. The rows go at once, as a run's do: one pays, the
    # others wait for its answer and are spliced from it (the first has no spans, yet keeps it).
    sim = simulator(latency=0.3, fill="tone")
    rows = ROW.format("") + "".join(
        f"fx-{n},audio/fx.wav,1.20,1.65,{spans},metal clang,11\n"
        for n, spans in (("a", "1.30-1.301 1.5-1.51"), ("b", "1.30-1.302 1.4-1.41"))
    )
    (library / "side_by_side.csv").write_text(rows)
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "outputs"), library / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        est = estimated(library / "side_by_side.csv", cfg, "compare")
        assert (est["predictions"], est["twins"], est["expected_cost_usd"]) == (1, 2, pytest.approx(0.20))
        batch = Batch(load_manifest(library / "side_by_side.csv"), cfg, "compare")
        try:
            with ThreadPoolExecutor(3) as pool:
                whole, a, b = pool.map(batch.process, batch.manifest.edits)
            notes = batch.notes()
        finally:
            batch.close()
    assert whole.status == a.status == b.status == "succeeded", (whole.error, a.error, b.error)
    assert sim.stats.creates == 1 and whole.cost_usd + a.cost_usd + b.cost_usd == pytest.approx(0.20)
    assert whole.prediction_id == a.prediction_id == b.prediction_id != ""
    assert sorted([whole.cost_usd, a.cost_usd, b.cost_usd]) == [0.0, 0.0, pytest.approx(0.20)]
    spliced = [o for o in (whole, a, b) if o.cost_usd == 0.0]
    assert all("from the answer this run paid for, kept with the results: no new cost" in o.method for o in spliced)
    assert any("2 results were spliced again from the model's answer this run paid for" in n for n in notes), notes

    before = sf.read(library / "audio" / "fx.wav", dtype="int16", always_2d=True)[0]
    model = sf.read(whole.output, dtype="int16", always_2d=True)[0]
    for outcome, cores in ((a, ((1.30, 1.301), (1.50, 1.51))), (b, ((1.30, 1.302), (1.40, 1.41)))):
        after = sf.read(outcome.output, dtype="int16", always_2d=True)[0]
        for lo, hi in cores:  # past the fades: the one answer's audio
            core = slice(*frames(lo, hi))
            assert np.array_equal(after[core], model[core]) and np.mean(after[core] != before[core]) > 0.9
        assert np.array_equal(after[: frames(1.28)[0]], before[: frames(1.28)[0]])  # before the spans: to the bit

    # One after another in the manifest's order, the row without spans first: it keeps its answer too.
    (library / "in_order.csv").write_text(rows.replace(",metal clang,11", ",metal clang,12"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        outcomes, _, _ = run_in_process(library / "in_order.csv", cfg, "in-order")
    assert [o.cost_usd for o in outcomes] == [pytest.approx(0.20), 0.0, 0.0] and sim.stats.creates == 2


def test_a_row_without_an_id_or_seed_keeps_them_when_its_spans_change(library, aws_env, simulator):
    # Both are derived from the row: not from its spans, or widening one would send the model
    # another seed (and pay again) and make the row another row.
    sim = simulator(latency=0.1, fill="tone")
    row = "input,start,end,damaged,prompt\naudio/fx.wav,1.20,1.65,{},metal clang\n"
    (library / "first.csv").write_text(row.format("1.30-1.301"))
    (library / "second.csv").write_text(row.format("1.30-1.302 1.5-1.51"))
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "outputs"), library / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        (first,), _, _ = run_in_process(library / "first.csv", cfg, "first")
        (second,), _, _ = run_in_process(library / "second.csv", cfg, "second")
    assert first.status == second.status == "succeeded", (first.error, second.error)
    assert (first.row_id, first.seed) == (second.row_id, second.seed)
    assert second.cost_usd == 0.0 and sim.stats.creates == 1
