from __future__ import annotations

from pathlib import Path

import pytest

from soundpatch.config import load_config
from soundpatch.errors import ConfigError


def test_defaults_are_the_embedded_setup():
    cfg = load_config()
    assert cfg.provider.name == "local" and cfg.provider.price == 0.0
    assert cfg.output.uri == "./outputs/" and cfg.output.format == "wav"
    assert cfg.limits.concurrency == 8 and cfg.limits.budget_usd == 10.0
    assert cfg.runs_dir == "./runs"


def test_file_values_and_flag_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("limits: {budget_usd: 5, concurrency: 4}\noutput: {format: flac}\n")
    cfg = load_config(path, {"limits.budget_usd": 2.5, "limits.concurrency": None})
    assert cfg.limits.budget_usd == 2.5  # the flag wins
    assert cfg.limits.concurrency == 4  # an unset flag does not clobber the file
    assert cfg.output.format == "flac"


def test_eachlabs_has_its_own_price():
    assert load_config(overrides={"provider.name": "eachlabs"}).provider.price == pytest.approx(0.20)


def test_each_provider_has_its_own_address_and_key_variable():
    cfg = load_config(
        overrides={"provider.name": "stability", "provider.api_key_env": "MY_KEY", "provider.api_key_secret": "s"}
    )
    assert (cfg.provider.url, cfg.provider.key_env) == ("https://api.stability.ai", "MY_KEY")
    # A row naming another provider gets that provider's own settings, not these.
    fal = cfg.provider.for_provider("fal")
    assert (fal.url, fal.key_env, fal.price) == ("https://queue.fal.run", "FAL_KEY", pytest.approx(0.20))
    assert fal.api_key_secret is None  # the Secret holds the other provider's key
    assert cfg.provider.for_provider("stability") is cfg.provider


def test_switching_provider_on_the_command_line_drops_the_files_address_key_and_price(tmp_path):
    path = tmp_path / "each.yaml"
    path.write_text(
        "provider: {name: eachlabs, base_url: 'https://proxy.example/each', api_key_env: EACH_KEY,\n"
        "           api_key_secret: each-secret, price_usd: 0.5, poll_seconds: 1}\n"
    )
    cfg = load_config(path, {"provider.name": "stability"}).provider
    assert (cfg.url, cfg.key_env, cfg.api_key_secret, cfg.price) == (
        "https://api.stability.ai",
        "STABILITY_API_KEY",
        None,
        pytest.approx(0.20),
    )
    assert cfg.poll_seconds == 1  # how to talk to a provider in general is kept
    same = load_config(path, {"provider.name": "eachlabs"}).provider
    assert (same.url, same.key_env, same.price) == ("https://proxy.example/each", "EACH_KEY", 0.5)


CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.provider.name in ("local", "eachlabs", "stability", "fal")
    if cfg.provider.name in ("eachlabs", "fal"):
        assert cfg.storage.staging, "these providers fetch clips by URL"


def test_default_yaml_spells_out_exactly_the_defaults():
    shipped = load_config(Path(__file__).parent.parent / "configs" / "default.yaml")
    assert shipped.model_dump() == load_config().model_dump()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: {budget: 5}\n", "'limits.budget' in"),
        ("limits: {concurency: 8}\n", "is not a known key; did you mean 'limits.concurrency'?"),
        ("storage: {s3: {endpoint: x}}\n", "not a known key; did you mean 'storage.s3.endpoint_url'?"),
        ("limit: {concurrency: 3}\n", "c.yaml is not a known key; did you mean 'limits'?"),
        ("colour: blue\n", "c.yaml is not a known key."),
        # Another name for a key (the command line's option), or the key in another section.
        ("limits: {rpm: 30}\n", "not a known key; did you mean 'limits.requests_per_minute'?"),
        ("budget_usd: 5\n", "'budget_usd' in c.yaml is not a known key; did you mean 'limits.budget_usd'?"),
        ("provider: {concurrency: 4}\n", "not a known key; did you mean 'limits.concurrency'?"),
        ("output: {staging: 's3://b/s/'}\n", "not a known key; did you mean 'storage.staging'?"),
        # A secret written into the file: where it goes instead (and it is not said back: below).
        ("provider: {api_key: sk-live-4242}\n", "'provider.api_key' in c.yaml is not a known key: API keys never"),
        ("storage: {s3: {aws_secret_access_key: sk-live-4242}}\n", "not a known key: S3 credentials never live"),
        (
            "provider: {api_key_env: sk-live-4242}\n",
            "Config key 'provider.api_key_env' in c.yaml: the value given is not an environment variable's name",
        ),
        (
            "provider: {api_key_secret: sk-live-4242AbC}\n",
            "Config key 'provider.api_key_secret' in c.yaml: the value given is not a Prefect Secret block's name",
        ),
        (
            "limits: {concurrency: 0}\n",
            "Config key 'limits.concurrency' in c.yaml: 0 should be greater than or equal to 1.",
        ),
        ("provider: {name: nosuch}\n", "Config key 'provider.name' in c.yaml: unknown provider 'nosuch'"),
        (
            "output: {format: aac}\n",
            "Config key 'output.format' in c.yaml: 'aac' should be 'wav', 'flac', 'mp3', 'ogg' or 'same'.",
        ),
        ("output: {index: true}\n", "Config key 'output.index' in c.yaml: true should be a valid string."),
        (
            "limits: {concurrency: eight}\n",
            "Config key 'limits.concurrency' in c.yaml: 'eight' should be a valid integer, unable to parse",
        ),
        (
            "output: {index: ../metadata.csv}\n",
            "Config key 'output.index' in c.yaml: '../metadata.csv' is not a CSV's name under output.uri",
        ),
        ("- a\n- b\n", "must be a mapping"),
        ("limits: [\n", "not valid YAML"),
    ],
)
def test_bad_configs_say_which_key(tmp_path, monkeypatch, text, message):
    (tmp_path / "c.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)  # the file named as given: c.yaml
    with pytest.raises(ConfigError) as info:
        load_config("c.yaml")
    assert message in str(info.value) and "sk-live" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_config("/nonexistent/c.yaml")


def test_overrides_go_over_a_config_given_as_a_mapping_and_leave_it_as_it_was():
    # What the command hands its flow (the config as a mapping), with a run's own overrides.
    from soundpatch.config import config_from

    given = load_config(overrides={"provider.name": "eachlabs", "limits.budget_usd": 5}).model_dump()
    cfg = config_from(given, {"limits.budget_usd": 50, "provider.name": "fal"})
    assert cfg.limits.budget_usd == 50 and cfg.provider.name == "fal"
    assert given["limits"]["budget_usd"] == 5 and given["provider"]["name"] == "eachlabs"
    with pytest.raises(ConfigError, match=r"^Override 'limits.concurrency': "):
        config_from(given, {"limits.concurrency": 0})
