"""Processes forked from one that used daman: the way fork pools (multiprocessing, joblib,
concurrent.futures with a fork context) run people's code.

A forked child inherits everything daman held in the parent: pooled keep-alive connections,
SQLite connections, file locks. These tests use them the way a notebook does (the parent pushes
and pulls, then a pool kept across cells works on the same store and cache) and check that
every answer is the one asked for and that the cache is intact afterwards.

moto's server closes every connection, so the S3 tests put the fault proxy (without faults)
in front of it: the proxy keeps connections alive, as real S3, MinIO and Ceph do.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultproxy import FaultProxy, Request
from reliability_helpers import check_object, make_object

import daman as dm
from daman import Config, Manager, forksafe
from daman.cache import Cache

ROUNDS = 4
KEYS = 12
PINNED = {"k/0", "k/1"}

fork = multiprocessing.get_context("fork")


@pytest.fixture
def keepalive_config(make_config, backend: str, request: pytest.FixtureRequest) -> Iterator[Config]:
    """A configuration whose S3 endpoint keeps connections alive (the proxy in front of moto)."""
    config = make_config()
    if backend == "local":
        yield config
        return
    endpoint = urlsplit(config.endpoint_url)
    with FaultProxy(f"{endpoint.scheme}://{endpoint.netloc}") as proxy:
        yield make_config(endpoint_url=proxy.url + endpoint.path)


def _pull_and_check(index: int) -> tuple[int, str]:
    key = f"k/{index % KEYS}"
    obj, meta = dm.pull(key, force=True)  # force: every call goes to the store
    version = check_object(obj, meta, key)
    details = dm.info(key)
    assert details.meta == meta, (details.meta, meta)
    return os.getpid(), version


def _push_and_check(index: int) -> int:
    key = f"child/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    obj, meta = make_object(key, str(index))
    dm.push(obj, key, meta=meta)
    got, got_meta = dm.pull(key, force=True)
    check_object(got, got_meta, key)
    return index


def _configure(config: Config) -> None:
    dm.configure(**{k: v for k, v in config.to_dict().items()}, check=False)


def test_forked_children_get_their_own_answers(keepalive_config: Config) -> None:
    """Children of a parent that used the store pull, describe and push their own keys over
    keep-alive connections: no answer crosses to another process."""
    _configure(keepalive_config)
    for i in range(KEYS):
        obj, meta = make_object(f"k/{i}", "v1")
        dm.push(obj, f"k/{i}", meta=meta)
    dm.pull("k/0", force=True)  # the parent's pool now holds a live connection
    with fork.Pool(4) as pool:
        for _ in range(ROUNDS):
            results = pool.map(_pull_and_check, range(KEYS * 4), chunksize=1)
            assert {version for _, version in results} == {"v1"}
            dm.pull("k/1", force=True)  # the parent keeps using its own connections
            assert sorted(pool.map(_push_and_check, range(8), chunksize=1)) == list(range(8))
    for info in dm.ls("child/"):
        obj, meta = dm.pull(info.key)
        check_object(obj, meta, info.key)
    assert len(dm.ls("child/")) == 8 * ROUNDS


def _info_in_a_child(key: str) -> object:
    return dm.info(key).meta


@pytest.mark.parametrize("backend", ["s3"])
def test_a_forked_child_never_sends_on_its_parents_connections(
    make_config, s3_endpoint: str
) -> None:
    """Deterministic: a child's first request goes out on a connection of its own, never on
    the keep-alive connection its parent's pool holds (the proxy numbers connections)."""
    with FaultProxy(s3_endpoint) as proxy:
        _configure(make_config(endpoint_url=proxy.url))
        obj, meta = make_object("k/0", "v1")
        dm.push(obj, "k/0", meta=meta)
        dm.info("k/0")
        parents = set(proxy.connection_of.values())
        before = proxy.requests
        with fork.Pool(1) as pool:
            assert pool.apply(_info_in_a_child, ("k/0",)) == meta
        childs = {proxy.connection_of[n] for n in range(before + 1, proxy.requests + 1)}
        assert childs and not childs & parents, (parents, childs)
        dm.info("k/0")  # and the parent's connection still works for the parent
        assert proxy.connection_of[proxy.requests] in parents


