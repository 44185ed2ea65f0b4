"""Version history (daman/history.py): every overwrite keeps the version it replaced, on the
local-folder store, on moto's S3 server with and without bucket versioning, and on the GCS and
Azure emulators."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import s3_client
from counting_store import CountingStore
from legacy_helpers import put_02
from test_concurrency import spawn, wait_all

from daman import (
    Config,
    ConfigError,
    InvalidKeyError,
    KeyNotFoundError,
    Manager,
)
from daman.errors import (
    RepairWarning,
    StoreUnavailableError,
    UntrustedObjectError,
    VersionNotFoundError,
)
from daman.history import version_of
from daman.keys import HISTORY, record_folder, validate_key
from daman.serialize import StoredFile, dumps_meta, write_object
from daman.store import open_store

STORES = ["local", "s3", "s3-versioned", "gcs", "azure"]


@pytest.fixture(params=STORES)
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    kind = request.param
    if kind == "local":
        (tmp_path / "store").mkdir()
        base: dict[str, object] = dict(service="local", storage_name=str(tmp_path / "store"))
    elif kind in ("gcs", "azure"):  # daman's records: the same code as any store without
        base = dict(  # versions of its own
            service=kind,
            storage_name=request.getfixturevalue(
                "gcs_bucket" if kind == "gcs" else "azure_container"
            ),
            endpoint_url=request.getfixturevalue(f"{kind}_endpoint"),
            max_attempts=3,
        )
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("bucket")
        if kind == "s3-versioned":
            s3_client(endpoint).put_bucket_versioning(
                Bucket=bucket.partition("/")[0],
                VersioningConfiguration={"Status": "Enabled"},
            )
        base = dict(
            service="aws",
            storage_name=bucket,
            endpoint_url=endpoint,
            region="us-east-1",
            max_attempts=3,
        )
    return Config(**base, local_dir=str(tmp_path / "cache"), progress=False)  # type: ignore[arg-type]


@pytest.fixture
def manager(config: Config) -> Iterator[Manager]:
    with Manager(config) as m:
        yield m


def other_machine(config: Config, tmp_path: Path, name: str = "other", **fields) -> Manager:
    return Manager(config.replace(local_dir=str(tmp_path / name), **fields))


def push_unversioned(manager: Manager, obj: object, key: str, meta: object = None) -> str:
    """Push ``obj`` as daman did before versions existed: no record, no version in the
    footer. Returns the version id it shows under (a bucket that keeps versions names it)."""
    path = manager.cache.root / "old-push"
    with open(path, "wb") as f:
        footer = write_object(obj, dumps_meta(meta), f, None, key)
    assert footer.version == ""
    info = manager.store.put(key, path, overwrite=True)
    path.unlink()
    return info.version or version_of(footer)


def test_history_lists_every_version_newest_first(manager: Manager) -> None:
    for n in range(3):
        manager.push(np.full(10, n), "team/data", meta={"n": n}, force=True)
    history = manager.history("team/data")
    assert not history.deleted
    assert [v.meta for v in history] == [{"n": 2}, {"n": 1}, {"n": 0}]
    assert [v.current for v in history] == [True, False, False]
    assert history.current is history[0]
    assert len({v.version for v in history}) == 3
    for v in history:
        assert v.size > 80 and v.pushed_by and v.pushed_at and v.python and v.cloudpickle
        assert v.meta_preview.startswith("{'n': ")
    assert [k.key for k in manager.ls()] == ["team/data"]  # the records are not keys


def test_an_old_version_is_pulled_and_cached_beside_the_current(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    manager.push(b"first", "k", meta="one")
    manager.push(b"second", "k", meta="two", force=True)
    old = manager.history("k")[1].version
    counting = CountingStore(open_store(config))
    with Manager(config.replace(local_dir=str(tmp_path / "reader")), store=counting) as reader:
        assert reader.pull("k", version=old) == (b"first", "one")
        assert reader.pull("k") == (b"second", "two")
        counting.calls.clear()
        # a version never changes: its cached copy is used without asking the store
        assert reader.load("k", version=old).source == "cache"
        assert reader.pull("k", version=old) == (b"first", "one")
        assert counting.calls == {}
        assert sorted((e.key, e.version) for e in reader.cache.entries()) == [("k", ""), ("k", old)]
        assert reader.usage().count == 2
        assert reader.verify("k").checked == 2
        assert reader.info("k", version=old).meta == "one"
        out = tmp_path / "out.bin"
        assert reader.pull_file("k", out, version=old) == 5 and out.read_bytes() == b"first"
        assert reader.fetch("k", version=old).version == old
        reader.delete("k")  # the local copies of every version
        assert reader.cache.entries() == []
    with pytest.raises(VersionNotFoundError):
        manager.pull("k", version="20200101T000000.000Z-00000000")
    with pytest.raises(KeyNotFoundError):  # a VersionNotFoundError is a KeyNotFoundError
        manager.pull("k", version="not/an id")


def test_restore_makes_an_old_version_current_as_a_new_version(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    manager.push({"v": 1}, "k", meta="one")
    manager.push({"v": 2}, "k", meta="two", force=True)
    first = manager.history("k")[1].version
    manager.restore("k", version=first)
    history = manager.history("k")
    assert len(history) == 3
    assert history[0].current and history[0].restored_from == first
    assert history[0].meta == "one"
    assert manager.pull("k") == ({"v": 1}, "one")
    with other_machine(config, tmp_path) as other:  # for everyone, not only here
        assert other.pull("k") == ({"v": 1}, "one")
        assert other.pull("k", version=history[1].version) == ({"v": 2}, "two")


def test_a_deleted_key_keeps_its_history_and_can_be_restored(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    manager.push([1], "k")
    manager.push([2], "k", force=True)
    manager.delete("k", remote=True)
    with other_machine(config, tmp_path) as other:
        with pytest.raises(KeyNotFoundError):
            other.pull("k")
        assert other.ls() == []
        history = other.history("k")
        assert history.deleted and history.current is None and len(history) == 2
        other.restore("k", version=history[0].version)
    assert manager.pull("k") == ([2], None)
    assert len(manager.history("k")) == 3


def test_deleting_all_versions_removes_every_record(manager: Manager) -> None:
    manager.push(1, "k")
    manager.push(2, "k", force=True)
    manager.delete("k", remote=True, all_versions=True)
    with pytest.raises(KeyNotFoundError):
        manager.history("k")
    assert list(manager.store.list(record_folder("k"))) == []


def test_keep_versions_removes_the_oldest(config: Config, tmp_path: Path) -> None:
    with Manager(config.replace(keep_versions=3)) as manager:
        for n in range(5):
            manager.push(n, "k", force=True)
        history = manager.history("k")
        assert [manager.pull("k", version=v.version)[0] for v in history] == [4, 3, 2]
        assert history[0].current
    with pytest.raises(ConfigError):
        config.replace(keep_versions=0)
    with pytest.raises(ConfigError):
        config.replace(keep_versions="3")


def test_an_object_pushed_before_versions_is_a_history_of_one_and_is_kept(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    old = push_unversioned(manager, "before", "k", meta="old")
    history = manager.history("k")
    assert [(v.version, v.current, v.meta) for v in history] == [(old, True, "old")]
    assert manager.pull("k", version=old) == ("before", "old")
    manager.push("after", "k", force=True)  # records the version it replaces first
    history = manager.history("k")
    assert [v.version for v in history][1] == old and len(history) == 2
    with other_machine(config, tmp_path) as other:
        assert other.pull("k", version=old) == ("before", "old")
    # and a delete keeps an unrecorded version too
    push_unversioned(manager, "again", "j")
    manager.delete("j", remote=True)
    assert [v.meta for v in manager.history("j")] == [None]
    assert manager.history("j").deleted


def test_keys_under_the_reserved_folder_are_refused_and_hidden(manager: Manager) -> None:
    for key in (HISTORY, f"{HISTORY}/x", f"{HISTORY}/{'a' * 64}/20261130T000000.000Z-1"):
        with pytest.raises(InvalidKeyError, match="reserved"):
            validate_key(key)
        with pytest.raises(InvalidKeyError):
            manager.push(1, key)
    manager.push(1, "a/b")
    manager.push(2, "a/b", force=True)
    assert [k.key for k in manager.ls()] == ["a/b"]
    level = manager.ls_level("")
    assert level.prefixes == ["a/"] and level.keys == []


RACER = """
    from daman.store import open_store
    import os, time
    go = sys.argv[2]
    with Manager(config) as manager:
        open(go + "-ready-" + str(os.getpid()), "w").close()
        while not os.path.exists(go):  # start together
            time.sleep(0.005)
        for n in range(10):
            manager.push((sys.argv[3], n), "race", force=True)
