from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from daman.config import Config, config_path, format_size, load_config, parse_size, save_config
from daman.errors import ConfigError, ConfigWarning, NotConfiguredError


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
    ("fields", "field"),
    [
        ({"storage_name": ""}, "storage_name"),
        ({"storage_name": 5}, "storage_name"),
        ({"storage_name": "s3://"}, "storage_name"),
        ({"storage_name": "b", "service": "dropbox"}, "service"),
        ({"storage_name": "b", "service": "gcp"}, "service"),
        ({"storage_name": "b", "checksums": "never"}, "checksums"),
        ({"storage_name": "b", "allocated_space": "big"}, "allocated_space"),
        ({"storage_name": "b", "allocated_space": "1" * 400}, "allocated_space"),
        ({"storage_name": "b", "connect_timeout": 0}, "connect_timeout"),
        ({"storage_name": "b", "read_timeout": "60"}, "read_timeout"),
        ({"storage_name": "b", "read_timeout": float("nan")}, "read_timeout"),
        ({"storage_name": "b", "check_current": "false"}, "check_current"),
        ({"storage_name": "b", "progress": 1}, "progress"),
        ({"storage_name": "b", "max_attempts": 0}, "max_attempts"),
        ({"storage_name": "b", "max_attempts": 2.5}, "max_attempts"),
        ({"storage_name": "b", "max_attempts": True}, "max_attempts"),
        ({"storage_name": "b", "max_attempts": float("nan")}, "max_attempts"),
        ({"storage_name": "b", "max_attempts": float("inf")}, "max_attempts"),
        ({"storage_name": "b", "local_dir": 5}, "local_dir"),
        ({"storage_name": "b", "endpoint_url": "minio:9000"}, "endpoint_url"),
        ({"storage_name": "b", "region": ["eu"]}, "region"),
        ({"storage_name": "b", "signing_key": 1234}, "signing_key"),
    ],
)
def test_config_rejects_every_bad_field_naming_it_and_the_fix(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config(**fields)
    message = str(caught.value)
    assert message.startswith(f"{field} must be") and f"dm_configure --{field}" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"storage_name": "s3://bucket/team"}, {"storage_name": "bucket/team"}),
        ({"storage_name": "S3://bucket/"}, {"storage_name": "bucket"}),
        ({"signing_key": "none"}, {"signing_key": None}),
        ({"signing_key": "None"}, {"signing_key": None}),
        ({"endpoint_url": "none", "region": "NONE"}, {"endpoint_url": None, "region": None}),
        ({"local_dir": ""}, {"local_dir": None}),
        ({"allocated_space": "none"}, {"allocated_space": None}),
        ({"max_attempts": 3.0, "read_timeout": 5}, {"max_attempts": 3, "read_timeout": 5.0}),
    ],
)
def test_config_normalises_what_every_front_end_may_send(fields: dict, expected: dict) -> None:
    config = Config(**{"storage_name": "bucket", "service": "aws", **fields})
    assert {name: getattr(config, name) for name in expected} == expected


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
        (json.dumps({"service": "aws"}), "storage_name is required"),
        (json.dumps({"storage_name": "b", "read_timeout": "60"}), "read_timeout must be"),
        (json.dumps({"storage_name": "b", "check_current": "false"}), "check_current must"),
        (json.dumps({"storage_name": "b", "local_dir": 5}), "local_dir must be"),
    ],
)
def test_broken_config_files_give_clear_errors(
    daman_home: Path, content: str, message: str
) -> None:
    daman_home.mkdir(parents=True, exist_ok=True)
    (daman_home / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config()


@pytest.mark.parametrize("kind", ["folder", "unreadable", "not-utf8"])
def test_a_config_file_that_cannot_be_read_is_one_line(daman_home: Path, kind: str) -> None:
    daman_home.mkdir(parents=True, exist_ok=True)
    path = daman_home / "config.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "unreadable":
        path.write_text("{}")
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: use a file that cannot be opened
            path.unlink()
            path.symlink_to(path)  # a link to itself: ELOOP
    else:
        path.write_bytes(b'{"storage_name": "\xff\xfe"}')
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_home_unset_with_no_passwd_entry_is_a_config_error(monkeypatch) -> None:
    import daman.config as config_module

    monkeypatch.delenv("DAMAN_HOME")
    monkeypatch.delenv("HOME")

    def no_home(self):  # what pathlib does with no HOME and no passwd entry
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(config_module.Path, "expanduser", no_home)
    with pytest.raises(ConfigError, match="HOME"):
        config_module.daman_home()
    with pytest.raises(ConfigError, match="HOME"):
        _ = Config(storage_name="b", local_dir="~/cache").cache_dir


@pytest.mark.parametrize(
    ("name", "endpoint", "valid"),
    [
        ("my-bucket.team", None, True),
        ("abc", None, True),
        ("Bad Bucket", None, False),
        ("Bad Bucket", "http://minio:9000", False),  # botocore itself refuses a space
        ("ab", None, False),
        ("a" * 64, None, False),
        ("-bucket", None, False),
        ("bucket-", None, False),
        ("My_Bucket", None, False),  # not on AWS (legacy us-east-1 names aside) ...
        ("My_Bucket", "http://minio:9000", True),  # ... but relaxed S3-compatible servers
        ("Legacy_Bucket", "https://s3.amazonaws.com", True),  # and old us-east-1 ones, so
        ("a" * 255, "http://ceph:7480", True),
        ("a" * 256, "http://ceph:7480", False),
        ("_bucket", "http://ceph:7480", True),
        ("bucket:name", "http://minio:9000", False),  # botocore refuses ':'
    ],
)
def test_s3_bucket_names_are_checked_before_any_request(
    name: str, endpoint: str | None, valid: bool
) -> None:
    def make() -> Config:
        return Config(storage_name=f"{name}/team", service="aws", endpoint_url=endpoint)

    if valid:
        assert make().storage_name == f"{name}/team"
    else:
        with pytest.raises(ConfigError, match="bucket name") as caught:
            make()
        assert "\n" not in str(caught.value) and "dm_configure --storage_name" in str(caught.value)


@pytest.mark.parametrize(
    ("storage_name", "service", "expected"),
    [
        ("s3://bucket/team", "aws", "bucket/team"),
        ("gs://bucket/team/", "gcs", "bucket/team"),
        ("GS://bucket", "gcs", "bucket"),
        ("s3://bucket/team", "gcs", None),
        ("gs://bucket/team", "aws", None),
        ("s3://bucket", "local", None),
        ("gs://", "gcs", None),
    ],
)
def test_a_bucket_url_goes_with_its_service(storage_name: str, service: str, expected) -> None:
    if expected is not None:
        assert Config(storage_name=storage_name, service=service).storage_name == expected
    else:
        with pytest.raises(ConfigError, match="storage_name must be") as caught:
            Config(storage_name=storage_name, service=service)
        assert "\n" not in str(caught.value)


def test_an_unknown_field_is_ignored_with_a_warning_naming_file_and_field(
    daman_home: Path,
) -> None:
    daman_home.mkdir(parents=True, exist_ok=True)
    path = daman_home / "config.json"
    path.write_text(json.dumps({"storage_name": "bucket", "service": "aws", "colour": "red"}))
    with pytest.warns(ConfigWarning) as caught:
        config = load_config()
    assert config == Config(storage_name="bucket", service="aws")
    [warning] = caught
    message = str(warning.message)
    assert str(path) in message and "colour" in message and "\n" not in message
    assert warning.filename == __file__  # at the caller's line


def test_save_keeps_the_fields_a_newer_daman_wrote(daman_home: Path) -> None:
    path = save_config(Config(storage_name="bucket", service="aws"), extra={"colour": "red"})
    saved = json.loads(path.read_text())
    assert saved["colour"] == "red" and saved["storage_name"] == "bucket"