def _mixed_work(seed: int) -> int:
    import random

    rng = random.Random(seed)
    done = 0
    end = time.monotonic() + 0.4
    while time.monotonic() < end:
        key = f"k/{rng.randrange(KEYS)}"
        op = rng.random()
        if op < 0.5:
            obj, meta = dm.pull(key)
            check_object(obj, meta, key)
        elif op < 0.8:
            obj, meta = make_object(key, f"{seed}-{done}")
            dm.push(obj, key, meta=meta, force=True)
        elif key not in PINNED:  # a delete would unpin them
            dm.delete(key)
        done += 1
    return done


def test_a_pool_kept_across_the_parents_reconfiguration(make_config, tmp_path: Path) -> None:
    """A pool made once and used across cells while the parent reconfigures and resets
    daman (which closes its SQLite connection): the index stays intact, pins stay."""
    config = make_config(allocated_space=400_000)
    _configure(config)
    for i in range(KEYS):
        obj, meta = make_object(f"k/{i}", "v1")
        dm.push(obj, f"k/{i}", meta=meta, persist=f"k/{i}" in PINNED)
    with fork.Pool(3) as pool:
        for round_ in range(ROUNDS):
            work = pool.map_async(_mixed_work, [round_ * 10 + n for n in range(6)], chunksize=1)
            while not work.ready():
                dm.reset()
                _configure(config)
                dm.pull("k/0")
                time.sleep(0.01)
            assert sum(work.get()) > 0
    dm.reset()
    db = sqlite3.connect(Path(config.local_dir) / "index.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    with Manager(config) as manager:
        assert manager.verify().ok
        assert {e.key for e in manager.usage().persisted} == PINNED


def _one_pull(_: object) -> str:
    obj, meta = dm.pull("k/0")
    return check_object(obj, meta, "k/0")


def test_fork_while_another_thread_writes_the_index(make_config) -> None:
    """A thread writing the cache index while the main thread forks: the children neither
    stall nor see a locked database."""
    config = make_config()
    _configure(config)
    obj, meta = make_object("k/0", "v1")
    dm.push(obj, "k/0", meta=meta)
    manager = dm.get_manager()
    stop = threading.Event()

    def write_in_a_loop() -> None:
        while not stop.is_set():
            manager.cache.touch("k/0")
            manager.cache.set_persist("k/0", True)
            manager.cache.set_persist("k/0", False)

    writer = threading.Thread(target=write_in_a_loop)
    writer.start()
    try:
        for _ in range(ROUNDS):
            with fork.Pool(2) as pool:
                result = pool.map_async(_one_pull, range(4))
                assert result.get(timeout=30) == ["v1"] * 4
    finally:
        stop.set()
        writer.join()


# -- threads that come and go ---------------------------------------------------------------------


def _open_connections(cache: Cache) -> int:
    """How many SQLite connections of this process are open on ``cache``'s index."""
    index = str(cache.index_path.resolve())
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed
                count += any(row[2] == index for row in obj.execute("PRAGMA database_list"))
    return count


def _wait_or_kill(pid: int, seconds: float) -> int | None:
    """The forked child's exit code, or None if it was still running after ``seconds``
    (then it is killed)."""
    deadline = time.monotonic() + seconds
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.001)
    return os.waitstatus_to_exitcode(done[1])


def _put(cache: Cache, key: str) -> None:
    with cache.temp_file() as tmp:
        tmp.write_bytes(os.urandom(64))
        cache.add(key, tmp, etag="e", sha256="0" * 64)


def test_a_thread_that_ends_during_a_fork_closes_its_connection_after_it(tmp_path: Path) -> None:
    """A thread that used the cache ends while the main thread forks: its connection to the
    index is closed by the first section after the fork, not when the thread ends nor when
    the garbage collector gets to it (before: the collector, at any moment). A close beside a
    fork copied SQLite's memory lock held into the child, which then waited on it for ever
    (about one fork in 70 in the test below, before)."""
    cache = Cache(tmp_path / "cache")
    _put(cache, "k")
    used, end = threading.Event(), threading.Event()

    def use_then_end() -> None:
        cache.get("k")  # this thread's own connection
        used.set()
        end.wait()

    thread = threading.Thread(target=use_then_end)
    thread.start()
    used.wait()
    open_before = _open_connections(cache)
    forksafe._before()  # what os.fork runs first: no thread may enter SQLite now
    try:
        end.set()
        thread.join()
        assert _open_connections(cache) == open_before  # nothing closed beside the fork
    finally:
        forksafe._after_in_parent()
    assert cache.get("k") is not None  # the next section closes it
    assert _open_connections(cache) == open_before - 1


