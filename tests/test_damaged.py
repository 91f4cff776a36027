"""A row's `damaged` spans: the local engine rebuilds those alone and keeps the rest of its region.

Crackle puts ticks milliseconds apart. `detect --clicks` makes one row of the ticks whose
regions (each widened by the splice's 10 ms) meet, and rows of crackle ran to 130 ms. The
engine rebuilt all of such a row: past 100 ms from a passage found elsewhere in the
recording, over a voice worse than leaving the crackle in. Now detect names each tick's
span in the row (`damaged`), and the engine rebuilds those samples alone, at once where
they are near each other, from the sound around and between them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundpatch import demo_audio
from soundpatch.audio import Audio, damaged_frames
from soundpatch.clicks import find_clicks
from soundpatch.config import load_config
from soundpatch.dropouts import find_dropouts
from soundpatch.edits import spans_text
from soundpatch.manifest import load_manifest
from soundpatch.providers.base import InpaintRequest
from soundpatch.providers.local import LocalEngine
from soundpatch.restoration import Damage, _meeting, _rows, _spans, restoration_manifest, row_counts
from tests.jobs import clean_env, hosted_config, run_in_process, seeded_prefect_home, soundpatch
from tests.test_clicks import crackled
from tests.test_metadata import RATE, wav_bytes, with_chunks
from tests.test_source_timecode import bext_at

KEY = "sk-test-damaged-1234"


def rows_of(tmp_path, text: str, name: str = "m.csv") -> dict:
    (tmp_path / name).write_text(text)
    return {e.row_id: e for e in load_manifest(tmp_path / name).edits}


def test_the_damaged_column_is_read_as_spans_inside_the_region(tmp_path):
    edits = rows_of(
        tmp_path,
        "id,input,start,end,prompt,damaged\n"
        "two,a.wav,1.0,1.1,x,1.05-1.052 1.01-1.0105\n"  # out of order: put in order
        "touching,a.wav,1.0,1.1,x,1.01-1.02 1.02-1.025 1.024-1.03\n"  # one span
        "timecodes,a.wav,0:01,0:01.1,x,0:01.01-0:01.011\n"
        "none,a.wav,1.0,1.1,x,\n"
        "outside,a.wav,1.0,1.1,x,0.99-1.001\n"
        "long,a.wav,1.0,1.1,x,1.01-1.05\n"
        "backwards,a.wav,1.0,1.1,x,1.02-1.01\n"
        "garbled,a.wav,1.0,1.1,x,1.01..\n",
    )
    assert edits["two"].damaged == ((1.01, 1.0105), (1.05, 1.052)) and edits["two"].valid
    assert edits["touching"].damaged == ((1.01, 1.03),)
    assert edits["timecodes"].damaged == ((1.01, 1.011),)
    assert edits["none"].damaged == () and edits["none"].valid
    assert edits["outside"].error == "Damaged span 0.99-1.001 is not inside the region 1-1.1 s."
    assert edits["long"].damaged == ((1.01, 1.05),) and edits["long"].valid  # a model's: its provider says (below)
    assert edits["backwards"].error == "Damaged span 1.02-1.01 ends before it starts."
    assert edits["garbled"].error == "Damaged span '1.01..' is not of the form start-end, e.g. 12.3451-12.3462."
    # A YAML list of spans; a spreadsheet's decimal commas in a semicolon-separated CSV.
    yaml_rows = rows_of(
        tmp_path, "rows:\n  - {input: a.wav, region: 2-3, prompt: x, damaged: [2.5-2.501, 2.1-2.1002]}\n", "m.yaml"
    )
    assert list(yaml_rows.values())[0].damaged == ((2.1, 2.1002), (2.5, 2.501))
    semi = rows_of(tmp_path, "id;input;start;end;prompt;damaged\ns;a.wav;1,0;1,1;x;1,01-1,0105\n", "s.csv")
    assert semi["s"].damaged == ((1.01, 1.0105),)
    # Rows without the column keep the ids derived from their content, as they were before it
    # (a rerun with the same --run-id knows its rows by them).
    plain = rows_of(tmp_path, "input,start,end,prompt\na.wav,1.0,1.1,x\n", "p.csv")
    with_empty = rows_of(tmp_path, "input,start,end,prompt,damaged\na.wav,1.0,1.1,x,\n", "e.csv")
    columns = ("input", "start", "end", "region", "prompt", "seed", "steps", "guidance_scale", "variations", "output")
    fields = dict.fromkeys((*columns, "provider"), "") | {"input": "a.wav", "start": "1.0", "end": "1.1", "prompt": "x"}
    before = "r" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    assert list(plain) == list(with_empty) == [before]


def test_the_engine_rebuilds_the_spans_alone_and_keeps_every_other_sample(music_44k):
    rate = 44100
    clean = music_44k[: 4 * rate].astype(np.float64)
    crackly, _ = crackled(clean, rate, 60.0, 0.5, 3.5, seed=4)
    found = find_clicks(Audio(crackly.astype(np.float32), rate, "WAV", "FLOAT"))
    text = restoration_manifest([("a.wav", d) for d in found], ".", "x", margin_seconds=0.01)
    rows = pd.read_csv(pd.io.common.StringIO(text), dtype={"damaged": str}).fillna("")
    audio = Audio(crackly.astype(np.float32), rate, "WAV", "FLOAT")
    engine = LocalEngine()
    error = {"untouched": 0.0, "whole region": 0.0, "damaged spans": 0.0}
    signal = 0.0
    for row in rows.itertuples():
        a, b = round(row.start * rate), round(row.end * rate)
        spans = [tuple(float(t) for t in span.split("-")) for span in row.damaged.split()]
        frames = damaged_frames(spans, rate, a, b)
        assert frames  # (every row here is of clicks)
        whole = engine.inpaint(InpaintRequest(audio, a, b, "x")).fill
        mended = engine.inpaint(InpaintRequest(audio, a, b, "x", damaged=frames))
        kept = np.ones(b - a, bool)
        for lo, hi in frames:
            kept[lo - a : hi - a] = False
        assert np.array_equal(mended.fill[kept], audio.samples[a:b][kept])  # to the bit
        assert "damaged span" in mended.method and mended.crossfade == 0
        truth = clean[a:b]
        signal += float(np.sum(truth**2))
        for name, got in (("untouched", crackly[a:b]), ("whole region", whole), ("damaged spans", mended.fill)):
            error[name] += float(np.sum((truth - got) ** 2))
    snr = {name: 10 * np.log10(signal / e) for name, e in error.items()}
    print(f"\ncrackle over music, {len(rows)} rows: " + ", ".join(f"{k} {v:.1f} dB" for k, v in snr.items()))
    # Measured: untouched 8.4, whole region 9.5, damaged spans 15.7 dB.
    assert snr["damaged spans"] >= snr["whole region"] + 4.0
    assert snr["damaged spans"] >= snr["untouched"] + 5.0


def test_spans_near_each_other_are_rebuilt_together_and_near_the_file_s_ends_too():
    rate = 16000
    x = demo_audio.voice(2.0, rate, seed=2, smooth=True).astype(np.float64).reshape(-1, 1)
    y = x.copy()
    spans = [(8000, 8010), (8016, 8030), (8060, 8064), (3, 12), (len(x) - 9, len(x) - 2)]
    rng = np.random.default_rng(0)
    for a, b in spans:
        y[a:b] += 0.5 * rng.standard_normal((b - a, 1))
    audio = Audio(y.astype(np.float32), rate, "WAV", "FLOAT")
    engine = LocalEngine()
    near = engine.inpaint(InpaintRequest(audio, 7990, 8080, "x", damaged=tuple(spans[:3]))).fill
    truth, before = x[7990:8080], y[7990:8080]
    gain = 10 * np.log10(np.sum((truth - before) ** 2) / np.sum((truth - near) ** 2))
    # 70 dB: the three bursts gone. Rebuilt one at a time, each with the others still in its
    # context, 15 dB.
    assert gain > 30.0, gain
    for a, b in spans[3:]:  # a few samples from either end: no room for a model on one side
        lo, hi = max(0, a - 5), min(len(x), b + 5)
        fill = engine.inpaint(InpaintRequest(audio, lo, hi, "x", damaged=((a, b),))).fill
        assert np.isfinite(fill).all() and np.abs(fill).max() <= 1.0
        assert np.array_equal(fill[: a - lo], audio.samples[lo:a])


def test_a_short_dropout_in_a_row_of_ticks_does_not_make_every_tick_s_model_its_size():
    # A 20 ms dropout's model is 1,000 frames deep; ticks 8 ms apart, solved with it, chained
    # into one cluster of 5,000 damaged frames, filled as a 0.9 s gap: -4.9 dB, worse than
    # silence, and 7.5 s of CPU. Each cluster now has the order of its own longest span.
    rate = 44100
    x = demo_audio.music(4.0, rate, 2, seed=3, smooth=True).astype(np.float32)
    y = x.copy()
    spans = [(rate, rate + 882)]
    rng = np.random.default_rng(3)
    for at in range(int(1.1 * rate), 2 * rate, 353):
        y[at : at + 44] += 0.3 * rng.standard_normal((44, 2)).astype(np.float32)
        spans.append((at, at + 44))
    y[rate : rate + 882] = 0.0
    a, b = rate - 441, 2 * rate + 441
    fill = LocalEngine().inpaint(InpaintRequest(Audio(y, rate, "WAV", "FLOAT"), a, b, "x", damaged=tuple(spans))).fill
    truth = x[a:b].astype(np.float64)
    snr = 10 * np.log10(np.sum(truth**2) / np.sum((truth - fill) ** 2))
    assert snr > 8.0, snr  # 13.0 dB (the ticks and the dropout in it: -12.4)


def test_a_run_keeps_the_audio_between_the_spans_of_a_reel_in_its_own_timecode(tmp_path):
    t = np.arange(3 * RATE) / RATE
    source = (8000 * np.sin(2 * np.pi * 330 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.int16)[:, None]
    crackly = source.copy()
    ticks = (8082, 8105, 8162)  # three ticks in 10 ms, at 01:00:01.01 on the reel
    for i in ticks:
        crackly[i : i + 4, 0] = [20000, -22000, 18000, -9000]
    (tmp_path / "reel.wav").write_bytes(with_chunks(wav_bytes(crackly), [(b"bext", bext_at(3600 * RATE))], []))
    spans = [(i - 1, i + 5) for i in ticks]
    damaged = " ".join(f"01:00:{a / RATE:09.6f}-01:00:{b / RATE:09.6f}" for a, b in spans)
    (tmp_path / "m.csv").write_text(
        f"id,input,start,end,damaged,prompt,timecode\nticks,reel.wav,01:00:01.000,01:00:01.030,{damaged},tone,source\n"
    )
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    (outcome,), notes, _ = run_in_process(tmp_path / "m.csv", cfg, "tc")
    assert outcome.status == "succeeded" and (outcome.start, outcome.end) == (1.0, 1.03), outcome.error
    assert outcome.method.startswith("autoregressive, 3 damaged spans")
    result = sf.read(outcome.output, dtype="int16", always_2d=True)[0]
    changed = np.flatnonzero(np.any(result != crackly, axis=1))
    assert len(changed) and all(any(a <= i < b for a, b in spans) for i in changed)  # nothing else moved
    for a, b in spans:  # the ticks gone: the tone back within 1%
        assert np.abs(result[a:b].astype(int) - source[a:b]).max() < 80
    assert not any("damaged" in note for note in notes)


def test_a_row_of_clicks_over_a_whole_short_clip_is_mended_not_refused(tmp_path):
    # A crackly 3 s effect: its clicks joined into one row, from its first sample to its last.
    # Without spans such a region leaves the local engine nothing to rebuild it from (invalid);
    # with them, the rest of the clip is what it rebuilds them from.
    t = np.arange(3 * RATE) / RATE
    clip = (6000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)[:, None]
    crackly = clip.copy()
    for i in (40, 9000, 23900):
        crackly[i : i + 3, 0] = [25000, -25000, 20000]
    sf.write(tmp_path / "fx.wav", crackly, RATE, subtype="PCM_16")
    spans = " ".join(f"{(i - 1) / RATE:.6f}-{(i + 4) / RATE:.6f}" for i in (40, 9000, 23900))
    (tmp_path / "m.csv").write_text(
        f"id,input,start,end,damaged,prompt\nall,fx.wav,0,3,{spans},x\nbare,fx.wav,0,3,,x\n"
    )
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    mended, bare = run_in_process(tmp_path / "m.csv", cfg, "short")[0]
    assert mended.status == "succeeded", mended.error
    assert bare.status == "invalid" and "covers the whole recording" in bare.error
    result = sf.read(mended.output, dtype="int16", always_2d=True)[0]
    assert np.abs(result.astype(int) - clip).max() < 60  # the clicks gone, the tone as it was


def test_between_the_spans_a_64_bit_float_recording_comes_back_to_the_bit(tmp_path):
    # The engine's fill is 32-bit floats; the samples between the spans were taken from it.
    x = np.random.default_rng(3).normal(0, 0.1, (RATE * 2, 2)) + 1e-9
    sf.write(tmp_path / "fx.wav", x, RATE, subtype="DOUBLE")
    (tmp_path / "m.csv").write_text("id,input,start,end,damaged,prompt\nr,fx.wav,0.5,0.9,0.55-0.551 0.8-0.8005,x\n")
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    (row,) = run_in_process(tmp_path / "m.csv", cfg, "f64")[0]
    assert row.status == "succeeded", row.error
    after = sf.read(row.output, dtype="float64", always_2d=True)[0]
    changed = np.flatnonzero(np.any(after != x, axis=1))
    assert set(changed) <= set(range(*damaged_frames([(0.55, 0.551)], RATE, 0, len(x))[0])) | set(
        range(*damaged_frames([(0.8, 0.8005)], RATE, 0, len(x))[0])
    )
    assert len(changed) > 0


def test_a_span_too_long_for_the_local_engine_to_rebuild_alone_makes_its_row_invalid(tmp_path):
    sf.write(tmp_path / "fx.wav", np.zeros((RATE, 1), np.int16), RATE, subtype="PCM_16")
    (tmp_path / "m.csv").write_text(
        "id,input,start,end,damaged,prompt\nlong,fx.wav,0.2,0.4,0.25-0.29,x\nshort,fx.wav,0.5,0.7,0.55-0.57,x\n"
    )
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    long, short = run_in_process(tmp_path / "m.csv", cfg, "local")[0]
    assert long.status == "invalid" and long.cost_usd == 0.0
    assert long.error == (
        "Damaged span 0.25-0.29 is 40.0 ms long, over the 20 ms the local engine rebuilds alone; give a longer gap "
        "a row of its own, or send the row to a hosted model (its provider column)."
    )
    assert short.status == "succeeded", short.error


def test_a_hosted_model_s_audio_goes_into_the_spans_and_their_crossfades_alone(library, aws_env, simulator):
    # A model generates its mask whole; the row's spans say where its audio goes, each with the
    # splice's 10 ms each side to fade over: between them the region is the recording's own.
    sim = simulator(latency=0.1, fill="tone")
    row = "fx,audio/fx.wav,1.20,1.65,{},metal clang,11\n"
    for name, spans in (("spans", "1.30-1.301 1.5-1.51"), ("plain", ""), ("covering", "1.205-1.3 1.31-1.645")):
        (library / f"{name}.csv").write_text("id,input,start,end,damaged,prompt,seed\n" + row.format(spans))
    cfg = hosted_config(sim, aws_env.endpoint, str(library / "outputs"), library / "runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EACHLABS_API_KEY", KEY)
        (spanned,), notes, _ = run_in_process(library / "spans.csv", cfg, "first")
        (plain,), _, _ = run_in_process(library / "plain.csv", cfg, "second")
        (covering,), _, _ = run_in_process(library / "covering.csv", cfg, "third")
    assert spanned.status == "succeeded" and spanned.cost_usd == pytest.approx(0.20), spanned.error
    assert not any("damaged" in note for note in notes)
    assert spanned.method.endswith(", into 2 damaged spans of the region alone") and "damaged" not in plain.method
    # Another result, so another edit, of the same prediction: the model's answer kept with the
    # results is spliced again (kept_answers.py). Spans that with their fades cover the region
    # are the row without them.
    assert plain.status == "succeeded" and plain.cost_usd == 0.0, plain.error
    assert covering.status == "skipped_done" and covering.cost_usd == 0.0 and sim.stats.accepted == 1
    # The report and the result's metadata say which spans the model's audio went into, fades and all.
    assert (spanned.damaged, plain.damaged, covering.damaged) == ("1.29-1.311 1.49-1.52", "", "")
    assert json.loads(Path(spanned.output + ".json").read_text())["damaged"] == "1.29-1.311 1.49-1.52"
    assert "damaged" not in json.loads(Path(plain.output + ".json").read_text())
    before = sf.read(library / "audio" / "fx.wav", dtype="int16", always_2d=True)[0]
    after = sf.read(spanned.output, dtype="int16", always_2d=True)[0]
    whole = sf.read(plain.output, dtype="int16", always_2d=True)[0]
    changed = np.flatnonzero(np.any(after != before, axis=1))
    at = round(1.29 * 48000), round(1.311 * 48000), round(1.49 * 48000), round(1.52 * 48000)
    assert changed.min() >= at[0] and changed.max() < at[3]
    assert not np.any((changed >= at[1]) & (changed < at[2]))  # between the spans: the recording's own
    # In the spans, past their fades, the model's audio, as the row without spans has it there.
    for lo, hi in ((1.2975, 1.3035), (1.4975, 1.5125)):
        core = slice(round(lo * 48000), round(hi * 48000))
        assert np.array_equal(after[core], whole[core]) and np.mean(after[core] != before[core]) > 0.9
    between = slice(round(1.32 * 48000), round(1.48 * 48000))
    assert np.mean(whole[between] != before[between]) > 0.9  # where the row without spans has the model's


def test_detect_names_each_click_s_span_and_each_short_dropout_s_and_rows_with_a_longer_dropout_none():
    found = [
        ("/a/take.wav", Damage(1.0, 1.0004, 10.0, "click")),
        ("/a/take.wav", Damage(1.012, 1.0135, 10.0, "click")),
        ("/a/take.wav", Damage(2.0, 2.01, 10.0, "dropout")),  # a span as it is: silence, cut at both edges
        ("/a/take.wav", Damage(3.0, 3.05, 10.0, "dropout")),
        ("/a/take.wav", Damage(3.052, 3.0521, 10.0, "click")),  # with the long dropout: rebuilt whole
    ]
    rows = pd.read_csv(pd.io.common.StringIO(restoration_manifest(found, "/a", "fill", 0.01)), dtype=str).fillna("")
    assert rows["damaged"].tolist() == ["0.99975-1.00065 1.01175-1.01375", "2.00000-2.01000", ""]


def test_a_short_dropout_rebuilt_alone_comes_back_far_closer_than_with_its_margins(music_44k):
    rate, engine = 44100, LocalEngine()
    error = {"region": 0.0, "dropout": 0.0}
    signal = 0.0
    for at in range(2 * rate + 12_345, 8 * rate, rate):  # six dropouts of 10 ms, off the beat
        holed = music_44k.copy()
        holed[at : at + 441] = 0.0
        (row,) = pd.read_csv(
            pd.io.common.StringIO(
                restoration_manifest([("a.wav", Damage(at / rate, (at + 441) / rate, 30.0))], ".", "x", 0.01)
            ),
            dtype={"damaged": str},
        ).itertuples()
        a, b = round(row.start * rate), round(row.end * rate)
        audio = Audio(holed, rate, "WAV", "FLOAT")
        spans = damaged_frames([tuple(map(float, row.damaged.split("-")))], rate, a, b)
        (lo, hi), *_ = spans
        assert spans == ((lo, hi),) and at - 1 <= lo <= at and at + 441 <= hi <= at + 442  # (to 10 µs, outwards)
        truth = music_44k[a:b].astype(np.float64)
        signal += float(np.sum(truth**2))
        for way, damaged in (("region", ()), ("dropout", spans)):
            fill = engine.inpaint(InpaintRequest(audio, a, b, "x", damaged=damaged)).fill
            error[way] += float(np.sum((truth - fill) ** 2))
    snr = {way: 10 * np.log10(signal / e) for way, e in error.items()}
    print(
        f"\n10 ms dropouts in music: region rebuilt {snr['region']:.1f} dB, the dropout alone {snr['dropout']:.1f} dB"
    )
    assert snr["dropout"] >= snr["region"] + 3.0  # measured: 22.8 against 29.1 dB


def test_for_the_local_engine_clicks_under_a_second_apart_are_one_row_of_up_to_5_s_and_dropouts_stay_apart():
    take = "/a/take.wav"
    found = [(take, Damage(1.0, 1.0005, 20.0, "click")), (take, Damage(1.5, 1.5005, 20.0, "click"))]
    found += [(take, Damage(1.2, 1.21, 20.0, "dropout"))]  # short: a span too
    found += [(take, Damage(2.0, 2.05, 20.0, "dropout")), (take, Damage(2.3, 2.3005, 20.0, "click"))]
    found += [(take, Damage(3.0 + k / 2, 3.0005 + k / 2, 20.0, "click")) for k in range(19)]  # 3.0 ... 12.0 s
    found += [(take, Damage(14.0, 14.0005, 20.0, "click"))]  # 2 s after the last

    def rows(join: bool) -> list[tuple[str, str, str]]:
        text = restoration_manifest(found, "/a", "x", 0.01, join_spans=join)
        return [(r.start, r.end, r.note) for r in pd.read_csv(pd.io.common.StringIO(text), dtype=str).itertuples()]

    assert rows(True) == [
        ("0.9900", "1.5105", "2 clicks and 1 dropout, 11 ms in all, at 1.000 s"),
        ("1.9900", "2.0600", "dropout of 50 ms at 2.000 s"),  # over 20 ms: rebuilt whole, as ever, not joined
        ("2.2900", "7.0105", "10 clicks, 5 ms in all, at 2.300 s"),  # (one more would make it over 5 s)
        ("7.4900", "12.0105", "10 clicks, 5 ms in all, at 7.500 s"),
        ("13.9900", "14.0105", "click of 0.50 ms at 14.000 s"),
    ]
    assert len(rows(False)) == len(found)  # for a hosted model, as small a region as each can have


def test_for_a_hosted_model_clicks_between_two_dropouts_within_a_second_go_to_it_with_them():
    # The local engine's row of a click between two longer dropouts kept them apart: two
    # predictions, each a second of the model's audio, where one makes both. On a crackly
    # tape (5 clicks a second) that was 409 predictions for 200 crinkles of dropouts where
    # 273 do.
    take = "/a/take.wav"

    def dropout(at: float, ms: float) -> tuple[str, Damage]:
        return take, Damage(at, at + ms / 1000, 20.0)

    def click(at: float) -> tuple[str, Damage]:
        return take, Damage(at, at + 0.0005, 20.0, "click")

    found = [dropout(1.0, 40), click(1.3), dropout(1.45, 10), dropout(1.6, 40)]  # within a second in all
    found += [dropout(5.0, 40), click(5.5), dropout(6.2, 40), click(6.5)]  # 1.25 s in all: apart
    text = restoration_manifest(found, "/a", "x", 0.01, join_spans=True, spans_provider="local", join_for_a_model=True)
    rows = pd.read_csv(pd.io.common.StringIO(text), dtype=str, keep_default_na=False)
    assert [(r.start, r.end, r.damaged, r.provider) for r in rows.itertuples()] == [
        ("0.9900", "1.6500", "1.00000-1.04000 1.29975-1.30075 1.45000-1.46000 1.60000-1.64000", ""),
        ("4.9900", "5.0500", "", ""),
        ("5.4900", "5.5105", "5.49975-5.50075", "local"),
        ("6.1900", "6.2500", "", ""),
        ("6.4900", "6.5105", "6.49975-6.50075", "local"),  # after the last dropout: the local engine's
    ]
    assert row_counts(found, 0.01, True, True) == (5, 2, 2, 2)  # the 2 span rows' damage: 2 rows apart too
    assert row_counts(found, 0.01) == (8, 4, 4, 0)


def _rows_asking_whole_rows(
    damage: list[Damage], margin: float, join_spans: bool = True, for_a_model: bool = False
) -> list[tuple[list[Damage], float, float]]:
    """`_rows` as first written: at each join, the whole row is asked whether each of its
    damage is a span (quadratic in a row's damage: 19 s for an hour of crackle)."""
    rows: list[tuple[list[Damage], float, float]] = []
    for group in _meeting(damage, margin):
        start = max(0.0, math.floor(round((group[0].start - margin) * 10_000, 3)) / 10_000)
        end = min(
            group[-1].recording_seconds, math.ceil(round((max(d.end for d in group) + margin) * 10_000, 3)) / 10_000
        )
        if rows:
            before, at, until = rows[-1]
            row_spans, group_spans = _spans(before, at, until) is not None, _spans(group, start, end) is not None
            local = join_spans and row_spans and group_spans and start - until <= 1.0 and end - at <= 5.0
            model = for_a_model and end - at <= 1.0 and not (join_spans and (row_spans or group_spans))
            if start < until or local or model:
                rows[-1] = (before + group, at, end)
                continue
            # The local engine's clicks between two of the model's dropouts within a second: the model's.
            if join_spans and for_a_model and len(rows) >= 2 and row_spans and not group_spans:
                first, at, _ = rows[-2]
                if _spans(first, at, rows[-2][2]) is None and end - at <= 1.0:
                    rows[-2:] = [(first + before + group, at, end)]
                    continue
        rows.append((group, start, end))
    return rows


@pytest.mark.parametrize("join_spans, for_a_model", [(True, False), (True, True), (False, True)])
def test_rows_of_spans_are_joined_as_when_each_join_asked_the_whole_row(join_spans, for_a_model):
    # A row's region widening lengthens only the spans it cut short at its end, and the new
    # group's: those alone are asked. With no crossfade, a dropout of exactly 20 ms is a span
    # in its own region but not in a wider one: such cases are among these. For a hosted model,
    # rows within a second in all are one (with join_spans, those of a longer dropout alone).
    rng = random.Random(7)
    for _ in range(1500):
        seconds, margin = rng.choice([2.0, 10.0, 30.0]), rng.choice([0.0, 0.0, 0.005, 0.01])
        damage = []
        for _ in range(rng.randint(1, 80)):
            kind = rng.choice(["click", "click", "dropout"])
            at = round(rng.uniform(0, seconds), rng.choice([3, 4, 5, 7]))
            lengths = [5e-5, 0.01, 0.0199999, 0.02, 0.02000001, 0.025] if kind == "dropout" else [5e-5, 5e-4, 6e-3]
            damage.append(Damage(at, min(seconds, at + rng.choice(lengths)), seconds, kind))
        expected = [
            (g, a, b, _spans(g, a, b)) for g, a, b in _rows_asking_whole_rows(damage, margin, join_spans, for_a_model)
        ]
        made = _rows(damage, margin, join_spans, for_a_model)
        assert [(g, a, b, _spans(g, a, b)) for g, a, b in made] == expected


def test_detect_joins_a_crackly_record_s_clicks_into_a_few_rows_the_local_engine_restores(tmp_path):
    # 736 rows for a minute of crackle, each a task, a report card and an excerpt of its
    # region and a second each side (266 MB of excerpts for a 10 MB recording). For the local
    # engine, which rebuilds a row's clicks alone, clicks under a second apart are one row.
    rate = 44100
    clean = demo_audio.music(12.0, rate, 2, seed=3, smooth=True).astype(np.float64)
    crackly, _ = crackled(clean, rate, 20.0, 0.5, 11.5, seed=5)
    sf.write(tmp_path / "record.flac", crackly, rate, subtype="PCM_16")
    env = clean_env(PREFECT_HOME=str(seeded_prefect_home(tmp_path / "prefect")))
    # The rows as they were before they were joined: a click each, but for those whose regions meet.
    audio = Audio(sf.read(tmp_path / "record.flac", dtype="int16", always_2d=True)[0], rate, "FLAC", "PCM_16")
    found = [("record.flac", d) for d in find_dropouts(audio) + find_clicks(audio)]
    (tmp_path / "apart.csv").write_text(restoration_manifest(found, str(tmp_path), "x", 0.01))
    joined = soundpatch("detect", "record.flac", "--clicks", "-o", "joined.csv", cwd=tmp_path, env=env)
    assert joined.returncode == 0, joined.stderr
    every = soundpatch(
        "detect", "record.flac", "--clicks", "--all-to-provider", "--out", "every.csv", cwd=tmp_path, env=env
    )
    assert (tmp_path / "every.csv").read_text() == (tmp_path / "joined.csv").read_text()  # the local engine's anyway
    assert "note: --all-to-provider changes nothing here: the config's provider is the local engine" in every.stdout
    separate, rows = pd.read_csv(tmp_path / "apart.csv"), pd.read_csv(tmp_path / "joined.csv")
    assert len(separate) > 100 and 3 <= len(rows) <= 6, (len(separate), len(rows))
    assert (rows["end"] - rows["start"]).max() <= 5.0
    assert (
        f"Clicks and dropouts of up to 20 ms less than 1 s apart are one row, of up to 5 s ({len(rows)} rows where "
        f"apart they would be {len(separate)})" in joined.stdout.replace("\n", " ")
    )
    spans = " ".join(rows["damaged"]).split()
    assert sorted(spans) == sorted(" ".join(separate["damaged"].fillna("")).split())  # the same clicks

    # Each row a click, the local engine's work is some ms a span: validate no longer takes a
    # row of them for a region it rebuilds whole (0.5 s a row a core: a minute here).
    estimate = soundpatch("validate", "apart.csv", "--set", "output.uri=fresh", cwd=tmp_path, env=env)
    seconds = re.search(r"expected wall time\s+([\d.]+) s\b", estimate.stdout)
    assert seconds and float(seconds[1]) < 0.1 * len(separate), estimate.stdout

    # Filled by a hosted model instead, a row is a prediction (its audio goes into the spans).
    hosted = soundpatch("validate", "joined.csv", "--set", "provider.name=eachlabs", cwd=tmp_path, env=env)
    assert f"expected cost                      ${0.2 * len(rows):.2f}" in hosted.stdout, hosted.stdout
    assert "invalid                            0" in hosted.stdout

    made = soundpatch("run", "joined.csv", "--run-id", "r", cwd=tmp_path, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    result = sf.read(tmp_path / "outputs" / "r" / "record.wav", dtype="int16", always_2d=True)[0]
    source = sf.read(tmp_path / "record.flac", dtype="int16", always_2d=True)[0]
    damaged = np.zeros(len(source), bool)
    for lo, hi in (damaged_frames([tuple(map(float, s.split("-")))], rate, 0, len(source))[0] for s in spans):
        damaged[lo:hi] = True
    assert np.array_equal(result[~damaged], source[~damaged])  # every sample but the clicks' as it was
    restored = result.astype(np.float64) / 32768

    def snr(x: np.ndarray) -> float:
        return float(10 * np.log10(np.sum(clean**2) / np.sum((clean - x) ** 2)))

    print(f"\n{len(rows)} rows: crackly {snr(crackly):.1f} dB, restored {snr(restored):.1f} dB")
    assert snr(restored) >= snr(crackly) + 5.0  # measured: 14.7 -> 24.3 dB


def _hosted_config_file(library, sim, aws_env, prefect_home) -> tuple[tuple[str, str], dict]:
    """`--config hosted.yaml` (Each Labs from the simulator, clips staged in the S3 server), and
    the environment the commands run in."""
    (library / "hosted.yaml").write_text(
        f"provider: {{name: eachlabs, base_url: '{sim.base_url}', poll_seconds: 0.1}}\n"
        f"storage: {{s3: {{endpoint_url: '{aws_env.endpoint}'}}, staging: 's3://stage/clips/'}}\n"
    )
    env = clean_env(
        PREFECT_HOME=str(seeded_prefect_home(prefect_home)),
        EACHLABS_API_KEY=KEY,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
    )
    return ("--config", "hosted.yaml"), env


def _filled(library, hosted: tuple[str, str], env: dict, sim, predictions: int) -> pd.DataFrame:
    """The report of `soundpatch run fills.csv` (run id r), every row succeeded with `predictions`
    sent to the model at $0.20 each."""
    made = soundpatch("run", "fills.csv", *hosted, "--run-id", "r", cwd=library, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    report = pd.read_csv(library / "runs" / "r" / "report.csv", keep_default_na=False)
    assert set(report["status"]) == {"succeeded"} and sim.stats.accepted == predictions
    assert report["cost_usd"].sum() == pytest.approx(0.20 * predictions)
    return report


def test_detect_for_a_hosted_provider_gives_it_the_long_dropouts_and_the_local_engine_the_clicks(
    library, aws_env, simulator, tmp_path_factory
):
    # A model makes a row's whole region anew, at $0.20 a row: for a click, money spent to make
    # the 20 ms around it further from what was there than the local engine, which rebuilds the
    # click's samples alone, for nothing. With a hosted provider in its config, detect names the
    # local engine on rows of clicks and short dropouts; only the longer dropouts go to the model.
    rate = 44100
    clean = demo_audio.music(12.0, rate, 2, seed=3, smooth=True).astype(np.float64)
    crackly, _ = crackled(clean, rate, 5.0, 0.5, 11.5, seed=5)
    for at in (4.31, 9.27):  # two dropouts of 60 ms (off the beat, where the sound is cut): a model's to fill
        crackly[round(at * rate) : round((at + 0.06) * rate)] = 0.0
    sf.write(library / "record.flac", crackly, rate, subtype="PCM_16")
    sim = simulator(latency=0.1, fill="tone")
    hosted, env = _hosted_config_file(library, sim, aws_env, tmp_path_factory.mktemp("prefect-home-hosted-detect"))
    found = soundpatch("detect", "record.flac", "--clicks", *hosted, "--out", "fills.csv", cwd=library, env=env)
    every = soundpatch(
        "detect", "record.flac", "--clicks", *hosted, "--all-to-provider", "--out", "every.csv", cwd=library, env=env
    )
    assert found.returncode == 0 and every.returncode == 0, found.stderr + every.stderr
    rows = pd.read_csv(library / "fills.csv", dtype=str, keep_default_na=False)
    long, mended = rows[rows["damaged"] == ""], rows[rows["damaged"] != ""]
    assert len(long) == 2 and set(long["provider"]) == {""}  # the config's: eachlabs
    assert len(mended) >= 2 and set(mended["provider"]) == {"local"}
    said = found.stdout.replace("\n", " ")
    assert f"{len(mended)} rows of clicks and short dropouts name the local engine in their provider column" in said
    assert "2 rows go to eachlabs (--all-to-provider sends it every row)" in said
    assert f"Wrote {len(rows)} rows (1 recording of 1) to fills.csv" in said
    # Sent to the model, the clicks and dropouts within a second in all are a row (its audio goes
    # into them and 10 ms around each): one prediction makes what each would have made.
    apart = pd.read_csv(library / "every.csv", dtype=str, keep_default_na=False)
    assert "provider" not in apart.columns and len(apart) > len(rows), (len(apart), len(rows))
    assert (apart["end"].astype(float) - apart["start"].astype(float)).max() <= 1.0
    every_said = every.stdout.replace("\n", " ")
    assert "name the local engine" not in every_said
    joined = re.search(
        r"Clicks and dropouts within 1 s in all are one row for eachlabs, .* \((\d+) rows where apart", every_said
    )
    assert joined and int(joined[1]) == len(apart), every_said

    estimate = soundpatch("validate", "fills.csv", *hosted, cwd=library, env=env)
    assert re.search(r"expected cost\s+\$0\.40 ", estimate.stdout), estimate.stdout
    assert re.search(rf"provider\s+eachlabs: 2, local: {len(mended)}\b", estimate.stdout), estimate.stdout
    everything = soundpatch("validate", "every.csv", *hosted, cwd=library, env=env)
    assert re.search(rf"expected cost\s+\${0.2 * len(apart):.2f} ", everything.stdout), everything.stdout

    report = _filled(library, hosted, env, sim, predictions=2)
    assert set(report.loc[report["provider"] == "local", "cost_usd"]) == {0.0}
    page = (library / "runs" / "r" / "report.html").read_text()
    assert f"<th>provider</th><td>eachlabs: 2 rows, local: {len(mended)} rows</td>" in page
    # The report names the spans each row rebuilt, as the manifest did (to the µs); a model's
    # rows of one dropout each, none: their whole region.
    given = [[tuple(map(float, span.split("-"))) for span in d.split()] for d in rows["damaged"]]
    assert report["damaged"].tolist() == [spans_text(spans) for spans in given]
    assert report.loc[report["provider"] == "eachlabs", "damaged"].tolist() == ["", ""]
    first = report.loc[report["damaged"] != ""].iloc[0]
    assert json.dumps(first["damaged"]) in page  # on the row's card

    source = sf.read(library / "record.flac", dtype="int16", always_2d=True)[0]
    result = sf.read(library / "outputs" / "r" / "record.wav", dtype="int16", always_2d=True)[0]
    spans = np.zeros(len(source), bool)  # the local engine's to rebuild
    for damaged in mended["damaged"]:
        for span in damaged.split():
            lo, hi = damaged_frames([tuple(map(float, span.split("-")))], rate, 0, len(source))[0]
            spans[lo:hi] = True
    touched = spans.copy()  # where a row may change the recording
    for row in long.itertuples():
        a, b = round(float(row.start) * rate), round(float(row.end) * rate)
        touched[a:b] = True
        inner = slice(a + 441, b - 441)  # past the splice's 10 ms fades: the model's tone
        assert np.mean(result[inner] != source[inner]) > 0.95
    assert np.array_equal(result[~touched], source[~touched])
    truth = np.round(clean * 32767).astype(np.int64)  # (as written: PCM_16)
    before = np.sum((source[spans] - truth[spans]) ** 2.0)  # the clicks found ...
    after = np.sum((result[spans] - truth[spans]) ** 2.0)  # ... are gone
    assert after < before / 10, (before, after)


def test_for_a_hosted_model_dropouts_within_a_second_are_one_prediction_whose_audio_goes_into_them_alone(
    library, aws_env, simulator, tmp_path_factory
):
    # A model generates a second of its clip at the least (its mask is whole seconds), so three
    # dropouts within one were three predictions each making what one makes. Joined, the row names
    # them as spans, and the model's audio goes into those and the 10 ms around each alone.
    rate = 44100
    clean = demo_audio.music(9.0, rate, 2, seed=3, smooth=True).astype(np.float64)
    for at in (2.31, 2.62, 2.93, 5.41, 6.51, 7.63):  # 40 ms each; the last three 1.16 s apart in all
        clean[round(at * rate) : round((at + 0.04) * rate)] = 0.0
    clean[round(2.8 * rate) : round(2.81 * rate)] = 0.0  # and one of 10 ms, which alone the local engine mends
    sf.write(library / "tape.flac", clean, rate, subtype="PCM_16")
    sim = simulator(latency=0.1, fill="tone")
    hosted, env = _hosted_config_file(library, sim, aws_env, tmp_path_factory.mktemp("prefect-home-model-rows"))
    found = soundpatch("detect", "tape.flac", *hosted, "--out", "fills.csv", cwd=library, env=env)
    assert found.returncode == 0, found.stdout + found.stderr
    assert (
        "Dropouts of over 20 ms within 1 s in all are one row for eachlabs, which generates a second at the least "
        "whatever the row: its audio goes into each of them and 10 ms around it (4 rows where apart they would be 6). "
        "1 click or short dropout among them goes to eachlabs in the same prediction: a row of the local engine's "
        "between two of them would keep those apart."
    ) in found.stdout.replace("\n", " ")
    assert "Clicks and dropouts of up to 20 ms" not in found.stdout  # (none left the local engine's)
    rows = pd.read_csv(library / "fills.csv", dtype=str, keep_default_na=False)
    assert rows["start"].tolist() == ["2.3000", "5.4000", "6.5000", "7.6200"]
    assert rows["end"].tolist() == ["2.9800", "5.4600", "6.5600", "7.6800"]
    assert rows["damaged"].tolist() == ["2.31000-2.35000 2.62000-2.66000 2.80000-2.81000 2.93000-2.97000", "", "", ""]
    assert set(rows["provider"]) == {""}  # the config's, the short dropout's too
    estimate = soundpatch("validate", "fills.csv", *hosted, cwd=library, env=env)
    assert re.search(r"expected cost\s+\$0\.80 ", estimate.stdout), estimate.stdout

    report = _filled(library, hosted, env, sim, predictions=4)
    # The spans the model's audio went into, each with 10 ms either side (the first and last
    # reach the region's edges): the report says so, to the sample.
    assert report["damaged"].tolist() == ["2.3-2.36 2.61-2.67 2.79-2.82 2.92-2.98", "", "", ""]
    source = sf.read(library / "tape.flac", dtype="int16", always_2d=True)[0]
    result = sf.read(library / "outputs" / "r" / "tape.wav", dtype="int16", always_2d=True)[0]
    touched = np.zeros(len(source), bool)  # each dropout and 10 ms each side: the model's, faded in
    for at, ms in ((2.31, 40), (2.62, 40), (2.8, 10), (2.93, 40), (5.41, 40), (6.51, 40), (7.63, 40)):
        a, b = round((at - 0.01) * rate), round((at + ms / 1000 + 0.01) * rate)
        touched[a:b] = True
        gap = slice(round(at * rate), round((at + ms / 1000) * rate))
        assert np.mean(result[gap] != 0) > 0.95  # filled
    assert np.array_equal(result[~touched], source[~touched])  # between the joined dropouts too
