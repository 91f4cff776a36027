"""How long the rows left will take, at the pace sent rows have been finishing lately.

Rows that end without being sent (invalid, already done, over budget) end at once and
would make a batch look faster than it is, so only rows that went to a provider count.

Nor do providers share a pace: the local engine ends a row in a fraction of a second, a
hosted model in some 15 s, and both go on at once. Where the run says how many rows each
provider has (`run_started`'s `providers`), each keeps its own pace, and the rows left take
as long as the slowest provider's: the local engine's quick ends no longer promise that the
model's last rows end soon.

A hosted model's pace is counted from its first row's end, where the run says its limits
(`run_started`'s `limits`): the time its first prediction took, when nothing could end, is
no part of it. Counted from the first row sent, 12 rows ended 27 s into a batch held to 60
creates a minute said "about 3 min 18 s left" of 88 rows going at one a second. Nor is a
pace faster than those limits let rows end (`limits.concurrency` predictions of the time
its rows took at once, and one a create the rate limit lets out): a wave of predictions
ending together is not the pace of the rows after it.

A provider with rows left and no pace yet (fewer than 3 ended within the window: a batch
with a few rows for a model, or any batch's first wave) goes by its typical time a row,
which is what its rows took so far (their create to ended), else what it typically takes
(`typical`, the estimate's):
- once all of its rows left are in flight (a create sent; the local engine's, once sent),
  the longest any of them still has to go;
- before that, the first of its predictions in flight (a create sent) ends when it should,
  and the rows after go `limits.concurrency` at a time (where the run said; else as many
  as are in flight now): a first wave of 16 predictions of 15 s with 84 rows behind them
  is about 1 min 29 s from its end, 5 s in;
- and no sooner than the rate limit lets their creates out (`limits.requests_per_minute`,
  where the run said): 100 rows at 60 a minute take 1 min 40 s and a prediction's time
  whatever the concurrency, though few are in flight in their first seconds.
A row running past its typical time says nothing rather than something wrong, as does a
provider with none in flight yet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from statistics import fmean

LOCAL = "local"  # the built-in engine: no predictions, no limits but the machine's cores


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
        self._first_end: dict[str, float] = {}  # by provider: when the first of its sent rows ended
        self._ends: dict[str, deque[float]] = {}  # when its sent rows ended, within the window
        self._left: dict[str, int] | None = None  # rows yet to end, by provider, where the run said
        self._out: dict[str, dict[str, float]] = {}  # by provider: its rows sent and not ended, when sent
        # By provider: how long its last rows took, their create (else sent) to ended.
        self._took: dict[str, deque[float]] = {}
        self._created: dict[str, float] = {}  # rows sent whose prediction is in flight: when its create went out
        self._at_once: int | None = None  # predictions a provider may have in flight (limits.concurrency)
        self._per_second: float | None = None  # creates a provider may be sent a second (limits.requests_per_minute)

    def restarted(self, rows: Mapping[str, int] | None = None, limits: Mapping[str, float] | None = None) -> None:
        """A new attempt at the run (a resumed run reads its earlier attempts first), with
        the rows it has to do by provider, and its limits (`concurrency`, `per_minute`: a
        provider's each), where it says."""
        limits = limits or {}
        self._at_once = int(limits["concurrency"]) if limits.get("concurrency") else None
        self._per_second = float(limits["per_minute"]) / 60.0 if limits.get("per_minute") else None
        self._first_sent.clear()
        self._first_end.clear()
        self._ends.clear()
        self._out.clear()  # (what took how long is kept: the same rows, sent again)
        self._created.clear()
        self._left = {str(p): int(n) for p, n in rows.items()} if rows else None

    def sent(self, at: float, provider: str = "", row: str = "") -> None:
        self._first_sent.setdefault(provider, at)
        if row:
            self._out.setdefault(provider, {})[row] = at

    def created(self, at: float, row: str) -> None:
        """The prediction of a row sent is in flight (its create went out, or it was taken up
        again); the local engine's row, worked on."""
        self._created.setdefault(row, at)

    def ended(self, at: float, provider: str = "", sent: bool = True, row: str = "") -> None:
        """A row of `provider` ended; one `sent` to it counts towards its pace."""
        if self._left is not None and provider in self._left:
            self._left[provider] -= 1
        if sent:
            self._ends.setdefault(provider, deque()).append(at)
            self._first_end.setdefault(provider, at)
        sent_at = self._out.get(provider, {}).pop(row, None)
        created_at = self._created.pop(row, None)
        since = sent_at if created_at is None or sent_at is None else max(sent_at, created_at)
        if since is not None:  # (from its create: a row may wait for its turn after it is sent)
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
        times = []
        for p, n in left.items():
            most = self._most_a_second(p)
            since = self._first_end.get(p) if most else self._first_sent.get(p)
            ends = len(self._ends.get(p, ()))
            times.append(self._at_pace(n, since, ends, now, at_least, most) or self._at_typical(p, n, now))
        return None if None in times else max(t for t in times if t is not None)

    def _limits(self, provider: str) -> tuple[int | None, float | None]:
        """A provider's predictions in flight at once and creates a second, where the run said
        them; none for the local engine, whose rows are held by the machine's cores instead."""
        return (None, None) if provider == LOCAL else (self._at_once, self._per_second)

    def _most_a_second(self, provider: str) -> float | None:
        """The most rows a second a hosted provider's limits let end, where the run said
        them: `limits.concurrency` predictions of the time its rows take at once, and no
        more than the creates the rate limit lets out."""
        took = self._took.get(provider)
        at_once, per_second = self._limits(provider)
        if not at_once or not took:
            return None
        most = at_once / max(fmean(took), 1e-3)
        return min(most, per_second) if per_second else most

    def _at_typical(self, provider: str, rows: int, now: float) -> float | None:
        """The time left of a provider's `rows` left at its typical time a row (no pace yet)."""
        out = self._out.get(provider, {})
        took = self._took.get(provider)
        each = fmean(took) if took else self._typical.get(provider)
        if each is None or not out:
            return None
        in_flight = [self._created[row] for row in out if row in self._created]
        if not in_flight:
            return None
        if len(in_flight) >= rows:  # all in flight: the last to go out has the longest to go
            left = each - (now - max(in_flight))
            return left if left > 0 else None
        first_ends = each - (now - min(in_flight))
        if first_ends <= 0:
            return None
        after = rows - len(in_flight)  # rows whose create is yet to go out
        at_once, per_second = self._limits(provider)
        left = first_ends + after * each / max(at_once or 0, len(in_flight))
        if per_second and after:  # the last create's turn, then its prediction
            left = max(left, after / per_second + each)
        return left

    def _at_pace(
        self, rows: int, since: float | None, ends: int, now: float, at_least: int, most: float | None = None
    ) -> float | None:
        """`rows` at the pace `ends` came at since `since` (within the window), and no faster
        than `most` a second."""
        if since is None or ends < at_least:
            return None
        per_second = ends / max(min(self.window, now - since), 1e-3)
        return rows / (min(per_second, most) if most else per_second)
