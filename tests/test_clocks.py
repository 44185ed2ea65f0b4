"""Clocks that jump: a laptop or VM whose clock was a year ahead (then corrected by NTP), a
machine whose clock is two days ahead of the file server. daman orders and ages things by
what it can trust: a use sequence in the index, the file server's own times.

Each "machine" with a wrong clock is a separate process whose ``time.time`` is moved; the
kernel still stamps files with the true time, as a file server would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from daman import Config, Manager
from daman.cache import Cache
from daman.store.local import LocalStore

YEAR = 365 * 24 * 3600

SKEWED = """
    import sys, time
    _true_time = time.time
    time.time = lambda: _true_time() + float(sys.argv[1])
"""


def run_skewed(seconds: float, code: str, *args: object) -> str:
    script = textwrap.dedent(SKEWED) + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script, str(seconds), *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


ADD = """
    import hashlib, os
    from daman.cache import Cache
    cache = Cache(sys.argv[2], int(sys.argv[3]))
    for key in sys.argv[4:]:
        with cache.temp_file() as tmp:
            tmp.write_bytes(os.urandom(1000))
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            assert cache.add(key, tmp, etag=key, sha256=digest) is not None
    for key in sys.argv[4:]:  # and used again, while the clock is wrong
        cache.touch(key)
"""


def test_a_clock_that_was_a_year_ahead_does_not_reorder_eviction(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    allocation = 4000
    run_skewed(YEAR, ADD, root, allocation, "early/a", "early/b")  # used first, clock ahead
    run_skewed(0, ADD, root, allocation, "late/c", "late/d")  # used after, clock corrected
    cache = Cache(root, allocation)
    with cache.temp_file() as tmp:
        tmp.write_bytes(b"x" * 1500)
        assert cache.add("new", tmp, etag="new", sha256="-") is not None
    # Least recently used first: the entries used while the clock was ahead.
    assert sorted(e.key for e in cache.entries()) == ["late/c", "late/d", "new"]


PREVIOUS_SCHEMA = """
CREATE TABLE entries (key TEXT PRIMARY KEY, file TEXT NOT NULL, size INTEGER NOT NULL,
    etag TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL, accessed REAL NOT NULL,
    persist INTEGER NOT NULL DEFAULT 0);
CREATE INDEX entries_lru ON entries (persist, accessed);
CREATE TABLE journal (file TEXT PRIMARY KEY, key TEXT NOT NULL);
CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), size INTEGER NOT NULL,
    count INTEGER NOT NULL);
INSERT INTO totals VALUES (0, 0, 0);
CREATE TRIGGER entries_insert AFTER INSERT ON entries BEGIN
    UPDATE totals SET size = size + NEW.size, count = count + 1; END;
CREATE TRIGGER entries_delete AFTER DELETE ON entries BEGIN
    UPDATE totals SET size = size - OLD.size, count = count - 1; END;
CREATE TRIGGER entries_resize AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET size = size - OLD.size + NEW.size; END;
"""
"""The index of daman 0.1 (before the use sequence): ``accessed`` held wall-clock times."""


def test_a_cache_of_the_previous_release_is_upgraded_in_lru_order(tmp_path: Path) -> None:
    import sqlite3

    from daman.keys import key_digest

    root = tmp_path / "cache"
    (root / "objects").mkdir(parents=True)
    db = sqlite3.connect(root / "index.sqlite3")
    db.executescript(PREVIOUS_SCHEMA)
    for key, used, persist in [("a", 30.0, 0), ("b", 10.0, 1), ("c", 20.0, 0)]:
        file = f"{key_digest(key)}.{'0' * 12}"
        (root / "objects" / file).write_bytes(b"x" * 1000)
        db.execute(
            "INSERT INTO entries VALUES (?, ?, 1000, ?, '-', 1.7e9, ?, ?)",
            (key, file, key, 1.7e9 + used, persist),
        )
    db.commit()
    db.close()
    again = Cache(root, 10_000)
    assert [e.key for e in again.entries()] == ["a", "c", "b"]  # most recently used first
    assert [e.key for e in again.entries() if e.persist] == ["b"]  # pins survive
    assert again.usage().used == 3000 and again.usage().count == 3
    again.touch("b")
    assert next(e.key for e in again.entries()) == "b"
    with again.temp_file() as tmp:
        tmp.write_bytes(b"y" * 8000)
        again.add("d", tmp, etag="d", sha256="-")  # evicts the least recently used: c
    assert sorted(e.key for e in again.entries()) == ["a", "b", "d"]


SLOW_PUSH = """
    from pathlib import Path
    from daman.store.local import LocalStore
    store = LocalStore(sys.argv[2])
    src = Path(sys.argv[3])

    def progress(n):
        print("writing", flush=True)
        sys.stdin.readline()  # hold the push open until told

    store.put("slow/key", src, overwrite=False, progress=progress)
    print("pushed", flush=True)
