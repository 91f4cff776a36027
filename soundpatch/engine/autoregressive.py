"""Least-squares autoregressive interpolation of short gaps.

Janssen, Veldhuis & Vries (1986), "Adaptive interpolation of discrete-time signals that
can be modeled as autoregressive processes", as used for short gaps in Adler et al. (2012),
"Audio Inpainting". The signal around the gap is modelled as AR(p); the missing samples
are those that minimise the energy of the prediction error over every error sample they
touch. For a contiguous gap with p known samples on each side, the normal equations are
a symmetric Toeplitz system (entries are the autocorrelation of the AR polynomial), solved
with Levinson recursion in O(m^2) whatever the order p, so high orders that capture
the harmonics of music stay affordable (toeplitz.py: off the interpreter lock).

That fill is the gap's expected value given its context. Where the context cannot be
predicted (hiss, rain, a whoosh, a crowd) it fades towards silence mid-gap: 5-11 dB under
the noise around a 5-100 ms gap, a hole in the hiss. Where it lies more than NOISE_GATE_DB
under the quieter side of the gap, what it lacks is drawn from the model itself: the gap's
conditional noise, (A'A)^-1 A'w for innovations w at the context's prediction-error
variance (one more solve of the same system), enough of it to bring the fill to the
quieter side's power. Sampling the missing samples rather than taking their expectation
is Godsill & Rayner's (1998, "Digital Audio Restoration", ch. 5). Where the context is
predictable (music, speech) the fill is left as it is: it holds its level already, and
noise would only cost SNR (bench/local_engine.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from soundpatch.engine.toeplitz import solve_symmetric_toeplitz

# Damaged frames solved for at once (a dense system, this many squared): a cluster of spans
# over it is parted, and a single span over it is filled as a gap (Levinson, O(m^2)).
MAX_JOINT_FRAMES = 2048
# Added to the zero-lag autocorrelation: keeps the Yule-Walker system well conditioned
# for near-silent or purely tonal context (a "white noise correction").
WHITE_NOISE_CORRECTION = 1e-5
NOISE_GATE_DB = 3.0


def ar_polynomial(segments: list[np.ndarray], order: int) -> np.ndarray:
    """AR polynomial [1, a1..ap] from the summed autocorrelation of windowed segments."""
    r = np.zeros(order + 1)
    for seg in segments:
        n = len(seg)
        if n <= order:
            continue
        w = seg.astype(np.float64) * np.hanning(n)
        nfft = 1 << int(np.ceil(np.log2(2 * n)))
        spec = np.fft.rfft(w, nfft)
        r += np.fft.irfft(spec * np.conj(spec), nfft)[: order + 1]
    if r[0] <= 1e-20:
        return np.concatenate([[1.0], np.zeros(order)])
    r[0] *= 1.0 + WHITE_NOISE_CORRECTION
    a = solve_symmetric_toeplitz(r[:order], -r[1 : order + 1])
    return np.concatenate([[1.0], a])


def least_squares_fill(before: np.ndarray, after: np.ndarray, m: int, a: np.ndarray) -> np.ndarray:
    """The m samples between `before` and `after` (each exactly p = len(a) - 1 long)."""
    p = len(a) - 1
    y = np.concatenate([before, np.zeros(m), after]).astype(np.float64)
    # Prediction errors of the known samples (missing ones at zero) for every t touched
    # by a missing sample: t in [p, p + m + p).
    errors = np.convolve(y, a)[p : p + m + p]
    return solve_symmetric_toeplitz(_normal_column(a, m), -np.correlate(errors, a, mode="valid"))


def _normal_column(a: np.ndarray, m: int) -> np.ndarray:
    """The first column of A'A, the normal equations' matrix of m missing samples."""
    p = len(a) - 1
    column = np.zeros(m)
    column[: min(m, p + 1)] = np.correlate(a, a, mode="full")[p : p + min(m, p + 1)]
    return column


def missing_noise(left: np.ndarray, right: np.ndarray, fill: np.ndarray, a: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """What a least-squares `fill` between `left` and `right` lacks of its context's noise
    (zeros where it lacks less than NOISE_GATE_DB of the quieter side's power): the gap's
    conditional noise under the AR model `a`, from `unit` (unit white noise, m + p long)."""
    m, p = len(fill), len(a) - 1
    quieter = min(float(np.mean(np.square(left))), float(np.mean(np.square(right))))
    have = float(np.mean(np.square(fill)))
    if have >= quieter * 10 ** (-NOISE_GATE_DB / 10):
        return np.zeros(m)
    residual = np.concatenate([np.convolve(left, a, mode="valid"), np.convolve(right, a, mode="valid")])
    if len(residual) == 0:
        return np.zeros(m)
    w = unit[: m + p] * np.sqrt(np.mean(np.square(residual)))
    noise = solve_symmetric_toeplitz(_normal_column(a, m), np.correlate(w, a, mode="valid"))
    power = float(np.mean(np.square(noise)))
    return noise * np.sqrt(min(1.0, (quieter - have) / power)) if power > 1e-30 else np.zeros(m)


def extrapolate(context: np.ndarray, m: int, order: int, fade: bool = True) -> np.ndarray:
    """Forward AR prediction of m samples after `context`.

    With `fade`, the prediction fades to silence over the m samples: a one-sided
    prediction drifts, so it is only trusted near the known audio.
    """
    from scipy.signal import lfilter, lfiltic  # scipy.signal takes a second to import: only when a row needs it

    order = max(1, min(order, len(context) // 4))
    if len(context) <= order:
        return np.zeros(m)
    a = ar_polynomial([context], order)
    # Run the all-pole filter on silence, its state primed with the last `order` samples.
    zi = lfiltic([1.0], a, y=context[::-1][:order])
    predicted, _ = lfilter([1.0], a, np.zeros(m), zi=zi)
    return predicted * np.linspace(1.0, 0.0, m + 2)[1:-1] if fade else predicted


def interpolate(
    signal: np.ndarray, a: int, b: int, order: int, iterations: int = 2, unit: np.ndarray | None = None
) -> np.ndarray:
    """Fill frames [a, b) of a 1-D signal from its surroundings; returns b - a samples.

    Uses up to `order` coefficients, reduced where the file has little context. The AR
    model is estimated from up to 4 * order known samples on each side, then re-estimated
    with the gap filled (Janssen's iteration). Given `unit` (unit white noise, at least
    b - a + order long), a fill that lacks its context's noise gets it (missing_noise).
    """
    m = b - a
    left_avail, right_avail = a, len(signal) - b
    if left_avail == 0 and right_avail == 0:
        return np.zeros(m)
    if right_avail == 0:
        return extrapolate(signal[:a].astype(np.float64), m, order)
    if left_avail == 0:
        return extrapolate(signal[b:][::-1].astype(np.float64), m, order)[::-1]
    context = 4 * order
    p = max(1, min(order, left_avail, right_avail, max(left_avail, right_avail) // 4))
    left = signal[max(0, a - context) : a].astype(np.float64)
    right = signal[b : b + context].astype(np.float64)
    poly = ar_polynomial([left, right], p)
    fill = least_squares_fill(left[-p:], right[:p], m, poly)
    for _ in range(iterations - 1):
        poly = ar_polynomial([np.concatenate([left, fill, right])], p)
        fill = least_squares_fill(left[-p:], right[:p], m, poly)
    return fill if unit is None else fill + missing_noise(left, right, fill, poly, unit)


def interpolate_spans(
    signal: np.ndarray,
    spans: list[tuple[int, int]],
    order_for: Callable[[int], int],
    units: list[np.ndarray | None] | None = None,
) -> np.ndarray:
    """`signal` (1-D) with the frames of each span [a, b) (in order, apart) rebuilt, and every
    other frame as it was: a row's damaged spans (clicks, crackle), where the audio between
    them is sound. Least squares as `interpolate`, with the missing samples scattered
    (Janssen et al.'s formulation allows any set; Godsill & Rayner, ch. 5, mend clicks so):
    the AR model is estimated from the sound frames around them only, and spans within its
    order of each other, whose prediction errors overlap, are solved for at once. The order
    is `order_for(the longest span's frames)` of each such cluster: a short dropout in a row
    of ticks does not make every tick's model its size. `units[i]`: unit noise (as
    `interpolate`'s, at least the span's frames and the order long) for span i, used where
    no other span is near it."""
    out = signal.astype(np.float64, copy=True)
    damaged = np.zeros(len(out), bool)
    for a, b in spans:
        damaged[a:b] = True
    for cluster in _clusters(spans, order_for):
        first, last = spans[cluster[0]][0], spans[cluster[-1]][1]
        order = order_for(max(spans[i][1] - spans[i][0] for i in cluster))
        lo, hi = max(0, first - 4 * order), min(len(out), last + 4 * order)
        p = max(1, min(order, first - lo, hi - last, max(first - lo, hi - last) // 4))
        ours = np.zeros(hi - lo, bool)
        for i in cluster:
            ours[spans[i][0] - lo : spans[i][1] - lo] = True
        if first - lo < p or hi - last < p or int(ours.sum()) > MAX_JOINT_FRAMES:
            out[first:last] = interpolate(out, first, last, order)  # at an end of the file, or one span too long
        else:
            window = out[lo:hi]  # (a view: filled in place)
            poly = _fill_scattered(window, ours, damaged[lo:hi] & ~ours, p)
            unit = units[cluster[0]] if units is not None and len(cluster) == 1 else None
            if unit is not None:
                s, e = first - lo, last - lo
                window[s:e] += missing_noise(window[:s], window[e:], window[s:e], poly, unit)
        damaged[first:last] = False  # rebuilt: context for the clusters after it
    return out


def _clusters(spans: list[tuple[int, int]], order_for: Callable[[int], int]) -> list[list[int]]:
    """The spans' indices, those within the order of each other together (the order of the
    longest of them), in clusters of at most MAX_JOINT_FRAMES frames: one over it is parted
    where its spans are furthest apart (solved one after the other, each the next's context)."""
    clusters: list[list[int]] = []
    longest = 0
    for i, (a, b) in enumerate(spans):
        if clusters and a - spans[clusters[-1][-1]][1] <= order_for(max(longest, b - a)):
            clusters[-1].append(i)
            longest = max(longest, b - a)
        else:
            clusters.append([i])
            longest = b - a
    parted: list[list[int]] = []
    for cluster in clusters:
        whole = [cluster]
        while whole:
            part = whole.pop()
            if len(part) == 1 or sum(spans[i][1] - spans[i][0] for i in part) <= MAX_JOINT_FRAMES:
                parted.append(part)
                continue
            gaps = [spans[j][0] - spans[i][1] for i, j in zip(part, part[1:], strict=False)]
            cut = 1 + int(np.argmax(gaps))
            whole += [part[cut:], part[:cut]]  # (the earlier part next)
    return parted


def _fill_scattered(
    window: np.ndarray, ours: np.ndarray, others: np.ndarray, p: int, iterations: int = 2
) -> np.ndarray:
    """Fill `window`'s frames under `ours` in place, least squares under an AR(p) model of its
    frames under neither mask (`others`: damaged frames left for later); returns the model.
    Every frame of `ours` is at least p frames from the window's ends."""
    u = np.flatnonzero(ours)
    window[u] = 0.0
    poly = ar_polynomial(_sound_runs(window, ours | others, p), p)
    for step in range(iterations):
        # A'A over the missing frames: the AR polynomial's autocorrelation at their distances.
        r = np.correlate(poly, poly, mode="full")[p:]
        apart = np.abs(u[:, None] - u[None, :])
        normal = np.where(apart <= p, r[np.minimum(apart, p)], 0.0)
        errors = np.convolve(window, poly)  # errors[t] = sum_k a_k x[t - k], missing frames at 0
        errors[:p] = 0.0  # (before the window: not errors of its own)
        errors[len(window) :] = 0.0
        rhs = -np.correlate(errors, poly, mode="valid")[u]
        window[u] = np.linalg.solve(normal, rhs)
        if step + 1 < iterations:  # Janssen's iteration: the model again, with the gaps filled
            poly = ar_polynomial(_sound_runs(window, others, p), p)
            window[u] = 0.0
    return poly


def _sound_runs(x: np.ndarray, masked: np.ndarray, p: int) -> list[np.ndarray]:
    """The runs of `x` outside `masked` longer than p frames (what an AR(p) model is fitted to)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[True], masked, [True]]).astype(np.int8)))
    return [x[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True) if b - a > p]
