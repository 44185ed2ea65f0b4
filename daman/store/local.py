"""A folder as the store: try daman with no cloud account, or share through a network drive.

Layout: the object for key ``team/data/v1`` is the file ``<root>/team/data/v1.daman``. The
suffix keeps file names and folder names apart, so ``a`` and ``a/b`` can both be keys.

New keys are created with ``os.link(tmp, final)``, which fails if the name already exists:
atomic on local filesystems and the classic safe create on NFS, so of two concurrent pushes
exactly one wins. Overwrites use ``os.replace``. Readers therefore only ever see whole files.

``put_if_match`` (dm_migrate's conditional replace) first renames the current file aside
(``.<name>.<random>.aside``), which atomically takes exactly the version it will check, then
links the new file in only if the aside one was the expected version (else puts it back).
For the microseconds between the two, readers find no key; a process killed there leaves the
old version aside, and ``recover_interrupted`` (run by dm_migrate first) puts it back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import operator
import os
import uuid
from collections.abc import Callable, Collection, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

from .. import forksafe
from ..errors import (
    ConcurrentChangeError,
    CredentialsError,
    DamanError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    StorageNotFoundError,
    StoreUnavailableError,
    map_os_error,
)
from ..files import TEMP_NAME, atomic_write, open_empty, temp_path, unlink_quietly
from ..keys import HISTORY, is_valid_key, listed, validate_listing, validate_name, validate_prefix
from ..serialize import TRAILER, file_reader, read_footer
from .base import Level, ObjectInfo, Progress, Store, Written, _no_progress, _no_range

SUFFIX = ".daman"
ASIDE = ".aside"
_CHUNK = 8 * 1024 * 1024
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_UNREACHABLE = {errno.ESTALE, errno.EIO, errno.ENOTCONN, errno.EHOSTDOWN, errno.EHOSTUNREACH,
                errno.ETIMEDOUT}  # fmt: skip
_F = TypeVar("_F", bound=Callable[..., Any])
_STALE_TEMP_SECONDS = 24 * 3600
"""A push's temp file that no writer holds a lock on, and untouched this long by the file
server's clock, belongs to a push that died (killed, crashed, machine lost)."""


def _remove_if_abandoned(path: Path, now: float) -> None:
    """Delete a push's temp file whose writer is gone. A live push holds an ``flock`` on its
    file, and ``now`` is the file server's time (the mtime of a file just written there), so
    that a machine whose clock is ahead never takes a live push for an old one."""
    if not TEMP_NAME.fullmatch(path.name):
        return  # not a name daman gives: not ours to delete
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # gone meanwhile, or not ours to read
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a writer is at work
        except OSError:
            pass  # a file system without locks: the age alone decides
        if os.fstat(fd).st_mtime < now - _STALE_TEMP_SECONDS:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _valid(key: str) -> bool:
    """Whether ``key``, made from names found in the folder, is one this store can hold:
    foreign files (a name that is not UTF-8, a part ending in .daman that is not the last)
    are not listed, as keys that could not be pulled."""
    return is_valid_key(key) and not any(part.endswith(SUFFIX) for part in key.split("/")[:-1])


def _stat_info(key: str, st: os.stat_result, etag: str | None = None) -> ObjectInfo:
    modified = datetime.fromtimestamp(st.st_mtime, tz=timezone.utc)
    etag = etag or f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"
    return ObjectInfo(key=key, size=st.st_size, etag=etag, last_modified=modified)


def _info(key: str, f: IO[bytes]) -> ObjectInfo:
    """Size and version of an open object file.

    The version is the payload's sha256 from the footer (two small reads: the trailer, then
    the footer), so it changes exactly when the content does, even on shares whose mtimes are
    coarse and whose inodes are reused. Files daman cannot read the footer of (not daman's,
    damaged, or from a newer daman) fall back to inode, mtime and size."""
    st = os.fstat(f.fileno())
    read_at = file_reader(f)
    etag = None
    if st.st_size >= TRAILER.size:
        with contextlib.suppress(DamanError):
            trailer = read_at(st.st_size - TRAILER.size, TRAILER.size)
            etag = f"{read_footer(read_at, st.st_size, trailer).sha256}-{st.st_size:x}"
    return _stat_info(key, st, etag)


def _first_file(root: Path, folder: Path) -> str:
    """The first part of ``folder`` (under ``root``) that is not a folder, for messages."""
    for parent in [*reversed(folder.relative_to(root).parents), folder.relative_to(root)]:
        if (root / parent).exists() and not (root / parent).is_dir():
            return str(root / parent)
    return str(folder)


