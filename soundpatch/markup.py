"""Providers that charge more than the price the budget reserves for a prediction
(`provider.price_usd`): a price list changed, or the config has an old price.

The ledger (limits.py) counts every reservation marked up by as much, so the cap holds;
this module keeps what was found, per provider, and says it: as earlier attempts of the
run found it (read from the journal, counted from this attempt's first row) and as this
attempt finds it (said once, as it happens, and in the notes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from soundpatch.journal import RowState


class Markup:
    def __init__(self, run_id: str, price_of: Callable[[str], float], states: Iterable[RowState]) -> None:
        """`price_of(provider)`: its price_usd now; `states`: what earlier attempts left."""
        self.run_id = run_id
        # {provider: (its price, the most a prediction cost)}, as earlier attempts found ...
        self.before: dict[str, tuple[float, float]] = {}
        for state in states:
            for name, cost in state.charged.items():
                price = price_of(name)
                if price and cost > max(price, self.before.get(name, (0.0, 0.0))[1]) + 1e-9:
                    self.before[name] = (price, cost)
        self.now: dict[str, tuple[float, float]] = {}  # ... and as this attempt finds
        self._lock = threading.Lock()

    def expected(self, name: str, price: float) -> float:
        """What a prediction from `name` is expected to cost: the most earlier attempts found
        it charging, where that is more than its price."""
        return self.before.get(name, (0.0, price))[1]

    def charged(self, name: str, reserved: float, cost: float) -> str | None:
        """A prediction reserved at `reserved` cost `cost`: the note to say, the first time
        `name` is found charging more than the price and than earlier attempts found."""
        expected = max(reserved, self.before.get(name, (0.0, 0.0))[1])
        if not reserved or cost <= expected + 1e-9:
            return None
        with self._lock:
            first = name not in self.now
            price, most = self.now.get(name, (reserved, 0.0))
            self.now[name] = (price, max(most, cost))
        return self.note(name) if first else None

    def note(self, name: str, earlier: bool = False) -> str:
        """What a provider charging over price_usd made the budget do: as this attempt found
        it, or (`earlier`) as earlier attempts of the run did, counted from this one's start."""
        price, most = (self.before if earlier else self.now)[name]
        if earlier:
            charged = f"An earlier attempt of run {self.run_id} found {name} charging up to"
            since, then = "from this attempt's first row", "."
        else:
            charged = f"{name} charged up to"
            since, then = "from then on", ", so that the cap holds from the first row."
        return (
            f"{charged} ${most:.4g} for a prediction reserved at ${price:.4g} (provider.price_usd): the budget "
            f"counts every prediction as {most / price:.2f} times dearer {since}"
            f"{'' if earlier else ', those in flight too'}; set price_usd to what {name} charges{then}"
        )

    def notes_before(self) -> list[str]:
        return [self.note(name, earlier=True) for name in sorted(self.before)]

    def notes(self) -> list[str]:
        return self.notes_before() + [self.note(name) for name in sorted(self.now)]
