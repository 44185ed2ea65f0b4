"""What trying to break daman found (issue "Hardening"), one section per finding: each test
fails without the fix it names. Stores are real (moto's server over HTTP, a folder), console
scripts run as subprocesses, broken local state is made on disc.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from faultproxy import FaultProxy, first
from test_cli import configure, run
from test_magics import shell  # noqa: F401 - a fixture

import daman as dm
from daman import (
    Config,
    ConfigError,
    DamanError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyExistsError,
    LocalFileError,
    Manager,
    NotCachedWarning,
    OfflineWarning,
    RepairWarning,
    StoreUnavailableError,
)
from daman.credentials import merge_credentials, write_aws_credentials
from daman.files import atomic_write

# -- 1. the cache and a local store must be separate folders --------------------------------------


@pytest.mark.parametrize("layout", ["same", "cache-inside-store", "store-inside-cache", "symlink"])
def test_overlapping_store_and_cache_folders_are_refused(tmp_path: Path, layout: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    store, cache = {
        "same": (shared, shared),
        "cache-inside-store": (shared, shared / "cache"),
        "store-inside-cache": (shared / "objects", shared),
        "symlink": (shared, tmp_path / "link" / "cache"),
    }[layout]
    if layout == "symlink":
        (tmp_path / "link").symlink_to(shared)
    with pytest.raises(ConfigError, match="must be separate folders"):
        dm.configure(storage_name=str(store), service="local", local_dir=str(cache))
    result = run("dm_configure", "--storage_name", str(store), "--service", "local",
                 "--local_dir", str(cache))  # fmt: skip
    assert result.returncode == 1 and "must be separate folders" in result.stderr
    assert result.stderr.count("\n") == 1
    with pytest.raises(ConfigError, match="must be separate folders"):
        Manager(Config(storage_name=str(store), service="local", local_dir=str(cache)))


def test_a_saved_overlapping_configuration_is_refused_before_anything_is_deleted(
    tmp_path: Path, daman_home: Path
) -> None:
    """A config.json written by hand (or by an older daman): dm_verify refuses to start, so
    the team's objects in the folder are never taken for stray cache files."""
    shared = tmp_path / "shared"
    with Manager(Config(storage_name=str(shared), service="local",
                        local_dir=str(tmp_path / "c"))) as m:  # fmt: skip
        shared.mkdir()
        m.push({"team": "data"}, "objects/x")
    daman_home.mkdir(parents=True, exist_ok=True)
    config = {"storage_name": str(shared), "service": "local", "local_dir": str(shared)}
    (daman_home / "config.json").write_text(json.dumps(config))
    for command in (["dm_verify"], ["dm_ls"], ["dm_status"]):
        result = run(*command)
        assert result.returncode == 1 and "must be separate folders" in result.stderr, command
    assert (shared / "objects" / "x.daman").exists()


# -- 2. %%dm_cache pushes only what the cell set ---------------------------------------------------


@pytest.fixture
def ipy(shell, manager: Manager):  # noqa: F811 - the imported fixture
    """An IPython shell with ``%load_ext daman`` on the parametrised backend."""
    dm.configure(**manager.config.to_dict(), check=False)
    return shell


def _cell(ipy, line: str, body: str):
    result = ipy.run_cell(f"%%dm_cache {line}\n{body}")
    return result


def test_dm_cache_refuses_a_variable_an_earlier_cell_left(ipy) -> None:
    ipy.user_ns["a"] = "stale"
    result = _cell(ipy, "team/cell a b", "b = 1")
    assert not result.success and "did not set a (a only left by an earlier cell)" in str(
        result.error_in_exec
    )
    assert not dm.exists("team/cell")
    result = _cell(ipy, "team/cell a b", "b = 1\na = 'fresh'")
    assert result.success
    assert dm.pull("team/cell")[0] == {"a": "fresh", "b": 1}


