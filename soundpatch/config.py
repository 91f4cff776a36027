"""Typed configuration; every default is the embedded setup (local engine, local folders).

A config file is optional. Keys follow ../shared/design/interfaces.md. Unknown keys are
rejected so that a typo (`budget: 5` instead of `budget_usd: 5`) cannot silently leave a
limit at its default.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from soundpatch.errors import ConfigError

PROVIDERS = ("local", "eachlabs", "stability", "fal")
# Providers that rebuild a row's `damaged` spans alone, from the audio around them; a hosted
# model generates the whole region (its mask), and its audio goes into the spans and their
# crossfades alone (edits.spans_for_a_model).
MENDING_DAMAGED = ("local",)

# What each provider charges per prediction when the config does not say.
DEFAULT_PRICES_USD = {"local": 0.0, "eachlabs": 0.20, "stability": 0.20, "fal": 0.20}
# Where each hosted provider is reached, and the variable its key is read from by default.
DEFAULT_BASE_URLS = {
    "local": "",
    "eachlabs": "https://api.eachlabs.ai",
    "stability": "https://api.stability.ai",
    "fal": "https://queue.fal.run",
}
DEFAULT_KEY_ENVS = {"local": "", "eachlabs": "EACHLABS_API_KEY", "stability": "STABILITY_API_KEY", "fal": "FAL_KEY"}
# How long a key stays timed out after a 429 that names no Retry-After, where a provider
# documents it (Stability AI: 60 s after passing 150 requests in 10 s).
DEFAULT_PAUSES_AFTER_429 = {"stability": 60.0}
# What a config says about its provider that is meant for that provider only.
PROVIDER_OWN_KEYS = ("base_url", "api_key_env", "api_key_secret", "price_usd", "pause_after_429_seconds")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProviderConfig(_Section):
    name: str = "local"
    base_url: str | None = None  # default: the provider's own (DEFAULT_BASE_URLS)
    # The NAME of the environment variable holding the key; keys never live in files.
    api_key_env: str | None = None  # default: EACHLABS_API_KEY, STABILITY_API_KEY, FAL_KEY
    # Or the name of a Prefect Secret block holding the key (resolved by the flow).
    api_key_secret: str | None = None
    price_usd: float | None = Field(default=None, ge=0)
    # Hosted providers: how we talk to them.
    timeout_seconds: float = Field(default=60.0, gt=0)  # per HTTP call
    max_retries: int = Field(default=5, ge=0, le=20)  # per create or download
    poll_seconds: float = Field(default=2.0, gt=0)  # first poll interval; grows x1.5
    max_poll_seconds: float = Field(default=15.0, gt=0)
    deadline_seconds: float = Field(default=900.0, gt=0)  # per prediction; then it is cancelled
    context_seconds: float = Field(default=10.0, ge=0, le=95)  # audio sent each side of a region
    pad: Literal["reflect", "silence", "loop"] = "reflect"  # how clips under 6 s are lengthened
    # A create that went out before a crash and whose answer never came may exist and be
    # billed: by default it is counted as spent and not sent again.
    resubmit_in_doubt: bool = False
    # A prediction that was made and paid for, and could not be used (its download, its
    # audio, or a fault of ours failed the row), is kept for the next attempt of the run,
    # which tries it again at no cost. True: pay for a new prediction instead.
    resubmit_unusable: bool = False
    # A 429 without Retry-After holds every create this long (null: the provider's own
    # documented timeout, else a short pause while the pace halves).
    pause_after_429_seconds: float | None = Field(default=None, gt=0)
    # On Ctrl-C / SIGTERM: keep polling predictions in flight (they are paid) or cancel them.
    on_interrupt: Literal["keep", "cancel"] = "keep"

    @field_validator("name")
    @classmethod
    def _known_provider(cls, name: str) -> str:
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
        return name

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_s_name(cls, name: str | None) -> str | None:
        # A key written here in its variable's place (sk-..., a UUID, fal's id:secret) is not
        # said back: "set the environment variable sk-..." would print it wherever the run's
        # output goes.
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(
                "the value given is not an environment variable's name (such as EACHLABS_API_KEY); it names the "
                "variable holding the key, never the key itself"
            )
        return name

    @field_validator("api_key_secret")
    @classmethod
    def _a_block_s_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[a-z0-9-]+", name):  # (Prefect's rule for block names)
            raise ValueError(
                "the value given is not a Prefect Secret block's name (lowercase letters, digits and dashes); it "
                "names the block holding the key, never the key itself"
            )
        return name

    @property
    def price(self) -> float:
        return self.price_usd if self.price_usd is not None else DEFAULT_PRICES_USD[self.name]

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URLS[self.name]).rstrip("/")

    @property
    def pause_after_429(self) -> float | None:
        return self.pause_after_429_seconds or DEFAULT_PAUSES_AFTER_429.get(self.name)

    @property
    def key_env(self) -> str:
        return self.api_key_env or DEFAULT_KEY_ENVS[self.name]

    def price_of(self, name: str) -> float:
        """What one prediction of provider `name` costs, under these settings."""
        return self.for_provider(name).price

    def for_provider(self, name: str) -> ProviderConfig:
        """These settings for another provider (a row may name one): that provider's own
        price, address and key rather than ones meant for another service."""
        if name == self.name:
            return self
        return self.model_copy(update={"name": name, **dict.fromkeys(PROVIDER_OWN_KEYS)})


class LimitsConfig(_Section):
    concurrency: int = Field(default=8, ge=1, le=1024)
    requests_per_minute: float = Field(default=60, gt=0)  # creates sent to the provider
    polls_per_minute: float = Field(default=600, gt=0)  # status polls, paced apart from creates
    # The span a provider counts requests_per_minute over (a sliding minute unless it says
    # otherwise); a shorter one leaves no room for a burst.
    rate_window_seconds: float = Field(default=60.0, gt=0, le=3600)
    budget_usd: float = Field(default=10.0, ge=0)
    # The recordings rows hold decoded at once (memory_room.py); None: half the machine's
    # memory (or its container's). One larger than this on its own is still done, alone.
    inputs_memory_mb: float | None = Field(default=None, gt=0)
    # No longer used: results are written to disk until published, not held in memory
    # (publish.py). Still accepted, so that configs written for the version that used it load.
    results_memory_mb: float | None = Field(default=None, gt=0)
    # Several processes or machines on one provider account: share the rate and the
    # in-flight limit through the Prefect server they all use (PREFECT_API_URL), as global
    # concurrency limits named `<shared_name>-creates` and `<shared_name>-predictions`.
    shared: bool = False
    shared_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")  # default soundpatch-<provider>


class S3Config(_Section):
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Objects past this size are uploaded in parts (S3 parts are at least 5 MB).
    multipart_threshold_mb: float = Field(default=64.0, ge=5)
    # A run whose outputs are in a bucket holds a lease there (one machine at a time): taken
    # up by another machine this long after its holder last renewed it.
    lease_seconds: float = Field(default=60.0, ge=3)


class HttpConfig(_Section):
    """https:// inputs: fetched with a size cap and timeouts, public addresses only by default."""

    timeout_seconds: float = Field(default=30.0, gt=0)
    # Loopback, private (10/8, 192.168/16, ...), link-local and similar addresses are refused
    # unless this is set: a manifest must not make soundpatch fetch from inside your network.
    allow_private_addresses: bool = False


