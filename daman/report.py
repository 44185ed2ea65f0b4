"""Text and JSON for people and scripts, shared by the front-ends (console scripts, magics,
panel) so that each one says the same thing the same way."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import math
import os
import shlex
import sys
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .bulk import BulkPlan, BulkResult
from .cache import CacheEntry
from .config import SIGNING_KEY_ENV, Config, format_size
from .errors import DamanWarning
from .migrate import MigrationReport, SetupImport
from .results import (
    Deleted,
    Disc,
    KeyHistory,
    KeyListing,
    LevelListing,
    MappedFile,
    ObjectDetails,
    Usage,
    VerifyReport,
    VersionInfo,
)
from .store import describe_store

if TYPE_CHECKING:
    from .demo import Demo


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON can hold it, whatever a meta holds: keys become text, floats
    that JSON cannot write (NaN, infinities) become ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``, other objects their ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else repr(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(item) for item in value]
    return repr(value)


def to_json(data: Any) -> str:
    """What ``--json`` prints: parses with any strict JSON parser."""
    return json.dumps(jsonable(data), indent=2, allow_nan=False)


def when(moment: datetime | None) -> str:
    """Local time to the minute, or ``-`` when the store does not say."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment else "-"


def count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def state(item: KeyListing | ObjectDetails) -> str:
    """Where a key is, seen from this machine: ``persisted``, ``cached`` or only ``stored``;
    ``(outdated)`` when the cached copy is an older version than the store's."""
    where = "persisted" if item.persist else "cached" if item.cached else "stored"
    return f"{where} (outdated)" if item.outdated else where


def cached_here(item: KeyListing | ObjectDetails) -> str:
    """Whether a key has a copy here, as a field ``cached:`` reads: ``yes``, ``yes,
    persisted``, ``no``; an older version than the store's says so."""
    if not item.cached:
        return "no"
    held = "yes, persisted" if item.persist else "yes"
    return f"{held} (an older version than the store's)" if item.outdated else held


def listing_data(listing: Sequence[KeyListing]) -> list[dict[str, Any]]:
    return [
        dict(
            key=item.key,
            size=item.size,
            last_modified=item.last_modified.isoformat() if item.last_modified else None,
            cached=item.cached,
            persist=item.persist,
            outdated=item.outdated,
            legacy=item.legacy,
        )
        for item in listing
    ]


def listing_lines(listing: Sequence[KeyListing]) -> list[str]:
    """One line per key (size, date, cache state, key), then a total."""
    lines = []
    for item in listing:
        where = state(item) if item.cached else "-"
        mark = "  (daman 0.2: run dm_migrate)" if item.legacy else ""
        lines.append(
            f"{format_size(item.size):>10}  {when(item.last_modified)}  {where:<9}  {item.key}"
            + mark
        )
    total = sum(item.size for item in listing)
    lines.append(f"{count(len(listing), 'key', 'keys')}, {format_size(total)}")
    return lines


def details_data(details: ObjectDetails) -> dict[str, Any]:
    if details.legacy:  # daman 0.2 kept no hash, writer or versions; its meta is inside it
        return dict(
            key=details.key,
            format="daman 0.2",
            size=details.size,
            last_modified=details.last_modified.isoformat() if details.last_modified else None,
            md5=details.md5 or None,
            cached=details.cached,
            persist=details.persist,
        )
    return dict(
        key=details.key,
        size=details.size,
        last_modified=details.last_modified.isoformat() if details.last_modified else None,
        sha256=details.sha256,
        pushed_by=details.pushed_by,
        pushed_at=details.pushed_at,
        python=details.python,
        cloudpickle=details.cloudpickle,
        libraries=details.libraries,
        holds_code=details.holds_code,
        cached=details.cached,
        persist=details.persist,
        outdated=details.outdated,
        meta=details.meta,
    )


