"""Providers behind one small protocol; `make_provider` picks one by config name."""

from __future__ import annotations

from soundpatch.config import Config
from soundpatch.errors import ConfigError
from soundpatch.limits import InFlight, RateLimiter, SharedLimits
from soundpatch.providers.base import InpaintRequest, NotStarted, Prediction, PredictionFailed, Provider
from soundpatch.s3 import S3

__all__ = ["InpaintRequest", "NotStarted", "Prediction", "PredictionFailed", "Provider", "make_provider"]


def make_provider(
    config: Config,
    name: str | None = None,
    s3: S3 | None = None,
    api_key: str | None = None,
    shared: SharedLimits | None = None,
) -> Provider:
    name = name or config.provider.name
    # A row may name another provider than the config's; it then gets that provider's
    # own default price rather than one meant for another service.
    provider_config = (
        config.provider
        if name == config.provider.name
        else config.provider.model_copy(update={"name": name, "price_usd": None})
    )
    if name == "local":
        from soundpatch.providers.local import LocalEngine

        return LocalEngine(price_usd=provider_config.price, in_flight=InFlight(config.limits.concurrency))
    if name == "eachlabs":
        from soundpatch.providers.eachlabs import EachLabs
        from soundpatch.staging import Staging

        staging = Staging(s3 or S3(config.storage.s3), config.storage.staging) if config.storage.staging else None
        return EachLabs(
            provider_config,
            staging,
            api_key=api_key,
            concurrency=config.limits.concurrency,
            creates=RateLimiter(
                config.limits.requests_per_minute,
                shared=shared.create if shared else None,
                window=config.limits.rate_window_seconds,
            ),
            polls=RateLimiter(config.limits.polls_per_minute, window=config.limits.rate_window_seconds),
            in_flight=InFlight(config.limits.concurrency, shared),
        )
    raise ConfigError(f"Provider {name!r} is not available in this version of soundpatch; use local or eachlabs.")
