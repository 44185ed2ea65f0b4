"""The versions of every key: who keeps them, where they are read, how they are pruned.

Two keepers behind one interface (:data:`Keeper`, chosen per store by :func:`keeper`):

- :class:`BucketVersions`: an S3 bucket with versioning enabled keeps every write itself;
  version ids are S3's VersionIds, a delete leaves a delete marker, and daman writes nothing
  but the key (S3 guarantees that no racing write drops one).
- :class:`Records`: anywhere else (S3 without versioning, GCS, Azure, a folder), daman
  keeps them, as follows.

A push of a new key (``force=False``) writes the key alone, one request, as fast as a
plain upload: its footer holds no version id (``Footer.version`` empty), which says "not
recorded". Its version id is made from its push's time (to the millisecond) and random id
(:func:`version_of`, the same for every reader), and whoever replaces or deletes that
version records it first (:func:`record_unrecorded`: from this machine's cached copy when
it is the same object, else downloaded and checked).

A force push (and a restore) writes its object twice, by name: first as an immutable
*record* ``.daman-history/<sha256 of the key>/<version id>`` (``daman.keys.record_name``),
created with the store's conditional create, then under the key (a copy on the store's side
where it can make one: a hard link in a folder store, a server-side copy on S3 and GCS),
its version id in the footer. Two processes force-pushing the same key at once each create
their own record (ids hold a random part: no create can meet another's), so no version is
ever dropped, even when one overwrite of the key wins over the other.

::

    store/
      team/data                               the current version (a plain object)
      .daman-history/<sha256("team/data")>/
        20261130T101500.000Z-1a2b3c4d         every version replaced, and every version
        20261130T120001.250Z-9f8e7d6c         force-pushed (the current one, then)

An object pushed before versions existed is unrecorded in the same way: it shows as a
history of one until it is replaced. A key deleted from the store keeps its records (its
unrecorded version is recorded first): its history shows it deleted, and any version can be
restored.

The races this leaves open, each needing a push of a new key to land inside another
process's few milliseconds: a force push looks at the key (to record it) just before it
writes it, and a remote delete just before it deletes it; a new key's push landing between
the look and the write (the key absent at the look, or deleted meanwhile) is replaced or
deleted without a record. The current version is then the force push's, or none, as it would
be anyway. A daman client from before version history records nothing before it overwrites.

Ids sort by the time of their push (to the millisecond, then the random part), so the newest
is the greatest; the clocks of the machines that push decide that order.

A bucket whose versioning is enabled after daman kept records lists S3's versions only (the
records stay in the store, unlisted); a bucket whose versioning is suspended goes back to
records.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from . import legacy as legacy_format
from .errors import (
    DamanError,
    IntegrityError,
    KeptChangingError,
    KeyExistsError,
    KeyNotFoundError,
    RepairWarning,
    UntrustedObjectError,
    warn,
)
from .keys import VERSION_ID, record_folder, record_name
from .serialize import TAIL_GUESS, Footer, new_version_id, read_footer
from .store import ObjectInfo, Progress, Store, WriteUnconfirmedError

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_READERS = 8
"""Records whose footers ``history`` reads at once (one small ranged read each)."""


def version_of(footer: Footer) -> str:
    """The version id of a stored object: the one daman gave it when it was pushed, or for
    an object pushed before versions existed, one made of its push's time and random id."""
    if footer.version:
        return footer.version
    try:
        moment = datetime.fromisoformat(footer.pushed_at)
    except ValueError:
        moment = _EPOCH
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return new_version_id(moment.astimezone(timezone.utc), footer.push_id or footer.sha256 or "0")


LEGACY = "legacy"
"""What :func:`current_footer` returns for a daman 0.2 object (no footer to read)."""


def current_footer(store: Store, key: str) -> tuple[Footer | str, ObjectInfo] | None:
    """The footer of ``key``'s current version (one ranged read of its tail, usually) and
    what the store says of it; None if the key is not in the store; :data:`LEGACY` for a
    daman 0.2 object's footer."""
    try:
        tail, info = store.read_tail(key, TAIL_GUESS)
    except KeyNotFoundError:
        return None
    if legacy_format.recognise(tail, info):
        return LEGACY, info
    return read_footer(lambda o, n: store.read_range(key, o, n), info.size, tail), info


def records(store: Store, key: str) -> dict[str, ObjectInfo]:
    """The versions recorded of ``key``: id -> the record's listing (one listing request
    per 1,000 versions)."""
    folder = record_folder(key)
    return {info.key[len(folder) :]: info for info in store.list(folder)}


@dataclasses.dataclass(frozen=True)
class Listed:
    """One version of a key as the store holds it: where to read it."""

    version: str
    size: int
    name: str
    """The name to read: its record, or the key itself."""
    pinned: str | None
    """The store's own version id to read (bucket versioning), None for a name."""


