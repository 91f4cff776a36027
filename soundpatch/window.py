"""What a hosted model is sent, and how its answer is put back where it belongs.

Stable Audio 2.5 Inpaint takes a clip of 6-190 s, a mask in whole seconds, and works in
44.1 kHz stereo. Users hand us sub-second regions, 2 s effects, hour-long tapes, any rate
and layout. So:
- plan_window: a clip of whole seconds around the region (context on both sides, at
  most 190 s: the rest of a long file never leaves the machine) whose integer mask
  covers the region; a recording shorter than 6 s is padded at its end;
- prepare_clip: that clip at 44.1 kHz stereo;
- recover_region: the answer aligned to what was sent (codecs and resamplers shift
  audio; the offset is found by correlating the unmasked context), brought back to the
  input's rate and layout, and cut to exactly the region; only that is spliced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soxr

from soundpatch.audio import Audio, mono
from soundpatch.errors import RowError

MODEL_RATE = 44100
MIN_SECONDS = 6
MAX_SECONDS = 190
MAX_ALIGN_SECONDS = 0.5  # the largest shift looked for (MP3 delay is ~25 ms)
PadMode = Literal["reflect", "silence", "loop"]


@dataclass(frozen=True)
class Window:
    lo: int  # first source frame sent
    hi: int  # one past the last source frame sent
    rate: int  # the source's rate
    seconds_total: int  # the clip's length in whole seconds, padding included
    pad: int  # model-rate frames of padding after the source audio
    mask_start: int  # whole seconds, in the clip's timeline
    mask_end: int

    @property
    def offset_seconds(self) -> float:
        return self.lo / self.rate


def plan_window(frames: int, rate: int, a: int, b: int, context_seconds: float = 10.0) -> Window:
    """The clip to send for source frames [a, b) of a recording of `frames` frames."""
    region = (b - a) / rate
    if region > MAX_SECONDS:
        raise RowError(f"region is {region:.1f} s long; the model replaces at most {MAX_SECONDS} s at once")
    duration = frames / rate
    start, end = a / rate, b / rate
    # Whole seconds of clip: the region plus context, within the model's limits.
    wanted = clip_seconds(region, context_seconds)
    if duration <= wanted:
        lo, hi = 0, frames
        total = max(MIN_SECONDS, math.ceil(duration - 1e-9))
    else:
        total = wanted
        lo, hi = _centered(frames, rate, a, b, total)
    sent = (hi - lo) / rate
    pad = max(0, round(total * MODEL_RATE) - round(sent * MODEL_RATE))
    offset = lo / rate
    mask_start = max(0, math.floor(start - offset + 1e-9))
    mask_end = min(total, math.ceil(end - offset - 1e-9))
    if mask_end <= mask_start:
        mask_end = min(total, mask_start + 1)
    return Window(lo, hi, rate, total, pad, mask_start, mask_end)


def clip_seconds(region_seconds: float, context_seconds: float) -> int:
    """How long a clip is wanted for a region: the region and its context each side, in
    whole seconds the model takes (a recording shorter than that is sent whole)."""
    return min(MAX_SECONDS, max(MIN_SECONDS, math.ceil(region_seconds + 2 * context_seconds)))


def answer_bytes_bound(region_seconds: float, context_seconds: float) -> int:
    """The most a model's answer for a region's clip weighs: the clip's seconds of 32-bit
    stereo at the model's rate, as WAV (what a paid answer kept on disk takes, answers.py)."""
    return 65_536 + clip_seconds(region_seconds, context_seconds) * MODEL_RATE * 2 * 4


def _centered(frames: int, rate: int, a: int, b: int, seconds: int) -> tuple[int, int]:
    """`seconds` of source around [a, b), shifted to stay inside the recording."""
    span = seconds * rate
    lo = (a + b) // 2 - span // 2
    lo = min(max(0, lo), frames - span)
    return lo, lo + span


def prepare_clip(audio: Audio, window: Window, pad_mode: PadMode = "reflect") -> np.ndarray:
    """The clip as float32 (frames, 2) at MODEL_RATE: resampled, stereo, padded to length."""
    x = audio.float_slice(window.lo, window.hi)
    stereo = to_stereo(x)
    if audio.rate != MODEL_RATE:
        stereo = soxr.resample(stereo, audio.rate, MODEL_RATE).astype(np.float32)
    length = window.seconds_total * MODEL_RATE
    body = stereo[: length - window.pad] if window.pad else stereo[:length]
    if len(body) < length:
        body = pad_end(body, length - len(body), pad_mode)
    return np.ascontiguousarray(body[:length], dtype=np.float32)


def to_stereo(x: np.ndarray) -> np.ndarray:
    if x.shape[1] == 2:
        return x
    if x.shape[1] == 1:
        return np.repeat(x, 2, axis=1)
    # More channels: even-numbered ones to the left, odd-numbered to the right.
    return np.stack([mono(x[:, 0::2]), mono(x[:, 1::2])], axis=1)


def pad_end(x: np.ndarray, n: int, mode: PadMode) -> np.ndarray:
    """Pad n frames after x. Reflection keeps level and spectrum continuous across the
    join, so the model sees no artificial ending it might imitate inside the region."""
    if n <= 0:
        return x
    if mode == "silence" or len(x) < 2:
        return np.concatenate([x, np.zeros((n, x.shape[1]), x.dtype)])
    if mode == "loop":
        return np.concatenate([x, np.resize(x, (n, x.shape[1]))])
    out = [x]
    produced, flip = 0, True
    while produced < n:
        piece = x[::-1][1:] if flip else x[1:]
        out.append(piece[: n - produced])
        produced += len(out[-1])
        flip = not flip
    return np.concatenate(out)


