"""Upgrading from daman 0.2: its objects in the store, and its setup on a machine.

``migrate_store`` rewrites every daman 0.2 object under a prefix in today's format (meta kept,
signed when a signing key is set). Each rewrite is conditional on the version that was read
(``Store.put_if_match``), so a change made meanwhile by someone else is never overwritten:
the key is reported and left alone. Objects already in today's format are skipped, so a run
can be repeated, and an interrupted run resumed, at any time.

``import_setup`` turns a machine's 0.2 setup into today's configuration::

    ~/.daman/config                 INI: [service] service = aws, name = <bucket>
                                         [local] data_dir = <folder>, registery = <path>,
                                                 allocated_space = <MiB> (optional)
    ~/.daman/data_registery.json    key -> {"path", "used", "created_at", "last_used",
                                            "size", "persist"}  (0.2 read this file, whatever
                                            the config's registery said)
    <data_dir>/<key>                its cached copies (joblib dumps), left untouched

Keys 0.2 had persisted are pulled again (verified, converted) and persisted in the new cache.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import legacy as legacy_format
from .config import Config, config_path, daman_home, format_size, load_config
from .errors import (
    ConcurrentChangeError,
    ConfigError,
    CredentialsError,
    DamanError,
    KeyNotFoundError,
    NotConfiguredError,
    StorageNotFoundError,
    StoreUnavailableError,
)
from .keys import validate_key, validate_prefix
from .manager import Manager
from .serialize import TAIL_GUESS, Footer, read_footer
from .store import ObjectInfo, Store

LEGACY_CONFIG = "config"
LEGACY_REGISTRY = "data_registery.json"
_PAGE = 1000
_FATAL = (StoreUnavailableError, StorageNotFoundError, CredentialsError)
"""Failures that every further key would meet too: they stop a migration."""

OnKey = Callable[[str, str, str], object]
"""Called as each key is done, with ``(key, outcome, detail)``; outcome is ``"converted"``,
``"skipped"`` or ``"refused"``."""


# -- objects in the store ------------------------------------------------------------------


@dataclasses.dataclass
class MigrationReport:
    """What :func:`migrate_store` did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    converted: list[str] = dataclasses.field(default_factory=list)
    """daman 0.2 objects rewritten in today's format (with ``dry_run``: to be rewritten)."""
    skipped: list[str] = dataclasses.field(default_factory=list)
    """Keys already in today's format (or deleted meanwhile): nothing to do."""
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    """Keys left as they are, each with why (damaged, unreadable, changed meanwhile)."""
    recovered: int = 0
    """Objects put back in place after an interrupted earlier run (local-folder store)."""

    @property
    def ok(self) -> bool:
        return not self.refused


def _written_by_us(store: Store, key: str, footer: Footer) -> bool:
    """Whether the stored object is the file this migration wrote (a retried conditional
    write whose first answer was lost meets its own write and fails its condition)."""
    try:
        tail, info = store.read_tail(key, TAIL_GUESS)
        stored = read_footer(lambda o, n: store.read_range(key, o, n), info.size, tail)
    except DamanError:
        return False
    return stored == footer


def _convert(manager: Manager, key: str) -> tuple[str, str]:
    """Rewrite one 0.2 object; ``(outcome, detail)``."""
    store = manager.store
    with manager.cache.temp_file() as old, manager.cache.temp_file() as new:
        try:
            info = store.get(key, old)  # this version is the one the rewrite is conditional on
        except KeyNotFoundError:
            return "skipped", "deleted meanwhile"
        with open(old, "rb") as f:
            if not legacy_format.is_legacy_file(f, info):
                return "skipped", "already in today's format"
            legacy_format.check_md5(f, info)
            obj, meta = legacy_format.load(f, key)
        with open(new, "wb") as out:
            footer = legacy_format.write(
                obj, meta, out, key, signing_key=manager.signing_key, pushed_at=info.last_modified
            )
        del obj, meta
        try:
            stored = store.put_if_match(key, new, info.etag)
        except ConcurrentChangeError as exc:
            if not _written_by_us(store, key, footer):
                return "refused", f"{exc} Run dm_migrate again to convert it if it is still 0.2."
            stored = ObjectInfo(key, footer.file_size, "")
        except KeyNotFoundError:
            return "skipped", "deleted meanwhile"
    signed = ", signed" if manager.signing_key is not None else ""
    return "converted", f"{format_size(info.size)} -> {format_size(stored.size)}{signed}"


