"""The manager's promises, on both backends (local folder and S3 over HTTP to moto)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from counting_store import CountingStore

import daman.serialize as ser
from daman import (
    Config,
    DamanError,
    IntegrityError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    LocalFileError,
    Manager,
    NotCachedError,
    NotCachedWarning,
    OfflineWarning,
    SerializationError,
    StorageNotFoundError,
    StoreUnavailableError,
    VersionMismatchWarning,
)
from daman.manager import PullAction, Remote, decide_pull
from daman.store import open_store


@pytest.fixture
def counting(config: Config):
    store = CountingStore(open_store(config))
    with Manager(config, store=store) as m:
        yield m, store


def other_machine(config: Config, tmp_path: Path, name: str = "other", **fields) -> Manager:
    """A second manager on the same store with its own local cache."""
    return Manager(config.replace(local_dir=str(tmp_path / name), **fields))


def temp_files(manager: Manager) -> list[Path]:
    return list(manager.cache.tmp_dir.iterdir())


# -- the pull decision -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cached_etag", "remote", "force", "action"),
    [
        (None, Remote.UNCHECKED, False, PullAction.DOWNLOAD),
        (None, Remote.UNCHECKED, True, PullAction.DOWNLOAD),
        ("e1", Remote.UNCHECKED, False, PullAction.USE_CACHE),
        ("e1", "e1", False, PullAction.USE_CACHE),
        ("e1", "e2", False, PullAction.DOWNLOAD),
        ("e1", "e1", True, PullAction.DOWNLOAD),
        ("e1", Remote.UNREACHABLE, False, PullAction.USE_CACHE_OFFLINE),
        ("e1", Remote.MISSING, False, PullAction.USE_CACHE_DELETED),
        ("e1", Remote.UNREACHABLE, True, PullAction.DOWNLOAD),
    ],
)
def test_decide_pull(cached_etag, remote, force, action) -> None:
    assert decide_pull(cached_etag=cached_etag, remote=remote, force=force) is action


# -- push / pull -------------------------------------------------------------------------------


def test_round_trip_with_meta(manager: Manager) -> None:
    obj = {"a": np.arange(100_000), "s": "text", "f": lambda x: 2 * x}
    manager.push(obj, "team/data/v1", meta={"source": "unit test"})
    back, meta = manager.pull("team/data/v1")
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["f"](2) == 4 and meta == {"source": "unit test"}
    assert temp_files(manager) == []


def test_multipart_sized_round_trip_through_a_fresh_cache(config: Config, tmp_path: Path):
    array = np.random.default_rng(1).random(3_000_000)  # 24 MB: multipart on S3
    with Manager(config) as first:
        first.push(array, "big", meta={"n": array.size})
    with other_machine(config, tmp_path) as second:
        back, meta = second.pull("big")
        np.testing.assert_array_equal(back, array)
        assert meta == {"n": array.size}
        assert second.cache.get("big") is not None


def test_push_keeps_a_cached_copy_and_pull_serves_it_with_one_head(counting) -> None:
    manager, store = counting
    manager.push([1, 2, 3], "k")
    assert manager.cache.get("k") is not None
    store.calls.clear()
    assert manager.pull("k") == ([1, 2, 3], None)
    assert store.calls == {"head": 1}


def test_check_current_off_serves_the_cache_without_asking_the_store(config: Config) -> None:
    store = CountingStore(open_store(config))
    with Manager(config.replace(check_current=False), store=store) as manager:
        manager.push("x", "k")
        store.calls.clear()
        assert manager.pull("k") == ("x", None)
        assert store.calls == {}


def test_pull_refreshes_a_copy_another_machine_replaced(config: Config, tmp_path: Path) -> None:
    with Manager(config) as alice, other_machine(config, tmp_path) as bob:
        alice.push("v1", "k")
        assert bob.pull("k")[0] == "v1"
        alice.push("v2", "k", meta="new", force=True)
        assert bob.pull("k") == ("v2", "new")
        assert bob.cache.get("k").etag == alice.cache.get("k").etag


def test_force_downloads_again(counting) -> None:
    manager, store = counting
    manager.push("x", "k")
    store.calls.clear()
    assert manager.pull("k", force=True)[0] == "x"
    assert store.calls["get"] == 1


def test_a_push_stored_but_not_kept_locally_is_a_success_with_a_warning(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the store holds the object the push has happened for everyone: a local cache
    that cannot take the copy (its disc full, its index locked) must not report a failure,
    which a retry would turn into KeyExistsError."""

    def full(*args: object, **kwargs: object) -> None:
        raise LocalFileError("no space left on the device holding local_dir. Free some space.")

    monkeypatch.setattr(manager.cache, "add", full)
    with pytest.warns(NotCachedWarning, match="was pushed, but not kept.*no space"):
        manager.push({"x": 1}, "k")
    monkeypatch.undo()
    assert manager.exists("k") and manager.cache.get("k") is None
    assert manager.pull("k")[0] == {"x": 1}
    assert temp_files(manager) == []


def test_push_existing_key_without_force_raises_and_keeps_the_original(manager: Manager) -> None:
    manager.push("original", "k")
    with pytest.raises(KeyExistsError, match="force=True"):
        manager.push("other", "k")
    assert manager.pull("k", force=True)[0] == "original"
    manager.push("other", "k", force=True)
    assert manager.pull("k")[0] == "other"


def test_pull_of_a_missing_key(manager: Manager) -> None:
    with pytest.raises(KeyNotFoundError) as info:
        manager.pull("nope")
    assert isinstance(info.value, KeyError) and "'nope'" in str(info.value)
    assert temp_files(manager) == []