def details_lines(details: ObjectDetails) -> list[str]:
    fields = details_data(details)
    fields["size"] = f"{format_size(details.size)} ({details.size} bytes)"
    fields["last_modified"] = when(details.last_modified)
    if details.legacy:
        fields["format"] = "daman 0.2 (convert it with dm_migrate; no writer or date recorded)"
        fields["md5"] = details.md5 or "none recorded (a folder keeps no md5: not verified)"
        fields["meta"] = "inside the object: dm.pull shows it"
    else:
        fields["meta"] = repr(details.meta)
        fields["libraries"] = (
            ", ".join(f"{name} {version}" for name, version in details.libraries.items()) or "-"
        )
        fields["holds_code"] = {
            True: f"yes: functions or classes pickled by value load under Python "
            f"{'.'.join(details.python.split('.')[:2])} only",
            False: "no",
            None: "not recorded",
        }[details.holds_code]
        fields["cached"] = cached_here(details)
        del fields["persist"], fields["outdated"]
    return [f"{name + ':':<15}{value}" for name, value in fields.items()]


def usage_data(usage: Usage, local_dir: Path) -> dict[str, Any]:
    return dict(
        store=usage.store,
        local_dir=str(local_dir),
        used=usage.used,
        allocated=usage.allocated,
        free=usage.free,
        entries=usage.count,
        persisted=[
            dict(key=e.key, size=e.size, **({"version": e.version} if e.version else {}))
            for e in usage.persisted
        ],
    )


def usage_lines(usage: Usage, local_dir: Path) -> list[str]:
    if usage.allocated is None:
        used = f"{format_size(usage.used)} (no limit)"
    else:
        share = f" ({100 * usage.used / usage.allocated:.0f}%)" if usage.allocated else ""
        used = f"{format_size(usage.used)} of {format_size(usage.allocated)}{share}"
    lines = [
        f"store:      {usage.store}",
        f"local_dir:  {local_dir}",
        f"used:       {used}",
        f"entries:    {usage.count} cached, {len(usage.persisted)} persisted",
    ]
    lines += [
        f"  {format_size(entry.size):>10}  {entry.key}"
        + (f"  (version {entry.version})" if entry.version else "")
        for entry in usage.persisted
    ]
    return lines


def verify_data(result: VerifyReport) -> dict[str, Any]:
    return {**dataclasses.asdict(result), "ok": result.ok}


def verify_lines(result: VerifyReport) -> list[str]:
    checked = count(result.checked, "cached copy", "cached copies")
    lines = [f"checked {checked} ({format_size(result.checked_bytes)})"]
    lines += [f"damaged, removed: {key}" for key in result.damaged]
    lines += [f"not signed with signing_key, removed: {key}" for key in result.untrusted]
    if result.rebuilt_index is not None:
        lines.append(
            f"the index was damaged: set aside and rebuilt from the cached files "
            f"({count(result.rebuilt_index, 'entry', 'entries')}; pins were lost)"
        )
    if result.dropped_rows or result.orphan_files:
        lines.append(
            f"repaired the index: {result.dropped_rows} entries without their file, "
            f"{result.orphan_files} files without an entry"
        )
    if result.ok:
        lines.append("all intact")
    return lines


def migration_line(key: str, outcome: str, detail: str, *, dry_run: bool = False) -> str | None:
    """One key of a ``dm_migrate`` run, or None for a key with nothing to say (skipped)."""
    if outcome == "converted":
        return f"{'would convert' if dry_run else 'converted'} {key} ({detail})"
    if outcome == "refused":
        return f"refused {key}: {detail}"
    return None


def migration_summary(result: MigrationReport) -> list[str]:
    converted = count(len(result.converted), "daman 0.2 object", "daman 0.2 objects")
    skipped = count(len(result.skipped), "key", "keys")
    lines = []
    if result.recovered:
        lines.append(
            f"put back {count(result.recovered, 'object', 'objects')} left aside by an "
            "interrupted run"
        )
    verb = "would convert" if result.dry_run else "converted"
    summary = f"{verb} {converted}; {skipped} already in today's format"
    if result.refused:
        summary += f"; {len(result.refused)} refused (see above)"
    lines.append(summary)
    return lines


