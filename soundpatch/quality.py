"""Checks on every published result, so a bad splice is flagged rather than shipped quietly.

Measured on the result as published (decoded back from the bytes stored, in one pass:
audio.read_back), against the original:

- `outside_max_diff`: the largest difference outside the region, in full-scale units.
  It must be 0 for lossless outputs (WAV, FLAC, AIFF); lossy ones (MP3, Ogg) are not
  flagged for it.
- `seam_in`, `seam_out`: at each edge of the region, the largest second difference
  within 2 ms, divided by what is usual there: the 99th percentile of second differences
  in the 100 ms of untouched audio beside it, or in the 20 ms of the fill next to the edge
  (a noisy fill meeting a smooth ring changes texture there, which is not a click), or the
  original's own at that spot, whichever is largest (a transient on the edge is not the
  splice's fault). 1 or less means the edge is as smooth as its two sides; a click or a
  step reads well above (flagged past SEAM_LIMIT).
- `loudness_delta_db`: how far the region's loudness lies outside the range of the audio's
  on its two sides (as long as the region, 100 ms to 1 s each), K-weighted as in ITU-R
  BS.1770 (pyloudnorm's filters; measured ungated, so a 10 ms fill has a value too): 0 when
  it lies between them, as a fill does where a sound decays or swells across the region
  (against the second each side taken together, a perfect fill 1.2 s after a hit read
  -19 dB). A side in digital silence counts as -70 LUFS: a fade into silence may be as
  quiet as it likes, and a fill left silent between two audible sides is far below both.
  None when both sides are near silence.
- `clipped`: samples at full scale inside the region that the original did not have.
- `offset_ms`: the misalignment of a provider's result that was found and undone.

A result of a recording cut short (audio.cut_short) is flagged so: it holds what there is;
and so is one of a WAV whose header was never finished (audio.never_finished).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from soundpatch.audio import Audio, ReadBack, cut_short, max_diff, never_finished, read_back, to_float

SEAM_LIMIT = 2.5
LOUDNESS_LIMIT_DB = 12.0
SILENCE_LUFS = -70.0
FULL_SCALE = 0.9999
LOSSLESS = ("wav", "flac", "aiff")  # extensions of the outputs whose audio outside the region must be the input's
CONTEXT_SECONDS = 1.0
NEAR_SECONDS = 0.1  # the least of each side the loudness is compared with


@dataclass
class Quality:
    outside_max_diff: float
    seam_in: float | None
    seam_out: float | None
    loudness_delta_db: float | None
    clipped: int
    offset_ms: float = 0.0
    flags: list[str] = field(default_factory=list)

    @property
    def checks(self) -> str:
        """What the report's `checks` column says: `ok`, or the flags."""
        return "; ".join(self.flags) if self.flags else "ok"

    def to_dict(self) -> dict:
        return {**asdict(self), "checks": self.checks}


def context_span(a: int, b: int, rate: int, frames: int) -> tuple[int, int]:
    """The frames the checks look at: the region [a, b) and up to CONTEXT_SECONDS each side."""
    return max(0, a - round(CONTEXT_SECONDS * rate)), min(frames, b + round(CONTEXT_SECONDS * rate))


def published(path: Path, name: str, original: Audio, a: int, b: int, lo: int, hi: int, at: int) -> ReadBack:
    """A result's file (at `path`) as a user will read it, frames [lo, hi) of the recording
    kept, compared with the original outside [a, b) on the way; `at`: the recording's frame
    its file starts at (not 0 for a row of a combined file, whose result is an excerpt)."""
    frames = original.samples[at:]  # a view: compared from its start, for as long as the excerpt is
    view = Audio(frames, original.rate, original.format, original.subtype)
    back = read_back(path, lo - at, hi - at, name, against=(view, a - at, b - at))
    return ReadBack(back.frames, back.excerpt, lo, back.outside_max_diff)


def measure(original: Audio, result: Audio, a: int, b: int, lossless: bool, offset_ms: float = 0.0) -> Quality:
    """`judge`, of a result held as one array."""
    n = min(original.frames, result.frames)  # a lossy codec's padding: compare what overlaps
    outside = max(
        max_diff(original.samples[:a], result.samples[:a]), max_diff(original.samples[b:n], result.samples[b:n])
    )
    lo, hi = context_span(a, b, result.rate, n)
    excerpt = Audio(result.samples[lo:hi], result.rate, result.format, result.subtype)
    return judge(original, ReadBack(result.frames, excerpt, lo, outside), a, b, lossless, offset_ms)