def test_dm_cache_counts_a_value_set_another_way_and_one_equal_to_the_old(ipy) -> None:
    ipy.user_ns["a"] = 1
    ipy.user_ns["b"] = [1]
    # `a = 1` rebinds to the very same small int: the code assigns it, so it counts; b is
    # set through globals(), which no assignment shows: its object changed, so it counts.
    assert _cell(ipy, "team/other a b", "a = 1\nglobals()['b'] = [2]").success
    assert dm.pull("team/other")[0] == {"a": 1, "b": [2]}


def test_dm_cache_uses_the_cached_copy_when_the_store_is_unreachable(
    ipy, manager: Manager, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cell(ipy, "team/offline a", "a = 41 + 1").success
    config = dm.get_manager().config
    if config.service == "local":  # the store folder's drive is not mounted
        Path(config.storage_name).rename(tmp_path / "unmounted")
    else:  # nothing listens where the store was
        account = "/devstoreaccount1" if config.service == "azure" else ""  # Azurite's
        endpoint = _closed_port() + account
        dm.configure(**{**config.to_dict(), "endpoint_url": endpoint}, check=False)
    ipy.user_ns.pop("a")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("default", OfflineWarning)  # shown, as in a notebook
        result = _cell(ipy, "team/offline a", "raise RuntimeError('must not run')")
    assert result.success and ipy.user_ns["a"] == 42
    err = capsys.readouterr().err  # the magics show a daman warning as one line
    assert err.startswith("daman: warning: the store is unreachable: ") and err.count("\n") == 1


def test_dm_cache_runs_again_once_the_key_is_deleted_for_everyone(
    ipy, manager: Manager, tmp_path: Path
) -> None:
    assert _cell(ipy, "team/again a", "a = 1").success
    with Manager(manager.config.replace(local_dir=str(tmp_path / "elsewhere"))) as colleague:
        colleague.delete("team/again", remote=True)  # "compute it again", for everyone
    assert _cell(ipy, "team/again a", "a = 2").success  # not the stale local copy
    assert dm.pull("team/again")[0] == {"a": 2}


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# -- 3 and 4. dm_aws -------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_dm_aws_edits_profiles_as_botocore_reads_them(
    daman_home: Path, newline: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.session

    path = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# team credentials",
        "[default]",
        "aws_access_key_id = OLDDEFAULT",
        "aws_secret_access_key = olddefault",
        "[work] # the team's account",
        "aws_access_key_id = OLDWORK",
        "aws_secret_access_key = oldwork",
        "aws_session_token = FwoGZXIvYXdzE",
        "  continued-token-part",
        "region = eu-west-1",
        "[ spaced ]",
        "aws_access_key_id = SPACED",
    ]
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    result = run("dm_aws", "--profile", "work", "--access_key_id", "NEWWORK",
                 "--secret_access_key", "-", input="newsecret\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "newsecret" not in result.stdout + result.stderr
    assert "removed the profile's aws_session_token" in result.stdout
    text = path.read_bytes().decode()
    assert text.count("[work]") == 1 and "# the team's account" in text and "# team" in text
    assert "FwoGZXIvYXdzE" not in text and "continued-token-part" not in text
    assert text.count("\r\n") == (text.count("\n") if newline == "\r\n" else 0)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # they would win over the file
    for profile, key in [("work", "NEWWORK"), ("default", "OLDDEFAULT")]:
        monkeypatch.setenv("AWS_PROFILE", profile)
        credentials = botocore.session.Session().get_credentials()
        assert credentials.access_key == key and credentials.token is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_dm_aws_keeps_a_symlinked_file_a_link_and_makes_aws_folder_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aws = Path.home() / ".aws"
    aws.mkdir(mode=0o755)
    aws.chmod(0o755)
    real = tmp_path / "dotfiles" / "credentials"
    real.parent.mkdir()
    real.write_text("[other]\naws_access_key_id = X\n")
    (aws / "credentials").symlink_to(real)
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE")
    _, removed = write_aws_credentials("AKIA", "secret")
    assert (aws / "credentials").is_symlink() and removed == []
    assert "AKIA" in real.read_text() and "[other]" in real.read_text()
    assert stat.S_IMODE(aws.stat().st_mode) == 0o700


def test_a_secret_typed_at_a_prompt_is_not_echoed(daman_home: Path) -> None:
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: dm_aws on a terminal, asking for the secret
        os.execv(
            str(Path(sys.executable).parent / "dm_aws"),
            ["dm_aws", "--access_key_id", "AKIA", "--secret_access_key"],
        )
    seen = b""
    while b"secret access key:" not in seen.lower():
        seen += os.read(fd, 1024)
    os.write(fd, b"typed-secret\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"typed-secret" not in seen  # not echoed, not printed
    assert "typed-secret" in Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).read_text()


def test_merge_adds_a_missing_profile_and_keeps_crlf() -> None:
    text, removed = merge_credentials("[a]\r\nx = 1\r\n", "b", "ID", "SECRET")
    assert text == (
        "[a]\r\nx = 1\r\n\r\n[b]\r\naws_access_key_id = ID\r\naws_secret_access_key = SECRET\r\n"
    )
    assert removed == []


# -- 5. a remote delete whose folder pruning fails -------------------------------------------------


@pytest.mark.parametrize("backend", ["local"])
def test_a_remote_delete_that_succeeded_says_so_even_if_pruning_fails(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.push(1, "deep/er/k")
    real_rmdir = Path.rmdir

    def refuse(self: Path) -> None:
        if self.name == "er":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_rmdir(self)

    monkeypatch.setattr(Path, "rmdir", refuse)
    deleted = manager.delete("deep/er/k", remote=True)
    assert deleted.local and deleted.remote
    assert not manager.exists("deep/er/k") and manager.cache.get("deep/er/k") is None


# -- 6. an outdated cached copy says so ------------------------------------------------------------


def test_ls_and_info_say_when_the_cached_copy_is_outdated(manager: Manager, tmp_path: Path) -> None:
    from daman import report

    manager.push({"v": 1}, "k")
    manager.push({"v": 1}, "current")
    with Manager(manager.config.replace(local_dir=str(tmp_path / "bob"))) as bob:
        bob.push({"v": 2}, "k", force=True)
    listing = {item.key: item for item in manager.ls()}
    assert listing["k"].outdated and not listing["current"].outdated
    assert report.state(listing["k"]) == "cached (outdated)"
    assert "cached (outdated)" in "\n".join(report.listing_lines(manager.ls()))
    assert {item.key: item.outdated for item in manager.ls_level("").keys} == {
        "current": False,
        "k": True,
    }
    details = manager.info("k")
    assert details.outdated and report.state(details) == "cached (outdated)"
    manager.pull("k")
    assert not manager.info("k").outdated


# -- 7. buffers come back with pickle's types ------------------------------------------------------


@pytest.mark.parametrize("size", [100, 2 * 1024 * 1024])
@pytest.mark.parametrize("source", ["bytearray", "bytes"])
def test_pickle_buffers_come_back_as_pickle_gives_them(
    manager: Manager, size: int, source: str
) -> None:
    data = bytearray(os.urandom(size)) if source == "bytearray" else os.urandom(size)
    obj = {"raw": pickle.PickleBuffer(data), "list": [pickle.PickleBuffer(data)]}
    expected = pickle.loads(pickle.dumps(obj, protocol=5))
    manager.push(obj, "k")
    for force in (False, True):  # from the cache, and from the store
        got, _ = manager.pull("k", force=force)
        assert type(got["raw"]) is type(expected["raw"]) and got["raw"] == expected["raw"]
        assert type(got["list"][0]) is type(expected["list"][0])


def test_arrays_keep_their_writability(manager: Manager) -> None:
    frozen = np.arange(300_000)
    frozen.flags.writeable = False
    manager.push({"w": np.arange(300_000), "r": frozen}, "k")
    got, _ = manager.pull("k", force=True)
    assert got["w"].flags.writeable and not got["r"].flags.writeable
    np.testing.assert_array_equal(got["r"], frozen)


# -- 9 and 10. files pushed as they are read -------------------------------------------------------


def test_a_file_whose_size_reads_zero_is_read_to_its_end(config: Config) -> None:
    assert configure(config).returncode == 0
    result = run("dm_push", "--key", "proc", "--file", "/proc/self/status")
    assert result.returncode == 0, result.stderr
    pulled = dm.pull("proc")[0]
    assert pulled.startswith(b"Name:") and len(pulled) > 100


def test_a_file_truncated_while_it_is_pushed_is_refused_without_a_crash(
    manager: Manager, tmp_path: Path
) -> None:
    source = tmp_path / "growing.bin"
    source.write_bytes(os.urandom(64 * 1024 * 1024))
    stop = threading.Event()

    def truncate_once_the_push_reads() -> None:
        while not stop.is_set():
            written = [p.stat().st_size for p in manager.cache.tmp_dir.glob("*.incomplete")
                       if p.exists()]  # fmt: skip
            if any(size > 4 * 1024 * 1024 for size in written):
                os.truncate(source, 1024)  # someone else rewrites it meanwhile
                return
            time.sleep(0.0005)

    cutter = threading.Thread(target=truncate_once_the_push_reads)
    cutter.start()
    try:
        with pytest.raises(InvalidArgumentError, match="changed while it was being pushed"):
            manager.push_file(source, "k")
    finally:
        stop.set()
        cutter.join()
    assert not manager.exists("k") and list(manager.cache.tmp_dir.iterdir()) == []


def test_a_pipe_is_pushed_in_chunks(config: Config) -> None:
    assert configure(config).returncode == 0
    script = "import sys; sys.stdout.buffer.write(b'x' * (20 * 1024 * 1024))"
    producer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    exe = Path(sys.executable).parent / "dm_push"
    result = subprocess.run([exe, "--key", "piped", "--file", "-"], stdin=producer.stdout,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    producer.wait()
    assert result.returncode == 0, result.stderr
    assert dm.pull("piped")[0] == b"x" * (20 * 1024 * 1024)


# -- 11. bad local state: one line, and repairs ----------------------------------------------------


def test_a_wrong_typed_field_is_named_and_fixable_with_dm_configure(
    config: Config, daman_home: Path
) -> None:
    assert configure(config).returncode == 0
    path = daman_home / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "read_timeout": "60", "check_current": "false"}))
    result = run("dm_ls")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    field = "check_current" if "check_current" in result.stderr else "read_timeout"
    assert f"{field} must be" in result.stderr and f"dm_configure --{field}" in result.stderr
    result = run("dm_configure", "--read_timeout", "30", "--check_current", "false", "--no-check")
    assert result.returncode == 0, result.stderr
    fixed = json.loads(path.read_text())
    assert fixed["read_timeout"] == 30.0 and fixed["check_current"] is False
    assert fixed["storage_name"] == saved["storage_name"]
    assert run("dm_ls").returncode == 0