def setup_import_lines(result: SetupImport) -> list[str]:
    config = result.config
    if result.existed:
        head = f"{result.config_path} already uses the daman 0.2 bucket; its pins only"
    else:
        verb = "would import" if result.dry_run else "imported"
        head = f"{verb} the daman 0.2 setup from {result.setup.path} into {result.config_path}"
    lines = [
        head + ":",
        f"  storage_name:    {config.storage_name}",
        f"  service:         {config.service}",
        f"  local_dir:       {config.cache_dir}",
        f"  allocated_space: {format_size(config.allocated_space)}",
    ]
    if result.pinned:
        verb = "would pull again and persist" if result.dry_run else "pulled again and persisted"
        lines.append(f"{verb}: {', '.join(result.pinned)}")
    lines += [f"could not persist {key}: {why}" for key, why in result.failed.items()]
    lines.append(
        f"the daman 0.2 cache folder {result.setup.data_dir} is left untouched: delete it once "
        "nobody on this machine uses daman 0.2"
    )
    return lines


def deleted_line(deleted: Deleted, *, freed: int | None = None) -> str:
    """What a delete did, saying "deleted" only of what was there to delete; ``freed``: the
    local copy's size, when the caller knows it."""
    if deleted.local and deleted.remote:
        return f"deleted {deleted.key} (the local copy and the stored object)"
    if deleted.remote:
        return f"deleted {deleted.key} from the store (there was no local copy)"
    if deleted.local:
        frees = f"; freed {format_size(freed)}" if freed is not None else ""
        return f"deleted the local copy of {deleted.key} (it stays in the store{frees})"
    return f"{deleted.key} is not cached here: nothing deleted (it stays in the store)"


def level_data(level: LevelListing) -> dict[str, Any]:
    return dict(
        prefix=level.prefix,
        prefixes=level.prefixes,
        keys=listing_data(level.keys),
        more=level.token is not None,
    )


def level_lines(levels: Sequence[LevelListing]) -> list[str]:
    """The pages of one level: sub-prefixes first (as ``ls`` of a folder), then its keys as
    :func:`listing_lines` shows them, then a total."""
    prefixes = [p for level in levels for p in level.prefixes]
    keys = [k for level in levels for k in level.keys]
    lines = [f"{'':>10}  {'':16}  {'prefix':<9}  {p}" for p in prefixes]
    lines += listing_lines(keys)[:-1]
    total = sum(item.size for item in keys)
    lines.append(
        f"{count(len(prefixes), 'prefix', 'prefixes')}, {count(len(keys), 'key', 'keys')}, "
        f"{format_size(total)}"
    )
    return lines


def disc_line(disc: Disc) -> str:
    """``3.1 GiB of 10.0 GiB, 1.2 GiB persisted, 6.9 GiB free`` (or ``no limit``)."""
    if disc.allocated is None:
        return f"{format_size(disc.used)} used, no limit, {format_size(disc.persisted)} persisted"
    return (
        f"{format_size(disc.used)} of {format_size(disc.allocated)}, "
        f"{format_size(disc.persisted)} persisted, {format_size(disc.free)} free"
    )


def evict_line(entries: Sequence[CacheEntry], *, cached: int) -> str:
    """The entries eviction would remove next (least recently used first), as one line;
    ``cached`` is how many entries the cache holds in all."""
    if not entries:
        return "next to evict: nothing" + (" (every entry is persisted)" if cached else "")
    names = ", ".join(f"{entry.key} ({format_size(entry.size)})" for entry in entries)
    return f"next to evict: {names}"


def snippet(key: str) -> list[str]:
    """How to pull ``key`` in Python and with the magic, ready to copy."""
    literal = f'"{key}"' if '"' not in key else repr(key)
    return [f"obj, meta = dm.pull({literal})", f"%dm_pull {shlex.quote(key)}"]


_BULK_VERBS = {"pin": "persist", "unpin": "unpersist", "pull": "pull", "delete_local": "delete"}