def find_offset(sent: np.ndarray, result: np.ndarray, window: Window) -> int:
    """Frames by which `result` lags `sent`, measured on the audio outside the mask.

    Searched coarse to fine: every lag at 1/COARSE of the rate, then each frame around
    the best one. A match that is not clearly the same audio (normalized correlation
    under CONFIDENT, e.g. when little but high frequencies are there) is searched again
    frame by frame over the whole range: as exact either way, ~10x less work usually.
    """
    max_lag = int(MAX_ALIGN_SECONDS * MODEL_RATE)
    pad = -(-max_lag // COARSE) * COARSE  # got[i] is result frame i - pad
    ref = mono(sent.astype(np.float64))
    got = np.zeros(len(result) + 2 * pad)
    got[pad : pad + len(result)] = mono(result)
    m0, m1 = window.mask_start * MODEL_RATE, window.mask_end * MODEL_RATE
    real_end = window.seconds_total * MODEL_RATE - window.pad
    spans = [
        (s0, s1)
        for s0, s1 in [(max(0, m0 - 5 * MODEL_RATE), m0), (m1, min(real_end, m1 + 5 * MODEL_RATE))]
        if s1 - s0 >= MODEL_RATE // 10 and np.any(ref[s0:s1])
    ]
    if not spans:
        return 0
    coarse_spans = [(s0 // COARSE, s1 // COARSE) for s0, s1 in spans]
    coarse = COARSE * _best_lag(_decimate(ref), _decimate(got), coarse_spans, pad // COARSE, pad // COARSE)
    near = range(max(-max_lag, coarse - 2 * COARSE), min(max_lag, coarse + 2 * COARSE) + 1)
    scores = [sum(_dot(ref, got, s0, s1, lag + pad) for s0, s1 in spans) for lag in near]
    best = near[int(np.argmax(scores))]
    energy = sum(_dot(ref, ref, s0, s1, 0) for s0, s1 in spans)
    echo = sum(_dot(got, got, s0 + best + pad, s1 + best + pad, 0) for s0, s1 in spans)
    if energy > 0 and echo > 0 and max(scores) / np.sqrt(energy * echo) >= CONFIDENT:
        return best
    return _best_lag(ref, got, spans, max_lag, pad)


COARSE = 8  # the first search's decimation
CONFIDENT = 0.5  # normalized correlation that accepts the coarse-to-fine match


def _decimate(x: np.ndarray) -> np.ndarray:
    n = len(x) // COARSE * COARSE
    return mono(x[:n].reshape(-1, COARSE))


def _dot(a: np.ndarray, b: np.ndarray, s0: int, s1: int, shift: int) -> float:
    return float(np.dot(a[s0:s1], b[s0 + shift : s1 + shift]))


def _best_lag(ref: np.ndarray, got: np.ndarray, spans: list[tuple[int, int]], max_lag: int, pad: int) -> int:
    """The lag in [-max_lag, max_lag] that best matches ref on spans (got[i] is frame i - pad)."""
    from scipy.signal import correlate  # scipy.signal takes a second to import: only when a row needs it

    scores = np.zeros(2 * max_lag + 1)
    for s0, s1 in spans:
        if s1 > s0:
            segment = got[s0 + pad - max_lag : s1 + pad + max_lag]
            scores += correlate(segment, ref[s0:s1], mode="valid", method="fft")
    return int(np.argmax(scores)) - max_lag


def recover_region(
    result: np.ndarray, result_rate: int, sent: np.ndarray, window: Window, original: Audio, a: int, b: int
) -> tuple[np.ndarray, int]:
    """The model's audio for source frames [a, b), at the source's rate and layout.

    Returns (fill, offset) where offset is the shift (model-rate frames) that was undone.
    """
    if result.ndim == 1:
        result = result[:, None]
    result = to_stereo(result.astype(np.float32))
    if result_rate != MODEL_RATE:
        result = soxr.resample(result, result_rate, MODEL_RATE).astype(np.float32)
    offset = find_offset(sent, result, window)
    length = window.seconds_total * MODEL_RATE
    aligned = np.zeros((length, 2), np.float32)
    src_lo, src_hi = max(0, offset), min(len(result), offset + length)
    if src_hi > src_lo:
        aligned[src_lo - offset : src_hi - offset] = result[src_lo:src_hi]
    # The clip starts exactly at source frame `lo`, so after resampling the whole of it
    # back, frame k is source frame lo + k: no fractional drift at the region.
    back = aligned if original.rate == MODEL_RATE else soxr.resample(aligned, MODEL_RATE, original.rate)
    piece = back[a - window.lo : b - window.lo]
    if len(piece) < b - a:
        piece = np.concatenate([piece, np.zeros((b - a - len(piece), 2), np.float32)])
    return from_stereo(piece, original, window).astype(np.float32), offset


def from_stereo(piece: np.ndarray, original: Audio, window: Window) -> np.ndarray:
    channels = original.channels
    if channels == 2:
        return piece
    if channels == 1:
        return mono(piece)[:, None]
    # Several channels: each takes its side of the stereo result, scaled so that the
    # channel keeps its share of the level it had around the region (a quiet LFE or
    # surround stays quiet).
    context = original.float_slice(window.lo, window.hi)
    side_level = [np.sqrt(np.mean(np.square(mono(context[:, s::2])))) + 1e-9 for s in (0, 1)]
    out = np.empty((len(piece), channels), np.float32)
    for c in range(channels):
        level = np.sqrt(np.mean(np.square(context[:, c]))) + 1e-9
        out[:, c] = piece[:, c % 2] * min(4.0, level / side_level[c % 2])
    return out