@pytest.mark.parametrize("key", ["", "../x", "/etc/passwd", "a/../../x", "C:\\x"])
def test_invalid_keys_are_refused_everywhere(manager: Manager, key: str) -> None:
    for call in (
        lambda: manager.push(1, key),
        lambda: manager.pull(key),
        lambda: manager.delete(key),
        lambda: manager.info(key),
        lambda: manager.set_persist(key, True),
    ):
        with pytest.raises(InvalidKeyError):
            call()


def test_unpicklable_object_uploads_nothing(manager: Manager) -> None:
    with pytest.raises(SerializationError):
        manager.push([np.zeros(10_000), threading.Lock()], "k")
    assert not manager.exists("k")
    assert manager.cache.get("k") is None and temp_files(manager) == []


def test_unpicklable_meta_uploads_nothing(manager: Manager) -> None:
    with pytest.raises(SerializationError, match="meta"):
        manager.push(1, "k", meta=threading.Lock())
    assert not manager.exists("k") and temp_files(manager) == []


def test_two_machines_pushing_the_same_new_key_exactly_one_wins(config: Config, tmp_path: Path):
    for trial in range(5):
        key = f"race/{trial}"
        managers = [other_machine(config, tmp_path, f"m{i}") for i in range(2)]
        barrier = threading.Barrier(2)
        outcome: dict[int, str] = {}

        def push(i: int, managers=managers, key=key, barrier=barrier, outcome=outcome) -> None:
            barrier.wait()
            try:
                managers[i].push(f"from {i}", key)
                outcome[i] = "won"
            except KeyExistsError:
                outcome[i] = "lost"

        threads = [threading.Thread(target=push, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome.values()) == ["lost", "won"]
        winner = next(i for i, v in outcome.items() if v == "won")
        assert managers[1 - winner].pull(key)[0] == f"from {winner}"
        for m in managers:
            m.close()


# -- persist, memory_only, allocation -----------------------------------------------------------


def test_persist_pins_an_entry_against_eviction(make_config) -> None:
    with Manager(make_config(allocated_space=300_000)) as manager:
        manager.push(np.zeros(10_000), "pinned", persist=True)  # 80 KB
        for i in range(6):
            manager.push(np.zeros(10_000), f"other/{i}")
            assert manager.usage().used <= 300_000
        assert manager.cache.get("pinned").persist
        assert manager.cache.get("other/0") is None  # least recently used, evicted
        assert manager.cache.get("other/5") is not None


def test_lru_order_follows_pulls(make_config) -> None:
    with Manager(make_config(allocated_space=200_000)) as manager:  # room for two
        manager.push(np.zeros(10_000), "a")
        manager.push(np.zeros(10_000), "b")
        manager.pull("a")  # a is now more recent than b
        manager.push(np.zeros(10_000), "c")
        assert manager.cache.get("b") is None
        assert manager.cache.get("a") is not None and manager.cache.get("c") is not None


def test_pull_persist_pins_and_set_persist_unpins(manager: Manager) -> None:
    manager.push(1, "k")
    manager.pull("k", persist=True)
    assert manager.cache.get("k").persist
    assert [e.persist for e in manager.usage().entries] == [True]
    manager.set_persist("k", False)
    assert not manager.cache.get("k").persist
    with pytest.raises(KeyNotFoundError, match="local cache"):
        manager.set_persist("never-pulled", True)


def test_object_bigger_than_the_allocation_is_returned_but_not_cached(
    make_config, tmp_path: Path
) -> None:
    config = make_config(allocated_space="100KB")
    big = np.arange(50_000.0)  # 400 KB
    with Manager(config) as manager:
        with pytest.warns(NotCachedWarning, match="allocated_space"):
            manager.push(big, "big")
        assert manager.exists("big") and manager.cache.get("big") is None
    with other_machine(config, tmp_path) as other:
        with pytest.warns(NotCachedWarning):
            back, _ = other.pull("big")
        np.testing.assert_array_equal(back, big)
        assert other.usage().used == 0 and temp_files(other) == []


def test_persisted_entries_filling_the_allocation_block_caching_not_pulls(make_config):
    with Manager(make_config(allocated_space=200_000)) as manager:
        manager.push(np.zeros(20_000), "pinned", persist=True)  # 160 KB
        with pytest.warns(NotCachedWarning):
            manager.push(np.zeros(10_000), "x")
        with pytest.warns(NotCachedWarning):
            assert manager.pull("x", force=True)[0].shape == (10_000,)
        assert manager.cache.get("pinned") is not None
        assert manager.usage().used <= 200_000


def test_memory_only_keeps_no_copy_unless_one_exists(config: Config, tmp_path: Path) -> None:
    with Manager(config) as alice, other_machine(config, tmp_path) as bob:
        alice.push("v", "k")
        assert bob.pull("k", memory_only=True) == ("v", None)
        assert bob.cache.get("k") is None and temp_files(bob) == []
        bob.pull("k")
        assert bob.pull("k", memory_only=True) == ("v", None)
        assert bob.cache.get("k") is not None
        with pytest.raises(InvalidArgumentError):
            bob.pull("k", memory_only=True, persist=True)


# -- damaged data, offline ------------------------------------------------------------------------


def test_truncated_cache_file_is_fetched_again(manager: Manager) -> None:
    manager.push(np.arange(1000), "k")
    path = manager.cache.get("k").path
    path.write_bytes(path.read_bytes()[:-100])
    back, _ = manager.pull("k")
    np.testing.assert_array_equal(back, np.arange(1000))
    assert manager.cache.get("k").path.stat().st_size == manager.cache.get("k").size


def corrupt_stored_object(manager: Manager, key: str) -> None:
    """Replace the stored object by a new version with one bit flipped in its payload."""
    data = bytearray(ser.dump_to_bytes(np.arange(2000)))
    data[300] ^= 0x01
    src = manager.cache.tmp_dir / "corrupt.bin"
    src.write_bytes(bytes(data))
    manager.store.put(key, src, overwrite=True)
    src.unlink()


def test_corrupted_stored_object_is_never_unpickled_or_cached(manager: Manager) -> None:
    manager.push(np.arange(1000), "k")
    good = manager.cache.get("k")
    corrupt_stored_object(manager, "k")
    with pytest.raises(IntegrityError, match="checksum"):
        manager.pull("k")  # the cached copy is stale: the pull downloads, checks, refuses
    assert manager.cache.get("k") == good  # the good old copy is neither replaced nor lost
    manager.delete("k")
    with pytest.raises(IntegrityError, match="checksum"):
        manager.pull("k")
    assert manager.cache.get("k") is None
    assert temp_files(manager) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable(config: Config) -> Iterator[Callable[[], Config]]:
    """Takes the store offline: the same store and cache, seen through an endpoint where
    nothing listens (clouds) or with the store folder gone, as when a network drive is not
    mounted (local: put back afterwards)."""
    moved: list[Path] = []

    def go() -> Config:
        if config.service == "local":
            folder = Path(config.storage_name)
            moved.append(folder.rename(folder.with_name(folder.name + ".unmounted")))
            return config
        account = "/devstoreaccount1" if config.service == "azure" else ""  # Azurite's
        return config.replace(
            endpoint_url=f"http://127.0.0.1:{_closed_port()}{account}",
            connect_timeout=1,
            max_attempts=1,
        )

    yield go
    for away in moved:
        away.rename(Path(config.storage_name))


@pytest.mark.timeout(60)
def test_offline_pull_serves_the_cache_with_a_warning(
    config: Config, unreachable: Callable[[], Config]
) -> None:
    with Manager(config) as manager:
        manager.push({"a": 1}, "k")
    with Manager(unreachable()) as offline:
        with pytest.warns(OfflineWarning, match="unreachable"):
            assert offline.pull("k") == ({"a": 1}, None)
        with pytest.raises((StoreUnavailableError, StorageNotFoundError), match=r"mounted|reach"):
            offline.pull("not-cached")
        with pytest.raises((StoreUnavailableError, StorageNotFoundError)):
            offline.push(1, "new")
        assert temp_files(offline) == []
        with pytest.warns(OfflineWarning):
            assert offline.info("k").sha256 == offline.cache.get("k").sha256
        path = offline.cache.get("k").path  # damaged: no details from it, and it goes
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
        with pytest.raises((StoreUnavailableError, StorageNotFoundError)):
            offline.info("k")
        assert offline.cache.get("k") is None


def test_key_deleted_remotely_still_served_from_cache_with_a_warning(manager: Manager) -> None:
    manager.push(1, "k")
    manager.store.delete("k")
    with pytest.warns(OfflineWarning, match="no longer in the store"):
        assert manager.pull("k") == (1, None)


def test_version_mismatch_warns_on_pull_of_code(manager: Manager, monkeypatch) -> None:
    monkeypatch.setattr(ser.cloudpickle, "__version__", "0.1.0")
    manager.push(lambda x: x + 1, "code")
    manager.push({"plain": [1, 2]}, "data")
    monkeypatch.undo()
    with pytest.warns(VersionMismatchWarning, match="cloudpickle 0.1.0") as caught:
        function, _ = manager.pull("code", force=True)
    assert function(1) == 2
    assert caught[0].filename == __file__  # the user's line, not daman's internals
    assert manager.pull("data", force=True) == ({"plain": [1, 2]}, None)  # data: no warning


# -- delete, info, ls, exists, usage -------------------------------------------------------------


def test_delete_local_remote_and_missing(manager: Manager) -> None:
    manager.push(1, "k")
    manager.delete("k")  # local only
    assert manager.cache.get("k") is None and manager.exists("k")
    manager.pull("k")
    manager.delete("k", remote=True)
    assert manager.cache.get("k") is None and not manager.exists("k")
    with pytest.raises(KeyNotFoundError):
        manager.delete("k", remote=True)
    with pytest.raises(KeyNotFoundError, match="local cache"):
        manager.delete("k")
    with pytest.raises(InvalidArgumentError):
        manager.delete("k", local=False, remote=False)


def test_delete_local_of_an_uncached_stored_key_is_not_an_error(manager: Manager) -> None:
    manager.push(1, "k")
    manager.delete("k")
    manager.delete("k")  # nothing cached, but the key exists: nothing to do, no error
    assert manager.exists("k")
    with pytest.raises(KeyNotFoundError, match="local cache or"):
        manager.delete("never-existed")


def test_delete_remote_only_keeps_the_local_copy(manager: Manager) -> None:
    manager.push(1, "k")
    manager.delete("k", local=False, remote=True)
    assert manager.cache.get("k") is not None and not manager.exists("k")


def test_info_reads_only_the_tail(counting) -> None:
    manager, store = counting
    manager.push(np.zeros(1_000_000), "k", meta={"rows": 5})
    store.calls.clear()
    details = manager.info("k")
    assert store.calls == {"read_tail": 1}
    entry = manager.cache.get("k")
    assert details.meta == {"rows": 5}
    assert details.size == entry.size and details.sha256 == entry.sha256
    assert details.cached and not details.persist and "@" in details.pushed_by
    with pytest.raises(KeyNotFoundError):
        manager.info("missing")


def test_info_with_meta_larger_than_one_tail_read(manager: Manager) -> None:
    meta = {"blob": "m" * 200_000}
    manager.push(1, "k", meta=meta)
    assert manager.info("k").meta == meta


def test_ls_shows_sizes_and_cache_state(config: Config, tmp_path: Path) -> None:
    with Manager(config) as manager, other_machine(config, tmp_path) as other:
        manager.push(1, "a/x")
        manager.push(2, "a/y", persist=True)
        manager.push(3, "b")
        listing = manager.ls()
        assert [item.key for item in listing] == ["a/x", "a/y", "b"]
        assert [(i.cached, i.persist) for i in listing] == [
            (True, False),
            (True, True),
            (True, False),
        ]
        assert all(i.size > 0 for i in listing)
        assert [i.key for i in manager.ls("a/")] == ["a/x", "a/y"]
        assert [(i.key, i.cached) for i in other.ls("b")] == [("b", False)]
        assert manager.ls("zzz") == []


def test_exists(manager: Manager) -> None:
    assert not manager.exists("k")
    manager.push(1, "k")
    assert manager.exists("k")


def test_usage_matches_the_files_on_disc(make_config) -> None:
    with Manager(make_config(allocated_space="1MB")) as manager:
        for i in range(5):
            manager.push(np.zeros(i * 1000), f"k{i}")
        usage = manager.usage()
        on_disc = sum(p.stat().st_size for p in manager.cache.objects_dir.iterdir())
        assert usage.used == on_disc == manager.cache.usage().used
        assert usage.allocated == 1_000_000 and usage.free == 1_000_000 - on_disc
        assert "used of" in str(usage)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disc_while_pickling_is_a_daman_error(
    manager: Manager, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The temp file is /dev/full (every write fails with ENOSPC), reached through a link."""
    full = tmp_path / "full-disc"
    full.symlink_to("/dev/full")

    @contextlib.contextmanager
    def temp_on_a_full_disc():
        yield full

    monkeypatch.setattr(manager.cache, "temp_file", temp_on_a_full_disc)
    with pytest.raises(DamanError, match="no space left") as info:
        manager.push(np.zeros(1_000_000), "k")
    assert not isinstance(info.value, SerializationError)
    assert not manager.exists("k") and manager.cache.get("k") is None


def test_a_new_version_that_does_not_fit_drops_the_old_cached_one(make_config) -> None:
    with Manager(make_config(allocated_space=100_000, check_current=False)) as manager:
        manager.push(np.zeros(1000), "k")  # fits
        with pytest.warns(NotCachedWarning):
            manager.push(np.ones(50_000), "k", force=True)  # 400 KB: does not
        assert manager.cache.get("k") is None
        with pytest.warns(NotCachedWarning):
            assert manager.pull("k")[0].sum() == 50_000  # the new version, not a stale copy


def test_no_unexpected_warnings_on_the_happy_path(manager: Manager) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager.push(1, "k")
        manager.pull("k")
        manager.pull("k", force=True)


def test_fetch_caches_without_unpickling(config: Config, tmp_path: Path) -> None:
    with Manager(config) as alice, other_machine(config, tmp_path) as bob:
        alice.push(np.arange(10), "k", meta="m")
        entry = bob.fetch("k", persist=True)
        assert entry.persist and entry.path.exists()
        assert entry.sha256 == alice.cache.get("k").sha256
        assert bob.fetch("k") == bob.cache.get("k")
        with pytest.raises(KeyNotFoundError):
            bob.fetch("missing")


def test_fetch_of_an_object_that_cannot_fit_raises(make_config) -> None:
    from daman import NotCachedError

    with Manager(make_config(allocated_space=1000)) as manager:
        with pytest.warns(NotCachedWarning):
            manager.push(np.zeros(1000), "big")
        with pytest.warns(NotCachedWarning), pytest.raises(NotCachedError, match="does not fit"):
            manager.fetch("big")


def test_progress_bars_on_large_transfers_only(make_config, capsys) -> None:
    with Manager(make_config(progress=True)) as manager:
        manager.push(np.zeros(2_000_000), "big")  # 16 MB
        manager.push(1, "small")
        manager.pull("big", force=True)
    err = capsys.readouterr().err
    assert "push big" in err and "pull big" in err and "small" not in err
    with Manager(make_config(progress=False)) as manager:
        manager.pull("big", force=True)
    assert capsys.readouterr().err == ""


def test_local_delete_of_an_uncached_key_while_offline_does_not_claim_it_is_gone(
    config: Config, unreachable: Callable[[], Config]
) -> None:
    with Manager(config) as manager:
        manager.push(1, "k")
        manager.delete("k")
    with Manager(unreachable()) as offline, pytest.raises(KeyNotFoundError, match="not be checked"):
        offline.delete("k")


def test_a_pinned_copy_of_the_same_version_survives_a_forced_pull_that_does_not_fit(
    make_config, tmp_path: Path
) -> None:
    big = np.zeros(25_000)  # 200 KB
    with Manager(make_config(allocated_space=300_000)) as manager:
        manager.push(big, "k", persist=True)
    with Manager(make_config(allocated_space=100_000)) as smaller:  # the pin outlives it
        assert smaller.cache.get("k").persist
        with pytest.warns(NotCachedWarning):
            smaller.pull("k", force=True)
        assert smaller.cache.get("k") is not None and smaller.cache.get("k").persist


def test_an_uncached_pull_asks_the_store_once(config: Config, tmp_path: Path) -> None:
    with Manager(config) as alice:
        alice.push(np.zeros(2_000_000), "k")  # 16 MB: a progress bar wants its size first
    store = CountingStore(open_store(config))
    other = config.replace(local_dir=str(tmp_path / "other"), progress=True)
    with Manager(other, store=store) as bob:
        bob.pull("k")
    assert store.calls == {"get": 1}  # the size comes with the download, not from a HEAD


@pytest.mark.parametrize("backend", ["s3"])
def test_requests_sent_by_a_small_push_and_a_cached_pull(manager: Manager) -> None:
    sent: list[str] = []
    for client in (manager.store.client, manager.store._quick_client.get()):
        client.meta.events.register(
            "before-send.s3", lambda request, **_: sent.append(request.method)
        )
    manager.push({"small": 1}, "k")
    # whether the bucket keeps versions (asked once per store), then the key (conditional):
    # a new key's version is recorded when it is replaced
    assert sent == ["GET", "PUT"]
    sent.clear()
    manager.push({"small": 2}, "k", force=True)
    # this version's record, the replaced version's footer (no record), its record (from
    # the cached copy), then the key: a copy on S3's side
    assert sent == ["PUT", "GET", "PUT", "PUT"]
    sent.clear()
    manager.push({"small": 3}, "k", force=True)
    assert sent == ["PUT", "GET", "PUT"]  # the replaced version has its record
    sent.clear()
    manager.pull("k")
    assert sent == ["HEAD"]  # the current-check, nothing else


def test_push_file_round_trips_its_bytes_out_of_band(manager: Manager, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB: stored as an out-of-band buffer
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    manager.push_file(src, "files/blob", meta={"name": "blob.bin"})
    entry = manager.cache.get("files/blob")
    assert entry is not None and entry.size < len(data) + 4096  # the bytes once, not twice
    with open(entry.path, "rb") as f:
        footer = ser.StoredFile(f).footer
        assert len(footer.buffers) == 1 and footer.buffers[0][1] == len(data)
        f.seek(0)
        stream = f.read(footer.stream[1])
    assert b"daman" not in stream  # plain bytes when loaded: readable without daman
    obj, meta = manager.pull("files/blob", force=True)
    assert type(obj) is bytes and obj == data and meta == {"name": "blob.bin"}


def test_push_file_of_an_empty_file_and_of_a_missing_one(manager: Manager, tmp_path: Path):
    (tmp_path / "empty").write_bytes(b"")
    manager.push_file(tmp_path / "empty", "files/empty")
    assert manager.pull("files/empty", force=True) == (b"", None)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        manager.push_file(tmp_path / "nope", "files/nope")
    assert not manager.exists("files/nope")


def test_clear_frees_everything_but_persisted_entries(manager: Manager) -> None:
    manager.push(b"a" * 1000, "c/a")
    manager.push(b"b" * 2000, "c/b", persist=True)
    manager.push(b"c" * 3000, "c/c")
    before = manager.usage()
    freed = manager.clear()
    after = manager.usage()
    assert freed == before.used - after.used > 4000
    assert [e.key for e in after.entries] == ["c/b"] and after.persisted == after.entries
    assert after.store == manager.store.describe() and after.store
    assert manager.clear() == 0


def test_usage_names_the_store_as_it_does_without_opening_it(config) -> None:
    with Manager(config) as manager:
        named = manager.usage().store  # the store is not opened for usage()
        assert manager._store is None
        assert named and named == manager.store.describe()


def test_verify_finds_and_removes_damaged_copies(manager: Manager) -> None:
    for i in range(3):
        manager.push(np.arange(1000) + i, f"v/{i}")
    assert manager.verify().ok and manager.verify().checked == 3
    flipped = manager.cache.get("v/0")
    data = bytearray(flipped.path.read_bytes())
    data[200] ^= 0x10  # same size: only a hash can tell
    flipped.path.write_bytes(bytes(data))
    truncated = manager.cache.get("v/1").path
    truncated.write_bytes(truncated.read_bytes()[:-10])
    orphan = manager.cache.objects_dir / f"{'ab' * 32}.{'0' * 12}"  # named as the cache names
    orphan.write_bytes(b"x" * 10)
    (manager.cache.objects_dir / "stray.bin").write_bytes(b"x" * 10)  # not daman's: left alone

    single = manager.verify("v/0")
    assert single.damaged == ["v/0"] and single.checked == 1
    report = manager.verify()
    assert report.damaged == [] and report.dropped_rows == 1 and report.orphan_files == 1
    assert report.checked == 1 and not report.ok  # v/2 only
    assert [e.key for e in manager.cache.entries()] == ["v/2"]
    assert sorted(p.name for p in manager.cache.objects_dir.iterdir()) == sorted(
        [manager.cache.get("v/2").path.name, "stray.bin"]
    )
    for i in range(3):  # fetched again, intact
        np.testing.assert_array_equal(manager.pull(f"v/{i}")[0], np.arange(1000) + i)
    assert manager.verify().ok
    with pytest.raises(KeyNotFoundError):
        manager.verify("never/cached")


def test_verify_checks_large_copies_in_chunks_and_small_ones_in_one_read(
    manager: Manager,
) -> None:
    """Copies above 1 MiB are hashed in chunks, smaller ones from one read: both find a
    flipped byte anywhere in the payload, and one in the footer."""
    manager.push(np.arange(300_000, dtype=np.float64), "big")  # 2.4 MB
    manager.push(np.arange(100), "small")
    manager.push(np.arange(100) + 1, "footer")
    for key, where in (("big", -5_000), ("small", 150)):
        path = manager.cache.get(key).path
        data = bytearray(path.read_bytes())
        data[where] ^= 0x01
        path.write_bytes(bytes(data))
    path = manager.cache.get("footer").path
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"payload_size": ', b'"payload_size":-'))  # same size
    report = manager.verify()
    assert sorted(report.damaged) == ["big", "footer", "small"] and report.checked == 3
    assert manager.cache.entries() == []
    manager.push(np.arange(10), "grown", force=True)
    with open(manager.cache.get("grown").path, "ab") as f:
        f.write(b"JUNK")  # a file that grew: what it holds is not what was cached
    assert manager.verify("grown").damaged == ["grown"]


def _edit_footer(path: Path, field: str, value: str) -> None:
    """Give a footer's text field another value of the same length: the file still parses,
    its payload is intact, and only a hash of its footer can tell."""
    data = path.read_bytes()
    footer = ser.parse_footer(data, len(data))
    old = json.dumps({field: getattr(footer, field)})[1:-1].encode()
    new = json.dumps({field: value.ljust(len(getattr(footer, field)), "x")})[1:-1].encode()
    assert len(new) == len(old) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def test_verify_checks_every_byte_of_a_small_copy_its_footer_too(manager: Manager) -> None:
    """A small copy's sha256 of all its bytes is recorded when it is cached: verify() checks
    it with one read, and finds a footer altered in a way that still parses."""
    manager.push({"n": 1}, "k")
    manager.push({"n": 2}, "kept")
    copy = manager.cache.copies_of("k")[0]
    assert copy.file_sha256 == hashlib.sha256(Path(copy.path).read_bytes()).hexdigest()
    _edit_footer(Path(copy.path), "pushed_by", "mallory")
    report = manager.verify()
    assert report.damaged == ["k"] and report.checked == 2
    assert [c.key for c in manager.cache.reconcile().kept] == ["kept"]
    assert manager.pull("k")[0] == {"n": 1}  # fetched again


def test_a_whole_file_hash_is_trusted_only_for_the_file_it_names(manager: Manager) -> None:
    """A daman before whole-file hashes replaces a row's file and leaves the column as it
    was: that hash names the old file, and verify() checks the new one by its footer. A row
    without a hash (added before, or by a rebuilt index) is checked by its footer too."""
    manager.push({"n": 1}, "k")
    before = manager.cache._query("SELECT file_sha256 FROM entries WHERE key = 'k'")[0][0]
    manager.push({"n": 2}, "k", force=True)
    with manager.cache._write() as db:  # as the older daman's replacing add leaves it
        db.execute("UPDATE entries SET file_sha256 = ? WHERE key = 'k'", (before,))
    assert manager.cache.copies_of("k")[0].file_sha256 == ""
    assert manager.verify().ok and manager.pull("k")[0] == {"n": 2}
    path = Path(manager.cache.copies_of("k")[0].path)
    with manager.cache._write() as db:
        db.execute(
            "UPDATE entries SET file_sha256 = ? WHERE key = 'k'", (f"{path.name} {'0' * 64}",)
        )
    assert manager.verify().damaged == ["k"]  # a hash naming this file is the one checked
    manager.pull("k")
    with manager.cache._write() as db:
        db.execute("UPDATE entries SET file_sha256 = '' WHERE key = 'k'")
    path = Path(manager.cache.copies_of("k")[0].path)
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    path.write_bytes(bytes(data))
    assert manager.verify().damaged == ["k"]  # the footer's payload hash


def test_a_hit_reads_a_cached_files_footer_once_and_again_once_the_file_changed(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.push({"n": 1}, "k", meta="m")
    # (a local store reads a footer for its current-check: without it, the hits alone count)
    manager = Manager(manager.config.replace(check_current=False))
    parsed = []
    real = ser.parse_footer
    monkeypatch.setattr(ser, "parse_footer", lambda *a: parsed.append(1) or real(*a))
    for _ in range(3):
        assert manager.pull("k") == ({"n": 1}, "m")
    assert len(parsed) == 2  # the trailer, then the footer: once, for three hits
    path = manager.cache.get("k").path
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # damaged after it was read: another size
    assert manager.pull("k") == ({"n": 1}, "m")  # noticed, and fetched again
    assert manager.cache.get("k").path.read_bytes() == data
    manager.close()


def test_a_memory_only_pull_of_a_newer_version_evicts_nothing(make_config, tmp_path: Path) -> None:
    """An outdated copy is cached and a colleague pushed a larger version: a memory-only pull
    returns it, drops the outdated copy, and keeps the new one only if it fits in free space
    (never evicting the working set for it)."""
    config = make_config(allocated_space=30_000)
    with Manager(config) as me, Manager(config.replace(local_dir=str(tmp_path / "b"))) as bob:
        me.push(b"o" * 2_000, "k")
        for name in ("x", "y"):
            me.push(b"w" * 10_000, name)
        bob.push(b"n" * 20_000, "k", force=True)
        obj, _ = me.pull("k", memory_only=True)
        assert obj == b"n" * 20_000
        assert sorted(e.key for e in me.usage().entries) == ["x", "y"]  # nothing evicted
        bob.push(b"s" * 3_000, "k", force=True)
        me.pull("k")  # cached again (fits)
        bob.push(b"t" * 5_000, "k", force=True)
        assert me.pull("k", memory_only=True)[0] == b"t" * 5_000
        entry = me.cache.get("k")  # the new version fits in free space: kept
        assert entry is not None and entry.size > 5_000
        assert sorted(e.key for e in me.usage().entries) == ["k", "x", "y"]


def test_load_says_where_the_object_came_from(config: Config, tmp_path: Path) -> None:
    with Manager(config) as manager:
        info = manager.push(np.arange(1000), "k", meta="m")
        assert info.size == manager.cache.get("k").size and info.key == "k"
        hit = manager.load("k")
        assert (hit.source, hit.size, hit.meta) == ("cache", info.size, "m")
        assert manager.load("k", force=True).source == "store"
    with Manager(config.replace(local_dir=str(tmp_path / "fresh"))) as other:
        fetched = other.load("k", memory_only=True)
        assert (fetched.source, fetched.size) == ("store", info.size)
        np.testing.assert_array_equal(fetched.obj, np.arange(1000))
        assert other.cache.get("k") is None
        assert other.load("k").source == "store" and other.load("k").source == "cache"


def test_pushing_the_same_object_twice_at_once_still_conflicts(manager: Manager) -> None:
    """A retried write that meets itself is not a conflict, but the same bytes pushed again
    by the same person in the same second are (each push is told apart by its push_id)."""
    manager.push({"a": 1}, "same")
    for _ in range(3):
        with pytest.raises(KeyExistsError):
            manager.push({"a": 1}, "same")


def test_push_file_reads_a_pipe(manager: Manager, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = os.urandom(200_000)

    def feed() -> None:
        with open(fifo, "wb") as w:
            w.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    manager.push_file(fifo, "from/pipe")
    writer.join()
    assert manager.pull("from/pipe", force=True)[0] == data


def test_pull_file_onto_a_folder_is_a_clear_error(manager: Manager, tmp_path: Path) -> None:
    manager.push(b"bytes", "b")
    (tmp_path / "folder").mkdir()
    with pytest.raises(LocalFileError, match="a folder stands where a file should be"):
        manager.pull_file("b", tmp_path / "folder")
    with pytest.raises(LocalFileError, match=r"cannot use .*no/such/dir/f"):
        manager.pull_file("b", tmp_path / "no" / "such" / "dir" / "f")
    assert sorted(p.name for p in tmp_path.iterdir() if "incomplete" in p.name) == []


# -- one level, pins, the disc (what the panel and completion use) -----------------------------


def test_ls_level_lists_one_level_with_cache_states(counting) -> None:
    m, store = counting
    for key in ("team/a/v1", "team/b", "team/c", "top"):
        m.push(b"x", key)
    m.set_persist("team/b", True)
    m.delete("team/c")  # stored only
    store.calls.clear()
    level = m.ls_level("team/")
    assert level.prefix == "team/" and level.prefixes == ["team/a/"] and level.token is None
    assert [(k.key, k.cached, k.persist) for k in level.keys] == [
        ("team/b", True, True),
        ("team/c", False, False),
    ]
    assert store.calls == {"list_level": 1}
    m.ls_level("team/")  # from the listing cache, with fresh states from the index
    m.set_persist("team/b", False)
    assert not m.ls_level("team/").keys[0].persist
    assert store.calls == {"list_level": 1}
    m.ls_level("team/", fresh=True)
    assert store.calls == {"list_level": 2}
    m.push(b"y", "team/d")  # the manager's own change: the next listing asks again
    assert [k.key for k in m.ls_level("team/").keys] == ["team/b", "team/c", "team/d"]
    assert store.calls["list_level"] == 3
    m.delete("team/d", remote=True)
    assert [k.key for k in m.ls_level("team/").keys] == ["team/b", "team/c"]
    assert store.calls["list_level"] == 4


def test_ls_level_pages(counting) -> None:
    m, _ = counting
    for n in range(5):
        m.push(n, f"p/k{n}")
    # (under a prefix: at the root, daman's .daman-history/ takes a place in a store's page,
    # and is left out of it, so that a root page may show one name fewer)
    first = m.ls_level("p/", limit=2)
    assert [k.key for k in first.keys] == ["p/k0", "p/k1"] and first.token is not None
    second = m.ls_level("p/", limit=2, token=first.token)
    assert [k.key for k in second.keys] == ["p/k2", "p/k3"]
    assert m.ls_level("").prefixes == ["p/"]
    with pytest.raises(InvalidKeyError):
        m.ls_level("../")


def test_ls_feeds_the_listing_cache(counting) -> None:
    m, store = counting
    m.push(1, "a/b/c")
    m.ls()
    store.calls.clear()
    assert m.ls_level("").prefixes == ["a/"] and m.ls_level("a/b/").keys[0].key == "a/b/c"
    assert store.calls == {}


def test_pin_pins_a_cached_key_at_once(counting) -> None:
    m, store = counting
    m.push(b"x" * 1000, "k")
    store.calls.clear()
    entry = m.pin("k")
    assert entry.persist and m.cache.get("k").persist
    assert store.calls == {}  # no request: the copy is here


def test_pin_fetches_a_key_not_cached_first(counting) -> None:
    m, store = counting
    m.push(b"x" * 1000, "k")
    m.delete("k")
    store.calls.clear()
    heard: list[tuple[int, int]] = []
    entry = m.pin("k", progress=lambda done, total: heard.append((done, total)))
    assert entry.persist and m.cache.get("k").persist
    assert store.calls == {"head": 1, "get": 1}
    assert heard and heard[-1] == (entry.size, entry.size)  # reported, no tqdm bar
    with pytest.raises(KeyNotFoundError):
        m.pin("missing")


def test_a_pin_that_cannot_fit_is_refused_before_downloading(make_config) -> None:
    config = make_config(allocated_space=100_000)
    store = CountingStore(open_store(config))
    with Manager(config, store=store) as m:
        m.push(os.urandom(60_000), "pinned", persist=True)
        with pytest.warns(NotCachedWarning):
            m.push(os.urandom(50_000), "big")
        assert m.cache_refusal("small", 30_000, persist=True) is None
        reason = m.cache_refusal("big", 50_000, persist=True)
        assert reason is not None and "big (48.8 KiB) cannot be persisted" in reason
        store.calls.clear()
        with pytest.raises(NotCachedError) as caught:
            m.pin("big")
        assert str(caught.value) == m.cache_refusal("big", store.inner.head("big").size,
                                                    persist=True)  # fmt: skip
        assert store.calls == {"head": 1}  # nothing downloaded
        assert m.cache.get("big") is None


def test_without_an_allocation_everything_fits(manager: Manager) -> None:
    assert manager.cache_refusal("k", 10**15, persist=True) is None


def test_disc_tells_use_persisted_bytes_and_what_goes_next(manager: Manager) -> None:
    for key in ("a", "b", "c"):
        manager.push(os.urandom(1000), key, persist=key == "b")
    manager.pull("a")  # a is now the most recently used
    disc = manager.disc(next_to_evict=5)
    entries = {e.key: e for e in manager.cache.entries()}
    assert disc.used == sum(e.size for e in entries.values()) and disc.entries == 3
    assert disc.persisted == entries["b"].size and disc.allocated is None and disc.free is None
    assert [e.key for e in disc.next_to_evict] == ["c", "a"]
    assert disc.local_dir == manager.cache.root


def test_fetch_reports_progress_to_the_caller_instead_of_a_bar(make_config, monkeypatch) -> None:
    import tqdm.auto

    config = make_config(progress=True)
    with Manager(config) as m:
        data = os.urandom(9 * 1024 * 1024)  # above the bar's threshold
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tqdm's own warning outside a notebook
            m.push(data, "big")
        m.delete("big")
        monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: pytest.fail("a bar was drawn"))
        heard: list[tuple[int, int]] = []
        entry = m.fetch("big", progress=lambda done, total: heard.append((done, total)))
        assert heard[0] == (0, entry.size) and heard[-1] == (entry.size, entry.size)
        done = [d for d, _ in heard]
        assert done == sorted(done)  # in order, though parts arrive on several threads


def test_usage_is_the_index_totals_and_lists_entries_only_when_asked(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 50,000 entries a listing takes 0.4 s; the totals are kept by the index. The
    persisted entries (dm_status) are read through the LRU index, not every row."""
    for i in range(4):
        manager.push(bytes(100 * (i + 1)), f"u/{i}", persist=i == 1)
    listed: list[str] = []
    real_entries = type(manager.cache).entries
    monkeypatch.setattr(
        type(manager.cache), "entries", lambda self: listed.append("all") or real_entries(self)
    )
    usage = manager.usage()
    assert (usage.used, usage.count) == (manager.cache.usage().used, 4) and listed == []
    assert [e.key for e in usage.persisted] == ["u/1"] and listed == []
    assert str(usage).endswith("(4 entries, 1 persisted)") and listed == []
    assert [e.key for e in usage.entries] == ["u/3", "u/2", "u/1", "u/0"] and listed == ["all"]
    assert usage.used == sum(e.size for e in usage.entries)


def test_ls_of_a_folder_reads_the_versions_of_cached_keys_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version is a footer read per file; only cached keys need one (is the copy
    outdated?). A copy outdated by another machine's push still says so."""
    import daman.store.local as local
    from daman import ObjectInfo
    from daman.results import KeyListing

    store = tmp_path / "store"
    store.mkdir()
    config = Config(storage_name=str(store), service="local", local_dir=str(tmp_path / "c"))
    with Manager(config) as me, Manager(config.replace(local_dir=str(tmp_path / "o"))) as other:
        for i in range(10):
            me.push(i, f"k/{i}")
        me.delete("k/5")  # stored, not cached here
        other.push("new", "k/3", force=True)  # cached here, outdated
        read: list[str] = []
        real_info = local._info
        monkeypatch.setattr(local, "_info", lambda key, f: read.append(key) or real_info(key, f))
        listing = {item.key: item for item in me.ls("k/")}
        assert sorted(read) == sorted(f"k/{i}" for i in range(10) if i != 5)
        assert [key for key, item in listing.items() if item.outdated] == ["k/3"]
        assert not listing["k/5"].cached and listing["k/5"].etag == ""
        assert all(listing[f"k/{i}"].cached for i in range(10) if i != 5)
    info = ObjectInfo("k", 1, "", None)
    assert KeyListing.of(info, None) == KeyListing("k", 1, None, False, False, None, False, "")
    assert vars(KeyListing.of(info, None)) == vars(KeyListing("k", 1, None, False, False))


def test_one_local_dir_for_two_stores_never_serves_one_stores_copy_as_the_others(
    make_config, tmp_path: Path
) -> None:
    """A key cached from one store is not another store's hit, however the second asks (the
    key missing there, no HEAD with check_current off, the store unreachable); both share
    the one allocation, and each keeps its own pins."""
    first = make_config(allocated_space=10 * 2**20)
    if first.service == "local":
        (tmp_path / "other-store").mkdir()
        second = first.replace(storage_name=str(tmp_path / "other-store"))
    else:
        second = first.replace(storage_name=f"{first.storage_name}/other-team")
    assert second.local_dir == first.local_dir
    with Manager(first) as a:
        a.push({"from": "first"}, "shared/name", persist=True)
        used = a.usage().used
    for check_current in (True, False):
        with Manager(second.replace(check_current=check_current)) as b:
            with pytest.raises(KeyNotFoundError):
                b.pull("shared/name")
            assert b.cache.get("shared/name") is None and b.cache.states(["shared/name"]) == {}
            assert b.usage().used == used  # one local_dir, one allocation
            assert b.cache.set_persist("shared/name", False) is False  # not its to unpin
    with Manager(first) as a:
        assert a.cache.get("shared/name").persist
    with Manager(second) as b:
        b.push({"from": "second"}, "shared/name")
        assert b.pull("shared/name")[0] == {"from": "second"}
        assert not b.cache.get("shared/name").persist  # the first store's pin is not its
    with Manager(first) as a:
        assert a.pull("shared/name")[0] == {"from": "first"}
