"""How long the rows left will take, at the pace sent rows have been finishing lately.

Rows that end without being sent (invalid, already done, over budget) end at once and
would make a batch look faster than it is, so only rows that went to a provider count.

Nor do providers share a pace: the local engine ends a row in a fraction of a second, a
hosted model in some 15 s, and both go on at once. Where the run says how many rows each
provider has (`run_started`'s `providers`), each keeps its own pace, and the rows left take
as long as the slowest provider's: the local engine's quick ends no longer promise that the
model's last rows end soon.

A provider with rows left and no pace yet (fewer than 3 ended within the window: a batch
with a few rows for a model, or any batch's first wave) goes by its typical time a row,
which is what its rows took so far (sent to ended), else what it typically takes
(`typical`, the estimate's):
- once all of its rows left are sent, the longest any of them still has to go;
- before that, the first of its predictions in flight (a create sent) ends when it should,
  and the rows after go as many at a time as are in flight now (limits.concurrency, or
  fewer where the rate limit holds creates back): a first wave of 16 predictions of 15 s
  with 84 rows behind them is about 1 min 29 s from its end, 5 s in.
A row running past its typical time says nothing rather than something wrong, as does a
provider with none in flight yet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from statistics import fmean


class Pace:
    """Times are the journal's (`time.time()`): when things happened, not when they were read."""

    def __init__(
        self,
        window_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        typical: Mapping[str, float] | None = None,
    ) -> None:
        """`typical`: seconds a row of each provider typically takes, sent to ended."""
        self.window, self._clock = window_seconds, clock
        self._typical = dict(typical or {})
        self._first_sent: dict[str, float] = {}  # by provider
        self._ends: dict[str, deque[float]] = {}  # when its sent rows ended, within the window
        self._left: dict[str, int] | None = None  # rows yet to end, by provider, where the run said
        self._out: dict[str, dict[str, float]] = {}  # by provider: its rows sent and not ended, when sent
        self._took: dict[str, deque[float]] = {}  # by provider: how long its last rows took, sent to ended
        self._created: dict[str, float] = {}  # rows sent whose prediction is in flight: when its create went out

    def restarted(self, rows: Mapping[str, int] | None = None) -> None:
        """A new attempt at the run (a resumed run reads its earlier attempts first), with
        the rows it has to do by provider, where it says."""
        self._first_sent.clear()
        self._ends.clear()
        self._out.clear()  # (what took how long is kept: the same rows, sent again)
        self._created.clear()
        self._left = {str(p): int(n) for p, n in rows.items()} if rows else None

    def sent(self, at: float, provider: str = "", row: str = "") -> None:
        self._first_sent.setdefault(provider, at)
        if row:
            self._out.setdefault(provider, {})[row] = at

    def created(self, at: float, row: str) -> None:
        """The prediction of a row sent is in flight (its create went out, or it was taken up again)."""
        self._created.setdefault(row, at)

    def ended(self, at: float, provider: str = "", sent: bool = True, row: str = "") -> None:
        """A row of `provider` ended; one `sent` to it counts towards its pace."""
        if self._left is not None and provider in self._left:
            self._left[provider] -= 1
        if sent:
            self._ends.setdefault(provider, deque()).append(at)
        since = self._out.get(provider, {}).pop(row, None)
        self._created.pop(row, None)
        if since is not None:
            self._took.setdefault(provider, deque(maxlen=20)).append(at - since)

    def seconds_left(self, rows_left: int, at_least: int = 3) -> float | None:
        """None until `at_least` sent rows ended within the window (no pace to go by yet);
        by provider, until each with rows left has one."""
        now = self._clock()
        for ends in self._ends.values():
            while ends and ends[0] < now - self.window:
                ends.popleft()
        if rows_left <= 0:
            return None
        left = {p: n for p, n in (self._left or {}).items() if n > 0}
        if not left:  # the run did not say, or its count went astray: one pace for all
            ends = sum(len(e) for e in self._ends.values())
            first = min(self._first_sent.values(), default=None)
            return self._at_pace(rows_left, first, ends, now, at_least)
        times = [
            self._at_pace(n, self._first_sent.get(p), len(self._ends.get(p, ())), now, at_least)
            or self._at_typical(p, n, now)
            for p, n in left.items()
        ]
        return None if None in times else max(t for t in times if t is not None)

    def _at_typical(self, provider: str, rows: int, now: float) -> float | None:
        """The time left of a provider's `rows` left at its typical time a row (no pace yet)."""
        out = self._out.get(provider, {})
        took = self._took.get(provider)
        each = fmean(took) if took else self._typical.get(provider)
        if each is None or not out:
            return None
        if len(out) >= rows:  # all sent: the last sent has the longest to go
            left = each - (now - max(out.values()))
            return left if left > 0 else None
        in_flight = [self._created[row] for row in out if row in self._created]
        if not in_flight:
            return None
        first_ends = each - (now - min(in_flight))
        after = (rows - len(in_flight)) * each / len(in_flight)
        return first_ends + after if first_ends > 0 else None

    def _at_pace(self, rows: int, first_sent: float | None, ends: int, now: float, at_least: int) -> float | None:
        if first_sent is None or ends < at_least:
            return None
        return rows * min(self.window, now - first_sent) / ends
