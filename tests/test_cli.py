"""The console scripts, run as real subprocesses through their installed entry points."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daman import Config, Manager

BIN = Path(sys.executable).parent


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    command = args[0]
    exe = shutil.which(command, path=str(BIN))
    assert exe, f"{command} is not installed next to {sys.executable}"
    return subprocess.run(
        [exe, *args[1:]], capture_output=True, text=True, input=input, timeout=120, env=os.environ
    )


def configure(config: Config) -> subprocess.CompletedProcess:
    args = ["dm_configure", "--storage_name", config.storage_name, "--service", config.service]
    args += ["--local_dir", str(config.cache_dir)]
    if config.endpoint_url:
        args += ["--endpoint_url", config.endpoint_url]
    return run(*args)


@pytest.mark.parametrize("command", ["dm_aws", "dm_configure", "dm_pull", "dm_delete"])
def test_help_describes_the_command(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout and len(result.stdout.splitlines()) > 5


@pytest.mark.parametrize(
    "args",
    [("dm_pull",), ("dm_delete",), ("dm_configure", "--storage_name", "x"), ("dm_aws",)],
)
def test_missing_required_flags_is_a_usage_error(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 2 and "required" in result.stderr


def test_commands_before_configuring_say_what_to_run() -> None:
    result = run("dm_pull", "--key", "k")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "dm_configure" in result.stderr


def test_configure_pull_delete(config: Config, daman_home: Path) -> None:
    result = configure(config)
    assert result.returncode == 0, result.stderr
    assert config.storage_name in result.stdout and (daman_home / "config.json").exists()

    with Manager(config.replace(local_dir=str(daman_home / "elsewhere"))) as other:
        other.push(list(range(10)), "team/x")

    result = run("dm_pull", "--key", "team/x", "--persist", "--quiet")
    assert result.returncode == 0, result.stderr
    with Manager(config) as manager:
        entry = manager.cache.get("team/x")
        assert entry.persist and str(entry.path) in result.stdout

    result = run("dm_pull", "--key", "missing")
    assert result.returncode == 1 and "not found" in result.stderr

    result = run("dm_pull", "--key", "../escape")
    assert result.returncode == 1 and "invalid key" in result.stderr

    result = run("dm_delete", "--key", "team/x")
    assert result.returncode == 0
    with Manager(config) as manager:
        assert manager.cache.get("team/x") is None and manager.exists("team/x")

    result = run("dm_delete", "--key", "team/x", "--remote")  # stdin is not a terminal
    assert result.returncode == 0
    with Manager(config) as manager:
        assert not manager.exists("team/x")

    result = run("dm_delete", "--key", "team/x", "--remote")
    assert result.returncode == 1 and "not found" in result.stderr
    assert list((config.cache_dir / "tmp").iterdir()) == []


def test_configure_rejects_a_bad_size_and_a_missing_bucket(s3_endpoint: str) -> None:
    result = run("dm_configure", "--storage_name", "x", "--service", "local",
                 "--allocated_space", "huge")  # fmt: skip
    assert result.returncode == 1 and "invalid size" in result.stderr
    result = run("dm_configure", "--storage_name", "no-such-bucket", "--service", "aws",
                 "--endpoint_url", s3_endpoint)  # fmt: skip
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = run("dm_configure", "--storage_name", "b", "--service", "ftp")
    assert result.returncode == 2


def test_dm_aws_writes_a_private_file_and_keeps_other_profiles(daman_home: Path) -> None:
    creds = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
    result = run("dm_aws", "--access_key_id", "AKIA1", "--secret_access_key", "s3cr3t-one")
    assert result.returncode == 0 and "s3cr3t" not in result.stdout + result.stderr
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.parent.stat().st_mode) == 0o700
    creds.write_text(creds.read_text() + "\n# team account\n[team]\naws_access_key_id = T\n")
    result = run("dm_aws", "--access_key_id", "AKIA2", "--secret_access_key", "two",
                 "--profile", "default")  # fmt: skip
    assert result.returncode == 0
    text = creds.read_text()
    assert "AKIA2" in text and "AKIA1" not in text and "two" in text
    assert "# team account" in text and "[team]" in text and "aws_access_key_id = T" in text
    assert not list(creds.parent.glob("*.incomplete"))


def test_python_dash_m_daman() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daman", "pull", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "dm_pull" in result.stdout
    result = subprocess.run([sys.executable, "-m", "daman", "frobnicate"], capture_output=True)
    assert result.returncode == 2


def test_configure_keeps_the_settings_it_is_not_given(tmp_path: Path) -> None:
    store = tmp_path / "store"
    common = ["--storage_name", str(store), "--service", "local"]
    result = run("dm_configure", *common, "--allocated_space", "2GiB",
                 "--local_dir", str(tmp_path / "cache"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run("dm_configure", *common)
    assert result.returncode == 0, result.stderr
    assert "2.0 GiB" in result.stdout and str(tmp_path / "cache") in result.stdout
    result = run("dm_configure", *common, "--allocated_space", "none")
    assert "no limit" in result.stdout
