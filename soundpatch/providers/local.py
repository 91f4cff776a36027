"""The embedded engine: context-based inpainting with no model, no network, no key, $0.

It treats the region as missing and rebuilds it from the rest of the recording:
- short regions (up to SHORT_GAP_SECONDS): least-squares AR interpolation from both
  sides, per channel (engine/autoregressive.py);
- longer regions: the best-matching passage elsewhere in the same recording
  (engine/similarity.py), entered and left through short equal-power crossfades from
  AR continuations of the surroundings, so the seams meet the original whatever the
  region held before (a dropout, a click, unwanted sound);
- a region too long for the recording to hold another passage like it: the longest
  stretch of known audio, looped.

The prompt does not steer this engine; the report says so. The seed picks among
passages that fit equally well, so variations differ where the material allows it.
"""

from __future__ import annotations

import numpy as np

from soundpatch.audio import equal_power_ramps
from soundpatch.engine import autoregressive, similarity
from soundpatch.providers.base import InpaintRequest, Prediction

SHORT_GAP_SECONDS = 0.1
# AR order for short gaps: about three times the gap (Janssen's rule of thumb), bounded.
MAX_AR_ORDER = 1000
# Crossfade between AR continuation and the matched passage at each seam.
SEAM_SECONDS = 0.02
SEAM_AR_ORDER = 256


class LocalEngine:
    name = "local"
    uses_prompt = False

    def __init__(self, price_usd: float = 0.0) -> None:
        self.price_usd = price_usd

    def inpaint(self, request: InpaintRequest) -> Prediction:
        audio, a, b = request.audio, request.a, request.b
        m = b - a
        rate = audio.rate
        if m <= SHORT_GAP_SECONDS * rate:
            order = int(min(MAX_AR_ORDER, max(16, 3 * m)))
            ctx = 4 * order
            lo, hi = max(0, a - ctx), min(audio.frames, b + ctx)
            window = audio.float_slice(lo, hi)
            fill = np.stack(
                [autoregressive.interpolate(window[:, ch], a - lo, b - lo, order)
                 for ch in range(audio.channels)],
                axis=1,
            )
            return self._prediction(fill, "autoregressive")
        return self._passage_fill(request)

    def _passage_fill(self, request: InpaintRequest) -> Prediction:
        audio, a, b = request.audio, request.a, request.b
        m, rate = b - a, audio.rate
        reach = int(similarity.SEARCH_RANGE_SECONDS * rate) + m + 2 * rate
        lo, hi = max(0, a - reach), min(audio.frames, b + reach)
        window = audio.float_slice(lo, hi)
        wa, wb = a - lo, b - lo
        matches = similarity.find_matches(window.mean(axis=1), rate, wa, wb)
        if matches:
            match = similarity.choose(matches, request.seed)
            fill = window[match.start : match.start + m].copy()
            method = f"similarity (passage at {(match.start + lo) / rate:.3f} s, score {match.score:.2f})"
        else:
            fill = _loop_known(window, wa, wb)
            method = "loop (recording too short for a matching passage)"
        fill = _enter_and_leave(window, wa, wb, fill, rate)
        return self._prediction(fill, method)

    def _prediction(self, fill: np.ndarray, method: str) -> Prediction:
        # Both methods meet the surroundings already; a splice crossfade would only mix
        # in what the region held (often a dropout), so none is asked for.
        return Prediction(
            fill=np.clip(fill, -1.0, 1.0).astype(np.float32),
            cost_usd=self.price_usd,
            crossfade=0,
            method=method,
        )


def _loop_known(window: np.ndarray, a: int, b: int) -> np.ndarray:
    before, after = window[:a], window[b:]
    material = before if len(before) >= len(after) else after
    if len(material) == 0:
        return np.zeros((b - a, window.shape[1]), dtype=np.float32)
    reps = int(np.ceil((b - a) / len(material)))
    return np.tile(material, (reps, 1))[: b - a]


def _enter_and_leave(
    window: np.ndarray, a: int, b: int, fill: np.ndarray, rate: int
) -> np.ndarray:
    """Crossfade from an AR continuation of the audio before the gap into the fill, and
    from the fill into a backward AR continuation of the audio after it."""
    m = b - a
    n = min(int(SEAM_SECONDS * rate), m // 4)
    if n <= 0:
        return fill
    fade_out, fade_in = equal_power_ramps(n)
    fill = fill.astype(np.float32, copy=True)
    for ch in range(window.shape[1]):
        x = window[:, ch].astype(np.float64)
        if a > 0:
            ahead = autoregressive.extrapolate(x[max(0, a - 8 * SEAM_AR_ORDER) : a], n, SEAM_AR_ORDER, fade=False)
            fill[:n, ch] = ahead * fade_out[:, 0] + fill[:n, ch] * fade_in[:, 0]
        if b < len(x):
            behind = autoregressive.extrapolate(
                x[b : b + 8 * SEAM_AR_ORDER][::-1], n, SEAM_AR_ORDER, fade=False
            )[::-1]
            fill[-n:, ch] = fill[-n:, ch] * fade_out[:, 0] + behind * fade_in[:, 0]
    return fill
