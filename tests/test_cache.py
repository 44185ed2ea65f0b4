"""The local cache (``daman.cache.Cache``) on its own: no store, just folders under tmp_path.

Every test ends, where it makes sense, with ``assert_consistent``: the files in ``objects/`` are
exactly those the rows name, with the rows' sizes, the totals add up, and neither the journal
nor ``tmp/`` holds anything once no operation runs. Crashes are real SIGKILLs of child
processes, either at chosen points inside an operation or at random moments.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings
from pathlib import Path

import pytest

import daman.cache as cache_module
from daman import forksafe
from daman.cache import Cache, CacheEntry, CacheUsage, IndexDamagedError
from daman.errors import LocalFileError, RepairWarning
from daman.keys import key_digest

# -- helpers --------------------------------------------------------------------------------------


def temp_path(cache: Cache) -> Path:
    """A fresh name in ``tmp/`` that recovery leaves alone (it removes only unlocked
    *.incomplete files; these tests hold no lock on theirs)."""
    return cache.tmp_dir / f"{os.getpid()}-{os.urandom(16).hex()}.download"


def make_file(cache: Cache, nbytes: int) -> Path:
    """A finished download: ``nbytes`` random bytes at a fresh temp path."""
    path = temp_path(cache)
    path.write_bytes(os.urandom(nbytes))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put(cache: Cache, key: str, nbytes: int, *, persist: bool = False) -> CacheEntry:
    """Add ``nbytes`` under ``key``, which must succeed."""
    tmp = make_file(cache, nbytes)
    entry = cache.add(key, tmp, etag=f"etag-{key}-{nbytes}", sha256=sha256_of(tmp), persist=persist)
    assert entry is not None, f"adding {key!r} ({nbytes} bytes) unexpectedly did not fit"
    return entry


def persisted(cache: Cache, keys: list[str]) -> dict[str, bool]:
    """``{key: persist}`` of the cached ones among ``keys``."""
    return {key: state.persist for key, state in cache.states(keys).items()}


def journal(cache: Cache) -> list[tuple[str, str]]:
    return sorted(cache._db().execute("SELECT file, key FROM journal").fetchall())


def add_journal_row(cache: Cache, file: str, key: str) -> None:
    db = cache._db()
    db.execute("INSERT INTO journal (file, key) VALUES (?, ?)", (file, key))


def files_on_disc(cache: Cache) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in cache.objects_dir.iterdir()}


def sizes(cache: Cache) -> dict[str, int]:
    return {entry.key: entry.size for entry in cache.entries()}


def snapshot(cache: Cache) -> dict[str, object]:
    """Everything an operation that "changes nothing" must leave as it was."""
    return {
        "entries": sorted(cache.entries(), key=lambda entry: entry.key),
        "files": files_on_disc(cache),
        "usage": cache.usage(),
        "journal": journal(cache),
        "tmp": sorted(path.name for path in cache.tmp_dir.iterdir()),
    }


def assert_consistent(cache: Cache) -> None:
    """The invariants the module docstring promises, at rest."""
    entries = cache.entries()
    referenced = {entry.path.name: entry.size for entry in entries}
    assert len(referenced) == len(entries), "two rows share one file"
    assert files_on_disc(cache) == referenced
    for entry in entries:
        assert entry.path.parent == cache.objects_dir
        named = f"{entry.key}\0{entry.version}" if entry.version else entry.key
        assert entry.path.name.startswith(key_digest(named) + ".")  # a version: its own name
    assert cache.usage().used == sum(entry.size for entry in entries)
    assert cache.usage().count == len(entries)
    assert list(cache.tmp_dir.glob("*.incomplete")) == []
    assert journal(cache) == []


def run_python(code: str, *args: object, stdin: int | None = None) -> subprocess.Popen[str]:
    """Start ``code`` in a fresh interpreter (argv[1:] = args), stdout piped as text."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """Wait for ``proc`` to exit 0; its stdout."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
    return out


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def key_on_stripe(key: str, same: bool) -> str:
    """Another key whose lock stripe (first two hex digits of its digest) is / is not ``key``'s."""
    stripe = key_digest(key)[:2]
    for i in itertools.count():
        other = f"{key}-other-{i}"
        if (key_digest(other)[:2] == stripe) == same:
            return other
    raise AssertionError("unreachable")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -- add / get ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, 1, 4096, 300_000])
@pytest.mark.parametrize("persist", [False, True])
def test_add_get_round_trip(root: Path, nbytes: int, persist: bool) -> None:
    cache = Cache(root)
    tmp = make_file(cache, nbytes)
    data = tmp.read_bytes()
    digest = hashlib.sha256(data).hexdigest()

    entry = cache.add("team/data/v1", tmp, etag='"abc"', sha256=digest, persist=persist)

    assert entry is not None
    assert not tmp.exists()
    assert entry.path.read_bytes() == data
    assert (entry.key, entry.size, entry.etag, entry.sha256, entry.persist) == (
        "team/data/v1", nbytes, '"abc"', digest, persist,
    )  # fmt: skip
    assert entry.accessed == 1  # the first use of this cache
    assert cache.get("team/data/v1") == entry
    assert cache.usage() == CacheUsage(used=nbytes, allocated=None, count=1)
    assert persisted(cache, ["team/data/v1"]) == {"team/data/v1": persist}
    assert_consistent(cache)


@pytest.mark.parametrize("key", ["a", "x/y/z", "ünïcödé/ключ/鍵", "long/" + "s" * 200 + "/end"])
def test_cache_files_are_named_by_the_key_digest_not_the_key(root: Path, key: str) -> None:
    cache = Cache(root)
    entry = put(cache, key, 10)
    assert entry.path.parent == cache.objects_dir
    assert entry.path.name.split(".")[0] == key_digest(key)
    assert cache.get(key) == entry
    assert_consistent(cache)


def test_get_of_unknown_keys_is_none(root: Path) -> None:
    cache = Cache(root)
    assert cache.get("nothing") is None
    put(cache, "a", 10)
    assert cache.get("b") is None
    assert cache.get("a/") is None and cache.get("A") is None
    assert_consistent(cache)


def test_entries_survive_reopening(root: Path) -> None:
    cache = Cache(root, 1000)
    entry = put(cache, "k", 123, persist=True)
    cache.close()
    again = Cache(root, 1000)
    assert again.get("k") == entry
    assert again.usage() == CacheUsage(used=123, allocated=1000, count=1)
    assert_consistent(again)


def test_add_of_a_missing_temp_file_raises_and_changes_nothing(root: Path) -> None:
    cache = Cache(root, 1000)
    put(cache, "a", 100)
    before = snapshot(cache)
    with pytest.raises(FileNotFoundError):
        cache.add("b", cache.tmp_dir / "missing.incomplete", etag="e", sha256="s")
    assert snapshot(cache) == before
    assert_consistent(cache)


# -- replacing an entry ---------------------------------------------------------------------------


def test_replacing_a_key_removes_the_old_file_and_updates_the_totals(root: Path) -> None:
    cache = Cache(root, 1000)
    put(cache, "other", 50)
    old = put(cache, "k", 300)
    new = put(cache, "k", 120)

    assert not old.path.exists()
    assert new.path != old.path and new.path.exists()
    assert cache.get("k") == new
    assert new.etag != old.etag and new.sha256 == sha256_of(new.path)
    assert cache.usage() == CacheUsage(used=170, allocated=1000, count=2)
    assert_consistent(cache)


@pytest.mark.parametrize(
    ("old_persist", "new_persist", "expected"),
    [(False, False, False), (False, True, True), (True, False, True), (True, True, True)],
)
def test_replacing_keeps_a_persisted_entry_persisted(
    root: Path, old_persist: bool, new_persist: bool, expected: bool
) -> None:
    cache = Cache(root)
    put(cache, "k", 10, persist=old_persist)
    entry = put(cache, "k", 20, persist=new_persist)
    assert entry.persist is expected
    assert cache.get("k").persist is expected
    assert persisted(cache, ["k"]) == {"k": expected}
    assert_consistent(cache)


def test_replacing_counts_the_old_size_as_freed(root: Path) -> None:
    cache = Cache(root, 100)
    put(cache, "k", 100, persist=True)  # the allocation is full of a pinned entry ...
    entry = put(cache, "k", 100)  # ... which can still be replaced by one of the same size
    assert cache.get("k") == entry
    assert cache.usage().used == 100
    assert_consistent(cache)


