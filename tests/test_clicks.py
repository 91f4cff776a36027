"""Finding clicks (soundpatch/clicks.py): the ones punched into the samples and into clean
material are found, where they are; clean music, speech and a sound effect give none."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from manifests.make_samples import MUSIC_DAMAGE, VOICE_DAMAGE
from soundpatch import clicks as clicks_module
from soundpatch import demo_audio
from soundpatch.audio import Audio, decode
from soundpatch.clicks import find_clicks
from soundpatch.restoration import Damage, restoration_manifest

AUDIO = Path(__file__).resolve().parents[1] / "manifests" / "audio"


def found(x: np.ndarray, rate: int) -> list[tuple[float, float]]:
    return [(d.start, d.end) for d in find_clicks(Audio(np.asarray(x, np.float32), rate, "WAV", "FLOAT"))]


def punched(x: np.ndarray, rate: int, at: list[float], db: float, seed: int = 0, channels=None) -> np.ndarray:
    """`x` with a click at each time of `at`: 0.1-2 ms of windowed noise, `db` over the level around it."""
    rng = np.random.default_rng(seed)
    y = np.array(x, np.float64)
    for t in at:
        a, w = round(t * rate), max(2, round(rng.uniform(0.1, 2.0) / 1000 * rate))
        level = np.sqrt(np.mean(np.square(y[a - rate // 50 : a + rate // 50]))) + 1e-4
        shape = rng.standard_normal(w) * np.hanning(w + 2)[1:-1]
        shape *= level * 10 ** (db / 20) / np.abs(shape).max()
        y[a : a + w, channels if channels is not None else slice(None)] += shape[:, None]
    return np.clip(y, -1.0, 1.0)


def near(spans: list[tuple[float, float]], t: float, slack: float = 0.001) -> bool:
    return any(a - slack <= t <= b + slack for a, b in spans)


@pytest.mark.parametrize(
    ("name", "damage"), [("music_damaged.flac", MUSIC_DAMAGE), ("voice_damaged.flac", VOICE_DAMAGE)]
)
def test_the_clicks_punched_into_the_samples_are_found_where_they_are(name, damage):
    audio = decode((AUDIO / name).read_bytes())
    spans = [(d.start, d.end) for d in find_clicks(audio)]
    for start, end, kind in damage:
        covered = [(a, b) for a, b in spans if a < end and start < b]
        if kind == "click":  # 5 ms of crackle: one span, within a millisecond of it
            assert len(covered) == 1 and abs(covered[0][0] - start) <= 0.001 and covered[0][1] >= end - 0.001
        else:  # a dropout's edges step down to silence and back up: not clicks
            assert not covered


def test_the_sample_music_s_notes_stopping_dead_are_found_and_not_once_they_fade_out():
    # demo_audio.music's notes end with a jump to zero (a real, small click each); the
    # same music with 5 ms fades has none. That is the difference between the two.
    rate = 22050
    stopped = found(demo_audio.music(12.0, rate, channels=2, seed=3), rate)
    assert stopped and all(round(a % 0.5, 3) in (0.45, 0.0) or round(a % 0.5, 3) == 0.5 for a, _ in stopped)
    assert found(demo_audio.music(12.0, rate, channels=2, seed=3, smooth=True), rate) == []


@pytest.mark.parametrize(
    ("material", "rate"),
    [("music", 44100), ("music", 22050), ("voice", 16000), ("voice", 44100), ("effect", 48000)],
)
def test_clean_music_speech_and_an_impact_hold_no_clicks(material, rate):
    x = {
        "music": lambda: demo_audio.music(20.0, rate, channels=2, seed=4, smooth=True),
        "voice": lambda: demo_audio.voice(20.0, rate, seed=6, smooth=True),
        "effect": lambda: demo_audio.effect(2.5, rate, seed=7),  # a whoosh into a sudden pitched hit
    }[material]()
    assert found(x, rate) == []


@pytest.mark.parametrize(("material", "rate"), [("music", 44100), ("voice", 16000)])
def test_clicks_over_the_music_or_speech_are_found_and_nothing_else(material, rate):
    x = (
        demo_audio.music(20.0, rate, 2, seed=5, smooth=True)
        if material == "music"
        else demo_audio.voice(20.0, rate, 8, True)
    )
    # Away from the music's beats (a hat's hit there hides a click: bench/clicks.py counts those).
    at = [1.23 + 0.73 * k for k in range(24)]
    at = [t for t in at if abs((t % 0.5) - 0.25) < 0.2]
    spans = found(punched(x, rate, at, db=15), rate)
    hits = [t for t in at if near(spans, t)]
    assert len(hits) >= 0.85 * len(at), (len(hits), len(at))
    assert all(any(abs(a - t) <= 0.003 for t in at) for a, _ in spans), "a click found where none was put"


def test_a_pop_a_smooth_bump_is_found_though_it_is_predicted_once_it_has_begun():
    # Its error marks only its start, and the bump itself follows: louder than what came
    # before, as a drum's attack would be. Once the longest click is over, the level is back.
    rate = 44100
    x = demo_audio.music(20.0, rate, 2, seed=5, smooth=True).astype(np.float64)
    at = [t for t in (1.23 + 0.73 * k for k in range(24)) if abs((t % 0.5) - 0.25) < 0.2]
    for t in at:
        x[round(t * rate) : round(t * rate) + 30] += 0.5 * np.hanning(30)[:, None]  # 0.7 ms
    spans = found(x, rate)
    assert sum(near(spans, t) for t in at) >= 0.7 * len(at) and len(spans) <= len(at)


def test_a_click_in_one_channel_is_found_and_one_in_silence_too():
    rate = 44100
    x = demo_audio.music(6.0, rate, 2, seed=9, smooth=True)
    x[int(4.5 * rate) : int(5.5 * rate)] = 0.0  # a second of digital silence (a pause between tracks)
    y = punched(x, rate, [2.27], db=15, channels=[1])
    y[int(5.0 * rate) : int(5.0 * rate) + 20, :] = 0.2  # a tick in the silence
    spans = found(y, rate)
    assert near(spans, 2.27) and near(spans, 5.0) and len(spans) == 2


def test_a_click_on_a_chunk_s_edge_is_found_once(monkeypatch):
    rate = 16000
    monkeypatch.setattr(clicks_module, "CHUNK_FRAMES", 1 << 15)  # 2.048 s chunks
    x = demo_audio.music(8.0, rate, 2, seed=2, smooth=True)
    at = [(1 << 15) / rate - 0.0002, 2 * (1 << 15) / rate + 0.0001, 3.3]
    spans = found(punched(x, rate, at, db=15), rate)
    assert len(spans) == 3 and all(near(spans, t) for t in at)


def test_a_drum_hit_a_rimshot_or_a_sound_s_end_is_not_a_click():
    rate = 44100
    t = np.arange(rate) / rate
    hum = 0.1 * np.sin(2 * np.pi * 220 * t)
    hit = hum.copy()
    hit[rate // 2 :] += 0.6 * np.random.default_rng(1).standard_normal(rate // 2) * np.exp(-t[: rate // 2] * 20)
    rim = hum.copy()  # a ringing tick: one burst of error as it starts, as a click's; its ring is what differs
    rim[rate // 2 :] += 0.3 * np.sin(2 * np.pi * 1800 * t[: rate // 2]) * np.exp(-t[: rate // 2] / 0.004)
    ends = hum.copy()
    ends[rate // 2 :] = 0.0  # the sound stops dead
    for x in (hit, rim, ends):
        assert found(np.stack([x, x], axis=1), rate) == []


def test_the_manifest_names_clicks_and_dropouts_and_joins_those_that_meet():
    found_ = [
        ("/a/take.wav", Damage(1.0, 1.0004, 10.0, "click")),
        ("/a/take.wav", Damage(1.012, 1.0135, 10.0, "click")),  # their widened regions meet: one row
        ("/a/take.wav", Damage(1.02, 1.05, 10.0, "dropout")),
        ("/a/take.wav", Damage(5.0, 5.0015, 10.0, "click")),
    ]
    rows = list(csv.DictReader(io.StringIO(restoration_manifest(found_, "/a", "fill it", margin_seconds=0.01))))
    assert [(r["id"], r["start"], r["end"], r["note"]) for r in rows] == [
        ("take-click-1.000s", "0.9900", "1.0600", "2 clicks and 1 dropout, 32 ms in all, at 1.000 s"),
        ("take-click-5.000s", "4.9900", "5.0115", "click of 1.5 ms at 5.000 s"),
    ]


def test_damage_whose_regions_meet_only_once_rounded_is_one_row_not_two_that_overlap():
    # Widened by 10 ms, the first ends at 1.01003 s and the second begins at 1.01004 s: apart.
    # Written to 0.1 ms outwards, they were 1.0101 and 1.0100: two rows that overlap, the second
    # refused by the run (one file cannot hold both), its click left in.
    found_ = [
        ("/a/take.wav", Damage(1.0, 1.00003, 10.0, "click")),
        ("/a/take.wav", Damage(1.02004, 1.0201, 10.0, "click")),
    ]
    rows = list(csv.DictReader(io.StringIO(restoration_manifest(found_, "/a", "fill it", margin_seconds=0.01))))
    assert [(r["start"], r["end"], r["note"]) for r in rows] == [
        ("0.9900", "1.0301", "2 clicks, 0.09 ms in all, at 1.000 s")
    ]


def test_a_click_found_inside_a_dropout_does_not_cut_the_dropout_s_row_short():
    # A sound stopped dead is a discontinuity the click search may find just inside the
    # silence. Sorted by start, the click came last, and the row ended where the click did:
    # 30 ms of the dropout outside its row, left silent; and a click after it within the
    # dropout's margin began a row of its own.
    found_ = [
        ("/a/take.wav", Damage(2.0, 2.05, 10.0, "dropout")),
        ("/a/take.wav", Damage(2.0001, 2.0003, 10.0, "click")),
        ("/a/take.wav", Damage(2.065, 2.0652, 10.0, "click")),
    ]
    rows = list(csv.DictReader(io.StringIO(restoration_manifest(found_, "/a", "fill it", margin_seconds=0.01))))
    assert [(r["start"], r["end"], r["note"]) for r in rows] == [
        ("1.9900", "2.0752", "1 dropout and 2 clicks, 50 ms in all, at 2.000 s")
    ]


def crackled(x: np.ndarray, rate: int, per_second: float, start: float, end: float, seed: int = 0):
    """`x` with crackle from `start` to `end` s: ticks of 0.05-1 ms, `per_second` on average
    at random, 0 to +20 dB over the audio around each; and where they are."""
    rng = np.random.default_rng(seed)
    ticks = np.sort(rng.uniform(start, end, rng.poisson(per_second * (end - start))))
    y = np.array(x, np.float64)
    for t in ticks:
        a, w = round(t * rate), max(1, round(rng.uniform(0.05, 1.0) / 1000 * rate))
        level = np.sqrt(np.mean(np.square(y[a - rate // 50 : a + rate // 50]))) + 1e-4
        shape = rng.standard_normal(w) * np.hanning(w + 2)[1:-1] if w > 2 else np.ones(w)
        y[a : a + w] += (shape * level * 10 ** (rng.uniform(0, 20) / 20) / np.abs(shape).max())[:, None]
    return np.clip(y, -1.0, 1.0), list(ticks)


@pytest.mark.parametrize(("material", "rate", "share"), [("music", 44100, 0.6), ("voice", 44100, 0.2)])
def test_where_a_recording_crackles_ticks_close_together_are_found_and_a_voice_s_pulses_are_not(material, rate, share):
    # Two ticks within 12 ms of each other each hide the other from the rule that finds a
    # single click (it stands out from all around it). Where ticks come thick and fast, the
    # recording crackles, and such ticks are clicks too; but a voice's glottal pulses are
    # such bursts as well, evenly spaced, and are left alone (with the ticks among them that
    # fall in step with them: fewer are found over a voice). Before, 22% of the close ticks
    # were found over the music, 19% over the voice; without telling pulses apart, 648 of
    # 931 spans found over the voice were its pulses.
    x = (
        demo_audio.music(20.0, rate, 2, seed=5, smooth=True)
        if material == "music"
        else demo_audio.voice(20.0, rate, 6, True)
    )
    y, ticks = crackled(x, rate, 30.0, 4.0, 16.0)
    spans = found(y, rate)
    close = [t for i, t in enumerate(ticks) if min(abs(t - u) for u in ticks[:i] + ticks[i + 1 :]) < 0.012]
    assert len(close) > 100
    close_found = sum(near(spans, t, 0.003) for t in close)
    false = [a for a, b in spans if not any(a - 0.003 <= t <= b + 0.003 for t in ticks)]
    assert close_found >= share * len(close), (close_found, len(close))
    assert len(false) <= 0.03 * len(spans), (len(false), len(spans))
    assert all(4.0 - 0.3 < a < 16.0 + 0.3 for a, _ in spans)  # none where it does not crackle
