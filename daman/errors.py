"""Every exception and warning daman raises, in one place.

Each error also inherits the builtin it resembles (``KeyNotFoundError`` is a ``KeyError``) so
that generic handlers keep working, and each message says what to do next.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings
from collections.abc import Iterator

_PASS_THROUGH = (os.path.dirname(os.path.abspath(__file__)) + os.sep, contextlib.__file__)


class DamanError(Exception):
    """Base of every error daman raises on purpose."""

    _init_args: tuple[object, ...] | None = None
    """What a subclass's own ``__init__`` was called with, so that the error pickles (a pool
    worker's error reaches the parent whole), not only its message."""

    def __str__(self) -> str:
        # KeyError quotes its argument in str(); daman messages are sentences, not keys.
        return Exception.__str__(self)

    def __reduce__(self) -> tuple[object, ...]:
        args = self.args if self._init_args is None else self._init_args
        return (type(self), args, self.__dict__ or None)


class NotConfiguredError(DamanError, RuntimeError):
    """daman has no saved configuration yet."""


class ConfigError(DamanError, ValueError):
    """A configuration value is malformed (a size, a service name, ...)."""


class InvalidArgumentError(DamanError, ValueError):
    """Arguments that contradict each other or make no sense together."""


class InvalidKeyError(DamanError, ValueError):
    """A key is empty, too long, or could address something outside its namespace."""

    def __init__(self, key: object, reason: str) -> None:
        self._init_args = (key, reason)
        self.key = key
        self.reason = reason
        super().__init__(
            f"invalid key {key!r}: {reason}. Use '/'-separated names such as 'team/dataset/v1'."
        )


class KeyNotFoundError(DamanError, KeyError):
    """The key exists neither where it was looked for."""

    def __init__(self, key: str, where: str = "the store") -> None:
        self._init_args = (key, where)
        self.key = key
        self.where = where
        super().__init__(f"key {key!r} not found in {where}. List keys with dm.ls() or dm_ls.")


class VersionNotFoundError(KeyNotFoundError):
    """The key is known, but not the version asked for (never pushed, or removed)."""

    def __init__(self, key: str, version: str, where: str = "the store") -> None:
        self._init_args = (key, version, where)
        self.key = key
        self.version = version
        self.where = where
        DamanError.__init__(
            self,
            f"version {version!r} of {key!r} not found in {where}. List its versions with "
            f"dm.history({key!r}) or dm_history --key {key}.",
        )


class KeyExistsError(DamanError, FileExistsError):
    """A push without ``force`` met a key that is already stored."""

    def __init__(self, key: str) -> None:
        self._init_args = (key,)
        self.key = key
        super().__init__(
            f"key {key!r} already exists in the store. Overwrite it with force=True "
            "(--force on the command line) or choose another key."
        )


class StorageNotFoundError(DamanError, FileNotFoundError):
    """The configured bucket (or folder) does not exist."""


class CredentialsError(DamanError, PermissionError):
    """No credentials, or credentials the store refuses."""


class StoreUnavailableError(DamanError, ConnectionError):
    """The store could not be reached (network, timeout, server errors after retries)."""


class KeptChangingError(StoreUnavailableError):
    """An object was replaced again and again while it was read (other processes pushing
    it): no one version of it could be read whole."""


class SerializationError(DamanError, TypeError):
    """An object or its meta could not be pickled."""


class DeserializationError(DamanError):
    """A stored object could not be unpickled (often a version or missing-module problem)."""


class IntegrityError(DamanError):
    """A stored or cached file is not what was written: truncated, corrupted or not daman's."""


class UntrustedObjectError(IntegrityError):
    """Signing is on and an object carries no valid signature: it is refused unopened."""


class ConcurrentChangeError(DamanError):
    """A conditional replace (``dm_migrate``) found that the stored object had changed since it
    was read: nothing was overwritten."""


class NotCachedError(DamanError):
    """An explicit request to cache a key that cannot fit in the allocation."""


class LocalFileError(DamanError, OSError):
    """A local file or folder daman needs cannot be used: no space, no permission, a
    read-only file system, a file where a folder should be, a name too long."""


