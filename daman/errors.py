"""Every exception and warning daman raises, in one place.

Each error also inherits the builtin it resembles (``KeyNotFoundError`` is a ``KeyError``) so
that generic handlers keep working, and each message says what to do next.
"""

from __future__ import annotations


class DamanError(Exception):
    """Base of every error daman raises on purpose."""

    def __str__(self) -> str:
        # KeyError quotes its argument in str(); daman messages are sentences, not keys.
        return Exception.__str__(self)


class NotConfiguredError(DamanError, RuntimeError):
    """daman has no saved configuration yet."""


class ConfigError(DamanError, ValueError):
    """A configuration value is malformed (a size, a service name, ...)."""


class InvalidArgumentError(DamanError, ValueError):
    """Arguments that contradict each other or make no sense together."""


class InvalidKeyError(DamanError, ValueError):
    """A key is empty, too long, or could address something outside its namespace."""

    def __init__(self, key: object, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(
            f"invalid key {key!r}: {reason}. Use '/'-separated names such as 'team/dataset/v1'."
        )


class KeyNotFoundError(DamanError, KeyError):
    """The key exists neither where it was looked for."""

    def __init__(self, key: str, where: str = "the store") -> None:
        self.key = key
        self.where = where
        super().__init__(f"key {key!r} not found in {where}. List keys with dm.ls() or dm_ls.")


class KeyExistsError(DamanError, FileExistsError):
    """A push without ``force`` met a key that is already stored."""

    def __init__(self, key: str) -> None:
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


class DamanWarning(UserWarning):
    """Base of daman's warnings."""


class OfflineWarning(DamanWarning):
    """The store was unreachable and a cached copy was used."""


class NotCachedWarning(DamanWarning):
    """An object could not be kept in the local cache (it does not fit the allocation)."""


class VersionMismatchWarning(DamanWarning):
    """An object was written by a Python or cloudpickle version that may not load it here."""
