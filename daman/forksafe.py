"""Surviving ``fork``: what daman holds in a process is never used by a forked child.

Fork pools (``multiprocessing``, ``concurrent.futures`` with a fork context, joblib, Dask) copy
the parent's memory into each child, including what daman keeps open between calls: pooled
keep-alive HTTP connections, SQLite connections, file locks. Used from two processes, a
connection crosses answers between them and SQLite's in-process lock bookkeeping lies about
the child's locks. So:

- :class:`PerProcess` holds a value (a store's client) that a forked child makes afresh;
- :func:`sqlite_section` is entered around every use of SQLite: a fork waits until no thread
  is inside one, so a child never inherits a connection in the middle of a statement or a
  transaction (SQLite's own docs forbid carrying one across a fork);
- :func:`track_fd` / :func:`untrack_fd` list the descriptors that hold ``flock`` locks: a
  child closes its copies, so that a lock its parent takes or releases stays the parent's;
- :func:`at_fork_in_child` registers what else a child must reset (caches drop the SQLite
  connections they inherited, locks are made anew);
- :func:`close_later` is for finalizers (a thread's connection let go when the thread ends):
  closing a connection is a use of SQLite too, so it waits for the next section. A close that
  ran beside a fork once left the child waiting for ever on SQLite's memory lock, copied held.

The child works as if it had just started; the parent is untouched and keeps working.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Gate:
    """Any number of threads inside at once; a fork waits until none is, and nobody enters
    until the fork is over. Re-entrant per thread (a thread inside never waits)."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.inside = 0
        self.forking = False
        self.depth = threading.local()

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        depth = getattr(self.depth, "n", 0)
        if depth == 0:
            with self.cond:
                while self.forking:
                    self.cond.wait()
                self.inside += 1
        self.depth.n = depth + 1
        try:
            if _released:  # a list's truth test: nothing more on the hot path
                _close_released()
            yield
        finally:
            self.depth.n = depth
            if depth == 0:
                with self.cond:
                    self.inside -= 1
                    if not self.inside:
                        self.cond.notify_all()

    def close_before_fork(self) -> None:
        self.cond.acquire()
        if getattr(self.depth, "n", 0):
            return  # forking from inside (a callback): waiting would never end
        self.forking = True
        while self.inside:
            self.cond.wait()

    def open_after_fork_in_parent(self) -> None:
        self.forking = False
        self.cond.notify_all()
        self.cond.release()


_gate = _Gate()
_released: list[Any] = []
_fds: set[int] = set()
_fds_lock = threading.Lock()
_child_hooks: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()
_plain_hooks: list[Callable[[], None]] = []


def sqlite_section() -> contextlib.AbstractContextManager[None]:
    """Enter around any use of an SQLite connection (see the module docstring)."""
    return _gate.enter()


def close_later(resource: Any) -> None:
    """``resource.close()`` in the next section any thread enters, never now: for finalizers,
    which may run anywhere, even in a thread that is forking. Only appends (never waits)."""
    _released.append(resource)


def _close_released() -> None:
    """Close what finalizers let go (inside a section: no fork meanwhile)."""
    while _released:
        try:
            resource = _released.pop()
        except IndexError:  # another thread took the last one
            return
        with contextlib.suppress(Exception):
            resource.close()


def track_fd(fd: int) -> None:
    """``fd`` holds (or will hold) an ``flock`` lock: a forked child closes its copy."""
    with _fds_lock:
        _fds.add(fd)


def untrack_fd(fd: int) -> None:
    with _fds_lock:
        _fds.discard(fd)


def release_locked(fd: int) -> None:
    """Unlock, untrack and close a tracked descriptor holding an ``flock``: unlocked first,
    so that a child forked at any moment of this holds nothing."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    untrack_fd(fd)
    os.close(fd)


def at_fork_in_child(owner: object, hook: Callable[[Any], None] | None = None) -> None:
    """Call ``hook(owner)`` in every forked child while ``owner`` lives; without ``owner``'s
    lifetime to follow, pass a plain function as ``owner`` and no ``hook``."""
    if hook is None:
        _plain_hooks.append(owner)  # type: ignore[arg-type]
    else:
        _child_hooks[owner] = hook


class PerProcess(Generic[T]):
    """A value made by ``factory`` on first use in each process: a forked child never uses
    the one its parent made (nor closes it: it is the parent's)."""

    def __init__(self, factory: Callable[[], T], value: T | None = None) -> None:
        self._factory = factory
        self._value = value
        self._pid = os.getpid() if value is not None else None
        self._lock = threading.Lock()
        at_fork_in_child(self, PerProcess._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._value, self._pid = None, None

    def get(self) -> T:
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    self._value = self._factory()
                    self._pid = pid
        return self._value  # type: ignore[return-value]

    def made(self) -> T | None:
        """The value if this process made it already, else None (nothing is made)."""
        return self._value if self._pid == os.getpid() else None

    def close(self, closer: Callable[[T], object]) -> None:
        """``closer(value)`` if this process made it (a child leaves its parent's alone);
        the next :meth:`get` makes a new one."""
        with self._lock:
            value = self.made()
            self._value, self._pid = None, None
        if value is not None:
            closer(value)


def _before() -> None:
    _gate.close_before_fork()
    _fds_lock.acquire()


def _after_in_parent() -> None:
    _fds_lock.release()
    _gate.open_after_fork_in_parent()


def _after_in_child() -> None:
    global _gate, _fds_lock
    inherited = list(_fds)
    _fds.clear()
    _fds_lock = threading.Lock()
    _gate = _Gate()
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's lock lives on in the parent's descriptor
    # What the parent had let go, and what its other threads held (let go as the child
    # dropped them): closed now, while no other thread exists, not by a garbage collection.
    _close_released()
    for owner, hook in list(_child_hooks.items()):
        hook(owner)
    for plain in _plain_hooks:
        plain()


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