def bulk_line(plan: BulkPlan) -> str:
    """What a bulk action will do, before it runs: ``persist 3 keys: downloads 1.2 GiB``."""
    what = "local copies" if plan.action == "delete_local" else "keys"
    if len(plan.keys) == 1:
        what = what[:-1] if what == "keys" else "local copy"
    head = f"{_BULK_VERBS[plan.action]} {len(plan.keys)} {what}"
    if not plan.keys:
        return f"{head}: nothing to do"
    effects = []
    if plan.download:
        effects.append(f"downloads {format_size(plan.download)}")
    if plan.action == "pin":
        effects.append(f"persists {format_size(plan.pins)}")
    if plan.action == "unpin":
        effects.append(f"lets eviction take {format_size(plan.pins)} again")
    if plan.action == "delete_local":
        effects.append(f"frees {format_size(plan.frees)}")
    return f"{head}: {', '.join(effects) or 'already there'}"


def bulk_result_line(result: BulkResult) -> str:
    verb = _BULK_VERBS[result.plan.action]
    done = f"{verb}: {count(len(result.done), 'key', 'keys')} done"
    if not result.failed:
        return done
    key, reason = result.failed[0]
    more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
    return f"{done}, {len(result.failed)} failed{more}: {key}: {reason}"


def mapped_data(mapped: Sequence[MappedFile]) -> list[dict[str, Any]]:
    return [dict(key=m.key, size=m.size, current=m.current) for m in mapped]


def mapped_lines(mapped: Sequence[MappedFile]) -> list[str]:
    """The files zero-copy pulls map now: they stay on disc (and count) until unmapped."""
    if not mapped:
        return []
    names = ", ".join(
        f"{m.key} ({format_size(m.size)}{'' if m.current else ', an older version'})"
        for m in mapped
    )
    return [f"mapped:     {names}"]


def history_data(history: KeyHistory) -> dict[str, Any]:
    return dict(
        key=history.key,
        deleted=history.deleted,
        versions=[
            dict(
                version=v.version,
                current=v.current,
                size=v.size,
                pushed_by=v.pushed_by or None,
                pushed_at=v.pushed_at or None,
                python=v.python or None,
                cloudpickle=v.cloudpickle or None,
                restored_from=v.restored_from or None,
                readable=v.readable,
                meta=v.meta,
            )
            for v in history
        ],
    )


def version_line(v: VersionInfo) -> str:
    """One version, as ``dm_history``, ``%dm_history`` and the panel show it."""
    mark = "*" if v.current else " "
    if not v.readable:
        return f"{mark} {v.version}  {format_size(v.size):>9}  (its footer cannot be read)"
    restored = f"  restored from {v.restored_from}" if v.restored_from else ""
    meta = f"  meta {v.meta_preview}" if v.meta_preview else ""
    return (
        f"{mark} {v.version}  {format_size(v.size):>9}  {v.pushed_at} by {v.pushed_by}  "
        f"Python {v.python}, cloudpickle {v.cloudpickle}{restored}{meta}"
    )


def history_lines(history: KeyHistory) -> list[str]:
    """A key's versions, newest first, the current one marked ``*``."""
    n = count(len(history), "version", "versions")
    head = f"{history.key}: {n}, newest first"
    if history.deleted:
        head += " (deleted from the store: restore one with dm_restore --key KEY --version ID)"
    return [head, *(version_line(v) for v in history)]


def pulled_version_line(key: str, version: str, size: int) -> str:
    """A version brought into the local cache (the panel's pull of a version)."""
    return (
        f"pulled version {version} of {key} into the local cache ({format_size(size)}); "
        f"dm.pull({key!r}, version={version!r}) loads it"
    )


def restored_line(key: str, version: str) -> str:
    return f"restored {key} to version {version} (a new version: the one it replaced is kept)"


# -- the lines front-ends print after an action (one wording per event) ---------------------


