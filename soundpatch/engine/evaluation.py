"""Measuring restoration: punch gaps into known audio, refill them, compare with the truth.

Used by the engine's own probe (which method suits this recording?), the tests and
bench/local_engine.py, so all three measure the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

# fill(holed_signal, a, b) -> the b - a frames for the gap
Filler = Callable[[np.ndarray, int, int], np.ndarray]


def snr_db(truth: np.ndarray, estimate: np.ndarray) -> float:
    """Signal-to-error ratio of an estimate of `truth`, in dB (0 dB = as bad as silence)."""
    err = float(np.sum((np.asarray(truth, np.float64) - estimate) ** 2))
    return 10 * float(np.log10(max(float(np.sum(np.square(truth, dtype=np.float64))), 1e-20) / max(err, 1e-20)))


def restore_probe(x: np.ndarray, a: int, b: int, fill: Filler) -> float:
    """SNR of `fill` on frames [a, b) of x, with those frames zeroed before it looks."""
    truth = x[a:b].copy()
    holed = x.copy()
    holed[a:b] = 0.0
    return snr_db(truth, fill(holed, a, b))


def audible_gaps(x: np.ndarray, rate: int, gap_seconds: float, seed: int = 7) -> Iterator[tuple[int, int]]:
    """Random gaps over audible material (not pauses), at least 2 s from either end."""
    rng = np.random.default_rng(seed)
    m = int(round(gap_seconds * rate))
    loudness = np.sqrt(np.mean(np.square(x, dtype=np.float64)))
    while True:
        a = int(rng.uniform(2.0, len(x) / rate - 2.0 - gap_seconds) * rate)
        if np.sqrt(np.mean(np.square(x[a : a + m], dtype=np.float64))) > 0.3 * loudness:
            yield a, a + m


def zero_fill(x: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.zeros_like(x[a:b])


def linear_fill(x: np.ndarray, a: int, b: int) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, b - a + 2)[1:-1, None]
    return x[a - 1] + ramp * (x[b] - x[a - 1])


def compare(
    x: np.ndarray, rate: int, gap_seconds: float, fillers: dict[str, Filler], trials: int = 6
) -> dict[str, float]:
    """Mean SNR of each filler over the same `trials` audible gaps."""
    gaps = audible_gaps(x, rate, gap_seconds)
    spots = [next(gaps) for _ in range(trials)]
    return {name: float(np.mean([restore_probe(x, a, b, fill) for a, b in spots])) for name, fill in fillers.items()}
