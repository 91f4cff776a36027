"""The budget ledger: money is reserved before it can be spent, so the cap cannot be crossed.

A row reserves its provider's price before a prediction is created. When the prediction
reports what it cost, the reservation becomes that cost; when it provably cost nothing
(never created), the reservation is released. Spent plus reserved never exceeds the cap,
whatever the concurrency.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# Prices are compared in micro-dollars so that 50 x $0.20 is exactly $10.00.
_MICRO = 1_000_000


def _micro(usd: float) -> int:
    return round(usd * _MICRO)


@dataclass(frozen=True)
class Reservation:
    amount_usd: float


class BudgetLedger:
    def __init__(self, budget_usd: float, already_spent_usd: float = 0.0) -> None:
        self._cap = _micro(budget_usd)
        self._spent = _micro(already_spent_usd)
        self._reserved = 0
        self._lock = threading.Lock()

    def reserve(self, price_usd: float) -> Reservation | None:
        """Hold `price_usd` against the cap, or None if that would cross it."""
        amount = _micro(price_usd)
        with self._lock:
            if self._spent + self._reserved + amount > self._cap:
                return None
            self._reserved += amount
        return Reservation(price_usd)

    def hold(self, price_usd: float) -> Reservation:
        """Reserve money already committed (a prediction created before a crash), cap or not."""
        with self._lock:
            self._reserved += _micro(price_usd)
        return Reservation(price_usd)

    def settle(self, reservation: Reservation, cost_usd: float) -> None:
        """The prediction happened and cost `cost_usd` (normally the reserved price)."""
        with self._lock:
            self._reserved -= _micro(reservation.amount_usd)
            self._spent += _micro(cost_usd)

    def release(self, reservation: Reservation) -> None:
        """The prediction provably cost nothing: give the money back to the budget."""
        with self._lock:
            self._reserved -= _micro(reservation.amount_usd)

    @property
    def spent_usd(self) -> float:
        with self._lock:
            return self._spent / _MICRO

    @property
    def budget_usd(self) -> float:
        return self._cap / _MICRO
