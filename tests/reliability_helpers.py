"""Shared by the ``test_reliability_*`` modules: child processes configured from a Config,
self-checking objects, and the checks a cache and a store must pass after anything happened.

Child processes import this module too (``tests/`` is put on their ``PYTHONPATH``, in front of
whatever ``PYTHONPATH`` the test run had, so a run against another copy of daman reaches the
children as well).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from daman import Config, Manager
from daman.serialize import StoredFile

TESTS = Path(__file__).resolve().parent

PRELUDE = """
import json, os, signal, sys
from daman import Config, Manager
config = Config(**json.loads(sys.argv[1]))
"""


def child_env(**extra: str) -> dict[str, str]:
    paths = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def spawn(
    config: Config, code: str, *args: object, stdin: bool = False, prefix: list[str] | None = None
) -> subprocess.Popen[str]:
    """Run ``code`` in a new interpreter; it finds ``config`` (a Config) already made from the
    JSON in ``argv[1]``; ``argv[2:]`` are ``args``. ``prefix`` wraps the command (unshare)."""
    command = [sys.executable, "-c", PRELUDE + textwrap.dedent(code)]
    command += [json.dumps(config.to_dict()), *map(str, args)]
    return subprocess.Popen(
        [*(prefix or []), *command],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def _close_stdin(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.stdin = None  # communicate() must not touch it again


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """Close its stdin, wait for ``proc`` to exit 0; its stdout."""
    _close_stdin(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child hung for {timeout} s:\n{err}") from None
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
    return out


def kill_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        _close_stdin(proc)
        proc.communicate()


# -- self-checking objects -------------------------------------------------------------------


def _tag(key: str, version: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}|{version}".encode()).digest()[:6], "little")


def make_object(key: str, version: str, nbytes: int = 8000) -> tuple[dict[str, Any], dict]:
    """``(obj, meta)``: every byte of ``obj['data']`` depends on ``key`` and ``version``, and the
    meta names them too, so a mix of two versions, or of an object and another's meta, shows."""
    n = max(1, nbytes // 8)
    data = np.arange(n, dtype=np.int64) * 2_654_435_761 + _tag(key, version)
    return {"key": key, "version": version, "data": data}, {"key": key, "version": version}


def check_object(obj: Any, meta: Any, key: str) -> str:
    """The version of a pulled ``(obj, meta)``, after checking it is whole and is ``key``'s."""
    assert obj["key"] == key, (obj["key"], key)
    version = obj["version"]
    assert meta == {"key": key, "version": version}, (meta, key, version)
    data = obj["data"]
    expected = np.arange(data.size, dtype=np.int64) * 2_654_435_761 + _tag(key, version)
    assert np.array_equal(data, expected), f"{key!r} version {version!r}: data damaged"
    return version


# -- what must hold at rest --------------------------------------------------------------------


def assert_cache_consistent(manager: Manager, allocation: int | None = None) -> None:
    """The index equals the files on disc (names and sizes), the totals add up, every cached
    file is whole (its sha256 is the recorded one), nothing is left in ``tmp/`` or in the
    journal, and the allocation holds."""
    cache = manager.cache
    entries = cache.entries()
    on_disc = {p.name: p.stat().st_size for p in cache.objects_dir.iterdir()}
    assert on_disc == {e.path.name: e.size for e in entries}, "index and files disagree"
    usage = cache.usage()
    assert usage.used == sum(on_disc.values()) and usage.count == len(entries)
    assert sorted(p.name for p in cache.tmp_dir.iterdir()) == [], "temp files left behind"
    assert cache._db().execute("SELECT COUNT(*) FROM journal").fetchone() == (0,)
    for entry in entries:
        with open(entry.path, "rb") as f:
            stored = StoredFile(f)
            stored.verify()
            assert stored.footer.sha256 == entry.sha256, f"cached {entry.key!r} is damaged"
    if allocation is not None:
        assert usage.used <= allocation, (usage.used, allocation)


def assert_left_at_rest(local_dir: str | os.PathLike[str]) -> None:
    """What processes that all exited normally leave in ``local_dir``, looked at directly
    (no Cache opened, so no recovery tidies up first): nothing in the journal or in ``tmp/``,
    and exactly the files the index names, with its sizes."""
    root = Path(local_dir)
    db = sqlite3.connect(root / "index.sqlite3")
    try:
        rows = dict(db.execute("SELECT file, size FROM entries").fetchall())
        assert db.execute("SELECT COUNT(*) FROM journal").fetchone() == (0,), "journal rows left"
        assert db.execute("SELECT size FROM totals").fetchone() == (sum(rows.values()),)
    finally:
        db.close()
    on_disc = {p.name: p.stat().st_size for p in (root / "objects").iterdir()}
    assert on_disc == rows, "files on disc and index disagree before any recovery"
    assert sorted(p.name for p in (root / "tmp").iterdir()) == [], "temp files left behind"


def store_leftovers(config: Config) -> list[str]:
    """What unfinished writes left in the store: temp files in a store folder, open multipart
    uploads in a bucket."""
    if config.service == "local":
        root = Path(config.storage_name)
        return sorted(str(p) for p in root.rglob("*") if p.name.endswith(".incomplete"))
    if config.service in ("gcs", "azure"):
        # An abandoned resumable upload (GCS) or uncommitted blocks (Azure) are invisible to
        # listings and expire on their own: nothing to find, nothing billed as an object.
        return []
    import boto3

    bucket, _, prefix = config.storage_name.partition("/")
    client = boto3.client("s3", endpoint_url=config.endpoint_url, region_name="us-east-1")
    try:
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return [u["Key"] for u in uploads.get("Uploads", [])]
    finally:
        client.close()
