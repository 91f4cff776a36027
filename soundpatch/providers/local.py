"""The embedded engine: context-based inpainting with no model, no network, no key, $0.

It treats the region as missing and rebuilds it from the rest of the recording:
- short regions (up to AR_ONLY_SECONDS): least-squares AR interpolation from both sides,
  per channel (engine/autoregressive.py);
- long regions (over SHORT_GAP_SECONDS): the best-matching passage elsewhere in the
  same recording (engine/similarity.py); each seam is then re-interpolated as a short
  gap between the original and the passage, so the seams meet the original whatever
  the region held before (a dropout, a click, unwanted sound);
- in between, both are tried on a probe: a gap of the same length punched into nearby
  known audio. Whichever restores the probe better fills the region. Tonal music
  favours the AR model, repetitive material the passage;
- a region too long for the recording to hold another passage: known audio, looped.

The prompt does not steer this engine; the report says so. The seed picks among
passages that fit equally well, so variations differ where the material allows it.
"""

from __future__ import annotations

import re

import numpy as np

from soundpatch.audio import mono
from soundpatch.cpu import crunching
from soundpatch.engine import autoregressive, similarity
from soundpatch.engine.evaluation import restore_probe
from soundpatch.errors import RowError
from soundpatch.humanize import plural
from soundpatch.limits import InFlight
from soundpatch.providers.base import InpaintRequest, Prediction

AR_ONLY_SECONDS = 0.02
SHORT_GAP_SECONDS = 0.1
# The probes (which only choose the method) search for passages this far either side of them.
PROBE_REACH_SECONDS = 30.0
# AR order for short gaps: about three times the gap (Janssen's rule of thumb), bounded.
MAX_AR_ORDER = 1000
# Seams between the original and a passage are re-interpolated over this long.
SEAM_SECONDS = 0.01
# A passage is brought to the level of the gap's surroundings (_level_match) when they differ
# by more than this, by at most the limit.
LEVEL_TOLERANCE_DB = 0.5
LEVEL_LIMIT_DB = 20.0
# Relative error (-26 dB) below which a passage's neighbours count as the gap's own.
SEAM_TOLERANCE = 10 ** (-26 / 10)


def ar_order(m: int) -> int:
    return int(min(MAX_AR_ORDER, max(16, 3 * m)))


