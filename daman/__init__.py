"""daman: share Python objects through one bucket, with a size-capped local cache.

>>> import daman as dm
>>> dm.push(obj, "team/data/v1", meta={"source": "..."})
>>> obj, meta = dm.pull("team/data/v1")
"""

from __future__ import annotations

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
    info,
    ls,
    ls_level,
    panel,
    pin,
    pull,
    pull_file,
    push,
    push_file,
    reset,
    set_persist,
    usage,
    verify,
)
from .config import Config, format_size, parse_size
from .errors import (
    ConfigError,
    CredentialsError,
    DamanError,
    DamanWarning,
    DeserializationError,
    IntegrityError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    NotCachedError,
    NotCachedWarning,
    NotConfiguredError,
    OfflineWarning,
    SerializationError,
    StorageNotFoundError,
    StoreUnavailableError,
    UntrustedObjectError,
    VersionMismatchWarning,
)
from .manager import (
    Disc,
    KeyListing,
    LevelListing,
    Manager,
    ObjectDetails,
    Pulled,
    Usage,
    VerifyReport,
)
from .store import ObjectInfo

__version__ = "0.1.0"


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext daman``: the ``%dm_`` magics (imported only now, not by ``import daman``)."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext daman``."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "Config",
    "ConfigError",
    "CredentialsError",
    "DamanError",
    "DamanWarning",
    "DeserializationError",
    "Disc",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "KeyExistsError",
    "KeyListing",
    "KeyNotFoundError",
    "LevelListing",
    "Manager",
    "NotCachedError",
    "NotCachedWarning",
    "NotConfiguredError",
    "ObjectDetails",
    "ObjectInfo",
    "OfflineWarning",
    "Pulled",
    "SerializationError",
    "StorageNotFoundError",
    "StoreUnavailableError",
    "UntrustedObjectError",
    "Usage",
    "VerifyReport",
    "VersionMismatchWarning",
    "clear",
    "config_path",
    "configure",
    "current_config",
    "delete",
    "disc",
    "exists",
    "fetch",
    "format_size",
    "get_manager",
    "info",
    "ls",
    "ls_level",
    "panel",
    "parse_size",
    "pin",
    "pull",
    "pull_file",
    "push",
    "push_file",
    "reset",
    "set_persist",
    "usage",
    "verify",
]
