"""daman: share Python objects through one bucket, with a size-capped local cache.

>>> import daman as dm
>>> dm.push(obj, "team/data/v1", meta={"source": "..."})
>>> obj, meta = dm.pull("team/data/v1")
"""

from __future__ import annotations

from importlib import metadata as _metadata

from . import demo
from .api import (
    clear,
    config_path,
    configure,
    current_config,
    delete,
    disc,
    exists,
    fetch,
    get_manager,
    history,
    info,
    ls,
    ls_level,
    migrate,
    migrate_local,
    panel,
    pin,
    pull,
    pull_file,
    push,
    push_file,
    reset,
    restore,
    set_persist,
    usage,
    verify,
)
from .config import Config, format_size, parse_size
from .errors import (
    ConcurrentChangeError,
    ConfigError,
    ConfigWarning,
    CredentialsError,
    DamanError,
    DamanWarning,
    DeserializationError,
    IntegrityError,
    InvalidArgumentError,
    InvalidKeyError,
    KeptChangingError,
    KeyExistsError,
    KeyNotFoundError,
    LocalFileError,
    MissingPackageError,
    NotCachedError,
    NotCachedWarning,
    NotConfiguredError,
    NotMappedWarning,
    OfflineWarning,
    RepairWarning,
    SerializationError,
    StorageNotFoundError,
    StoreUnavailableError,
    UntrustedObjectError,
    VersionMismatchWarning,
    VersionNotFoundError,
)
from .manager import Manager
from .results import (
    Deleted,
    Disc,
    KeyHistory,
    KeyList,
    KeyListing,
    LevelListing,
    ObjectDetails,
    Pulled,
    Usage,
    VerifyReport,
    VersionInfo,
)
from .store import ObjectInfo

try:  # one source of truth: the version pyproject.toml gave the installed package
    __version__ = _metadata.version("daman")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext daman``: the ``%dm_`` magics (imported only now, not by ``import daman``)."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext daman``."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "ConcurrentChangeError",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "CredentialsError",
    "DamanError",
    "DamanWarning",
    "Deleted",
    "DeserializationError",
    "Disc",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "KeptChangingError",
    "KeyExistsError",
    "KeyHistory",
    "KeyList",
    "KeyListing",
    "KeyNotFoundError",
    "LevelListing",
    "LocalFileError",
    "Manager",
    "MissingPackageError",
    "NotCachedError",
    "NotCachedWarning",
    "NotConfiguredError",
    "NotMappedWarning",
    "ObjectDetails",
    "ObjectInfo",
    "OfflineWarning",
    "Pulled",
    "RepairWarning",
    "SerializationError",
    "StorageNotFoundError",
    "StoreUnavailableError",
    "UntrustedObjectError",
    "Usage",
    "VerifyReport",
    "VersionInfo",
    "VersionMismatchWarning",
    "VersionNotFoundError",
    "clear",
    "config_path",
    "configure",
    "current_config",
    "delete",
    "demo",
    "disc",
    "exists",
    "fetch",
    "format_size",
    "get_manager",
    "history",
    "info",
    "ls",
    "ls_level",
    "migrate",
    "migrate_local",
    "panel",
    "parse_size",
    "pin",
    "pull",
    "pull_file",
    "push",
    "push_file",
    "reset",
    "restore",
    "set_persist",
    "usage",
    "verify",
]