def where(source: str) -> str:
    """Where a pull found an object: ``the local cache`` or ``the store``."""
    return "the local cache" if source == "cache" else "the store"


def pushed_line(key: str, size: int, *, var: str | None = None, store: str | None = None) -> str:
    """A push: of a variable (``var``, magics) or of a file's bytes to ``store`` (dm_push);
    ``size`` is the stored size, as ``dm_ls`` and ``dm_info`` show it."""
    if var is not None:
        return f"pushed {var} to {key} ({format_size(size)})"
    return f"pushed {key} ({format_size(size)}) to {store}"


def loaded_line(key: str, source: str, size: int, var: str) -> str:
    """A pull into a variable (``%dm_pull``, the panel's "pull into a variable")."""
    return f"pulled {key} from {where(source)} ({format_size(size)}) into {var}, {var}_meta"


def fetched_line(key: str, size: int, *, persist: bool = False, path: Path | None = None) -> str:
    """A pull into the local cache without loading it (``dm_pull``, the panel's pull)."""
    pinned = ", persisted" if persist else ""
    at = f" at {path}" if path is not None else ""
    return f"pulled {key} into the local cache ({format_size(size)}{pinned}){at}"


def wrote_line(key: str, size: int, path: str) -> str:
    """``dm_pull --output``: ``size`` is the bytes written (those ``dm_push`` was given)."""
    return f"wrote {key} ({format_size(size)}) to {path}"


def persist_line(key: str, *, on: bool, size: int | None = None) -> str:
    """A key pinned against eviction, or let go."""
    if not on:
        return f"unpersisted {key}: eviction may remove it again"
    sized = f" ({format_size(size)})" if size is not None else ""
    return f"persisted {key}{sized}: eviction leaves it alone"


def delete_question(
    key: str, store: str, size: int | None = None, *, all_versions: bool = False
) -> str:
    """Asked before deleting a key from the store for everyone."""
    sized = f" ({format_size(size)})" if size is not None else ""
    if all_versions:
        return (
            f"Delete {key}{sized} and every version of it from {store} for everyone? This "
            "cannot be undone; this machine's copies go too."
        )
    return (
        f"Delete {key}{sized} from {store} for everyone? Its versions stay (dm_history, "
        "dm_restore bring it back); this machine's copies go too."
    )


NOT_DELETED = "nothing deleted"
"""The answer to a delete that was asked about and declined."""


def cleared_line(freed: int, evicted: int, kept: int, kept_bytes: int) -> str:
    """``dm_clear``: what eviction of every unpinned entry freed, and what stays."""
    return (
        f"freed {format_size(freed)} ({count(evicted, 'entry', 'entries')}); kept "
        f"{count(kept, 'persisted entry', 'persisted entries')} ({format_size(kept_bytes)})"
    )


def cell_cached_line(key: str, names: Sequence[str], source: str, size: int) -> str:
    """``%%dm_cache`` found the cell's variables stored: the cell is not run."""
    return f"{key}: set {', '.join(names)} from {where(source)} ({format_size(size)}); cell not run"


def cell_pushed_line(key: str, names: Sequence[str], size: int) -> str:
    """``%%dm_cache`` ran the cell and stored its variables."""
    return f"{key}: ran the cell and pushed {', '.join(names)} ({format_size(size)})"


def empty_listing_line(prefix: str, store: str) -> str:
    """What every listing says when there is nothing to list."""
    under = f" under {prefix!r}" if prefix else ""
    return f"no keys{under} in {store}"