def test_growing_replacement_evicts_others_but_never_its_own_old_file(root: Path) -> None:
    cache = Cache(root, 100)
    put(cache, "k", 40)  # the least recently used entry, yet not the one to evict
    put(cache, "a", 40)
    put(cache, "b", 20)
    put(cache, "k", 60)  # needs 20 more bytes: evicts a (the LRU of the others) only
    assert sizes(cache) == {"k": 60, "b": 20}
    assert_consistent(cache)


# -- allocation and eviction ----------------------------------------------------------------------


def test_usage_never_exceeds_the_allocation(root: Path) -> None:
    rng = random.Random(1234)
    cache = Cache(root, 10_000)
    for i in range(150):
        key = f"k/{rng.randrange(40)}"
        entry = put(cache, key, rng.randrange(0, 3000), persist=rng.random() < 0.02)
        assert cache.get(key) == entry  # the newest entry is never the one evicted
        assert cache.usage().used <= 10_000, f"over the allocation after add #{i}"
        if rng.random() < 0.1:
            for pinned in cache.entries():
                cache.set_persist(pinned.key, False)
    assert_consistent(cache)


def test_eviction_is_least_recently_used_first_and_touch_refreshes(root: Path) -> None:
    cache = Cache(root, 300)
    for key in "abc":
        put(cache, key, 100)
    cache.touch("a")  # order, oldest first: b, c, a
    put(cache, "d", 100)  # evicts b only
    assert sorted(sizes(cache)) == ["a", "c", "d"]
    assert [entry.key for entry in cache.entries()] == ["d", "a", "c"]  # most recent first

    put(cache, "e", 150)  # needs 150: evicts c then a, and stops as soon as e fits
    assert sizes(cache) == {"d": 100, "e": 150}
    cache.touch("not-cached")  # a no-op, no error
    assert_consistent(cache)


def test_persisted_entries_are_never_evicted(root: Path) -> None:
    cache = Cache(root, 300)
    put(cache, "pinned", 100, persist=True)  # the oldest entry throughout
    put(cache, "later-pinned", 50)
    assert cache.set_persist("later-pinned", True)
    for i in range(20):
        put(cache, f"churn/{i}", 60 + i)
        assert cache.get("pinned") is not None and cache.get("later-pinned") is not None
        assert cache.usage().used <= 300
    assert cache.set_persist("later-pinned", False)
    put(cache, "big", 200)  # room only if the now unpinned entry goes
    assert sizes(cache) == {"pinned": 100, "big": 200}
    assert_consistent(cache)


@pytest.mark.parametrize(
    ("existing", "key", "nbytes"),
    [
        pytest.param([], "new", 101, id="bigger-than-allocation-empty-cache"),
        pytest.param([("a", 30, False)], "new", 101, id="bigger-than-allocation"),
        pytest.param([("p", 100, True)], "new", 1, id="pinned-entries-fill-it"),
        pytest.param(
            [("p", 60, True), ("a", 20, False), ("b", 10, False)], "new", 50,
            id="evicting-all-unpinned-is-not-enough",
        ),
        pytest.param(
            [("p", 49, True), ("k", 50, False), ("a", 1, False)], "k", 60,
            id="replacement-next-to-pinned-entries",
        ),
    ],
)  # fmt: skip
def test_an_object_that_cannot_fit_is_refused_and_changes_nothing_else(
    root: Path, existing: list[tuple[str, int, bool]], key: str, nbytes: int
) -> None:
    cache = Cache(root, 100)
    for name, size, persist in existing:
        put(cache, name, size, persist=persist)
    tmp = make_file(cache, nbytes)
    data = tmp.read_bytes()
    before = snapshot(cache)

    assert cache.add(key, tmp, etag="e", sha256="s") is None

    assert tmp.read_bytes() == data  # the caller keeps its file
    after = snapshot(cache)
    if any(name == key for name, _, _ in existing):
        # The version it would have replaced is superseded: dropped, and nothing else.
        assert cache.get(key) is None
        assert after["entries"] == [e for e in before["entries"] if e.key != key]
        assert after["usage"].used == sum(e.size for e in after["entries"])
    else:
        assert after == before  # evictions it tried were rolled back
    tmp.unlink()
    assert_consistent(cache)


@pytest.mark.parametrize("replacing", [False, True], ids=["new-key", "replacement"])
def test_a_failure_after_the_rename_rolls_everything_back(root: Path, replacing: bool) -> None:
    cache = Cache(root, 100)
    put(cache, "a", 60)  # must be evicted for the add below, then restored by the rollback
    put(cache, "b", 20)
    if replacing:
        put(cache, "boom", 10)
    cache._db().executescript(
        """
        CREATE TRIGGER fail_insert BEFORE INSERT ON entries WHEN NEW.key = 'boom'
        BEGIN SELECT RAISE(ABORT, 'injected failure'); END;
        CREATE TRIGGER fail_update BEFORE UPDATE ON entries WHEN NEW.key = 'boom'
        BEGIN SELECT RAISE(ABORT, 'injected failure'); END;
        """
    )
    tmp = make_file(cache, 50)
    data = tmp.read_bytes()
    before = snapshot(cache)

    with pytest.raises(LocalFileError, match="injected failure"):
        cache.add("boom", tmp, etag="e", sha256="s")

    assert tmp.read_bytes() == data  # moved back out of objects/
    assert snapshot(cache) == before
    cache._db().executescript("DROP TRIGGER fail_insert; DROP TRIGGER fail_update;")
    assert cache.add("boom", tmp, etag="e", sha256="s") is not None
    assert sizes(cache) == {"b": 20, "boom": 50}
    assert_consistent(cache)


def test_a_failing_rename_raises_and_rolls_back(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(root, 100)
    put(cache, "a", 60)  # would have been evicted for the add below
    tmp = make_file(cache, 50)
    before = snapshot(cache)

    def cross_device(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    # Only the cache module's view of ``os`` changes, not the real module.
    fake_os = types.SimpleNamespace(**{**vars(os), "replace": cross_device})
    with monkeypatch.context() as patch, pytest.raises(OSError, match="cross-device"):
        patch.setattr(cache_module, "os", fake_os)
        cache.add("new", tmp, etag="e", sha256="s")

    assert tmp.exists()
    assert snapshot(cache) == before
    tmp.unlink()
    assert_consistent(cache)


def test_no_allocation_means_no_limit(root: Path) -> None:
    cache = Cache(root, None)
    for i in range(5):
        put(cache, f"k{i}", 200_000)
    assert cache.usage() == CacheUsage(used=1_000_000, allocated=None, count=5)
    assert cache.evict_until_fits(10**12) == 0
    assert cache.usage().count == 5
    assert_consistent(cache)


# -- damaged files --------------------------------------------------------------------------------


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 1)


def _extend(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"x")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_delete, _truncate, _extend, _empty])
@pytest.mark.parametrize("persist", [False, True])
def test_get_of_a_damaged_file_is_none_and_drops_the_row(root: Path, damage, persist: bool) -> None:
    cache = Cache(root, 10_000)
    keep = put(cache, "keep", 100)
    entry = put(cache, "k", 500, persist=persist)
    damage(entry.path)

    assert cache.get("k") is None

    assert persisted(cache, ["k", "keep"]) == {"keep": False}
    assert not entry.path.exists()
    assert cache.usage() == CacheUsage(used=100, allocated=10_000, count=1)
    assert cache.get("keep") == keep
    assert cache.get("k") is None
    assert_consistent(cache)


# -- remove, set_persist, clear, evict_until_fits, states, entries -------------------------------


@pytest.mark.parametrize("persist", [False, True])
def test_remove(root: Path, persist: bool) -> None:
    cache = Cache(root)
    put(cache, "keep", 10)
    entry = put(cache, "k", 30, persist=persist)

    assert cache.remove("k") is True

    assert not entry.path.exists()
    assert cache.get("k") is None
    assert cache.usage() == CacheUsage(used=10, allocated=None, count=1)
    assert cache.remove("k") is False
    assert cache.remove("never-cached") is False
    assert_consistent(cache)


def test_remove_of_an_entry_whose_file_is_already_gone(root: Path) -> None:
    cache = Cache(root)
    put(cache, "k", 30).path.unlink()
    assert cache.remove("k") is True
    assert cache.usage().count == 0
    assert_consistent(cache)


