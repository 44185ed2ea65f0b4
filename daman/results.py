"""What the manager's calls return: plain, frozen records that every front-end reads (the CLI
and the magics print them through ``report``, the panel shows them). In a notebook, those a
person reads (``ls``, ``ls_level``, ``info``, ``usage``) display as HTML tables: their
``_repr_html_`` asks ``report`` for it, which writes every line people see."""

from __future__ import annotations

import dataclasses
import functools
import reprlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from .cache import Cache, CachedState, CacheEntry
from .config import format_size
from .store import ObjectInfo

Source = Literal["cache", "store"]


@dataclasses.dataclass(frozen=True)
class Pulled:
    """What :meth:`Manager.load` returns."""

    obj: Any
    meta: Any
    source: Source
    """``"cache"``: the local copy was used; ``"store"``: it was downloaded."""
    size: int
    """The stored object's size in bytes (pickled, as on disc)."""


@dataclasses.dataclass(frozen=True)
class Deleted:
    """What :meth:`Manager.delete` removed."""

    key: str
    local: bool
    """The cached copy was removed (False: there was none here)."""
    remote: bool
    """The stored object was removed."""


@dataclasses.dataclass(frozen=True)
class MappedFile:
    """A cached file that a zero-copy pull maps now, in some process: kept and counted."""

    key: str
    size: int
    current: bool
    """False: a file its entry no longer holds, kept only until its arrays are gone."""
    version: str = ""
    """The version id when the entry is a version pulled by its id; empty otherwise."""


@dataclasses.dataclass(frozen=True)
class KeyListing:
    """One key as ``ls`` shows it."""

    key: str
    size: int
    last_modified: datetime | None
    cached: bool
    persist: bool
    legacy: bool | None = None
    """A daman 0.2 object (``dm_migrate`` converts it); None when not checked."""
    outdated: bool = False
    """Cached here, but the store holds a newer version (someone pushed again)."""
    etag: str = ""
    """The stored version, as the listing saw it; empty when the listing did not read it (a
    local folder's listing reads the versions of the keys cached here only)."""

    @classmethod
    def of(
        cls, info: ObjectInfo, state: CachedState | None, *, legacy: bool | None = None
    ) -> KeyListing:
        """A listed object, with what this machine's cache holds of it (``state``)."""
        if state is None:  # most keys of a long listing: made as ObjectInfo.listed makes its
            listing = object.__new__(cls)  # own (the constructor's result, field for field)
            fields = listing.__dict__
            fields["key"], fields["size"] = info.key, info.size
            fields["last_modified"], fields["cached"], fields["persist"] = (
                info.last_modified, False, False,
            )  # fmt: skip
            fields["legacy"], fields["outdated"], fields["etag"] = legacy, False, info.etag
            return listing
        return cls(
            info.key,
            info.size,
            info.last_modified,
            cached=True,
            persist=state.persist,
            legacy=legacy,
            outdated=bool(info.etag) and state.etag != info.etag,
            etag=info.etag,
        )

    def seen_by(self, state: CachedState | None) -> KeyListing:
        """This listing after the cache changed (a pull, a pin, a delete)."""
        return KeyListing.of(
            ObjectInfo(self.key, self.size, self.etag, self.last_modified),
            state,
            legacy=self.legacy,
        )


class KeyList(list[KeyListing]):
    """What ``ls`` returns: a list of :class:`KeyListing`, shown as a table in a notebook."""

    def _repr_html_(self) -> str:
        from . import report  # report imports this module

        return report.listing_html(self)


@dataclasses.dataclass(frozen=True)
class LevelListing:
    """One page of one level of the store, as ``ls_level`` shows it."""

    prefix: str
    prefixes: list[str]
    """Sub-prefixes directly under ``prefix``, each ending with ``/``."""
    keys: list[KeyListing]
    """Keys directly under ``prefix``, with whether each is cached / persisted here."""
    token: str | None
    """Pass it back to ``ls_level`` for the next page; None on the last."""

    def _repr_html_(self) -> str:
        from . import report

        return report.level_html(self)


@dataclasses.dataclass(frozen=True)
class Disc:
    """This machine's cache at a glance: what ``disc`` tells, from the index alone."""

    used: int
    allocated: int | None
    persisted: int
    """Bytes of persisted entries, which eviction never frees."""
    entries: int
    local_dir: Path
    next_to_evict: list[CacheEntry]
    """The entries eviction would remove next, least recently used first."""

    @property
    def free(self) -> int | None:
        return None if self.allocated is None else max(0, self.allocated - self.used)