def pinned(version: str | None) -> dict[str, str]:
    """The keyword that reads one version a bucket keeps (none: the name as it is now)."""
    return {"version": version} if version else {}


class Records:
    """The versions daman keeps itself (see the module's docstring): any store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def valid(self, version: str) -> bool:
        return VERSION_ID.fullmatch(version) is not None

    def source(self, key: str, version: str) -> Listed:
        return Listed(version, 0, record_name(key, version), None)

    def unrecorded(self, key: str, version: str) -> bool:
        """Whether ``version`` may be ``key``'s current object without a record (pushed
        before versions existed): the key itself is then read, and checked."""
        found = current_footer(self.store, key)
        return found is not None and (
            found[0] == LEGACY or (isinstance(found[0], Footer) and version_of(found[0]) == version)
        )

    def versions(self, key: str) -> tuple[list[Listed], str | None, bool]:
        """Every version of ``key`` newest first, the current one's id, and whether the
        key is in the store (False: deleted, its versions restorable)."""
        found = records(self.store, key)
        listed = [Listed(v, info.size, info.key, None) for v, info in found.items()]
        current = current_footer(self.store, key)
        current_id = None
        if current is not None and isinstance(current[0], Footer):
            current_id = version_of(current[0])
            if current_id not in found:  # pushed before versions: a history of one
                listed.append(Listed(current_id, current[1].size, key, None))
        listed.sort(key=lambda v: v.version, reverse=True)
        return listed, current_id, current is not None

    def sends(self, size: int, *, overwrite: bool) -> int:
        """The bytes a write of ``size`` bytes counts in its progress."""
        if not overwrite:
            return size  # the key alone: recorded when it is replaced
        return 2 * size  # the record, then the key (copied on the store's side if it can)

    def write(
        self,
        key: str,
        tmp: Path,
        footer: Footer,
        *,
        force: bool,
        progress: Progress,
        keep_replaced: Callable[[], None],
    ) -> ObjectInfo:
        """A new key alone; a force push's record first, then the key (see the module's
        docstring)."""
        if not force:
            assert not footer.version, "a new key's version is recorded when it is replaced"
            return self.store.put(key, tmp, overwrite=False, progress=progress)
        record(self.store, key, footer, tmp, progress=progress)
        try:
            keep_replaced()  # last, right before the key is written: the race's window is small
        except BaseException:
            self.withdraw(key, footer)  # the key was not written: never one of its versions
            raise
        source = record_name(key, footer.version)
        try:
            return self.store.put_copy(key, tmp, source=source, overwrite=force, progress=progress)
        except KeyNotFoundError:  # a racing prune (keep_versions) took the record meanwhile
            record(self.store, key, footer, tmp, progress=progress)
            return self.store.put_copy(key, tmp, source=source, overwrite=force, progress=progress)

    def withdraw(self, key: str, footer: Footer) -> None:
        """A create that lost to another push: its record never became a version."""
        if not footer.version:
            return  # it wrote no record
        with contextlib.suppress(DamanError):
            self.store.delete(record_name(key, footer.version))

    def prune(self, key: str, *, keep: int | None, footer: Footer, info: ObjectInfo) -> None:
        """Remove the oldest versions beyond ``keep``: never the one just written, nor the
        key's current one (a racing push may have replaced ours meanwhile)."""
        if keep is None:
            return
        protect = {version_of(footer)}
        current = current_footer(self.store, key)
        if current is not None and isinstance(current[0], Footer):
            protect.add(version_of(current[0]))
        ids = sorted(records(self.store, key), reverse=True)
        for version in [v for v in ids if v not in protect][max(0, keep - len(protect)) :]:
            with contextlib.suppress(KeyNotFoundError):  # a racing prune removed it first
                self.store.delete(record_name(key, version))

    def delete(self, key: str, *, keep_replaced: Callable[[], None]) -> None:
        keep_replaced()  # an unrecorded version is recorded first: restorable
        self.store.delete(key)

    def delete_all(self, key: str) -> bool:
        removed = False
        with contextlib.suppress(KeyNotFoundError):
            self.store.delete(key)
            removed = True
        for version in records(self.store, key):
            with contextlib.suppress(KeyNotFoundError):
                self.store.delete(record_name(key, version))
                removed = True
        return removed