class MissingPackageError(DamanError, ImportError):
    """What was asked needs an optional package that is not installed; the message names the
    ``pip install`` that brings it."""


class DamanWarning(UserWarning):
    """Base of daman's warnings."""


class OfflineWarning(DamanWarning):
    """A cached copy was used without the store's word that it is current: the store was
    unreachable, or no longer holds the key (deleted for everyone)."""


class NotCachedWarning(DamanWarning):
    """An object could not be kept in the local cache (it does not fit the allocation)."""


class NotMappedWarning(DamanWarning):
    """A pull asked for a mapped (zero-copy) load got an ordinary one: the object has no
    local copy to map (``memory_only``, or it does not fit in the allocation)."""


class ConfigWarning(DamanWarning):
    """Something in the saved configuration was ignored or reset."""


class RepairWarning(DamanWarning):
    """daman found local state damaged (the cache's index) and repaired it, losing what it
    says it lost."""


class VersionMismatchWarning(DamanWarning):
    """An object was written by a Python or cloudpickle version that may not load it here."""


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the user's line: the first frame outside daman (and
    outside the standard library's context managers daman's calls pass through)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_PASS_THROUGH):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def first_sentence(exc: BaseException) -> str:
    """An error's first sentence, without the advice after it (for a warning that says what
    happens instead): the text up to the first '. ' outside parentheses."""
    text, depth = str(exc), 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "." and depth <= 0 and text[i + 1 : i + 2] in (" ", ""):
            return text[:i]
    return text


def a(word: str) -> str:
    """``word`` after its indefinite article: ``a list``, ``an int``, ``an ndarray`` (numpy's
    "nd" is said as letters: en-dee)."""
    vowel = word[:1].lower() in ("a", "e", "i", "o", "u") or word.lower().startswith("nd")
    return f"{'an' if vowel else 'a'} {word}"


_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM}
_MESSAGES = {
    errno.EFBIG: "the file is too large for that file system (a limit such as FAT32's 4 GiB, "
    "or a file-size ulimit)",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a file stands where a folder should be",
    errno.EISDIR: "a folder stands where a file should be",
    errno.ENAMETOOLONG: "a file name is too long for that file system",
    errno.ELOOP: "a symbolic link points at itself",
    errno.EMFILE: "this process has too many files open",
    errno.ENFILE: "the system has too many files open",
}


def map_os_error(exc: OSError, where: object, advice: str = "") -> DamanError:
    """One daman error for an OS error met while using ``where`` (a local file or folder):
    what went wrong there, and ``advice`` on what to do next (a default when empty)."""
    reason = exc.strerror or str(exc)
    named = str(exc.filename or "")
    if named and named != str(where) and not named.endswith(".incomplete"):  # not a temp file
        reason += f": {named}"
    if exc.errno in _FULL:
        head = f"no space left on the device holding {where} ({reason})"
        advice = advice or "Free some space"
    elif exc.errno in _DENIED:
        head = f"no permission to use {where} ({reason})"
        advice = advice or "Choose a place you can write to, or ask its owner for access"
    elif exc.errno in (errno.EMFILE, errno.ENFILE):  # not the place's fault
        head = f"cannot use {where}: {_MESSAGES[exc.errno]} ({reason})"
        advice = "Raise the open-file limit (ulimit -n), or close files, and try again"
    elif exc.errno in _MESSAGES:
        head = f"cannot use {where}: {_MESSAGES[exc.errno]} ({reason})"
        advice = advice or "Choose another place"
    else:
        head = f"cannot use {where} ({reason})"
        advice = advice or "Check that it exists and that you may use it"
    return LocalFileError(f"{head}. {advice.rstrip('.')}.")


@contextlib.contextmanager
def os_errors(where: object, advice: str = "") -> Iterator[None]:
    """OS errors inside the block become one-line daman errors (see :func:`map_os_error`)."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, DamanError):
            raise
        raise map_os_error(exc, where, advice) from exc


def disc_errors(where: object) -> contextlib.AbstractContextManager[None]:
    """:func:`os_errors` for writing into the local cache's folder ``where``."""
    return os_errors(
        where, "Free some space, or lower allocated_space / move local_dir with dm_configure"
    )
