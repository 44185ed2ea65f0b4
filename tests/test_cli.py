"""The console scripts, run as real subprocesses through their installed entry points."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daman import Config, Manager, format_size

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
    [("dm_pull",), ("dm_delete",), ("dm_aws",)],
)
def test_missing_required_flags_is_a_usage_error(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 2 and "required" in result.stderr


def test_configure_needs_the_store_the_first_time_only(tmp_path: Path) -> None:
    result = run("dm_configure", "--storage_name", str(tmp_path / "s"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "service is required the first time" in result.stderr
    assert not (tmp_path / "s").exists()
    result = run("dm_configure", "--storage_name", str(tmp_path / "s"), "--service", "local")
    assert result.returncode == 0, result.stderr
    result = run("dm_configure", "--read_timeout", "120")  # one setting, the others kept
    assert result.returncode == 0, result.stderr
    saved = json.loads((Path(os.environ["DAMAN_HOME"]) / "config.json").read_text())
    assert saved["read_timeout"] == 120.0 and saved["storage_name"] == str(tmp_path / "s")


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
    assert result.returncode == 1 and "allocated_space must be a size" in result.stderr
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


# -- every command ---------------------------------------------------------------------------

ALL_COMMANDS = ["dm_aws", "dm_configure", "dm_push", "dm_pull", "dm_delete", "dm_ls", "dm_info",
                "dm_status", "dm_persist", "dm_clear", "dm_verify", "dm_history",
                "dm_restore"]  # fmt: skip


def test_every_command_has_its_own_help() -> None:
    descriptions = {}
    for command in ALL_COMMANDS:
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {command}") and "--quiet" in result.stdout
        description = result.stdout.split("\n\n")[1]
        assert len(description) > 60, f"{command}: {description!r}"
        descriptions[command] = description
    assert len(set(descriptions.values())) == len(ALL_COMMANDS)  # none copied from another


@pytest.mark.parametrize(
    "args",
    [
        ("dm_push", "--key", "k"),
        ("dm_info",),
        ("dm_persist",),
        ("dm_ls", "--frobnicate"),
        ("dm_clear", "extra"),
        ("dm_status", "--long"),
    ],
)
def test_bad_usage_exits_2(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("dm_ls",),
        ("dm_status",),
        ("dm_info", "--key", "k"),
        ("dm_clear",),
        ("dm_persist", "--key", "k"),
        ("dm_push", "--key", "k", "--file", "-"),
    ],
)
def test_every_command_before_configuring_says_what_to_run(args: tuple[str, ...]) -> None:
    result = run(*args, input="")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "dm_configure" in result.stderr


def _temp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if "incomplete" in p.name
            or p.name.endswith(".new")]  # fmt: skip


def test_share_a_file_and_look_around(config: Config, tmp_path: Path) -> None:
    assert configure(config).returncode == 0
    data = os.urandom(300_000)
    (tmp_path / "data.bin").write_bytes(data)

    result = run("dm_push", "--key", "files/data", "--file", str(tmp_path / "data.bin"),
                 "--meta", "nightly export")  # fmt: skip
    assert result.returncode == 0, result.stderr
    pushed = result.stdout
    assert pushed.startswith("pushed files/data (293.") and "KiB)" in pushed
    result = run("dm_push", "--key", "files/stdin", "--file", "-", "--persist", input="a b c\n")
    assert result.returncode == 0, result.stderr
    with Manager(config) as manager:
        manager.push({"not": "bytes"}, "objects/d")
        manager.cache.remove("objects/d")

    # the same key again: exit 1, the stored bytes are untouched; --force replaces them
    (tmp_path / "other.bin").write_bytes(b"other")
    result = run("dm_push", "--key", "files/stdin", "--file", str(tmp_path / "other.bin"))
    assert result.returncode == 1 and "already exists" in result.stderr
    assert "--force" in result.stderr
    result = run("dm_push", "--key", "objects/d", "--file", "-", "--force", input="new")
    assert result.returncode == 0, result.stderr
    with Manager(config) as manager:
        assert manager.pull("files/stdin")[0] == b"a b c\n"
        assert manager.pull("objects/d", force=True)[0] == b"new"
        manager.push({"not": "bytes"}, "objects/d", force=True)
        manager.cache.remove("objects/d")
    result = run("dm_push", "--key", "files/missing", "--file", str(tmp_path / "nope"))
    assert result.returncode == 1 and "cannot read" in result.stderr
    result = run("dm_push", "--key", "../up", "--file", "-", input="x")
    assert result.returncode == 1 and "invalid key" in result.stderr

    result = run("dm_ls")
    assert result.returncode == 0 and result.stdout.split() == ["files/data", "files/stdin",
                                                                "objects/d"]  # fmt: skip
    result = run("dm_ls", "files/", "--long")
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2 keys, ")
    assert "cached" in lines[0] and lines[0].endswith("files/data")
    assert "persisted" in lines[1] and lines[1].endswith("files/stdin")
    listing = json.loads(run("dm_ls", "--json").stdout)
    assert [(i["key"], i["cached"], i["persist"]) for i in listing] == [
        ("files/data", True, False), ("files/stdin", True, True), ("objects/d", False, False)
    ]  # fmt: skip
    assert listing[0]["size"] > len(data) and listing[0]["last_modified"].startswith("20")
    assert f"({format_size(listing[0]['size'])})" in pushed  # the stored size, as dm_ls

    result = run("dm_info", "--key", "files/data")
    assert result.returncode == 0, result.stderr
    assert "meta:          'nightly export'" in result.stdout and "pushed_by:" in result.stdout
    info = json.loads(run("dm_info", "--key", "files/data", "--json").stdout)
    assert info["meta"] == "nightly export" and info["cached"] and len(info["sha256"]) == 64
    result = run("dm_info", "--key", "files/none")
    assert result.returncode == 1 and "not found" in result.stderr

    status = json.loads(run("dm_status", "--json").stdout)
    assert status["entries"] == 2 and status["persisted"][0]["key"] == "files/stdin"
    assert status["local_dir"] == str(config.cache_dir) and status["store"]
    result = run("dm_status")
    assert "2 cached, 1 persisted" in result.stdout and "files/stdin" in result.stdout

    assert run("dm_persist", "--key", "files/data").returncode == 0
    result = run("dm_persist", "--key", "files/stdin", "--off")
    assert result.returncode == 0 and "unpersisted files/stdin" in result.stdout
    result = run("dm_persist", "--key", "objects/d")
    assert result.returncode == 1 and "pull it first" in result.stderr
    result = run("dm_clear")
    assert result.returncode == 0 and result.stdout.startswith("freed ")
    assert "(1 entry); kept 1 persisted entry" in result.stdout
    with Manager(config) as manager:
        assert [e.key for e in manager.usage().entries] == ["files/data"]

    result = run("dm_verify")
    assert result.returncode == 0 and "checked 1 cached copy" in result.stdout
    assert "all intact" in result.stdout
    entry_path = Manager(config).cache.get("files/data").path
    damaged = bytearray(entry_path.read_bytes())
    damaged[1000] ^= 0xFF
    entry_path.write_bytes(bytes(damaged))
    report = json.loads(run("dm_verify", "--json").stdout)
    assert report["damaged"] == ["files/data"] and report["ok"] is False
    result = run("dm_verify", "--key", "files/data")
    assert result.returncode == 1 and "not found in the local cache" in result.stderr

    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    result = run("dm_pull", "--key", "files/data", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == data
    result = run("dm_pull", "--key", "files/stdin", "--output", "-")
    assert result.returncode == 0 and result.stdout == "a b c\n"
    result = run("dm_pull", "--key", "objects/d", "--output", str(tmp_path / "out" / "d"))
    assert result.returncode == 1 and "not bytes" in result.stderr
    result = run("dm_pull", "--key", "objects/d", "--output", "-")
    assert result.returncode == 1 and "not bytes" in result.stderr and result.stdout == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.bin"]

    store_dir = Path(config.storage_name) if config.service == "local" else tmp_path
    assert _temp_files(config.cache_dir, store_dir, tmp_path) == []


def test_no_credentials_is_a_one_line_error(s3_endpoint: str, bucket: str, monkeypatch) -> None:
    result = run("dm_configure", "--storage_name", bucket, "--service", "aws",
                 "--endpoint_url", s3_endpoint, "--no-check")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = run("dm_ls")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "credentials" in result.stderr and "dm_aws" in result.stderr


def _on_a_terminal(args: list[str], answer: bytes = b"") -> tuple[int, str, str]:
    """Run a command with stdin and stdout on a pseudo-terminal; stderr is a pipe."""
    import pty

    master, slave = pty.openpty()
    exe = shutil.which(args[0], path=str(BIN))
    proc = subprocess.Popen([exe, *args[1:]], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env=os.environ)  # fmt: skip
    os.close(slave)
    if answer:
        os.write(master, answer)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    stderr = proc.stderr.read().decode()
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace"), stderr


def test_progress_bars_on_a_terminal_unless_quiet(config: Config) -> None:
    assert configure(config).returncode == 0
    with Manager(config.replace(local_dir=str(config.cache_dir) + "-other")) as other:
        other.push(os.urandom(9 * 1024 * 1024), "big")
    code, out, err = _on_a_terminal(["dm_pull", "--key", "big", "--quiet"])
    assert code == 0 and "big" in out and "%|" not in err
    code, out, err = _on_a_terminal(["dm_pull", "--key", "big", "--force"])
    assert code == 0 and "pull big" in err and "%|" in err  # a tqdm bar
    result = run("dm_pull", "--key", "big", "--force")  # stdout is a pipe: no bar
    assert result.returncode == 0 and "%|" not in result.stderr


def test_remote_delete_asks_on_a_terminal(config: Config) -> None:
    assert configure(config).returncode == 0
    with Manager(config) as manager:
        manager.push(1, "k")
    code, out, err = _on_a_terminal(["dm_delete", "--key", "k", "--remote"], answer=b"n\n")
    assert code == 0 and "for everyone?" in out + err and "nothing deleted" in out
    with Manager(config) as manager:
        assert manager.exists("k")
    code, out, _ = _on_a_terminal(["dm_delete", "--key", "k", "--remote"], answer=b"y\n")
    assert code == 0 and "deleted k" in out
    with Manager(config) as manager:
        assert not manager.exists("k")


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_leaves_early_is_not_an_error(config: Config, unbuffered: str) -> None:
    assert configure(config).returncode == 0
    exe = shutil.which("dm_status", path=str(BIN))
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    proc = subprocess.Popen([exe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `dm_status | head -0`
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


def test_python_dash_m_daman_runs_every_command(config: Config) -> None:
    assert configure(config).returncode == 0
    result = subprocess.run([sys.executable, "-m", "daman", "ls", "--json"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and json.loads(result.stdout) == []
    result = subprocess.run([sys.executable, "-m", "daman", "dm_status"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and "0 cached" in result.stdout
    result = subprocess.run([sys.executable, "-m", "daman"], capture_output=True, text=True)
    assert result.returncode == 2 and "status" in result.stderr


def test_dm_aws_profiles_and_bad_values(daman_home: Path) -> None:
    creds = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
    assert run("dm_aws", "--access_key_id", "A1", "--secret_access_key", "S1").returncode == 0
    result = run("dm_aws", "--access_key_id", "A2", "--secret_access_key", "S2",
                 "--profile", "team")  # fmt: skip
    assert result.returncode == 0 and "[team]" in result.stdout
    import configparser

    parsed = configparser.ConfigParser()
    parsed.read(creds)
    assert parsed["default"]["aws_access_key_id"] == "A1"
    assert parsed["team"]["aws_secret_access_key"] == "S2"
    before = creds.read_text()
    result = run("dm_aws", "--access_key_id", "has space", "--secret_access_key", "S3")
    assert result.returncode == 1 and "access_key_id" in result.stderr
    assert creds.read_text() == before


def test_os_errors_are_one_line_too(config: Config, tmp_path: Path, monkeypatch) -> None:
    assert configure(config).returncode == 0
    assert run("dm_push", "--key", "b", "--file", "-", input="x").returncode == 0
    result = run("dm_pull", "--key", "b", "--output", str(tmp_path))  # a folder
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "a folder stands where a file should be" in result.stderr
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path))
    result = run("dm_aws", "--access_key_id", "A", "--secret_access_key", "S")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "AWS_SHARED_CREDENTIALS_FILE" in result.stderr and "S" not in result.stdout


def test_a_pipe_as_the_file_is_read_whole(config: Config) -> None:
    assert configure(config).returncode == 0
    result = run("dm_push", "--key", "p", "--file", "/dev/stdin", input="hello\n")
    assert result.returncode == 0, result.stderr
    assert "(0 B)" not in result.stdout
    assert run("dm_pull", "--key", "p", "--output", "-").stdout == "hello\n"


def test_ls_level_lists_one_level(config: Config) -> None:
    assert configure(config).returncode == 0
    with Manager(config) as manager:
        for key in ("team/a/v1", "team/a/v2", "team/b", "top"):
            manager.push(b"x" * 100, key)
        manager.set_persist("team/b", True)
        manager.delete("top")
    result = run("dm_ls", "--level")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["team/", "top"]
    result = run("dm_ls", "team/", "--level", "--long")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["prefix", "team/a/"]
    assert "persisted" in lines[1] and lines[1].endswith("team/b")
    assert lines[-1].startswith("1 prefix, 1 key, ")
    data = json.loads(run("dm_ls", "team/", "--level", "--json").stdout)
    assert data["prefix"] == "team/" and data["prefixes"] == ["team/a/"] and not data["more"]
    assert [(k["key"], k["cached"], k["persist"]) for k in data["keys"]] == [("team/b", True, True)]
    empty = run("dm_ls", "nothing/", "--level")
    assert empty.stdout == "" and empty.stderr.startswith("no keys under 'nothing/' in ")


LOCAL_ONLY = """
import sys
import daman as dm
from daman.cli import COMMANDS

