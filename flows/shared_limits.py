"""Limits shared by every process and machine on one provider account, through Prefect.

With `limits.shared: true` and a Prefect server that all of them use (PREFECT_API_URL),
each run takes, on top of its own precise local pacing:

- a slot of the rate limit `<name>-creates` before each create (a global concurrency
  limit of 1 slot decaying at just under rpm / 60 per second);
- a slot of `<name>-predictions` (limit = `limits.concurrency`) while a prediction runs.

Limits missing on the server are created from this run's config; existing ones are used
as they are (change them in the Prefect UI or with `prefect gcl update`), so the account's
limits are set in one place. Acquisition latency is recorded (see bench/shared_limits.py
and PrefectHQ/prefect issue 15618).

The server coming and going does not cost money: a prediction holding a slot runs to its
end whatever the server does (Prefect's strict mode would stop it, paid, when a renewal of
its lease fails), and a slot that cannot be given back is left to its lease's end. A row
that cannot have a slot because the server is out of reach (after the Prefect client's own
retries) is not sent, nor is any row after it this run (OutOfReach: the rerun does them).
A row kept waiting for a slot says so once a minute, with how many are held: slots that a
restarted server forgot (its default lease storage is in memory) stay held for good.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import NoReturn

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from soundpatch.config import Config
from soundpatch.errors import ConfigError
from soundpatch.limits import RateLimiter
from soundpatch.providers.base import OutOfReach

log = logging.getLogger("soundpatch")
LEASES_ON_DISK = "prefect.server.concurrency.lease_storage.filesystem"


class PrefectSharedLimits:
    NOTICE_SECONDS = 60.0  # a row waiting this long for a prediction slot says so (and again after as long)

    def __init__(self, name: str, per_minute: float, in_flight: int, burst: int = 1) -> None:
        self.api_url = str(PREFECT_API_URL.value())
        self.creates_name = f"{name}-creates"
        self.predictions_name = f"{name}-predictions"
        # One slot decaying at just under the rate: smooth, like the local limiter (a burst
        # on top of a provider's full sliding window is what earns 429s).
        self.interval = 60.0 / (per_minute * RateLimiter.HEADROOM)
        self._client = get_client(sync_client=True)
        self._client.__enter__()  # one connection pool for every task of the run (httpx is thread-safe)
        self.creates_limit = _ensure(self._client, self.creates_name, burst, 1.0 / self.interval)
        self.predictions_limit = _ensure(self._client, self.predictions_name, in_flight, None)
        self._lock = threading.Lock()
        self.create_waits: list[float] = []  # seconds each create waited for the shared rate
        self._lost: str | None = None  # why the server was found out of reach, once it was
        self._noticed = 0.0  # when a row last said it waits for a slot (once a minute is enough)

    def create(self) -> None:
        """One slot of the shared rate. Prefect's own `rate_limit` sleeps the server's
        Retry-After, a random interval that grows with every denied caller, and so runs
        well under the rate (PrefectHQ/prefect issue 15618; bench/shared_limits.py): here a
        denied caller asks again within one interval, with jitter so callers spread out."""
        started = time.perf_counter()
        while True:
            self._within_reach()
            try:
                self._client.increment_concurrency_slots(names=[self.creates_name], slots=1, mode="rate_limit")
                break
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    self._lose(self.creates_name, exc)
                asked = float(exc.response.headers.get("Retry-After") or self.interval)
                time.sleep(min(asked, self.interval) * random.uniform(0.1, 0.5))
            except httpx.HTTPError as exc:  # after the Prefect client's own retries
                self._lose(self.creates_name, exc)
        with self._lock:
            self.create_waits.append(time.perf_counter() - started)

    @contextmanager
    def prediction(self) -> Iterator[None]:
        held = self._slot()
        try:
            yield
        except BaseException:
            self._give_back(held, *sys.exc_info())
            raise
        self._give_back(held, None, None, None)

    def _slot(self) -> AbstractContextManager[None]:
        """A slot of the in-flight limit, held: its lease renewed in the background, and a
        renewal that fails (the server away) only logged, never stopping the prediction."""
        self._within_reach()
        held = concurrency(self.predictions_name, strict=True, raise_on_lease_renewal_failure=False)
        taken = threading.Event()
        threading.Thread(target=self._say_while_waiting, args=(taken,), daemon=True).start()
        try:
            held.__enter__()
        except Exception as exc:  # noqa: BLE001 - the server away (after the client's retries), or the limit gone
            self._lose(self.predictions_name, exc)
        finally:
            taken.set()
        return held

    def _give_back(self, held: AbstractContextManager[None], *exc_info) -> None:  # noqa: ANN002
        """The slot back to the server; one it cannot take now (away) is left to its lease."""
        try:
            held.__exit__(*exc_info)
        except Exception as exc:  # noqa: BLE001 - the prediction is done and paid: it stands
            log.warning(
                "A slot of the shared limit %s could not be given back to the Prefect server (%s: %s); the server "
                "takes it back when its lease ends (if it did not forget the lease in a restart).",
                self.predictions_name,
                type(exc).__name__,
                str(exc)[:200],
            )

    def _within_reach(self) -> None:
        if self._lost is not None:
            raise OutOfReach(self._lost, until="it answers")

    def _lose(self, name: str, exc: Exception) -> NoReturn:
        """No slot of `name` to be had: this row and every row after it are not sent."""
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc  # Prefect's wrapper says less
        why = f"{type(cause).__name__}: {str(cause)[:200]}".rstrip(".")
        with self._lock:
            self._lost = self._lost or (
                f"Not sent: the Prefect server sharing this account's limits ({self.api_url}) gave no slot of "
                f"{name} ({why})"
            )
            lost = self._lost
        raise OutOfReach(lost, until="it answers")

    def _say_while_waiting(self, taken: threading.Event) -> None:
        """While a row waits for a slot: how long, and how many slots are held, said once a
        minute (whichever row waits)."""
        waited = 0.0
        while not taken.wait(self.NOTICE_SECONDS):
            waited += self.NOTICE_SECONDS
            now = time.monotonic()
            with self._lock:
                if now - self._noticed < self.NOTICE_SECONDS * 0.9:
                    continue
                self._noticed = now
            try:
                limit = self._client.read_global_concurrency_limit_by_name(self.predictions_name)
            except Exception:  # noqa: BLE001 - the server away: the wait itself ends saying so
                continue
            log.warning(
                "A row has waited %.0f s for a slot of the shared limit %s on the Prefect server: %d of its %d "
                "slots are held. If no other run on this account is sending now, those slots were left held (a "
                "Prefect server that restarted with its leases in memory forgets who held them): free them with "
                "`prefect gcl update %s --active-slots 0`.",
                waited,
                self.predictions_name,
                limit.active_slots,
                limit.limit,
                self.predictions_name,
            )

    def check_server(self) -> None:
        """Warn when the server keeps its concurrency leases in memory (Prefect's default):
        a restart while rows hold slots then leaves those slots held, and every run waits."""
        try:
            settings = self._client.request("GET", "/admin/settings").json()  # type: ignore[arg-type]
            storage = settings["server"]["concurrency"]["lease_storage"]
        except Exception:  # noqa: BLE001 - Prefect Cloud, or a server that does not say: nothing to tell
            return
        if storage.endswith(".memory"):
            log.warning(
                "The Prefect server at %s keeps concurrency leases in memory: if it restarts while rows hold "
                "slots of the shared limits, those slots stay held and runs wait for them. Start it with "
                "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=%s to keep them on disk.",
                self.api_url,
                LEASES_ON_DISK,
            )


class AccountLimits:
    """The shared limits of each provider a run's rows go to, by the provider's name: each
    provider is an account of its own. The config's provider's are made as the run starts
    (`limits.shared_name`, default soundpatch-<provider>); those of a provider a row names
    instead, as its first row needs them, as soundpatch-<provider>: the limits a run whose
    config names that provider shares by default."""

    def __init__(self, cfg: Config) -> None:
        self._rates = (cfg.limits.requests_per_minute, cfg.limits.concurrency)
        own = PrefectSharedLimits(cfg.limits.shared_name or f"soundpatch-{cfg.provider.name}", *self._rates)
        own.check_server()
        self._by_provider = {cfg.provider.name: own}
        self._lock = threading.Lock()

    def __call__(self, provider: str) -> PrefectSharedLimits:
        with self._lock:
            if provider not in self._by_provider:
                self._by_provider[provider] = PrefectSharedLimits(f"soundpatch-{provider}", *self._rates)
            return self._by_provider[provider]

    @property
    def create_waits(self) -> list[float]:
        """Seconds each create waited for its provider's shared rate."""
        with self._lock:
            return [wait for limits in self._by_provider.values() for wait in limits.create_waits]


def shared_limits(cfg: Config) -> AccountLimits | None:
    """The shared limits this run's config asks for, or None."""
    return AccountLimits(cfg) if cfg.limits.shared else None


def check_server(cfg: Config) -> None:
    """limits.shared needs a server every process uses, not a temporary one per run."""
    if cfg.limits.shared and not PREFECT_API_URL.value():
        raise ConfigError(
            "limits.shared shares limits through a Prefect server every process uses: set PREFECT_API_URL "
            "to it (each run's temporary server would share nothing)."
        )


def _ensure(client, name: str, limit: int, decay: float | None) -> int:  # noqa: ANN001 - Prefect's sync client
    try:
        return client.read_global_concurrency_limit_by_name(name).limit
    except ObjectNotFound:
        pass
    try:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay or 0.0)
        )
    except Exception:  # noqa: BLE001 - another process created it first: use theirs
        return client.read_global_concurrency_limit_by_name(name).limit
    return limit
