"""The panel's view-model: what the panel shows and what each click does, in plain Python.

:class:`PanelModel` holds the state (the level being browsed, its loaded pages, the selected
keys, the disc, the one-line message, a transfer's progress, a pending confirmation) and the
actions, each a call to a :class:`~daman.manager.Manager`. It imports no widget library: the
widget (:mod:`daman.panel`) only draws it and forwards clicks, and the tests drive it without
a browser.

Threads: anything that asks the store runs off the caller's thread, so the kernel stays free
while a listing or a 1 GiB pull runs. Listings and details go to one worker thread, transfers
and deletions to another (so browsing goes on during a long pull). Each worker applies its
result under the model's lock and then calls the listeners, from its own thread: ipywidgets'
documented pattern for background work is to set widget traits from the worker. Quick local
actions (select, cancel, a substring filter) run at once on the caller's thread.
"""

from __future__ import annotations

import dataclasses
import keyword
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from . import report
from .bulk import BulkAction, BulkPlan, plan_bulk, run_bulk
from .errors import DamanError, InvalidArgumentError, NotCachedError
from .keys import validate_prefix, variable_name
from .manager import LEVEL_PAGE, Manager
from .results import Disc, KeyHistory, KeyListing, LevelListing, ObjectDetails

PAGE_ROWS = 200
"""Rows shown at a time; "show more" adds as many."""
NEXT_TO_EVICT = 5
FilterMode = Literal["starts with", "contains"]
FILTER_MODES: tuple[FilterMode, ...] = ("starts with", "contains")
Part = Literal["all", "transfer"]
"""What changed, for a listener that redraws only that: everything, or the progress."""

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a sub-prefix (``prefix`` set) or a key (``item`` set)."""

    name: str
    """As shown, relative to the level: ``models/`` or ``v3``."""
    prefix: str | None = None
    item: KeyListing | None = None

    @property
    def key(self) -> str | None:
        return self.item.key if self.item else None


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """A destructive action waiting for a second click."""

    key: str
    question: str
    confirm_label: str


@dataclasses.dataclass(frozen=True)
class Transfer:
    what: str
    done: int
    total: int


class PanelModel:
    """State and actions of one panel on one manager. ``threaded=False`` runs every action
    on the caller's thread (for tests and scripts)."""

    def __init__(
        self, manager: Manager, *, threaded: bool = True, store_page: int = LEVEL_PAGE
    ) -> None:
        self.manager = manager
        self.store_page = store_page
        """Names per request to the store (rows are shown PAGE_ROWS at a time)."""
        self.store_name = manager.store.describe()
        self.prefix = ""
        self.filter_text = ""
        self.filter_mode: FilterMode = "starts with"
        self.pages: list[LevelListing] = []
        self.shown = PAGE_ROWS
        self.selected: set[str] = set()
        self.focus: str | None = None
        self.details: ObjectDetails | None = None
        self.history: KeyHistory | None = None
        """The versions of the key whose details are shown, once asked (``show_versions``)."""
        self.disc: Disc | None = None
        self.message = ""
        self.error = False
        self._running: list[str] = []
        self.transfer: Transfer | None = None
        self.confirmation: Confirmation | None = None
        self._listeners: list[Callable[[Part], object]] = []
        self._lock = threading.RLock()
        self._view = 0  # bumped by each navigation: a late answer for an old view is dropped
        self._pending: set[Future[None]] = set()
        self._lister = ThreadPoolExecutor(1, "daman-panel-list") if threaded else None
        self._mover = ThreadPoolExecutor(1, "daman-panel-transfer") if threaded else None
        self._last_progress = 0.0

    # -- listening ---------------------------------------------------------------------

    def listen(self, listener: Callable[[Part], object]) -> None:
        """Call ``listener`` after every change, from the thread that made it."""
        self._listeners.append(listener)

    def _changed(self, part: Part = "all") -> None:
        with self._lock:
            for listener in self._listeners:
                try:
                    listener(part)
                except Exception:  # a drawing bug must not stop the worker
                    log.exception("a panel listener failed")

    def _say(self, message: str, *, error: bool = False) -> None:
        self.message, self.error = message, error

    # -- running actions ---------------------------------------------------------------

    def _run(
        self, what: str, work: Callable[[], object], *, transfer: bool = False
    ) -> Future[None]:
        """Run ``work`` on a worker (a transfer on the transfer worker), with ``what``
        shown meanwhile; its failure becomes the one-line message."""
        with self._lock:
            self._running.append(what)
        self._changed()

        def job() -> None:
            try:
                with self._errors(what):
                    work()
            finally:
                with self._lock:
                    self._running.remove(what)
                    if transfer:
                        self.transfer = None
                self._changed()

        pool = self._mover if transfer else self._lister
        if pool is None:
            future: Future[None] = Future()
            job()
            future.set_result(None)
            return future
        future = pool.submit(job)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    @staticmethod
    def _errors_line(what: str, exc: BaseException) -> str:
        if isinstance(exc, DamanError):
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"{what} failed: {type(exc).__name__}: {first}".rstrip(": ")

    def _errors(self, what: str) -> _Guard:
        return _Guard(self, what)

    def wait(self, timeout: float | None = 60) -> None:
        """Wait until the actions asked for so far have finished (tests, scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            for future in list(self._pending):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                future.result(timeout=left)

    def close(self) -> None:
        for pool in (self._lister, self._mover):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._listeners.clear()

    # -- what is shown -----------------------------------------------------------------

    @property
    def busy(self) -> str | None:
        """What is running now (``listing team/``, ``pull team/model``), or None."""
        with self._lock:
            return "; ".join(dict.fromkeys(self._running)) or None

    @property
    def token(self) -> str | None:
        return self.pages[-1].token if self.pages else None

    def _all_rows(self) -> list[Row]:
        prefixes = [p for page in self.pages for p in page.prefixes]
        keys = [k for page in self.pages for k in page.keys]
        rows = [Row(p[len(self.prefix) :], prefix=p) for p in prefixes]
        rows += [Row(k.key[len(self.prefix) :], item=k) for k in keys]
        if self.filter_mode == "contains" and self.filter_text:
            needle = self.filter_text.casefold()
            rows = [row for row in rows if needle in row.name.casefold()]
        return rows

    @property
    def rows(self) -> list[Row]:
        """The rows to draw: sub-prefixes first, then keys; at most :attr:`shown`."""
        with self._lock:
            return self._all_rows()[: self.shown]

    @property
    def more(self) -> bool:
        """Whether "show more" has anything to show (loaded, or still in the store)."""
        with self._lock:
            return len(self._all_rows()) > self.shown or self.token is not None

    @property
    def summary(self) -> str:
        """``team/: 2 prefixes, 120 keys shown of more in the store``; an empty level says
        so as every listing does."""
        with self._lock:
            rows = self._all_rows()
            if self.pages and not rows and self.token is None and not self.filter_text:
                return report.empty_listing_line(self.prefix, self.store_name)
            prefixes = sum(row.prefix is not None for row in rows)
            keys = len(rows) - prefixes
            where = self.prefix or self.store_name
            text = (
                f"{where}: {report.count(prefixes, 'prefix', 'prefixes')}, "
                f"{report.count(keys, 'key', 'keys')}"
            )
            if len(rows) > self.shown:
                text += f", {self.shown} shown"
            if self.token is not None:
                text += "; more in the store"
            return text

    @property
    def breadcrumbs(self) -> list[tuple[str, str]]:
        """``(label, prefix)`` from the store's root to the level shown."""
        crumbs = [(self.store_name, "")]
        parts = self.prefix.split("/")[:-1]
        for depth, part in enumerate(parts, start=1):
            crumbs.append((f"{part}/", "/".join(parts[:depth]) + "/"))
        return crumbs

    def item(self, key: str) -> KeyListing | None:
        with self._lock:
            for page in self.pages:
                for item in page.keys:
                    if item.key == key:
                        return item
        return None

    @property
    def selected_items(self) -> list[KeyListing]:
        with self._lock:
            return [i for page in self.pages for i in page.keys if i.key in self.selected]

    def plan(self, action: BulkAction) -> BulkPlan:
        """What ``action`` on the selected keys would do, shown before it runs."""
        disc = self.disc
        return plan_bulk(
            action,
            self.selected_items,
            allocated=self.manager.cache.allocated_space,
            persisted=disc.persisted if disc else self.manager.cache.persisted_size(),
        )

    def snippet(self, key: str) -> list[str]:
        return report.snippet(key)

    @property
    def shell(self) -> Any:
        """The IPython shell the panel runs in, or None (then no "pull into a variable")."""
        import sys

        if "IPython" not in sys.modules:
            return None
        from IPython import get_ipython

        return get_ipython()

    # -- browsing ----------------------------------------------------------------------

    def start(self) -> Future[None]:
        """Load the first level and the disc (what opening the panel shows)."""
        self.refresh_disc()
        return self.open("")

    def open(self, prefix: str) -> Future[None]:
        """Browse the level ``prefix`` (``""``: the store's root)."""
        with self._lock:
            self.prefix = prefix
            self.filter_text = ""
            self.selected.clear()
            self.confirmation = None
        return self._list(fresh=False)

    def refresh(self) -> Future[None]:
        """Ask the store again (not the listing cache) and re-read the disc."""
        self.refresh_disc()
        return self._list(fresh=True)

    def _list(self, *, fresh: bool) -> Future[None]:
        with self._lock:
            self._view += 1
            view = self._view
            self.pages, self.shown = [], PAGE_ROWS
            narrowed = self.prefix
            if self.filter_mode == "starts with":
                narrowed += self.filter_text
            focus = self.focus
        where = narrowed or self.store_name

        def work() -> None:
            validate_prefix(narrowed)
            page = self.manager.ls_level(narrowed, limit=self.store_page, fresh=fresh)
            details = self._details_of(focus) if fresh and focus else None
            with self._lock:
                if view != self._view:
                    return  # the user moved on meanwhile
                self.pages = [page]
                if details is not None:
                    self.details = details

        self._changed()
        return self._run(f"listing {where}", work)

    def show_more(self) -> Future[None] | None:
        """Show the next PAGE_ROWS rows, asking the store for its next page when the loaded
        ones run out."""
        with self._lock:
            self.shown += PAGE_ROWS
            need_page = len(self._all_rows()) < self.shown and self.token is not None
            view, last = self._view, (self.pages[-1] if self.pages else None)
        if not need_page or last is None:
            self._changed()
            return None

        def work() -> None:
            page = self.manager.ls_level(last.prefix, token=last.token, limit=self.store_page)
            with self._lock:
                if view == self._view and self.pages and self.pages[-1] is last:
                    self.pages.append(page)

        return self._run(f"listing more of {last.prefix or self.store_name}", work)

    def set_filter(self, text: str, mode: FilterMode | None = None) -> Future[None] | None:
        """``starts with``: narrow the level on the store's side (a ``/`` in the text opens
        that level); ``contains``: keep the loaded rows whose name holds the text."""
        mode = mode or self.filter_mode
        if mode not in FILTER_MODES:
            raise InvalidArgumentError(f"filter mode {mode!r}: use one of {FILTER_MODES}")
        with self._lock:
            was_narrowed = self.filter_mode == "starts with" and self.filter_text
            self.filter_mode = mode
            if mode == "starts with" and "/" in text:
                level, _, text = text.rpartition("/")
                self.prefix += f"{level}/"
                self.selected.clear()
            self.filter_text = text
            if mode == "contains" and not was_narrowed:
                self.shown = PAGE_ROWS
        if mode == "contains" and not was_narrowed:
            self._changed()
            return None
        return self._list(fresh=False)

    # -- one key -----------------------------------------------------------------------

    def show(self, key: str) -> Future[None]:
        """Show the details of ``key`` (``Manager.info``: one ranged read of its tail)."""
        with self._lock:
            self.focus, self.details, self.history = key, None, None

        def work() -> None:
            details = self._details_of(key)
            with self._lock:
                if self.focus == key:
                    self.details = details

        return self._run(f"reading the details of {key}", work)

    def _details_of(self, key: str) -> ObjectDetails:
        return self.manager.info(key)

    def show_versions(self, key: str) -> Future[None]:
        """List the versions of ``key`` in its details (``Manager.history``: one listing,
        then a small read per version)."""

        def work() -> None:
            history = self.manager.history(key)
            with self._lock:
                if self.focus == key:
                    self.history = history

        return self._run(f"reading the versions of {key}", work)

    def version_lines(self) -> list[tuple[str, str]]:
        """``(version id, line)`` of each version listed, newest first (``*``: current)."""
        history = self.history
        if history is None or history.key != self.focus:
            return []
        return [(v.version, report.version_line(v)) for v in history]

    def pull_version(self, key: str, version: str) -> Future[None]:
        """Bring one version of ``key`` into this machine's cache, beside the current one."""
        what = f"pull {key} version {version}"

        def work() -> None:
            entry = self.manager.fetch(key, version=version, progress=self._progress(what))
            self._after_change(report.pulled_version_line(key, version, entry.size))

        return self._run(what, work, transfer=True)

    def restore(self, key: str, version: str) -> Future[None]:
        """Make ``version`` the current version of ``key`` again, for everyone (a new
        version: the one it replaces stays in the history); the details and versions are
        read again."""
        what = f"restore {key} to version {version}"

        def work() -> None:
            self.manager.restore(key, version=version)
            details, history = self.manager.info(key), self.manager.history(key)
            with self._lock:
                if self.focus == key:
                    self.details, self.history = details, history
            self._after_change(report.restored_line(key, version))

        return self._run(what, work, transfer=True)

    def select(self, key: str, *, on: bool) -> None:
        with self._lock:
            (self.selected.add if on else self.selected.discard)(key)
        self._changed()

    def select_all(self, *, on: bool) -> None:
        """Select (or clear) every key row shown."""
        with self._lock:
            keys = {row.key for row in self.rows if row.key is not None}
            self.selected = self.selected | keys if on else self.selected - keys
        self._changed()

    def _progress(self, what: str) -> Callable[[int, int], None]:
        def report_progress(done: int, total: int) -> None:
            now = time.monotonic()
            with self._lock:
                self.transfer = Transfer(what, done, total)
                if done < total and now - self._last_progress < 0.2:
                    return  # at most five redraws a second
                self._last_progress = now
            self._changed("transfer")

        return report_progress

    def pull(self, key: str) -> Future[None]:
        """Bring ``key`` into this machine's cache (no unpickling); refused up front, with
        the reason, when it cannot fit beside the persisted entries."""
        item = self.item(key)
        what = f"pull {key}"

        def work() -> None:
            if item is not None and not item.cached:
                reason = self.manager.cache_refusal(key, item.size, persist=False)
                if reason is not None:
                    raise NotCachedError(reason)
            entry = self.manager.fetch(key, progress=self._progress(what))
            self._after_change(report.fetched_line(key, entry.size, persist=entry.persist))

        return self._run(what, work, transfer=True)

    def set_persist(self, key: str, *, on: bool) -> Future[None]:
        """Persist ``key`` (fetching it first when it is not cached; refused with the reason
        when it cannot fit) or unpersist it."""
        what = f"{'persist' if on else 'unpersist'} {key}"

        def work() -> None:
            if on:
                entry = self.manager.pin(key, progress=self._progress(what))
                done = report.persist_line(key, on=True, size=entry.size)
            else:
                self.manager.set_persist(key, False)
                done = report.persist_line(key, on=False)
            self._after_change(done)

        return self._run(what, work, transfer=True)

    def delete_local(self, key: str) -> Future[None]:
        item = self.item(key)
        freed = item.size if item and item.cached else None

        def work() -> None:
            deleted = self.manager.delete(key, local=True)
            self._after_change(report.deleted_line(deleted, freed=freed))

        return self._run(f"delete the local copy of {key}", work, transfer=True)

    def ask_delete_remote(self, key: str) -> None:
        """The first click of a deletion from the store: ask, naming the key and its size."""
        item = self.item(key)
        details = self.details if self.details and self.details.key == key else None
        size = item.size if item else details.size if details else None
        with self._lock:
            self.confirmation = Confirmation(
                key,
                report.delete_question(key, self.store_name, size),
                f"delete {key} from the store",
            )
        self._changed()

    def cancel(self) -> None:
        with self._lock:
            self.confirmation = None
            self._say(report.NOT_DELETED)
        self._changed()

    def confirm(self) -> Future[None] | None:
        """The second click: delete the key the confirmation names, for everyone."""
        with self._lock:
            pending, self.confirmation = self.confirmation, None
        if pending is None:
            return None
        key = pending.key

        def work() -> None:
            deleted = self.manager.delete(key, local=True, remote=True)
            with self._lock:
                for n, page in enumerate(self.pages):
                    keys = [item for item in page.keys if item.key != key]
                    self.pages[n] = dataclasses.replace(page, keys=keys)
                self.selected.discard(key)
                if self.focus == key:
                    self.focus = self.details = self.history = None
            self._after_change(report.deleted_line(deleted))

        return self._run(f"delete {key} from the store", work, transfer=True)

    def pull_into_variable(self, key: str, name: str | None = None) -> Future[None] | None:
        """Load ``key`` into the notebook's variable ``name`` (default: the key's last part)
        and ``name_meta``; only inside IPython."""
        shell = self.shell
        if shell is None:
            with self._lock:
                self._say("pull into a variable works inside IPython or Jupyter only", error=True)
            self._changed()
            return None
        name = name or variable_name(key)
        if not name.isidentifier() or keyword.iskeyword(name):
            with self._lock:
                self._say(f"{name!r} is not a Python variable name; choose another", error=True)
            self._changed()
            return None
        what = f"pull {key} into {name}"

        def work() -> None:
            pulled = self.manager.load(key)
            shell.push({name: pulled.obj, f"{name}_meta": pulled.meta})
            self._after_change(report.loaded_line(key, pulled.source, pulled.size, name))

        return self._run(what, work, transfer=True)

    # -- several keys ------------------------------------------------------------------

    def bulk(self, action: BulkAction) -> Future[None] | None:
        """Run ``action`` on the selected keys; refused up front (nothing done) when its plan
        says it cannot fit."""
        plan = self.plan(action)
        if plan.refusal is not None:
            with self._lock:
                self._say(plan.refusal, error=True)
            self._changed()
            return None
        what = report.bulk_line(plan)

        def work() -> None:
            result = run_bulk(self.manager, plan, progress=self._progress(what))
            self._after_change(report.bulk_result_line(result), error=bool(result.failed))

        return self._run(what, work, transfer=True)

    # -- keeping the table true --------------------------------------------------------

    def refresh_disc(self) -> None:
        """Re-read the disc use (local: the cache index only)."""
        with self._errors("reading the disc use"):
            disc = self.manager.disc(NEXT_TO_EVICT)
            with self._lock:
                self.disc = disc
        self._changed()

    def _after_change(self, message: str, *, error: bool = False) -> None:
        """After an action changed this machine's cache: new cached/persisted states for the
        loaded keys (from the index; the store is not asked), the disc, the message."""
        with self._lock:
            keys = [item.key for page in self.pages for item in page.keys]
            if self.details is not None:
                keys.append(self.details.key)
        states = self.manager.cache.states(keys)
        disc = self.manager.disc(NEXT_TO_EVICT)
        with self._lock:
            for n, page in enumerate(self.pages):
                fresh = [item.seen_by(states.get(item.key)) for item in page.keys]
                self.pages[n] = dataclasses.replace(page, keys=fresh)
            if self.details is not None:
                key = self.details.key
                self.details = dataclasses.replace(
                    self.details,
                    cached=key in states,
                    persist=key in states and states[key].persist,
                    outdated=key in states and states[key].etag != self.details.etag,
                )
            self.disc = disc
            self._say(message, error=error)


class _Guard:
    """Turns a failure into the model's one-line message (never a traceback): the panel
    stays usable. Unexpected errors are logged (at debug level) with their traceback."""

    def __init__(self, model: PanelModel, what: str) -> None:
        self.model = model
        self.what = what

    def __enter__(self) -> None:
        with self.model._lock:
            self.before = (self.model.message, self.model.error)

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            with self.model._lock:  # an old failure is over once something succeeds
                if self.model.error and (self.model.message, True) == self.before:
                    self.model._say("")
            return False
        if not isinstance(exc, Exception):
            return False
        if not isinstance(exc, DamanError):
            log.debug("panel: %s failed", self.what, exc_info=exc)
        with self.model._lock:
            self.model._say(self.model._errors_line(self.what, exc), error=True)
        return True
