"""The daman panel: one widget to browse the team's store and manage this machine's cache.

    import daman as dm
    dm.panel()                      # the default store; or %dm_panel, or Manager(...).panel()

:class:`Panel` is an ``ipywidgets.VBox`` that draws a :class:`~daman.panel_model.PanelModel`
and forwards clicks to it; it decides nothing. Core ipywidgets 8 widgets only: third-party
widget packages need JavaScript that fails to load offline, in VS Code and in some JupyterLab
installs. The model's workers call :meth:`Panel._draw` from their threads, which only sets
traits (ipywidgets' pattern for background work); nothing here uses ``with output:``.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as w

from . import report
from .bulk import BULK_ACTIONS
from .config import format_size
from .keys import variable_name
from .manager import Manager
from .panel_model import FILTER_MODES, PanelModel, Part, Row

__all__ = ["Panel", "PanelModel"]

# Core widgets take no CSS of their own beyond layout; one <style> element (an HTML widget's
# content, scoped to the panel's class) aligns the table and colours the disc bar.
_STYLE = """<style>
.daman-panel { font-size: 13px; }
.daman-panel .daman-name { text-align: left; justify-content: flex-start; overflow: hidden;
  text-overflow: ellipsis; font-family: var(--jp-code-font-family, monospace); }