dm.configure(storage_name="no-such-bucket/team", service="aws", local_dir=sys.argv[1],
             endpoint_url="http://127.0.0.1:9", check=False)
assert COMMANDS["status"](["--json"]) == 0
assert COMMANDS["clear"]([]) == 0
assert COMMANDS["verify"](["--json"]) == 0
assert COMMANDS["persist"](["--key", "k"]) == 1  # not cached: a daman error, not a client
usage, disc = dm.usage(), dm.disc()
assert usage.store == "s3://no-such-bucket/team/" and usage.count == 0 and disc.entries == 0
print("boto3" in sys.modules, dm.get_manager()._store is None)
"""


def test_local_only_commands_with_an_s3_configuration_open_no_store(tmp_path: Path) -> None:
    """dm_status, dm_clear, dm_verify, dm_persist, usage() and disc() read the local cache
    only: no S3 client is made and boto3 is not even imported (it costs a third of a second)."""
    result = subprocess.run(
        [sys.executable, "-c", LOCAL_ONLY, str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False True"


def test_history_pull_of_a_version_restore_and_delete_of_every_version(
    config: Config, tmp_path: Path
) -> None:
    assert configure(config).returncode == 0
    with Manager(config.replace(local_dir=str(tmp_path / "pusher"))) as pusher:
        pusher.push(b"one", "team/x", meta={"n": 1})
        pusher.push(b"two", "team/x", meta={"n": 2}, force=True)
        old, new = pusher.history("team/x")[1].version, pusher.history("team/x")[0].version
    result = run("dm_history", "--key", "team/x")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "team/x: 2 versions, newest first"
    assert lines[1].startswith(f"* {new}") and lines[2].startswith(f"  {old}")
    assert "{'n': 1}" in lines[2]
    data = json.loads(run("dm_history", "--key", "team/x", "--json").stdout)
    assert [v["version"] for v in data["versions"]] == [new, old]
    assert [v["current"] for v in data["versions"]] == [True, False] and not data["deleted"]

    out = tmp_path / "old.bin"
    result = run("dm_pull", "--key", "team/x", "--version", old, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"one"
    result = run("dm_pull", "--key", "team/x", "--version", "20200101T000000.000Z-0")
    assert result.returncode == 1 and "dm_history" in result.stderr

    result = run("dm_restore", "--key", "team/x", "--version", old)
    assert result.returncode == 0, result.stderr
    assert f"restored team/x to version {old}" in result.stdout
    with Manager(config) as manager:
        assert manager.pull("team/x", force=True)[0] == b"one"

    assert run("dm_delete", "--key", "team/x", "--remote").returncode == 0
    result = run("dm_history", "--key", "team/x")
    assert "3 versions" in result.stdout and "deleted from the store" in result.stdout
    result = run("dm_delete", "--key", "team/x", "--all-versions")
    assert result.returncode == 1 and "remote=True" in result.stderr
    assert run("dm_delete", "--key", "team/x", "--remote", "--all-versions").returncode == 0
    result = run("dm_history", "--key", "team/x")
    assert result.returncode == 1 and "not found" in result.stderr


def test_ctrl_c_while_a_command_starts_is_one_line(daman_home: Path) -> None:
    """SIGINT while the command loads daman: ``dm_status: interrupted``, exit 130, no
    traceback. Only the console-script wrapper's own first import line (a few ms after the
    interpreter starts) is out of daman's reach: a run interrupted there is retried later."""
    exe = shutil.which("dm_status", path=str(BIN))
    interrupted = 0
    for delay in [0.03, 0.05, 0.07, 0.09, 0.11, 0.13, 0.16, 0.2] * 2:
        proc = subprocess.Popen([exe], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=os.environ)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if "Traceback" in err:  # only the wrapper's import line may have been interrupted
            frames = [line for line in err.splitlines() if line.lstrip().startswith("File ")]
            assert all(f'"{exe}"' in frame for frame in frames), err
            continue
        assert err.count("\n") <= 1, err
        if proc.returncode == 130:
            assert err == "dm_status: interrupted\n"
            interrupted += 1
    assert interrupted > 0  # at least one signal landed while daman loaded


