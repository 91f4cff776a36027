"""Providers behind one small protocol; `make_provider` picks one by config name."""

from __future__ import annotations

from collections.abc import Callable

from soundpatch.config import Config
from soundpatch.errors import ConfigError
from soundpatch.limits import InFlight, RateLimiter, SharedLimits
from soundpatch.providers.base import (
    InpaintRequest,
    NotStarted,
    OutOfReach,
    PaidAnswer,
    Prediction,
    PredictionFailed,
    Provider,
    RoomGone,
)
from soundpatch.s3 import S3

__all__ = [
    "InpaintRequest",
    "NotStarted",
    "OutOfReach",
    "PaidAnswer",
    "Prediction",
    "PredictionFailed",
    "Provider",
    "RoomGone",
    "make_provider",
]


def make_provider(
    config: Config,
    name: str | None = None,
    s3: S3 | None = None,
    api_key: str | None = None,
    shared: Callable[[str], SharedLimits] | None = None,
) -> Provider:
    """`shared(name)`: the limits shared with other processes on that provider's account."""
    name = name or config.provider.name
    provider_config = config.provider.for_provider(name)
    if name == "local":
        from soundpatch.providers.local import LocalEngine

        return LocalEngine(price_usd=provider_config.price, in_flight=InFlight(config.limits.concurrency))
    # Shared by every row of this process on this provider: a 429 slows them all.
    shared_limits = shared(name) if shared is not None else None
    creates = RateLimiter(
        config.limits.requests_per_minute,
        shared=shared_limits.create if shared_limits else None,
        window=config.limits.rate_window_seconds,
    )
    in_flight = InFlight(config.limits.concurrency, shared_limits)
    if name in ("eachlabs", "fal"):
        from soundpatch.staging import Staging

        staging = (
            Staging(s3 or S3(config.storage.s3), config.storage.staging, after=max(3, config.limits.concurrency))
            if config.storage.staging
            else None
        )
        if name == "eachlabs":
            from soundpatch.providers.eachlabs import EachLabs as Queued
        else:
            from soundpatch.providers.fal import Fal as Queued
        return Queued(
            provider_config,
            staging,
            api_key=api_key,
            concurrency=config.limits.concurrency,
            creates=creates,
            polls=RateLimiter(config.limits.polls_per_minute, window=config.limits.rate_window_seconds),
            in_flight=in_flight,
        )
    if name == "stability":
        from soundpatch.providers.stability import Stability

        return Stability(
            provider_config,
            api_key=api_key,
            concurrency=config.limits.concurrency,
            creates=creates,
            in_flight=in_flight,
        )
    raise ConfigError(f"Provider {name!r} is not available in this version of soundpatch.")
