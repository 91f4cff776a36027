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
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from soundpatch.config import Config
from soundpatch.errors import ConfigError
from soundpatch.limits import RateLimiter


class PrefectSharedLimits:
    def __init__(self, name: str, per_minute: float, in_flight: int, burst: int = 1) -> None:
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

    def create(self) -> None:
        """One slot of the shared rate. Prefect's own `rate_limit` sleeps the server's
        Retry-After, a random interval that grows with every denied caller, and so runs
        well under the rate (PrefectHQ/prefect issue 15618; bench/shared_limits.py): here a
        denied caller asks again within one interval, with jitter so callers spread out."""
        started = time.perf_counter()
        while True:
            try:
                self._client.increment_concurrency_slots(names=[self.creates_name], slots=1, mode="rate_limit")
                break
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                asked = float(exc.response.headers.get("Retry-After") or self.interval)
                time.sleep(min(asked, self.interval) * random.uniform(0.1, 0.5))
        with self._lock:
            self.create_waits.append(time.perf_counter() - started)

    @contextmanager
    def prediction(self) -> Iterator[None]:
        with concurrency(self.predictions_name, strict=True):
            yield


def shared_limits(cfg: Config) -> PrefectSharedLimits | None:
    """The shared limits this run's config asks for, or None."""
    if not cfg.limits.shared:
        return None
    name = cfg.limits.shared_name or f"soundpatch-{cfg.provider.name}"
    return PrefectSharedLimits(name, cfg.limits.requests_per_minute, cfg.limits.concurrency)


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
