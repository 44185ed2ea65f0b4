"""``dm.demo``: an S3 server on loopback, a seeded bucket, daman configured for this process
only; ``python -m daman.demo``, the server of a whole container, which ends with its parent."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import daman as dm
from daman import demo


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No shared server announced; whatever a test starts is stopped after it."""
    monkeypatch.delenv(demo.ENDPOINT_ENV, raising=False)
    yield
    demo.stop()


@pytest.fixture
def saved(daman_home: Path) -> bytes:
    """Someone's saved setup, which the demo must leave exactly as it is."""
    daman_home.mkdir()
    text = b'{"service": "aws", "storage_name": "team-bucket", "signing_key": "team"}\n'
    (daman_home / "config.json").write_bytes(text)
    return text


def listens(endpoint: str) -> bool:
    """Whether something accepts connections at ``endpoint`` (the demo server's URL)."""
    parts = urlsplit(endpoint)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=2):
            return True
    except OSError:
        return False


def _eventually(check, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def test_start_serves_a_seeded_bucket_for_this_process_only(
    clean: None, saved: bytes, daman_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-REAL-KEY")
    monkeypatch.setenv("AWS_PROFILE", "work")
    started = demo.start()
    assert started.own_server and urlsplit(started.endpoint).hostname == "127.0.0.1"
    assert dm.current_config() == started.config and started.config.signing_key is None
    assert {item.key for item in dm.ls()} >= set(demo.SEED)
    assert not any(item.cached for item in dm.ls())  # stored, not cached: an empty cache
    assert dm.pull("examples/greeting")[0] == "hello from the daman demo"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "daman-demo" and "AWS_PROFILE" not in os.environ
    assert "your saved configuration is unchanged" in str(started)
    assert (daman_home / "config.json").read_bytes() == saved

    demo.stop()
    assert not listens(started.endpoint)
    assert not started.work_dir.exists()
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIA-REAL-KEY"
    assert os.environ["AWS_PROFILE"] == "work"
    assert dm.current_config().storage_name == "team-bucket"  # the saved one again
    assert (daman_home / "config.json").read_bytes() == saved


def test_each_start_gets_an_empty_cache_and_scratch_empties_its_prefix(clean: None) -> None:
    first = demo.start()
    dm.push(1, "notebook/a")
    dm.push(2, "elsewhere/b")
    again = demo.start(scratch="notebook/")
    assert again.endpoint == first.endpoint  # one server per process
    assert again.config.cache_dir != first.config.cache_dir
    assert dm.usage().count == 0
    assert not dm.exists("notebook/a") and dm.exists("elsewhere/b")
    assert dm.exists("team/model/v2")  # the examples stay
    for bad in ("notebook", "/", "a//"):
        with pytest.raises((dm.InvalidArgumentError, dm.InvalidKeyError)):
            demo.start(scratch=bad)


def test_another_machine_shares_the_store_with_its_own_cache(clean: None) -> None:
    started = demo.start()
    with dm.Manager(started.machine("laptop", allocated_space="1MiB")) as laptop:
        assert laptop.config.cache_dir == started.work_dir / "laptop"
        assert laptop.cache.allocated_space == 2**20
        assert laptop.store.describe() == "s3://daman-demo/"
        dm.push({"n": 1}, "shared/x")
        assert laptop.load("shared/x").source == "store"
    with pytest.raises(dm.InvalidArgumentError, match="machine name"):
        started.machine("../up")


def test_start_uses_the_server_the_environment_names(
    clean: None, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(demo.ENDPOINT_ENV, s3_endpoint)
    started = demo.start()
    assert not started.own_server and started.endpoint == s3_endpoint
    assert dm.exists("team/sales/2026-11")
    for elsewhere in ("http://10.1.2.3:9000", "https://127.0.0.1:9000", "http://example.com:80"):
        monkeypatch.setenv(demo.ENDPOINT_ENV, elsewhere)
        with pytest.raises(dm.InvalidArgumentError, match="only ever served on this machine"):
            demo.start()


def test_without_moto_the_demo_says_what_to_install(
    clean: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "moto.moto_server.threaded_moto_server", None)
    with pytest.raises(dm.MissingPackageError) as raised:
        demo.start()
    message = str(raised.value)
    assert 'pip install "daman[demo]"' in message and "\n" not in message
    assert demo.serve([]) == 1
    assert capsys.readouterr().err == f"daman.demo: error: {message}\n"


def test_moto_is_an_optional_extra() -> None:
    moto = [r for r in metadata.requires("daman") or [] if r.startswith("moto")]
    assert moto and all("extra ==" in requirement for requirement in moto)
    assert any(r.startswith("moto[server]") and 'extra == "demo"' in r for r in moto)


def test_the_container_server_ends_with_its_parent(tmp_path: Path) -> None:
    """``binder/start`` execs Jupyter over itself: the server's parent is then Jupyter, and
    when it ends the server goes too. A shell that exits plays that parent here."""
    endpoint_file = tmp_path / "endpoint"
    script = (
        f"{sys.executable} -m daman.demo --endpoint-file {endpoint_file} "
        f">{tmp_path / 'server.log'} 2>&1 & echo $!; "
        f"while [ ! -s {endpoint_file} ]; do kill -0 $! || exit 1; sleep 0.1; done"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    shell = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert shell.returncode == 0, (tmp_path / "server.log").read_text()
    pid = int(shell.stdout.split()[0])
    endpoint = endpoint_file.read_text()
    try:
        _eventually(lambda: not listens(endpoint), "the server stopped listening")
        _eventually(lambda: not _alive(pid), "the server process ended")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert (
        "daman demo store: s3://daman-demo/ at http://127.0.0.1:"
        in (tmp_path / "server.log").read_text()
    )


def test_the_container_server_holds_the_examples_and_stops_on_sigterm(
    clean: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint_file = tmp_path / "endpoint"
    proc = subprocess.Popen(
        [sys.executable, "-m", "daman.demo", "--endpoint-file", str(endpoint_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        _eventually(lambda: endpoint_file.exists() or proc.poll() is not None, "ready")
        endpoint = endpoint_file.read_text()
        monkeypatch.setenv(demo.ENDPOINT_ENV, endpoint)
        demo.start()
        assert {item.key for item in dm.ls()} == set(demo.SEED)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not listens(endpoint)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
