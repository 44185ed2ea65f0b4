"""The versions daman keeps of every key, on any store.

Every push writes its object twice, by name: first as an immutable *record*
``.daman-history/<sha256 of the key>/<version id>`` (``daman.keys.record_name``), created
with the store's conditional create, then under the key (a copy on the store's side where it
can make one: a hard link in a folder store, a server-side copy on S3). The version id is in
the object's footer (``Footer.version``), so the key's current version is known from its
tail alone. Two processes force-pushing the same key at once each create their own record
(ids hold a random part: no create can meet another's), so no version is ever dropped, even
when one overwrite of the key wins over the other.

::

    store/
      team/data                               the current version (a plain object)
      .daman-history/<sha256("team/data")>/
        20261130T101500.000Z-1a2b3c4d         every version pushed, the current one included
        20261130T120001.250Z-9f8e7d6c

An object pushed before versions existed has no record and an empty ``Footer.version``: its
id is made from its push's time and random id (:func:`version_of`, the same for every
reader), it shows as a history of one, and the first push, restore or delete that replaces
it records it first (:func:`record_unrecorded`). A key deleted from the store keeps its
records: its history shows it deleted, and any version can be restored.

Ids sort by the time of their push (to the millisecond, then the random part), so the newest
is the greatest; the clocks of the machines that push decide that order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from . import legacy as legacy_format
from .errors import DamanError, KeyExistsError, KeyNotFoundError
from .keys import record_folder, record_name
from .serialize import TAIL_GUESS, Footer, new_version_id, read_footer
from .store import ObjectInfo, Progress, Store

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


def current_footer(store: Store, key: str) -> Footer | str | None:
    """The footer of ``key``'s current version (one ranged read of its tail, usually), None
    if the key is not in the store, :data:`LEGACY` for a daman 0.2 object."""
    try:
        tail, info = store.read_tail(key, TAIL_GUESS)
    except KeyNotFoundError:
        return None
    if legacy_format.recognise(tail, info):
        return LEGACY
    return read_footer(lambda o, n: store.read_range(key, o, n), info.size, tail)


def records(store: Store, key: str) -> dict[str, ObjectInfo]:
    """The versions recorded of ``key``: id -> the record's listing (one listing request
    per 1,000 versions)."""
    folder = record_folder(key)
    return {info.key[len(folder) :]: info for info in store.list(folder)}


def record(store: Store, key: str, version: str, path: Path, *, progress: Progress) -> None:
    """Create the record of ``version`` from the file at ``path``; a record already there
    under that id holds the same object (ids are unique to a push), and is left alone."""
    with contextlib.suppress(KeyExistsError):
        store.put(record_name(key, version), path, overwrite=False, progress=progress)


def record_unrecorded(
    store: Store, key: str, download: Callable[[Path], Footer], tmp: Path
) -> None:
    """Before ``key`` is replaced or deleted: record its current version if it has no
    record (an object pushed before versions existed). ``download`` brings the key's
    object, checked, into ``tmp`` and returns its footer. A record made by a racing
    process under the same id holds the same object."""
    found = current_footer(store, key)
    if found is None or (isinstance(found, Footer) and found.version):
        return  # nothing stored, or pushed with its record
    footer = download(tmp)  # the object itself (a 0.2 one converted to today's format)
    with contextlib.suppress(KeyExistsError):
        store.put(record_name(key, version_of(footer)), tmp, overwrite=False)


def prune(store: Store, key: str, *, keep: int | None, protect: str) -> list[str]:
    """Remove the oldest records of ``key`` beyond ``keep`` (never ``protect``, the version
    just made current); returns the ids removed."""
    if keep is None:
        return []
    ids = sorted(records(store, key), reverse=True)
    removed = []
    for version in [v for v in ids if v != protect][max(0, keep - 1) :]:
        with contextlib.suppress(KeyNotFoundError):  # a racing prune removed it first
            store.delete(record_name(key, version))
        removed.append(version)
    return removed


def delete_records(store: Store, key: str) -> int:
    """Remove every record of ``key``; returns how many were removed."""
    removed = 0
    for version in records(store, key):
        with contextlib.suppress(KeyNotFoundError):
            store.delete(record_name(key, version))
            removed += 1
    return removed


def read_all(
    read: Callable[[str, ObjectInfo], object], found: dict[str, ObjectInfo]
) -> dict[str, object]:
    """``read(id, info)`` of every record, a few at a time; a read that fails with a daman
    error gives that error instead of raising."""

    def one(item: tuple[str, ObjectInfo]) -> object:
        try:
            return read(*item)
        except DamanError as exc:
            return exc

    with ThreadPoolExecutor(_READERS) as pool:
        return dict(zip(found, pool.map(one, found.items()), strict=True))