class LocalEngine:
    name = "local"
    model = "soundpatch-local-1"
    uses_prompt = False
    hosted = False

    def __init__(self, price_usd: float = 0.0, in_flight: InFlight | None = None) -> None:
        self.price_usd = price_usd
        self.in_flight = in_flight or InFlight(8)

    def ready(self) -> None:
        """Nothing to set up: no key, no network."""

    def check(
        self, audio_frames: int, rate: int, a: int, b: int, steps: int | None, guidance_scale: float | None
    ) -> None:
        """Any region that leaves some of its recording can be filled; model parameters are
        ignored. A region over the whole recording leaves nothing to rebuild it from."""
        if a <= 0 and b >= audio_frames:
            raise RowError(
                "The region covers the whole recording, and the local engine rebuilds a region "
                "from the audio around it; choose a hosted provider to generate all of it"
            )

    def inpaint(self, request: InpaintRequest) -> Prediction:
        with self.in_flight.slot():
            request.check_may_start()
            request.tell("computing")  # in flight from here (the progress line's count): at most limits.concurrency
            # All of it is computation, on a window of the recording up to three minutes of
            # floats: as many rows at once as there are cores (cpu.py). Sixteen rows of a long
            # tape at once held sixteen windows (3 GB), and finished no sooner.
            with crunching():
                return self._inpaint(request)

    def _inpaint(self, request: InpaintRequest) -> Prediction:
        if request.damaged:
            return self._mend(request)
        audio, a, b = request.audio, request.a, request.b
        m, rate = b - a, audio.rate
        # Work on a float window around the region only: an hour-long file costs no more
        # than the context the methods look at.
        reach = 4 * ar_order(m) + 2 * m + int(2 * rate)
        if m > AR_ONLY_SECONDS * rate:
            reach += int(similarity.SEARCH_RANGE_SECONDS * rate)
        lo, hi = max(0, a - reach), min(audio.frames, b + reach)
        x = audio.float_slice(lo, hi)
        wa, wb = a - lo, b - lo
        if m <= AR_ONLY_SECONDS * rate:
            fill, method = ar_fill(x, wa, wb), "autoregressive"
        elif m > SHORT_GAP_SECONDS * rate:
            fill, method = passage_fill(x, wa, wb, rate, request.seed)
        else:
            fill, method = self._probe_and_fill(x, wa, wb, rate, request.seed)
        # The fill meets its surroundings already; a splice crossfade would only mix
        # in what the region held (often a dropout), so none is asked for.
        return Prediction(
            fill=np.clip(fill, -1.0, 1.0).astype(np.float32),
            cost_usd=self.price_usd,
            crossfade=0,
            method=method if lo == 0 else _shift_method(method, lo / rate),
        )

    def _mend(self, request: InpaintRequest) -> Prediction:
        """The region with its damaged spans rebuilt (AR, at once where they are near each
        other: autoregressive.interpolate_spans) and every other frame of it as it was."""
        audio, a, b, spans = request.audio, request.a, request.b, request.damaged
        order = ar_order(max(end - start for start, end in spans))
        lo, hi = max(0, a - 4 * order), min(audio.frames, b + 4 * order)
        x = audio.float_slice(lo, hi)
        local = [(start - lo, end - lo) for start, end in spans]
        units = [unit_noise(x, start, end, order) for start, end in local]
        mended = np.stack(
            [
                autoregressive.interpolate_spans(x[:, ch], local, ar_order, [unit[:, ch] for unit in units])
                for ch in range(x.shape[1])
            ],
            axis=1,
        )
        ms = 1000 * sum(end - start for start, end in spans) / audio.rate
        return Prediction(
            fill=np.clip(mended[a - lo : b - lo], -1.0, 1.0).astype(np.float32),
            cost_usd=self.price_usd,
            crossfade=0,  # (the frames between the spans are the original's)
            method=f"autoregressive, {plural(len(spans), 'damaged span')} ({ms:.1f} ms) rebuilt, the rest kept",
        )

    def _probe_and_fill(self, x: np.ndarray, a: int, b: int, rate: int, seed: int | None) -> tuple[np.ndarray, str]:
        m = b - a
        guard = max(4 * ar_order(m), similarity.context_frames(m, rate)) + m
        probes = [(a - guard - m, a - guard), (b + guard, b + guard + m)]
        probes = [(pa, pb) for pa, pb in probes if pa - guard >= 0 and pb + guard <= len(x)]
        if not probes:
            return ar_fill(x, a, b), "autoregressive"
        # The probes only choose the method: on the channels' mix they choose about as well
        # as on every channel (bench/local_engine.py and the README: the same mean SNR within
        # 0.3 dB), in two thirds of the time for stereo.
        probed = x if x.shape[1] == 1 else mono(x)[:, None]
        # ... and on the audio within PROBE_REACH_SECONDS of each probe: on a long recording
        # the region's own search looks 90 s each side, which made a probe cost 3 times a
        # 30-second clip's (the same probes where the recording is shorter than that).
        reach = int(PROBE_REACH_SECONDS * rate)
        near = [(max(0, pa - reach), min(len(x), pb + reach), pa, pb) for pa, pb in probes]
        # AR is scored on its least-squares fill, the model's own estimate: the noise a fill of
        # unpredictable audio gets back (autoregressive.missing_noise) only costs SNR, and
        # scored with it, voice's probes chose passages at 50 ms that restored 4 dB worse.
        ar_score = sum(
            restore_probe(probed[lo:hi], pa - lo, pb - lo, lambda h, i, j: ar_fill(h, i, j, noise=False))
            for lo, hi, pa, pb in near
        )
        passage_score = sum(
            restore_probe(probed[lo:hi], pa - lo, pb - lo, lambda h, i, j: passage_fill(h, i, j, rate, seed)[0])
            for lo, hi, pa, pb in near
        )
        if passage_score > ar_score:
            fill, method = passage_fill(x, a, b, rate, seed)
            return fill, method + ", chosen over AR on a probe gap"
        return ar_fill(x, a, b), "autoregressive, chosen over a passage on a probe gap"


def ar_fill(x: np.ndarray, a: int, b: int, noise: bool = True) -> np.ndarray:
    """Each channel's AR fill of [a, b); with `noise`, a fill lacking its context's noise gets it."""
    order = ar_order(b - a)
    unit = unit_noise(x, a, b, order) if noise else None
    return np.stack(
        [
            autoregressive.interpolate(x[:, ch], a, b, order, unit=None if unit is None else unit[:, ch])
            for ch in range(x.shape[1])
        ],
        axis=1,
    )


def unit_noise(x: np.ndarray, a: int, b: int, order: int) -> np.ndarray:
    """Unit white noise for each channel's AR fill of [a, b) (m + order frames), correlated
    as the channels are around the gap: a dual-mono recording's gap gets the same noise in
    both, a stereo hiss's independent noise in each (autoregressive.missing_noise). The same
    for the same gap, whatever the seed: a row's result does not change from one run to the
    next, and variations that differ only in a draw of noise are not passed off as variations
    (the run's note says which came out alike)."""
    rng = np.random.default_rng([a, b])
    z = rng.standard_normal((b - a + order, x.shape[1]))
    if x.shape[1] == 1:
        return z
    around = np.concatenate([x[max(0, a - 4 * order) : a], x[b : b + 4 * order]]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(around.T), nan=0.0)
    np.fill_diagonal(corr, 1.0)
    values, vectors = np.linalg.eigh(corr)
    mixed = z @ (vectors * np.sqrt(np.clip(values, 0.0, None))).T
    for ch in range(1, x.shape[1]):  # a channel that is another's copy: that one's noise, to the bit
        same = [other for other in range(ch) if np.array_equal(around[:, other], around[:, ch])]
        if same:
            mixed[:, ch] = mixed[:, same[0]]
    return mixed


