"""Module-level functions (``dm.push``, ``dm.pull``, ...) on a default manager built from the
saved configuration. ``dm.configure`` saves a configuration and rebuilds that manager."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

from .cache import CacheEntry
from .config import Config, config_path, load_config, save_config
from .errors import ConfigError, NotConfiguredError, StorageNotFoundError
from .manager import KeyListing, Manager, ObjectDetails, Usage, VerifyReport
from .store import ObjectInfo, open_store

_default: Manager | None = None
_lock = threading.Lock()
_UNSET: Any = object()


def get_manager() -> Manager:
    """The default manager, built on first use from the saved configuration."""
    global _default
    with _lock:
        if _default is None:
            _default = Manager(load_config())
        return _default


def reset() -> None:
    """Forget the default manager (the next call re-reads the configuration)."""
    global _default
    with _lock:
        if _default is not None:
            _default.close()
        _default = None


def configure(
    storage_name: str = _UNSET,
    service: str = _UNSET,
    local_dir: str | Path | None = _UNSET,
    allocated_space: int | str | None = _UNSET,
    *,
    check: bool = True,
    **fields: Any,
) -> Config:
    """Save the configuration and use it from now on; fields not given keep their saved
    value (or their default on first use). With ``check``, the store must be reachable.

    ``service="local"`` makes the ``storage_name`` folder if it does not exist yet."""
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
    if given.get("local_dir"):  # saved absolute: it must not depend on where daman runs
        given["local_dir"] = str(Path(given["local_dir"]).expanduser().absolute())
    base = _saved_fields()
    if "storage_name" not in given and "storage_name" not in base:
        raise ConfigError(
            "storage_name is required the first time: a bucket (service='aws' or 'gcs'), a "
            "container (service='azure') or a folder (service='local')."
        )
    config = Config.from_dict({**base, **given})
    if config.service == "local":
        config = config.replace(storage_name=str(Path(config.storage_name).expanduser().absolute()))
        if check:
            try:
                Path(config.storage_name).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageNotFoundError(
                    f"cannot create the store folder {config.storage_name} ({exc.strerror}). "
                    "Choose a folder you can write to."
                ) from None
    if check:  # the store only: opening the cache would evict to an allocation not yet saved
        store = open_store(config)
        try:
            store.check()
        finally:
            store.close()
    save_config(config)
    reset()
    return config


def _saved_fields() -> dict[str, Any]:
    """The saved settings to build on: all of them when the file is valid, else those that
    are known fields (a newer daman's extra field or one bad value must not lose the rest)."""
    try:
        return load_config().to_dict()
    except NotConfiguredError:
        return {}
    except ConfigError:
        try:
            raw = json.loads(config_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        known = {field.name for field in dataclasses.fields(Config)}
        return {k: v for k, v in raw.items() if k in known} if isinstance(raw, dict) else {}


def current_config() -> Config:
    return load_config()


def push(
    obj: Any, key: str, meta: Any = None, force: bool = False, persist: bool = False
) -> ObjectInfo:
    """Store ``obj`` (and optional ``meta``) under ``key``; see :meth:`Manager.push`."""
    return get_manager().push(obj, key, meta=meta, force=force, persist=persist)


def pull(
    key: str, force: bool = False, persist: bool = False, memory_only: bool = False
) -> tuple[Any, Any]:
    """``obj, meta = dm.pull(key)``; see :meth:`Manager.pull`."""
    return get_manager().pull(key, force=force, persist=persist, memory_only=memory_only)


def fetch(key: str, force: bool = False, persist: bool = False) -> CacheEntry:
    """Bring ``key`` into the local cache without unpickling it; see :meth:`Manager.fetch`."""
    return get_manager().fetch(key, force=force, persist=persist)


def delete(key: str, local: bool = True, remote: bool = False) -> None:
    """Remove the cached copy and/or the stored object; see :meth:`Manager.delete`."""
    get_manager().delete(key, local=local, remote=remote)


def ls(prefix: str = "") -> list[KeyListing]:
    return get_manager().ls(prefix)


def info(key: str) -> ObjectDetails:
    return get_manager().info(key)


def exists(key: str) -> bool:
    return get_manager().exists(key)


def usage() -> Usage:
    return get_manager().usage()


def set_persist(key: str, persist: bool) -> None:
    get_manager().set_persist(key, persist)


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


def pull_file(key: str, dest: str | Path, force: bool = False, persist: bool = False) -> int:
    """Write the bytes stored under ``key`` to the file ``dest``; returns the bytes written."""
    return get_manager().pull_file(key, dest, force=force, persist=persist)


__all__ = [
    "clear",
    "config_path",
    "configure",
    "current_config",
    "delete",
    "exists",
    "fetch",
    "get_manager",
    "info",
    "ls",
    "pull",
    "pull_file",
    "push",
    "push_file",
    "reset",
    "set_persist",
    "usage",
    "verify",
]
