"""The embedded engine against ground truth: punch gaps into real-ish material, refill them.

The numbers these tests print are the ones quoted in the README (run with -s to see them).
"""

from __future__ import annotations

import numpy as np
import pytest

from soundpatch.audio import Audio
from soundpatch.engine import autoregressive, toeplitz
from soundpatch.engine.evaluation import compare, linear_fill, snr_db, zero_fill
from soundpatch.providers.base import InpaintRequest
from soundpatch.providers.local import LocalEngine, ar_fill, ar_order


def engine_fill(rate: int):
    engine = LocalEngine()

    def fill(holed: np.ndarray, a: int, b: int) -> np.ndarray:
        return engine.inpaint(InpaintRequest(Audio(holed, rate, "WAV", "FLOAT"), a, b, "ignored")).fill

    return fill


def measure(x: np.ndarray, rate: int, gap: float) -> dict[str, float]:
    return compare(x, rate, gap, {"engine": engine_fill(rate), "zero": zero_fill, "linear": linear_fill})


@pytest.mark.parametrize(("gap", "margin"), [(0.005, 10.0), (0.020, 10.0), (0.050, 10.0), (0.100, 10.0), (1.0, 10.0)])
def test_music_gaps_are_restored_far_better_than_zero_or_linear_fill(music_44k, gap, margin):
    r = measure(music_44k, 44100, gap)
    print(
        f"\nmusic 44.1 kHz stereo, gap {gap * 1000:.0f} ms: engine {r['engine']:.1f} dB, "
        f"zero-fill {r['zero']:.1f} dB, linear {r['linear']:.1f} dB"
    )
    assert r["engine"] >= r["zero"] + margin
    assert r["engine"] >= r["linear"] + margin


@pytest.mark.parametrize(("gap", "margin"), [(0.005, 10.0), (0.020, 6.0)])
def test_speech_gaps_are_restored_better_than_zero_or_linear_fill(voice_16k, gap, margin):
    r = measure(voice_16k, 16000, gap)
    print(
        f"\nvoice 16 kHz mono, gap {gap * 1000:.0f} ms: engine {r['engine']:.1f} dB, "
        f"zero-fill {r['zero']:.1f} dB, linear {r['linear']:.1f} dB"
    )
    assert r["engine"] >= r["zero"] + margin
    assert r["engine"] >= r["linear"] + margin


def test_gaps_at_the_very_start_and_end_are_filled_without_crashing(music_44k):
    engine = LocalEngine()
    x = music_44k[: 44100 * 3]
    audio = Audio(x, 44100, "WAV", "FLOAT")
    for a, b in ((0, 2000), (len(x) - 2000, len(x)), (0, 44100), (len(x) - 44100, len(x))):
        fill = engine.inpaint(InpaintRequest(audio, a, b, "p")).fill
        assert fill.shape == (b - a, 2) and np.isfinite(fill).all()
        assert np.max(np.abs(fill)) <= 1.0


def test_a_region_longer_than_the_rest_of_the_recording_is_looped(music_44k):
    x = music_44k[:44100]
    fill = LocalEngine().inpaint(InpaintRequest(Audio(x, 44100, "WAV", "FLOAT"), 10000, 40000, "p"))
    assert fill.fill.shape == (30000, 2)
    assert "loop" in fill.method
    assert np.sqrt(np.mean(fill.fill**2)) > 0.01  # not silence


def test_on_a_long_recording_the_probes_look_near_themselves_and_the_region_90_s_each_side(monkeypatch):
    # A restoration batch of a 30-minute tape's dropouts: the probes (which only choose the
    # method) searched as far as the region's own fill, 90 s each side, so a row cost three
    # times a short clip's. They now look 30 s either side of themselves; a clip shorter
    # than that is probed exactly as before, and the region itself still searches 90 s.
    from soundpatch.engine import similarity

    rate = 8000
    x = np.random.default_rng(3).normal(0, 0.1, (rate * 400, 1)).astype(np.float32)
    searched: list[int] = []
    real = similarity.find_matches

    def find_matches(mono: np.ndarray, rate: int, a: int, b: int, limit: int = 8):
        searched.append(len(mono))
        return real(mono, rate, a, b, limit)

    monkeypatch.setattr(similarity, "find_matches", find_matches)
    engine = LocalEngine()
    a = 200 * rate
    fill = engine.inpaint(InpaintRequest(Audio(x, rate, "WAV", "FLOAT"), a, a + 400, "")).fill  # 50 ms: probed
    assert fill.shape == (400, 1) and len(searched) >= 2
    assert all(n <= 62 * rate for n in searched[:2]), [n / rate for n in searched[:2]]

    searched.clear()
    engine.inpaint(InpaintRequest(Audio(x, rate, "WAV", "FLOAT"), a, a + 2400, ""))  # 300 ms: a passage, unprobed
    assert searched and searched[0] >= 180 * rate, [n / rate for n in searched]

    searched.clear()
    short = x[: 40 * rate]
    engine.inpaint(InpaintRequest(Audio(short, rate, "WAV", "FLOAT"), 20 * rate, 20 * rate + 400, ""))
    assert searched[:2] == [len(short)] * 2  # all of it, as before


