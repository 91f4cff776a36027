"""Retries, declared: which failures are retried, how often, how long to wait.

Business code says `policy.call(fn, retry_if=...)`; the waits (exponential backoff with
full jitter, a server's Retry-After honoured) and the bound live here, and every retry
is reported to an `on_retry` callback so it is visible in the journal and the report.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class Retryable(Exception):
    """A failure worth another try; `wait` is what the server asked for, if anything."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries in all, the first included
    base_seconds: float = 0.5
    cap_seconds: float = 30.0

    def delay(self, attempt: int, asked: float | None = None) -> float:
        """Seconds before try `attempt + 1`: full jitter, at least what the server asked."""
        backoff = random.uniform(0, min(self.cap_seconds, self.base_seconds * 2 ** (attempt - 1)))
        return max(backoff, asked or 0.0)

    def call(
        self,
        fn: Callable[[], T],
        on_retry: Callable[[int, Retryable, float], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """Run fn; on Retryable wait and try again, at most `attempts` tries in all."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Retryable as exc:
                if attempt == self.attempts:
                    raise
                wait = self.delay(attempt, exc.wait)
                if on_retry is not None:
                    on_retry(attempt, exc, wait)
                sleep(wait)
        raise AssertionError("unreachable")