def test_a_bad_field_not_being_fixed_is_reset_with_a_warning(
    config: Config, daman_home: Path
) -> None:
    assert configure(config).returncode == 0
    path = daman_home / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_attempts": "many"}))
    result = run("dm_configure", "--allocated_space", "1GB", "--no-check")
    assert result.returncode == 0, result.stderr
    assert "dm_configure: warning:" in result.stderr and "max_attempts='many'" in result.stderr
    assert json.loads(path.read_text())["max_attempts"] == 5


@pytest.mark.parametrize("what", ["a-file", "inside-a-file"])
def test_a_local_dir_that_cannot_be_a_folder_is_one_line(
    config: Config, tmp_path: Path, what: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    local_dir = blocker if what == "a-file" else blocker / "cache"
    with pytest.raises(LocalFileError, match="local_dir"):
        dm.configure(**{**config.to_dict(), "local_dir": str(local_dir)})
    with pytest.raises(LocalFileError, match="local_dir"):
        Manager(config.replace(local_dir=str(local_dir)))


def _ro_mount_works(where: Path) -> bool:
    where.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {where}"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


def test_a_read_only_daman_home_is_one_line(tmp_path: Path) -> None:
    """A real read-only file system (a tmpfs mounted read-only in a user namespace): root
    writes anywhere else, so permissions alone could not show it."""
    home = tmp_path / "ro-home"
    assert _ro_mount_works(home), "unshare -rm cannot mount here: install util-linux"
    script = (
        f"mount -t tmpfs -o ro tmpfs {home} && "
        f"DAMAN_HOME={home} {Path(sys.executable).parent / 'dm_configure'} "
        f"--storage_name {tmp_path / 'store'} --service local --local_dir {tmp_path / 'c'}"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "read-only" in result.stderr
    assert "DAMAN_HOME" in result.stderr


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_index_is_set_aside_and_rebuilt(manager: Manager, damage: str) -> None:
    for i in range(3):
        manager.push({"i": i}, f"k/{i}", persist=i == 0)
    root = manager.cache.root
    manager.close()
    index = root / "index.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    if damage == "garbage":
        index.write_bytes(b"this is not a database" * 100)
    else:
        index.write_bytes(index.read_bytes()[:100])
    with pytest.warns(RepairWarning, match="rebuilt from 3 cached files"):
        again = Manager(manager.config)
    with again:
        assert sorted(e.key for e in again.usage().entries) == ["k/0", "k/1", "k/2"]
        assert again.pull("k/1")[0] == {"i": 1}  # asked the store: the copy is current
        assert again.verify().ok
    assert list(root.glob("index.sqlite3.damaged-*"))


def test_dm_verify_rebuilds_an_index_damaged_after_it_was_opened(config: Config) -> None:
    assert configure(config).returncode == 0
    dm.push({"x": 1}, "k")
    index = config.cache_dir / "index.sqlite3"
    dm.reset()
    with open(index, "r+b") as f:  # garble every page but the first: open still works
        size = f.seek(0, 2)
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    result = run("dm_verify")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "rebuilt" in result.stdout + result.stderr
    assert run("dm_status").returncode == 0


def test_every_read_of_a_damaged_index_is_a_daman_error(manager: Manager) -> None:
    """Each query goes through the one place that maps SQLite's errors (and holds off a fork
    mid-statement): the disc summary (persisted bytes, next to evict) included."""
    manager.push({"x": 1}, "k", persist=True)
    with sqlite3.connect(manager.cache.root / "index.sqlite3") as db:
        db.execute("DROP TABLE entries")
    calls = {
        "usage": lambda: manager.usage().entries,
        "disc": manager.disc,
    }
    for name, call in calls.items():
        with pytest.raises(DamanError, match="dm_verify"):
            call()
            pytest.fail(name)


# -- 12. --json is JSON ----------------------------------------------------------------------------


def test_json_output_parses_strictly_whatever_the_meta_holds(config: Config) -> None:
    assert configure(config).returncode == 0
    meta = {1: math.nan, (2, 3): math.inf, "x": -math.inf, "s": {1, 2}, "o": object()}
    dm.push(1, "k", meta=meta)

    def strict(text: str) -> object:
        def refuse(constant: str) -> None:
            raise ValueError(f"not JSON: {constant}")

        return json.loads(text, parse_constant=refuse)

    info = strict(run("dm_info", "--key", "k", "--json").stdout)
    assert info["meta"]["1"] == "NaN" and info["meta"]["(2, 3)"] == "Infinity"
    for command in (["dm_ls", "--json"], ["dm_status", "--json"], ["dm_verify", "--json"]):
        strict(run(*command).stdout)


# -- 13. closed and full standard streams ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shell_line", "code"),
    [
        ("dm_ls > /dev/full", 1),
        ("dm_ls >&-", 1),
        ("dm_ls --help > /dev/full", 1),
        ("dm_push --key s --file - <&-", 1),
        ("python -m daman --help | head -c 1 > /dev/null", 0),
        ("dm_ls --help | head -c 1 > /dev/null", 0),
    ],
)
def test_closed_or_full_standard_streams_are_one_line(
    config: Config, shell_line: str, code: int
) -> None:
    assert configure(config).returncode == 0
    dm.push(b"x" * 100_000, "big/" + "k" * 150)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {shell_line}"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") <= 1