_CTRL_C_IN_A_WEAKREF_CALLBACK = """
import os, signal, sys, weakref

class CtrlCInAnImportCallback:  # as a Ctrl-C landing in importlib's own weakref callbacks
    def find_spec(self, name, path=None, target=None):
        if name == "daman.cli":
            class Thing: pass
            thing = Thing()
            ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGINT))
            del thing
        return None

sys.meta_path.insert(0, CtrlCInAnImportCallback())
import daman_scripts
sys.exit(daman_scripts.status_main())
"""


def test_ctrl_c_in_an_import_callback_is_not_lost(daman_home: Path) -> None:
    """Python drops a KeyboardInterrupt raised in a weakref callback ("Exception ignored
    in ... cb") and goes on: while daman loads, Ctrl-C is held back, then raised and caught."""
    result = subprocess.run([sys.executable, "-c", _CTRL_C_IN_A_WEAKREF_CALLBACK],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (result.returncode, result.stderr) == (130, "dm_status: interrupted\n")


# -- what the front-end review found -----------------------------------------------------------


def _help_text(command: str) -> str:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # argparse wraps lines where it likes


def test_configure_help_takes_its_defaults_from_config() -> None:
    text = _help_text("dm_configure")
    defaults = {name: field.default for name, field in Config.__dataclass_fields__.items()}
    assert f"seconds (default {defaults['connect_timeout']:g})" in text
    assert f"seconds (default {defaults['read_timeout']:g})" in text
    assert f"tries per request (default {defaults['max_attempts']})" in text
    assert f"default {defaults['checksums']}" in text
    assert "(default $DAMAN_HOME/data; DAMAN_HOME defaults to ~/.daman)" in text
    assert "s3://bucket/prefix for aws, gs://bucket/prefix for gcs" in text


@pytest.mark.parametrize("command", [*ALL_COMMANDS, "dm_migrate"])
def test_every_command_help_has_examples(command: str) -> None:
    result = run(command, "--help")
    assert "\nexamples:\n  " + command in result.stdout


def test_configure_prints_every_field_but_the_secret(tmp_path: Path) -> None:
    result = run("dm_configure", "--storage_name", str(tmp_path / "s"), "--service", "local",
                 "--signing_key", "-", input="team-secret\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "team-secret" not in result.stdout + result.stderr
    assert result.stdout.startswith(f"saved to {Path(os.environ['DAMAN_HOME'])}/config.json:\n")
    for name in Config.__dataclass_fields__:
        assert f"\n  {name}:" in result.stdout, name
    assert "signing_key:" in result.stdout and " set (objects are signed" in result.stdout


def test_a_bad_s3_bucket_name_is_refused_in_one_line_even_unchecked() -> None:
    for check in ([], ["--no-check"]):
        result = run("dm_configure", "--service", "aws", "--storage_name", "Bad Bucket", *check)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "invalid S3 bucket name 'Bad Bucket'" in result.stderr
    assert not (Path(os.environ["DAMAN_HOME"]) / "config.json").exists()


def test_a_gs_url_is_a_gcs_bucket() -> None:
    result = run("dm_configure", "--service", "gcs", "--storage_name", "gs://my-bucket/team",
                 "--no-check")  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((Path(os.environ["DAMAN_HOME"]) / "config.json").read_text())
    assert saved["storage_name"] == "my-bucket/team"


def test_aws_only_settings_on_another_service_warn_once(tmp_path: Path) -> None:
    result = run("dm_configure", "--storage_name", str(tmp_path / "s"), "--service", "local",
                 "--region", "eu-west-1", "--checksums", "when_required")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "dm_configure: warning: region and checksums apply to service aws only: saved, but "
        "service local ignores them.\n"
    )
    result = run("dm_configure", "--read_timeout", "30")  # not given again: no warning
    assert result.returncode == 0 and result.stderr == ""


def test_a_newer_daman_s_field_is_ignored_with_a_warning_and_kept(tmp_path: Path) -> None:
    path = Path(os.environ["DAMAN_HOME"]) / "config.json"
    assert run("dm_configure", "--storage_name", str(tmp_path / "s"),
               "--service", "local").returncode == 0  # fmt: skip
    path.write_text(json.dumps({**json.loads(path.read_text()), "colour": "red"}))
    result = run("dm_status")
    assert result.returncode == 0 and "store:" in result.stdout
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dm_status: warning: ")
    assert str(path) in result.stderr and "colour" in result.stderr
    result = run("dm_configure", "--read_timeout", "30")
    assert result.returncode == 0, result.stderr
    assert json.loads(path.read_text())["colour"] == "red"


def test_an_empty_listing_says_so_in_one_line(config: Config) -> None:
    assert configure(config).returncode == 0
    for args in (["--long"], ["--level", "--long"]):
        result = run("dm_ls", "nothing/", *args)
        assert result.returncode == 0
        assert result.stdout.startswith("no keys under 'nothing/' in ") and result.stderr == ""
        assert result.stdout.count("\n") == 1
    for args in ([], ["--level"]):  # one key per line for scripts: nothing on stdout
        result = run("dm_ls", *args)
        assert result.returncode == 0 and result.stdout == ""
        assert result.stderr.startswith("no keys in ") and result.stderr.count("\n") == 1
    assert json.loads(run("dm_ls", "--json").stdout) == []


def test_status_info_and_persist_read_well(config: Config) -> None:
    assert configure(config).returncode == 0
    with Manager(config) as manager:
        manager.push(1, "k")
    result = run("dm_status")
    assert " (no limit)\n" in result.stdout and "of no limit" not in result.stdout
    assert "\ncached:        yes\n" in run("dm_info", "--key", "k").stdout
    assert run("dm_persist", "--key", "k").stdout == "persisted k: eviction leaves it alone\n"
    assert "\ncached:        yes, persisted\n" in run("dm_info", "--key", "k").stdout


def test_ctrl_c_at_the_delete_prompt_ends_the_prompt_s_line(config: Config) -> None:
    import pty

    assert configure(config).returncode == 0
    with Manager(config) as manager:
        manager.push(1, "k")
    master, slave = pty.openpty()
    exe = shutil.which("dm_delete", path=str(BIN))
    proc = subprocess.Popen([exe, "--key", "k", "--remote"], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, env=os.environ)  # fmt: skip
    os.close(slave)
    err = b""
    while b"[y/N] " not in err:  # the question is asked on stderr
        err += os.read(proc.stderr.fileno(), 65536)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err += proc.stderr.read()
    os.close(master)
    assert err.decode().endswith("[y/N] \ndm_delete: interrupted\n")
    with Manager(config) as manager:
        assert manager.exists("k")
