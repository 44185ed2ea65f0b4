"""Store listings kept a few seconds, so that browsing (the panel) and typing (key completion)
do not ask the store on every click or keystroke. One per :class:`~daman.manager.Manager`.

A listing is stamped when it *arrives*, not when it was asked for: stamped at the request, a
listing slower than the TTL (a large bucket, a slow link) would be stale the moment it was
stored, and every later keystroke would list again. A listing that was in flight while the
manager changed the store (a push, a delete: :meth:`ListingCache.forget`) is not stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from . import forksafe
from .store import Level, ObjectInfo

LISTING_TTL = 10.0
"""Seconds a listing answers again before the store is asked anew."""
MAX_LISTINGS = 256
"""Listings kept at most (the oldest go first): a browsing session touches a few dozen."""

_Slot = tuple[str, "str | None", int]  # (prefix, token, limit): one page of one level


class ListingCache:
    """Pages of level listings (:meth:`Store.list_level`), each kept ``ttl`` seconds.

    Thread-safe: the panel lists from a worker thread while the kernel completes keys."""

    def __init__(self, ttl: float = LISTING_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._pages: dict[_Slot, tuple[float, Level]] = {}
        self._lock = threading.Lock()
        self._generation = 0
        forksafe.at_fork_in_child(self, ListingCache._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork

    @property
    def generation(self) -> int:
        """Take it before asking the store; :meth:`put` drops an answer older than a
        :meth:`forget`."""
        return self._generation

    def get(self, prefix: str, token: str | None, limit: int) -> Level | None:
        """The page if it arrived less than ``ttl`` seconds ago, else None."""
        with self._lock:
            found = self._pages.get((prefix, token, limit))
            if found is None:
                return None
            if self.clock() - found[0] >= self.ttl:
                del self._pages[(prefix, token, limit)]
                return None
            return found[1]

    def put(self, level: Level, *, token: str | None, limit: int, since: int) -> None:
        """Keep ``level`` (the page asked for with ``token`` and ``limit``), stamped now;
        ``since`` is the :attr:`generation` taken before the request."""
        with self._lock:
            if since != self._generation:
                return  # the store changed while this listing was on its way
            now = self.clock()
            self._pages[(level.prefix, token, limit)] = (now, level)
            self._prune(now)

    def put_keys(self, prefix: str, infos: Iterable[ObjectInfo], *, limit: int, since: int) -> None:
        """Keep the levels a full listing of ``prefix`` (every key under it, as
        :meth:`Store.list` gives) reveals: each level under it whose names fit in one page
        of ``limit``. So ``%dm_ls`` answers the next completion too."""
        if prefix and not prefix.endswith("/"):
            return  # a partial name: the level holding it was not listed whole
        prefixes: dict[str, set[str]] = {prefix: set()}
        objects: dict[str, list[ObjectInfo]] = {prefix: []}
        levels: dict[str, str] = {"": prefix}  # folder under prefix -> its level
        for info in infos:
            folder = info.key[len(prefix) :].rpartition("/")[0]
            level = levels.get(folder)
            if level is None:  # keys come sorted: once per folder
                level = prefix
                for part in folder.split("/"):
                    below = f"{level}{part}/"
                    prefixes[level].add(below)
                    prefixes.setdefault(below, set())
                    objects.setdefault(below, [])
                    level = below
                levels[folder] = level
            objects[level].append(info)
        with self._lock:
            if since != self._generation:
                return
            now = self.clock()
            shallow_first = sorted(prefixes, key=lambda level: level.count("/"))
            for level in shallow_first[:MAX_LISTINGS]:
                names = prefixes[level]
                if len(names) + len(objects[level]) <= limit:
                    page = Level(level, sorted(names), sorted(objects[level], key=_by_key), None)
                    self._pages[(level, None, limit)] = (now, page)
            self._prune(now)

    def forget(self) -> None:
        """Drop every listing, and any now in flight (after a change to the store)."""
        with self._lock:
            self._pages.clear()
            self._generation += 1

    def _prune(self, now: float) -> None:
        for slot, (stamp, _) in list(self._pages.items()):
            if now - stamp >= self.ttl:
                del self._pages[slot]
        if len(self._pages) > MAX_LISTINGS:
            newest = sorted(self._pages.items(), key=lambda item: item[1][0])[-MAX_LISTINGS:]
            self._pages = dict(newest)


def _by_key(info: ObjectInfo) -> str:
    return info.key
