from __future__ import annotations

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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: {budget: 5}\n", "'limits.budget' in"),
        ("limits: {concurrency: 0}\n", "limits.concurrency"),
        ("provider: {name: nosuch}\n", "unknown provider 'nosuch'"),
        ("output: {format: aac}\n", "output.format"),
        ("- a\n- b\n", "must be a mapping"),
        ("limits: [\n", "not valid YAML"),
    ],
)
def test_bad_configs_say_which_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_config("/nonexistent/c.yaml")