"""

OTHER_PUSH = """
    from pathlib import Path
    from daman.store.local import LocalStore
    store = LocalStore(sys.argv[2])
    list(store.list())  # a listing, then a push into the same folder: either may sweep
    store.put("slow/other", Path(sys.argv[3]), overwrite=False)
    print(sorted(p.name for p in store.root.joinpath("slow").iterdir()))
"""


def test_a_machine_whose_clock_is_ahead_does_not_sweep_a_live_push(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    src = tmp_path / "src"
    src.write_bytes(b"x" * 1000)
    script = textwrap.dedent(SKEWED) + textwrap.dedent(SLOW_PUSH)
    slow = subprocess.Popen(
        [sys.executable, "-c", script, "0", root, src],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert slow.stdout.readline() == "writing\n", slow.stderr.read()
        # Another machine, two days ahead, pushes into the same folder (which sweeps it).
        listing = run_skewed(2 * 24 * 3600, OTHER_PUSH, root, src)
        assert "incomplete" in listing  # the live push's temp file is still there
        slow.stdin.write("\n")
        slow.stdin.flush()
        out, err = slow.communicate(timeout=60)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()
    assert slow.returncode == 0 and out.strip() == "pushed", err
    store = LocalStore(root)
    assert [info.key for info in store.list()] == ["slow/key", "slow/other"]


def test_a_push_whose_temp_file_was_removed_fails_with_a_daman_error(tmp_path: Path) -> None:
    from daman import StoreUnavailableError

    root = tmp_path / "shared"
    root.mkdir()
    src = tmp_path / "src"
    src.write_bytes(b"x" * 1000)
    store = LocalStore(root)

    def remove_my_temp_file(_: int) -> None:
        for path in (root / "k").iterdir():
            path.unlink()

    with pytest.raises(StoreUnavailableError, match="Push again"):
        store.put("k/x", src, overwrite=False, progress=remove_my_temp_file)


def test_an_abandoned_temp_file_is_swept_by_the_file_servers_clock(tmp_path: Path) -> None:
    """A dead push's temp file (no lock, two days old by the server) goes; a foreign file
    with a similar name and a fresh temp file stay."""
    import os
    import time

    root = tmp_path / "shared"
    (root / "k").mkdir(parents=True)
    dead = root / "k" / f".x.daman.{'a' * 32}.incomplete"
    fresh = root / "k" / f".y.daman.{'b' * 32}.incomplete"
    foreign = root / "k" / ".mine.incomplete"
    for path in (dead, fresh, foreign):
        path.write_bytes(b"partial")
    old = time.time() - 2 * 24 * 3600
    for path in (dead, foreign):
        os.utime(path, (old, old))
    src = tmp_path / "src"
    src.write_bytes(b"x")
    LocalStore(root).put("k/z", src, overwrite=False)
    assert sorted(p.name for p in (root / "k").iterdir()) == sorted(
        [fresh.name, foreign.name, "z.daman"]
    )


# -- fetch racing a delete ----------------------------------------------------------------------


class _RemovedAfterAdd(Cache):
    """A cache in which another process removes each new entry right after it is added, the
    first ``times`` times."""

    times = 1

    def add(self, key, tmp_path, **kwargs):
        entry = super().add(key, tmp_path, **kwargs)
        if entry is not None and self.times > 0:
            self.times -= 1
            self.remove(key)
        return entry


@pytest.mark.parametrize("times", [1, 100])
def test_fetch_racing_a_delete_says_what_happened(config: Config, times: int) -> None:
    cache = _RemovedAfterAdd(config.cache_dir, config.allocated_space)
    cache.times = times
    with Manager(config, cache=cache) as manager:
        manager.push(b"x" * 100, "k")
        manager.cache.remove("k")
        cache.times = times
        if times == 1:
            assert manager.fetch("k").path.exists()  # fetched again
        else:
            from daman import NotCachedError

            with pytest.raises(NotCachedError, match="removed from the local cache by another"):
                manager.fetch("k")


def test_threads_fetching_while_another_deletes(config: Config) -> None:
    """No fetch ever blames the allocation when there is none."""
    with Manager(config) as manager:
        manager.push(b"x" * 100, "k")
        stop = threading.Event()
        errors: list[str] = []

        def delete_in_a_loop() -> None:
            while not stop.is_set():
                manager.cache.remove("k")

        deleter = threading.Thread(target=delete_in_a_loop)
        deleter.start()
        try:
            for _ in range(200):
                try:
                    manager.fetch("k")
                except Exception as exc:
                    errors.append(str(exc))
        finally:
            stop.set()
            deleter.join()
        assert not [e for e in errors if "does not fit" in e], errors[:3]
