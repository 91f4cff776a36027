"""Room in memory for the recordings rows work on, made sure of before one is decoded.

A row holds its recording decoded while it works on it: an hour of 16-bit stereo is 606 MB
of samples, of 24-bit (held as 32-bit) 1.2 GB. Rows of one recording share it, but rows of
many long recordings in flight at once would each hold their own: a restoration batch of
32 hour-long tapes, a dropout each, is 19 GB. So a recording no row holds yet is decoded
only while the recordings rows hold stay within `limits.inputs_memory_mb` (by default half
the memory of the machine, or of the container the run is in), in the order rows asked
for them; one larger than that on its own is decoded when no other is held. A row waiting
for its turn holds nothing else (no prediction slot, no money, no room on disk), and the
progress line counts it.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class NotAdmitted(Exception):
    """The row gave up waiting for room (the run is stopping)."""


@dataclass
class _Held:
    rows: int = 0
    nbytes: int = 0
    admitted: bool = False
    give_up: Callable[[], bool] = lambda: False
    waiting: Callable[[bool], None] = lambda still: None
    told: bool = field(default=False)


class MemoryRoom:
    """The decoded recordings rows hold, counted against `limit_bytes`."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.in_use = 0  # bytes of the recordings rows hold, admitted
        self.peak = 0
        self._held: dict[str, _Held] = {}  # recording -> the rows holding it
        self._queue: deque[str] = deque()  # recordings waiting for room, first asked first
        self._cond = threading.Condition()

    @contextmanager
    def holding(self, key: str | None, give_up: Callable[[], bool], waiting: Callable[[bool], None]) -> Iterator[None]:
        """While a row works on recording `key` (None: no recording to hold). The reader
        asks `admit` before decoding it; `give_up()` ends the wait (NotAdmitted), and
        `waiting(True)` is told when the row has to wait, `waiting(False)` once it has room."""
        if key is None:
            yield
            return
        with self._cond:
            held = self._held.get(key)
            if held is None:
                held = self._held[key] = _Held(give_up=give_up, waiting=waiting)
            held.rows += 1
        try:
            yield
        finally:
            with self._cond:
                held.rows -= 1
                if held.rows == 0:
                    del self._held[key]
                    if held.admitted:
                        self.in_use -= held.nbytes
                    self._cond.notify_all()

    def admit(self, key: str, nbytes: int, wait: bool = True) -> None:
        """Before recording `key` is decoded into `nbytes`: waits, when rows hold it, for its
        turn and room; at once when they already hold it decoded, or no row holds it (a
        recording read for something else than a row's edit). `wait=False`: it is decoded
        already (kept from an earlier row), so its bytes are counted without waiting."""
        with self._cond:
            held = self._held.get(key)
            if held is None or held.admitted:
                return
            if not wait:
                held.admitted, held.nbytes = True, nbytes
                self.in_use += nbytes
                self.peak = max(self.peak, self.in_use)
                return
            self._queue.append(key)
            try:
                while not held.admitted and not self._fits(key, nbytes):
                    if held.give_up():
                        raise NotAdmitted
                    if not held.told:
                        held.told = True
                        self._cond.release()  # (the journal is written outside the lock)
                        try:
                            held.waiting(True)
                        finally:
                            self._cond.acquire()
                        continue
                    self._cond.wait(0.5)
                if not held.admitted:
                    held.admitted, held.nbytes = True, nbytes
                    self.in_use += nbytes
                    self.peak = max(self.peak, self.in_use)
            finally:
                self._queue.remove(key)
                self._cond.notify_all()
        if held.told:
            held.waiting(False)

    def _fits(self, key: str, nbytes: int) -> bool:
        return self._queue[0] == key and (self.in_use == 0 or self.in_use + nbytes <= self.limit_bytes)


def machine_memory() -> int | None:
    """The memory this process may use: the machine's, or less where a container (cgroup)
    limits it; None where neither can be asked."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
        break
    return total


def default_limit_bytes() -> int:
    """Half the memory this process may use (4 GB where that cannot be asked)."""
    memory = machine_memory()
    return memory // 2 if memory else 4 << 30