class BucketVersions:
    """The versions an S3 bucket with versioning enabled keeps of every write (ids are S3's
    VersionIds, the order S3's): daman writes nothing but the key."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def valid(self, version: str) -> bool:
        return bool(version) and version.isprintable() and len(version) <= 1024

    def source(self, key: str, version: str) -> Listed:
        return Listed(version, 0, key, version)

    def unrecorded(self, key: str, version: str) -> bool:
        return False

    def versions(self, key: str) -> tuple[list[Listed], str | None, bool]:
        found = self.store.versions(key)
        listed = [Listed(v.version, v.size, key, v.version) for v in found if not v.deleted]
        current = next((v.version for v in found if v.latest and not v.deleted), None)
        return listed, current, current is not None

    def sends(self, size: int, *, overwrite: bool) -> int:
        return size

    def write(
        self,
        key: str,
        tmp: Path,
        footer: Footer,
        *,
        force: bool,
        progress: Progress,
        keep_replaced: Callable[[], None],
    ) -> ObjectInfo:
        return self.store.put(key, tmp, overwrite=force, progress=progress)

    def withdraw(self, key: str, footer: Footer) -> None:
        pass

    def prune(self, key: str, *, keep: int | None, footer: Footer, info: ObjectInfo) -> None:
        if keep is None:
            return
        held = [v for v in self.store.versions(key) if not v.deleted]
        for v in [v for v in held if v.version != info.version][max(0, keep - 1) :]:
            with contextlib.suppress(KeyNotFoundError):
                self.store.delete_version(key, v.version)

    def delete(self, key: str, *, keep_replaced: Callable[[], None]) -> None:
        self.store.delete(key)  # a delete marker: every version stays

    def delete_all(self, key: str) -> bool:
        found = self.store.versions(key)
        for v in found:  # deletions (markers) too
            with contextlib.suppress(KeyNotFoundError):
                self.store.delete_version(key, v.version)
        return any(not v.deleted for v in found)


Keeper = Records | BucketVersions


def keeper(store: Store) -> Keeper:
    """Who keeps ``store``'s versions: the bucket itself when it has versioning enabled (one
    request, once per store), else daman."""
    return BucketVersions(store) if store.keeps_versions() else Records(store)


def record_unrecorded(
    store: Store,
    key: str,
    copy: Callable[[Path, Footer | str], Footer | None],
    tmp: Path,
) -> None:
    """Before ``key`` is replaced or deleted: record its current version if it has no
    record (a new key's push, or an object pushed before versions existed).
    ``copy(tmp, footer)`` brings the key's object (``footer``: what its tail said just
    now, or :data:`LEGACY`) into ``tmp`` and returns the footer of what it brought, or None
    if there is nothing to record (gone meanwhile). The record is named after the bytes it
    holds; one made by a racing process under the same id holds the same object. An
    unreachable store raises: the replace or delete must not go on without the record."""
    try:
        found = current_footer(store, key)
        if found is None or (isinstance(found[0], Footer) and found[0].version):
            return  # nothing stored, or pushed with its record
        footer = copy(tmp, found[0])  # a 0.2 object comes converted to today's format
    except KeptChangingError:
        # Replaced again and again while it was read: by pushes that each recorded the
        # version they replaced first, the first of them this one (it was stable then).
        return
    except IntegrityError as exc:
        if isinstance(exc, UntrustedObjectError):
            raise
        # Not a daman object any more (truncated, its footer garbled): nothing to keep it
        # by, and the push or delete mending the key must not be refused for it.
        warn(
            f"the object under {key!r} is damaged beyond reading ({exc}); it is replaced "
            "without a copy in the key's history.",
            RepairWarning,
        )
        return
    if footer is None:
        return
    with contextlib.suppress(KeyExistsError):
        store.put(record_name(key, version_of(footer)), tmp, overwrite=False)


def record(store: Store, key: str, footer: Footer, path: Path, *, progress: Progress) -> None:
    """Create the record of the version written with ``footer`` from the file at ``path``.
    A record already there under its id is this push's own (ids are unique to a push: a
    retry met the first create); an unconfirmed create is this push's if the record holds
    this footer (a random push_id), and raises ``WriteUnconfirmedError`` otherwise."""
    name = record_name(key, footer.version)
    try:
        store.put(name, path, overwrite=False, progress=progress)
    except KeyExistsError:
        pass
    except WriteUnconfirmedError:
        try:
            tail, info = store.read_tail(name, TAIL_GUESS)
            stored = read_footer(lambda o, n: store.read_range(name, o, n), info.size, tail)
        except DamanError:
            stored = None
        if stored != footer:
            raise


def read_all(read: Callable[[Listed], object], found: list[Listed]) -> list[object]:
    """``read(version)`` of every version, a few at a time; a read that fails with a daman
    error gives that error instead of raising."""

    def one(version: Listed) -> object:
        try:
            return read(version)
        except DamanError as exc:
            return exc

    with ThreadPoolExecutor(_READERS) as pool:
        return list(pool.map(one, found))