def test_set_persist(root: Path) -> None:
    cache = Cache(root)
    put(cache, "k", 10)
    assert cache.set_persist("k", True) is True
    assert cache.get("k").persist and persisted(cache, ["k"]) == {"k": True}
    assert cache.set_persist("k", True) is True  # already pinned: still cached
    assert cache.set_persist("k", False) is True
    assert not cache.get("k").persist
    assert cache.set_persist("missing", True) is False
    assert cache.set_persist("missing", False) is False
    assert cache.get("missing") is None and cache.usage().count == 1
    assert_consistent(cache)


def test_eviction_candidates_and_persisted_size(root: Path) -> None:
    cache = Cache(root, 1000)
    assert cache.eviction_candidates(5) == [] and cache.persisted_size() == 0
    for key in "abcd":
        put(cache, key, 100, persist=key == "b")
    cache.touch("a")  # least recently used first: c, d, a (b is persisted)
    assert [e.key for e in cache.eviction_candidates(5)] == ["c", "d", "a"]
    assert [e.key for e in cache.eviction_candidates(2)] == ["c", "d"]
    assert cache.persisted_size() == 100
    cache.set_persist("c", True)
    assert cache.persisted_size() == 200 and cache.eviction_candidates(1)[0].key == "d"
    put(cache, "e", 700)  # needs 100 more bytes: the first candidate, d, goes
    assert sorted(sizes(cache)) == ["a", "b", "c", "e"]
    assert_consistent(cache)


def test_clear_frees_only_unpinned_entries(root: Path) -> None:
    cache = Cache(root, 1000)
    pinned = put(cache, "pinned", 100, persist=True)
    gone = [put(cache, "a", 20), put(cache, "b", 30)]

    assert cache.clear() == 50

    assert all(not entry.path.exists() for entry in gone)
    assert cache.get("pinned") == pinned
    assert cache.usage() == CacheUsage(used=100, allocated=1000, count=1)
    assert cache.clear() == 0
    assert_consistent(cache)


def test_reopening_with_a_smaller_allocation_evicts_lru_entries(root: Path) -> None:
    cache = Cache(root, 1000)
    put(cache, "pinned", 200, persist=True)
    for key in "abcd":
        put(cache, key, 200)
    cache.touch("a")  # LRU order of the unpinned: b, c, d, a
    cache.close()

    smaller = Cache(root, 500)
    assert sizes(smaller) == {"pinned": 200, "a": 200}
    assert smaller.usage().used == 400
    assert_consistent(smaller)
    smaller.close()

    tiny = Cache(root, 100)  # below the pinned bytes: what can go goes, the pin stays
    assert sizes(tiny) == {"pinned": 200}
    assert_consistent(tiny)


def test_evict_until_fits_returns_the_bytes_freed(root: Path) -> None:
    cache = Cache(root, 1000)
    for key in "abcd":
        put(cache, key, 200)
    assert cache.evict_until_fits() == 0
    assert cache.evict_until_fits(200) == 0
    assert cache.evict_until_fits(500) == 400  # 800 + 500 > 1000: a and b go
    assert sorted(sizes(cache)) == ["c", "d"]
    assert_consistent(cache)


def test_states_of_many_keys(root: Path) -> None:
    cache = Cache(root)
    cached = [f"k/{i}" for i in range(0, 1560, 3)]  # 520 keys, spread over all chunks
    expected = {}
    for i, key in enumerate(cached):
        put(cache, key, 1, persist=i % 7 == 0)
        expected[key] = i % 7 == 0
    asked = [f"k/{i}" for i in range(1560)] + ["missing/a", "missing/b"]
    random.Random(5).shuffle(asked)

    assert persisted(cache, asked) == expected
    assert persisted(cache, asked[:3] * 400) == {k: expected[k] for k in asked[:3] if k in expected}
    assert persisted(cache, []) == {}
    assert persisted(cache, ["missing/a"]) == {}


def test_entries(root: Path) -> None:
    cache = Cache(root)
    assert cache.entries() == []
    added = {key: put(cache, key, n, persist=key == "b") for key, n in [("a", 1), ("b", 2)]}
    put(cache, "c", 3)
    cache.remove("c")
    cache.touch("a")

    entries = cache.entries()
    assert [entry.key for entry in entries] == ["a", "b"]  # most recently used first
    assert entries[1] == added["b"] == cache.get("b")
    assert entries[0] == cache.get("a")
    assert entries[0].accessed > entries[1].accessed > added["a"].accessed


# -- crash recovery -------------------------------------------------------------------------------


def test_recovery_unlinks_journaled_files_no_row_refers_to(root: Path) -> None:
    cache = Cache(root)
    kept = put(cache, "kept", 10)
    orphan = f"{key_digest('k')}.0123456789ab"  # renamed into place, then the crash
    (cache.objects_dir / orphan).write_bytes(b"partial")
    add_journal_row(cache, orphan, "k")
    add_journal_row(cache, f"{key_digest('k2')}.ba9876543210", "k2")  # crashed before the rename
    cache.close()

    again = Cache(root)
    assert not (again.objects_dir / orphan).exists()
    assert again.get("kept") == kept
    assert_consistent(again)


def test_recovery_keeps_journaled_files_that_a_row_refers_to(root: Path) -> None:
    cache = Cache(root)
    entry = put(cache, "k", 10)
    add_journal_row(cache, entry.path.name, "k")
    cache.close()

    again = Cache(root)
    assert again.get("k") == entry
    assert entry.path.exists()
    assert_consistent(again)


LOCK_FILE = """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_recovery_removes_only_abandoned_temp_files(root: Path) -> None:
    """A writer locks its temp file from birth to removal (``Cache.temp_file``), so an unlocked
    *.incomplete file is abandoned whatever pid its name carries, and a locked one is in use,
    even when its pid means nothing here (a writer in another pid namespace). Files not named
    the way ``temp_file`` names them are not daman's: they are left alone."""
    cache = Cache(root)
    names = {
        "dead-pid": f"{dead_pid()}-{'0' * 32}.incomplete",
        "live-pid": f"{os.getpid()}-{'1' * 32}.incomplete",
        "not-daman's": "abc-123.incomplete",
        "locked-dead-pid": f"{dead_pid()}-{'4' * 32}.incomplete",
        "fresh-unborn": f"{dead_pid()}-{'5' * 32}.new",
        "old-unborn": f"{dead_pid()}-{'6' * 32}.new",
        "other-suffix": f"{dead_pid()}-{'2' * 32}.partial",
    }
    for name in names.values():
        (cache.tmp_dir / name).write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(cache.tmp_dir / names["old-unborn"], (hour_ago, hour_ago))
    locker = run_python(LOCK_FILE, cache.tmp_dir / names["locked-dead-pid"], stdin=subprocess.PIPE)
    try:
        assert locker.stdout.readline() == "locked\n"
        with cache.temp_file() as mine:
            os.utime(mine, (hour_ago, hour_ago))
            cache.close()
            Cache(root)
            left = {path.name for path in cache.tmp_dir.iterdir()}
        kept = ("locked-dead-pid", "fresh-unborn", "other-suffix", "not-daman's")
        assert left == {names[k] for k in kept} | {mine.name}
    finally:
        locker.communicate("\n", timeout=30)
    assert not mine.exists() and not list(cache.tmp_dir.glob("*.new"))[1:]


