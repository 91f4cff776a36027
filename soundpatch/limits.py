"""Limits that hold: the budget ledger, the rate limiter, predictions in flight.

The budget ledger: money is reserved before it can be spent, so the cap cannot be crossed.

A row reserves its provider's price before a prediction is created. When the prediction
reports what it cost, the reservation becomes that cost; when it provably cost nothing
(never created), the reservation is released. Spent plus reserved never exceeds the cap,
whatever the concurrency. A row that would cross the cap only because of what predictions
in flight hold waits for them: a failed one often costs nothing, and a provider may charge
less than the price reserved, so the budget buys all it can before rows are skipped.
A provider that charges more than the price reserved (its price went up, or the config's
is out of date) makes the ledger count every reservation, from then on, as marked up by
as much: what predictions already in flight will cost is then counted too. (A rerun is
told what its run's earlier attempts found, and counts it from its first reservation.)
Until the run has seen what a provider's prediction costs, reservations for it count half
again as dear (UNSEEN_MARKUP), so that the predictions in flight before then cannot take
the cap over either unless the provider charges more than that: a row that fits at the
price but not at that waits for the first cost to come in (it is not skipped). Each
provider's cost is learned apart: a manifest may mix providers, and one charging its
price says nothing of another. With nothing in flight to wait for, a row that fits at
the price is sent: its cost is the one thing that can still cross the cap, by what it
charges over the price.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

# Prices are compared in micro-dollars so that 50 x $0.20 is exactly $10.00.
_MICRO = 1_000_000


# How much dearer than its price a reservation counts until a prediction's cost is seen:
# as (cost, reserved), as the markup is kept.
UNSEEN_MARKUP = (3, 2)


def _micro(usd: float) -> int:
    return round(usd * _MICRO)


@dataclass(frozen=True)
class Reservation:
    amount_usd: float
    in_flight: bool = False  # reserved for a prediction this run is making now (not held: see `hold`)
    provider: str = ""  # whose prediction it is for (its cost is learned per provider)


class BudgetLedger:
    def __init__(self, budget_usd: float, already_spent_usd: float = 0.0, costs_seen: Iterable[str] = ()) -> None:
        """`costs_seen`: providers whose prediction's cost is known already (an earlier
        attempt of the run saw it): reservations for them count at their price from the first."""
        self._cap = _micro(budget_usd)
        self._spent = _micro(already_spent_usd)
        self._reserved = 0
        self._reserved_for: dict[str, int] = {}  # `_reserved`, by provider
        self._in_flight = 0  # of `_reserved`, what reserve() holds for predictions being made now
        # The most a prediction has cost over what was reserved for it, as (cost, reserved):
        # reservations count at their amount marked up by as much.
        self._dearer = (1, 1)
        self._seen = set(costs_seen)  # providers a prediction's cost came in from: UNSEEN_MARKUP no longer counts
        self._changed = threading.Condition()

    def reserve(
        self,
        price_usd: float,
        give_up: Callable[[], bool] | None = None,
        waiting: Callable[[], None] = lambda: None,
        provider: str = "",
    ) -> Reservation | None:
        """Hold `price_usd` against the cap for a prediction of `provider`; None if that would
        cross it. Given `give_up`, while it would cross it only for what other rows'
        predictions in flight hold, waits for them to settle (`waiting()` told once, as the
        wait begins): None too if `give_up()` turned true meanwhile. The reservation must be
        settled or released, whatever happens next."""
        amount = _micro(price_usd)
        told = False
        while True:
            with self._changed:
                while not self._fits(amount, provider):
                    unless_free = self._spent + self._priced(self._reserved - self._in_flight + amount)
                    if not self._in_flight or unless_free > self._cap:
                        return None  # even if every prediction in flight cost nothing
                    if give_up is None or give_up():
                        return None
                    if not told:
                        break  # to say so first, outside the lock: others settle meanwhile
                    self._changed.wait(timeout=1.0)  # (give_up is asked again at least once a second)
                else:
                    self._add(amount, provider)
                    self._in_flight += amount
                    return Reservation(price_usd, in_flight=True, provider=provider)
            told = True
            waiting()

    def _fits(self, amount: int, provider: str) -> bool:
        """Whether `amount` more for `provider` can be reserved now: as dear as UNSEEN_MARKUP
        makes it (and what is reserved for providers whose cost is not seen yet) until its
        cost is seen; at its price when nothing is in flight that could show what it is."""
        cost_unknown = sum(held for name, held in self._reserved_for.items() if name not in self._seen)
        cost_unknown += amount if provider not in self._seen else 0
        known = self._reserved + amount - cost_unknown
        if self._spent + self._priced(known) + self._priced(cost_unknown, unseen=True) <= self._cap:
            return True
        return not self._in_flight and self._spent + self._priced(self._reserved + amount) <= self._cap

    def _add(self, amount: int, provider: str) -> None:
        self._reserved += amount
        self._reserved_for[provider] = self._reserved_for.get(provider, 0) + amount

    def hold(self, price_usd: float, provider: str = "") -> Reservation:
        """Reserve money already committed (a prediction of `provider` created before a crash),
        cap or not. Rows are not kept waiting for it: it is collected when its own row's turn
        comes."""
        with self._changed:
            self._add(_micro(price_usd), provider)
        return Reservation(price_usd, provider=provider)

    def settle(self, reservation: Reservation, cost_usd: float, seen: bool = True) -> None:
        """The prediction happened and cost `cost_usd` (normally the reserved price). `seen`:
        that is what the provider charged for it (not a price counted for want of an answer)."""
        with self._changed:
            self._let_go(reservation)
            self._spent += _micro(cost_usd)
            self._count_dearer(reservation.amount_usd, cost_usd)
            if seen and cost_usd > 0 and reservation.amount_usd > 0:
                self._seen.add(reservation.provider)

    def count_dearer(self, price_usd: float, cost_usd: float, provider: str = "") -> None:
        """A prediction of `provider` reserved at `price_usd` cost `cost_usd` (an earlier
        attempt of the run saw it): count every reservation as marked up by as much, if that
        is more."""
        with self._changed:
            self._count_dearer(price_usd, cost_usd)
            self._seen.add(provider)

    def _count_dearer(self, price_usd: float, cost_usd: float) -> None:
        amount, cost = _micro(price_usd), _micro(cost_usd)
        if amount and cost * self._dearer[1] > amount * self._dearer[0]:
            self._dearer = (cost, amount)

    def _priced(self, micro: int, unseen: bool = False) -> int:
        """What `micro` reserved may turn out to cost: marked up by the most a prediction
        cost over its reservation so far (rounded up); and, `unseen`, by UNSEEN_MARKUP at
        least (for what is reserved for providers whose cost has not come in)."""
        cost, reserved = self._dearer
        if unseen and UNSEEN_MARKUP[0] * reserved > cost * UNSEEN_MARKUP[1]:
            cost, reserved = UNSEEN_MARKUP
        return -(-micro * cost // reserved)

    def release(self, reservation: Reservation) -> None:
        """The prediction provably cost nothing: give the money back to the budget."""
        with self._changed:
            self._let_go(reservation)

    def _let_go(self, reservation: Reservation) -> None:
        amount = _micro(reservation.amount_usd)
        self._reserved -= amount
        self._reserved_for[reservation.provider] -= amount
        if reservation.in_flight:
            self._in_flight -= amount
        self._changed.notify_all()

    @property
    def spent_usd(self) -> float:
        with self._changed:
            return self._spent / _MICRO

    @property
    def budget_usd(self) -> float:
        return self._cap / _MICRO

    def standing(self) -> str:
        """What stands against the cap, in words: spent, and held for predictions in flight."""
        with self._changed:
            spent, held = self._spent / _MICRO, self._priced(self._reserved) / _MICRO
        return f"${spent:.2f} spent" + (f", ${held:.2f} held for predictions in flight" if held else "")


class RateLimiter:
    """Paces requests smoothly at `per_minute`, shared by every task of the process.

    Each caller is given its own send time, one interval after the previous caller's, and
    sleeps until then (virtual scheduling, as in GCRA): one wake-up per request, and a
    thread that wakes late never costs the others their turn, so the pace holds when the
    machine is busy. An idle limiter lets a small burst through, never a minute's worth.
    A 429 slows everyone, not just the task that got it: nobody sends until the server's
    Retry-After has passed, and the pace drops; each later success wins back a twentieth
    of the configured rate, so it recovers gradually instead of hammering the limit again.
    """

    # Paced under the configured limit by 1% of the provider's window, and by at least
    # MARGIN_SECONDS of it: requests arrive with jitter (a busy machine wakes a thread late,
    # the network holds one back), and a provider counting over a sliding window sees an
    # early arrival as one too many. 1% of a window of a few seconds (20 ms of 2 s) is less
    # than that jitter; from a 5 s window up, the 1% is all there is to it. (50 ms: at a 2 s
    # window, no 429 beside two busy processes where 20 ms drew one, and 0.976 of the rate.)
    HEADROOM = 0.99
    MARGIN_SECONDS = 0.05
    # Pacing gives each request its turn; what comes between the turn and the wire (a create's
    # journal line waits for the disk) can hold one past it, and the request a window's count
    # later would then arrive within the same window. So each send is written down as it
    # goes (`sending`), and no more than the provider counts in a window go out within one
    # window and GUARD_SECONDS (for what still comes between that and the provider).
    GUARD_SECONDS = 0.025

    def __init__(
        self,
        per_minute: float,
        burst: float | None = None,
        clock=time.monotonic,
        sleep=time.sleep,
        shared: Callable[[], None] | None = None,
        window: float = 60.0,
    ):
        # A window's worth of requests is spread over the window and the margin.
        share = window / max(window / self.HEADROOM, window + self.MARGIN_SECONDS)
        self.configured = per_minute / 60.0 * share
        self.rate = self.configured
        # A provider counting `per_minute` over a sliding `window` accepts the paced
        # requests plus what the margin leaves; the burst takes that, less one for a
        # request that arrives late: 4 at 600/min counted per minute, none at 60/min or
        # when the window is a few seconds.
        spare = (1.0 - share) * per_minute / 60.0 * window - 1.0
        self.burst = burst if burst is not None else max(1.0, min(4.0, spare))
        self._clock, self._sleep = clock, sleep
        self._window = window
        # When the last requests went out, as many as the provider takes in a window.
        self._sent: deque[float] = deque(maxlen=max(1, int(per_minute * window / 60.0 + 1e-9)))
        # The earliest send time not yet given to a caller. The first caller gets no burst:
        # a provider counting over a sliding window may still hold a full window's worth
        # from an earlier run.
        self._next: float | None = None
        self._blocked_until = 0.0
        self._epoch = 0  # bumped by every 429: send times given out before it are void
        self._lock = threading.Lock()
        self.waited = 0.0  # total seconds callers spent waiting, for the report
        # Other processes on the same account: after local pacing, a slot of the shared
        # limit is taken too (see SharedLimits).
        self._shared = shared

    # How often a waiter that may give up (its run is stopping) looks up from its wait.
    LOOK_UP_SECONDS = 0.5

    def acquire(self, give_up: Callable[[], bool] | None = None) -> float:
        """Wait for the next slot (local, then shared); returns how long this caller waited.

        With `give_up`, a long wait ends early once it returns True (the run was asked to
        stop): the caller then has no turn, and must ask it again before sending."""
        waited = self._acquire_local(give_up)
        if self._shared is not None and not (give_up is not None and give_up()):
            started = self._clock()
            self._shared()
            waited += self._clock() - started
        return waited

    def _acquire_local(self, give_up: Callable[[], bool] | None) -> float:
        began = self._clock()
        while True:
            with self._lock:
                now = self._clock()
                # Idle time earns at most `burst - 1` early sends; a 429 earns none.
                earliest = now if self._next is None else max(self._next, now - (self.burst - 1.0) / self.rate)
                at = max(earliest, self._blocked_until)
                self._next = at + 1.0 / self.rate
                epoch = self._epoch
            if give_up is None:
                if at > now:
                    self._sleep(at - now)
            else:
                while (left := at - self._clock()) > 0 and not give_up():
                    self._sleep(min(left, self.LOOK_UP_SECONDS))
                if give_up():
                    return self._clock() - began
            with self._lock:
                if epoch == self._epoch:  # no 429 while this caller slept: its turn stands
                    waited = self._clock() - began
                    self.waited += waited
                    return waited

    def sending(self) -> float:
        """The request whose turn `acquire` gave goes out now, all that must come first done:
        it waits, if need be, until the provider's count for a window has not all gone out
        within the last window (and GUARD_SECONDS). Returns how long it waited."""
        began = self._clock()
        while True:
            with self._lock:
                now = self._clock()
                full = len(self._sent) == self._sent.maxlen
                free = self._sent[0] + self._window + self.GUARD_SECONDS if full else now
                if now >= free:
                    self._sent.append(now)
                    self.waited += now - began
                    return now - began
            self._sleep(free - now)

    def throttled(self, retry_after: float | None) -> None:
        """The server said 429: everyone waits, and the pace drops.

        With a Retry-After the server says when it frees up, so waiting that out and easing
        off by a tenth is enough; without one the pace halves. Send times already handed
        out are void: their callers queue again behind the pause."""
        with self._lock:
            now = self._clock()
            pause = retry_after if retry_after is not None else 1.0 / self.rate
            self._blocked_until = max(self._blocked_until, now + pause)
            factor = 0.9 if retry_after is not None else 0.5
            self.rate = max(self.configured / 16, self.rate * factor)
            self._next = self._blocked_until
            self._epoch += 1

    def succeeded(self) -> None:
        with self._lock:
            self.rate = min(self.configured, self.rate + self.configured / 20)


class SharedLimits(Protocol):
    """Limits shared with other processes or machines using the same provider account.

    The local RateLimiter keeps each process's pace precise; a SharedLimits keeps their
    sum under the account's limits. Orchestration provides it (flows/shared_limits.py:
    Prefect's global concurrency limits); the core only calls it.
    """

    def create(self) -> None:
        """Block until one more create may go out under the shared rate."""
        ...

    def prediction(self) -> AbstractContextManager[None]:
        """Hold one of the shared in-flight slots while a prediction runs."""
        ...


class InFlight:
    """Predictions in flight (created, result not yet fetched): at most `limit` in this
    process, and within the account's shared slots when several processes share it.

    Only that stretch holds a slot: preparing and staging the clip before, aligning,
    splicing, checking and publishing after run outside it, so they never keep the
    provider's capacity idle.
    """

    def __init__(self, limit: int, shared: SharedLimits | None = None) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._shared = shared

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._slots, self._shared.prediction() if self._shared is not None else nullcontext():
            yield
