"""Contract tests every store backend honours: ``LocalStore`` and ``S3Store``.

Every test taking the ``store`` fixture runs once per backend: a folder under ``tmp_path`` and
moto's real S3 server over HTTP (the session fixture ``s3_endpoint``; nothing in boto3 or
botocore is patched). ``bucket`` may be ``name/prefix`` on a real endpoint, so raw S3 checks
split it. The S3-only tests at the end cover what has no local counterpart: multipart
uploads, credentials, unreachable endpoints, checksum settings and bucket prefixes.
"""

from __future__ import annotations

import errno
import functools
import itertools
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from counting_store import CountingStore
from reliability_helpers import store_leftovers

from daman.config import Config
from daman.errors import (
    CredentialsError,
    DamanError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    StorageNotFoundError,
    StoreUnavailableError,
)
from daman.store import open_store
from daman.store._transfer import MAX_PARTS, MIN_PART_SIZE, part_size_for, split
from daman.store.base import ObjectInfo, Store
from daman.store.local import LocalStore
from daman.store.s3 import MULTIPART_THRESHOLD, S3Store

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB
BIG = 20 * MiB  # well above MULTIPART_THRESHOLD: several parts, several ranged reads
MEDIUM = MULTIPART_THRESHOLD + MiB  # the smallest comfortable multipart object
SMALL_RACES = 20
LARGE_RACES = 5

# -- helpers -------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _split(bucket: str) -> tuple[str, str]:
    """``name/some/prefix`` -> (``name``, ``some/prefix/``); ``name`` -> (``name``, ``""``)."""
    name, _, prefix = bucket.strip("/").partition("/")
    return name, f"{prefix}/" if prefix else ""


def _s3_config(storage_name: str, endpoint: str, **fields: Any) -> Config:
    base: dict[str, Any] = dict(
        service="aws",
        storage_name=storage_name,
        endpoint_url=endpoint,
        region="us-east-1",
        connect_timeout=5,
        read_timeout=30,
        max_attempts=3,
    )
    base.update(fields)
    return Config(**base)


def _raw_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _open_uploads(client: Any, bucket: str, prefix: str) -> list[str]:
    r = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [u["Key"] for u in r.get("Uploads", [])]


def _empty_bucket(client: Any, bucket: str, prefix: str) -> None:
    """Best-effort clean-up so moto's memory (or a real bucket) does not fill up."""
    try:
        for key in _open_uploads(client, bucket, prefix):
            for u in client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
    except Exception:  # clean-up must not mask the test result
        pass


def _keys(store: Store, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} has an empty message"
    assert "\n" not in message, f"multi-line message: {message!r}"
    return message


class _Counter:
    """A thread-safe progress callback that adds up the bytes it is told about."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.total += n
            self.calls += 1


class _Boom(Exception):
    """Raised by a progress callback to make a transfer fail midway."""


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different 20 MiB files of random bytes, shared (read-only) by the tests."""
    folder = tmp_path_factory.mktemp("big")
    return (
        _write(folder / "big_a", os.urandom(BIG)),
        _write(folder / "big_b", os.urandom(BIG)),
    )


@pytest.fixture
def make_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], Store]]:
    """Build a store on the parametrised backend; every call is a new client (a new machine)
    on the same storage."""
    made: list[Store] = []
    raw = None
    if backend == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("bucket")
        raw = _raw_client(endpoint)
    elif backend in ("gcs", "azure"):
        cloud_config = request.getfixturevalue("make_config")()

    def make() -> Store:
        if backend == "local":
            root = tmp_path / "store"
            root.mkdir(exist_ok=True)
            store: Store = LocalStore(root)
        elif backend in ("gcs", "azure"):
            store = open_store(cloud_config)
        else:
            store = S3Store.from_config(_s3_config(bucket, endpoint))
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
    if raw is not None:
        _empty_bucket(raw, *_split(bucket))
        raw.close()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


@pytest.fixture
def leftovers(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], list[str]]]:
    """What a failed or lost put may have left behind: temp files in the folder, or open
    multipart uploads in the bucket (they cost money on S3)."""
    if backend == "local":

        def find_local() -> list[str]:
            root = tmp_path / "store"
            return sorted(str(p) for p in root.rglob("*") if p.name.endswith(".incomplete"))

        yield find_local
        return
    if backend in ("gcs", "azure"):
        # Nothing a failed put leaves on these is visible: an abandoned resumable upload
        # (GCS) or uncommitted blocks (Azure) expire on their own (README, known limits).
        config = request.getfixturevalue("make_config")()
        yield lambda: store_leftovers(config)
        return
    raw = _raw_client(request.getfixturevalue("s3_endpoint"))
    name, prefix = _split(request.getfixturevalue("bucket"))
    yield lambda: _open_uploads(raw, name, prefix)
    raw.close()


@pytest.fixture
def s3_raw(s3_endpoint: str) -> Iterator[Any]:
    client = _raw_client(s3_endpoint)
    yield client
    client.close()


# -- 1. put / head / get round trip --------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [1, 1000, MULTIPART_THRESHOLD, MULTIPART_THRESHOLD + 1, BIG],
    ids=["1B", "1000B", "threshold", "threshold+1", "20MiB"],
)
def test_round_trip_identical_bytes_and_info(store: Store, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    src = _write(tmp_path / "src" / "obj", data)
    put_progress, get_progress = _Counter(), _Counter()

    put_info = store.put("team/data/v1", src, overwrite=False, progress=put_progress)

    assert isinstance(put_info, ObjectInfo)
    assert put_info.key == "team/data/v1"
    assert put_info.size == size
    assert put_info.etag
    assert put_progress.total == size

    head = store.head("team/data/v1")
    assert (head.key, head.size, head.etag) == ("team/data/v1", size, put_info.etag)

    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    dest = dest_dir / "copy"
    got = store.get("team/data/v1", dest, progress=get_progress)

    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest_dir.iterdir()) == ["copy"]  # nothing else written there
    assert (got.key, got.size, got.etag) == ("team/data/v1", size, put_info.etag)
    assert get_progress.total == size
    assert src.read_bytes() == data  # the source is left alone
    [listed] = store.list()
    assert (listed.key, listed.size, listed.etag) == ("team/data/v1", size, put_info.etag)


def test_empty_file_round_trip(store: Store, tmp_path: Path) -> None:
    src = _write(tmp_path / "empty", b"")
    info = store.put("empty", src, overwrite=False)
    assert info.size == 0
    assert store.head("empty").size == 0
    dest = tmp_path / "dest"
    got = store.get("empty", dest)
    assert dest.read_bytes() == b""
    assert got.size == 0
    tail, tail_info = store.read_tail("empty", 16)
    assert (tail, tail_info.size) == (b"", 0)