.daman-panel .daman-row { align-items: center; border-bottom: 1px solid #eee; min-height: 30px; }
.daman-panel .daman-cols span { display: inline-block; padding: 0 0.5em; }
.daman-panel .daman-size { width: 6.5em; text-align: right; }
.daman-panel .daman-date { width: 9.5em; }
.daman-panel .daman-state { width: 5.5em; }
.daman-panel .daman-state-persisted { color: #0d47a1; font-weight: 600; }
.daman-panel .daman-state-cached { color: #1976d2; }
.daman-panel .daman-state-stored { color: #757575; }
.daman-panel .daman-head { color: #555; font-weight: 600; }
.daman-panel .daman-head .daman-hselect { width: calc(2em + 8px); padding: 0; }
.daman-panel .daman-head .daman-hname { width: calc(20em + 4px); padding: 0 0 0 12px;
  box-sizing: border-box; }
.daman-panel .daman-bar { display: flex; height: 12px; width: 100%; max-width: 36em;
  background: #e6e6e6; border-radius: 3px; overflow: hidden; margin: 2px 0 4px 0; }
.daman-panel .daman-bar-persisted { background: #0d47a1; }
.daman-panel .daman-bar-cached { background: #64b5f6; }
.daman-panel .daman-muted { color: #666; }
.daman-panel .daman-error { color: #b00020; font-weight: 600; }
.daman-panel .daman-ok { color: #1b5e20; }
.daman-panel .daman-details td { padding: 1px 8px 1px 0; vertical-align: top;
  word-break: break-all; }
.daman-panel .daman-details td:first-child { color: #555; white-space: nowrap; }
.daman-panel pre.daman-snippet { user-select: all; background: #f5f5f5; padding: 4px 6px;
  margin: 4px 0; white-space: pre-wrap; }
</style>"""
_AUTO = {"width": "auto"}
_PREFIX_INFO = '<span class="daman-size"></span><span class="daman-muted">prefix</span>'
_HIDDEN = "none"


def _e(text: object) -> str:
    return html.escape(str(text))


class _RowView:
    """The widgets of one table row; kept and reused from view to view, since creating
    widgets costs far more than changing their values."""

    def __init__(self, panel: Panel) -> None:
        self._panel = panel
        self.row: Row | None = None
        self.select = w.Checkbox(value=False, indent=False, layout=w.Layout(width="2em"))
        self.name = w.Button(layout=w.Layout(width="20em"))
        self.name.add_class("daman-name")
        self.info = w.HTML()
        self.info.add_class("daman-cols")
        self.persist = w.ToggleButton(layout=w.Layout(**_AUTO))
        self.box = w.HBox([self.select, self.name, self.info, self.persist])
        self.box.add_class("daman-row")
        self.select.observe(self._on_select_value, names="value")
        self.name.on_click(self._on_name_click)
        self.persist.observe(self._on_persist_value, names="value")

    def draw(self, row: Row, *, selected: bool, focused: bool) -> None:
        self.row = row
        item = row.item
        if item is None:  # a sub-prefix: opens on click, nothing to select or persist
            self.select.layout.visibility = "hidden"
            self.persist.layout.visibility = "hidden"
            self.select.value = False
            self.select.tooltip = self.persist.tooltip = f"{row.prefix} is a prefix"
            self.name.description = row.name
            self.name.tooltip = f"open {row.prefix}"
            self.name.button_style = ""
            self.info.value = _PREFIX_INFO
            return
        state = report.state(item)
        self.select.layout.visibility = "visible"
        self.persist.layout.visibility = "visible"
        self.select.value = selected
        self.select.tooltip = f"select {item.key}"
        self.name.description = row.name
        self.name.tooltip = f"details of {item.key}"
        self.name.button_style = "info" if focused else ""
        self.info.value = (
            f'<span class="daman-size">{format_size(item.size)}</span>'
            f'<span class="daman-date">{_e(report.when(item.last_modified))}</span>'
            f'<span class="daman-state daman-state-{state}">{state}</span>'
        )
        self.persist.value = item.persist
        self.persist.description = f"persist {row.name}"
        self.persist.tooltip = (
            f"unpersist {item.key} (eviction may remove it again)"
            if item.persist
            else f"persist {item.key}" + ("" if item.cached else " (pulls it first)")
        )

    def _on_select_value(self, change: dict[str, Any]) -> None:
        if self._panel._drawing() or self.row is None or self.row.key is None:
            return
        self._panel.model.select(self.row.key, on=change["new"])

    def _on_name_click(self, _: w.Button) -> None:
        if self.row is None:
            return
        if self.row.prefix is not None:
            self._panel.model.open(self.row.prefix)
        elif self.row.key is not None:
            self._panel.model.show(self.row.key)

    def _on_persist_value(self, change: dict[str, Any]) -> None:
        if self._panel._drawing() or self.row is None or self.row.key is None:
            return
        self._panel.model.set_persist(self.row.key, on=change["new"])


class Panel(w.VBox):
    """The daman panel on ``manager``: browse the store a level at a time, see this
    machine's disc use, pull, persist and delete keys, alone or several at once."""

    def __init__(self, manager: Manager, *, threaded: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_class("daman-panel")
        self.model = PanelModel(manager, threaded=threaded)
        self._local = threading.local()
        self._rows: list[_RowView] = []
        self._made: list[w.Widget] = []

        self._title = w.HTML()
        self._refresh = w.Button(description="refresh", icon="refresh", layout=_layout())
        self._disc = w.HTML()
        self._status = w.HTML()
        self._progress_bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="16em"))
        self._progress_text = w.HTML()
        self._progress = w.HBox([self._progress_bar, self._progress_text])
        self._question = w.HTML()
        self._confirm = w.Button(
            description="delete from the store", button_style="danger", layout=_layout()
        )
        self._cancel = w.Button(description="cancel", layout=_layout())
        self._confirmation = w.HBox([self._question, self._confirm, self._cancel])
        self._crumbs = w.HBox()
        self._filter = w.Text(
            description="filter", placeholder="a name, then Enter", continuous_update=False
        )
        self._filter_mode = w.ToggleButtons(
            options=list(FILTER_MODES),
            tooltips=[
                "list only names starting with the text (asks the store)",
                "keep the loaded names containing the text",
            ],
            tooltip="how the filter matches names",
            style={"button_width": "auto"},
        )
        self._summary = w.HTML()
        self._select_all = w.Checkbox(
            description="select all keys shown", indent=False, layout=_layout()
        )
        self._head = w.HTML(
            '<span class="daman-cols daman-head"><span class="daman-hselect"></span>'
            '<span class="daman-hname">name</span><span class="daman-size">size</span>'
            '<span class="daman-date">last modified</span><span class="daman-state">status'
            "</span></span>"
        )
        self._table = w.VBox()
        self._more = w.Button(description="show more", layout=_layout())
        self._bulk_text = w.HTML()
        self._bulk_buttons = {
            action: w.Button(
                description=f"{action.replace('_', ' ')} the selected keys", layout=_layout()
            )
            for action in BULK_ACTIONS
        }
        self._bulk = w.VBox([self._bulk_text, _wrapping(list(self._bulk_buttons.values()))])
        self._details_text = w.HTML()
        self._pull = w.Button(description="pull into the cache", layout=_layout())
        self._persist = w.ToggleButton(description="persist", layout=_layout())
        self._delete_local = w.Button(description="delete the local copy", layout=_layout())
        self._delete_remote = w.Button(
            description="delete from the store...", button_style="danger", layout=_layout()
        )
        self._snippet = w.HTML()
        self._variable = w.Text(description="variable", layout=w.Layout(width="16em"))
        self._pull_variable = w.Button(description="pull into the variable", layout=_layout())
        self._variable_box = w.HBox([self._variable, self._pull_variable])
        self._show_versions = w.Button(description="versions", layout=_layout())
        self._versions = w.VBox()
        self._versions_of: object = None  # the history the version rows were drawn from
        self._details = w.VBox(
            [
                self._details_text,
                _wrapping([self._pull, self._persist]),
                _wrapping([self._delete_local, self._delete_remote]),
                self._snippet,
                self._variable_box,
                self._show_versions,
                self._versions,
            ],
            layout=w.Layout(min_width="24em", flex="1 1 28em", padding="0 0 0 12px"),
        )
        browse = w.VBox(
            [
                self._crumbs,
                w.HBox([self._filter, self._filter_mode]),
                w.HBox([self._summary, self._select_all], layout=w.Layout(align_items="center")),
                self._head,
                self._table,
                self._more,
                self._bulk,
            ],
            layout=w.Layout(flex="3 1 40em"),
        )
        self.children = [
            w.HTML(_STYLE),
            w.HBox([self._title, self._refresh], layout=w.Layout(align_items="center")),
            self._disc,
            self._status,
            self._progress,
            self._confirmation,
            w.HBox([browse, self._details], layout=w.Layout(flex_flow="row wrap")),
        ]

        self._refresh.on_click(self._on_refresh_click)
        self._confirm.on_click(self._on_confirm_click)
        self._cancel.on_click(self._on_cancel_click)
        self._filter.observe(self._on_filter_value, names="value")
        self._filter_mode.observe(self._on_filter_mode_value, names="value")
        self._select_all.observe(self._on_select_all_value, names="value")
        self._more.on_click(self._on_more_click)
        for button in self._bulk_buttons.values():
            button.on_click(self._on_bulk_click)
        self._pull.on_click(self._on_pull_click)
        self._persist.observe(self._on_persist_value, names="value")
        self._delete_local.on_click(self._on_delete_local_click)
        self._delete_remote.on_click(self._on_delete_remote_click)
        self._pull_variable.on_click(self._on_pull_variable_click)
        self._show_versions.on_click(self._on_show_versions_click)

        self.model.listen(self._draw)
        self._draw("all")
        self.model.start()

    # -- drawing ----------------------------------------------------------------------

    def _drawing(self) -> bool:
        """Whether this thread is drawing: trait changes made by drawing are not clicks."""
        return getattr(self._local, "drawing", False)

    def _draw(self, part: Part) -> None:
        self._local.drawing = True
        try:
            self._draw_progress()
            if part == "all":
                self._draw_all()
        finally:
            self._local.drawing = False

    def _draw_progress(self) -> None:
        transfer = self.model.transfer
        if transfer is None or not transfer.total:
            self._progress.layout.display = _HIDDEN
            return
        self._progress.layout.display = None
        self._progress_bar.value = transfer.done / transfer.total
        self._progress_bar.description = ""
        self._progress_text.value = (
            f"{_e(transfer.what)}: {format_size(transfer.done)} of {format_size(transfer.total)}"
        )

    def _draw_all(self) -> None:
        model = self.model
        where = model.prefix or model.store_name
        self._title.value = f"<b>daman</b> <span class='daman-muted'>{_e(model.store_name)}</span>"
        self._refresh.tooltip = f"list {where} again and re-read this machine's disc use"
        self._draw_disc()
        if model.busy:
            self._status.value = f"<span class='daman-muted'>{_e(model.busy)} ...</span>"
        elif model.message:
            style = "daman-error" if model.error else "daman-ok"
            prefix = "error: " if model.error else ""
            self._status.value = f"<span class='{style}'>{_e(prefix + model.message)}</span>"
        else:
            self._status.value = ""
        pending = model.confirmation
        self._confirmation.layout.display = None if pending else _HIDDEN
        if pending:
            self._question.value = f"<b>{_e(pending.question)}</b>"
            self._confirm.description = pending.confirm_label
            self._confirm.tooltip = pending.confirm_label
            self._cancel.description = f"cancel: keep {pending.key}"
            self._cancel.tooltip = f"keep {pending.key} in the store"
        self._draw_crumbs()
        self._filter.value = model.filter_text
        self._filter.tooltip = f"filter the names of {where}"
        self._filter_mode.value = model.filter_mode
        self._summary.value = f"<span class='daman-muted'>{_e(model.summary)}</span>"
        self._draw_table()
        self._more.layout.display = None if model.more else _HIDDEN
        self._more.description = f"show more of {where}"
        self._more.tooltip = f"show the next rows of {where}"
        self._draw_bulk()
        self._draw_details()

    def _draw_disc(self) -> None:
        disc = self.model.disc
        if disc is None:
            self._disc.value = ""
            return
        if disc.allocated:
            persisted = min(100.0, 100 * disc.persisted / disc.allocated)
            cached = min(100.0 - persisted, 100 * (disc.used - disc.persisted) / disc.allocated)
            bar = (
                f"<div class='daman-bar' title='{_e(report.disc_line(disc))}'>"
                f"<div class='daman-bar-persisted' style='width:{persisted:.2f}%'></div>"
                f"<div class='daman-bar-cached' style='width:{cached:.2f}%'></div></div>"
            )
        else:
            bar = ""
        self._disc.value = (
            f"<div><b>this machine</b>: {_e(report.disc_line(disc))} "
            f"<span class='daman-muted'>in {_e(disc.local_dir)}</span></div>{bar}"
            f"<div class='daman-muted'>"
            f"{_e(report.evict_line(disc.next_to_evict, cached=disc.entries))}</div>"
        )

    def _draw_crumbs(self) -> None:
        crumbs = self.model.breadcrumbs
        buttons = list(self._crumbs.children)
        while len(buttons) < len(crumbs):
            button = w.Button(layout=_layout())
            button.on_click(self._on_crumb_click)
            buttons.append(button)
        for button, (label, prefix) in zip(buttons, crumbs, strict=False):
            button.description = label
            button.tooltip = f"open {prefix or self.model.store_name}"
            button.button_style = "primary" if prefix == self.model.prefix else ""
            button._daman_prefix = prefix  # type: ignore[attr-defined]
        self._crumbs.children = buttons[: len(crumbs)]

    def _draw_table(self) -> None:
        model = self.model
        rows = model.rows
        while len(self._rows) < len(rows):
            self._rows.append(_RowView(self))
        for view, row in zip(self._rows, rows, strict=False):
            view.draw(
                row,
                selected=row.key in model.selected,
                focused=row.key is not None and row.key == model.focus,
            )
        self._table.children = [view.box for view in self._rows[: len(rows)]]
        keys = [row.key for row in rows if row.key is not None]
        self._select_all.layout.display = None if keys else _HIDDEN
        self._select_all.value = bool(keys) and all(key in model.selected for key in keys)

    def _draw_bulk(self) -> None:
        model = self.model
        chosen = model.selected_items
        self._bulk.layout.display = None if chosen else _HIDDEN
        if not chosen:
            return
        total = sum(item.size for item in chosen)
        self._bulk_text.value = (
            f"<b>{len(chosen)} selected</b> ({format_size(total)}); each button says what it "
            "will download, persist or free before it runs:"
        )
        for action, button in self._bulk_buttons.items():
            plan = model.plan(action)
            line = report.bulk_line(plan)
            button.description = line
            button.tooltip = plan.refusal or line
            button.layout.display = None if plan.keys else _HIDDEN
            button.button_style = "warning" if plan.refusal else ""

    def _draw_details(self) -> None:
        model = self.model
        key = model.focus
        self._details.layout.display = None if key else _HIDDEN
        if key is None:
            return
        details = model.details if model.details and model.details.key == key else None
        item = model.item(key)
        rows = [("key", key)]
        if details is not None:
            data = report.details_data(details)
            data["size"] = f"{format_size(details.size)} ({details.size:,} bytes)"
            data["last_modified"] = report.when(details.last_modified)
            data["status"] = report.state(details)
            meta = repr(details.meta)
            data["meta"] = meta if len(meta) <= 400 else meta[:400] + " ..."
            rows = [(name, data[name]) for name in _DETAIL_FIELDS]
        elif item is not None:
            rows += [("size", format_size(item.size)), ("status", report.state(item))]
        cells = "".join(f"<tr><td>{_e(name)}</td><td>{_e(value)}</td></tr>" for name, value in rows)
        self._details_text.value = f"<b>details</b><table class='daman-details'>{cells}</table>"
        cached = details.cached if details else bool(item and item.cached)
        persisted = details.persist if details else bool(item and item.persist)
        self._pull.description = f"pull {key} into the cache"
        self._pull.tooltip = f"download {key} into this machine's cache (no unpickling)"
        self._pull.disabled = cached
        self._persist.value = persisted
        self._persist.description = f"persist {key}"
        self._persist.tooltip = f"{'unpersist' if persisted else 'persist'} {key}"
        self._delete_local.description = f"delete the local copy of {key}"
        self._delete_local.tooltip = f"delete this machine's copy of {key} (it stays in the store)"
        self._delete_local.disabled = not cached
        self._delete_remote.description = f"delete {key} from the store..."
        self._delete_remote.tooltip = f"delete {key} from the store for everyone (asks first)"
        python, magic = report.snippet(key)
        self._snippet.value = (
            "<span class='daman-muted'>copy:</span>"
            f"<pre class='daman-snippet'>{_e(python)}</pre>"
            f"<pre class='daman-snippet'>{_e(magic)}</pre>"
        )
        in_ipython = model.shell is not None
        self._variable_box.layout.display = None if in_ipython else _HIDDEN
        if in_ipython:
            if getattr(self._variable, "_daman_key", None) != key:
                self._variable.value = variable_name(key)
                self._variable._daman_key = key  # type: ignore[attr-defined]
            self._variable.tooltip = f"the variable to pull {key} into"
            self._pull_variable.description = f"pull {key} into {self._variable.value}"
            self._pull_variable.tooltip = f"load {key} into the notebook variable"
        self._draw_versions(key)

    def _draw_versions(self, key: str) -> None:
        """The key's versions, each with pull and restore (drawn again only when the model
        holds another history)."""
        self._show_versions.description = f"versions of {key}"
        self._show_versions.tooltip = f"list every version of {key} (newest first)"
        history = self.model.history
        if history is self._versions_of:
            return
        self._versions_of = history
        rows: list[w.Widget] = []
        for version, line in self.model.version_lines():
            pull = w.Button(description="pull", layout=_layout(), tooltip=f"pull {version}")
            restore = w.Button(
                description="restore", layout=_layout(), tooltip=f"make {version} current again"
            )
            for button in (pull, restore):
                button._daman_version = version  # type: ignore[attr-defined]
            pull.on_click(self._on_version_pull_click)
            restore.on_click(self._on_version_restore_click)
            text = w.HTML(f"<pre class='daman-snippet'>{_e(line)}</pre>")
            rows.append(w.HBox([text, pull, restore], layout=w.Layout(align_items="center")))
        self._versions.children = rows

    # -- clicks -----------------------------------------------------------------------

    def _on_refresh_click(self, _: w.Button) -> None:
        self.model.refresh()

    def _on_crumb_click(self, button: w.Button) -> None:
        self.model.open(button._daman_prefix)  # type: ignore[attr-defined]

    def _on_filter_value(self, change: dict[str, Any]) -> None:
        if not self._drawing():
            self.model.set_filter(change["new"])

    def _on_filter_mode_value(self, change: dict[str, Any]) -> None:
        if not self._drawing():
            self.model.set_filter(self._filter.value, change["new"])

    def _on_select_all_value(self, change: dict[str, Any]) -> None:
        if not self._drawing():
            self.model.select_all(on=change["new"])

    def _on_more_click(self, _: w.Button) -> None:
        self.model.show_more()

    def _on_bulk_click(self, button: w.Button) -> None:
        for action, known in self._bulk_buttons.items():
            if known is button:
                self.model.bulk(action)

    def _on_confirm_click(self, _: w.Button) -> None:
        self.model.confirm()

    def _on_cancel_click(self, _: w.Button) -> None:
        self.model.cancel()

    def _on_pull_click(self, _: w.Button) -> None:
        if self.model.focus:
            self.model.pull(self.model.focus)

    def _on_persist_value(self, change: dict[str, Any]) -> None:
        if not self._drawing() and self.model.focus:
            self.model.set_persist(self.model.focus, on=change["new"])

    def _on_delete_local_click(self, _: w.Button) -> None:
        if self.model.focus:
            self.model.delete_local(self.model.focus)

    def _on_delete_remote_click(self, _: w.Button) -> None:
        if self.model.focus:
            self.model.ask_delete_remote(self.model.focus)

    def _on_show_versions_click(self, _: w.Button) -> None:
        if self.model.focus:
            self.model.show_versions(self.model.focus)

    def _on_version_pull_click(self, button: w.Button) -> None:
        if self.model.focus:
            self.model.pull_version(self.model.focus, button._daman_version)  # type: ignore[attr-defined]

    def _on_version_restore_click(self, button: w.Button) -> None:
        if self.model.focus:
            self.model.restore(self.model.focus, button._daman_version)  # type: ignore[attr-defined]

    def _on_pull_variable_click(self, _: w.Button) -> None:
        if self.model.focus:
            self.model.pull_into_variable(self.model.focus, self._variable.value.strip())

    def close(self) -> None:
        """Stop the workers and close every widget of the panel."""
        self.model.close()
        roots = [*self.children, *self._crumbs.children, *(view.box for view in self._rows)]
        for widget in {id(d): d for root in roots for d in _descendants(root)}.values():
            widget.close()
        super().close()


_DETAIL_FIELDS = (
    "key", "size", "status", "last_modified", "pushed_by", "pushed_at", "sha256", "python",
    "cloudpickle", "meta",
)  # fmt: skip


def _layout() -> w.Layout:
    """As wide as its text, never squeezed (a squeezed button cuts the key it names)."""
    return w.Layout(width="auto", flex="0 0 auto")


def _wrapping(children: list[w.Widget]) -> w.HBox:
    return w.HBox(children, layout=w.Layout(flex_flow="row wrap"))


def _descendants(widget: w.Widget) -> list[w.Widget]:
    found = [widget]
    for child in getattr(widget, "children", ()):
        found += _descendants(child)
    return found