"""


def test_two_processes_force_pushing_ten_times_each_keep_every_version(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    original = push_unversioned(manager, ("original", 0), "race")
    go = tmp_path / "go"
    procs = [
        spawn(config.replace(local_dir=str(tmp_path / name)), RACER, go, name)
        for name in ("a", "b")
    ]
    while len(list(tmp_path.glob("go-ready-*"))) < 2:
        assert all(p.poll() is None for p in procs)
    go.touch()
    wait_all(procs)
    history = manager.history("race")
    assert len(history) == 21 and len({v.version for v in history}) == 21
    assert history[-1].version == original  # the oldest
    pulled = {manager.pull("race", version=v.version)[0] for v in history}
    expected = {("original", 0)} | {(name, n) for name in ("a", "b") for n in range(10)}
    assert pulled == expected
    (current,) = [v for v in history if v.current]
    assert manager.pull("race", force=True)[0] == manager.pull("race", version=current.version)[0]


def test_a_cached_pull_of_the_current_version_is_one_request(config: Config) -> None:
    counting = CountingStore(open_store(config))
    with Manager(config, store=counting) as manager:
        manager.push(np.arange(10), "k")
        manager.push(np.arange(20), "k", force=True)
        counting.calls.clear()
        assert len(manager.pull("k")[0]) == 20
        assert counting.calls == {"head": 1}


def test_a_new_key_is_one_write_and_is_recorded_when_replaced(
    config: Config, tmp_path: Path
) -> None:
    """A push of a new key writes the key alone (as fast as a plain upload); the push that
    replaces it records it first, from this machine's cached copy (nothing downloaded), and
    a replacement on a machine without that copy downloads it."""
    counting = CountingStore(open_store(config))
    with Manager(config, store=counting) as manager:
        manager.push(0, "warm")  # asks once whether the bucket keeps versions
        keeps = manager.store.keeps_versions()
        counting.calls.clear()
        manager.push({"n": 1}, "k", meta="first")
        assert counting.calls == {"put": 1}  # no record, no copy, no HEAD
        if not keeps:
            assert list(manager.store.list(record_folder("k"))) == []
        (only,) = manager.history("k")
        assert only.current and only.meta == "first"
        counting.calls.clear()
        manager.push({"n": 2}, "k", meta="second", force=True)
        assert counting.calls["get"] == 0  # the replaced version came from the cache
        history = manager.history("k")
        assert [(v.meta, v.current) for v in history] == [("second", True), ("first", False)]
        assert history[1].version == only.version  # the id it had while unrecorded
        manager.push({"n": 3}, "j")
    with other_machine(config, tmp_path) as other:  # j is not cached there
        other.push({"n": 4}, "j", force=True)
        assert [v.meta for v in other.history("j")] == [None, None]
        assert other.pull("j", version=other.history("j")[1].version)[0] == {"n": 3}
        assert other.pull("k", version=only.version) == ({"n": 1}, "first")


def test_versions_pushed_within_a_second_keep_their_order(manager: Manager) -> None:
    manager.push(0, "k")  # unrecorded: its id comes from its footer's time, to the ms
    for n in range(1, 4):
        manager.push(n, "k", force=True)
    history = manager.history("k")
    assert [manager.pull("k", version=v.version)[0] for v in history] == [3, 2, 1, 0]


def test_the_same_bytes_pushed_again_are_another_version(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    """Two pushes of equal objects are two versions (their footers differ: who, when, a
    random id), even where the store's etag covers only the bytes (a folder store): the
    cached copy of the first is never recorded in place of the second."""
    manager.push({"x": 1}, "k", meta="first")
    with other_machine(config, tmp_path) as other:
        other.delete("k", local=False, remote=True)  # records the first
        other.push({"x": 1}, "k", meta="second")  # a new key again: unrecorded
    manager.push({"x": 2}, "k", meta="third", force=True)
    history = manager.history("k")
    assert [v.meta for v in history] == ["third", "second", "first"]
    assert [manager.pull("k", version=v.version) for v in history][1:] == [
        ({"x": 1}, "second"),
        ({"x": 1}, "first"),
    ]


def test_a_damaged_cached_copy_is_never_what_is_recorded(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    manager.push(np.arange(1000), "k")
    path = manager.cache.get("k").path
    data = bytearray(path.read_bytes())
    data[300] ^= 0x01  # the copy here rots; the store's is whole
    path.write_bytes(bytes(data))
    manager.push(np.arange(5), "k", force=True)
    old = manager.history("k")[1].version
    with other_machine(config, tmp_path) as other:
        np.testing.assert_array_equal(other.pull("k", version=old)[0], np.arange(1000))


class _UnreachableOnce(CountingStore):
    """A real store whose first tail read fails as an unreachable store's would."""

    def read_tail(self, key, length, **kw):
        if not self.calls["read_tail"]:
            self.calls["read_tail"] += 1
            raise StoreUnavailableError("the store did not answer (a test's first read)")
        return super().read_tail(key, length, **kw)