def config_lines(config: Config, path: Path) -> list[str]:
    """A saved configuration, every field, the signing key's secret told only as set or not."""
    head = [f"saved to {path}:"]
    fields = config.to_dict()
    fields["local_dir"] = config.cache_dir if config.local_dir else f"{config.cache_dir} (default)"
    fields["allocated_space"] = format_size(config.allocated_space)
    for name in ("endpoint_url", "region"):
        if fields[name] is None:
            fields[name] = "-"
    for name in ("check_current", "progress"):
        fields[name] = "true" if fields[name] else "false"
    fields["connect_timeout"] = f"{config.connect_timeout:g} s"
    fields["read_timeout"] = f"{config.read_timeout:g} s"
    if config.signing_key:
        fields["signing_key"] = "set (objects are signed; unsigned ones are refused)"
    elif os.environ.get(SIGNING_KEY_ENV):
        fields["signing_key"] = f"not saved; {SIGNING_KEY_ENV} is set and signs"
    else:
        fields["signing_key"] = "not set (objects are not signed)"
    width = max(map(len, fields)) + 2
    return head + [f"  {name + ':':<{width}}{value}" for name, value in fields.items()]


def aws_saved_lines(profile: str, path: Path, dropped: Sequence[str]) -> list[str]:
    """``dm_aws``: where the key went, and what of the profile left with the old key."""
    lines = [f"saved the access key of profile [{profile}] in {path}"]
    if dropped:
        lines.append(f"removed the profile's {', '.join(dropped)}: it belonged to the old key")
    return lines


def setup_import_failure(result: SetupImport) -> str:
    """The error ending ``dm_migrate --local`` when some pins could not be restored."""
    failed = count(len(result.failed), "persisted key", "persisted keys")
    return f"{failed} could not be pulled again (see above); run dm_migrate --local again."


def migration_failure(result: MigrationReport) -> str:
    """The error ending ``dm_migrate`` when some objects were refused."""
    return (
        f"{count(len(result.refused), 'object', 'objects')} could not be migrated (see above); "
        "run dm_migrate again once the reason is dealt with."
    )


def interrupted_line(prog: str) -> str:
    return f"{prog}: interrupted"


def error_line(prog: str, error: BaseException | str) -> str:
    """A daman error as front-ends show it: one line, the message saying what to do next."""
    return f"{prog}: error: {error}"


def warning_line(prog: str, message: Warning | str) -> str:
    """A daman warning as front-ends show it: one line, no file name, no source line."""
    return f"{prog}: warning: {message}"