def judge(original: Audio, back: ReadBack, a: int, b: int, lossless: bool, offset_ms: float = 0.0) -> Quality:
    """The checks of a result read back (its frames around the region, `context_span`)."""
    rate, lo, outside = back.excerpt.rate, back.lo, back.outside_max_diff or 0.0
    hi = min(original.frames, lo + back.excerpt.frames)
    before, after = to_float(original.samples[lo:hi]), to_float(back.excerpt.samples[: hi - lo])
    a, b = a - lo, b - lo
    seam_in = _seam(after, before, a, side=-1, rate=rate, fill=b - a)
    seam_out = _seam(after, before, b, side=+1, rate=rate, fill=b - a)
    loudness = _loudness_delta(after, a, b, rate)
    clipped = max(0, _clipped(after[a:b]) - _clipped(before[a:b]))
    q = Quality(
        outside_max_diff=outside,
        seam_in=None if seam_in is None else round(seam_in, 2),
        seam_out=None if seam_out is None else round(seam_out, 2),
        loudness_delta_db=None if loudness is None else round(loudness, 1),
        clipped=clipped,
        offset_ms=round(offset_ms, 2),
    )
    if lossless and outside > 0:
        q.flags.append(f"audio outside the region changed (max {outside:.2g})")
    for name, value in (("start", q.seam_in), ("end", q.seam_out)):
        if value is not None and value > SEAM_LIMIT:
            q.flags.append(f"discontinuity at the region's {name} ({value:g}x its surroundings)")
    if q.loudness_delta_db is not None and abs(q.loudness_delta_db) > LOUDNESS_LIMIT_DB:
        d = q.loudness_delta_db
        q.flags.append(f"region is {abs(d):g} dB {'quieter' if d < 0 else 'louder'} than the audio either side of it")
    if clipped:
        q.flags.append(f"{clipped} clipped samples in the region")
    short, unfinished = cut_short(original.info), never_finished(original.info)
    if short is not None:  # the result holds what there is: the rest was never in the file
        q.flags.append(f"the input is cut short (it holds {short})")
    if unfinished is not None:  # the result holds what followed its header, with a header that says so
        q.flags.append(f"the input's header was never finished ({unfinished})")
    return q


def _seam(after: np.ndarray, before: np.ndarray, edge: int, side: int, rate: int, fill: int) -> float | None:
    """Largest kink within 2 ms of `edge`, over what is usual there: the untouched audio
    beside it, the fill's own texture next to it (`fill`: the region's length), or the
    original's own kink at that spot (a drum hit on the edge is not a fault of the splice)."""
    near = max(2, round(0.002 * rate))
    ref = max(8, round(0.1 * rate))
    context = after[max(0, edge - ref) : edge] if side < 0 else after[edge : edge + ref]
    if len(context) < 8 or edge <= 0 or edge >= len(after):
        return None  # the region touches the file's start or end: no seam there
    inner = min(round(0.02 * rate), fill)
    inside = after[edge : edge + inner] if side < 0 else after[max(0, edge - inner) : edge]
    lo, hi = max(0, edge - near), min(len(after), edge + near)
    jump = _kink(after[lo:hi])
    usual = max(_usual_kink(context), _usual_kink(inside) if len(inside) >= 8 else 0.0, _kink(before[lo:hi]), 1e-5)
    return jump / usual


def _usual_kink(x: np.ndarray) -> float:
    return float(np.percentile(np.abs(np.diff(x, n=2, axis=0)), 99))


def _kink(x: np.ndarray) -> float:
    # Second differences: smooth audio has small ones whatever its level; a step or a
    # kink (a click) stands out.
    return float(np.abs(np.diff(x, n=2, axis=0)).max()) if len(x) > 2 else 0.0


def _loudness_delta(x: np.ndarray, a: int, b: int, rate: int) -> float | None:
    lo, hi = max(0, a - round(CONTEXT_SECONDS * rate)), min(len(x), b + round(CONTEXT_SECONDS * rate))
    weighted = _k_weighted(x[lo:hi], rate)
    a, b = a - lo, b - lo
    near = max(round(NEAR_SECONDS * rate), b - a)  # (at most the second each side read back)
    sides = [side for side in (weighted[max(0, a - near) : a], weighted[b : b + near]) if len(side)]
    if b <= a or not sides:
        return None
    levels = [max(_lufs(side), SILENCE_LUFS) for side in sides]
    if max(levels) <= SILENCE_LUFS:
        return None  # a region in silence: nothing to compare it with
    inside = max(_lufs(weighted[a:b]), SILENCE_LUFS)
    quietest, loudest = min(levels), max(levels)
    return inside - quietest if inside < quietest else inside - loudest if inside > loudest else 0.0


def _k_weighted(x: np.ndarray, rate: int) -> np.ndarray:
    from scipy.signal import lfilter  # scipy.signal takes a second to import: only when a row needs it

    b, a = _k_filter(rate)
    return lfilter(b, a, x, axis=0)


@functools.cache
def _k_filter(rate: int) -> tuple[np.ndarray, np.ndarray]:
    """The BS.1770 pre-filter (pyloudnorm's high shelf, then high pass) as one filter."""
    import pyloudnorm  # imports scipy.signal: see _k_weighted

    b, a = np.array([1.0]), np.array([1.0])
    for stage in pyloudnorm.Meter(rate)._filters.values():
        b = np.convolve(b, stage.passband_gain * np.asarray(stage.b))
        a = np.convolve(a, np.asarray(stage.a))
    return b, a


def _lufs(y: np.ndarray) -> float:
    # Mean square per channel, summed: BS.1770 weights L, R and C by 1.0.
    power = float(np.einsum("ij,ij->", y, y) / len(y))
    return -0.691 + 10 * np.log10(power) if power > 0 else -np.inf


def _clipped(x: np.ndarray) -> int:
    return int((np.abs(x) >= FULL_SCALE).sum())
