"""How much of its results a batch holds in memory at once.

A row's result is held encoded, as it will be published, from its splice until the output
store has it (and read back once for the checks, in a memory file as large). For a clip
that is nothing; for a recording an hour long it is 600 MB, twice over for a moment, and a
batch works on up to twice `limits.concurrency` rows at once. So rows whose results would
take the batch past `limits.results_memory_mb` wait for others to be published first; a
result larger than all of it goes alone. Clips never wait. By default that is a quarter of
the memory this process may use (the machine's, or its container's limit: a Prefect worker
in a 4 GB pod on a 64 GB host has 4 GB), and 1 GiB at least.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FLOOR_BYTES = 1 << 30


# Where a container's memory limit is: cgroup v2, then v1 ("max" or a huge number: none).
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_share() -> int:
    """A quarter of the memory this process may use, and 1 GiB at least."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return FLOOR_BYTES
    for path in CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
        break
    return max(FLOOR_BYTES, total // 4)


class ResultMemory:
    def __init__(self, limit: int | None = None) -> None:
        """`limit` in bytes; None: machine_share()."""
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
