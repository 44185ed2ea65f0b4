"""Module-level functions (``dm.push``, ``dm.pull``, ...) on a default manager built from the
saved configuration. ``dm.configure`` saves a configuration and rebuilds that manager;
``dm.configure(..., save=False)`` uses one for this process only, leaving the saved one as it
is (tutorials and the demo store do this, so that trying daman changes nobody's setup)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import forksafe
from .cache import CacheEntry
from .config import (
    DEFAULTS,
    FIELDS,
    Config,
    check_field,
    config_path,
    expand,
    load_config,
    read_config_fields,
    save_config,
    unknown_fields,
)
from .errors import ConfigError, ConfigWarning, NotConfiguredError, os_errors, warn
from .manager import LEVEL_PAGE, Manager
from .results import (
    Deleted,
    Disc,
    KeyHistory,
    KeyList,
    LevelListing,
    ObjectDetails,
    Usage,
    VerifyReport,
)
from .store import ObjectInfo, open_store

if TYPE_CHECKING:
    from .migrate import MigrationReport, OnKey, SetupImport
    from .panel import Panel

_default: Manager | None = None
_process_config: Config | None = None
"""A configuration given with ``save=False``: used instead of the saved one until ``reset``."""
_lock = threading.Lock()
_UNSET: Any = object()


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at the fork. The default manager itself is
    # kept: its store and cache make what a child needs afresh (see ``forksafe``).
    global _lock
    _lock = threading.Lock()


forksafe.at_fork_in_child(_after_fork_in_child)


def get_manager() -> Manager:
    """The default manager, built on first use from the configuration in use: the one given
    with ``configure(..., save=False)``, else the saved one."""
    global _default
    with _lock:
        if _default is None:
            _default = Manager(_process_config or load_config())
        return _default


def reset() -> None:
    """Forget the default manager and any configuration given with ``save=False`` (the next
    call reads the saved configuration)."""
    _use(None)


def _use(config: Config | None) -> None:
    """Make ``config`` the process's configuration (None: the saved one), closing the
    default manager so that the next call builds one from it."""
    global _default, _process_config
    with _lock:
        if _default is not None:
            _default.close()
        _default = None
        _process_config = config


def configure(
    storage_name: str = _UNSET,
    service: str = _UNSET,
    local_dir: str | Path | None = _UNSET,
    allocated_space: int | str | None = _UNSET,
    *,
    check: bool = True,
    save: bool = True,
    **fields: Any,
) -> Config:
    """Save the configuration and use it from now on; fields not given keep their saved
    value (or their default on first use); ``"none"`` unsets ``local_dir``, ``endpoint_url``,
    ``region``, ``signing_key`` and ``allocated_space``. With ``check``, the store must be
    reachable.

    ``save=False`` uses it in this process only: ``~/.daman/config.json`` is neither read
    (fields not given keep the value an earlier ``save=False`` gave, else their default) nor
    written, and ``dm.reset()`` (or a new process) goes back to the saved configuration.

    ``service="local"`` makes the ``storage_name`` folder if it does not exist yet, and the
    cache folder ``local_dir`` is made if needed; both must be usable, and separate."""
    given = {
        name: value
        for name, value in dict(
            storage_name=storage_name,
            service=service,
            local_dir=local_dir,
            allocated_space=allocated_space,
            **fields,
        ).items()
        if value is not _UNSET
    }
    base = _saved_fields(overridden=set(given)) if save else _process_fields()
    for name, what in (
        ("storage_name", "a bucket, a container or a folder"),
        ("service", "aws, gcs, azure or local"),
    ):
        if name not in given and name not in base:
            raise ConfigError(
                f"{name} is required the first time ({what}): dm_configure --storage_name NAME "
                "--service {aws,gcs,azure,local}, or dm.configure(storage_name=..., service=...)."
            )
    config = Config.from_dict({**base, **given})
    _warn_aws_only(config, given)
    if config.local_dir:  # saved absolute: it must not depend on where daman runs
        config = config.replace(local_dir=str(config.cache_dir))
    if config.service == "local":
        store_dir = expand(config.storage_name, "storage_name")
        config = config.replace(storage_name=str(store_dir))
    config.check_folders()
    _make_folder(config.cache_dir, "local_dir", "Choose another with dm_configure --local_dir DIR")
    if check:
        if config.service == "local":
            _make_folder(store_dir, "the store folder", "Choose a folder you can write to")
        store = open_store(config)
        try:
            store.check()
        finally:
            store.close()
    if not save:
        _use(config)
        return config
    path = config_path()
    with os_errors(
        f"the configuration folder {path.parent}", "Set DAMAN_HOME to a folder you can write to"
    ):
        save_config(config, path, extra=_saved_unknown_fields())
    reset()
    return config


_AWS_ONLY = ("region", "checksums")


def _warn_aws_only(config: Config, given: dict[str, Any]) -> None:
    """One warning when settings that only S3 reads are given (other than their defaults)
    for another service: saved, but they change nothing."""
    if config.service == "aws":
        return
    names = [n for n in _AWS_ONLY if n in given and getattr(config, n) != DEFAULTS[n]]
    if names:
        warn(
            f"{' and '.join(names)} {'apply' if len(names) > 1 else 'applies'} to service aws "
            f"only: saved, but service {config.service} ignores "
            f"{'them' if len(names) > 1 else 'it'}.",
            ConfigWarning,
        )


def _saved_unknown_fields() -> dict[str, Any]:
    """The fields of the saved file this version does not know: a newer daman's, kept."""
    try:
        return unknown_fields(read_config_fields())
    except (NotConfiguredError, ConfigError):
        return {}


