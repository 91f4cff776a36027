"""Symmetric positive definite Toeplitz systems, solved off the interpreter lock.

The AR interpolation's systems (autoregressive.py) are a gap's length square: 4,410
unknowns for 100 ms at 44.1 kHz. scipy's `solve_toeplitz` solves them with Levinson
recursion for any Toeplitz matrix, holding the interpreter lock throughout (36 ms each):
a run's two crunching rows (cpu.py) then take turns on one core. Here Levinson's
symmetric form (Golub & Van Loan, Matrix Computations, algorithm 4.7.2), compiled by
numba without the lock: half the time on one core (bench/toeplitz.py), and both cores busy.

Where numba is missing (a Python it does not support yet) or the recursion meets a
matrix it cannot solve (a leading minor not positive, rounding included), scipy's
solver answers, as it always did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np


def solve_symmetric_toeplitz(column: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x with T x = rhs, T the symmetric positive definite Toeplitz matrix whose first
    column is `column`."""
    column = np.ascontiguousarray(column, dtype=np.float64)
    rhs = np.ascontiguousarray(rhs, dtype=np.float64)
    kernel = _kernel()
    if kernel is not None and len(rhs) and column[0] > 0:
        x = kernel(column, rhs)
        if np.isfinite(x).all():
            return x
    from scipy.linalg import solve_toeplitz

    return solve_toeplitz(column, rhs)


def prepare() -> None:
    """Load (or, the first time, compile) the solver now, not in the first row that needs it."""
    _kernel()


@functools.cache
def _kernel() -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    try:
        from numba import njit  # imported when a row first needs it: 0.2 s, and 1 s to compile once

        kernel = njit(nogil=True, cache=True)(_levinson)
        kernel(np.array([2.0, 1.0]), np.array([1.0, 1.0]))  # compiled (or loaded) now, or not at all
    except Exception:  # no numba, or none that compiles here: scipy's solver stays
        return None
    return kernel


def _levinson(column: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Golub & Van Loan 4.7.2 on the system scaled to a unit diagonal; NaN where a leading
    minor is not positive (the caller then asks scipy)."""
    n = len(rhs)
    scale = column[0]
    r = column[1:n] / scale
    b = rhs / scale
    x = np.zeros(n)
    y = np.zeros(n)  # the Yule-Walker solution of order k, for the next step
    z = np.zeros(n)
    x[0] = b[0]
    if n == 1:
        return x
    y[0] = -r[0]
    alpha = -r[0]
    beta = 1.0
    for k in range(1, n):
        beta *= 1.0 - alpha * alpha
        if not beta > 0.0:
            x[:] = np.nan
            return x
        acc = 0.0
        for i in range(k):
            acc += r[i] * x[k - 1 - i]
        mu = (b[k] - acc) / beta
        for i in range(k):
            x[i] += mu * y[k - 1 - i]
        x[k] = mu
        if k < n - 1:
            acc = 0.0
            for i in range(k):
                acc += r[i] * y[k - 1 - i]
            alpha = -(r[k] + acc) / beta
            for i in range(k):
                z[i] = y[i] + alpha * y[k - 1 - i]
            for i in range(k):
                y[i] = z[i]
            y[k] = alpha
    return x
