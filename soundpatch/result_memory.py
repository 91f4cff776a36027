"""How much of its results a batch holds in memory at once.

A row's result is held encoded, as it will be published, from its splice until the output
store has it (and read back once for the checks, in a memory file as large). For a clip
that is nothing; for a recording an hour long it is 600 MB, twice over for a moment, and a
batch works on up to twice `limits.concurrency` rows at once. So rows whose results would
take the batch past a quarter of this machine's memory (1 GiB at least) wait for others to
be published first; a result larger than all of it goes alone. Clips never wait.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

FLOOR_BYTES = 1 << 30


def machine_share() -> int:
    """A quarter of this machine's memory, and 1 GiB at least."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return FLOOR_BYTES
    return max(FLOOR_BYTES, total // 4)


class ResultMemory:
    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit or machine_share()
        self.held = 0
        self.most = 0  # the most held at once in this batch
        self._changed = threading.Condition()

    @contextmanager
    def holding(self, nbytes: int) -> Iterator[None]:
        """Around the life of a result of about `nbytes`: waits while others hold too much."""
        nbytes = min(max(0, nbytes), self.limit)
        with self._changed:
            self._changed.wait_for(lambda: self.held + nbytes <= self.limit)
            self.held += nbytes
            self.most = max(self.most, self.held)
        try:
            yield
        finally:
            with self._changed:
                self.held -= nbytes
                self._changed.notify_all()
