"""A row's number crunching, a few rows at a time.

A batch works on many rows at once, on threads of one Python process that share one
interpreter lock, handed round in 5 ms slices. When 40 predictions end together, 40
threads splice, encode and check their results at once, and a thread that needs the lock
only for a moment (to send the next create, a poll) waits behind each of them, again and
again: the next predictions start seconds late. Holding the CPU-bound steps to as many
rows at once as there are cores keeps that queue short. It costs the crunching nothing:
one thread at a time runs Python anyway.

Only pure computation goes inside: no network, no file, no lock that a thread waiting
here could hold.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

AT_ONCE = max(1, min(2, os.cpu_count() or 1))
_GATE = threading.BoundedSemaphore(AT_ONCE)
_holding = threading.local()


@contextmanager
def crunching() -> Iterator[None]:
    """Around a CPU-bound step of a row: waits while enough others crunch. A step inside
    another (a thread already crunching) goes straight on rather than wait for itself."""
    if getattr(_holding, "gate", False):
        yield
        return
    with _GATE:
        _holding.gate = True
        try:
            yield
        finally:
            _holding.gate = False
