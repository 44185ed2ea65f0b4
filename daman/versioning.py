"""The versions of a key as the manager serves them: ``history``, ``restore``, ``info`` and
pulls of one version.

Which store keeps the versions and how they are written is ``daman.history``'s; this module
reads them through the manager's own checked reads, cache and publishing (see :class:`Host`),
so that a version is downloaded, checked, cached and pushed again as any object is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import history as versions
from .errors import (
    IntegrityError,
    KeyNotFoundError,
    UntrustedObjectError,
    VersionNotFoundError,
    disc_errors,
)
from .files import open_empty
from .keys import validate_key
from .results import KeyHistory, ObjectDetails, Source, VersionInfo
from .serialize import (
    TAIL_GUESS,
    Footer,
    StoredFile,
    check_file,
    load_meta,
    read_footer,
    restamp,
)
from .store import ObjectInfo, Store

if TYPE_CHECKING:
    from .cache import Cache, CacheEntry


class Host(Protocol):
    """What the version logic uses of its manager: the store, the cache, and the steps every
    object goes through (a checked download, a cache hit, keeping a file, publishing one)."""

    @property
    def store(self) -> Store: ...

    cache: Cache
    signing_key: bytes | None

    def _fetch_verified(
        self, key: str, tmp: Path, *, name: str | None = None, pinned: str | None = None
    ) -> tuple[StoredFile, ObjectInfo]: ...

    def _open_cached(
        self, entry: CacheEntry, persist: bool, *, mapped: bool = False
    ) -> StoredFile | None: ...

    def _keep(
        self,
        key: str,
        tmp: Path,
        *,
        etag: str,
        sha256: str,
        persist: bool,
        verb: str,
        evict: bool = True,
        version: str = "",
    ) -> CacheEntry | None: ...

    def _publish(self, key: str, tmp: Path, footer: Footer, *, force: bool) -> ObjectInfo: ...

    def _remote_details(self, key: str) -> tuple[Footer, Any, ObjectInfo] | ObjectDetails: ...

    def _check_identity(self, footer: Footer, key: str, *, last: bool) -> None: ...


class Versioning:
    """One manager's access to the versions of its store's keys."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._keeper: versions.Keeper | None = None

    def keeper(self) -> versions.Keeper:
        """Who keeps the store's versions: the bucket (S3 versioning) or daman."""
        keeper = self._keeper
        if keeper is None or keeper.store is not self.host.store:
            keeper = self._keeper = versions.keeper(self.host.store)
        return keeper

    def records_first(self, *, force: bool) -> bool:
        """Whether a write (a push with ``force``, or a restore) records its version before
        it writes the key, so that its footer holds its version id: only with daman's
        records, and only for writes that may replace a version (a new key's is recorded
        when it is replaced). A bucket's own versions leave the id empty: if versioning is
        suspended later, those objects are recorded before they are replaced."""
        return force and isinstance(self.keeper(), versions.Records)

    def keep_replaced(self, key: str) -> None:
        """Record ``key``'s current version if it has no record yet (a new key's push, or
        one from before versions existed), before it is replaced or deleted."""
        with self.host.cache.temp_file() as old:
            versions.record_unrecorded(self.host.store, key, partial(self._replaced_copy, key), old)

    def _replaced_copy(self, key: str, dest: Path, current: Footer | str) -> Footer | None:
        """The object now under ``key`` (``current``: its footer, just read, or
        ``LEGACY``) in ``dest``: this machine's cached copy when it is that very push's (its
        footer holds a random push_id) and whole, else downloaded and checked. A daman
        object that fails the checks (damaged in the store, or unsigned under a signing
        key) is copied as it is stored: still a version, and the push mending it must not be
        refused for it. None if the key is gone meanwhile (whoever removed it recorded it)."""
        if isinstance(current, Footer) and self._cached_copy(key, dest, current):
            return current
        try:
            stored, _ = self.host._fetch_verified(key, dest)
        except KeyNotFoundError:
            return None
        except (UntrustedObjectError, IntegrityError):
            if not isinstance(current, Footer):
                raise  # a daman 0.2 object has no footer to keep it by: dm_migrate it first
            try:
                self.host.store.get(key, dest)
                with open(dest, "rb") as f:
                    footer = StoredFile(f).footer
            except KeyNotFoundError:
                return None
            if footer.key and footer.key != key:
                raise
            return footer
        stored.f.close()
        return stored.footer

    def _cached_copy(self, key: str, dest: Path, current: Footer) -> bool:
        """Whether ``key``'s cached copy is the push ``current`` describes and whole; if it
        is, it is copied to ``dest``."""
        cache = self.host.cache
        entry = cache.get(key)
        if entry is None:
            return False
        with disc_errors(cache.root):
            try:
                with open(entry.path, "rb") as f:
                    if StoredFile(f).footer != current:
                        return False  # another version (two small reads told)
                    shutil.copyfile(entry.path, dest)  # cached files never change in place
            except (FileNotFoundError, IntegrityError):
                return False  # evicted meanwhile, or damaged
            fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return check_file(fd, os.fstat(fd).st_size) == current  # every byte
            except IntegrityError:
                return False
            finally:
                os.close(fd)

    def history(self, key: str) -> KeyHistory:
        """See :meth:`Manager.history`."""
        validate_key(key)
        found, current_id, exists = self.keeper().versions(key)

        def read(version: versions.Listed) -> tuple[Footer, Any]:
            footer, meta, _ = self._footer_and_meta(key, version.name, version.pinned)
            return footer, meta

        listed: list[VersionInfo] = []
        for version, got in zip(found, versions.read_all(read, found), strict=True):
            if isinstance(got, tuple):
                footer, meta = got
                listed.append(_version_info(version.version, footer, meta, current_id))
            else:  # damaged or untrusted: listed with what the listing says
                unread = VersionInfo(
                    version.version, version.size, "", "", "", "", None,
                    version.version == current_id, readable=False,
                )  # fmt: skip
                listed.append(unread)
        if not listed and not exists:
            raise KeyNotFoundError(key, self.host.store.describe())
        return KeyHistory(key, tuple(listed), deleted=not exists)

    def restore(self, key: str, *, version: str, persist: bool = False) -> ObjectInfo:
        """See :meth:`Manager.restore`."""
        host = self.host
        with self.open(key, version, force=False, persist=False, keep=True) as opened:
            stored = opened[0]
            with host.cache.temp_file() as tmp:
                with disc_errors(host.cache.root), open_empty(tmp) as out:
                    footer = restamp(
                        stored,
                        out,
                        key=key,
                        signing_key=host.signing_key,
                        versioned=self.records_first(force=True),
                        restored_from=version,
                    )
                info = host._publish(key, tmp, footer, force=True)
                host._keep(
                    key, tmp, etag=info.etag, sha256=footer.sha256, persist=persist,
                    verb="restored",
                )  # fmt: skip
        return info

    def details(self, key: str, version: str) -> tuple[Footer, Any, ObjectInfo]:
        """``version`` of ``key``: its footer, meta and what the store says of it."""
        source = self.source(key, version)
        try:
            return self._footer_and_meta(key, source.name, source.pinned)
        except KeyNotFoundError:  # no record: the current version, if pushed before versions
            found = self.host._remote_details(key)
            if isinstance(found, ObjectDetails) or versions.version_of(found[0]) != version:
                raise VersionNotFoundError(key, version, self.host.store.describe()) from None
            return found

    def _footer_and_meta(
        self, key: str, name: str, pinned: str | None
    ) -> tuple[Footer, Any, ObjectInfo]:
        """One version's footer and meta, read from its tail: the record ``name``, or
        ``key``'s version ``pinned`` in a bucket that keeps versions. Checked to be
        ``key``'s (and signed, with signing on)."""
        store = self.host.store
        pin = versions.pinned(pinned)

        def read_at(offset: int, length: int) -> bytes:
            return store.read_range(name, offset, length, **pin)

        tail, remote = store.read_tail(name, TAIL_GUESS, **pin)
        footer = read_footer(read_at, remote.size, tail)
        self.host._check_identity(footer, key, last=True)
        return footer, load_meta(read_at, footer, tail, remote.size), remote

    @contextlib.contextmanager
    def open(
        self,
        key: str,
        version: str,
        *,
        force: bool,
        persist: bool,
        keep: bool,
        mapped: bool = False,
    ) -> Iterator[tuple[StoredFile, Source, CacheEntry | None]]:
        """:meth:`Manager._open_current` for one version of ``key``: a version never changes,
        so a cached copy is used without asking the store (``force``: downloaded again)."""
        host, cache = self.host, self.host.cache
        validate_key(key)
        self.source(key, version)  # a valid id
        entry = None if force else cache.get(key, version)
        stored = None if entry is None else host._open_cached(entry, persist, mapped=mapped)
        if stored is not None:
            with stored.f:
                yield stored, "cache", entry
            return
        with cache.temp_file() as tmp:
            with cache.key_lock(key):
                kept = None if force else cache.get(key, version)
                if kept is not None:  # fetched by another process while we waited
                    stored = host._open_cached(kept, persist, mapped=mapped)
                source: Source = "cache"
                if stored is None:
                    stored, info = self._fetch(key, version, tmp)
                    source = "store"
                    if keep:
                        try:
                            kept = host._keep(
                                key, tmp, etag=info.etag, sha256=stored.footer.sha256,
                                persist=persist, verb="pulled", version=version,
                            )  # fmt: skip
                        except BaseException:
                            stored.f.close()
                            raise
            with stored.f:
                yield stored, source, kept

    def source(self, key: str, version: object) -> versions.Listed:
        """Where ``version`` of ``key`` is read (a VersionNotFoundError for an id that
        cannot be one)."""
        keeper = self.keeper()
        if not isinstance(version, str) or not keeper.valid(version):
            raise VersionNotFoundError(key, str(version), self.host.store.describe())
        return keeper.source(key, version)

    def _fetch(self, key: str, version: str, tmp: Path) -> tuple[StoredFile, ObjectInfo]:
        """Download ``version`` of ``key``, checked: its record (or the bucket's version),
        or, for a version pushed before versions existed (no record), the key itself while
        it is still that one."""
        host = self.host
        source = self.source(key, version)
        try:
            return host._fetch_verified(key, tmp, name=source.name, pinned=source.pinned)
        except KeyNotFoundError:
            if not self.keeper().unrecorded(key, version):
                raise VersionNotFoundError(key, version, host.store.describe()) from None
        stored, info = host._fetch_verified(key, tmp)
        if versions.version_of(stored.footer) != version:  # replaced meanwhile
            stored.f.close()
            raise VersionNotFoundError(key, version, host.store.describe())
        return stored, info


def _version_info(version: str, footer: Footer, meta: Any, current: str | None) -> VersionInfo:
    return VersionInfo(
        version=version,
        size=footer.file_size,
        pushed_by=footer.pushed_by,
        pushed_at=footer.pushed_at,
        python=footer.python,
        cloudpickle=footer.cloudpickle,
        meta=meta,
        current=version == current,
        restored_from=footer.restored_from,
    )