def passage_fill(x: np.ndarray, a: int, b: int, rate: int, seed: int | None) -> tuple[np.ndarray, str]:
    m = b - a
    matches = similarity.find_matches(mono(x), rate, a, b)
    n = min(int(SEAM_SECONDS * rate), m // 4)
    if matches:
        match = similarity.choose(matches, seed)
        q = match.start
        fill = x[q : q + m].copy()
        method = f"similarity (passage at {q / rate:.3f} s, score {match.score:.2f})"
        gain = _level_match(x, a, b, q, similarity.context_frames(m, rate))
        if gain != 1.0:
            fill = (fill * gain).astype(fill.dtype)
            method = method[:-1] + f", {20 * np.log10(gain):+.1f} dB to its surroundings)"
        # A seam is natural already where the passage's own neighbours are the gap's.
        mend_left = not _continuous(x[max(0, a - 2 * n) : a], x[max(0, q - 2 * n) : q])
        mend_right = not _continuous(x[b : b + 2 * n], x[q + m : q + m + 2 * n])
    else:
        fill = _loop_known(x, a, b)
        method = "loop (recording too short for a matching passage)"
        mend_left = mend_right = True
    return _mend_seams(x, a, b, fill, n, mend_left, mend_right), method


def _level_match(x: np.ndarray, a: int, b: int, q: int, c: int) -> float:
    """The gain that brings the passage at q to the level of the gap [a, b): its
    surroundings' (c frames each side) over the passage's own. The match is scored on
    their shapes, whatever their levels: a passage from where a sweep or a ring was 10 dB
    louder came back 10 dB too loud. 1.0 within LEVEL_TOLERANCE_DB (repeated material is
    copied as it is), at most LEVEL_LIMIT_DB either way."""
    m = b - a

    def power(lo: int, hi: int) -> float:
        sides = [side for side in (x[max(0, lo - c) : lo], x[hi : hi + c]) if len(side)]
        return float(np.mean([np.mean(np.square(side, dtype=np.float64)) for side in sides])) if sides else 0.0

    gap, passage = power(a, b), power(q, q + m)
    if gap <= 1e-20 or passage <= 1e-20:
        return 1.0
    db = float(np.clip(10 * np.log10(gap / passage), -LEVEL_LIMIT_DB, LEVEL_LIMIT_DB))
    return 1.0 if abs(db) <= LEVEL_TOLERANCE_DB else float(10 ** (db / 20))


def _continuous(target: np.ndarray, source: np.ndarray) -> bool:
    if len(target) == 0 or target.shape != source.shape:
        return False
    err = float(np.sum((target - source) ** 2))
    return err <= SEAM_TOLERANCE * max(float(np.sum(target**2)), 1e-12)


def _loop_known(x: np.ndarray, a: int, b: int) -> np.ndarray:
    before, after = x[:a], x[b:]
    material = before if len(before) >= len(after) else after
    if len(material) == 0:
        return np.zeros((b - a, x.shape[1]), dtype=np.float32)
    reps = int(np.ceil((b - a) / len(material)))
    return np.tile(material, (reps, 1))[: b - a]


def _mend_seams(
    x: np.ndarray, a: int, b: int, fill: np.ndarray, n: int, left_seam: bool, right_seam: bool
) -> np.ndarray:
    """Re-interpolate the first and last n frames of a passage between it and the original."""
    m = b - a
    if n <= 0 or not (left_seam or right_seam):
        return fill
    order = ar_order(n)
    ctx = 4 * order
    left = x[max(0, a - ctx) : a]
    right = x[b : b + ctx]
    joined = np.concatenate([left, fill, right]).astype(np.float64)
    s = len(left)
    out = fill.astype(np.float32, copy=True)
    units = [unit_noise(joined, s, s + n, order), unit_noise(joined, s + m - n, s + m, order)]
    for ch in range(x.shape[1]):
        sig = joined[:, ch]
        if left_seam and len(left):
            out[:n, ch] = autoregressive.interpolate(sig, s, s + n, order, unit=units[0][:, ch])
        if right_seam and len(right):
            out[m - n :, ch] = autoregressive.interpolate(sig, s + m - n, s + m, order, unit=units[1][:, ch])
    return out


def _shift_method(method: str, offset_s: float) -> str:
    """Passage times are found in a window; report them in the file's own timeline."""
    return re.sub(
        r"passage at ([0-9.]+) s",
        lambda mt: f"passage at {float(mt.group(1)) + offset_s:.3f} s",
        method,
    )