def test_get_overwrites_an_existing_dest(store: Store, tmp_path: Path) -> None:
    store.put("k", _write(tmp_path / "src", b"new bytes"), overwrite=False)
    dest = _write(tmp_path / "dest", b"an older and much longer file that must go away")
    store.get("k", dest)
    assert dest.read_bytes() == b"new bytes"


# -- 2. overwrite=False / overwrite=True ---------------------------------------------------


@pytest.mark.parametrize("size", [100, MEDIUM], ids=["small", "multipart"])
def test_put_existing_key(
    store: Store, tmp_path: Path, leftovers: Callable[[], list[str]], size: int
) -> None:
    first, second = os.urandom(size), os.urandom(size)  # same size: only the bytes differ
    src1, src2 = _write(tmp_path / "one", first), _write(tmp_path / "two", second)
    original = store.put("a/key", src1, overwrite=False)

    with pytest.raises(KeyExistsError) as caught:
        store.put("a/key", src2, overwrite=False)
    assert isinstance(caught.value, FileExistsError)
    assert caught.value.key == "a/key"
    assert "a/key" in _one_line(caught.value)
    assert leftovers() == []
    assert store.head("a/key").etag == original.etag
    store.get("a/key", tmp_path / "after_refused")
    assert (tmp_path / "after_refused").read_bytes() == first

    replaced = store.put("a/key", src2, overwrite=True)
    assert replaced.etag != original.etag
    assert replaced.size == size
    head = store.head("a/key")
    assert (head.size, head.etag) == (size, replaced.etag)
    got = store.get("a/key", tmp_path / "after_replace")
    assert (tmp_path / "after_replace").read_bytes() == second
    assert got.etag == replaced.etag
    assert _keys(store) == ["a/key"]
    assert leftovers() == []