class StorageConfig(_Section):
    s3: S3Config = Field(default_factory=S3Config)
    http: HttpConfig = Field(default_factory=HttpConfig)
    staging: str | None = None
    # What one input (local, s3:// or https://) may weigh.
    max_input_mb: float = Field(default=2048.0, gt=0)


class OutputConfig(_Section):
    uri: str = "./outputs/"
    # `same` keeps each input's own container (an extension of interfaces.md).
    format: Literal["wav", "flac", "mp3", "ogg", "same"] = "wav"
    # A CSV under `uri` that each run adds its results to, a line each (dataset_index.py).
    index: str | None = None

    @field_validator("index")
    @classmethod
    def _index_name(cls, name: str | None) -> str | None:
        if name is None:
            return None
        parts = name.split("/")  # ("/x.csv" has an empty first part)
        if not name.endswith(".csv") or "" in parts or ".." in parts or name.startswith("."):
            raise ValueError(f"{name!r} is not a CSV's name under output.uri, such as metadata.csv")
        return name


class SpliceConfig(_Section):
    # Equal-power crossfade inside each edge of the region; capped at a quarter of it.
    crossfade_ms: float = Field(default=10.0, ge=0, le=1000)


class Config(_Section):
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    splice: SpliceConfig = Field(default_factory=SpliceConfig)
    runs_dir: str = "./runs"


