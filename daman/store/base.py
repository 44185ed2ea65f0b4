"""The small interface every store backend implements.

A store holds whole daman object files under keys. It never sees Python objects: the manager
hands it finished files and asks for files back, so a backend is only about moving bytes
safely. Both backends promise the same things:

- ``put(..., overwrite=False)`` creates the key atomically or raises ``KeyExistsError``,
  even when another machine creates it at the same moment;
- a reader never sees a partly written object;
- expected failures surface as daman errors, never as backend tracebacks.

Besides keys, a store reads and writes *record names* (``daman.keys.record_name``: the
versions daman keeps itself, under ``.daman-history/``), and lists them only when asked for a
record folder. A store that keeps every version itself (S3 with bucket versioning) says so
with :meth:`Store.keeps_versions`, and then also takes ``version=`` in ``head``, ``get``,
``read_tail`` and ``read_range`` (see ``daman.history``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Protocol

from ..errors import DamanError, StoreUnavailableError


class WriteUnconfirmedError(StoreUnavailableError):
    """The store's answer to a write was lost and asking again could not tell whether the
    write happened (S3-compatible servers answer a retried CompleteMultipartUpload with
    NoSuchUpload when the first attempt completed). The caller looks at what is stored."""


Progress = Callable[[int], object]
"""Called with a number of bytes just transferred."""


class Written(Protocol):
    """Told ``(offset, length)`` of a range of the destination file now written, and the
    range's bytes when the writer still holds them (the caller may hash them from memory
    rather than read them back)."""

    def __call__(
        self, offset: int, length: int, data: bytes | memoryview | None = None, /
    ) -> object: ...


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    """Changes whenever the stored bytes change; compared, never interpreted."""
    last_modified: datetime | None = None
    metadata: Mapping[str, str] | None = dataclasses.field(default=None, compare=False, repr=False)
    """The object's user metadata when the request that made this info returned it (S3: HEAD
    and GET, not listings); None when not known, and always for a folder, which keeps none.
    Only daman 0.2 objects carry any (``md5``)."""
    version: str = dataclasses.field(default="", compare=False)
    """The store's own id of this version (S3 with bucket versioning: its VersionId), when
    the answer gave one; else empty."""

    @classmethod
    def listed(cls, key: str, size: int, etag: str, last_modified: datetime | None) -> ObjectInfo:
        """``ObjectInfo(key, size, etag, last_modified)``, made in half the time: a listing
        makes one per key (100,000 for a large folder), and a frozen dataclass's
        ``__init__`` sets each field through ``object.__setattr__``. The result is the
        constructor's, field for field (there is no ``__post_init__`` to skip)."""
        info = object.__new__(cls)
        fields = info.__dict__
        fields["key"], fields["size"], fields["etag"] = key, size, etag
        fields["last_modified"], fields["metadata"] = last_modified, None
        fields["version"] = ""
        return info


@dataclasses.dataclass(frozen=True)
class StoredVersion:
    """One version of a key as a store that keeps versions lists it (S3 bucket versioning)."""

    version: str
    size: int
    etag: str
    last_modified: datetime | None
    latest: bool
    """The version a plain read of the key gives (or, for a deletion, that the key is gone)."""
    deleted: bool = False
    """A deletion (S3's delete marker), not a version holding bytes."""


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of the store under a prefix, as a folder listing shows it: the
    sub-prefixes directly under it and the keys directly in it, one page at a time."""

    prefix: str
    prefixes: list[str]
    """Sub-prefixes, each ending with ``/`` (``team/`` -> ``team/models/``), sorted."""
    objects: list[ObjectInfo]
    """Keys directly under ``prefix`` (no further ``/``), sorted."""
    token: str | None = None
    """Pass it back as ``token`` for the next page; None on the last page."""


def bucket_and_prefix(storage_name: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of a storage name ``bucket[/prefix]`` (an S3 or GCS bucket, an
    Azure container); the prefix is empty or ends with ``/``."""
    bucket, _, prefix = storage_name.strip("/").partition("/")
    return bucket, f"{prefix}/" if prefix else ""


def describe_s3(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}"


def _no_progress(_: int) -> None:
    return None


def _no_range(_: int, __: int, ___: bytes | memoryview | None = None, /) -> None:
    return None


