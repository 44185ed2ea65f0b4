from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from daman.config import Config, config_path, format_size, load_config, parse_size, save_config
from daman.errors import ConfigError, NotConfiguredError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1000, 1000),
        ("1000", 1000),
        ("500MB", 500 * 10**6),
        ("500 mb", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("10k", 10_000),
        ("3KiB", 3072),
        ("1TiB", 2**40),
        (None, None),
        ("none", None),
        ("unlimited", None),
        (0, 0),
    ],
)
def test_parse_size(text: object, expected: int | None) -> None:
    assert parse_size(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["-1", -5, "lots", "5 parsecs", "1.2.3GB", True, float("inf"), []])
def test_parse_size_rejects_nonsense(text: object) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1288490189, "1.2 GiB"), (None, "no limit")],
)
def test_format_size(n: int | None, text: str) -> None:
    assert format_size(n) == text


def test_config_defaults_and_cache_dir(daman_home: Path) -> None:
    config = Config(storage_name="bucket", service="aws")
    assert config.allocated_space is None
    assert config.check_current is True
    assert config.cache_dir == daman_home / "data"
    assert Config(storage_name="b", local_dir="~/x").cache_dir == Path.home() / "x"


def test_config_parses_allocated_space() -> None:
    assert Config(storage_name="b", allocated_space="2GiB").allocated_space == 2 * 2**30


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"storage_name": ""}, "storage_name is required"),
        ({"storage_name": "b", "service": "gcp"}, "unknown service"),
        ({"storage_name": "b", "checksums": "never"}, "unknown checksums"),
        ({"storage_name": "b", "allocated_space": "big"}, "invalid size"),
        ({"storage_name": "b", "connect_timeout": 0}, "timeouts"),
    ],
)
def test_config_rejects_bad_fields(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**fields)


def test_save_and_load_round_trip_with_private_mode(daman_home: Path) -> None:
    config = Config(storage_name="bucket/prefix", service="aws", allocated_space="1GB")
    path = save_config(config)
    assert path == config_path() == daman_home / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config() == config
    assert not list(daman_home.glob("*.incomplete"))


def test_daman_home_relocates_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAMAN_HOME", str(tmp_path / "elsewhere"))
    assert config_path() == tmp_path / "elsewhere" / "config.json"


def test_missing_config_says_which_command_fixes_it() -> None:
    with pytest.raises(NotConfiguredError, match="dm_configure") as info:
        load_config()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "does not hold a configuration"),
        (json.dumps({"storage_name": "b", "colour": "red"}), "unknown configuration field"),
        (json.dumps({"service": "aws"}), "incomplete configuration"),
    ],
)
def test_broken_config_files_give_clear_errors(
    daman_home: Path, content: str, message: str
) -> None:
    daman_home.mkdir(parents=True, exist_ok=True)
    (daman_home / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config()