def migrate_store(
    manager: Manager, prefix: str = "", *, dry_run: bool = False, on_key: OnKey | None = None
) -> MigrationReport:
    """Rewrite every daman 0.2 object under ``prefix`` in today's format; see the module's
    docstring. With ``dry_run``, only find them (one 16-byte read per key) and change nothing.
    ``on_key`` hears about each key as it is done (progress on long runs)."""
    validate_prefix(prefix)
    report = MigrationReport(dry_run=dry_run)
    if not dry_run:
        if type(manager.store).put_if_match is Store.put_if_match:  # say so once, not per key
            raise DamanError(
                f"{manager.store.describe()} cannot replace an object only if it is unchanged, "
                "which dm_migrate needs; nothing was changed."
            )
        report.recovered = manager.store.recover_interrupted(prefix)

    def done(key: str, outcome: str, detail: str) -> None:
        if outcome == "converted":
            report.converted.append(key)
        elif outcome == "skipped":
            report.skipped.append(key)
        else:
            report.refused[key] = detail
        if on_key is not None:
            on_key(key, outcome, detail)

    def run(page: list[ObjectInfo]) -> None:
        old = legacy_format.find(manager.store, page)
        if old and not dry_run:
            legacy_format.require_joblib(min(old))  # missing: stop, every key needs it
        for info in page:
            if info.key not in old:
                done(info.key, "skipped", "already in today's format")
            elif dry_run:
                done(info.key, "converted", format_size(info.size))
            else:
                try:
                    done(info.key, *_convert(manager, info.key))
                except _FATAL:
                    raise
                except DamanError as exc:
                    done(info.key, "refused", str(exc))
        page.clear()

    page: list[ObjectInfo] = []
    for info in manager.store.list(prefix):
        page.append(info)
        if len(page) == _PAGE:
            run(page)
    run(page)
    return report


# -- the machine's setup -------------------------------------------------------------------


def legacy_home() -> Path:
    """Where daman 0.2 kept its setup: ``~/.daman`` (it did not know ``DAMAN_HOME``)."""
    return Path.home() / ".daman"


def legacy_setup_hint() -> str:
    """A sentence offering to import a daman 0.2 setup when one exists, else ``""``."""
    path = legacy_home() / LEGACY_CONFIG
    try:
        if not path.is_file():
            return ""
    except OSError:
        return ""
    return f" A daman 0.2 setup exists in {path}: import it with `dm_migrate --local`."


