"""Find the passage elsewhere in a recording that best fits a long gap.

In the spirit of Perraudin et al. (2018), "Inpainting of long audio segments with
similarity graphs": music and most ambiences repeat, so the best fill for a long gap is
usually a passage whose own surroundings look like the gap's surroundings. We score
every candidate position by the normalised cross-correlation of its left and right
context with the gap's, computed with FFTs at a reduced rate over a bounded search range
(decoding minutes of audio is cheap; correlating all of it at full rate is not), then
refine the best few to the exact sample at the full rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

SEARCH_RATE = 6000  # Hz; enough to discriminate rhythm and pitch, cheap to correlate
SEARCH_RANGE_SECONDS = 90.0  # candidates further than this from the gap are not considered
# Candidates scoring within this of the best are equally good; the seed picks among them.
EQUAL_SCORE_MARGIN = 0.02
# A passage holding this much digital silence (a dropout elsewhere in the recording) is not
# a fill, where the gap's surroundings hold none: restoring one dropout with another
# restores nothing.
DEAD_SECONDS = 0.005
SILENT = 1e-5  # -100 dBFS: below a 16-bit recording's least step


@dataclass(frozen=True)
class Match:
    start: int  # first frame of the source passage, full rate
    score: float  # mean normalised cross-correlation of the contexts, -1..1


def context_frames(gap: int, rate: int) -> int:
    """How much surrounding audio is compared: about the gap, 0.25 s to 1 s."""
    return int(min(rate * 1.0, max(rate * 0.25, gap)))


def find_matches(mono: np.ndarray, rate: int, a: int, b: int, limit: int = 8) -> list[Match]:
    """Best source positions q for frames [a, b) of `mono`, best first.

    A source passage [q, q + m) never overlaps the gap, nor do its contexts when the file
    allows it. Returns [] when the file has no room for a non-overlapping passage.
    """
    m = b - a
    c = context_frames(m, rate)
    step = max(1, rate // SEARCH_RATE)
    xs = soxr.resample(mono.astype(np.float32), rate, rate / step) if step > 1 else mono
    ms, cs = m // step, max(1, c // step)
    a_s, b_s = a // step, b // step
    left = xs[max(0, a_s - cs) : a_s]
    right = xs[b_s : b_s + cs]
    lo = max(0, a_s - int(SEARCH_RANGE_SECONDS * rate / step))
    hi = min(len(xs) - ms, a_s + int(SEARCH_RANGE_SECONDS * rate / step))
    if hi <= lo:
        return []
    q = np.arange(lo, hi + 1)
    score = np.zeros(len(q))
    weight = np.zeros(len(q))
    windows = _Windows(xs)
    if len(left) >= 8:
        s, ok = windows.ncc_at(left, lo - len(left), len(q))
        score += s
        weight += ok
    if len(right) >= 8:
        s, ok = windows.ncc_at(right, lo + ms, len(q))
        score += s
        weight += ok
    # The source itself must not overlap the gap.
    allowed = (weight > 0) & ((q + ms <= a_s) | (q >= b_s + 1))
    strict = allowed & ((q + ms + len(right) <= a_s) | (q - len(left) >= b_s + 1))
    if strict.any():
        allowed = strict
    if not allowed.any():
        return []
    dead = np.concatenate([[0], np.cumsum(_dead(xs, max(2, round(DEAD_SECONDS * rate / step))))])
    whole = dead[q + ms] == dead[q]  # no dropout inside the passage
    # ... unless silence is part of the material (a synthetic voice's pauses): its contexts hold some.
    lively = dead[max(0, a_s - cs)] == dead[a_s] and dead[b_s] == dead[min(len(xs), b_s + cs)]
    if lively and (allowed & whole).any():
        allowed &= whole
    mean = np.where(allowed, score / np.maximum(weight, 1), -np.inf)
    picks = _distinct_peaks(mean, spacing=max(cs, ms // 2), limit=limit)
    matches = [_refine(mono, a, b, int(q[i]) * step, step, c) for i in picks]
    matches = [mt for mt in matches if mt.start + m <= a or mt.start >= b]
    return sorted(matches, key=lambda mt: -mt.score)


def choose(matches: list[Match], seed: int | None) -> Match:
    """The best match, or (with a seed) one of those scoring as well as the best."""
    best = matches[0]
    tied = [mt for mt in matches if mt.score >= best.score - EQUAL_SCORE_MARGIN]
    if seed is None or len(tied) == 1:
        return best
    return tied[seed % len(tied)]


def _dead(x: np.ndarray, shortest: int) -> np.ndarray:
    """Where `x` is digitally silent for `shortest` samples or more in a row."""
    quiet = np.abs(x) < SILENT
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    long = ends - starts >= shortest
    marks = np.zeros(len(x) + 1, np.int32)
    np.add.at(marks, starts[long], 1)
    np.add.at(marks, ends[long], -1)
    return np.cumsum(marks[:-1]) > 0


class _Windows:
    """Normalised cross-correlation of short templates with every window of one signal:
    its running sums are taken once, and each template is correlated by overlap-add
    (scipy.signal.oaconvolve: a template of at most a second against minutes of signal,
    twice as fast as one FFT of the whole)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x.astype(np.float64)
        self.csum = np.concatenate([[0.0], np.cumsum(self.x)])
        self.csq = np.concatenate([[0.0], np.cumsum(self.x * self.x)])
        self._energy: dict[int, np.ndarray] = {}  # window length -> each window's norm (mean removed)

    def ncc_at(self, template: np.ndarray, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Of `template` with x[o : o + len] for each of the `count` offsets o from `first`
        on; and which of them are inside x (1.0)."""
        from scipy.signal import oaconvolve  # scipy.signal takes a second to import: only when a row needs it

        k, x = len(template), self.x
        out, valid = np.zeros(count), np.zeros(count)
        o_lo, o_hi = max(first, 0), min(first + count - 1, len(x) - k)  # the offsets inside x
        t = template.astype(np.float64) - template.mean()
        t_norm = np.sqrt(np.dot(t, t))
        if o_hi < o_lo:
            return out, valid
        inside = slice(o_lo - first, o_hi - first + 1)
        valid[inside] = 1.0
        if t_norm < 1e-9:
            return out, valid
        num = oaconvolve(x[o_lo : o_hi + k], t[::-1], mode="valid")
        if k not in self._energy:
            win_sum = self.csum[k:] - self.csum[:-k]
            self._energy[k] = np.sqrt(np.maximum(self.csq[k:] - self.csq[:-k] - win_sum**2 / k, 0.0))
        denom = self._energy[k][o_lo : o_hi + 1] * t_norm
        np.divide(num, np.maximum(denom, 1e-12), out=out[inside], where=denom > 1e-9)
        return out, valid


def _distinct_peaks(score: np.ndarray, spacing: int, limit: int) -> list[int]:
    """Up to `limit` positions, best first, each `spacing` or more from those before it
    (the first of equal scores first; -inf is never picked). The best left each time, and
    what is too near it struck out: `limit` passes over the scores, where a walk down them
    in order, in Python, took 30-100 ms a row when the best few thousand crowd round one peak."""
    left = np.where(np.isfinite(score), score, -np.inf)
    reach = max(spacing, 1)
    picks: list[int] = []
    while len(picks) < limit:
        i = int(np.argmax(left))
        if left[i] == -np.inf:
            break
        picks.append(i)
        left[max(0, i - reach + 1) : i + reach] = -np.inf
    return picks


def _refine(mono: np.ndarray, a: int, b: int, q: int, step: int, c: int) -> Match:
    """Sample-accurate position near q, by full-rate correlation of short contexts."""
    m = b - a
    k = min(c, 4096)
    left = mono[max(0, a - k) : a]
    right = mono[b : b + k]
    lags = np.arange(q - 2 * step, q + 2 * step + 1)
    lags = lags[(lags >= 0) & (lags + m <= len(mono))]
    total, parts = np.zeros(len(lags)), np.zeros(len(lags))
    if len(left):
        ok = lags - len(left) >= 0
        total[ok] += _ncc_rows(left, mono, lags[ok] - len(left))
        parts += ok
    if len(right):
        ok = lags + m + len(right) <= len(mono)
        total[ok] += _ncc_rows(right, mono, lags[ok] + m)
        parts += ok
    if not parts.any():
        return Match(q, -np.inf)
    mean = np.where(parts > 0, total / np.maximum(parts, 1), -np.inf)
    best = int(np.argmax(mean))  # the first of the best
    return Match(int(lags[best]), float(mean[best]))


def _ncc_rows(u: np.ndarray, x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of `u` with x[s : s + len(u)] for each s of `starts`."""
    u = u.astype(np.float64) - u.mean()
    rows = np.lib.stride_tricks.sliding_window_view(x, len(u))[starts].astype(np.float64)
    rows -= rows.mean(axis=1, keepdims=True)
    d = np.sqrt(np.dot(u, u) * np.einsum("ij,ij->i", rows, rows))
    return np.where(d > 1e-12, rows @ u / np.maximum(d, 1e-300), 0.0)
