"""The manager: push, pull, delete and friends, tying store, cache and serialization together.

Every front-end (module functions, CLI, magics, panel) calls a :class:`Manager`; none of them
holds logic of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import gc
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import forksafe
from . import history as versions
from . import legacy as legacy_format
from .cache import Cache, CachedCopy, CacheEntry
from .cells import assigned_names, cell_outputs, stored_variables
from .config import Config, format_size
from .errors import (
    DamanError,
    IntegrityError,
    InvalidArgumentError,
    KeyExistsError,
    KeyNotFoundError,
    NotCachedError,
    NotCachedWarning,
    NotMappedWarning,
    OfflineWarning,
    StorageNotFoundError,
    StoreUnavailableError,
    UntrustedObjectError,
    a,
    disc_errors,
    first_sentence,
    os_errors,
    warn,
)
from .files import atomic_write, open_empty
from .keys import validate_key, validate_prefix
from .listing import ListingCache
from .results import (
    Deleted,
    Disc,
    KeyHistory,
    KeyList,
    KeyListing,
    LevelListing,
    MappedFile,
    ObjectDetails,
    Pulled,
    Source,
    Usage,
    VerifyReport,
)
from .serialize import (
    TAIL_GUESS,
    FileBytes,
    Footer,
    KnownFooters,
    PrefixHasher,
    StoredFile,
    check_file,
    check_whole_file,
    dumps_meta,
    load_meta,
    read_footer,
    write_object,
)
from .store import ObjectInfo, Store, WriteUnconfirmedError, describe_store, open_store
from .versioning import Versioning

if TYPE_CHECKING:
    from .panel import Panel

PROGRESS_MIN_BYTES = 8 * 1024 * 1024
_WRITE_BUFFER = 1024 * 1024
_DOWNLOAD_ATTEMPTS = 3
"""Downloads of a key whose bytes fail their check (corrupted in transit, or another key's
object in the answer) before giving up."""
_FETCH_ATTEMPTS = 3
LEVEL_PAGE = 1000
"""Names per page of a level listing (S3's most per request)."""

TransferProgress = Callable[[int, int], object]
"""Called with ``(bytes done, bytes in all)`` as a transfer moves, from any thread."""
_progress_sink: contextvars.ContextVar[TransferProgress | None] = contextvars.ContextVar(
    "daman_progress_sink", default=None
)


class Remote(enum.Enum):
    """What the store said about a key, when it was not an ETag."""

    UNCHECKED = "unchecked"
    UNREACHABLE = "unreachable"
    MISSING = "missing"


class PullAction(enum.Enum):
    USE_CACHE = "use cache"
    USE_CACHE_OFFLINE = "use cache, warn offline"
    USE_CACHE_DELETED = "use cache, warn deleted from the store"
    DOWNLOAD = "download"


def decide_pull(*, cached_etag: str | None, remote: str | Remote, force: bool) -> PullAction:
    """What a pull does, given the cached copy's ETag (None if not cached) and what the store
    said: its ETag, or that it was not asked, not reachable, or has no such key."""
    if force or cached_etag is None:
        return PullAction.DOWNLOAD
    if remote is Remote.UNCHECKED or remote == cached_etag:
        return PullAction.USE_CACHE
    if remote is Remote.UNREACHABLE:
        return PullAction.USE_CACHE_OFFLINE
    if remote is Remote.MISSING:
        return PullAction.USE_CACHE_DELETED
    return PullAction.DOWNLOAD


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection passes while a long listing is built: 100,000 keys make several
    hundred thousand objects, none in a cycle, whose allocation alone triggers full passes
    over every object of the process (a notebook's whole heap); in ``ls`` of a folder they
    took 40 % of the time. The collector runs again, as before, once the listing is made."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_key(footer: Footer, key: str) -> None:
    """The object is the one asked for: its footer names the key it was pushed under. A
    connection shared by two processes (a fork pool) once crossed their answers; objects
    written before footers named their key pass."""
    if footer.key and footer.key != key:
        raise IntegrityError(
            f"asked for {key!r}, the store answered with the object pushed as {footer.key!r}. "
            "If a tool other than daman copied or renamed it, push it again under this key."
        )


class _ProgressBar:
    """One transfer's progress: a ``tqdm.auto`` bar drawn once the size is known, and only
    for transfers of at least PROGRESS_MIN_BYTES; or, when a caller asked for them (``sink``:
    the panel draws its own), ``(done, total)`` calls instead. Parts move in parallel, hence
    the lock."""

    def __init__(self, desc: str, enabled: bool, sink: TransferProgress | None = None) -> None:
        self.desc = desc
        self.enabled = enabled
        self.bar: Any = None
        self.lock = threading.Lock()
        self.sink = sink
        self.done = self.total = 0

    def start(self, total: int) -> None:
        if self.sink is not None:
            with self.lock:
                self.done, self.total = 0, total  # again if the download starts over
            self.sink(0, total)
            return
        if self.enabled and self.bar is None and total >= PROGRESS_MIN_BYTES:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False,
            )  # fmt: skip

    def __call__(self, n: int) -> None:
        if self.sink is not None:
            with self.lock:  # held while the sink hears it: parts report from several threads
                self.done += n
                self.sink(self.done, self.total)
        elif self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _details(
    key: str,
    footer: Footer,
    meta: Any,
    remote: ObjectInfo,
    *,
    cached: bool,
    persist: bool,
    outdated: bool,
) -> ObjectDetails:
    """What ``info`` tells of a stored object, from its footer and the store's answer."""
    return ObjectDetails(
        key=key,
        size=remote.size,
        etag=remote.etag,
        last_modified=remote.last_modified,
        sha256=footer.sha256,
        pushed_by=footer.pushed_by,
        pushed_at=footer.pushed_at,
        python=footer.python,
        cloudpickle=footer.cloudpickle,
        meta=meta,
        cached=cached,
        persist=persist,
        libraries=dict(footer.libraries),
        holds_code=footer.code,
        outdated=outdated,
    )


class Manager:
    """One store plus one local cache. Several managers may live in one process."""

    def __init__(
        self, config: Config, *, store: Store | None = None, cache: Cache | None = None
    ) -> None:
        config.check_folders()
        self.config = config
        self._store = store
        self._store_lock = threading.Lock()
        forksafe.at_fork_in_child(self, Manager._after_fork_in_child)
        # Copies are the store's (its bucket and prefix, or folder): another store's copy of
        # a key of the same name is never this one's hit. Not the endpoint: a server that
        # moved, or one unreachable today, holds the same objects.
        self.cache = cache or Cache(
            config.cache_dir, config.allocated_space, store=describe_store(config)
        )
        self.signing_key = config.signing_secret
        self._versioning = Versioning(self)
        self.listings = ListingCache()
        """Level listings kept a few seconds, shared by the panel and key completion."""
        self._footers = KnownFooters()

    @property
    def store(self) -> Store:
        """The store, opened on first use: what only looks at the local cache (``usage``,
        ``set_persist``, ``clear``, ``verify``, ``disc``: dm_status, dm_persist, dm_clear,
        dm_verify) makes no client and, for S3, does not import boto3."""
        store = self._store
        if store is None:
            with self._store_lock:
                if self._store is None:
                    self._store = open_store(self.config)
                store = self._store
        return store

    def _after_fork_in_child(self) -> None:
        self._store_lock = threading.Lock()  # another thread may have held it at the fork

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        self.cache.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _progress(self, desc: str) -> Iterator[_ProgressBar]:
        bar = _ProgressBar(desc, enabled=self.config.progress, sink=_progress_sink.get())
        try:
            yield bar
        finally:
            bar.close()

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
    ) -> CacheEntry | None:
        """Move ``tmp`` into the cache as ``key``'s entry; None (with a warning) if it does
        not fit. Without ``evict`` (a memory-only pull replacing an outdated copy), it is
        kept only if it fits in the free space, and silently not kept otherwise."""
        size = tmp.stat().st_size
        entry = self.cache.add(
            key, tmp, etag=etag, sha256=sha256, persist=persist, evict=evict, version=version
        )
        if entry is None and evict:
            usage = self.cache.usage()
            warn(
                f"{key!r} ({format_size(size)}) was {verb} but not kept in the local cache: "
                f"it does not fit in allocated_space ({format_size(usage.allocated)}, "
                f"{format_size(usage.used)} used, persisted entries cannot be evicted). Raise "
                "allocated_space or unpersist entries.",
                NotCachedWarning,
            )
        return entry

    def _check_signature(self, footer: Footer, key: str) -> None:
        if self.signing_key is not None:
            footer.check_signature(self.signing_key, key)

    def _check_identity(self, footer: Footer, key: str, *, last: bool) -> None:
        """Before anything is unpickled: the answer holds ``key``'s object (an answer that
        holds another key's is worth asking again: connections shared by two processes once
        crossed answers) and, with signing on, is signed for ``key``."""
        if not last and footer.key and footer.key != key:
            _check_key(footer, key)  # raises: the caller asks again
        self._check_signature(footer, key)  # signed for another key: refused as untrusted
        _check_key(footer, key)

    def _written_by_this_push(self, key: str, footer: Footer) -> ObjectInfo | None:
        """The stored object's info if it is the file this push wrote (the same footer,
        which holds a random push_id), as when the answer to a conditional write was lost
        and the client's retry met the write itself; None if it is anyone else's."""
        try:
            tail, info = self.store.read_tail(key, TAIL_GUESS)
            stored = read_footer(lambda o, n: self.store.read_range(key, o, n), info.size, tail)
        except DamanError:
            return None
        return info if stored == footer else None

    # -- the API -------------------------------------------------------------------------

    def push(
        self, obj: Any, key: str, meta: Any = None, force: bool = False, persist: bool = False
    ) -> ObjectInfo:
        """Store ``obj`` (and ``meta``) under ``key`` and keep it in the local cache; returns
        the stored object's size and version.

        Raises ``KeyExistsError`` if the key exists and ``force`` is false, also when another
        machine creates it at the same moment; nothing is uploaded if pickling fails."""
        validate_key(key)
        meta_bytes = dumps_meta(meta)
        numbered = self._versioning.records_first(force=force)  # see daman.history
        with self.cache.temp_file() as tmp:
            with disc_errors(self.cache.root), open_empty(tmp, buffering=_WRITE_BUFFER) as f:
                footer = write_object(obj, meta_bytes, f, self.signing_key, key, versioned=numbered)
            info = self._publish(key, tmp, footer, force=force)
            try:
                self._keep(
                    key, tmp, etag=info.etag, sha256=footer.sha256, persist=persist, verb="pushed"
                )
            except DamanError as exc:  # stored for everyone: only this machine's copy is not
                warn(
                    f"{key!r} was pushed, but not kept in the local cache: {exc}", NotCachedWarning
                )
        return info

    def _publish(self, key: str, tmp: Path, footer: Footer, *, force: bool) -> ObjectInfo:
        """Store the finished file ``tmp`` (written with ``footer``, which holds its version
        id) as a new version of ``key`` (see ``daman.history``: its record first, then the
        key, unless the bucket keeps versions itself). The oldest versions beyond
        ``keep_versions`` go last."""
        keeper = self._versioning.keeper()
        size = tmp.stat().st_size
        try:
            with self._progress(f"push {key}") as progress:
                progress.start(keeper.sends(size, overwrite=force))
                try:
                    info = keeper.write(
                        key, tmp, footer, force=force, progress=progress,
                        keep_replaced=lambda: self._versioning.keep_replaced(key),
                    )  # fmt: skip
                except (KeyExistsError, WriteUnconfirmedError) as exc:
                    # A retry met our own write (its first answer was lost): look at what
                    # is stored; it is ours if its footer is this push's (a random push_id).
                    found = self._written_by_this_push(key, footer)
                    if found is None and isinstance(exc, KeyExistsError):
                        keeper.withdraw(key, footer)  # never one of the key's versions
                    if found is None and isinstance(exc, WriteUnconfirmedError):
                        raise StoreUnavailableError(
                            f"{exc}, and the stored object is not this push's. Push again."
                        ) from None
                    if found is None:
                        raise
                    info = found
            keeper.prune(key, keep=self.config.keep_versions, footer=footer, info=info)
        finally:
            self.listings.forget()  # even a failed put may have changed the store
        return info

    def push_file(
        self,
        path: str | os.PathLike[str],
        key: str,
        meta: Any = None,
        force: bool = False,
        persist: bool = False,
    ) -> ObjectInfo:
        """Push a file's bytes (pulled back as ``bytes``), read in chunks as they are written
        (a file or a pipe: none of it is held in memory). A regular file that changes while it
        is read is refused, and nothing is pushed."""
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read {path}: {exc.strerror or exc}.") from None
        with f:
            return self.push(FileBytes(f, str(path)), key, meta=meta, force=force, persist=persist)

    def pull(
        self,
        key: str,
        force: bool = False,
        persist: bool = False,
        memory_only: bool = False,
        *,
        allow_version_mismatch: bool = False,
        mmap: bool = False,
        version: str | None = None,
    ) -> tuple[Any, Any]:
        """``(obj, meta)`` for ``key``, from the local cache when it is there and current.

        Never fails because of the allocation: an object that cannot be cached is returned
        with a :class:`NotCachedWarning`. Code pickled by value under another Python minor
        version is refused (it can crash the interpreter) unless ``allow_version_mismatch``.
        With ``mmap``, its numpy arrays are mapped read-only from the cached file (no copy,
        nothing read until touched); the file stays on disc, and counted, while they live.
        ``version`` (an id from :meth:`history`) pulls that version instead of the current
        one; it is cached as any object is (a version never changes: no check is made)."""
        pulled = self.load(
            key,
            force=force,
            persist=persist,
            memory_only=memory_only,
            allow_version_mismatch=allow_version_mismatch,
            mmap=mmap,
            version=version,
        )
        return pulled.obj, pulled.meta

    def load(
        self,
        key: str,
        force: bool = False,
        persist: bool = False,
        memory_only: bool = False,
        *,
        allow_version_mismatch: bool = False,
        mmap: bool = False,
        version: str | None = None,
    ) -> Pulled:
        """:meth:`pull`, also telling where the object came from and its stored size."""
        if memory_only and persist:
            raise InvalidArgumentError(
                "persist=True pins a local copy; memory_only=True keeps none."
            )
        if mmap and memory_only:
            warn(
                f"{key!r} is loaded into memory, not mapped: memory_only=True keeps no local "
                "copy to map.",
                NotMappedWarning,
            )
            mmap = False
        allow = allow_version_mismatch
        opened = (
            self._open_current(key, force=force, persist=persist, keep=not memory_only, mapped=mmap)
            if version is None
            else self._versioning.open(
                key, version, force=force, persist=persist, keep=not memory_only, mapped=mmap
            )
        )
        with opened as (stored, source, entry):
            if mmap and entry is not None and self.cache.lease(entry, stored.f):
                obj = stored.load_mapped(allow_version_mismatch=allow)
            else:
                if mmap:
                    warn(
                        f"{key!r} is loaded into memory, not mapped: it is not in the local "
                        "cache (it does not fit in allocated_space, or another process "
                        "removed it meanwhile).",
                        NotMappedWarning,
                    )
                obj = stored.load(allow_version_mismatch=allow)
            meta = stored.meta(allow_version_mismatch=allow)
            return Pulled(obj, meta, source, stored.size)

    def pull_bytes(
        self, key: str, force: bool = False, persist: bool = False, *, version: str | None = None
    ) -> bytes:
        """The bytes stored under ``key`` (by :meth:`push_file`, ``dm_push`` or a push of a
        ``bytes``); an :class:`InvalidArgumentError` if it holds another kind of object."""
        obj, _ = self.pull(key, force=force, persist=persist, version=version)
        if not isinstance(obj, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(
                f"{key!r} holds {a(type(obj).__name__)}, not bytes: only bytes (pushed with "
                f"dm_push or dm.push_file) can be written to a file. Load it with "
                f"dm.pull({key!r}) instead."
            )
        return obj

    def pull_file(
        self,
        key: str,
        dest: str | os.PathLike[str],
        force: bool = False,
        persist: bool = False,
        *,
        version: str | None = None,
    ) -> int:
        """Write the bytes stored under ``key`` (e.g. by :meth:`push_file`) to ``dest``, whole
        or not at all (a temp file beside it, then a rename); returns the bytes written."""
        obj = self.pull_bytes(key, force=force, persist=persist, version=version)
        dest = Path(dest)
        with os_errors(dest, "Choose another output file"), atomic_write(dest) as out:
            out.file.write(obj)
        return len(obj)

    def fetch(
        self,
        key: str,
        force: bool = False,
        persist: bool = False,
        *,
        progress: TransferProgress | None = None,
        version: str | None = None,
    ) -> CacheEntry:
        """Bring the current version of ``key`` (or ``version``) into the local cache without
        unpickling it. ``progress`` hears a download's ``(done, total)`` bytes instead of a
        progress bar."""
        reset = _progress_sink.set(progress)
        try:
            for _ in range(_FETCH_ATTEMPTS):
                opening = (
                    self._open_current(key, force=force, persist=persist, keep=True)
                    if version is None
                    else self._versioning.open(
                        key, version, force=force, persist=persist, keep=True
                    )
                )
                with opening as opened:
                    kept = opened[2]
                if kept is None:
                    raise NotCachedError(
                        f"{key!r} does not fit in the local cache (allocated_space "
                        f"{format_size(self.cache.allocated_space)}, persisted entries cannot "
                        "be evicted). Raise allocated_space or unpersist entries."
                    )
                entry = self.cache.get(key, version or "")
                if entry is not None:
                    return entry
                force = False  # removed by another process meanwhile: bring it in again
        finally:
            _progress_sink.reset(reset)
        raise NotCachedError(
            f"{key!r} was removed from the local cache by another process each time it was "
            f"fetched ({_FETCH_ATTEMPTS} times). Try again once the other process is done."
        )

    @contextlib.contextmanager
    def _open_current(
        self, key: str, *, force: bool, persist: bool, keep: bool, mapped: bool = False
    ) -> Iterator[tuple[StoredFile, Source, CacheEntry | None]]:
        """An open, checked file holding the current version of ``key``: the cached copy
        when it is current, else a fresh download (kept in the cache when ``keep``), with
        the cache entry holding it (None if it is not cached). ``mapped``: its buffers will
        be mapped, not read (a signed hit checks what can run code, not every byte)."""
        validate_key(key)
        entry = None if force else self.cache.get(key)
        remote: str | Remote = Remote.UNCHECKED
        offline_reason: Exception | None = None
        if entry is not None and self.config.check_current:
            try:
                remote = self.store.head_current(key).etag
            except (StoreUnavailableError, StorageNotFoundError) as exc:
                remote, offline_reason = Remote.UNREACHABLE, exc
            except KeyNotFoundError:
                remote = Remote.MISSING
        action = decide_pull(cached_etag=entry and entry.etag, remote=remote, force=force)
        if action is PullAction.USE_CACHE_OFFLINE:
            warn(
                f"the store is unreachable: {first_sentence(offline_reason)}; using the cached "
                f"copy of {key!r}, which may be out of date.",
                OfflineWarning,
            )
        elif action is PullAction.USE_CACHE_DELETED:
            warn(
                f"{key!r} is no longer in the store; using the local cached copy. "
                "Delete it with dm.delete(key) if it should be gone.",
                OfflineWarning,
            )
        if action is not PullAction.DOWNLOAD:
            assert entry is not None
            stored = self._open_cached(entry, persist, mapped=mapped)
            if stored is not None:
                with stored.f:
                    yield stored, "cache", entry
                return
        with self._download(
            key, entry, force=force, persist=persist, keep=keep, mapped=mapped
        ) as opened:
            yield opened

    def _open_cached(
        self, entry: CacheEntry, persist: bool, *, mapped: bool = False
    ) -> StoredFile | None:
        """Open a cache hit; None if the file vanished (evicted meanwhile) or is damaged.
        The open file stays readable even if another process evicts the entry."""
        try:
            f = open(entry.path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            return None
        try:
            # A cached file never changes (a new version is a new name): its footer, read
            # once, is known again by its name, inode, size and time.
            st = os.fstat(f.fileno())
            seen = (entry.path.name, st.st_ino, st.st_size, st.st_mtime_ns)
            stored = StoredFile(f, self._footers.get(seen), size=st.st_size)
            self._footers.remember(seen, stored.footer)
            if self.signing_key is None:
                stored.check_meta()
            elif mapped:  # what unpickling can run; the mapped buffers are data only
                stored.check_executable()
            else:  # a cache folder is a trust boundary too: hash and signature on every hit
                stored.verify()
            self._check_identity(stored.footer, entry.key, last=True)
        except IntegrityError:
            f.close()
            self.cache.discard(entry)
            return None
        self.cache.touch(entry.key, entry.version)
        if persist and not entry.persist:
            self.cache.set_persist(entry.key, True, version=entry.version)
        return stored

    @contextlib.contextmanager
    def _download(
        self,
        key: str,
        stale: CacheEntry | None,
        *,
        force: bool,
        persist: bool,
        keep: bool,
        mapped: bool = False,
    ) -> Iterator[tuple[StoredFile, Source, CacheEntry | None]]:
        with self.cache.temp_file() as tmp:
            # The key's lock covers fetching and caching, not the caller's unpickling: one
            # download of a key at a time on this machine, nobody waits on someone's load.
            with self.cache.key_lock(key):
                stored = None
                kept: CacheEntry | None = None
                source: Source = "cache"
                if not force:
                    fresh = self.cache.get(key)
                    if fresh is not None and fresh.etag != (stale and stale.etag):
                        # fetched by another process while we waited for the key's lock
                        stored = self._open_cached(fresh, persist, mapped=mapped)
                        kept = fresh
                if stored is None:
                    stored, info = self._fetch_verified(key, tmp)
                    source = "store"
                    if keep or stale is not None:
                        # A memory-only pull replaces an outdated copy (it must not be served
                        # again) but evicts nothing to make room for the new one.
                        try:
                            kept = self._keep(
                                key, tmp, etag=info.etag, sha256=stored.footer.sha256,
                                persist=persist, verb="pulled", evict=keep,
                            )  # fmt: skip
                        except BaseException:
                            stored.f.close()
                            raise
            with stored.f:
                yield stored, source, kept

    def _fetch_verified(
        self, key: str, tmp: Path, *, name: str | None = None, pinned: str | None = None
    ) -> tuple[StoredFile, ObjectInfo]:
        """Download ``key`` (or the record ``name`` of one of its versions) into ``tmp`` and
        check every byte before anything unpickles it (a corrupted transfer, or an answer
        holding another key's object, is tried again). Returns the file, open, and its
        version."""
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            f = open(tmp, "rb")  # noqa: SIM115 - returned open, or closed below
            hasher = PrefixHasher(f.fileno())  # hashes the file while it arrives
            try:
                with disc_errors(self.cache.root), self._progress(f"pull {key}") as progress:

                    def on_size(
                        size: int, progress: _ProgressBar = progress, hasher: PrefixHasher = hasher
                    ) -> None:
                        progress.start(size)
                        hasher.start(size)

                    info = self.store.get(
                        name or key,
                        tmp,
                        progress=progress,
                        on_size=on_size,
                        on_written=hasher.written,
                        **versions.pinned(pinned),
                    )
                # A daman 0.2 object is checked and rewritten in today's format here, so that
                # the cache never holds the old format.
                converted = legacy_format.convert_download(f, tmp, key, info, self.signing_key)
                stored = StoredFile(f, converted)
                if converted is None:
                    stored.verify(hasher)
                self._check_identity(stored.footer, key, last=attempt == _DOWNLOAD_ATTEMPTS)
                return stored, info
            except UntrustedObjectError:
                f.close()
                raise  # the same bytes again would be refused again
            except IntegrityError:
                f.close()
                if attempt == _DOWNLOAD_ATTEMPTS:
                    raise
            except BaseException:
                f.close()
                raise
            finally:
                hasher.close()
        raise AssertionError("unreachable")

    def delete(
        self, key: str, local: bool = True, remote: bool = False, *, all_versions: bool = False
    ) -> Deleted:
        """Remove the cached copies (``local``: of every version) and/or the stored object
        (``remote``); returns what was removed. The store keeps the key's versions: its
        history shows it deleted, and :meth:`restore` brings any version back, unless
        ``all_versions`` removes them too. ``KeyNotFoundError`` only if the key exists
        nowhere asked."""
        validate_key(key)
        if not (local or remote):
            raise InvalidArgumentError("nothing to delete: pass local=True and/or remote=True.")
        if all_versions and not remote:
            raise InvalidArgumentError(
                "all_versions=True removes the stored versions: pass remote=True too."
            )
        from_store = from_cache = False
        if remote:  # first: if the store fails, nothing changed here either
            try:
                keeper = self._versioning.keeper()
                if all_versions:
                    from_store = keeper.delete_all(key)
                else:
                    with contextlib.suppress(KeyNotFoundError):
                        keeper.delete(
                            key, keep_replaced=lambda: self._versioning.keep_replaced(key)
                        )
                        from_store = True
            finally:
                self.listings.forget()
        if local:
            from_cache = self.cache.remove(key)
        deleted = Deleted(key, local=from_cache, remote=from_store)
        if from_cache or from_store:
            return deleted
        if remote:
            raise KeyNotFoundError(
                key, f"the local cache or {self.store.describe()}" if local else "the store"
            )
        # Nothing cached: only an error if the key exists nowhere (one HEAD decides).
        try:
            stored = self.exists(key)
        except (StoreUnavailableError, StorageNotFoundError) as exc:
            raise KeyNotFoundError(
                key, f"the local cache (the store could not be checked: {exc})"
            ) from None
        if not stored:
            raise KeyNotFoundError(key, f"the local cache or {self.store.describe()}")
        return deleted

    def history(self, key: str) -> KeyHistory:
        """The versions of ``key`` in the store, newest first, and which one is current (none
        when the key was deleted: any version can be restored). One listing request, then
        one small ranged read per version (8 at a time) for its writer, time and meta."""
        return self._versioning.history(key)

    def restore(self, key: str, *, version: str, persist: bool = False) -> ObjectInfo:
        """Make ``version`` of ``key`` its current version again, also after the key was
        deleted. The restore is itself a new version (its bytes, a new footer saying who
        restored it and from which version), so the version it replaces stays in the
        history too."""
        return self._versioning.restore(key, version=version, persist=persist)

    def cached_cell(self, key: str, names: Sequence[str]) -> tuple[dict[str, Any], Pulled] | None:
        """``%%dm_cache``'s question: the variables ``names`` stored under ``key`` (and where
        they came from), or None when the store does not hold the key and the cell is to run.
        Offline, a cached copy is used (with an OfflineWarning), as ``pull`` does; a key
        deleted from the store is computed again, whatever copies machines still hold."""
        validate_key(key)
        try:
            self.store.head_current(key)
        except KeyNotFoundError:
            self.cache.remove(key)  # deleted for everyone so that the cell runs again
            return None
        except (StoreUnavailableError, StorageNotFoundError):
            if self.cache.get(key) is None:
                raise
        pulled = self.load(key)
        return stored_variables(key, pulled.obj, names), pulled

    def push_cell(
        self,
        key: str,
        names: Sequence[str],
        *,
        before: Mapping[str, Any],
        after: Mapping[str, Any],
        code: str,
        cell: str,
    ) -> ObjectInfo:
        """Push what a cell computed: the variables ``names`` it set (see
        :func:`cells.cell_outputs`: ``before``/``after`` are the namespace around the run,
        ``code`` the cell as Python), with the cell's source as meta. A variable the cell
        did not set (even one an earlier cell left) is an error, and nothing is pushed."""
        values, missing = cell_outputs(names, before, after, assigned_names(code))
        if missing:
            earlier = [name for name in missing if name in after]
            why = f" ({', '.join(earlier)} only left by an earlier cell)" if earlier else ""
            raise InvalidArgumentError(
                f"the cell did not set {', '.join(missing)}{why}; nothing was pushed to {key!r}."
            )
        return self.push(values, key, meta={"variables": list(names), "cell": cell})

    def exists(self, key: str) -> bool:
        """Whether ``key`` is in the store (one HEAD)."""
        try:
            self.store.head(key)
        except KeyNotFoundError:
            return False
        return True

    def info(self, key: str, *, version: str | None = None) -> ObjectDetails:
        """Size, times, hash, writer and meta of ``key`` (or of one of its versions) from one
        ranged read of its tail."""
        validate_key(key)
        if version is not None:
            footer, meta, remote = self._versioning.details(key, version)
            entry = self.cache.get(key, version)
            return _details(
                key,
                footer,
                meta,
                remote,
                cached=entry is not None,
                persist=entry is not None and entry.persist,
                outdated=False,  # a version never changes
            )
        try:
            found = self._remote_details(key)
            if isinstance(found, ObjectDetails):  # a daman 0.2 object
                return found
            footer, meta, remote = found
        except (StoreUnavailableError, StorageNotFoundError) as exc:
            entry = self.cache.get(key)
            stored = None if entry is None else self._open_cached(entry, persist=False)
            if entry is None or stored is None:  # not cached, or evicted meanwhile
                raise
            warn(
                f"the store is unreachable: {first_sentence(exc)}; showing the cached copy of "
                f"{key!r}.",
                OfflineWarning,
            )
            with stored.f:
                footer = stored.footer
                meta = stored.meta()
            remote = ObjectInfo(key, entry.size, entry.etag, None)
        states = self.cache.states([key])
        return _details(
            key,
            footer,
            meta,
            remote,
            cached=key in states,
            persist=key in states and states[key].persist,
            outdated=key in states and bool(remote.etag) and states[key].etag != remote.etag,
        )

    def _remote_details(self, key: str) -> tuple[Footer, Any, ObjectInfo] | ObjectDetails:
        """The stored object's footer and meta, read from its tail (asked again when the
        answer holds another key's object); a daman 0.2 object's details."""

        def read_at(offset: int, length: int) -> bytes:
            return self.store.read_range(key, offset, length)

        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            tail, remote = self.store.read_tail(key, TAIL_GUESS)
            if legacy_format.recognise(tail, remote):  # no footer: its meta is inside it
                states = self.cache.states([key])
                return legacy_format.details(key, remote, states, self.signing_key)
            footer = read_footer(read_at, remote.size, tail)
            try:
                self._check_identity(footer, key, last=attempt == _DOWNLOAD_ATTEMPTS)
            except UntrustedObjectError:
                raise
            except IntegrityError:
                if attempt == _DOWNLOAD_ATTEMPTS:
                    raise
                continue
            return footer, load_meta(read_at, footer, tail, remote.size), remote
        raise AssertionError("unreachable")

    def ls(self, prefix: str = "", *, legacy: bool = False) -> KeyList:
        """Keys in the store under ``prefix``, each with whether it is cached / persisted.
        Every key: on a large bucket, :meth:`ls_level` lists one level in one request. With
        ``legacy``, daman 0.2 objects are marked, at the cost of reading each key's last 16
        bytes (on S3 one small request per key, 8 at a time; a listing cannot tell)."""
        validate_prefix(prefix)
        since = self.listings.generation
        # The versions of the keys cached here tell whether a copy is outdated; a folder
        # store reads them from each file's footer, so it is asked for those keys only.
        states = self.cache.states_under(prefix)
        with _collector_paused():
            infos = list(self.store.list_fast(prefix, versions=states.keys()))
            if legacy:  # pages of 1,000 keys, 8 reads at a time
                old: set[str] = set()
                for start in range(0, len(infos), 1000):
                    old |= legacy_format.find(self.store, infos[start : start + 1000])
                listing = [KeyListing.of(i, states.get(i.key), legacy=i.key in old) for i in infos]
            else:
                listing = [KeyListing.of(i, states.get(i.key)) for i in infos]
        self.listings.put_keys(prefix, infos, limit=LEVEL_PAGE, since=since)
        return KeyList(listing)

    def ls_level(
        self,
        prefix: str = "",
        *,
        token: str | None = None,
        limit: int = LEVEL_PAGE,
        fresh: bool = False,
    ) -> LevelListing:
        """One level of the store under ``prefix`` (``""`` or ending with ``/``; a partial
        last part narrows the level to names starting with it): its sub-prefixes and the keys
        directly in it, each with whether it is cached / persisted here; at most ``limit``
        names per page, ``token`` continuing. One request per page however many keys lie
        below. The store's answer is kept LISTING_TTL seconds (``manager.listings``, shared
        with key completion); ``fresh`` asks again."""
        validate_prefix(prefix)
        level = None if fresh else self.listings.get(prefix, token, limit)
        if level is None:
            since = self.listings.generation
            level = self.store.list_level(prefix, token=token, limit=limit)
            self.listings.put(level, token=token, limit=limit, since=since)
        states = self.cache.states([info.key for info in level.objects])
        keys = [KeyListing.of(info, states.get(info.key)) for info in level.objects]
        return LevelListing(prefix, list(level.prefixes), keys, level.token)

    def usage(self) -> Usage:
        """Local disc use against the allocation and the store in use, from the index's totals;
        every cached entry (most recently used first) when ``entries`` is read. Asks nothing
        of the store (nor opens it)."""
        totals = self.cache.usage()
        return Usage(
            used=totals.used,
            allocated=totals.allocated,
            count=totals.count,
            store=describe_store(self.config) if self._store is None else self.store.describe(),
            cache=self.cache,
        )

    def verify(self, key: str | None = None) -> VerifyReport:
        """Hash every cached copy (or ``key``'s) against its sha256, and its signature when
        signing is on; remove the copies that fail. Without ``key``, also reconcile the
        index with the files on disc. Reads only local files."""
        copies: list[CachedCopy]
        if key is None:
            repaired, copies = self.cache.reconcile()
        else:
            validate_key(key)
            copies = self.cache.copies_of(key)  # its current version and versions by id
            if not copies:
                raise KeyNotFoundError(key, "the local cache")
            repaired = {"dropped_rows": 0, "orphan_files": 0, "rebuilt_index": None}
        damaged, untrusted, checked_bytes = [], [], 0
        for copy in copies:
            try:
                fd = os.open(copy.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # evicted or replaced since the listing
            try:
                if copy.file_sha256 and self.signing_key is None:
                    check_whole_file(fd, copy.size, copy.file_sha256)  # footer included
                else:
                    footer = check_file(fd, copy.size)
                    if footer.sha256 != copy.sha256:
                        raise IntegrityError("not the version the index recorded")
                    self._check_identity(footer, copy.key, last=True)
            except UntrustedObjectError:
                untrusted.append(copy.key)
                self.cache.discard(copy)
            except IntegrityError:
                damaged.append(copy.key)
                self.cache.discard(copy)
            finally:
                os.close(fd)
            checked_bytes += copy.size
        return VerifyReport(
            checked=len(copies),
            checked_bytes=checked_bytes,
            damaged=damaged,
            untrusted=untrusted,
            **repaired,
        )

    def mapped(self) -> list[MappedFile]:
        """The cached files that zero-copy pulls map now (in any process), which eviction,
        replacement and deletion leave in place until their arrays are gone."""
        return [
            MappedFile(key, size, cached, version)
            for key, size, cached, version in self.cache.mapped()
        ]

    def disc(self, next_to_evict: int = 5) -> Disc:
        """Local disc use, persisted bytes and the entries eviction would remove next; from
        the index's totals (no listing of every entry, unlike :meth:`usage`)."""
        totals = self.cache.usage()
        return Disc(
            used=totals.used,
            allocated=totals.allocated,
            persisted=self.cache.persisted_size(),
            entries=totals.count,
            local_dir=self.cache.root,
            next_to_evict=self.cache.eviction_candidates(next_to_evict),
        )

    def cache_refusal(self, key: str, size: int, *, persist: bool) -> str | None:
        """Why ``key`` (``size`` bytes, not cached yet) cannot be kept in the local cache, or
        None when it can: eviction frees anything but persisted entries, so it fits when the
        persisted bytes leave room for it."""
        allocated = self.cache.allocated_space
        if allocated is None:
            return None
        persisted = self.cache.persisted_size()
        if persisted + size <= allocated:
            return None
        verb = "persisted" if persist else "cached"
        return (
            f"{key} ({format_size(size)}) cannot be {verb}: allocated_space is "
            f"{format_size(allocated)} and persisted entries, which are never evicted, hold "
            f"{format_size(persisted)}. Unpersist entries or raise allocated_space "
            "(dm_configure --allocated_space)."
        )

    def pin(self, key: str, *, progress: TransferProgress | None = None) -> CacheEntry:
        """Persist ``key`` here: a cached copy is pinned at once; a key not cached is fetched
        first (one HEAD for its size, then the download) and pinned as it arrives. Refused
        with :class:`NotCachedError`, before anything is downloaded, when it cannot fit
        beside the entries already persisted."""
        validate_key(key)
        entry = self.cache.get(key)
        if entry is not None and self.cache.set_persist(key, True):
            return dataclasses.replace(entry, persist=True)
        reason = self.cache_refusal(key, self.store.head(key).size, persist=True)
        if reason is not None:
            raise NotCachedError(reason)
        return self.fetch(key, persist=True, progress=progress)

    def panel(self) -> Panel:
        """The daman panel (an ipywidgets widget) on this manager's store and cache."""
        from .panel import Panel  # ipywidgets only when a panel is wanted

        return Panel(self)

    def clear(self) -> int:
        """Evict every entry that is not persisted; returns the bytes freed."""
        return self.cache.clear()

    def set_persist(self, key: str, persist: bool) -> None:
        """Pin (or unpin) a cached entry so that eviction leaves it alone."""
        validate_key(key)
        if not self.cache.set_persist(key, persist):
            raise KeyNotFoundError(
                key,
                "the local cache (pull it first: dm.pull(key, persist=True) or dm_pull --persist)",
            )
