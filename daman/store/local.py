"""A folder as the store: try daman with no cloud account, or share through a network drive.

Layout: the object for key ``team/data/v1`` is the file ``<root>/team/data/v1.daman``. The
suffix keeps file names and folder names apart, so ``a`` and ``a/b`` can both be keys.

New keys are created with ``os.link(tmp, final)``, which fails if the name already exists:
atomic on local filesystems and the classic safe create on NFS, so of two concurrent pushes
exactly one wins. Overwrites use ``os.replace``. Readers therefore only ever see whole files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import (
    CredentialsError,
    DamanError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    StorageNotFoundError,
    StoreUnavailableError,
)
from ..keys import validate_key, validate_prefix
from ..serialize import TRAILER, file_reader, read_footer
from .base import Level, ObjectInfo, Progress, Store, Written, _no_progress, _no_range

SUFFIX = ".daman"
_CHUNK = 8 * 1024 * 1024
_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_UNREACHABLE = {errno.ESTALE, errno.EIO, errno.ENOTCONN, errno.EHOSTDOWN, errno.EHOSTUNREACH,
                errno.ETIMEDOUT}  # fmt: skip
_F = TypeVar("_F", bound=Callable[..., Any])
_STALE_TEMP_SECONDS = 24 * 3600
"""A push's temp file untouched for this long belongs to a push that died (killed, crashed,
machine lost): every write of a live push refreshes its mtime."""


def _valid(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def _remove_if_stale(path: str) -> None:
    with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
        if os.stat(path).st_mtime < time.time() - _STALE_TEMP_SECONDS:
            os.unlink(path)


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
        """Disc and network-share failures as daman errors (not-found is handled per call)."""
        try:
            yield
        except OSError as exc:
            if exc.errno in _FULL:
                raise DamanError(f"the store folder {self.root} is full ({exc.strerror}).") from exc
            if exc.errno == errno.EFBIG:
                raise DamanError(
                    f"the object is too large for the file system of the store folder "
                    f"{self.root} ({exc.strerror})."
                ) from exc
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
            raise

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StorageNotFoundError(
                f"the store folder {self.root} does not exist (a network drive not mounted?). "
                "Create it, or run `dm_configure --service local --storage_name FOLDER` with "
                "an existing folder."
            )

    def _path(self, key: str) -> Path:
        validate_key(key)
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
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.incomplete")
        for attempt in range(3):  # a concurrent delete may prune the folder we just made
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                out = open(tmp, "x+b")  # noqa: SIM115 - closed by the with-block below
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            with out, open(path, "rb") as src:
                _copy(src, out, progress)
                out.flush()
                os.fsync(out.fileno())
                info = _info(key, out)  # the same inode becomes the key below
            for other in dest.parent.glob(f".{dest.name}.*.incomplete"):  # this key's dead pushes
                _remove_if_stale(str(other))
            if overwrite:
                os.replace(tmp, dest)
            else:
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    raise KeyExistsError(key) from None
            return info
        finally:
            tmp.unlink(missing_ok=True)

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
        with src, open(dest, "wb") as out:
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
                on_written(offset, len(chunk))
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
        while parent != self.root:  # prune folders the key left empty
            try:
                parent.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise
            parent = parent.parent

    @_mapped
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        self._require_root()
        base = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        found = []
        for folder, _dirs, files in os.walk(base):
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                if not name.endswith(SUFFIX):  # temp files end in .incomplete
                    if name.endswith(".incomplete"):  # listing sees them for free: sweep
                        _remove_if_stale(os.path.join(folder, name))
                    continue
                key = (name if rel == "." else f"{rel}/{name}")[: -len(SUFFIX)]
                if key.startswith(prefix):
                    path = os.path.join(folder, name)
                    try:
                        with open(path, "rb") as f:
                            found.append(_info(key, f))
                    except FileNotFoundError:  # deleted while we listed
                        continue
                    except PermissionError:  # listed all the same; reading it will say why
                        found.append(_stat_info(key, os.stat(path)))
        return iter(sorted(found, key=lambda info: info.key))

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
            if entry.name.endswith(".incomplete"):  # a push's temp file: sweep it if stale
                _remove_if_stale(entry.path)
            elif entry.name.endswith(SUFFIX) and entry.is_file():
                key = level + entry.name[: -len(SUFFIX)]
                if _valid(key):
                    names.append((key, entry.path))
            elif (
                entry.is_dir(follow_symlinks=False)  # as list() does: os.walk does not follow
                and not entry.name.endswith(SUFFIX)
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
