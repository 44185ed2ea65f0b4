"""Bad input: keys (property-based, through the whole manager and both stores), objects and
meta that cannot be pickled or fail half-way, objects that cannot be unpickled, and a disc
that fills up during a pull. Each must end in a clear daman error with nothing half-written
left behind: no temp file, no partial upload, the cache and the stored version unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reliability_helpers import (
    assert_cache_consistent,
    check_object,
    finish,
    make_object,
    spawn,
    store_leftovers,
)

from daman import (
    Config,
    DamanError,
    DeserializationError,
    InvalidKeyError,
    LocalFileError,
    Manager,
    SerializationError,
)
from daman.keys import MAX_SEGMENT_BYTES, validate_key
from daman.store.local import SUFFIX, LocalStore

FIXTURES_IN_GIVEN = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def store_files(config: Config) -> set[str]:
    if config.service == "local":
        return {p for p in tree(Path(config.storage_name))}
    return set()


# -- keys ----------------------------------------------------------------------------------------

# Anything but '/' (the separator), controls and lone surrogates: letters of every script,
# punctuation S3 and shells treat specially (? # % + & = * ~ " '), dots, spaces inside,
# combining marks, emoji, right-to-left text, C1 controls, noncharacters.
_segment_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\")
_segment = st.one_of(
    st.text(_segment_chars, min_size=1, max_size=12),
    st.sampled_from([".hidden", "a..b", "...", "%2e%2e", "?x=1&y=2#z", "+ +", "~", "*", "\u0085"]),
    st.text(st.sampled_from("é鍵🙂"), min_size=40, max_size=70),  # near the 200-byte limit
)
keys = st.lists(_segment, min_size=1, max_size=4).map("/".join)


def _accepted(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


@pytest.fixture
def two_machines(make_config, tmp_path: Path) -> Iterator[tuple[Manager, Manager, Config]]:
    config = make_config()
    with Manager(config) as alice, Manager(config.replace(local_dir=str(tmp_path / "bob"))) as bob:
        yield alice, bob, config


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES_IN_GIVEN)
@given(st.lists(keys, min_size=1, max_size=4, unique=True))
def test_any_accepted_key_round_trips_and_stays_inside_its_folders(
    two_machines: tuple[Manager, Manager, Config], tmp_path: Path, batch: list[str]
) -> None:
    """Keys accepted by validate_key are pushed, listed, inspected, pulled by another machine
    and deleted, exactly as named; their files are inside the store folder and local_dir (the
    cache names files by hash); deleting them leaves the store as it was."""
    alice, bob, config = two_machines
    batch = [key for key in batch if _accepted(key)]
    if config.service == "local":  # a folder store cannot have a folder named like an object
        batch = [k for k in batch if not any(p.endswith(SUFFIX) for p in k.split("/")[:-1])]
    assume(batch)
    outside = tree(tmp_path) - {p for p in tree(tmp_path) if p.startswith(("store", "cache"))}
    for key in batch:
        obj, meta = make_object(key, "v1", 100)
        alice.push(obj, key, meta=meta, force=True)
        entry = alice.cache.get(key)
        assert entry is not None and entry.path.parent == alice.cache.objects_dir
        if config.service == "local":
            path = LocalStore(config.storage_name)._path(key)
            assert path.is_file()
            assert path.resolve().is_relative_to(Path(config.storage_name).resolve())
    listed = {item.key for item in alice.ls()}
    assert set(batch) <= listed
    for key in batch:
        assert key in {item.key for item in bob.ls(key)}
        assert bob.info(key).meta == {"key": key, "version": "v1"}
        assert check_object(*bob.pull(key), key) == "v1"
    for key in batch:
        bob.delete(key, remote=True, all_versions=True)  # its history too
        alice.delete(key)
        assert not alice.exists(key)
    assert alice.ls() == [] and store_files(config) == set()
    now = tree(tmp_path) - {p for p in tree(tmp_path) if p.startswith(("store", "cache"))}
    assert {p for p in now - outside if not p.startswith(("bob", "home"))} == set()


_traversal_pieces = st.sampled_from(
    ["..", ".", "/", "//", "\\", "a", "b", "C:", "c:", " ", "\x00", "\n", "~", "%2e%2e",
     "\u2024\u2024", "\uff0e\uff0e", ".daman", "\u202e"]
)  # fmt: skip
traversal_like = st.lists(_traversal_pieces, min_size=1, max_size=8).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES_IN_GIVEN)
@given(traversal_like)
def test_keys_that_could_escape_are_refused_everywhere_and_touch_nothing(
    manager: Manager, config: Config, tmp_path: Path, key: str
) -> None:
    """Strings built from traversal pieces ('..', '/', '\\\\', drive letters, NUL, look-alike
    dots): either refused by every operation with InvalidKeyError before any file is touched,
    or accepted and then stored strictly inside the store folder."""
    before = tree(tmp_path)
    try:
        validate_key(key)
    except InvalidKeyError:
        for call in (
            lambda: manager.push(1, key),
            lambda: manager.push(1, key, force=True),
            lambda: manager.pull(key),
            lambda: manager.fetch(key),
            lambda: manager.delete(key, remote=True),
            lambda: manager.info(key),
            lambda: manager.exists(key),
            lambda: manager.set_persist(key, True),
        ):
            with pytest.raises(InvalidKeyError):
                call()
        assert tree(tmp_path) == before
        return
    parts = key.split("/")
    assert not {"", ".", ".."} & set(parts) and "\\" not in key
    try:
        manager.push(1, key, force=True)
    except InvalidKeyError:  # the folder store's one extra rule
        assert config.service == "local" and any(p.endswith(SUFFIX) for p in parts[:-1])
        return
    if config.service == "local":
        root = Path(config.storage_name).resolve()
        assert LocalStore(root)._path(key).resolve().is_relative_to(root)
    added = tree(tmp_path) - before
    assert all(p.startswith(("store", "cache")) for p in added), added
    manager.delete(key, remote=True)


@pytest.mark.parametrize("key", [None, 1, b"a/b", Path("a/b"), ["a"]])
def test_keys_that_are_not_strings_are_refused(manager: Manager, key: Any) -> None:
    for call in (lambda: manager.push(1, key), lambda: manager.pull(key)):
        with pytest.raises(InvalidKeyError, match="must be a str"):
            call()


def test_the_longest_parts_fit_in_a_store_folder(config: Config, manager: Manager) -> None:
    """A part of MAX_SEGMENT_BYTES (in 1-, 2-, 3- and 4-byte characters) makes file names
    (with the suffix, and the store's temp-file name) that fit the usual 255-byte limit."""
    for char in "a", "é", "鍵", "🙂":
        part = char * (MAX_SEGMENT_BYTES // len(char.encode()))
        key = f"long/{part}/{part}"
        manager.push(1, key)
        assert manager.pull(key, force=True)[0] == 1


# -- objects and meta that cannot be pickled -----------------------------------------------------


class Bomb:
    """Pickling it raises ``exc`` (after whatever was pickled before it hit the file)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> Any:
        raise self.exc


class BadReduce:
    def __reduce__(self) -> Any:
        return "not a tuple and not a global name"


def _generator() -> Iterator[int]:
    yield 1


def _deep(depth: int = 200_000) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    return nested


_TOO_DEEP = _deep()


def _unpicklable() -> st.SearchStrategy[Any]:
    return st.sampled_from(
        [
            Bomb(ValueError("refused")),
            Bomb(RuntimeError("half-way")),
            Bomb(TypeError("no")),
            Bomb(pickle.PicklingError("no")),
            Bomb(RecursionError("deep")),
            Bomb(AttributeError("missing")),
            Bomb(OSError("an OSError without errno")),
            Bomb(MemoryError()),
            BadReduce(),
            threading.Lock(),
            _generator(),
            weakref.ref(Bomb),
            _TOO_DEEP,  # RecursionError inside the pickler
        ]
    )


def _with_bad_part(bad: Any, position: int, depth: int) -> Any:
    """2 MiB of pickle stream already written to the temp file, then ``bad``, nested."""
    inner: Any = bad
    for level in range(depth):
        inner = {"level": level, "x": [inner]} if level % 2 else [inner, level]
    parts: list[Any] = [os.urandom(1024 * 1024), np.arange(1000)]
    parts.insert(position % 3, inner)
    return [b"\1" * 1024 * 1024, *parts]


def _state(manager: Manager, other: Manager, key: str) -> tuple[Any, ...]:
    entry = manager.cache.get(key)
    stored = check_object(*other.pull(key, force=True, memory_only=True), key)
    return entry, stored


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURES_IN_GIVEN)
@given(bad=_unpicklable(), position=st.integers(0, 2), depth=st.integers(0, 30),
       in_meta=st.booleans())  # fmt: skip
def test_what_cannot_be_pickled_changes_nothing(
    two_machines: tuple[Manager, Manager, Config],
    bad: Any,
    position: int,
    depth: int,
    in_meta: bool,
) -> None:
    """An object or a meta that fails while being pickled (after megabytes were written):
    SerializationError, naming the meta when it is the meta; a forced push leaves the stored
    and the cached version as they were, a push of a new key stores nothing; no temp file and
    no partial upload remain."""
    alice, bob, config = two_machines
    obj, meta = make_object("k", "v1")
    alice.push(obj, "k", meta=meta, force=True)
    before = _state(alice, bob, "k")
    bad_value = _with_bad_part(bad, position, depth)
    kwargs = {"meta": bad_value} if in_meta else {}
    value = obj if in_meta else bad_value
    for key, force in (("k", True), ("new", False)):
        with pytest.raises(SerializationError, match="meta" if in_meta else "object") as info:
            alice.push(value, key, force=force, **kwargs)
        assert "\n" not in str(info.value)
    assert _state(alice, bob, "k") == before
    assert not alice.exists("new") and alice.cache.get("new") is None
    assert_cache_consistent(alice)
    assert store_leftovers(config) == []


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(2, "No such file or directory", "/data/lazy.parquet"),
        PermissionError(13, "Permission denied", "/data/secret.csv"),
    ],
    ids=["FileNotFoundError", "PermissionError"],
)
def test_an_object_whose_pickling_raises_an_os_error_is_a_serialization_error(
    manager: Manager, exc: OSError
) -> None:
    with pytest.raises(SerializationError, match="cannot be pickled"):
        manager.push([b"x" * 1000, Bomb(exc)], "k")
    assert not manager.exists("k")
    assert_cache_consistent(manager)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_while_pickling_propagates_and_leaves_nothing(
    two_machines: tuple[Manager, Manager, Config], exc: type[BaseException]
) -> None:
    """Ctrl-C (or sys.exit) in the middle of pickling is not swallowed into a daman error,
    and the clean-up still happens."""
    alice, bob, config = two_machines
    obj, meta = make_object("k", "v1")
    alice.push(obj, "k", meta=meta)
    before = _state(alice, bob, "k")
    with pytest.raises(exc):
        alice.push(_with_bad_part(Bomb(exc()), 1, 3), "k", force=True)
    assert _state(alice, bob, "k") == before
    assert_cache_consistent(alice)
    assert store_leftovers(config) == []


def _fail_loading(message: str) -> None:
    raise ModuleNotFoundError(message)


class FailsOnLoad:
    def __reduce__(self) -> Any:
        return _fail_loading, ("No module named 'gone_since'",)


@pytest.mark.parametrize("in_meta", [False, True], ids=["object", "meta"])
def test_what_cannot_be_unpickled_is_a_deserialization_error(
    two_machines: tuple[Manager, Manager, Config], in_meta: bool
) -> None:
    """Pickled fine, fails to load (a module gone since): DeserializationError with the cause;
    the verified copy stays cached and nothing else is left behind."""
    alice, bob, _ = two_machines
    if in_meta:
        alice.push(1, "k", meta={"x": FailsOnLoad()})
    else:
        alice.push([1, FailsOnLoad()], "k")
    with pytest.raises(DeserializationError, match="gone_since"):
        bob.pull("k")
    assert bob.cache.get("k") is not None
    assert_cache_consistent(bob)


# -- a full disc during a pull -------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_pull_onto_a_full_disc_is_a_daman_error_and_keeps_the_old_copy(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download's temp file is /dev/full (every write fails with ENOSPC)."""
    with Manager(config) as manager, Manager(config.replace(local_dir=str(tmp_path / "o"))) as o:
        manager.push(1, "k")
        obj, meta = make_object("k", "v2", 3 * 1024 * 1024)
        o.push(obj, "k", meta=meta, force=True)
        before = manager.cache.get("k")
        full = tmp_path / "full-disc"
        full.symlink_to("/dev/full")

        @contextlib.contextmanager
        def temp_on_a_full_disc() -> Iterator[Path]:
            yield full

        with monkeypatch.context() as patch:
            patch.setattr(manager.cache, "temp_file", temp_on_a_full_disc)
            with pytest.raises(DamanError, match="no space left") as info:
                manager.pull("k")
        assert type(info.value) is LocalFileError  # the local disc, not the store
        assert manager.cache.get("k") == before
        assert_cache_consistent(manager)
        assert check_object(*manager.pull("k"), "k") == "v2"  # once there is room again


FULL_DISC = """
    import errno, resource, warnings
    from daman import DamanError, KeyNotFoundError
    from reliability_helpers import assert_cache_consistent, check_object, make_object

    mode = sys.argv[2]
    if mode == "fsize":  # every file written is limited to 1 MiB: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, resource.RLIM_INFINITY))
    result = {}

    def free():
        st = os.statvfs(config.local_dir)
        return st.f_bavail * st.f_frsize

    with Manager(config) as manager:
        result["small"] = check_object(*manager.pull("small"), "small")  # cached: 40 KB
        free_before = free()
        try:
            manager.pull("big")
            result["pull"] = "succeeded"
        except DamanError as exc:
            result["pull"] = [type(exc).__name__, str(exc)]
        except OSError as exc:
            result["pull"] = ["raw " + type(exc).__name__, errno.errorcode.get(exc.errno, "?")]
        # On our own tmpfs the space is back (elsewhere other programs move the figure).
        result["freed_again"] = mode != "tmpfs" or free() >= free_before - 64 * 1024
        assert_cache_consistent(manager)
        result["small_after"] = check_object(*manager.pull("small"), "small")
        obj, meta = make_object("pushed", "v1", 3 * 1024 * 1024)
        try:
            manager.push(obj, "pushed", meta=meta)
            result["push"] = "succeeded"
        except DamanError as exc:
            result["push"] = [type(exc).__name__, str(exc)]
        except OSError as exc:
            result["push"] = ["raw " + type(exc).__name__, errno.errorcode.get(exc.errno, "?")]
        result["pushed_exists"] = manager.exists("pushed")
        assert_cache_consistent(manager)
    print(json.dumps(result))
"""


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(exist_ok=True)
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {where}"],
        capture_output=True,
    )
    return probe.returncode == 0


def _run_full_disc(config: Config, tmp_path: Path, mode: str) -> dict[str, Any]:
    with Manager(config.replace(local_dir=str(tmp_path / "pusher"))) as pusher:
        obj, meta = make_object("small", "v1", 40_000)
        pusher.push(obj, "small", meta=meta)
        obj, meta = make_object("big", "v1", 3 * 1024 * 1024)
        pusher.push(obj, "big", meta=meta)
    disc = tmp_path / "small-disc"
    disc.mkdir()
    child_config = config.replace(local_dir=str(disc / "cache"))
    prefix = None
    if mode == "tmpfs":
        # A 1 MiB file system of our own (a user and mount namespace: no privileges needed).
        prefix = ["unshare", "-rm", "sh", "-c",
                  f'mount -t tmpfs -o size=1m tmpfs {disc} && exec "$@"', "sh"]  # fmt: skip
    result = json.loads(finish(spawn(child_config, FULL_DISC, mode, prefix=prefix)))
    assert result["small"] == result["small_after"] == "v1"
    assert result["freed_again"], "the failed download's temp file was left on the disc"
    assert not result["pushed_exists"]
    return result


def test_a_pull_onto_a_small_file_system_fails_clearly_and_leaves_nothing(
    config: Config, tmp_path: Path
) -> None:
    """local_dir on a real 1 MiB tmpfs; a 3 MiB object is pulled, then one is pushed."""
    if not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    result = _run_full_disc(config, tmp_path, "tmpfs")
    assert result["pull"][0] == "LocalFileError" and "no space left" in result["pull"][1]
    assert result["push"][0] == "LocalFileError" and "no space left" in result["push"][1]


def test_a_pull_over_a_file_size_limit_fails_clearly_and_leaves_nothing(
    config: Config, tmp_path: Path
) -> None:
    result = _run_full_disc(config, tmp_path, "fsize")
    assert result["pull"][0] == "LocalFileError" and "too large" in result["pull"][1]
    assert result["push"][0] == "LocalFileError" and "too large" in result["push"][1]
