"""The local engine's Toeplitz solves: scipy's Levinson against soundpatch's compiled one.

    python bench/toeplitz.py [--solves 16]

The system a 100 ms gap at 44.1 kHz sets up (4,410 unknowns, AR order 1000), solved
`--solves` times on one thread, then split over two threads (a run crunches two rows at
once on two cores: soundpatch/cpu.py). Printed: milliseconds a solve, and each solver's
throughput on two threads over its own on one (2.0: both cores used; 1.0: one lock).
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from scipy.linalg import solve_toeplitz

from soundpatch.engine.toeplitz import _kernel, solve_symmetric_toeplitz


def system(m: int = 4410, p: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = np.concatenate([[1.0], rng.standard_normal(p) * 0.3 / np.sqrt(p)])
    column = np.zeros(m)
    column[: p + 1] = np.correlate(a, a, mode="full")[p : 2 * p + 1]
    return column, rng.standard_normal(m)


def timed(solve, column: np.ndarray, rhs: np.ndarray, solves: int, threads: int) -> float:
    def work() -> None:
        for _ in range(solves // threads):
            solve(column, rhs)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solves", type=int, default=16)
    args = parser.parse_args()
    column, rhs = system()
    t0 = time.perf_counter()
    state = "compiled or loaded" if _kernel() is not None else "missing (scipy answers)"
    print(f"numba kernel: {state} in {time.perf_counter() - t0:.2f} s")
    print(f"{'solver':10s} {'ms/solve':>9s} {'2 threads':>10s}")
    for name, solve in (("scipy", solve_toeplitz), ("soundpatch", solve_symmetric_toeplitz)):
        solve(column, rhs)
        one = timed(solve, column, rhs, args.solves, 1)
        two = timed(solve, column, rhs, args.solves, 2)
        print(f"{name:10s} {one / args.solves * 1000:9.1f} {one / two:9.2f}x")


if __name__ == "__main__":
    main()