def _switch_provider(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """`--provider` naming another provider than the file's: the file's address, key and
    price were written for its own provider and must not be sent to another one."""
    name = overrides.get("provider.name")
    section = data.get("provider")
    if not name or not isinstance(section, dict) or section.get("name", "local") == name:
        return
    for key in PROVIDER_OWN_KEYS:
        if overrides.get(f"provider.{key}") is None:
            section.pop(key, None)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, flags: dict[str, str] | None = None
) -> Config:
    """Read a YAML config (or none: embedded defaults) and apply dotted-key overrides.

    `overrides` maps dotted keys to values, e.g. {"limits.budget_usd": 5}; None values are
    ignored so that unset CLI flags do not clobber the file. `flags`: what to call the
    command-line option each override came from when its value is refused ("Option
    --budget (limits.budget_usd)").
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"Cannot read config file {p}: {exc.strerror or exc}.") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"Config file {p} is not valid YAML{where}.") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {p} must be a mapping of sections, not a list or value.")
        data = loaded
    return config_from(data, overrides, flags, path)


def config_from(
    data: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    flags: dict[str, str] | None = None,
    path: str | Path | None = None,
) -> Config:
    """A config from its sections as a mapping (`data`, left as it is) and dotted-key
    `overrides`, as load_config; `path`: the file it came from, for messages."""
    data = copy.deepcopy(data)
    _switch_provider(data, overrides or {})
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        # The override the error is in: `where` itself, or a key under it (a misspelt section).
        given = [key for key, value in (overrides or {}).items() if value is not None]  # (in the order given)
        written = next((key for key in given if key == where or key.startswith(f"{where}.")), None)
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "is not a known key" + _what_was_meant(written or where)
        source = f" in {path}" if path is not None else ""
        # "... is not a known key" goes on from the key; what is wrong with a value is said after it.
        after = " " if first["type"] == "extra_forbidden" else ": "
        if message.startswith("Input should "):  # pydantic's: the value given says more than "input"
            message = f"{_as_given(first.get('input'))} {message[len('Input ') :]}"
        message = _lower_first(message)
        end = "" if message.endswith("?") else "."
        if written is not None:  # the value came from the command line, or a flow's overrides
            said = (flags or {}).get(written) or f"Override '{written}'"
            raise ConfigError(f"{said}{after}{message}{end}") from None
        raise ConfigError(f"Config key '{where}'{source}{after}{message}{end}") from None


# Keys users reach for by another name: the command line's option, or a shorter word.
_OTHER_NAMES = {"rpm": "requests_per_minute", "budget": "budget_usd", "price": "price_usd", "endpoint": "endpoint_url"}
# Keys under which a secret itself may have been written: where it goes is said instead.
_API_KEY_WORDS = {"api_key", "apikey", "key", "token", "api_token", "secret", "password"}
_WHERE_API_KEYS_GO = (
    ": API keys never live in config files; put the key in an environment variable and name that variable "
    "in 'provider.api_key_env', or a Prefect Secret's name in 'provider.api_key_secret'"
)
_WHERE_S3_CREDENTIALS_GO = (
    ": S3 credentials never live in config files; boto3 reads them from AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE) or the machine's role"
)


def _what_was_meant(written: str) -> str:
    """What follows "is not a known key" for the dotted key written: `; did you mean
    'limits.concurrency'?` when a key is close (the same word misspelt, another name for it,
    or the key in another section), or where a secret goes instead ("" if nothing helps)."""
    parent, _, leaf = written.rpartition(".")
    low = leaf.lower()
    if parent.split(".")[0] == "provider" and low in _API_KEY_WORDS:
        return _WHERE_API_KEYS_GO
    if parent.split(".")[0] == "storage" and ("access_key" in low or "secret" in low):
        return _WHERE_S3_CREDENTIALS_GO
    paths = list(_key_paths(Config))
    beside = [path.rpartition(".")[2] for path in paths if path.rpartition(".")[0] == parent]
    named = _OTHER_NAMES.get(leaf, leaf)
    close = difflib.get_close_matches(named, beside, n=1, cutoff=0.75)
    elsewhere = [path for path in paths if path.rpartition(".")[2] == named]
    if close:
        meant = f"{parent}.{close[0]}" if parent else close[0]
    elif len(elsewhere) == 1:
        meant = elsewhere[0]
    else:
        meant = next(iter(difflib.get_close_matches(written, paths, n=1, cutoff=0.8)), "")
    return f"; did you mean '{meant}'?" if meant else ""


def _key_paths(model: type[BaseModel], parent: str = "") -> Iterator[str]:
    """Every key of a config section, dotted (`limits`, `limits.concurrency`, ...)."""
    for name, field in model.model_fields.items():
        path = f"{parent}.{name}" if parent else name
        yield path
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _key_paths(field.annotation, path)


def _as_given(value: Any) -> str:
    """A config value as YAML spells it, briefly: true, null, 'aac', 8."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _lower_first(text: str) -> str:
    text = text.rstrip(".")
    if text.startswith("Value error, "):
        text = text[len("Value error, ") :]
    return text[:1].lower() + text[1:] if text else text