def test_children_forked_while_threads_come_and_go_never_hang(tmp_path: Path) -> None:
    """Threads that use the cache and end (their connections let go) while the main thread
    forks children that use it: every child ends. Before, about one child in 70 hung at its
    start, closing the connection it inherited."""
    cache = Cache(tmp_path / "cache", 10**8)
    _put(cache, "x")
    stop = threading.Event()

    def short_lived() -> None:
        cache.get("x")
        cache.touch("x")
        _put(cache, f"t/{threading.get_ident() % 16}")

    def churn() -> None:
        while not stop.is_set():
            thread = threading.Thread(target=short_lived)
            thread.start()
            thread.join()

    churners = [threading.Thread(target=churn) for _ in range(2)]
    for churner in churners:
        churner.start()
    hung: list[int] = []
    try:
        for n in range(600):
            pid = os.fork()
            if pid == 0:  # the child: use the cache, then leave at once
                code = 1
                try:
                    assert cache.get("x") is not None
                    _put(cache, f"child/{n % 8}")
                    code = 0
                finally:
                    os._exit(code)
            code = _wait_or_kill(pid, 20)
            if code is None:
                hung.append(n)
                break
            assert code == 0, f"child {n} failed"
    finally:
        stop.set()
        for churner in churners:
            churner.join()
    assert not hung, f"child {hung[0]} hung"
    assert cache.reconcile().repaired["dropped_rows"] == 0


# -- locks a child must not inherit held ----------------------------------------------------------


def test_a_child_forked_during_a_rebuild_never_holds_the_rebuild_lock(tmp_path: Path) -> None:
    """A fork while a thread rebuilds the index (holding ``locks/rebuild.lock``): once the
    rebuild is over the lock is free, though the child lives on. Before, the child inherited
    the descriptor, and every process opening the cache waited for the child to end."""
    cache = Cache(tmp_path / "cache")
    inside, leave = threading.Event(), threading.Event()

    def rebuild() -> None:
        with cache._rebuilding(exclusive=True):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=rebuild)
    thread.start()
    assert inside.wait(10)
    pid = os.fork()
    if pid == 0:  # an idle pool worker
        time.sleep(60)
        os._exit(0)
    try:
        leave.set()
        thread.join()
        fd = os.open(cache.locks_dir / "rebuild.lock", os.O_RDWR)  # as another process would
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: the child held it
        finally:
            os.close(fd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("backend", ["s3"])
def test_a_child_forked_while_a_thread_asks_about_versions_pushes(make_config) -> None:
    """A store's first push asks the bucket whether it keeps versions; a fork while that
    question is in flight on another thread: the child's own push goes through. Before, the
    question was asked under a lock, which the child inherited held and waited on for ever."""
    config = make_config()
    endpoint = urlsplit(config.endpoint_url)
    asking, answer = threading.Event(), threading.Event()

    def hold_the_question(request: Request) -> None:
        if "versioning" in request.query and not answer.is_set():
            asking.set()
            answer.wait(20)

    with FaultProxy(f"{endpoint.scheme}://{endpoint.netloc}", hold_the_question) as proxy:
        manager = Manager(make_config(endpoint_url=proxy.url + endpoint.path))
        first = threading.Thread(target=manager.push, args=({"n": 1}, "parent"))
        first.start()
        try:
            assert asking.wait(20)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    manager.push({"n": 2}, "child")
                    code = 0
                finally:
                    os._exit(code)
            answer.set()
            assert _wait_or_kill(pid, 30) == 0, "the child's push hung or failed"
        finally:
            answer.set()
            first.join()
        assert manager.pull("child", force=True)[0] == {"n": 2}
        manager.close()