def test_temp_files_are_locked_from_birth(root: Path) -> None:
    """Recovery running in other processes while temp files are made never deletes one in use
    and never makes the writer fail."""
    cache = Cache(root)
    stop = threading.Event()

    def recover_in_a_loop() -> None:
        other = Cache(root)
        while not stop.is_set():
            other.recover()

    threads = [threading.Thread(target=recover_in_a_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(300):
            with cache.temp_file() as tmp:
                tmp.write_bytes(b"data")
                assert tmp.read_bytes() == b"data"
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert list(cache.tmp_dir.iterdir()) == []


HOLD_LOCK = """
    import sys
    from daman.cache import Cache

    cache = Cache(sys.argv[1])
    with cache.key_lock(sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.readline()
"""

TRY_LOCK = """
    import sys
    from daman.cache import Cache

    cache = Cache(sys.argv[1])
    with cache.key_lock(sys.argv[2], blocking=False) as got:
        print(got)
"""


def test_recovery_leaves_journaled_files_of_a_running_add_alone(root: Path) -> None:
    """A journaled file whose key's lock is held may belong to an add still in progress."""
    Cache(root).close()
    holder = run_python(HOLD_LOCK, root, "k", stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n"
        cache = Cache(root)
        in_flight = f"{key_digest('k')}.0123456789ab"
        (cache.objects_dir / in_flight).write_bytes(b"being added")
        add_journal_row(cache, in_flight, "k")

        Cache(root).close()  # another process opens the folder meanwhile
        assert (cache.objects_dir / in_flight).exists()
        assert journal(cache) == [(in_flight, "k")]
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
    finish(holder)

    cache.recover()  # the lock is free: now it is an orphan
    assert not (cache.objects_dir / in_flight).exists()
    assert_consistent(cache)


CRASH_AT = """
    import os, signal, sys
    from daman.cache import Cache

    root, op, point = sys.argv[1], sys.argv[2], sys.argv[3]
    cache = Cache(root, 400)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    real_replace = os.replace
    if point == "before-rename":
        os.replace = die
    elif point == "after-rename":
        os.replace = lambda src, dst: (real_replace(src, dst), die())
    elif point == "after-commit":
        Cache._unlink_journaled = die
    elif point == "mid-unlink":
        def unlink_one_then_die(self, files):
            (self.objects_dir / files[0]).unlink()
            die()
        Cache._unlink_journaled = unlink_one_then_die

    def add(key, nbytes):
        with cache.temp_file() as tmp:
            tmp.write_bytes(os.urandom(nbytes))
            cache.add(key, tmp, etag="child", sha256="s")

    if op == "add":
        add("d", 100)  # evicts a, the least recently used unpinned entry
    elif op == "replace":
        add("b", 50)
    elif op == "remove":
        cache.remove("b")
    elif op == "clear":
        cache.clear()
    sys.exit(3)  # the crash point was never reached
"""

BEFORE = {"p": 100, "a": 100, "b": 100, "c": 100}


CRASH_CASES = [
    ("add", "before-rename", BEFORE),
    ("add", "after-rename", BEFORE),
    ("add", "after-commit", {"p": 100, "b": 100, "c": 100, "d": 100}),
    ("add", "mid-unlink", {"p": 100, "b": 100, "c": 100, "d": 100}),
    ("replace", "before-rename", BEFORE),
    ("replace", "after-rename", BEFORE),
    ("replace", "after-commit", {**BEFORE, "b": 50}),
    ("remove", "after-commit", {"p": 100, "a": 100, "c": 100}),
    ("clear", "after-commit", {"p": 100}),
    ("clear", "mid-unlink", {"p": 100}),
]


@pytest.mark.parametrize(
    ("op", "point", "after"), CRASH_CASES, ids=[f"{op}-{point}" for op, point, _ in CRASH_CASES]
)
def test_sigkill_at_each_step_is_recovered_on_open(
    root: Path, op: str, point: str, after: dict[str, int]
) -> None:
    cache = Cache(root, 400)
    put(cache, "p", 100, persist=True)
    for key in "abc":
        put(cache, key, 100)
    before = snapshot(cache)
    cache.close()

    child = run_python(CRASH_AT, root, op, point)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err

    again = Cache(root, 400)
    assert sizes(again) == after
    if point in ("before-rename", "after-rename"):  # never committed: not a byte changed
        assert snapshot(again) == before
    assert_consistent(again)


CRASH_LOOP = """
    import os, random, sys
    from daman.cache import Cache

    root, allocation, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    cache = Cache(root, allocation)
    print("ready", flush=True)
    while True:
        key = f"k/{rng.randrange(12)}"
        action = rng.random()
        if action < 0.7:
            with cache.temp_file() as tmp:
                tmp.write_bytes(os.urandom(rng.randrange(1, 4000)))
                cache.add(key, tmp, etag="e", sha256="s", persist=rng.random() < 0.05)
        elif action < 0.8:
            cache.remove(key)
        elif action < 0.9:
            cache.get(key)
        elif action < 0.97:
            cache.set_persist(key, False)
        else:
            cache.clear()
"""


def test_random_sigkills_leave_a_folder_that_opens_consistent(root: Path) -> None:
    rng = random.Random(20240601)
    allocation = 10_000
    seen_entries = 0
    for round_ in range(20):
        child = run_python(CRASH_LOOP, root, allocation, round_)
        try:
            assert child.stdout.readline() == "ready\n", child.stderr.read()
            time.sleep(rng.uniform(0.0, 0.08))  # let it run for a random while
        finally:
            child.kill()
            child.communicate(timeout=60)
        assert child.returncode == -signal.SIGKILL, f"round {round_}: the loop stopped by itself"

        cache = Cache(root, allocation)  # plain open: recovery alone restores the invariants
        assert_consistent(cache)
        assert cache.usage().used <= allocation
        seen_entries += cache.usage().count
        cache.close()
    assert seen_entries > 0  # the children did add entries before being killed


# -- reconcile ------------------------------------------------------------------------------------

NOTHING_REPAIRED = {"dropped_rows": 0, "orphan_files": 0, "rebuilt_index": None}


def test_reconcile_repairs_missing_files_and_orphans(root: Path) -> None:
    cache = Cache(root)
    put(cache, "missing", 10).path.unlink()
    _truncate(put(cache, "truncated", 10).path)
    intact = put(cache, "intact", 10)
    for name in ("stray-file", f"{key_digest('x')}.0123456789ab"):
        (cache.objects_dir / name).write_bytes(b"nobody's")
    journaled = f"{key_digest('j')}.ba9876543210"
    (cache.objects_dir / journaled).write_bytes(b"journaled")
    add_journal_row(cache, journaled, "j")  # recovery's to unlink, not counted as an orphan

    reconciled = cache.reconcile()
    assert reconciled.repaired == {"dropped_rows": 2, "orphan_files": 1, "rebuilt_index": None}
    assert [(c.key, c.path, c.size) for c in reconciled.kept] == [("intact", str(intact.path), 10)]

    # Only a file named as the cache names its files is an orphan of the cache's to delete.
    assert (cache.objects_dir / "stray-file").read_bytes() == b"nobody's"
    (cache.objects_dir / "stray-file").unlink()
    assert sizes(cache) == {"intact": 10}
    assert cache.get("intact") == intact
    assert_consistent(cache)
    assert cache.reconcile().repaired == NOTHING_REPAIRED


def test_reconcile_of_a_healthy_cache_changes_nothing(root: Path) -> None:
    cache = Cache(root, 1000)
    put(cache, "a", 10)
    put(cache, "b", 20, persist=True)
    before = snapshot(cache)
    assert cache.reconcile().repaired == NOTHING_REPAIRED
    assert snapshot(cache) == before


def test_reconcile_counts_no_row_dropped_for_an_entry_replaced_meanwhile(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process replaces an entry between reconcile's listing and its look at the
    file: the old file is gone, but its row had moved on; nothing was dropped, and the new
    copy stays."""
    cache, other = Cache(root), Cache(root)
    old = put(cache, "k", 10)
    real_stat = os.stat
    replaced: list[CacheEntry] = []

    def stat_after_a_replacement(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path) == str(old.path) and not replaced:
            replaced.append(put(other, "k", 20))  # unlinks the old file once committed
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_after_a_replacement)
    reconciled = cache.reconcile()
    monkeypatch.undo()

    assert replaced and not old.path.exists()
    assert reconciled.repaired == NOTHING_REPAIRED
    assert cache.get("k") == replaced[0]
    assert_consistent(cache)


def test_a_write_left_open_by_an_interrupted_call_is_rolled_back_at_next_use(root: Path) -> None:
    """Ctrl-C between two statements of a write can leave this thread's connection inside
    its transaction, holding the index's write lock: the next use of the cache rolls it back,
    so that this thread can write again and other processes are not kept waiting."""
    cache = Cache(root)
    put(cache, "k", 10)
    left_open = cache._db()
    left_open.execute("BEGIN IMMEDIATE")  # what the interrupted write left
    left_open.execute("UPDATE totals SET count = count + 100")  # never committed

    assert cache.get("k") is not None  # a read: the next use
    other = sqlite3.connect(cache.index_path, timeout=0.5)  # as another process
    try:
        other.execute("BEGIN IMMEDIATE")  # before: 'database is locked'
        other.execute("ROLLBACK")
    finally:
        other.close()
    put(cache, "j", 10)  # before: 'cannot start a transaction within a transaction'
    assert cache.usage().count == 2
    assert_consistent(cache)


# -- key_lock -------------------------------------------------------------------------------------


def test_key_lock_is_reentrant_in_one_thread(root: Path) -> None:
    cache = Cache(root)
    sibling = key_on_stripe("k", same=True)
    with cache.key_lock("k") as outer:
        with cache.key_lock("k") as inner, cache.key_lock("k", blocking=False) as again:
            assert (outer, inner, again) == (True, True, True)
        with cache.key_lock(sibling, blocking=False) as same_stripe:
            assert same_stripe is True
        entry = put(cache, "k", 10)  # add takes the lock it already holds
        assert cache.remove("k")
    assert not entry.path.exists()
    assert_consistent(cache)


def test_key_lock_excludes_other_processes(root: Path) -> None:
    cache = Cache(root)
    with cache.key_lock("k"):
        assert finish(run_python(TRY_LOCK, root, "k")) == "False\n"
        assert finish(run_python(TRY_LOCK, root, key_on_stripe("k", same=True))) == "False\n"
        assert finish(run_python(TRY_LOCK, root, key_on_stripe("k", same=False))) == "True\n"
    assert finish(run_python(TRY_LOCK, root, "k")) == "True\n"  # released on exit


def test_key_lock_non_blocking_is_false_while_another_process_holds_it(root: Path) -> None:
    cache = Cache(root)
    holder = run_python(HOLD_LOCK, root, "k", stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n"
        with cache.key_lock("k", blocking=False) as got:
            assert got is False
        with cache.key_lock(key_on_stripe("k", same=False), blocking=False) as other:
            assert other is True
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
    finish(holder)
    with cache.key_lock("k", blocking=False) as got:
        assert got is True


def test_key_lock_excludes_other_threads(root: Path) -> None:
    cache = Cache(root)
    events: list[str] = []
    holding, release = threading.Event(), threading.Event()
    results: dict[str, bool] = {}

    def holder() -> None:
        with cache.key_lock("k"):
            holding.set()
            release.wait(30)
            events.append("released")

    def waiter() -> None:
        with cache.key_lock("k") as got:
            events.append("acquired")
            results["blocking"] = got

    first = threading.Thread(target=holder)
    first.start()
    assert holding.wait(30)
    with cache.key_lock("k", blocking=False) as got:
        assert got is False
    second = threading.Thread(target=waiter)
    second.start()
    release.set()
    first.join(30)
    second.join(30)
    assert events == ["released", "acquired"]
    assert results == {"blocking": True}


# -- several processes and threads ----------------------------------------------------------------


WORKER = """
    import hashlib, os, random, sys, time
    from pathlib import Path
    from daman.cache import Cache

    root, go = sys.argv[1], Path(sys.argv[5])
    allocation, seed, iterations = map(int, sys.argv[2:5])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.002)
    cache = Cache(root, allocation)  # the folder may not exist yet: opened concurrently
    rng = random.Random(seed)
    added = verified = 0
    for _ in range(iterations):
        key = f"shared/{rng.randrange(10)}"
        action = rng.random()
        if action < 0.5:
            data = os.urandom(rng.randrange(1, 6000))
            with cache.temp_file() as tmp:
                tmp.write_bytes(data)
                digest = hashlib.sha256(data).hexdigest()
                entry = cache.add(
                    key, tmp, etag=str(seed), sha256=digest, persist=rng.random() < 0.1
                )
            if entry is not None:
                added += 1
        elif action < 0.65:
            cache.remove(key)
        elif action < 0.75:
            cache.set_persist(key, False)
        else:
            with cache.key_lock(key):  # no add or remove of this key meanwhile
                entry = cache.get(key)
                if entry is not None:
                    try:
                        data = entry.path.read_bytes()
                    except FileNotFoundError:
                        data = None  # evicted by another process's add: allowed
                    if data is not None:
                        assert len(data) == entry.size, (len(data), entry)
                        assert hashlib.sha256(data).hexdigest() == entry.sha256, entry
                        verified += 1
        used = cache.usage().used
        assert used <= allocation, (used, allocation)
    print(added, verified, flush=True)
"""


def test_processes_sharing_one_folder(tmp_path: Path, root: Path) -> None:
    allocation, go = 20_000, tmp_path / "go"
    workers = [run_python(WORKER, root, allocation, seed, 150, go) for seed in range(4)]
    try:
        for worker in workers:
            assert worker.stdout.readline() == "ready\n", worker.stderr.read()
        go.touch()
        counts = [tuple(map(int, finish(worker).split())) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert sum(added for added, _ in counts) > 100
    assert sum(verified for _, verified in counts) > 0

    cache = Cache(root, allocation)
    assert_consistent(cache)
    assert cache.usage().used <= allocation
    for entry in cache.entries():
        assert sha256_of(entry.path) == entry.sha256


def test_threads_sharing_one_cache(root: Path) -> None:
    cache = Cache(root, 8_000)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(80):
                key = f"t/{rng.randrange(8)}"
                action = rng.random()
                if action < 0.6:
                    tmp = make_file(cache, rng.randrange(1, 3000))
                    if cache.add(key, tmp, etag="e", sha256=sha256_of(tmp)) is None:
                        tmp.unlink()
                elif action < 0.75:
                    cache.remove(key)
                else:
                    cache.get(key)
                assert cache.usage().used <= 8_000
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert cache.usage().count > 0
    assert_consistent(cache)


# -- one write transaction per add, hits without a write lock (issue 13) -------------------------


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The write transactions the cache opens from now on (one item each)."""
    opened: list[int] = []
    real = Cache._write

    def counted(self: Cache):  # type: ignore[no-untyped-def]
        opened.append(1)
        return real(self)

    monkeypatch.setattr(Cache, "_write", counted)
    return opened


@pytest.mark.parametrize("source", ["temp_file", "another file"])
def test_an_add_is_one_write_transaction(root: Path, writes: list[int], source: str) -> None:
    """The new file is marked in tmp/ (a link to its key's held lock; not a journal row
    committed in a transaction of its own) before it is renamed into objects/."""
    cache = Cache(root, 10_000)
    put(cache, "old", 100)
    writes.clear()
    if source == "temp_file":
        with cache.temp_file() as tmp:
            tmp.write_bytes(os.urandom(100))
            assert cache.add("k", tmp, etag="e", sha256=sha256_of(tmp)) is not None
    else:
        put(cache, "k", 100)
    assert len(writes) == 1
    assert sorted(path.name for path in cache.tmp_dir.iterdir()) == []
    assert_consistent(cache)


def _crashed_add(cache: Cache, key: str, *, committed: bool) -> tuple[Path, Path]:
    """What an add killed between its rename into objects/ and its commit leaves (or, when
    ``committed``, killed after the commit but before its mark was removed)."""
    file = f"{key_digest(key)}.{os.urandom(6).hex()}"
    final = cache.objects_dir / file
    final.write_bytes(b"x" * 100)
    marker = cache.tmp_dir / f"{file}.adding"
    marker.touch()
    if committed:
        cache._db().execute(
            "INSERT INTO entries (key, file, size, etag, sha256, created, accessed, persist, "
            "store) VALUES (?, ?, 100, 'e', 's', 0, 1, 0, '')",
            (key, file),
        )
    return final, marker


@pytest.mark.parametrize("committed", [False, True])
def test_an_add_killed_around_its_commit_is_recovered_through_its_mark(
    root: Path, committed: bool
) -> None:
    cache = Cache(root, 10_000)
    final, marker = _crashed_add(cache, "k", committed=committed)
    cache.close()
    again = Cache(root, 10_000)  # recovery on open: tmp/ is read, objects/ is not scanned
    assert not marker.exists()
    assert final.exists() == committed
    assert sizes(again) == ({"k": 100} if committed else {})
    assert_consistent(again)


def test_a_file_just_added_is_never_taken_for_a_mapped_one(root: Path) -> None:
    """Once its row is committed, nothing but a mapping locks an added file: another process
    replacing or evicting the key at once forgets it outright, rather than keeping it as an
    older version still mapped (which counted it until some process's next recovery)."""
    other = Cache(root, 10_000)
    seen: list[bool] = []

    class Watched(Cache):
        def _unlink_journaled(self, files: list[str]) -> None:  # right after add's commit
            for entry in other.entries():
                seen.append(other._claim(entry.path.name))
                other._release_claim(entry.path.name)
            super()._unlink_journaled(files)

    cache = Watched(root, 10_000)
    with cache.temp_file() as tmp:
        tmp.write_bytes(os.urandom(100))
        assert cache.add("k", tmp, etag="e", sha256=sha256_of(tmp)) is not None
    assert seen == [True]
    put(other, "k", 100)  # replaced by the other process: no version kept as mapped
    assert other._query("SELECT COUNT(*) FROM retired") == [(0,)]
    assert_consistent(other)


HOLD_MARK = """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_the_mark_of_an_add_in_progress_is_left_alone(root: Path) -> None:
    """An add in another process holds its mark locked: neither recovery nor reconcile
    touches its file, though no row or journal names it yet."""
    cache = Cache(root, 10_000)
    final, marker = _crashed_add(cache, "k", committed=False)
    holder = run_python(HOLD_MARK, marker, stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n"
        Cache(root, 10_000).close()
        cache.reconcile()
        assert final.exists() and marker.exists()
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
    finish(holder)
    cache.recover()  # the add is over (its process gone): now its file is an orphan
    assert not final.exists() and not marker.exists()
    assert_consistent(cache)


def _locked_elsewhere(path: Path) -> bool:
    """Whether another holder has ``path`` flock-ed (asked through a new descriptor)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _stripe_path(cache: Cache, key: str) -> Path:
    """``locks/<stripe>.lock`` of ``key``, as the cache names it."""
    return cache._stripe_file(cache_module._stripe(key))


class _MarkWatched(Cache):
    """Looks at ``tmp/`` from inside an add's transaction, once its mark is made."""

    seen: list[tuple[Path, os.stat_result, bool]]

    def _evict(self, db: sqlite3.Connection, need: int, exclude: tuple[str, str], **kw):  # type: ignore[no-untyped-def]
        for marker in self.tmp_dir.glob("*.adding"):  # not when opening: no add then
            self.seen.append((marker, marker.stat(), _locked_elsewhere(marker)))
        return super()._evict(db, need, exclude, **kw)


def test_an_adds_mark_is_a_second_name_of_its_keys_lock(root: Path, writes: list[int]) -> None:
    """The mark creates no file (creating one costs up to 200 us in some folders): it is a
    hard link to the key's lock stripe, locked as long as the add holds the key, and gone
    (the stripe's own name alone again) once the add is over."""
    cache = _MarkWatched(root, 10_000)
    cache.seen = []
    writes.clear()
    put(cache, "k", 100)
    ((marker, seen, locked),) = cache.seen
    stripe = _stripe_path(cache, "k")
    assert marker.name.endswith(".adding") and locked
    assert (seen.st_ino, seen.st_dev) == (stripe.stat().st_ino, stripe.stat().st_dev)
    assert len(writes) == 1 and stripe.stat().st_nlink == 1
    assert sorted(path.name for path in cache.tmp_dir.iterdir()) == []
    assert_consistent(cache)


def test_where_hard_links_are_refused_the_mark_is_a_file_of_its_own(
    root: Path, writes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without hard links (some FUSE and network ones): the add makes its
    mark as a small locked file, still in one write transaction."""

    def refused(src: object, dst: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    cache = _MarkWatched(root, 10_000)
    cache.seen = []
    monkeypatch.setattr(os, "link", refused)
    writes.clear()
    put(cache, "k", 100)
    ((marker, seen, locked),) = cache.seen
    stripe = _stripe_path(cache, "k")
    assert marker.name.endswith(".adding") and locked and seen.st_ino != stripe.stat().st_ino
    assert len(writes) == 1
    assert sorted(path.name for path in cache.tmp_dir.iterdir()) == []
    assert_consistent(cache)


ADD_HELD_INSIDE = """
    import os, sys
    from pathlib import Path
    from daman.cache import Cache

    class Held(Cache):
        def _temp_lock(self, tmp, *, held):  # renamed into objects/, not yet committed
            super()._temp_lock(tmp, held=held)
            if not held:
                print("inside", flush=True)
                sys.stdin.readline()  # killed here

    cache = Held(Path(sys.argv[1]), 10_000)
    with cache.temp_file() as tmp:
        tmp.write_bytes(b"x" * 100)
        cache.add("k", tmp, etag="e", sha256="s")
"""


def test_an_add_killed_with_its_linked_mark_is_recovered(root: Path) -> None:
    """While the add's process lives, its mark (the key's stripe, which it holds) keeps
    recovery away; once it is killed, recovery removes the mark's name and the file it was
    adding, and leaves the stripe's own name."""
    here = Cache(root, 10_000)
    child = run_python(ADD_HELD_INSIDE, root, stdin=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == "inside\n"
        (marker,) = (root / "tmp").glob("*.adding")
        added = root / "objects" / marker.name.removesuffix(".adding")
        assert added.exists()
        here.recover()  # the add is in progress (its transaction open: no new Cache now)
        assert marker.exists() and added.exists()
    finally:
        child.kill()
        child.communicate()
    cache = Cache(root, 10_000)
    stripe = _stripe_path(cache, "k")
    assert not marker.exists() and not added.exists()
    assert stripe.exists() and stripe.stat().st_nlink == 1
    assert cache.get("k") is None
    assert_consistent(cache)


def _crashed_linked_add(cache: Cache, key: str) -> tuple[Path, Path, Path]:
    """What an add killed between its rename and its commit leaves, its mark a link to the
    key's stripe; returns the added file, the mark and the stripe."""
    final, marker = _crashed_add(cache, key, committed=False)
    stripe = _stripe_path(cache, key)
    with cache.key_lock(key):
        pass  # the stripe's file exists
    marker.unlink()
    os.link(stripe, marker)
    return final, marker, stripe


def test_a_dead_adds_mark_waits_while_its_stripe_is_busy_with_another_key(root: Path) -> None:
    """The mark's lock is its key's stripe, so recovery cannot tell a dead add from a live one
    while another process holds the stripe (for another key of it): it leaves the mark and
    the uncommitted file to a later open, which removes them once the stripe is free."""
    cache = Cache(root, 10_000)
    final, marker, stripe = _crashed_linked_add(cache, "k")
    cache.close()
    holder = run_python(HOLD_MARK, stripe, stdin=subprocess.PIPE)  # a pull of another key
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        Cache(root, 10_000).close()
        assert marker.exists() and final.exists()
    finally:
        holder.stdin.write("\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]
    finish(holder)
    again = Cache(root, 10_000)
    assert not marker.exists() and not final.exists()
    assert_consistent(again)


@pytest.mark.parametrize("moment", ["holding", "letting-go"])
def test_a_child_forked_while_recovery_holds_a_mark_does_not_keep_its_stripe(
    root: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """Recovery takes a dead add's mark, which is its key's stripe; a process forked while
    it holds it, or as it lets it go (a worker pool started by another thread), must not
    keep the stripe locked, and with it every key of the stripe, for as long as it lives."""
    cache = Cache(root, 10_000)
    final, marker, stripe = _crashed_linked_add(cache, "k")
    children: list[int] = []
    started, ready = os.pipe()
    real_unlink = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path == marker and not children:  # recovery holds the mark's lock now
            pid = os.fork()
            if pid == 0:  # the fork's handlers have run: the child is as it will stay
                os.write(ready, b"!")
                time.sleep(30)
                os._exit(0)
            children.append(pid)
        real_unlink(path, missing_ok=missing_ok)

    real_untrack = forksafe.untrack_fd

    def untrack_fd(fd: int) -> None:  # the descriptor's last moment, before its close
        real_untrack(fd)
        unlink(marker, missing_ok=True)

    if moment == "holding":
        monkeypatch.setattr(Path, "unlink", unlink)
    else:
        monkeypatch.setattr(forksafe, "untrack_fd", untrack_fd)
    try:
        cache.recover()
        assert children and not marker.exists() and not final.exists()
        assert os.read(started, 1) == b"!"
        assert not _locked_elsewhere(stripe)  # the child lives on, without the stripe
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(started)
        os.close(ready)
    assert_consistent(cache)


def _accessed(root: Path) -> dict[str, int]:
    """The index's order of use, as another process reads it."""
    import sqlite3

    db = sqlite3.connect(root / "index.sqlite3")
    try:
        return dict(db.execute("SELECT key, accessed FROM entries").fetchall())
    finally:
        db.close()


def test_hits_take_no_write_lock_and_are_written_before_this_process_evicts(
    root: Path, writes: list[int]
) -> None:
    cache = Cache(root, 300)
    for key in "abc":
        put(cache, key, 100)
    before = _accessed(root)
    writes.clear()
    cache.touch("a")
    cache.touch("a")
    assert writes == [] and _accessed(root) == before  # kept in memory
    put(cache, "d", 100)  # the add's transaction writes the hit first, then evicts b
    assert sorted(sizes(cache)) == ["a", "c", "d"]
    assert len(writes) == 2  # the add (the hit in it), then the evicted file's journal row
    assert_consistent(cache)


def test_hits_are_written_after_a_batch_after_a_while_and_at_close(
    root: Path, writes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(root)
    for key in ("a", "b"):
        put(cache, key, 10)
    writes.clear()
    for _ in range(cache_module.TOUCH_BATCH - 1):
        cache.touch("a")
    assert writes == []
    cache.touch("b")  # the batch is full: one write for all of them
    assert len(writes) == 1 and _accessed(root)["b"] > _accessed(root)["a"]

    monkeypatch.setattr(cache_module, "TOUCH_SECONDS", 0.05)
    cache.touch("a")  # a timer writes it soon, with nothing else happening here
    deadline = time.monotonic() + 30
    while _accessed(root)["a"] < _accessed(root)["b"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _accessed(root)["a"] > _accessed(root)["b"]

    monkeypatch.setattr(cache_module, "TOUCH_SECONDS", 3600)
    cache.touch("b")
    assert _accessed(root)["a"] > _accessed(root)["b"]
    cache.close()
    assert _accessed(root)["b"] > _accessed(root)["a"]


TOUCH_AND_EXIT = """
    import sys
    from daman.cache import Cache
    Cache(sys.argv[1]).touch(sys.argv[2])  # never closed: the exit writes it
"""


def test_hits_are_written_when_the_process_exits(root: Path) -> None:
    cache = Cache(root)
    for key in ("a", "b"):
        put(cache, key, 10)
    cache.close()
    finish(run_python(TOUCH_AND_EXIT, root, "a"))
    assert [entry.key for entry in Cache(root).entries()] == ["a", "b"]


def test_a_forked_child_leaves_its_parents_hits_to_the_parent(root: Path) -> None:
    import multiprocessing

    cache = Cache(root)
    for key in ("a", "b", "c"):
        put(cache, key, 10)
    cache.touch("a")  # the parent's hit, not written yet

    def child() -> None:
        assert cache._uses == {}
        cache.touch("b")
        cache.close()  # writes the child's own hit only

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == 0
    order = _accessed(root)
    assert order["b"] > order["c"] > order["a"]  # the child's hit is in; the parent's is not
    cache.close()
    assert _accessed(root)["a"] > _accessed(root)["b"]


def test_states_under_a_prefix(root: Path) -> None:
    cache = Cache(root)
    keys = ["a", "a/b", "a/c/d", "a0", "ab", "b", "\U0010ffff/x", "\U0010ffff", "\ud7ff", "\ue000"]
    for key in keys:
        put(cache, key, 1, persist=key == "a/b")
    for prefix in ["", "a", "a/", "a/c", "b", "c", "\U0010ffff", "\U0010ffff/", "\ud7ff"]:
        found = cache.states_under(prefix)
        assert sorted(found) == sorted(key for key in keys if key.startswith(prefix)), prefix
    assert cache.states_under("a/")["a/b"].persist and not cache.states_under("a/")["a/c/d"].persist


# -- upgrading an index made by the previous release -------------------------------------------


def release_schema(version: int) -> list[str]:
    """The index of a release before versions: one entry per key; ``SCHEMA_VERSION`` 3 (the
    release before this one) names each entry's store, 2 does not."""
    store = ", store TEXT NOT NULL DEFAULT ''" if version == 3 else ""
    return [
        f"""CREATE TABLE entries (
            key TEXT PRIMARY KEY, file TEXT NOT NULL, size INTEGER NOT NULL,
            etag TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL,
            accessed INTEGER NOT NULL, persist INTEGER NOT NULL DEFAULT 0{store})""",
        "CREATE INDEX entries_lru ON entries (persist, accessed)",
        "CREATE TABLE journal (file TEXT PRIMARY KEY, key TEXT NOT NULL)",
        """CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), size INTEGER NOT NULL,
            count INTEGER NOT NULL, seq INTEGER NOT NULL DEFAULT 0)""",
        "INSERT INTO totals (id, size, count) VALUES (0, 0, 0)",
        """CREATE TRIGGER entries_insert AFTER INSERT ON entries BEGIN
            UPDATE totals SET size = size + NEW.size, count = count + 1; END""",
        """CREATE TRIGGER entries_delete AFTER DELETE ON entries BEGIN
            UPDATE totals SET size = size - OLD.size, count = count - 1; END""",
        """CREATE TRIGGER entries_resize AFTER UPDATE OF size ON entries BEGIN
            UPDATE totals SET size = size - OLD.size + NEW.size; END""",
        "CREATE TABLE retired (file TEXT PRIMARY KEY, key TEXT NOT NULL, size INTEGER NOT NULL)",
        """CREATE TRIGGER retired_insert AFTER INSERT ON retired BEGIN
            UPDATE totals SET size = size + NEW.size; END""",
        """CREATE TRIGGER retired_delete AFTER DELETE ON retired BEGIN
            UPDATE totals SET size = size - OLD.size; END""",
        f"PRAGMA user_version = {version}",
    ]


def as_an_older_schema(root: Path, version: int, *, without: str = "") -> None:
    """Make the index at ``root`` look as a release with schema ``version`` left it: its
    ``user_version``, and without the entries' column ``without`` (one added since)."""
    db = sqlite3.connect(root / "index.sqlite3")
    if without:
        db.execute(f"ALTER TABLE entries DROP COLUMN {without}")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()


def test_an_index_before_whole_file_hashes_gets_them_for_new_copies(root: Path) -> None:
    """Schema 4 had no ``file_sha256``: opening adds the column, its rows keep '' (verify
    parses their footers) and each new copy gets its hash. A release before it, opening the
    index later, sets ``user_version`` back: the upgrade looks at the columns, not at it."""
    cache = Cache(root)
    put(cache, "old", 10)
    cache.close()
    as_an_older_schema(root, 4, without="file_sha256")
    for _ in range(2):
        cache = Cache(root)
        assert cache._query("PRAGMA user_version") == [(cache_module.SCHEMA_VERSION,)]
        assert [c.file_sha256 for c in cache.copies_of("old")] == [""]
        cache.close()
        as_an_older_schema(root, 4)  # as the older release's open leaves it
    cache = Cache(root)
    new = put(cache, "new", 10)
    (copy,) = cache.copies_of("new")
    assert copy.file_sha256 == hashlib.sha256(new.path.read_bytes()).hexdigest()
    assert sizes(cache) == {"old": 10, "new": 10}
    assert_consistent(cache)


def test_an_index_rebuilt_by_an_older_build_is_upgraded_by_a_process_that_follows_it(
    root: Path,
) -> None:
    """A process that had the index open follows a rebuilt one; an older build rebuilds it
    with its own tables (no ``file_sha256``): the follower upgrades them before using them."""
    cache, older = Cache(root), Cache(root)
    _put_object(cache, "a", 10)  # a daman object: the rebuild reads its key
    with older._rebuilding(exclusive=True):  # as rebuild() does once it found damage
        assert older._rebuild(announce=False) == 1
    as_an_older_schema(root, 4, without="file_sha256")  # as the older build made it
    put(cache, "b", 10)
    assert [c.file_sha256 for c in cache.copies_of("a")] == [""]  # rebuilt: no hash
    assert len(cache.copies_of("b")[0].file_sha256) == 64
    assert sorted(c.key for c in cache.reconcile().kept) == ["a", "b"]
    assert_consistent(cache)


def test_only_files_up_to_whole_hash_bytes_get_a_whole_file_hash(root: Path) -> None:
    cache = Cache(root)
    put(cache, "small", cache_module.WHOLE_HASH_BYTES)
    put(cache, "large", cache_module.WHOLE_HASH_BYTES + 1)
    assert [len(c.file_sha256) for c in cache.copies_of("small")] == [64]
    assert [c.file_sha256 for c in cache.copies_of("large")] == [""]


@pytest.mark.parametrize("release", [3, 2])
def test_an_index_of_a_release_before_versions_keeps_its_entries_pins_and_order(
    root: Path, release: int
) -> None:
    (root / "objects").mkdir(parents=True)
    db = sqlite3.connect(root / "index.sqlite3")
    for statement in release_schema(release):
        db.execute(statement)
    for use, (key, persist) in enumerate([("b", 1), ("a", 0), ("c", 0)], start=1):
        file = f"{key_digest(key)}.{'0' * 12}"
        (root / "objects" / file).write_bytes(b"x" * 1000)
        columns = "key, file, size, etag, sha256, created, accessed, persist"
        values = [key, file, 1000, f"etag-{key}", "sha", 1.7e9, use, persist]
        if release == 3:
            columns, values = columns + ", store", [*values, "s3://team/"]
        marks = ", ".join("?" * len(values))
        db.execute(f"INSERT INTO entries ({columns}) VALUES ({marks})", values)
    db.execute("UPDATE totals SET seq = 3")
    db.commit()
    db.close()

    cache = Cache(root, 5000, store="s3://team/")
    assert cache._query("PRAGMA user_version") == [(cache_module.SCHEMA_VERSION,)]
    assert cache_module.SCHEMA_VERSION == 5
    entries = cache.entries()
    assert [(e.key, e.version) for e in entries] == [("c", ""), ("a", ""), ("b", "")]  # LRU kept
    assert [e.key for e in entries if e.persist] == ["b"]  # pins kept
    assert {e.store for e in entries} == {"s3://team/"}  # (release 2: adopted by the opener)
    assert cache.get("a") is not None and cache.get("a").etag == "etag-a"
    assert cache.usage().used == 3000 and cache.usage().count == 3
    # A version by id is cached beside the current one; eviction takes the least used (b is
    # pinned: a goes), and the totals stay right.
    with cache.temp_file() as tmp:
        tmp.write_bytes(b"y" * 2500)
        cache.add("c", tmp, etag="v1", sha256="s", version="20261130T000000.000Z-1a2b3c4d")
    assert sorted((e.key, e.version) for e in cache.entries()) == [
        ("b", ""), ("c", ""), ("c", "20261130T000000.000Z-1a2b3c4d")
    ]  # fmt: skip
    assert cache.usage().used == 4500 and cache.usage().count == 3
    assert_consistent(cache)
    cache.close()
    again = Cache(root, 5000, store="s3://team/")  # opening it again changes nothing
    assert again.usage().used == 4500 and len(again.entries()) == 3


def test_the_index_needs_no_sqlite_newer_than_distributions_ship(root: Path) -> None:
    """Pythons on Debian 11, RHEL 8/9 and Ubuntu 20.04 link SQLite 3.26-3.34: every statement
    the cache runs (traced through a day's work) avoids RETURNING (3.35), UPDATE ... FROM
    (3.33), window functions (3.25), ->> (3.38) and STRICT tables (3.37)."""
    cache = Cache(root, allocated_space=5_000)
    statements: list[str] = []
    cache._db().set_trace_callback(statements.append)
    for i in range(8):
        put(cache, f"k/{i}", 1_000, persist=i == 0)
        cache.get(f"k/{i // 2}")
        cache.touch(f"k/{i // 2}")
    cache.set_persist("k/0", False)
    cache.flush_uses()
    cache.remove("k/7")
    cache.recover()
    cache.reconcile()
    assert len(statements) > 30
    newer = re.compile(
        r"\bRETURNING\b|^\s*UPDATE\b[^()]*\bFROM\b|\bOVER\s*\(|->>|\bSTRICT\b", re.I | re.S
    )
    assert [s for s in statements if newer.search(s)] == []


def test_an_index_from_before_entries_named_their_store_is_adopted_by_the_first_opener(
    root: Path,
) -> None:
    """Upgrading keeps every entry and pin: they go to the store the first handle serves
    (the one configured, most likely the one they came from); other stores see none."""
    cache = Cache(root, store="s3://team/")
    put(cache, "a", 100, persist=True)
    put(cache, "b", 200)
    cache.close()
    as_an_older_schema(root, 2, without="store")
    upgraded = Cache(root, store="s3://team/")
    assert sorted(upgraded.states(["a", "b"])) == ["a", "b"] and upgraded.get("a").persist
    assert {e.store for e in upgraded.entries()} == {"s3://team/"}
    other = Cache(root, store="gs://elsewhere/")
    assert other.get("a") is None and other.states_under("") == {}
    assert sorted(Cache(root).states_under("")) == ["a", "b"]  # a handle of no store: all
    assert other.usage().used == 300  # one allocation for the folder
    assert_consistent(upgraded)


EVICT_MANY = """
import resource, sys
from pathlib import Path
from daman.cache import Cache

root, n = Path(sys.argv[1]), int(sys.argv[2])
cache = Cache(root, allocated_space=n * 100)
for i in range(n):
    with cache.temp_file() as tmp:
        tmp.write_bytes(b"x" * 100)
        cache.add(f"small/{i}", tmp, etag="e", sha256="-")
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))  # as low as some systems are
with cache.temp_file() as tmp:  # room for it only once two thirds of the others are gone
    tmp.write_bytes(b"y" * (n * 100 * 2 // 3))
    assert cache.add("large", tmp, etag="e", sha256="-") is not None
left = cache.usage().count - 1
assert cache.clear() > 0 and cache.usage().count == 0
print(left)
"""


def test_evicting_and_clearing_thousands_of_entries_under_a_low_open_file_limit(
    root: Path,
) -> None:
    """Each file a transaction forgets stays open (locked) until it is unlinked: a large add
    that evicts 1,000 small entries, and a clear of the rest, work in bounded transactions
    with 128 files allowed open."""
    result = subprocess.run(
        [sys.executable, "-c", EVICT_MANY, str(root), "1500"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) <= 500
    cache = Cache(root)
    assert cache.usage().count == 0 and list(cache.objects_dir.iterdir()) == []
    assert_consistent(cache)


def _put_object(cache: Cache, key: str, nbytes: int) -> None:
    """A real daman object (a rebuild reads its key from the footer)."""
    from daman.serialize import dump_to_bytes

    with cache.temp_file() as tmp:
        tmp.write_bytes(dump_to_bytes(b"x" * nbytes, key=key))
        assert cache.add(key, tmp, etag=f"e-{key}", sha256=sha256_of(tmp)) is not None


def _garble_index(root: Path) -> None:
    """Every page but the first overwritten: the index opens, then every read fails."""
    index = root / "index.sqlite3"
    with open(index, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)


def _set_aside(root: Path) -> list[Path]:
    return [
        p for p in root.glob("index.sqlite3.damaged-*") if not p.name.endswith(("-wal", "-shm"))
    ]


def test_a_rebuilt_index_is_the_one_every_sharing_process_uses_afterwards(root: Path) -> None:
    """Handles that had the damaged index open follow the rebuilt one (they used to go on in
    the file set aside: two indexes, each enforcing the allocation on its own half)."""
    a, b = Cache(root, 20_000), Cache(root, 20_000)
    for i in range(3):
        _put_object(b, f"k{i}", 3000)
    a.close(), b.close()
    _garble_index(root)
    with pytest.raises(IndexDamagedError):
        b.entries()  # b's connection is open on the damaged file
    assert a.reconcile().repaired["rebuilt_index"] == 3
    _put_object(b, "k3", 3000)
    _put_object(a, "k4", 3000)
    assert sorted(e.key for e in a.entries()) == sorted(e.key for e in b.entries())
    assert sorted(e.key for e in b.entries()) == ["k0", "k1", "k2", "k3", "k4"]
    assert_consistent(a)
    assert len(_set_aside(root)) == 1


def test_two_processes_finding_one_damage_rebuild_the_index_once(root: Path) -> None:
    first = Cache(root)
    for i in range(3):
        _put_object(first, f"k{i}", 3000)
    first.close()
    _garble_index(root)
    damaged = (root / "index.sqlite3").read_bytes()
    caches = [Cache.__new__(Cache) for _ in range(2)]
    barrier = threading.Barrier(2)
    kept: list[int] = []

    def open_and_rebuild(cache: Cache) -> None:
        barrier.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RepairWarning)
            cache.__init__(root)  # finds the damage, rebuilds (or finds it rebuilt)
        kept.append(cache.usage().count)

    threads = [threading.Thread(target=open_and_rebuild, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert kept == [3, 3]
    (aside,) = _set_aside(root)  # one rebuild: the damaged file set aside, as it was
    assert aside.read_bytes() == damaged
    assert_consistent(caches[0])