# -- 14. long names --------------------------------------------------------------------------------


def test_pull_file_to_a_long_file_name(manager: Manager, tmp_path: Path) -> None:
    manager.push(b"bytes", "k")
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / ("n" * 240)
    assert manager.pull_file("k", dest) == 5 and dest.read_bytes() == b"bytes"
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_atomic_writes_from_threads_never_collide(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "shared.txt"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for _ in range(50):
                with atomic_write(target) as out:
                    out.file.write(str(i).encode() * 1000)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    content = target.read_text()
    assert len(set(content)) == 1 and len(content) == 1000  # one writer's whole file
    assert [p.name for p in target.parent.iterdir()] == ["shared.txt"]


# -- 15. foreign files in a local store ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local"])
def test_foreign_files_in_a_local_store_are_skipped_or_refused_clearly(
    manager: Manager, config: Config
) -> None:
    root = Path(config.storage_name)
    manager.push(1, "ok")
    (root / b"not-utf8-\xff.daman".decode("utf-8", "surrogateescape")).write_bytes(b"x")
    (root / "x.daman").mkdir()
    (root / "x.daman" / "y.daman").write_bytes(b"x")  # "x.daman/y": no key can be that
    (root / "k").write_text("someone's notes")
    assert [item.key for item in manager.ls()] == ["ok"]
    assert [item.key for item in manager.ls_level("").keys] == ["ok"]
    with pytest.raises(InvalidKeyError, match="move that file away"):
        manager.push(1, "k/x")


@pytest.mark.parametrize("prefix", [".", "a ", "team/da", "ok", ".hidden/"])
def test_ls_accepts_any_prefix_of_a_valid_key(manager: Manager, prefix: str) -> None:
    manager.push(1, ".hidden/k")
    manager.push(1, "a b")
    found = [item.key for item in manager.ls(prefix)]
    assert all(key.startswith(prefix) for key in found)
    assert {".": [".hidden/k"], "a ": ["a b"]}.get(prefix, found) == found


@pytest.mark.parametrize("prefix", [" ", "a//", "../", "/x", "a\\b"])
def test_ls_refuses_prefixes_no_key_starts_with(manager: Manager, prefix: str) -> None:
    with pytest.raises(InvalidKeyError, match="no key starts with it"):
        manager.ls(prefix)


# -- 16. a store that drops packets ----------------------------------------------------------------


def _full_backlog() -> tuple[socket.socket, list[socket.socket], str]:
    """A listener that never accepts and whose accept queue is full: further SYNs are
    dropped, as a firewall or a dead VPN does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(1)
    try:
        probe.connect(("127.0.0.1", port))
        raise AssertionError("the backlog is not full: the test would test nothing")
    except (TimeoutError, OSError):
        pass
    finally:
        probe.close()
    return listener, fillers, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("backend", ["s3"])
@pytest.mark.timeout(240)
def test_a_store_that_drops_packets_with_the_default_timeouts(make_config, tmp_path: Path) -> None:
    config = make_config()
    defaults = Config(storage_name="bucket", service="aws")
    with Manager(config) as online:
        online.push({"v": 1}, "cached")
    listener, fillers, url = _full_backlog()
    try:
        offline = config.replace(
            endpoint_url=url,
            connect_timeout=defaults.connect_timeout,
            read_timeout=defaults.read_timeout,
            max_attempts=defaults.max_attempts,
        )
        with Manager(offline) as manager:
            start = time.monotonic()
            with pytest.warns(OfflineWarning, match="unreachable"):
                assert manager.pull("cached")[0] == {"v": 1}
            cached_pull = time.monotonic() - start
            failures = {}
            for name, call in {
                "uncached pull": lambda: manager.pull("other"),
                "push": lambda: manager.push(1, "new"),
            }.items():
                start = time.monotonic()
                with pytest.raises(StoreUnavailableError):
                    call()
                failures[name] = time.monotonic() - start
    finally:
        for s in [*fillers, listener]:
            s.close()
    # Bounds, not speeds: a hang or a minute-long wait is the defect being guarded.
    assert cached_pull < 15, cached_pull
    assert all(seconds < 60 for seconds in failures.values()), failures
    print(f"\ndropped packets: cached pull {cached_pull:.1f} s, " +
          ", ".join(f"{k} {v:.1f} s" for k, v in failures.items()))  # fmt: skip


# -- 17. answers S3's contract allows --------------------------------------------------------------


def _completes(request) -> bool:
    return request.method == "POST" and "uploadId=" in request.query


@pytest.mark.parametrize("backend", ["s3"])
def test_a_retried_completion_answered_nosuchupload_is_recognised_as_ours(
    make_config, s3_endpoint: str
) -> None:
    from daman.store.s3 import MULTIPART_THRESHOLD

    lost_then_gone = iter(["lost", "nosuchupload"])

    def plan(request) -> str | None:
        return next(lost_then_gone, None) if _completes(request) else None

    with (
        FaultProxy(s3_endpoint, plan) as proxy,
        Manager(make_config(endpoint_url=proxy.url)) as manager,
    ):
        big = np.arange((MULTIPART_THRESHOLD * 2) // 8)
        manager.push(big, "big")  # the first answer lost, the retry told NoSuchUpload
        assert proxy.faults["lost"] == 1 and proxy.faults["nosuchupload"] == 1
        np.testing.assert_array_equal(manager.pull("big", force=True)[0], big)


@pytest.mark.parametrize("backend", ["s3"])
def test_nosuchupload_for_an_upload_that_is_not_ours_fails_clearly(
    make_config, s3_endpoint: str
) -> None:
    from daman.store.s3 import MULTIPART_THRESHOLD

    plan = first(1, "nosuchupload", match=_completes)
    with (
        FaultProxy(s3_endpoint, plan) as proxy,
        Manager(make_config(endpoint_url=proxy.url)) as manager,
    ):
        with pytest.raises(StoreUnavailableError, match=r"not this push's\. Push again"):
            manager.push(np.arange((MULTIPART_THRESHOLD * 2) // 8), "big")
        assert not manager.exists("big")


@pytest.mark.parametrize("backend", ["s3"])
def test_a_server_ignoring_the_condition_of_a_large_create_still_never_overwrites(
    make_config, s3_endpoint: str
) -> None:
    """Some S3-compatible servers ignore If-None-Match on CompleteMultipartUpload: a push
    (no force) of a large object under an existing key must still be refused, the team's
    object left as it was, and no upload left open."""
    from daman.store.s3 import MULTIPART_THRESHOLD

    plan = lambda request: "unconditional" if _completes(request) else None  # noqa: E731
    with Manager(make_config()) as first_pusher:
        first_pusher.push({"team's": "object"}, "model")
    with (
        FaultProxy(s3_endpoint, plan) as proxy,
        Manager(make_config(endpoint_url=proxy.url)) as manager,
    ):
        with pytest.raises(KeyExistsError):
            manager.push(np.arange((MULTIPART_THRESHOLD * 2) // 8), "model")
        assert manager.pull("model", force=True)[0] == {"team's": "object"}
        assert not manager.store.client.list_multipart_uploads(Bucket=manager.store.bucket).get(
            "Uploads"
        )


@pytest.mark.parametrize("backend", ["s3"])
def test_short_ranged_answers_are_resumed_for_the_missing_bytes(
    make_config, s3_endpoint: str, tmp_path: Path
) -> None:
    from daman.store._transfer import split
    from daman.store.s3 import MULTIPART_THRESHOLD

    data = np.random.default_rng(0).integers(0, 255, 3 * MULTIPART_THRESHOLD, dtype=np.uint8)
    with Manager(make_config()) as pusher:
        size = pusher.push(data, "k").size

    def short_twice(request) -> str | None:
        return "short" if request.method == "GET" and request.number <= 2 else None

    with (
        FaultProxy(s3_endpoint, short_twice) as proxy,
        Manager(make_config(endpoint_url=proxy.url, local_dir=str(tmp_path / "other"))) as manager,
    ):
        np.testing.assert_array_equal(manager.pull("k", force=True)[0], data)
        ranges = [r for _, m, _, r, _ in proxy.log if m == "GET"]
    assert proxy.faults["short"] >= 2
    starts = [int(r.removeprefix("bytes=").partition("-")[0]) for r in ranges if r]
    rest = split(size - MULTIPART_THRESHOLD, start=MULTIPART_THRESHOLD)
    planned = {0, *(start for start, _ in rest)}  # where the download's ranges start
    assert any(start not in planned for start in starts), ranges  # resumed mid-part


# -- 18. what people see ---------------------------------------------------------------------------


def test_warnings_point_at_the_users_line(manager: Manager, tmp_path: Path) -> None:
    dm.configure(**{**manager.config.to_dict(), "allocated_space": 1000}, check=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.push(b"x" * 5000, "too-big")
        dm.pull("too-big")
    assert caught and all(w.filename == __file__ for w in caught), [
        (w.filename, w.lineno) for w in caught
    ]
    assert {w.category for w in caught} == {NotCachedWarning}


def test_the_cli_prints_a_warning_as_one_line(config: Config, tmp_path: Path) -> None:
    assert configure(config.replace(allocated_space=1000)).returncode == 0
    result = run("dm_configure", "--allocated_space", "1000", "--no-check")
    assert result.returncode == 0
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 5000)
    result = run("dm_push", "--key", "big", "--file", str(source))
    assert result.returncode == 0
    assert result.stderr.startswith("dm_push: warning: ") and result.stderr.count("\n") == 1


def test_a_key_that_gives_no_variable_name_asks_for_one(ipy) -> None:
    dm.push(1, "v/€")
    result = ipy.run_cell("%dm_pull v/€")
    assert not result.success and "--as" in str(result.error_in_exec)
    assert "__meta" not in ipy.user_ns or ipy.user_ns.get("__meta") is None
    assert ipy.run_cell("%dm_pull v/€ --as euro").success and ipy.user_ns["euro"] == 1
    ipy.user_ns.pop("euro", None)
    ipy.user_ns.pop("euro_meta", None)


def test_completion_quotes_keys_with_spaces(ipy) -> None:
    from daman.magics import key_fragment

    dm.push(1, "team/my data/v1")
    completer = ipy.magics_manager.registry["DamanMagics"].completer
    raw, fragment = key_fragment("%dm_pull team/my")
    assert (raw, fragment) == ("team/my", "team/my")
    assert completer.quoted(completer.complete(fragment), raw) == ['"team/my data/']
    raw, fragment = key_fragment('%dm_pull "team/my data/v')
    assert (raw, fragment) == ('"team/my data/v', "team/my data/v")
    assert completer.quoted(completer.complete(fragment), raw) == ['"team/my data/v1"']
    assert ipy.run_cell('%dm_pull "team/my data/v1" --as v').success


# -- 19. paths compared as the system resolves them ------------------------------------------------


def test_errors_are_daman_errors_with_one_line(tmp_path: Path) -> None:
    """The OS-error mapping in one place: every errno the issue lists gives a one-line
    LocalFileError naming the place."""
    from daman.errors import map_os_error

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS,
                 errno.ENOTDIR, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE):  # fmt: skip
        error = map_os_error(OSError(code, os.strerror(code), str(tmp_path / "x")), tmp_path)
        assert isinstance(error, DamanError) and "\n" not in str(error)
        assert str(tmp_path) in str(error) and str(error).endswith(".")
        if code in (errno.EMFILE, errno.ENFILE):  # the limit's fault, not the folder's
            assert "ulimit -n" in str(error) and "another place" not in str(error)


def test_botocore_refusing_a_parameter_is_one_line(s3_endpoint: str) -> None:
    """ParamValidationError's text has a heading line; daman's error has one line."""
    from botocore.exceptions import ParamValidationError

    from daman.store import open_store

    store = open_store(Config(storage_name="bucket", service="aws", endpoint_url=s3_endpoint))
    try:
        refused = ParamValidationError(report='Invalid bucket name "x y": must match a regex')
        error = store._translate(refused, None)
    finally:
        store.close()
    assert isinstance(error, DamanError) and "\n" not in str(error)
    assert str(error).endswith('Parameter validation failed: Invalid bucket name "x y": must '
                               "match a regex")  # fmt: skip