class Store(abc.ABC):
    """Where objects are shared. ``describe()`` names it in messages."""

    @abc.abstractmethod
    def describe(self) -> str: ...

    @abc.abstractmethod
    def check(self) -> None:
        """Raise a daman error unless the store is reachable and usable."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size and version of ``key``; ``KeyNotFoundError`` if absent."""

    def head_current(self, key: str) -> ObjectInfo:
        """:meth:`head` for a cached copy's freshness check: a backend that can should give
        up sooner on an unreachable store, since a cached copy is there to be used."""
        return self.head(key)

    @abc.abstractmethod
    def put(
        self, key: str, path: Path, *, overwrite: bool, progress: Progress = _no_progress
    ) -> ObjectInfo:
        """Store the file at ``path`` under ``key``."""

    @abc.abstractmethod
    def get(
        self,
        key: str,
        dest: Path,
        *,
        progress: Progress = _no_progress,
        on_size: Progress = _no_progress,
        on_written: Written = _no_range,
    ) -> ObjectInfo:
        """Write the object's bytes to ``dest`` and say which version they are. ``on_size``
        hears the object's size before its bytes arrive (for a progress bar's total), and
        again if the download starts over; ``on_written`` hears each range once it is in
        ``dest`` (in any order, from any thread), so that the caller can hash the file as
        it arrives."""

    @abc.abstractmethod
    def read_tail(self, key: str, length: int) -> tuple[bytes, ObjectInfo]:
        """The last ``length`` bytes (or fewer, for a smaller object) and the object's info."""

    @abc.abstractmethod
    def read_range(self, key: str, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; ``KeyNotFoundError`` if absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every key starting with ``prefix``, in lexicographic order."""

    def list_fast(
        self, prefix: str = "", *, versions: Collection[str] = ()
    ) -> Iterator[ObjectInfo]:
        """:meth:`list`, where a backend whose versions cost a read per key (a folder: the
        footer of each file) leaves ``etag`` empty (unknown) but for the keys in
        ``versions``. This default is :meth:`list`: every version."""
        return self.list(prefix)

    def list_level(self, prefix: str = "", *, token: str | None = None, limit: int = 1000) -> Level:
        """One level under ``prefix`` (empty or ending with ``/``; a partial last part such
        as ``team/mo`` lists the names of ``team/`` starting with ``mo``): at most ``limit``
        entries (sub-prefixes and keys together) per page, ``token`` (from the previous page,
        opaque) continuing it.

        This default walks :meth:`list`, so it reads every key under ``prefix``; backends
        override it with their native delimiter listing (one request per page)."""
        prefixes: list[str] = []
        objects: list[ObjectInfo] = []
        for info in self.list(prefix):
            rest = info.key[len(prefix) :]
            slash = rest.find("/")
            name = info.key if slash < 0 else prefix + rest[: slash + 1]
            if token is not None and name <= token:
                continue
            if len(prefixes) + len(objects) == limit:
                last = max([*prefixes[-1:], *(o.key for o in objects[-1:])])
                return Level(prefix, prefixes, objects, last)
            if slash < 0:
                objects.append(info)
            elif not prefixes or prefixes[-1] != name:
                prefixes.append(name)
        return Level(prefix, prefixes, objects, None)

    def put_copy(
        self,
        key: str,
        path: Path,
        *,
        source: str,
        overwrite: bool,
        progress: Progress = _no_progress,
    ) -> ObjectInfo:
        """:meth:`put` of the file at ``path``, which the store holds already, whole, as
        ``source`` (a record name): a backend that can copies it on its side instead of
        sending the bytes again (this default sends them)."""
        return self.put(key, path, overwrite=overwrite, progress=progress)

    def copies(self, size: int, *, overwrite: bool) -> bool:
        """Whether :meth:`put_copy` of ``size`` bytes copies on the store's side (sends no
        bytes): for progress bars."""
        return False

    def keeps_versions(self) -> bool:
        """Whether the store itself keeps every version of every key (S3 with bucket
        versioning enabled): then daman asks it for them instead of keeping records."""
        return False

    def versions(self, key: str) -> list[StoredVersion]:
        """Every version of ``key`` the store keeps, deletions included, newest first
        (only when :meth:`keeps_versions`)."""
        raise DamanError(f"{self.describe()} keeps no versions of its own.")

    def delete_version(self, key: str, version: str) -> None:
        """Remove one version (or deletion) of ``key`` for good (only when
        :meth:`keeps_versions`)."""
        raise DamanError(f"{self.describe()} keeps no versions of its own.")

    def put_if_match(
        self, key: str, path: Path, etag: str, *, progress: Progress = _no_progress
    ) -> ObjectInfo:
        """Replace ``key`` with the file at ``path`` only if its stored version is still
        ``etag``: ``ConcurrentChangeError`` if it changed, ``KeyNotFoundError`` if it is gone;
        a concurrent change is never overwritten. Used by ``dm_migrate``; a backend that
        cannot do it says so (this default)."""
        raise DamanError(
            f"{self.describe()} cannot replace an object only if it is unchanged, which "
            "dm_migrate needs."
        )

    def recover_interrupted(self, prefix: str = "") -> int:
        """Finish or undo what an interrupted :meth:`put_if_match` under ``prefix`` left
        behind; returns how many objects it repaired. Nothing to do for most backends."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
