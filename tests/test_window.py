"""What is sent to a hosted model, and how its answer is put back (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from soundpatch.audio import Audio
from soundpatch.errors import RowError
from soundpatch.window import MODEL_RATE, find_offset, pad_end, plan_window, prepare_clip, recover_region


def check_mask_covers(w, a: int, b: int) -> None:
    assert isinstance(w.mask_start, int) and isinstance(w.mask_end, int)
    assert 6 <= w.seconds_total <= 190
    assert 0 <= w.mask_start < w.mask_end <= w.seconds_total
    assert w.mask_start <= (a - w.lo) / w.rate and (b - w.lo) / w.rate <= w.mask_end


def test_a_sub_second_region_gets_a_whole_second_mask_that_covers_it():
    rate = 48000
    a, b = round(12.3 * rate), round(12.8 * rate)
    w = plan_window(30 * rate, rate, a, b, context_seconds=10)
    check_mask_covers(w, a, b)
    assert w.mask_end - w.mask_start <= 2
    assert w.pad == 0 and (w.hi - w.lo) == w.seconds_total * rate


def test_a_short_effect_is_sent_whole_and_padded_to_six_seconds():
    rate = 48000
    frames = int(2.5 * rate)
    w = plan_window(frames, rate, int(1.2 * rate), int(1.65 * rate))
    assert (w.lo, w.hi, w.seconds_total) == (0, frames, 6)
    assert w.pad == 6 * MODEL_RATE - int(2.5 * MODEL_RATE)
    check_mask_covers(w, int(1.2 * rate), int(1.65 * rate))


@pytest.mark.parametrize("where", [5.0, 1800.0, 3590.0])
def test_an_hour_of_tape_sends_only_the_context_around_the_region(where):
    rate = 44100
    frames = 3600 * rate
    a, b = int(where * rate), int((where + 1.5) * rate)
    w = plan_window(frames, rate, a, b, context_seconds=10)
    check_mask_covers(w, a, b)
    assert w.seconds_total <= 22 and 0 <= w.lo and w.hi <= frames
    assert w.hi - w.lo == w.seconds_total * rate


def test_a_long_region_near_the_end_of_four_minutes():
    rate = 44100
    frames = 240 * rate
    a, b = int(232.5 * rate), int(236.0 * rate)
    w = plan_window(frames, rate, a, b, context_seconds=10)
    check_mask_covers(w, a, b)
    assert w.hi == frames


def test_regions_over_190_seconds_are_refused_before_anything_is_sent():
    with pytest.raises(RowError, match="at most 190 s"):
        plan_window(600 * 8000, 8000, 0, 200 * 8000)


@pytest.mark.parametrize("mode", ["reflect", "silence", "loop"])
def test_padding_modes(mode):
    x = np.linspace(0.1, 1.0, 10, dtype=np.float32)[:, None].repeat(2, 1)
    padded = pad_end(x, 25, mode)
    assert padded.shape == (35, 2) and np.array_equal(padded[:10], x)
    if mode == "silence":
        assert not padded[10:].any()
    elif mode == "loop":
        assert np.array_equal(padded[10:20], x)
    else:
        assert np.allclose(padded[10], x[-2]) and np.abs(np.diff(padded[:, 0])).max() <= 0.11


def music_like(seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    sig = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 331 * t) + 0.02 * rng.standard_normal(len(t))
    return np.stack([sig * (1 - 0.15 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("rate", "channels", "shift"),
    [(48000, 1, 1105), (44100, 2, 0), (22050, 2, -300), (96000, 6, 2000), (8000, 1, 50)],
)
def test_the_models_audio_lands_exactly_in_the_region_after_shift_and_resampling(rate, channels, shift):
    seconds = 20.0
    audio = Audio(music_like(seconds, rate, channels), rate, "WAV", "FLOAT")
    a, b = int(7.3 * rate), int(8.1 * rate)
    w = plan_window(audio.frames, rate, a, b, context_seconds=5)
    sent = prepare_clip(audio, w)
    assert sent.shape == (w.seconds_total * MODEL_RATE, 2)
    # The "model": writes a 700 Hz tone into the mask, keeps the rest, and its codec
    # delays (or advances) everything by `shift` frames.
    t = np.arange(len(sent)) / MODEL_RATE
    answer = sent.copy()
    m0, m1 = w.mask_start * MODEL_RATE, w.mask_end * MODEL_RATE
    answer[m0:m1] = (0.3 * np.sin(2 * np.pi * 700 * t[m0:m1]))[:, None]
    answer = np.roll(answer, shift, axis=0)
    fill, offset = recover_region(answer, MODEL_RATE, sent, w, audio, a, b)
    assert offset == shift
    assert fill.shape == (b - a, channels)
    expected = 0.3 * np.sin(2 * np.pi * 700 * (np.arange(a, b) - w.lo) / rate)
    inner = slice(200, -200)  # away from the mask edge the resampler smooths
    reference = fill[inner].mean(axis=1) if channels > 2 else fill[inner, 0]
    gain = np.dot(reference, expected[inner]) / np.dot(expected[inner], expected[inner])
    err = reference - gain * expected[inner]
    assert 10 * np.log10(np.sum((gain * expected[inner]) ** 2) / np.sum(err**2)) > 40
    assert 0.5 < gain < 1.5


def test_offset_is_zero_when_there_is_no_unmasked_audio_to_compare():
    sent = np.zeros((6 * MODEL_RATE, 2), np.float32)
    w = plan_window(6 * 44100, 44100, 0, 6 * 44100)
    assert find_offset(sent, sent, w) == 0


def _noise(seed: int, kind: str | None = None, hz: float = 0.0) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    x = np.random.default_rng(seed).normal(0, 0.3, 6 * MODEL_RATE)
    return sosfilt(butter(8, hz, kind, fs=MODEL_RATE, output="sos"), x) if kind else x


def _stereo(x: np.ndarray) -> np.ndarray:
    return np.stack([x, 0.8 * x], axis=1).astype(np.float32)


WINDOW_6S = plan_window(6 * 44100, 44100, int(2.2 * 44100), int(2.7 * 44100), 10)


@pytest.mark.parametrize("shift", [0, 1, 7, 123, -77, 1999, -22050, 22050])
def test_alignment_is_exact_to_the_frame_for_audio_with_only_high_frequencies(shift):
    # The first search looks at 1/8 of the rate; content above that must not fool it.
    sent = _stereo(_noise(1, "highpass", 8000))
    assert find_offset(sent, 0.7 * np.roll(sent, shift, axis=0), WINDOW_6S) == shift


@pytest.mark.parametrize("shift", [0, 5, 321, -1500])
def test_alignment_holds_when_only_the_highs_came_back_and_the_lows_were_rewritten(shift):
    # The coarse search sees mostly the (unrelated) lows and lands on a wrong lag; the
    # weak match there sends it to the frame-by-frame search, which finds the highs.
    highs = _noise(1, "highpass", 6000)
    sent = _stereo(highs + _noise(2, "lowpass", 1500))
    answer = _stereo(np.roll(highs, shift) + _noise(3, "lowpass", 1500))
    assert find_offset(sent, answer, WINDOW_6S) == shift
