"""How long the rows left will take, at the pace sent rows have been finishing lately.

Rows that end without being sent (invalid, already done, over budget) end at once and
would make a batch look faster than it is, so only rows that went to a provider count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Pace:
    """Times are the journal's (`time.time()`): when things happened, not when they were read."""

    def __init__(self, window_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.window, self._clock = window_seconds, clock
        self._first_sent: float | None = None
        self._ends: deque[float] = deque()  # when sent rows ended, within the window

    def restarted(self) -> None:
        """A new attempt at the run (a resumed run reads its earlier attempts first)."""
        self._first_sent = None
        self._ends.clear()

    def sent(self, at: float) -> None:
        if self._first_sent is None:
            self._first_sent = at

    def ended(self, at: float) -> None:
        self._ends.append(at)

    def seconds_left(self, rows_left: int, at_least: int = 3) -> float | None:
        """None until `at_least` sent rows ended within the window (no pace to go by yet)."""
        now = self._clock()
        while self._ends and self._ends[0] < now - self.window:
            self._ends.popleft()
        if rows_left <= 0 or self._first_sent is None or len(self._ends) < at_least:
            return None
        span = min(self.window, now - self._first_sent)
        return rows_left * span / len(self._ends)