def _process_fields() -> dict[str, Any]:
    """What ``configure(..., save=False)`` builds on: a configuration this process was given
    without saving, else nothing (the saved one is not read: a tutorial must not inherit a
    team's bucket, cache folder or signing key)."""
    return _process_config.to_dict() if _process_config is not None else {}


def _make_folder(folder: Path, what: str, advice: str) -> None:
    """Make ``folder`` (and its parents) unless it exists; it must be a folder one can write
    into: else a one-line error naming ``what``."""
    with os_errors(f"{what} {folder}", advice):
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable", str(folder))


def _saved_fields(overridden: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    """The saved settings to build on: all of them when the file is valid, else those that
    are known and valid (a newer daman's extra field or one bad value must not lose the
    rest; a bad one not ``overridden`` now is reset to its default, with a warning)."""
    try:
        return load_config().to_dict()
    except NotConfiguredError:
        return {}
    except ConfigError:
        try:
            raw = read_config_fields()
        except ConfigError:
            return {}
    kept, dropped = {}, []
    for name, value in raw.items():
        if name not in FIELDS:
            continue
        try:
            kept[name] = check_field(name, value)
        except ConfigError:
            if name not in overridden:
                dropped.append(f"{name}={value!r}")
    if dropped:
        warn(
            f"{config_path()} held invalid values ({', '.join(dropped)}); they are reset to "
            "their defaults.",
            ConfigWarning,
        )
    return kept


def current_config() -> Config:
    """The configuration in use: given with ``configure(..., save=False)``, else the saved one."""
    return _process_config or load_config()


def push(
    obj: Any, key: str, meta: Any = None, force: bool = False, persist: bool = False
) -> ObjectInfo:
    """Store ``obj`` (and optional ``meta``) under ``key``; see :meth:`Manager.push`."""
    return get_manager().push(obj, key, meta=meta, force=force, persist=persist)


def pull(
    key: str,
    force: bool = False,
    persist: bool = False,
    memory_only: bool = False,
    *,
    allow_version_mismatch: bool = False,
    mmap: bool = False,
    version: str | None = None,
) -> tuple[Any, Any]:
    """``obj, meta = dm.pull(key)``; ``mmap=True`` maps its arrays from the cached file
    (zero-copy, read-only); ``version=ID`` (from :func:`history`) pulls an older version;
    see :meth:`Manager.pull`."""
    return get_manager().pull(
        key,
        force=force,
        persist=persist,
        memory_only=memory_only,
        allow_version_mismatch=allow_version_mismatch,
        mmap=mmap,
        version=version,
    )


def fetch(
    key: str, force: bool = False, persist: bool = False, *, version: str | None = None
) -> CacheEntry:
    """Bring ``key`` into the local cache without unpickling it; see :meth:`Manager.fetch`."""
    return get_manager().fetch(key, force=force, persist=persist, version=version)


def delete(
    key: str, local: bool = True, remote: bool = False, *, all_versions: bool = False
) -> Deleted:
    """Remove the cached copies and/or the stored object (its versions stay, unless
    ``all_versions``); see :meth:`Manager.delete`."""
    return get_manager().delete(key, local=local, remote=remote, all_versions=all_versions)


def history(key: str) -> KeyHistory:
    """``key``'s versions, newest first; see :meth:`Manager.history`."""
    return get_manager().history(key)


def restore(key: str, *, version: str) -> ObjectInfo:
    """Make ``version`` of ``key`` current again (a new version); see :meth:`Manager.restore`."""
    return get_manager().restore(key, version=version)


def ls(prefix: str = "", *, legacy: bool = False) -> KeyList:
    """The keys under ``prefix``; ``legacy=True`` marks daman 0.2 objects (one small read per
    key); see :meth:`Manager.ls`."""
    return get_manager().ls(prefix, legacy=legacy)


def ls_level(
    prefix: str = "", *, token: str | None = None, limit: int = LEVEL_PAGE, fresh: bool = False
) -> LevelListing:
    """One level of the store (sub-prefixes and keys), one request per page; see
    :meth:`Manager.ls_level`."""
    return get_manager().ls_level(prefix, token=token, limit=limit, fresh=fresh)


def info(key: str, *, version: str | None = None) -> ObjectDetails:
    return get_manager().info(key, version=version)


def exists(key: str) -> bool:
    return get_manager().exists(key)


def usage() -> Usage:
    return get_manager().usage()


def set_persist(key: str, persist: bool) -> None:
    get_manager().set_persist(key, persist)


def pin(key: str) -> CacheEntry:
    """Persist ``key`` here, fetching it first if it is not cached; see :meth:`Manager.pin`."""
    return get_manager().pin(key)


def disc() -> Disc:
    """Local disc use, persisted bytes and what eviction would remove next."""
    return get_manager().disc()


def panel() -> Panel:
    """The daman panel (an ipywidgets widget) on the default manager: browse the store, see
    this machine's disc, pin, pull and delete. Display it as a cell's last value."""
    return get_manager().panel()


def verify(key: str | None = None) -> VerifyReport:
    """Check the cached copies (or ``key``'s) against their sha256; remove damaged ones."""
    return get_manager().verify(key)


def clear() -> int:
    """Evict every cached entry that is not persisted; returns the bytes freed."""
    return get_manager().clear()


def push_file(
    path: str | Path, key: str, meta: Any = None, force: bool = False, persist: bool = False
) -> ObjectInfo:
    """Push a file's bytes under ``key``; ``dm.pull(key)`` returns them as ``bytes``."""
    return get_manager().push_file(path, key, meta=meta, force=force, persist=persist)


def pull_file(
    key: str,
    dest: str | Path,
    force: bool = False,
    persist: bool = False,
    *,
    version: str | None = None,
) -> int:
    """Write the bytes stored under ``key`` to the file ``dest``; returns the bytes written."""
    return get_manager().pull_file(key, dest, force=force, persist=persist, version=version)


def migrate(
    prefix: str = "", *, dry_run: bool = False, on_key: OnKey | None = None
) -> MigrationReport:
    """Rewrite the store's daman 0.2 objects (under ``prefix``) in today's format, never
    overwriting a concurrent change; see :func:`daman.migrate.migrate_store`."""
    from .migrate import migrate_store

    return migrate_store(get_manager(), prefix, dry_run=dry_run, on_key=on_key)


def migrate_local(*, dry_run: bool = False) -> SetupImport:
    """Import this machine's daman 0.2 setup (``~/.daman/config``) and its persisted keys;
    see :func:`daman.migrate.import_setup`."""
    from .migrate import import_setup

    return import_setup(dry_run=dry_run)  # a configuration it writes resets the default manager


__all__ = [
    "clear",
    "config_path",
    "configure",
    "current_config",
    "delete",
    "disc",
    "exists",
    "fetch",
    "get_manager",
    "info",
    "ls",
    "ls_level",
    "migrate",
    "migrate_local",
    "panel",
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