@dataclasses.dataclass(frozen=True)
class LegacySetup:
    """A machine's daman 0.2 setup, as read from its files."""

    path: Path
    storage_name: str
    service: str
    data_dir: Path
    allocated_space: int | None
    """Bytes (0.2 wrote MiB)."""
    registry: Path | None
    """The registry file read, if one existed."""
    persisted: tuple[str, ...]
    """Keys 0.2 had persisted, sorted."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _bad(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"cannot import the daman 0.2 setup: {path} {why}. Fix it, or configure daman afresh "
        "with dm_configure."
    )


def _mib(path: Path, value: str | None) -> int | None:
    if value is None or value.strip().lower() in ("", "none"):
        return None
    try:
        mib = float(value)
    except ValueError:
        mib = math.nan
    if not math.isfinite(mib) or mib < 0:
        raise _bad(path, f"has allocated_space = {value!r}, not a number of MiB")
    return int(mib * 2**20)


def _read_registry(path: Path) -> tuple[str, ...]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"is not a readable JSON registry ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise _bad(path, "does not hold a registry (a JSON object of keys)")
    persisted = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise _bad(path, f"has an entry for {key!r} that is not a JSON object")
        persist = entry.get("persist")
        if persist not in (True, False, None):
            raise _bad(path, f"has persist = {persist!r} for {key!r}, not true or false")
        if persist:
            persisted.append(key)
    return tuple(sorted(persisted))


def read_legacy_setup(home: Path | None = None) -> LegacySetup | None:
    """The daman 0.2 setup in ``home`` (default ``~/.daman``), None if there is none; a bad
    file is a one-line :class:`ConfigError`."""
    home = home or legacy_home()
    path = home / LEGACY_CONFIG
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise _bad(path, f"is not a readable INI file ({_one_line(exc)})") from None
    service = parser.get("service", "service", fallback="").strip().lower()
    name = parser.get("service", "name", fallback="").strip()
    data_dir = parser.get("local", "data_dir", fallback="").strip()
    if not service or not name:
        raise _bad(path, "has no [service] section with service and name (the bucket)")
    if service != "aws":
        raise _bad(path, f"names service {service!r}; daman 0.2 had only 'aws'")
    if not data_dir:
        raise _bad(path, "has no [local] section with data_dir")
    allocated = _mib(path, parser.get("local", "allocated_space", fallback=None))
    # 0.2 read data_registery.json whatever its config said; the named file is a fallback.
    candidates = [home / LEGACY_REGISTRY]
    named = parser.get("local", "registery", fallback="").strip()
    if named:
        candidates.append(Path(named).expanduser())
    registry = next((p for p in candidates if p.is_file()), None)
    return LegacySetup(
        path=path,
        storage_name=name,
        service=service,
        data_dir=Path(data_dir).expanduser(),
        allocated_space=allocated,
        registry=registry,
        persisted=_read_registry(registry) if registry else (),
    )


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except FileNotFoundError:
        return True
    except OSError:  # a file, or unreadable: not a folder to take over
        return False


def choose_local_dir(old: Path) -> Path:
    """0.2's cache folder if it is empty (or gone); else today's default, unless that is the
    same folder (0.2's default was ``~/.daman/data`` too), then ``$DAMAN_HOME/cache``."""
    if _is_empty(old):
        return old.absolute()
    default = daman_home() / "data"
    if default.resolve() != old.resolve():
        return default
    return daman_home() / "cache"


@dataclasses.dataclass(frozen=True)
class SetupImport:
    """What :func:`import_setup` did (or, with ``dry_run``, would do)."""

    setup: LegacySetup
    config: Config
    config_path: Path
    existed: bool
    """A configuration for the same bucket existed already: only the pins were imported."""
    pinned: list[str]
    """Keys pulled again and persisted (with ``dry_run``: to be)."""
    failed: dict[str, str]
    """Persisted keys that could not be pulled, each with why."""
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed


def import_setup(
    *, dry_run: bool = False, check: bool = True, progress: bool = True
) -> SetupImport:
    """Import this machine's daman 0.2 setup: write today's configuration from it (unless one
    exists; it must then name the same bucket, and only the pins are imported), and pull
    again, verified and persisted, the keys 0.2 had persisted. 0.2's files and cache folder
    are left untouched. Repeatable: what is already done is not done again."""
    setup = read_legacy_setup()
    if setup is None:
        raise NotConfiguredError(
            f"no daman 0.2 setup to import: {legacy_home() / LEGACY_CONFIG} does not exist."
        )
    path = config_path()
    try:
        existing: Config | None = load_config()
    except NotConfiguredError:
        existing = None
    if existing is not None:
        if (existing.service, existing.storage_name.strip("/")) != ("aws", setup.storage_name):
            raise ConfigError(
                f"daman is already configured in {path} for {existing.storage_name} "
                f"({existing.service}), not the daman 0.2 bucket {setup.storage_name}: nothing "
                f"imported. Move {path} away to import the 0.2 setup."
            )
        config = existing
    else:
        fields: dict[str, Any] = dict(
            storage_name=setup.storage_name,
            service="aws",
            local_dir=str(choose_local_dir(setup.data_dir)),
            allocated_space=setup.allocated_space,
        )
        if dry_run:
            config = Config(**fields)
        else:
            from . import api  # imported here: api imports this module's callers

            config = api.configure(**fields, check=check)
    pinned: list[str] = []
    failed: dict[str, str] = {}
    if dry_run:
        pinned = list(setup.persisted)
    elif setup.persisted:
        with Manager(config.replace(progress=progress)) as manager:
            for key in setup.persisted:
                try:
                    validate_key(key)
                    manager.fetch(key, persist=True)
                except DamanError as exc:
                    failed[key] = str(exc)
                else:
                    pinned.append(key)
    return SetupImport(setup, config, path, existing is not None, pinned, failed, dry_run)