@contextlib.contextmanager
def one_line_warnings(prog: str, file: TextIO | None = None) -> Iterator[None]:
    """daman's warnings as ``prog: warning: ...`` on ``file`` (stderr), with no file name and
    no source line; other warnings as Python shows them. Used by every front-end."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, DamanWarning):
            print(warning_line(prog, message), file=file or sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.showwarning = show
        yield


# -- HTML, for notebooks (``_repr_html_`` of the results, and the magics in Jupyter) ---------
# Every text that comes from a key, a meta or a path goes through ``_e``: a key or a meta
# holding markup shows as text, never as HTML a notebook would run.

HTML_ROWS = 500
"""Keys an HTML listing shows at most: a notebook cell is no place for 100,000 rows."""
_TABLE = '<table class="daman" style="border-collapse: collapse">'
_CELL = 'style="text-align: {align}"'
_CODE = "font-family: var(--jp-code-font-family, monospace)"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _row(*cells: str, head: bool = False, align: Sequence[str] = ()) -> str:
    tag = "th" if head else "td"
    return (
        "<tr>"
        + "".join(
            f"<{tag} {_CELL.format(align=align[i] if i < len(align) else 'left')}>{cell}</{tag}>"
            for i, cell in enumerate(cells)
        )
        + "</tr>"
    )


def _key(key: str) -> str:
    return f'<span style="{_CODE}">{_e(key)}</span>'


def listing_html(listing: Sequence[KeyListing]) -> str:
    """``ls`` as a table: size, last modified, where the key is, the key; then a total."""
    align = ("right", "left", "left", "left")
    rows = [_row("size", "last modified", "here", "key", head=True, align=align)]
    for item in listing[:HTML_ROWS]:
        mark = " (daman 0.2: run dm_migrate)" if item.legacy else ""
        rows.append(
            _row(
                _e(format_size(item.size)),
                _e(when(item.last_modified)),
                _e(state(item)),
                _key(item.key) + _e(mark),
                align=align,
            )
        )
    total = f"{count(len(listing), 'key', 'keys')}, {format_size(sum(i.size for i in listing))}"
    if len(listing) > HTML_ROWS:
        total += f" (the first {HTML_ROWS} shown)"
    return f"{_TABLE}{''.join(rows)}</table><div>{_e(total)}</div>"


def level_html(level: LevelListing) -> str:
    """One page of one level: its sub-prefixes, then its keys as :func:`listing_html`."""
    prefixes = "".join(f"<li>{_key(p)}</li>" for p in level.prefixes)
    more = "<div>more names follow: pass this page's token to ls_level</div>" if level.token else ""
    head = f"<div>{_e(count(len(level.prefixes), 'prefix', 'prefixes'))}</div>"
    return f"{head}<ul>{prefixes}</ul>{listing_html(level.keys)}{more}"


def details_html(details: ObjectDetails) -> str:
    """``info`` as a two-column table, the fields :func:`details_lines` prints."""
    rows = []
    for line in details_lines(details):
        name, _, value = line.partition(":")
        value = value.strip()
        shown = _key(value) if name in ("key", "sha256") else _e(value)
        rows.append(_row(f"<b>{_e(name)}</b>", shown))
    return f"{_TABLE}{''.join(rows)}</table>"


def bar_html(used: int, allocated: int | None, persisted: int = 0) -> str:
    """A small bar of the allocation: persisted bytes (dark), other cached bytes (light)."""
    if not allocated:
        return ""
    dark = min(100.0, 100 * persisted / allocated)
    light = min(100.0 - dark, 100 * max(0, used - persisted) / allocated)
    title = f"{format_size(used)} of {format_size(allocated)}, {format_size(persisted)} persisted"
    return (
        f'<div title="{_e(title)}" style="display: flex; width: 24em; height: 10px; '
        'background: #e6e6e6; border-radius: 3px; overflow: hidden; margin: 3px 0">'
        f'<div style="width: {dark:.2f}%; background: #0d47a1"></div>'
        f'<div style="width: {light:.2f}%; background: #64b5f6"></div></div>'
    )


def usage_html(usage: Usage, local_dir: Path | None, mapped: Sequence[MappedFile] = ()) -> str:
    """``usage`` (``%dm_status``): the store, the cache folder, a bar of used against
    allocated, and the persisted entries."""
    persisted = usage.persisted
    lines = usage_lines(usage, local_dir or Path("-"))[:4]
    rows = [_row(f"<b>{_e(name)}</b>", _e(value.strip())) for name, _, value in (
        line.partition(":") for line in lines
    )]  # fmt: skip
    bar = bar_html(usage.used, usage.allocated, sum(entry.size for entry in persisted))
    pins = "".join(f"<li>{_key(e.key)} ({_e(format_size(e.size))})</li>" for e in persisted)
    pinned = f"<div>persisted:</div><ul>{pins}</ul>" if pins else ""
    maps = "".join(f"<div>{_e(line)}</div>" for line in mapped_lines(mapped))
    return f"{_TABLE}{''.join(rows)}</table>{bar}{pinned}{maps}"


def config_line(config: Config) -> str:
    """A configuration in one line, as a notebook shows what ``dm.configure`` returned (the
    signing key is never shown, only whether there is one)."""
    store = describe_store(config)
    where = f" at {config.endpoint_url}" if config.endpoint_url else ""
    signed = ", signed" if config.signing_secret else ""
    return (
        f"daman: {store}{where}; cache {config.cache_dir} "
        f"({format_size(config.allocated_space)}{signed})"
    )


def demo_line(demo: Demo) -> str:
    """What ``dm.demo.start()`` set up, in one line."""
    server = "in this process, until it ends" if demo.own_server else "shared by this machine"
    return (
        f"daman demo: s3://{demo.bucket}/ on {demo.endpoint} (moto's S3 server {server}); "
        f"cache {demo.config.cache_dir}. Configured for this process only: your saved "
        "configuration is unchanged."
    )