def _put_back(aside: Path, dest: Path) -> bool:
    """Return a version set aside by ``put_if_match`` to its name, unless the name holds a
    newer one (then the aside version is dropped, as an overwrite would have); True if put back."""
    try:
        os.link(aside, dest)
        restored = True
    except FileExistsError:
        restored = False
    except FileNotFoundError:  # another process put it back first
        return False
    aside.unlink(missing_ok=True)
    return restored


def _holds_objects(folder: str) -> bool:
    """Whether a daman object lies anywhere under ``folder``; stops at the first one, which
    is usually in the folder's own first read."""
    for _folder, _dirs, files in os.walk(folder):
        if any(name.endswith(SUFFIX) for name in files):
            return True
    return False


def _copy(src: IO[bytes], dst: IO[bytes], progress: Progress) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        progress(len(chunk))


def _mapped(method: _F) -> _F:
    @functools.wraps(method)
    def wrapper(self: LocalStore, *args: Any, **kwargs: Any) -> Any:
        with self._os_errors():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def describe(self) -> str:
        return f"local folder {self.root}"

    @contextlib.contextmanager
    def _os_errors(self) -> Iterator[None]:
        """Disc and network-share failures as daman errors (not-found is handled per call):
        a refusal is the store's (as S3's 403), a dead share is unreachable, the rest is
        what any local folder can say (see ``map_os_error``)."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc, DamanError):
                raise
            if exc.errno in _DENIED:
                raise CredentialsError(
                    f"no permission to use the store folder {self.root} ({exc.strerror}: "
                    f"{exc.filename}). Ask its owner for access."
                ) from exc
            if exc.errno in _UNREACHABLE:
                raise StoreUnavailableError(
                    f"cannot reach the store folder {self.root} ({exc.strerror}). Is the "
                    "network drive mounted?"
                ) from exc
            raise map_os_error(exc, f"the store folder {self.root}", "Ask its owner") from exc

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StorageNotFoundError(
                f"the store folder {self.root} does not exist (a network drive not mounted?). "
                "Create it, or run `dm_configure --service local --storage_name FOLDER` with "
                "an existing folder."
            )

    def _path(self, key: str) -> Path:
        validate_name(key)
        parts = key.split("/")
        if any(part.endswith(SUFFIX) for part in parts[:-1]):
            raise InvalidKeyError(key, f"in a local store only the last part may end in {SUFFIX!r}")
        return self.root.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    def _open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            self._require_root()
            raise KeyNotFoundError(key, self.describe()) from None

    @_mapped
    def check(self) -> None:
        self._require_root()
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise CredentialsError(f"the store folder {self.root} is not writable by you.")

    @_mapped
    def head(self, key: str) -> ObjectInfo:
        with self._open(key) as f:
            return _info(key, f)

    @_mapped
    def put(
        self, key: str, path: Path, *, overwrite: bool, progress: Progress = _no_progress
    ) -> ObjectInfo:
        dest = self._path(key)
        self._require_root()
        with open(path, "rb") as src:
            for attempt in range(3):  # a concurrent delete may prune the folder we just made
                self._make_folder(key, dest.parent)
                src.seek(0)
                try:
                    return self._write(key, dest, src, overwrite=overwrite, progress=progress)
                except FileNotFoundError:
                    if dest.parent.is_dir():
                        raise StoreUnavailableError(
                            f"this push's temporary file in {dest.parent} was removed before "
                            "it was complete (by a cleanup on another machine?). Push again."
                        ) from None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _make_folder(self, key: str, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidKeyError(
                key,
                f"the store folder holds a file that is not a daman object where this key "
                f"needs a folder ({_first_file(self.root, folder)}); move that file away or "
                "choose another key",
            ) from None

    def _write(
        self, key: str, dest: Path, src: IO[bytes], *, overwrite: bool, progress: Progress
    ) -> ObjectInfo:
        try:
            with atomic_write(dest, create_only=not overwrite) as out:
                fd = out.file.fileno()
                with forksafe.sqlite_section():  # no fork between locking and tracking
                    with contextlib.suppress(OSError):  # a file system without locks
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    forksafe.track_fd(fd)
                try:
                    _copy(src, out.file, progress)
                    out.file.flush()
                    info = _info(key, out.file)  # the same inode becomes the key
                    now = os.fstat(fd).st_mtime  # the file server's clock
                finally:
                    with contextlib.suppress(OSError):  # first: a child forked from here on
                        fcntl.flock(fd, fcntl.LOCK_UN)  # holds nothing
                    forksafe.untrack_fd(fd)
                for other in dest.parent.iterdir():  # pushes that died in this folder
                    if other != out.path:
                        _remove_if_abandoned(other, now)
        except FileExistsError:
            raise KeyExistsError(key) from None
        except IsADirectoryError:
            raise InvalidKeyError(
                key, f"the store folder holds a folder named {dest.name!r} in the way"
            ) from None
        return info

    def copies(self, size: int, *, overwrite: bool) -> bool:
        return True

    @_mapped
    def put_copy(
        self,
        key: str,
        path: Path,
        *,
        source: str,
        overwrite: bool,
        progress: Progress = _no_progress,
    ) -> ObjectInfo:
        """A second name for ``source``'s file (a hard link; no byte is copied): stored files
        are never changed in place, only replaced or unlinked, so two names may share one.
        Created with ``os.link`` (``KeyExistsError`` if the key exists) or, to overwrite,
        linked under a temp name and renamed over the key."""
        dest = self._path(key)
        src = self._path(source)
        self._require_root()
        for attempt in range(3):  # a concurrent delete may prune the folder we just made
            self._make_folder(key, dest.parent)
            tmp = temp_path(dest)
            try:
                os.link(src, tmp)
                try:
                    with open(tmp, "rb") as f:
                        info = _info(key, f)
                    if overwrite:
                        os.replace(tmp, dest)
                    else:
                        os.link(tmp, dest)
                finally:
                    unlink_quietly(tmp)
            except FileExistsError:
                raise KeyExistsError(key) from None
            except IsADirectoryError:
                raise InvalidKeyError(
                    key, f"the store folder holds a folder named {dest.name!r} in the way"
                ) from None
            except FileNotFoundError:
                if not src.exists():
                    raise KeyNotFoundError(source, self.describe()) from None
                if attempt == 2:
                    raise
                continue
            progress(info.size)
            return info
        raise AssertionError("unreachable")

    @_mapped
    def put_if_match(
        self, key: str, path: Path, etag: str, *, progress: Progress = _no_progress
    ) -> ObjectInfo:
        dest = self._path(key)
        self._require_root()
        aside = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}{ASIDE}")
        try:
            with open(path, "rb") as src, atomic_write(dest, create_only=True) as out:
                _copy(src, out.file, progress)
                out.file.flush()
                info = _info(key, out.file)
                os.rename(dest, aside)  # from here on nobody can change the version we check
                with open(aside, "rb") as f:
                    if _info(key, f).etag != etag:  # a rename keeps inode and mtime
                        raise ConcurrentChangeError(
                            f"{key!r} changed in {self.describe()} while it was being "
                            "rewritten; it was left as it is."
                        )
            # linked in: it fails if a push created the key meanwhile, and that push wins
        except FileExistsError:
            _put_back(aside, dest)
            raise ConcurrentChangeError(
                f"{key!r} was pushed again in {self.describe()} while it was being rewritten; "
                "the new version was kept."
            ) from None
        except (FileNotFoundError, NotADirectoryError):  # the key or its folder is gone
            _put_back(aside, dest)
            raise KeyNotFoundError(key, self.describe()) from None
        except BaseException:
            _put_back(aside, dest)
            raise
        aside.unlink()
        return info

    @_mapped
    def recover_interrupted(self, prefix: str = "") -> int:
        validate_prefix(prefix)
        self._require_root()
        base = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        repaired = 0
        for folder, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(ASIDE):
                    # ".<key name>.daman.<token>.aside" -> "<key name>.daman"
                    original = name[1:].rsplit(".", 2)[0]
                    if original.endswith(SUFFIX):
                        repaired += _put_back(Path(folder, name), Path(folder, original))
        return repaired

    def get(
        self,
        key: str,
        dest: Path,
        *,
        progress: Progress = _no_progress,
        on_size: Progress = _no_progress,
        on_written: Written = _no_range,
    ) -> ObjectInfo:
        # Errors reading the store folder are the store's; errors writing ``dest`` (a full
        # local disc) are the caller's and pass through as they are.
        # The open file keeps its version even if the key is replaced while we copy.
        with self._os_errors():
            src = self._open(key)
        with src, open_empty(dest) as out:
            with self._os_errors():
                info = _info(key, src)
            on_size(info.size)
            offset = 0
            while True:
                with self._os_errors():
                    chunk = src.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                on_written(offset, len(chunk))  # hashed beside the copy, from the file
                offset += len(chunk)
                progress(len(chunk))
        return info

    @_mapped
    def read_tail(self, key: str, length: int) -> tuple[bytes, ObjectInfo]:
        with self._open(key) as f:
            info = _info(key, f)
            start = max(0, info.size - max(length, 0))
            return os.pread(f.fileno(), info.size - start, start), info

    @_mapped
    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with self._open(key) as f:
            return os.pread(f.fileno(), max(length, 0), offset)

    @_mapped
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            self._require_root()
            raise KeyNotFoundError(key, self.describe()) from None
        parent = path.parent
        while parent != self.root:  # prune folders the key left empty: best effort, the
            try:  # delete itself has succeeded
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    @_mapped
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = []
        for key, entry in self._files(prefix):
            try:
                with open(entry.path, "rb") as f:
                    found.append(_info(key, f))
            except FileNotFoundError:  # deleted while we listed
                continue
            except PermissionError:  # listed all the same; reading it will say why
                found.append(_stat_info(key, os.stat(entry.path)))
        return iter(sorted(found, key=lambda info: info.key))

    @_mapped
    def list_fast(
        self, prefix: str = "", *, versions: Collection[str] = ()
    ) -> Iterator[ObjectInfo]:
        """Sizes and times from one ``stat`` per file; the version (``etag``) only of the keys
        in ``versions``, empty for the others: a version is the sha256 in the file's footer,
        a read per file, and modification times cannot stand in for it on shares whose
        clocks are coarse."""
        found = []
        when, utc = datetime.fromtimestamp, timezone.utc  # looked up once: 100,000 keys
        for key, entry in self._files(prefix):
            try:
                if key in versions:
                    with open(entry.path, "rb") as f:
                        found.append(_info(key, f))
                    continue
                st = entry.stat()  # follows a symbolic link, as open() would
            except FileNotFoundError:  # deleted while we listed
                continue
            except PermissionError:  # listed all the same; reading it will say why
                st = entry.stat()
            found.append(ObjectInfo.listed(key, st.st_size, "", when(st.st_mtime, utc)))
        return iter(sorted(found, key=operator.attrgetter("key")))

    def _files(self, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """``(key, entry)`` of the object files whose keys start with ``prefix``: a walk of
        the folders as ``os.walk`` does (symbolic links to folders are not followed)."""
        validate_listing(prefix)
        self._require_root()
        folders = ["/".join(prefix.split("/")[:-1])]  # relative to the root, "" for the root
        records = prefix.startswith(f"{HISTORY}/")
        while folders:
            rel = folders.pop()
            if any(part.endswith(SUFFIX) for part in rel.split("/")):
                continue  # no key of this store lies below: only the last part may end so
            head = f"{rel}/" if rel else ""
            within = head.startswith(prefix)  # every key here starts with the prefix
            try:
                entries = list(os.scandir(self.root / rel if rel else self.root))
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile, or the prefix names no folder
            for entry in entries:
                name = entry.name
                if entry.is_dir():  # a link to a folder is not walked into, nor listed
                    if not entry.is_symlink() and (head or name != HISTORY or records):
                        folders.append(head + name)  # (the versions: only when asked)
                elif name.endswith(SUFFIX):  # temp files end in .incomplete
                    key = head + name[: -len(SUFFIX)]
                    if (within or key.startswith(prefix)) and listed(key, prefix):
                        yield key, entry

    @_mapped
    def list_level(self, prefix: str = "", *, token: str | None = None, limit: int = 1000) -> Level:
        """One ``os.scandir`` of the level's folder. Sub-folders become sub-prefixes only when
        a daman object lies under them (a folder emptied by a concurrent delete, or another
        program's, is not a prefix); files that are not objects are skipped. ``token`` is the
        last name of the previous page."""
        validate_prefix(prefix)
        self._require_root()
        level, _, start = prefix.rpartition("/")
        level = f"{level}/" if level else ""
        folder = self.root.joinpath(*level.split("/")[:-1]) if level else self.root
        names: list[tuple[str, str | None]] = []  # (name in listing order, file path or None)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        for entry in entries:
            if not entry.name.startswith(start):
                continue
            if entry.name.endswith(SUFFIX) and entry.is_file():
                key = level + entry.name[: -len(SUFFIX)]
                if _valid(key):
                    names.append((key, entry.path))
            elif (
                entry.is_dir(follow_symlinks=False)  # as list() does: os.walk does not follow
                and not entry.name.endswith(SUFFIX)
                and (level or entry.name != HISTORY)  # daman's versions: not a prefix
                and _valid(level + entry.name)
                and _holds_objects(entry.path)
            ):
                names.append((f"{level}{entry.name}/", None))
        names.sort()
        if token is not None:
            names = [item for item in names if item[0] > token]
        page, more = names[: max(1, limit)], len(names) > max(1, limit)
        objects = []
        for key, path in page:
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    objects.append(_info(key, f))
            except FileNotFoundError:  # deleted while we listed
                continue
            except PermissionError:  # listed all the same; reading it will say why
                objects.append(_stat_info(key, os.stat(path)))
        prefixes = [name for name, path in page if path is None]
        return Level(prefix, prefixes, objects, page[-1][0] if more else None)