def test_seeds_choose_among_equally_good_passages(music_44k):
    # A strictly periodic loop: every period is an equally good source for the gap.
    rate = 8000
    x = np.tile(music_44k[: rate // 2, :1], (20, 1))  # half a second of music, repeated exactly
    audio = Audio(x, rate, "WAV", "FLOAT")
    a, b = 5 * rate, 5 * rate + rate // 4
    methods = {LocalEngine().inpaint(InpaintRequest(audio, a, b, "p", seed=s)).method for s in range(6)}
    assert len(methods) > 1
    for s in range(3):
        fill = LocalEngine().inpaint(InpaintRequest(audio, a, b, "p", seed=s)).fill
        assert snr_db(x[a:b], fill) > 40


def test_a_passage_from_where_the_music_was_louder_is_brought_to_the_gaps_level(music_44k):
    # A two-second phrase played six times, the last time 12 dB softer, with a 300 ms gap in
    # it: its best matches are the loud playings (the match scores shapes, not levels), so
    # the passage came back 12 dB too loud (-9.3 dB SNR, worse than silence). Brought to the
    # level of the gap's surroundings, it is the soft playing itself.
    rate = 44100
    phrase = music_44k[: 2 * rate]
    x = np.concatenate([phrase] * 5 + [phrase * 10 ** (-12 / 20)]).astype(np.float32)
    a, b = int(10.8 * rate), int(11.1 * rate)
    truth = x[a:b].copy()
    fill = LocalEngine().inpaint(InpaintRequest(Audio(x, rate, "WAV", "FLOAT"), a, b, "p", 1))
    assert fill.method.startswith("similarity") and "-12.0 dB to its surroundings" in fill.method, fill.method
    assert snr_db(truth, fill.fill) > 30, snr_db(truth, fill.fill)
    # A passage as loud as the gap's surroundings is copied as it is.
    same = LocalEngine().inpaint(InpaintRequest(Audio(x, rate, "WAV", "FLOAT"), a - 4 * rate, b - 4 * rate, "p", 1))
    assert "dB to its surroundings" not in same.method and snr_db(x[a - 4 * rate : b - 4 * rate], same.fill) > 60


def test_a_dropout_is_not_filled_with_another_dropout(music_44k):
    # An archive's recording with two dropouts, where the passage that fits the first best
    # (its surroundings recur note for note later on) is the second: copying that one would
    # restore nothing.
    rate = 8000
    x = music_44k[: 8 * rate, :1].copy()
    x[5 * rate : 7 * rate] = x[1 * rate : 3 * rate]  # 1-3 s recurs at 5-7 s
    a, b = int(1.8 * rate), int(2.2 * rate)
    x[a + 4 * rate : b + 4 * rate] = 0.0  # the dropout in the recurrence
    x[a:b] = 0.0  # the dropout being restored
    made = LocalEngine().inpaint(InpaintRequest(Audio(x, rate, "WAV", "FLOAT"), a, b, "p"))
    silent = np.abs(made.fill[:, 0]) < 1e-5
    assert not silent[: len(silent) - 40].reshape(-1, 40).all(axis=1).any(), made.method  # no 5 ms of silence
    assert np.sqrt(np.mean(made.fill**2)) > 0.3 * np.sqrt(np.mean(x[a - rate // 2 : a] ** 2)), made.method


def level_db(made: np.ndarray, around: np.ndarray) -> float:
    """The level of a fill against the audio around its gap (statistically steadier than
    the few samples the gap held: 88 samples of hiss vary by 0.7 dB)."""
    return 10 * float(
        np.log10(np.mean(np.square(made, dtype=np.float64)) / np.mean(np.square(around, dtype=np.float64)))
    )


@pytest.mark.parametrize("gap", [0.002, 0.005, 0.015])
def test_a_gap_in_hiss_is_filled_with_hiss_at_its_level_not_with_a_hole(gap):
    # The least-squares fill is the gap's expected value, which in noise fades towards
    # silence mid-gap: it read 4.6-6.4 dB under the hiss around these gaps (5-11 dB at
    # 5-100 ms, bench/local_engine.py); now within 1 dB of it.
    rate = 44100
    hiss = (0.01 * np.random.default_rng(3).standard_normal((6 * rate, 2))).astype(np.float32)
    engine = LocalEngine()
    for start in (1.3, 2.9, 4.1):
        a = int(start * rate)
        b = a + int(gap * rate)
        around = hiss[a - rate // 10 : b + rate // 10]
        holed = hiss.copy()
        holed[a:b] = 0.0
        fill = engine.inpaint(InpaintRequest(Audio(holed, rate, "WAV", "FLOAT"), a, b, "")).fill
        assert abs(level_db(fill, around)) < 1.5, (start, level_db(fill, around))
        middle = fill[(b - a) // 4 : 3 * (b - a) // 4]
        assert level_db(middle, around) > -2.0, (start, level_db(middle, around))
        assert abs(np.corrcoef(fill.T)[0, 1]) < 0.5  # each channel's own hiss, as around it
        again = engine.inpaint(InpaintRequest(Audio(holed, rate, "WAV", "FLOAT"), a, b, "", seed=99)).fill
        assert np.array_equal(again, fill)  # the same result whatever the seed: not a variation

    dual_mono = np.repeat(hiss[:, :1], 2, axis=1)  # one channel's hiss in both: so is the fill
    a, b = int(3 * rate), int(3 * rate) + int(gap * rate)
    dual_mono[a:b] = 0.0
    fill = engine.inpaint(InpaintRequest(Audio(dual_mono, rate, "WAV", "FLOAT"), a, b, "")).fill
    assert np.array_equal(fill[:, 0], fill[:, 1])
    assert abs(level_db(fill, hiss[a - rate // 10 : b + rate // 10, :1])) < 1.5


def test_music_keeps_its_least_squares_fill(music_44k):
    # Music is predictable: its fill holds its level already, and noise would only cost SNR.
    rate, x = 44100, music_44k
    for a in (int(3.1 * rate), int(7.7 * rate), int(12.4 * rate)):
        b = a + int(0.01 * rate)
        holed = x.copy()
        holed[a:b] = 0.0
        order = ar_order(b - a)
        expected = np.stack([autoregressive.interpolate(holed[:, ch], a, b, order) for ch in range(2)], axis=1)
        assert np.array_equal(ar_fill(holed, a, b), expected)
        assert np.array_equal(ar_fill(holed, a, b, noise=False), expected)


@pytest.mark.parametrize(
    ("manifest", "alike"),
    [("sfx_variations.yaml", "9 results came out identical"), ("restoration.csv", None)],
)
def test_variations_the_engine_made_alike_are_named_in_a_note(tmp_path, manifest, alike):
    # The example manifests on the embedded engine: every variation of a region comes back
    # the same (the engine has one best passage there), and the run says so instead of
    # letting a user find out by listening. Restoration asks for each region once: no note.
    from pathlib import Path

    from soundpatch.batch import Batch
    from soundpatch.config import load_config
    from soundpatch.manifest import load_manifest

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(overrides={"output.uri": str(tmp_path / "out"), "runs_dir": str(tmp_path / "runs")})
    batch = Batch(load_manifest(repo / "manifests" / manifest), cfg, "alike")
    try:
        outcomes = [batch.process(e) for e in batch.manifest.edits]
        notes = batch.notes()
    finally:
        batch.close()
    assert {o.status for o in outcomes} == {"succeeded"}
    said = [n for n in notes if "came out identical" in n]
    if alike is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(alike), said
        assert "(metal-v1 = metal-v2 = wood-v1 = ...; whoosh-tail-v1 = whoosh-tail-v2)" in said[0]


def ar_system(rng: np.random.Generator, m: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """A least-squares fill's system (autoregressive.py): the autocorrelation of an AR
    polynomial of order p, banded in an m x m matrix."""
    a = np.concatenate([[1.0], rng.standard_normal(p) * 0.3 / np.sqrt(p)])
    column = np.zeros(m)
    column[: min(m, p + 1)] = np.correlate(a, a, mode="full")[p : p + min(m, p + 1)]
    return column, rng.standard_normal(m)


def test_the_compiled_levinson_solves_the_engines_systems_as_scipy_does():
    from scipy.linalg import solve_toeplitz

    assert toeplitz._kernel() is not None  # numba is there and compiles: the solves leave the interpreter lock
    rng = np.random.default_rng(11)
    for m, p in [(1, 16), (2, 16), (17, 16), (441, 1000), (3000, 1000)]:
        column, rhs = ar_system(rng, m, p)
        expected = solve_toeplitz(column, rhs)
        np.testing.assert_allclose(toeplitz.solve_symmetric_toeplitz(column, rhs), expected, rtol=1e-9, atol=1e-12)
    # Yule-Walker's, as ar_polynomial sets it up (white-noise corrected autocorrelation of music).
    x = np.sin(np.arange(4000) * 0.05) + 0.01 * rng.standard_normal(4000)
    r = np.correlate(x, x, mode="full")[3999 : 3999 + 301]
    r[0] *= 1 + 1e-5
    np.testing.assert_allclose(
        toeplitz.solve_symmetric_toeplitz(r[:300], -r[1:301]), solve_toeplitz(r[:300], -r[1:301]), rtol=1e-6
    )


def test_a_system_the_symmetric_recursion_cannot_solve_is_answered_by_scipy():
    # Symmetric but not positive definite: the recursion stops (its second leading minor is
    # negative), and scipy's general Levinson, which needs only nonsingular ones, answers.
    column, rhs = np.array([1.0, 2.0, 0.5]), np.array([1.0, -1.0, 2.0])
    assert np.isnan(toeplitz._kernel()(column, rhs)).all()
    matrix = np.array([[1.0, 2.0, 0.5], [2.0, 1.0, 2.0], [0.5, 2.0, 1.0]])
    np.testing.assert_allclose(toeplitz.solve_symmetric_toeplitz(column, rhs), np.linalg.solve(matrix, rhs))