def test_a_delete_or_force_push_that_cannot_look_at_the_key_changes_nothing(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    """An unrecorded version must be recorded before it is replaced or deleted: if the
    store cannot be asked, the replace or delete is refused, not done without the record."""
    manager.push({"v": 1}, "k")
    other_config = config.replace(local_dir=str(tmp_path / "other"))
    for act in (
        lambda m: m.delete("k", local=False, remote=True),
        lambda m: m.push({"v": 2}, "k", force=True),
    ):
        with Manager(other_config, store=_UnreachableOnce(open_store(config))) as other:
            if other.store.keeps_versions():
                return  # the bucket keeps every version itself: nothing to record first
            with pytest.raises(StoreUnavailableError):
                act(other)
        assert manager.pull("k", force=True)[0] == {"v": 1}
        assert [v.current for v in manager.history("k")] == [True]


@pytest.mark.parametrize("config", ["local", "s3"], indirect=True)
def test_an_unsigned_or_damaged_version_does_not_block_the_push_replacing_it(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    """Pushing a good object is how one mends a key holding an unsigned or damaged one:
    the version replaced is kept as it is stored (reading it fails as before)."""
    manager.push({"v": 1}, "k")  # unsigned
    signing = config.replace(local_dir=str(tmp_path / "signed"), signing_key="s" * 40)
    with Manager(signing) as signed:
        signed.push({"v": 2}, "k", force=True)
        (_, old) = signed.history("k")
        assert signed.pull("k")[0] == {"v": 2}
        with pytest.raises(UntrustedObjectError):
            signed.pull("k", version=old.version)
    assert manager.pull("k", version=old.version)[0] == {"v": 1}
    if config.service == "local":  # one flipped byte in the store's own copy
        manager.push(np.arange(1000), "d")
        (stored,) = Path(config.storage_name).rglob("d.daman")
        data = bytearray(stored.read_bytes())
        data[300] ^= 0x01
        stored.write_bytes(bytes(data))
        with other_machine(config, tmp_path, "mender") as mender:
            mender.push(np.arange(3), "d", force=True)
            assert len(mender.history("d")) == 2 and mender.pull("d")[0].tolist() == [0, 1, 2]


class _DeletedAfterTheLook(CountingStore):
    """A real store in which another machine deletes ``k`` right after this one read its
    tail (between the look at the version to record and its download)."""

    def __init__(self, inner, deleter: Manager) -> None:
        super().__init__(inner)
        self.deleter = deleter

    def read_tail(self, key, length, **kw):
        found = super().read_tail(key, length, **kw)
        if self.calls["read_tail"] == 1:
            self.deleter.delete(key, local=False, remote=True)
        return found


def test_a_key_deleted_while_its_version_is_recorded_is_still_pushed(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    manager.push({"v": 1}, "k")
    with other_machine(config, tmp_path, "deleter") as deleter:
        store = _DeletedAfterTheLook(open_store(config), deleter)
        with Manager(config.replace(local_dir=str(tmp_path / "late")), store=store) as late:
            late.push({"v": 2}, "k", force=True)
            assert late.pull("k")[0] == {"v": 2}
            if not store.keeps_versions():
                assert [v.current for v in late.history("k")] == [True, False]


class _PushedMeanwhile(CountingStore):
    """A real store in which another machine's whole force push (and its prune) lands
    while this one looks at the version it replaces (after its own record, before the key)."""

    def __init__(self, inner, other: Manager) -> None:
        super().__init__(inner)
        self.other = other

    def read_tail(self, key, length, **kw):
        if not self.calls["read_tail"]:
            self.other.push({"v": "other"}, key, force=True)
        return super().read_tail(key, length, **kw)


@pytest.mark.parametrize("config", ["local", "s3", "gcs", "azure"], indirect=True)  # records
def test_a_prune_racing_a_force_push_does_not_fail_it(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    """With keep_versions=1 another machine's prune may remove a record this push made a
    moment ago, before the key was copied from it: the push makes it again."""
    manager.push({"v": 0}, "k", force=True)
    one = config.replace(keep_versions=1)
    with other_machine(one, tmp_path) as other:
        store = _PushedMeanwhile(open_store(config), other)
        with Manager(one.replace(local_dir=str(tmp_path / "late")), store=store) as late:
            late.push({"v": "late"}, "k", force=True)
            assert late.pull("k", force=True)[0] == {"v": "late"}
            history = late.history("k")
            assert history[0].current
            assert late.pull("k", version=history[0].version)[0] == {"v": "late"}


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_a_key_holding_no_readable_object_is_mended_with_a_warning(
    config: Config, manager: Manager, tmp_path: Path
) -> None:
    manager.push({"v": 1}, "k")
    (stored,) = Path(config.storage_name).rglob("k.daman")
    stored.write_bytes(stored.read_bytes()[:-20])  # truncated in the store: no footer
    with other_machine(config, tmp_path, "mender") as mender:
        with pytest.warns(RepairWarning, match="damaged beyond reading") as caught:
            mender.push({"v": 2}, "k", force=True)
        assert caught[0].filename == __file__  # the user's line
        assert mender.pull("k")[0] == {"v": 2}
        assert [v.current for v in mender.history("k")] == [True]


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_a_daman_02_object_is_kept_until_it_is_migrated(config: Config, tmp_path: Path) -> None:
    """Under a signing key a 0.2 object (unsigned, no footer to keep it by) is neither
    replaced nor deleted: dm_migrate converts and signs it first."""
    put_02(config, "old", {"v": 0.2}, meta="m")
    with Manager(config.replace(signing_key="s" * 40)) as signed:
        with pytest.raises(UntrustedObjectError, match="dm_migrate"):
            signed.push({"v": 3}, "old", force=True)
        with pytest.raises(UntrustedObjectError, match="dm_migrate"):
            signed.delete("old", local=False, remote=True)
    with other_machine(config, tmp_path) as unsigned:
        assert unsigned.pull("old") == ({"v": 0.2}, "m")
        unsigned.push({"v": 3}, "old", force=True)  # without signing: recorded, converted
        assert unsigned.pull("old", version=unsigned.history("old")[1].version)[0] == {"v": 0.2}


def test_history_of_a_key_never_pushed_is_key_not_found(manager: Manager) -> None:
    with pytest.raises(KeyNotFoundError):
        manager.history("nothing")


def test_a_versioned_bucket_keeps_the_versions_and_daman_keeps_them_elsewhere(
    config: Config, manager: Manager
) -> None:
    manager.push(1, "k")
    manager.push(2, "k", force=True)
    entry = manager.cache.get("k")
    assert entry is not None
    with open(entry.path, "rb") as f:
        footer = StoredFile(f).footer
    history = manager.history("k")
    recorded = list(manager.store.list(record_folder("k")))
    if manager.store.keeps_versions():  # S3's version ids; daman writes nothing more
        assert recorded == [] and footer.version == ""  # no id of daman's: S3 names them
        assert history[0].version == manager.store.head("k").version
    else:  # daman's records, one per version, named by the id in the footer
        assert footer.version == history[0].version and len(recorded) == 2


@pytest.mark.parametrize("config", ["local", "s3", "s3-versioned"], indirect=True)
def test_large_versions_are_kept_whole(config: Config, manager: Manager, tmp_path: Path) -> None:
    """Above the multipart threshold (17 MiB): the key is written from the record by copies
    of parts on S3's side (S3 without bucket versioning). (The emulators' large writes are
    tested in test_store_clouds.)"""
    first = np.arange(3_000_000, dtype=np.float64)  # 24 MB
    manager.push(first, "big", force=True)
    manager.push(first + 1, "big", force=True)
    history = manager.history("big")
    assert len(history) == 2 and history[0].size > 24_000_000
    with other_machine(config, tmp_path) as other:
        np.testing.assert_array_equal(other.pull("big")[0], first + 1)
        np.testing.assert_array_equal(other.pull("big", version=history[1].version)[0], first)
        assert other.verify().damaged == []


def test_racing_pushes_with_keep_versions_never_lose_the_current_version(
    config: Config, tmp_path: Path
) -> None:
    capped = config.replace(keep_versions=3)
    go = tmp_path / "go"
    procs = [
        spawn(capped.replace(local_dir=str(tmp_path / name)), RACER, go, name)
        for name in ("a", "b")
    ]
    while len(list(tmp_path.glob("go-ready-*"))) < 2:
        assert all(p.poll() is None for p in procs)
    go.touch()
    wait_all(procs)
    with Manager(capped) as manager:
        history = manager.history("race")
        assert 1 <= len(history) <= 4  # 3, or one more when the last two pushes raced
        (current,) = [v for v in history if v.current]
        assert manager.pull("race", version=current.version) == manager.pull("race")
        for v in history:
            assert manager.pull("race", version=v.version)[0][1] in range(10)


@pytest.mark.parametrize("config", ["local", "s3"], indirect=True)
def test_an_old_version_can_be_mapped(manager: Manager) -> None:
    manager.push(np.arange(1000), "k")
    manager.push(np.arange(2000), "k", force=True)
    old = manager.history("k")[1].version
    arr, _ = manager.pull("k", version=old, mmap=True)
    assert not arr.flags.writeable and arr[-1] == 999
    mapped = manager.mapped()
    assert [(m.key, m.current, m.version) for m in mapped] == [("k", True, old)]
    manager.delete("k")  # the local copies: the mapped one stays on disc while mapped
    assert manager.mapped()[0].current is False and arr[-1] == 999


@pytest.mark.parametrize("config", ["local"], indirect=True)
def test_a_version_pulled_with_persist_is_pinned_and_shown_as_such(manager: Manager) -> None:
    from daman import report

    manager.push(1, "k")
    manager.push(2, "k", force=True)
    old = manager.history("k")[1].version
    manager.pull("k", version=old, persist=True)
    assert manager.cache.get("k", old).persist and not manager.cache.get("k").persist
    lines = report.usage_lines(manager.usage(), manager.cache.root)
    assert lines[-1].endswith(f"k  (version {old})")
    assert manager.cache.set_persist("k", False, version=old)
    manager.clear()
    assert manager.cache.entries() == []  # unpinned versions are evicted like any entry
