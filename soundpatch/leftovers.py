"""Predictions other runs paid for and left uncollected, for rows of this run to collect.

Two places name them: the edit claims in an output bucket (edit_claims.py: runs whose
machine died) and the journals of stopped runs on this machine (left_here.py); and a
model's answers that rows with damaged spans used are kept with the results for rows asking
for the same answer with other spans (kept_answers.py). Either way
a row of the same edit takes one up once, at no new cost, and the run's notes count what
came of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from soundpatch.providers.base import PaidAnswer


@dataclass(frozen=True)
class Left:
    """A prediction that another run made for an edit and did not use: its id, or (a
    provider that gives none, Stability) the paid answer that run kept on this machine's
    disk (its answers.py record)."""

    run: str
    prediction_id: str
    provider: str
    answer: dict[str, Any] | None = None
    paid: PaidAnswer | None = None  # the answer itself, where it is not on this disk (kept_answers.py)


class Leftovers:
    """The predictions other runs left, by edit identity, each to be taken up once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left: dict[str, Left] = {}  # identity -> the prediction another run left for it
        self.collected: dict[str, int] = {}  # run id -> predictions of it collected here (no new cost)
        self.uncollectable: dict[str, int] = {}  # run id -> predictions of it that could not be, made anew

    def left_by(self, identity: str) -> Left | None:
        """The prediction another run left for `identity`, for this row to collect (once)."""
        with self._lock:
            return self._left.pop(identity, None)

    def was_collected(self, left: Left) -> None:
        """`left` came back: the edit is made from it at no new cost."""
        with self._lock:
            self.collected[left.run] = self.collected.get(left.run, 0) + 1

    def not_collected(self, left: Left) -> None:
        """`left` turned out failed, or out of this key's sight: the edit is made here anew."""
        with self._lock:
            self.uncollectable[left.run] = self.uncollectable.get(left.run, 0) + 1