@pytest.mark.parametrize("size", [1000, BIG], ids=["1000B", "20MiB"])
def test_put_copy_writes_the_key_from_the_stored_source(
    store: Store, tmp_path: Path, big_files: tuple[Path, Path], size: int
) -> None:
    """A force push's key is written from its record (a copy on the store's side where the
    store can make one): the key holds the source's bytes whole, to overwrite or to create;
    a create over an existing key is refused; a source gone meanwhile is KeyNotFoundError."""
    first = big_files[0] if size == BIG else _write(tmp_path / "a", os.urandom(size))
    second = big_files[1] if size == BIG else _write(tmp_path / "b", os.urandom(size))
    store.put("rec/1", first, overwrite=False)
    store.put("k", second, overwrite=False)
    info = store.put_copy("k", first, source="rec/1", overwrite=True)
    assert info.size == size and store.head("k").etag == info.etag
    store.get("k", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == first.read_bytes()
    with pytest.raises(KeyExistsError):
        store.put_copy("k", second, source="rec/1", overwrite=False)
    store.put_copy("new", first, source="rec/1", overwrite=False)
    store.get("new", tmp_path / "out2")
    assert (tmp_path / "out2").read_bytes() == first.read_bytes()
    store.delete("rec/1")
    if store.copies(size, overwrite=True):  # sending the bytes needs no source
        with pytest.raises(KeyNotFoundError):
            store.put_copy("k", first, source="rec/1", overwrite=True)


def test_overwrite_of_missing_key_creates_it(store: Store, tmp_path: Path) -> None:
    info = store.put("fresh", _write(tmp_path / "src", b"xyz"), overwrite=True)
    assert store.head("fresh").etag == info.etag
    assert store.read_range("fresh", 0, 3) == b"xyz"


# -- 3. large objects: multipart on S3, failures leave nothing behind ----------------------


@pytest.mark.parametrize(
    "size", [0, 1, MULTIPART_THRESHOLD + 1, 80 * GiB, 1 * TiB, 5 * TiB - 1, 5 * TiB]
)
def test_part_size_for_respects_s3_limits(size: int) -> None:
    part = part_size_for(size)
    assert part >= MIN_PART_SIZE >= 8 * MiB
    assert part % MiB == 0
    assert part <= 5 * GiB  # S3's largest part
    assert math.ceil(size / part) <= MAX_PARTS == 10_000


def test_failed_put_leaves_nothing_behind(
    store: Store, big_files: tuple[Path, Path], leftovers: Callable[[], list[str]]
) -> None:
    def fail(_: int) -> None:
        raise _Boom("the progress bar was interrupted")

    with pytest.raises(_Boom):
        store.put("big", big_files[0], overwrite=False, progress=fail)

    assert leftovers() == []
    with pytest.raises(KeyNotFoundError):
        store.head("big")
    assert _keys(store) == []
    # The key is still free to be created.
    store.put("big", big_files[1], overwrite=False)
    assert store.head("big").size == BIG


def test_failed_overwrite_keeps_the_old_version(
    store: Store, tmp_path: Path, big_files: tuple[Path, Path], leftovers: Callable[[], list[str]]
) -> None:
    old = store.put("big", big_files[0], overwrite=False)

    def fail(_: int) -> None:
        raise _Boom("interrupted")

    with pytest.raises(_Boom):
        store.put("big", big_files[1], overwrite=True, progress=fail)

    assert leftovers() == []
    assert store.head("big").etag == old.etag
    store.get("big", tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == big_files[0].read_bytes()


def test_object_is_invisible_until_its_put_completes(
    store: Store, big_files: tuple[Path, Path]
) -> None:
    seen: list[tuple[str, list[str]]] = []
    lock = threading.Lock()  # S3 reports progress from its upload threads

    def look(_: int) -> None:
        with lock:
            if seen:
                return
            try:
                store.head("big")
                found = "visible"
            except KeyNotFoundError:
                found = "absent"
            seen.append((found, _keys(store)))

    store.put("big", big_files[0], overwrite=False, progress=look)

    assert seen == [("absent", [])]
    assert _keys(store) == ["big"]


def test_get_never_mixes_two_versions(
    store: Store, tmp_path: Path, big_files: tuple[Path, Path]
) -> None:
    """The key is replaced while a download is under way: the result is one whole version,
    and the returned etag names that version."""
    old_bytes, new_bytes = big_files[0].read_bytes(), big_files[1].read_bytes()
    old = store.put("big", big_files[0], overwrite=False)
    replaced: list[ObjectInfo] = []
    lock = threading.Lock()

    def replace_once(_: int) -> None:
        with lock:
            if not replaced:
                replaced.append(store.put("big", big_files[1], overwrite=True))

    dest = tmp_path / "dest"
    got = store.get("big", dest, progress=replace_once)

    assert replaced, "the download reported no progress before it finished"
    result = dest.read_bytes()
    assert result in (old_bytes, new_bytes), "the download mixed two versions"
    assert got.size == BIG
    assert got.etag == (old.etag if result == old_bytes else replaced[0].etag)


# -- 4. the race: two writers, one new key -------------------------------------------------


def _race(writers: list[Store], key: str, sources: list[Path]) -> list[Any]:
    barrier = threading.Barrier(len(writers))
    results: list[Any] = [None] * len(writers)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = writers[i].put(key, sources[i], overwrite=False)
        except BaseException as exc:  # reported through results
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a writer hung"
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("size", "trials"), [(1000, SMALL_RACES), (MEDIUM, LARGE_RACES)], ids=["small", "multipart"]
)
def test_concurrent_creates_exactly_one_wins(
    make_store: Callable[[], Store],
    tmp_path: Path,
    leftovers: Callable[[], list[str]],
    size: int,
    trials: int,
) -> None:
    writers = [make_store(), make_store()]  # two clients, as two machines would have
    reader = make_store()
    for trial in range(trials):
        sources = [_write(tmp_path / f"t{trial}" / f"w{i}", os.urandom(size)) for i in range(2)]
        key = f"race/{trial}"
        results = _race(writers, key, sources)

        winners = [i for i, r in enumerate(results) if isinstance(r, ObjectInfo)]
        losers = [i for i, r in enumerate(results) if isinstance(r, KeyExistsError)]
        assert len(winners) == 1 and len(losers) == 1, f"trial {trial}: {results!r}"
        winner = results[winners[0]]
        dest = tmp_path / f"t{trial}" / "stored"
        got = reader.get(key, dest)
        assert dest.read_bytes() == sources[winners[0]].read_bytes(), f"trial {trial}"
        assert got.etag == winner.etag == reader.head(key).etag
    assert leftovers() == []
    assert _keys(reader, "race/") == sorted(f"race/{t}" for t in range(trials))


# -- 5. read_tail / read_range -------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, MEDIUM], ids=["small", "multipart"])
def test_read_tail(store: Store, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    put = store.put("t", _write(tmp_path / "src", data), overwrite=False)
    for length in (1, 10, size // 2, size - 1, size, size + 1, 10 * size):
        tail, info = store.read_tail("t", length)
        assert tail == data[-length:], f"length {length}"
        assert (info.key, info.size, info.etag) == ("t", size, put.etag), f"length {length}"


@pytest.mark.parametrize("size", [1000, MEDIUM], ids=["small", "multipart"])
def test_read_range(store: Store, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    store.put("r", _write(tmp_path / "src", data), overwrite=False)
    for offset, length in [
        (0, 1),
        (0, size),
        (10, 100),
        (size // 2, size // 4),
        (size - 5, 5),
        (size - 1, 1),
    ]:
        assert store.read_range("r", offset, length) == data[offset : offset + length]
    # A range running past the end gives the bytes that exist.
    assert store.read_range("r", size - 5, 10) == data[-5:]


def test_read_range_of_zero_bytes_is_empty(store: Store, tmp_path: Path) -> None:
    store.put("r", _write(tmp_path / "src", b"0123456789"), overwrite=False)
    assert store.read_range("r", 2, 0) == b""


# -- 6. delete and missing keys ------------------------------------------------------------


def test_delete(store: Store, tmp_path: Path) -> None:
    src = _write(tmp_path / "src", b"payload")
    for key in ("a/b/c", "a/x", "top"):
        store.put(key, src, overwrite=False)

    store.delete("a/b/c")

    assert _keys(store) == ["a/x", "top"]
    with pytest.raises(KeyNotFoundError):
        store.head("a/b/c")
    with pytest.raises(KeyNotFoundError) as caught:
        store.delete("a/b/c")
    assert caught.value.key == "a/b/c"
    _one_line(caught.value)
    assert store.read_range("a/x", 0, 7) == b"payload"  # the sibling is untouched
    # The key can be created again (with overwrite=False) once deleted.
    store.put("a/b/c", _write(tmp_path / "again", b"again"), overwrite=False)
    assert store.read_range("a/b/c", 0, 5) == b"again"

    for key in ("a/b/c", "a/x", "top"):
        store.delete(key)
    assert _keys(store) == []
    store.check()  # the store itself survives losing its last key
    store.put("z", src, overwrite=False)
    assert _keys(store) == ["z"]


@pytest.mark.parametrize("key", ["nope", "no/such/key", "a/b", "a/b/c/d"])
def test_missing_keys(store: Store, tmp_path: Path, key: str) -> None:
    # Neighbours exist: "a" is a key, and a prefix of "a/b"; "a/b/c" is a key below "a/b".
    src = _write(tmp_path / "src", b"neighbour")
    store.put("a", src, overwrite=False)
    store.put("a/b/c", src, overwrite=False)
    dest = tmp_path / "dest"

    operations: dict[str, Callable[[], object]] = {
        "head": lambda: store.head(key),
        "get": lambda: store.get(key, dest),
        "read_tail": lambda: store.read_tail(key, 10),
        "read_range": lambda: store.read_range(key, 0, 4),
        "delete": lambda: store.delete(key),
    }
    for name, operation in operations.items():
        with pytest.raises(KeyNotFoundError) as caught:
            operation()
        assert isinstance(caught.value, KeyError), name
        assert caught.value.key == key, name
        assert repr(key) in _one_line(caught.value), name
        assert not dest.exists(), f"{name} left a dest file behind"
    assert _keys(store) == ["a", "a/b/c"]


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "trailing/", "../up", "a/./b", "back\\slash", " pad", 42]
)
def test_invalid_keys_are_refused(store: Store, tmp_path: Path, key: Any) -> None:
    src = _write(tmp_path / "src", b"x")
    operations: dict[str, Callable[[], object]] = {
        "put": lambda: store.put(key, src, overwrite=False),
        "put-overwrite": lambda: store.put(key, src, overwrite=True),
        "head": lambda: store.head(key),
        "get": lambda: store.get(key, tmp_path / "dest"),
        "read_tail": lambda: store.read_tail(key, 1),
        "read_range": lambda: store.read_range(key, 0, 1),
        "delete": lambda: store.delete(key),
    }
    for name, operation in operations.items():
        with pytest.raises(InvalidKeyError):
            operation()
        assert not (tmp_path / "dest").exists(), name
    assert _keys(store) == []


@pytest.mark.parametrize("prefix", ["/a", "a//", "../x", "a/../b"])
def test_invalid_list_prefix_is_refused(store: Store, prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        list(store.list(prefix))


# -- 7. list -------------------------------------------------------------------------------

LIST_KEYS = ["b", "a", "a/b", "a/b/c", "a-b", "ab", "a0", "a/bc", "é", "z"]


def test_list_order_sizes_and_prefixes(store: Store, tmp_path: Path) -> None:
    etags = {}
    for n, key in enumerate(LIST_KEYS, start=1):
        etags[key] = store.put(key, _write(tmp_path / f"src{n}", b"x" * n), overwrite=False).etag

    infos = list(store.list())
    assert [i.key for i in infos] == ["a", "a-b", "a/b", "a/b/c", "a/bc", "a0", "ab", "b", "z", "é"]
    for info in infos:
        assert info.size == LIST_KEYS.index(info.key) + 1, info.key
        assert info.etag == etags[info.key] == store.head(info.key).etag, info.key

    assert _keys(store, "a/") == ["a/b", "a/b/c", "a/bc"]
    assert _keys(store, "ab") == ["ab"]
    assert _keys(store, "a") == ["a", "a-b", "a/b", "a/b/c", "a/bc", "a0", "ab"]
    assert _keys(store, "a/b") == ["a/b", "a/b/c", "a/bc"]
    assert _keys(store, "a/b/") == ["a/b/c"]
    assert _keys(store, "a/b/c") == ["a/b/c"]
    assert _keys(store, "a/b/c/") == []
    assert _keys(store, "é") == ["é"]
    assert _keys(store, "zz") == []
    assert _keys(store, "nothing/here/") == []


def test_list_of_empty_store_is_empty(store: Store) -> None:
    assert list(store.list()) == []
    assert list(store.list("a/")) == []


def test_key_and_its_prefix_coexist(store: Store, tmp_path: Path) -> None:
    store.put("a", _write(tmp_path / "one", b"outer"), overwrite=False)
    store.put("a/b", _write(tmp_path / "two", b"inner!"), overwrite=False)
    store.put("a/b/c", _write(tmp_path / "three", b"innermost"), overwrite=False)

    assert [(i.key, i.size) for i in store.list()] == [("a", 5), ("a/b", 6), ("a/b/c", 9)]
    store.get("a", tmp_path / "got_a")
    store.get("a/b", tmp_path / "got_ab")
    assert (tmp_path / "got_a").read_bytes() == b"outer"
    assert (tmp_path / "got_ab").read_bytes() == b"inner!"

    store.delete("a/b")
    assert _keys(store) == ["a", "a/b/c"]
    store.delete("a")
    assert _keys(store) == ["a/b/c"]
    assert store.read_range("a/b/c", 0, 9) == b"innermost"


# -- 7a. one level (list_level) -------------------------------------------------------------

LEVEL_KEYS = ["a", "a/b", "a/c/d", "a/c/e", "a-b", "a0", "b", "z/y/x", "é"]


def _names(level: Any) -> list[str]:
    return [*level.prefixes, *(o.key for o in level.objects)]


class _Sent:
    """The S3 operations a client sends (a botocore ``before-send`` hook)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, event_name: str, **_: Any) -> None:
        self.names.append(event_name.rsplit(".", 1)[-1])


class _ViaList(CountingStore):
    """The same store, its levels from Store.list_level's default (a walk of list())."""

    list_level = Store.list_level


def _all_pages(store: Store, prefix: str, limit: int) -> list[Any]:
    pages = [store.list_level(prefix, limit=limit)]
    while pages[-1].token is not None:
        pages.append(store.list_level(prefix, token=pages[-1].token, limit=limit))
        assert len(pages) < 50, "the token never ran out"
    return pages


def test_list_level_shows_one_level(store: Store, tmp_path: Path) -> None:
    etags = {}
    for n, key in enumerate(LEVEL_KEYS, start=1):
        etags[key] = store.put(key, _write(tmp_path / f"src{n}", b"x" * n), overwrite=False).etag

    for via in (store, _ViaList(store)):
        root = via.list_level()
        assert root.prefix == "" and root.token is None
        assert root.prefixes == ["a/", "z/"]  # "z/y/x" rolls up into "z/"
        assert [o.key for o in root.objects] == ["a", "a-b", "a0", "b", "é"]
        for info in root.objects:
            assert info.size == LEVEL_KEYS.index(info.key) + 1, info.key
            assert info.etag == etags[info.key], info.key
            assert info.last_modified is not None
        assert _names(via.list_level("a/")) == ["a/c/", "a/b"]
        assert _names(via.list_level("a/c/")) == ["a/c/d", "a/c/e"]
        assert _names(via.list_level("z/")) == ["z/y/"]
        assert _names(via.list_level("z/y/")) == ["z/y/x"]
        # A partial last part filters the level's names by their start.
        assert _names(via.list_level("a")) == ["a/", "a", "a-b", "a0"]
        assert _names(via.list_level("a/c")) == ["a/c/"]
        assert _names(via.list_level("é")) == ["é"]
        assert _names(via.list_level("nothing/")) == []
        assert _names(via.list_level("a/b/")) == []  # a key is not a prefix


def test_list_level_of_empty_store_is_empty(store: Store) -> None:
    level = store.list_level()
    assert (level.prefixes, level.objects, level.token) == ([], [], None)


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 1000])
def test_list_level_pages(store: Store, tmp_path: Path, limit: int) -> None:
    """A key 'a' and a prefix 'a/' side by side, paged at every boundary: each page holds at
    most ``limit`` names, and the pages together are the level, each name once."""
    for n, key in enumerate([*LEVEL_KEYS, "a/x", "m/1", "m/2", "n"]):
        store.put(key, _write(tmp_path / f"src{n}", b"x"), overwrite=False)
    expected = ["a", "a-b", "a/", "a0", "b", "m/", "n", "z/", "é"]  # by name, as S3 orders

    for via in (store, _ViaList(store)):
        pages = _all_pages(via, "", limit)
        for page in pages:
            assert 0 < len(_names(page)) <= limit
            assert page.prefix == ""
        listed = sorted(name for page in pages for name in _names(page))
        assert listed == expected
        assert len(pages) == -(-len(expected) // limit)
        assert [o.key for p in _all_pages(via, "a/", limit) for o in p.objects] == ["a/b", "a/x"]


def test_list_level_skips_what_is_not_an_object(
    backend: str, store: Store, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store.put("team/v1", _write(tmp_path / "v1", b"v1"), overwrite=False)
    store.put("top", _write(tmp_path / "top", b"top"), overwrite=False)
    if backend == "local":  # what other programs and crashed pushes leave in a shared folder
        root = tmp_path / "store"
        _write(root / "notes.txt", b"not an object")
        _write(root / ".top.daman.0123abcd.incomplete", b"partial")
        _write(root / "foreign" / "readme.md", b"not an object")
        (root / "empty" / "deeper").mkdir(parents=True)
        _write(root / "odd.daman" / "x.daman", b"a folder no key can name")
    else:  # "folder" markers made in the S3 console, and a name no key can have
        raw = _raw_client(request.getfixturevalue("s3_endpoint"))
        name, outer = _split(request.getfixturevalue("bucket"))
        for marker in ("team/", "empty/", "bad//x"):
            raw.put_object(Bucket=name, Key=f"{outer}{marker}", Body=b"")
        raw.close()
    # S3 rolls a marker up into its prefix before daman sees it: "empty/" and "bad/" are
    # shown (one request cannot tell), and are empty when opened.
    extra = ["bad/", "empty/"] if backend == "s3" else []
    assert _names(store.list_level()) == [*extra, "team/", "top"]
    assert _names(store.list_level("team/")) == ["team/v1"]
    assert _names(store.list_level("empty/")) == []
    assert _names(store.list_level("bad/")) == []


def test_s3_list_level_sends_one_request_per_page(s3_endpoint: str, bucket: str) -> None:
    store = S3Store.from_config(_s3_config(bucket, s3_endpoint))
    raw = _raw_client(s3_endpoint)
    name, outer = _split(bucket)
    try:
        for p in range(5):
            for k in range(40):
                raw.put_object(Bucket=name, Key=f"{outer}p{p}/k{k:03d}", Body=b"x")
        raw.put_object(Bucket=name, Key=f"{outer}loose", Body=b"x")
        sent = _Sent()
        store.client.meta.events.register("before-send.s3.*", sent)
        params: list[dict[str, Any]] = []
        store.client.meta.events.register(
            "provide-client-params.s3.ListObjectsV2", lambda params, **_: params_seen(params)
        )

        def params_seen(given: dict[str, Any]) -> None:
            params.append(dict(given))

        level = store.list_level()
        assert _names(level) == ["p0/", "p1/", "p2/", "p3/", "p4/", "loose"]
        assert sent.names == ["ListObjectsV2"]
        assert params[0]["Delimiter"] == "/" and params[0]["MaxKeys"] == 1000
        pages = _all_pages(store, "p1/", 15)
        assert [len(page.objects) for page in pages] == [15, 15, 10]
        assert sent.names.count("ListObjectsV2") == 4
        assert [p.get("MaxKeys") for p in params[1:]] == [15, 15, 15]
    finally:
        store.close()
        _empty_bucket(raw, name, outer)
        raw.close()


# -- 7b. local-folder specifics ------------------------------------------------------------


def test_local_list_level_reads_only_the_objects_of_its_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import daman.store.local as local

    store = LocalStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    for key in ["k1", "k2", "k3", *(f"deep/{n:02d}" for n in range(20))]:
        store.put(key, _write(tmp_path / "src", b"x"), overwrite=False)
    read: list[str] = []
    info = local._info
    monkeypatch.setattr(local, "_info", lambda key, f: read.append(key) or info(key, f))
    assert _names(store.list_level(limit=3)) == ["deep/", "k1", "k2"]
    assert read == ["k1", "k2"]  # not the 20 keys under deep/


def test_local_temp_and_foreign_files_are_never_listed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    store.put("sub/k", _write(tmp_path / "src", b"data"), overwrite=False)
    # What crashed writers and other programs leave in a shared folder.
    _write(root / ".k.daman.0123abcd.incomplete", b"partial")
    _write(root / "sub" / ".x.daman.4567.incomplete", b"partial")
    _write(root / "notes.txt", b"not an object")
    _write(root / "sub" / "readme", b"not an object")

    assert _keys(store) == ["sub/k"]

    during: list[list[str]] = []
    temp_files: list[list[str]] = []

    def look(_: int) -> None:
        during.append(_keys(store))
        temp_files.append([p.name for p in (root / "new").glob("*.incomplete")])

    store.put("new/key", _write(tmp_path / "src2", b"more"), overwrite=False, progress=look)

    assert temp_files and all(temp_files), "expected a temp file to exist during the put"
    assert during and all(keys == ["sub/k"] for keys in during)
    assert _keys(store) == ["new/key", "sub/k"]
    assert list((root / "new").glob("*.incomplete")) == []


@pytest.mark.parametrize("key", ["a.daman/b", "x/y.daman/z", "p.daman/q.daman"])
def test_local_folder_part_ending_in_suffix_is_refused(tmp_path: Path, key: str) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    src = _write(tmp_path / "src", b"x")
    operations: dict[str, Callable[[], object]] = {
        "put": lambda: store.put(key, src, overwrite=False),
        "head": lambda: store.head(key),
        "get": lambda: store.get(key, tmp_path / "dest"),
        "read_tail": lambda: store.read_tail(key, 1),
        "delete": lambda: store.delete(key),
    }
    for name, operation in operations.items():
        with pytest.raises(InvalidKeyError) as caught:
            operation()
        assert ".daman" in _one_line(caught.value), name
    assert list(root.iterdir()) == []  # no folder was made for the refused key


def test_local_final_part_may_end_in_suffix(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    store.put("x/y.daman", _write(tmp_path / "one", b"suffixed"), overwrite=False)
    store.put("x/y", _write(tmp_path / "two", b"plain"), overwrite=False)
    assert _keys(store) == ["x/y", "x/y.daman"]
    assert store.read_range("x/y.daman", 0, 8) == b"suffixed"
    assert store.read_range("x/y", 0, 5) == b"plain"


def test_local_delete_prunes_empty_folders_but_keeps_the_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    store.put("deep/er/key", _write(tmp_path / "src", b"x"), overwrite=False)
    store.delete("deep/er/key")
    assert root.is_dir()
    assert list(root.iterdir()) == []


# -- 8. storage that does not exist, credentials, unreachable endpoints --------------------

_OPERATIONS = ["check", "head", "get", "put", "put-multipart", "list", "read_tail", "delete"]


def _call(store: Store, operation: str, tmp_path: Path) -> object:
    if operation == "check":
        return store.check()
    if operation == "head":
        return store.head("k")
    if operation == "get":
        return store.get("k", tmp_path / "dest")
    if operation == "put":
        return store.put("k", _write(tmp_path / "src", b"abc"), overwrite=False)
    if operation == "put-multipart":
        return store.put("k", _write(tmp_path / "big", os.urandom(MEDIUM)), overwrite=False)
    if operation == "list":
        return list(store.list())
    if operation == "read_tail":
        return store.read_tail("k", 10)
    if operation == "delete":
        return store.delete("k")
    raise AssertionError(operation)


@pytest.mark.parametrize("operation", _OPERATIONS)
def test_missing_storage(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, operation: str
) -> None:
    if backend == "local":
        root = tmp_path / "no" / "such" / "folder"
        store: Store = LocalStore(root)
    elif backend in ("gcs", "azure"):
        name = f"daman-missing-{uuid.uuid4().hex[:12]}"
        store = open_store(request.getfixturevalue("make_config")(storage_name=name))
    else:
        name = f"daman-missing-{uuid.uuid4().hex[:12]}"
        store = S3Store.from_config(_s3_config(name, request.getfixturevalue("s3_endpoint")))
    try:
        with pytest.raises(StorageNotFoundError) as caught:
            _call(store, operation, tmp_path)
    finally:
        store.close()
    assert isinstance(caught.value, FileNotFoundError)
    message = _one_line(caught.value)
    assert "dm_configure" in message
    assert not (tmp_path / "dest").exists()
    if backend == "local":
        assert not (tmp_path / "no").exists(), "the missing folder was created"


def test_local_store_on_a_file_is_missing_storage(tmp_path: Path) -> None:
    store = LocalStore(_write(tmp_path / "a_file", b"not a folder"))
    with pytest.raises(StorageNotFoundError):
        store.check()
    with pytest.raises(StorageNotFoundError):
        list(store.list())


@pytest.fixture
def no_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, bucket: str
) -> str:
    """An environment in which botocore finds no credentials anywhere, quickly (set up after
    ``bucket``, which needs credentials to create the bucket)."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "aws-empty"
    empty.mkdir()
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(_write(empty / "credentials", b"")))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(_write(empty / "config", b"")))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_endpoint


@pytest.mark.timeout(60)
@pytest.mark.parametrize("operation", _OPERATIONS)
def test_no_credentials(no_credentials: str, bucket: str, tmp_path: Path, operation: str) -> None:
    store = S3Store.from_config(_s3_config(bucket, no_credentials))
    try:
        with pytest.raises(CredentialsError) as caught:
            _call(store, operation, tmp_path)
    finally:
        store.close()
    assert isinstance(caught.value, PermissionError)
    assert "dm_aws" in _one_line(caught.value)
    assert not (tmp_path / "dest").exists()


@pytest.mark.timeout(60)
def test_partial_credentials(
    no_credentials: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDONLY")  # the secret is missing
    with pytest.raises(CredentialsError) as caught:
        store = S3Store.from_config(_s3_config(bucket, no_credentials))
        try:
            store.head("k")
        finally:
            store.close()
    assert "dm_aws" in _one_line(caught.value)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("operation", [*_OPERATIONS, "read_range"])
def test_unreachable_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    # Credentials are needed to get as far as the network (the session's may not be set yet).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    config = _s3_config("some-bucket", endpoint, connect_timeout=1, read_timeout=2, max_attempts=2)
    store = S3Store.from_config(config)
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            if operation == "read_range":
                store.read_range("k", 0, 10)
            else:
                _call(store, operation, tmp_path)
    finally:
        store.close()
    assert isinstance(caught.value, ConnectionError)
    assert "some-bucket" in _one_line(caught.value)
    assert not (tmp_path / "dest").exists()


# -- 9. checksum settings ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["when_supported", "when_required"])
def test_checksum_modes_reach_the_client_and_work(
    s3_endpoint: str, bucket: str, s3_raw: Any, tmp_path: Path, mode: str
) -> None:
    store = S3Store.from_config(_s3_config(bucket, s3_endpoint, checksums=mode))
    try:
        assert store.client.meta.config.request_checksum_calculation == mode
        for key, size in (("small", 1000), ("multipart", MEDIUM)):
            data = os.urandom(size)
            put = store.put(key, _write(tmp_path / key, data), overwrite=False)
            got = store.get(key, tmp_path / f"{key}.out")
            assert (tmp_path / f"{key}.out").read_bytes() == data, key
            assert got.etag == put.etag, key
            with pytest.raises(KeyExistsError):
                store.put(key, _write(tmp_path / f"{key}.2", os.urandom(size)), overwrite=False)
        assert _open_uploads(s3_raw, *_split(bucket)) == []
    finally:
        store.close()
        _empty_bucket(s3_raw, *_split(bucket))


def test_default_checksum_mode(s3_endpoint: str, bucket: str) -> None:
    config = Config(service="aws", storage_name=bucket, endpoint_url=s3_endpoint)
    assert config.checksums == "when_supported"
    store = S3Store.from_config(config)
    try:
        assert store.client.meta.config.request_checksum_calculation == "when_supported"
    finally:
        store.close()


def test_unknown_checksum_mode_is_a_config_error(bucket: str) -> None:
    with pytest.raises(DamanError, match="checksums"):
        Config(service="aws", storage_name=bucket, checksums="always")


# -- 10. bucket prefixes -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["some/prefix", "some/prefix/"])
def test_storage_prefix(
    s3_endpoint: str, bucket: str, s3_raw: Any, tmp_path: Path, suffix: str
) -> None:
    raw_bucket, outer = _split(bucket)
    prefix = f"{outer}some/prefix/"
    store = S3Store.from_config(_s3_config(f"{bucket}/{suffix}", s3_endpoint))
    try:
        store.put("k", _write(tmp_path / "k", b"kk"), overwrite=False)
        store.put("d/e", _write(tmp_path / "e", b"eee"), overwrite=False)
        big = os.urandom(MEDIUM)
        store.put("big", _write(tmp_path / "big", big), overwrite=False)
        # Neighbours of the prefix that the store must not see.
        for name in (f"{outer}some/prefixk", f"{outer}some/prefix-other/k", f"{outer}some/k"):
            s3_raw.put_object(Bucket=raw_bucket, Key=name, Body=b"foreign")

        raw_keys = [
            item["Key"]
            for item in s3_raw.list_objects_v2(Bucket=raw_bucket, Prefix=prefix).get("Contents", [])
        ]
        assert sorted(raw_keys) == [f"{prefix}big", f"{prefix}d/e", f"{prefix}k"]
        stored = s3_raw.get_object(Bucket=raw_bucket, Key=f"{prefix}big")["Body"].read()
        assert stored == big
        assert [(i.key, i.size) for i in store.list()] == [("big", MEDIUM), ("d/e", 3), ("k", 2)]
        assert _keys(store, "d/") == ["d/e"]
        assert _keys(store, "k") == ["k"]
        with pytest.raises(KeyNotFoundError):
            store.head("prefixk")
        assert store.read_range("k", 0, 2) == b"kk"

        store.delete("k")
        assert "Contents" not in s3_raw.list_objects_v2(Bucket=raw_bucket, Prefix=f"{prefix}k")
        assert _open_uploads(s3_raw, raw_bucket, prefix) == []
    finally:
        store.close()
        _empty_bucket(s3_raw, raw_bucket, outer)


def test_listing_yields_only_usable_keys(
    s3_endpoint: str, bucket: str, s3_raw: Any, tmp_path: Path
) -> None:
    """A bucket "folder" made in the S3 console is a 0-byte object whose name ends in '/'.
    Listing must not return it as a key that head/get then refuse."""
    raw_bucket, outer = _split(bucket)
    store = S3Store.from_config(_s3_config(f"{bucket}/shared", s3_endpoint))
    try:
        store.put("team/v1", _write(tmp_path / "v1", b"v1"), overwrite=False)
        for marker in (f"{outer}shared/", f"{outer}shared/team/"):
            s3_raw.put_object(Bucket=raw_bucket, Key=marker, Body=b"")
        keys = _keys(store)
        for key in keys:
            store.head(key)  # every listed key is usable
        assert keys == ["team/v1"]
    finally:
        store.close()
        _empty_bucket(s3_raw, raw_bucket, outer)


def test_local_version_follows_the_content_not_the_inode_or_mtime(tmp_path: Path) -> None:
    """Shares with coarse mtimes and reused inodes must still tell two versions apart."""
    from daman.serialize import dump_to_bytes

    store = LocalStore(tmp_path / "store")
    (tmp_path / "store").mkdir()
    first, second = tmp_path / "v1", tmp_path / "v2"
    first.write_bytes(dump_to_bytes(b"a" * 100))
    second.write_bytes(dump_to_bytes(b"b" * 100))
    assert first.stat().st_size == second.stat().st_size
    v1 = store.put("k", first, overwrite=False)
    stored = store._path("k")
    when = stored.stat().st_mtime_ns
    stored.write_bytes(second.read_bytes())  # same inode, same size
    os.utime(stored, ns=(when, when))  # same mtime
    assert store.head("k").etag != v1.etag
    assert store.head("k").etag == store.head("k").etag


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.ENOSPC, "LocalFileError"),
        (errno.EFBIG, "LocalFileError"),
        (errno.ENAMETOOLONG, "LocalFileError"),
        (errno.EACCES, "CredentialsError"),
        (errno.EROFS, "CredentialsError"),
        (errno.ESTALE, "StoreUnavailableError"),
        (errno.EIO, "StoreUnavailableError"),
    ],
)
def test_local_store_maps_os_errors_to_daman_errors(tmp_path: Path, code: int, error: str):
    import daman.errors

    store = LocalStore(tmp_path)
    with pytest.raises(getattr(daman.errors, error), match=str(tmp_path)), store._os_errors():
        raise OSError(code, os.strerror(code), str(tmp_path / "x"))


def test_parallel_transfer_stops_at_the_first_failing_part() -> None:
    """A failing part cancels the parts not yet started and tells running ones to stop."""
    from daman.store import _transfer

    started: list[int] = []
    told_to_stop: list[bool] = []
    lock = threading.Lock()

    def part(number: int, stop: threading.Event) -> int:
        with lock:
            started.append(number)
        if number == 0:
            raise OSError("part 0 failed")
        told_to_stop.append(stop.wait(10))  # a running part, busy until told to stop
        raise _transfer.Stopped

    tasks = [functools.partial(part, n) for n in range(200)]
    with pytest.raises(OSError, match="part 0 failed"):
        _transfer.run_parallel(tasks)
    assert len(started) <= _transfer.TRANSFER_THREADS + 1  # the rest were cancelled, never started
    assert told_to_stop and all(told_to_stop)


def test_local_listing_survives_files_it_cannot_read_the_footer_of(tmp_path: Path) -> None:
    """A file from a newer daman (or not daman's) still lists and heads, by inode version."""
    import json as json_module

    from daman.serialize import MAGIC, TRAILER

    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    footer = json_module.dumps({"format": 99}).encode()
    (root / "future.daman").write_bytes(b"payload" + footer + TRAILER.pack(MAGIC, len(footer)))
    (root / "tiny.daman").write_bytes(b"x")
    assert _keys(store) == ["future", "tiny"]
    assert store.head("future").size == (root / "future.daman").stat().st_size


def test_local_head_reads_only_the_trailer_and_footer(tmp_path: Path) -> None:
    from daman.serialize import dump_to_bytes

    def bytes_read() -> int:
        line = next(x for x in Path("/proc/self/io").read_text().splitlines() if "rchar" in x)
        return int(line.split()[1])

    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    store.put("k", _write(tmp_path / "src", dump_to_bytes(os.urandom(1_000_000))), overwrite=False)
    before = bytes_read()
    store.head("k")
    assert bytes_read() - before < 16 * 1024  # not the 64 KiB tail, not the object


def test_download_from_a_server_that_ignores_range(bucket: str, tmp_path: Path) -> None:
    """Some S3-compatible servers answer a ranged GET with the whole object (200, no
    Content-Range). A second HTTP front on the same in-process moto data drops the Range
    header to play one."""
    if os.environ.get("DAMAN_TEST_S3_ENDPOINT"):
        pytest.skip("needs the in-process moto server's data")
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    moto_app = DomainDispatcherApplication(create_backend_app)

    def ignore_range(environ: dict, start_response: Any) -> Any:
        environ.pop("HTTP_RANGE", None)
        return moto_app(environ, start_response)

    server = make_server("127.0.0.1", 0, ignore_range, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}"
        store = S3Store.from_config(
            Config(service="aws", storage_name=bucket, endpoint_url=endpoint, region="us-east-1")
        )
        data = os.urandom(MULTIPART_THRESHOLD * 2 + 123)
        store.put("whole", _write(tmp_path / "src", data), overwrite=False)
        info = store.get("whole", tmp_path / "dest")
        assert (tmp_path / "dest").read_bytes() == data and info.size == len(data)
    finally:
        server.shutdown()
        thread.join()


def test_s3_asks_about_the_bucket_only_on_its_first_404(bucket: str, s3_endpoint: str) -> None:
    """A HEAD 404 is ambiguous (missing key or missing bucket): one head_bucket settles it,
    once per store, so later misses cost one request each."""
    store = S3Store.from_config(_s3_config(bucket, s3_endpoint))
    sent: list[str] = []
    store.client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(request.method)
    )
    for _ in range(3):
        with pytest.raises(KeyNotFoundError):
            store.head("missing")
    assert sent == ["HEAD", "HEAD", "HEAD", "HEAD"]  # 3 object HEADs + 1 bucket HEAD


# -- one request each way up to the threshold, balanced parts, one pool (issue 13) ------------


def _sent(store: S3Store) -> list[tuple[str, str, int]]:
    """(operation, Range header, body length) of every request ``store`` sends from now on."""
    sent: list[tuple[str, str, int]] = []

    def record(request: Any, event_name: str, **_: Any) -> None:
        length = int(request.headers.get("Content-Length", -1))
        sent.append((event_name.rsplit(".", 1)[-1], request.headers.get("Range", b""), length))

    store.client.meta.events.register("before-send.s3", record)
    return sent


@pytest.mark.parametrize(
    "size", [MULTIPART_THRESHOLD, MULTIPART_THRESHOLD + 1, 3 * MULTIPART_THRESHOLD + 5]
)
def test_requests_up_to_the_threshold_one_each_way_then_balanced_parts(
    bucket: str, s3_endpoint: str, tmp_path: Path, size: int
) -> None:
    store = S3Store.from_config(_s3_config(bucket, s3_endpoint))
    sent = _sent(store)
    data = os.urandom(size)
    store.put("k", _write(tmp_path / "src", data), overwrite=False)
    uploads = [(op, n) for op, _, n in sent]
    sent.clear()
    store.get("k", tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == data
    gets = [op for op, _, _ in sent]
    if size <= MULTIPART_THRESHOLD:
        assert [op for op, _ in uploads] == ["PutObject"]
        assert gets == ["GetObject"]
        return
    # The conditional completion decides; one HEAD beside the parts refuses an existing key
    # on servers that ignore the condition (its 404 asks once whether the bucket exists).
    assert [op for op, _ in uploads].count("HeadObject") == 1
    parts = sorted(n for op, n in uploads if op == "UploadPart")
    assert [op for op, _ in uploads].count("CreateMultipartUpload") == 1
    assert sum(parts) == size and len(parts) >= 2
    assert parts[0] >= MIN_PART_SIZE and parts[-1] - parts[0] <= len(parts)  # none tiny
    assert gets[0] == "GetObject" and len(gets) == 1 + len(split(size - MULTIPART_THRESHOLD))


@pytest.mark.parametrize(
    "size", [1, MiB, MULTIPART_THRESHOLD + 1, 8 * MiB * 32 + 900, 80 * GiB + 1, 5 * TiB]
)
def test_split_covers_every_byte_in_parts_none_of_them_tiny(size: int) -> None:
    parts = split(size, start=7)
    assert parts[0][0] == 7 and sum(n for _, n in parts) == size
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(parts))
    assert len(parts) <= MAX_PARTS and max(n for _, n in parts) <= 5 * GiB
    if size >= 2 * MIN_PART_SIZE:
        assert min(n for _, n in parts) >= MIN_PART_SIZE - len(parts)
    assert max(n for _, n in parts) - min(n for _, n in parts) <= len(parts)


def test_the_rest_of_a_download_starts_with_the_first_answer(
    bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """Ranges past the first are asked for as soon as the first answer's headers give the
    size, not once the first range has arrived."""
    store = S3Store.from_config(_s3_config(bucket, s3_endpoint))
    data = os.urandom(MULTIPART_THRESHOLD + 3 * MiB)
    store.put("k", _write(tmp_path / "src", data), overwrite=False)
    asked = threading.Event()
    first_range_done = []

    def record(request: Any, **_: Any) -> None:
        if not request.headers.get("Range", b"").startswith(b"bytes=0-"):
            asked.set()

    store.client.meta.events.register("before-send.s3.GetObject", record)

    def on_written(offset: int, length: int, data: bytes | memoryview | None = None) -> None:
        if offset == 0:  # the first chunk of the first range: wait for the rest to be asked
            first_range_done.append(asked.wait(30))

    store.get("k", tmp_path / "dest", on_written=on_written)
    assert first_range_done == [True]
    assert (tmp_path / "dest").read_bytes() == data


def test_one_pool_per_store_and_process(bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    """Transfers of one store share its threads; a forked child makes its own pool (the
    parent's threads do not exist there: using its pool would hang)."""
    import multiprocessing

    store = S3Store.from_config(_s3_config(bucket, s3_endpoint))
    src = _write(tmp_path / "src", os.urandom(MULTIPART_THRESHOLD + MiB))
    seen: list[set[int]] = []
    for key in ("a", "b"):
        threads: set[int] = set()
        note = functools.partial(lambda threads, n: threads.add(threading.get_ident()), threads)
        store.put(key, src, overwrite=False, progress=note)
        seen.append(threads)
    parent_pool = store._pool.get()
    pool_threads = {thread.ident for thread in parent_pool._threads}
    assert seen[0] and seen[1] and seen[0] | seen[1] <= pool_threads  # the store's own pool
    assert threading.get_ident() not in pool_threads

    def child(queue: Any) -> None:
        threads: set[int] = set()
        store.put("c", src, overwrite=False, progress=lambda n: threads.add(threading.get_ident()))
        store.get("c", tmp_path / "child-dest")
        queue.put((store._pool.get() is not parent_pool, bool(threads)))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(120)
    if process.is_alive():
        process.kill()
        pytest.fail("the forked child's transfer hung")
    assert process.exitcode == 0 and queue.get(timeout=10) == (True, True)
    assert (tmp_path / "child-dest").read_bytes() == src.read_bytes()
    store.close()
    store.put("d", src, overwrite=False)  # a closed store's next transfer makes a new pool
    assert store.head("d").size == src.stat().st_size


def test_a_quick_local_listing_reads_only_the_versions_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder's versions are in each file's footer (a read per file): ``list_fast`` gives
    sizes and dates from ``stat`` and reads the versions of the keys named only."""
    import daman.store.local as local
    from daman.serialize import dump_to_bytes

    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    for key in ("a", "b/c", "b/d", "e/f/g"):
        store.put(key, _write(tmp_path / "src", dump_to_bytes(key, key=key)), overwrite=False)
    (root / "b" / "x.daman.incomplete").write_bytes(b"a push under way")
    (root / "link.daman").symlink_to(root / "e")  # a link to a folder: neither walked nor listed
    full = {info.key: info for info in store.list()}
    read: list[str] = []
    real_info = local._info
    monkeypatch.setattr(local, "_info", lambda key, f: read.append(key) or real_info(key, f))
    quick = list(store.list_fast(versions={"b/d", "z"}))
    assert [info.key for info in quick] == sorted(full) == ["a", "b/c", "b/d", "e/f/g"]
    assert read == ["b/d"]
    for info in quick:
        expected = full[info.key]
        assert (info.size, info.last_modified) == (expected.size, expected.last_modified)
        assert info.etag == (expected.etag if info.key == "b/d" else "")
    assert [info.key for info in store.list_fast("b/")] == ["b/c", "b/d"]
    assert [info.key for info in store.list_fast("e/f/g")] == ["e/f/g"]


def test_a_listed_object_info_is_the_constructors() -> None:
    from datetime import datetime, timezone

    when = datetime.now(timezone.utc)
    made, listed = ObjectInfo("k", 3, "e", when), ObjectInfo.listed("k", 3, "e", when)
    assert made == listed and vars(made) == vars(listed) and hash(made) == hash(listed)