@dataclasses.dataclass(frozen=True)
class ObjectDetails:
    """What ``info`` tells about a stored object without downloading it."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None
    sha256: str
    pushed_by: str
    pushed_at: str
    python: str
    cloudpickle: str
    meta: Any
    cached: bool
    persist: bool
    libraries: dict[str, str] = dataclasses.field(default_factory=dict)
    """Versions of the main data libraries loaded where it was pushed (numpy, pandas, ...)."""
    holds_code: bool | None = None
    """Whether it holds code pickled by value, which loads only under the writer's Python
    minor version; None for objects pushed before daman recorded it."""
    outdated: bool = False
    """Cached here, but the store holds a newer version."""
    legacy: bool = False
    """A daman 0.2 object: no sha256, writer, versions or readable meta until ``dm_migrate``
    converts it."""
    md5: str = ""
    """A daman 0.2 object's md5, as stored with it."""

    def _repr_html_(self) -> str:
        from . import report

        return report.details_html(self)


@dataclasses.dataclass(frozen=True)
class Usage:
    """Local disc use against the allocation. The totals come from the sums the index keeps
    (instant at any number of entries); ``entries`` and ``persisted`` are read from the index
    when first asked, and kept."""

    used: int
    allocated: int | None
    count: int
    """How many entries the cache holds."""
    store: str = ""
    """The store in use, as messages name it."""
    cache: Cache | None = dataclasses.field(default=None, repr=False, compare=False)
    """Where ``entries`` and ``persisted`` are read from."""

    @functools.cached_property
    def entries(self) -> list[CacheEntry]:
        """Every cached entry, most recently used first (one row per entry: a long list for
        a large cache)."""
        return self.cache.entries() if self.cache is not None else []

    @functools.cached_property
    def persisted(self) -> list[CacheEntry]:
        """The persisted entries, most recently used first (read through the LRU index, not
        every row)."""
        if "entries" in self.__dict__ or self.cache is None:
            return [entry for entry in self.entries if entry.persist]
        return self.cache.persisted_entries()

    @property
    def free(self) -> int | None:
        return None if self.allocated is None else max(0, self.allocated - self.used)

    def __str__(self) -> str:
        return (
            f"{format_size(self.used)} used of {format_size(self.allocated)} "
            f"({self.count} entries, {len(self.persisted)} persisted)"
        )

    def _repr_html_(self) -> str:
        from . import report

        return report.usage_html(self, self.cache.root if self.cache is not None else None)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` checked and repaired. Every copy it removed is downloaded again by the
    next pull of its key."""

    checked: int
    checked_bytes: int
    damaged: list[str]
    """Keys whose cached copy did not match its sha256 (removed)."""
    untrusted: list[str]
    """Keys whose cached copy is not signed with signing_key (removed)."""
    dropped_rows: int
    """Index entries whose file was missing or had the wrong size."""
    orphan_files: int
    """Files in the cache folder that no entry referred to (deleted)."""
    rebuilt_index: int | None = None
    """When the index was damaged: the entries it was rebuilt with (None: it was sound)."""

    @property
    def ok(self) -> bool:
        repaired = self.dropped_rows or self.orphan_files or self.rebuilt_index is not None
        return not (self.damaged or self.untrusted or repaired)


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    """One version of a key, as :meth:`Manager.history` lists it."""

    version: str
    """Its id: what ``pull(key, version=...)`` and ``restore`` take."""
    size: int
    pushed_by: str
    pushed_at: str
    python: str
    cloudpickle: str
    meta: Any
    """Its meta (None when its footer could not be read: see ``readable``)."""
    current: bool
    """The version a plain pull of the key gives."""
    restored_from: str = ""
    """The version this one restored (``dm.restore``), if it is a restore."""
    readable: bool = True
    """False: its footer could not be read or checked (damaged, or not signed with the
    team's key); it is listed, with what the store says of it, so that it can be removed."""

    @property
    def meta_preview(self) -> str:
        """A one-line glimpse of the meta (at most 60 characters)."""
        if self.meta is None:
            return ""
        short = reprlib.Repr()
        short.maxstring = short.maxother = 40
        short.maxlevel = 2
        return short.repr(self.meta)[:60]


@dataclasses.dataclass(frozen=True)
class KeyHistory:
    """What :meth:`Manager.history` returns: a key's versions, newest first."""

    key: str
    versions: tuple[VersionInfo, ...]
    deleted: bool
    """The key was deleted from the store (``dm.delete(key, remote=True)``): no version is
    current, and any of them can be restored."""

    def __iter__(self) -> Iterator[VersionInfo]:
        return iter(self.versions)

    def __len__(self) -> int:
        return len(self.versions)

    def __getitem__(self, index: int) -> VersionInfo:
        return self.versions[index]

    @property
    def current(self) -> VersionInfo | None:
        return next((v for v in self.versions if v.current), None)
