"""Providers behind one small protocol; `make_provider` picks one by config name."""

from __future__ import annotations

from soundpatch.config import ProviderConfig
from soundpatch.errors import ConfigError
from soundpatch.providers.base import InpaintRequest, Prediction, Provider

__all__ = ["InpaintRequest", "Prediction", "Provider", "make_provider"]


def make_provider(config: ProviderConfig, name: str | None = None) -> Provider:
    name = name or config.name
    if name == "local":
        from soundpatch.providers.local import LocalEngine

        return LocalEngine(price_usd=config.price if config.name == "local" else 0.0)
    raise ConfigError(
        f"Provider {name!r} is not available in this version of soundpatch; use provider.name: local."
    )
