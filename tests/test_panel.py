"""The panel without a browser: its view-model (``PanelModel``) driven on both backends (the
S3 one talks to moto's server on loopback), and the widget's controls checked as Python
objects. What a browser shows is in test_panel_browser.py."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from counting_store import CountingStore

import daman.panel_model as panel_model
from daman import Config, Manager, format_size
from daman.errors import NotCachedWarning, StoreUnavailableError
from daman.listing import LISTING_TTL
from daman.panel_model import PanelModel
from daman.store import open_store

KiB = 1024


class Flaky(CountingStore):
    """A real store, counted, that can be made unreachable (and reachable again)."""

    down = False

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise StoreUnavailableError("cannot reach the store (the test cut it). Try again.")
        return super()._call(name, *args, **kwargs)


@pytest.fixture
def counted(make_config):
    """A manager on the parametrised backend whose store calls are counted."""
    made = []

    def make(**fields: Any) -> tuple[Manager, Flaky]:
        config = make_config(**fields)
        store = Flaky(open_store(config))
        manager = Manager(config, store=store)
        made.append(manager)
        return manager, store

    yield make
    for manager in made:
        manager.close()


def model_of(manager: Manager, **kwargs: Any) -> PanelModel:
    model = PanelModel(manager, threaded=False, **kwargs)
    model.start()
    return model


def names(model: PanelModel) -> list[str]:
    return [row.name for row in model.rows]


def blob(n: int) -> bytes:
    return bytes(n)


# -- browsing --------------------------------------------------------------------------------


def test_opening_shows_the_first_level_sub_prefixes_first(counted) -> None:
    manager, store = counted()
    for key in ("team/a/v1", "team/b", "other", "zeta/x/y", "a-key"):
        manager.push(blob(10), key)
    store.calls.clear()
    model = model_of(manager)
    assert names(model) == ["team/", "zeta/", "a-key", "other"]
    assert store.calls["list_level"] == 1 and store.calls["list"] == 0  # one level, once
    assert model.summary == f"{manager.store.describe()}: 2 prefixes, 2 keys"
    assert model.breadcrumbs == [(manager.store.describe(), "")]
    assert model.message == "" and not model.error
    assert model.disc is not None and model.disc.entries == 5


def test_an_empty_store_says_so_as_every_listing_does(counted) -> None:
    manager, _ = counted()
    model = model_of(manager)
    assert model.rows == [] and model.summary == f"no keys in {manager.store.describe()}"


def test_navigating_into_a_prefix_and_back(counted) -> None:
    manager, _ = counted()
    for key in ("team/a/v1", "team/a/v2", "team/b", "other"):
        manager.push(blob(10), key)
    model = model_of(manager)
    model.open("team/")
    assert names(model) == ["a/", "b"]
    assert [row.key for row in model.rows] == [None, "team/b"]
    model.open("team/a/")
    assert names(model) == ["v1", "v2"]
    store = manager.store.describe()
    assert model.breadcrumbs == [(store, ""), ("team/", "team/"), ("a/", "team/a/")]
    model.open(model.breadcrumbs[1][1])
    assert names(model) == ["a/", "b"]


def test_rows_show_size_last_modified_and_where_the_key_is(counted) -> None:
    manager, _ = counted()
    manager.push(blob(3 * KiB), "k/persisted", persist=True)
    manager.push(blob(2 * KiB), "k/cached")
    manager.push(blob(1 * KiB), "k/stored")
    manager.delete("k/stored")  # the local copy only
    model = model_of(manager)
    model.open("k/")
    items = {row.name: row.item for row in model.rows}
    assert {name: (item.cached, item.persist) for name, item in items.items()} == {
        "cached": (True, False),
        "persisted": (True, True),
        "stored": (False, False),
    }
    assert all(item.size > n * KiB for n, item in zip((2, 3, 1), items.values(), strict=True))
    assert all(item.last_modified is not None for item in items.values())


def test_details_of_the_selected_key(counted) -> None:
    manager, _ = counted()
    manager.push({"x": 1}, "team/model", meta={"source": "tests"}, persist=True)
    model = model_of(manager)
    model.show("team/model")
    details = model.details
    assert model.focus == "team/model" and details is not None
    assert details.meta == {"source": "tests"} and details.persist
    assert len(details.sha256) == 64 and details.pushed_by and details.python
    assert model.snippet("team/model") == [
        'obj, meta = dm.pull("team/model")',
        "%dm_pull team/model",
    ]


def test_paging_shows_rows_a_page_at_a_time_and_asks_the_store_only_when_needed(
    counted, monkeypatch
) -> None:
    monkeypatch.setattr(panel_model, "PAGE_ROWS", 2)
    manager, store = counted()
    for n in range(7):
        manager.push(blob(1), f"many/k{n}")
    manager.push(blob(1), "many/sub/x")
    model = model_of(manager, store_page=3)  # the store answers 3 names per request
    store.calls.clear()
    model.open("many/")
    assert names(model) == ["k0", "k1"] and model.more
    assert store.calls["list_level"] == 1
    model.show_more()  # 4 rows, 3 loaded: the store's next page
    assert names(model) == ["k0", "k1", "k2", "k3"] and store.calls["list_level"] == 2
    model.show_more()  # 6 rows, 6 loaded: no request
    assert names(model) == [f"k{n}" for n in range(6)] and store.calls["list_level"] == 2
    model.show_more()  # the last page, which holds the sub-prefix: shown first
    assert names(model) == ["sub/", *(f"k{n}" for n in range(7))]
    assert store.calls["list_level"] == 3 and not model.more


def test_filter_narrows_on_the_store_or_among_the_loaded_rows(counted) -> None:
    manager, store = counted()
    for key in ("t/model-a", "t/model-b", "t/data", "t/models/x", "t/other-model"):
        manager.push(blob(1), key)
    model = model_of(manager)
    model.open("t/")
    store.calls.clear()
    model.set_filter("model", "starts with")
    assert names(model) == ["models/", "model-a", "model-b"]
    assert store.calls["list_level"] == 1  # asked the store for t/model*
    model.set_filter("")
    store.calls.clear()
    model.set_filter("model", "contains")
    assert names(model) == ["models/", "model-a", "model-b", "other-model"]
    assert store.calls["list_level"] == 0  # the loaded rows, filtered here
    model.set_filter("MODELS", "contains")
    assert names(model) == ["models/"]


def test_a_slash_in_the_filter_opens_that_level(counted) -> None:
    manager, _ = counted()
    manager.push(blob(1), "t/models/resnet")
    manager.push(blob(1), "t/models/vit")
    model = model_of(manager)
    model.set_filter("t/models/re", "starts with")
    assert model.prefix == "t/models/" and model.filter_text == "re"
    assert names(model) == ["resnet"]


# -- one key ---------------------------------------------------------------------------------


def test_persist_pins_a_cached_key_at_once(counted) -> None:
    manager, store = counted()
    manager.push(blob(KiB), "k")
    model = model_of(manager)
    store.calls.clear()
    model.set_persist("k", on=True)
    assert manager.cache.get("k").persist
    assert sum(store.calls.values()) == 0  # cached: pinned without asking the store
    assert model.rows[0].item.persist and model.disc.persisted == manager.cache.get("k").size
    assert not model.error and "persisted k" in model.message
    model.set_persist("k", on=False)
    assert not manager.cache.get("k").persist and not model.rows[0].item.persist


def test_persisting_a_key_not_cached_fetches_it_first(counted) -> None:
    manager, store = counted()
    manager.push(blob(50 * KiB), "big")
    manager.delete("big")
    model = model_of(manager)
    seen = []
    model.listen(lambda part: seen.append(model.transfer) if part == "transfer" else None)
    model.set_persist("big", on=True)
    entry = manager.cache.get("big")
    assert entry is not None and entry.persist
    assert store.calls["get"] == 1
    assert model.rows[0].item.cached and model.rows[0].item.persist
    assert seen and seen[-1].done == seen[-1].total == entry.size  # the panel's own progress


def test_a_pin_that_cannot_fit_is_refused_with_the_reason(counted) -> None:
    manager, store = counted(allocated_space=120 * KiB)
    manager.push(blob(70 * KiB), "pinned", persist=True)
    with pytest.warns(NotCachedWarning):
        manager.push(blob(60 * KiB), "second")  # does not fit beside it: not kept
    assert manager.cache.get("second") is None
    model = model_of(manager)
    store.calls.clear()
    model.set_persist("second", on=True)
    assert model.error
    assert "second" in model.message and "cannot be persisted" in model.message
    assert "allocated_space" in model.message and "\n" not in model.message
    assert store.calls["get"] == 0  # refused before downloading anything
    assert manager.cache.get("second") is None
    model.open("")  # still usable
    assert names(model) == ["pinned", "second"]


def test_pull_into_the_cache_and_delete_the_local_copy(counted) -> None:
    manager, _ = counted()
    manager.push(blob(20 * KiB), "k")
    manager.delete("k")
    model = model_of(manager)
    used = model.disc.used
    model.pull("k")
    assert manager.cache.get("k") is not None and model.rows[0].item.cached
    assert model.disc.used > used and "pulled k" in model.message
    model.delete_local("k")
    assert manager.cache.get("k") is None and not model.rows[0].item.cached
    assert model.disc.used == used and "it stays in the store; freed " in model.message
    assert manager.exists("k")


def test_a_pull_that_cannot_fit_is_refused_before_downloading(counted) -> None:
    manager, store = counted(allocated_space=50 * KiB)
    manager.push(blob(30 * KiB), "pinned", persist=True)
    with pytest.warns(NotCachedWarning):
        manager.push(blob(30 * KiB), "k")
    model = model_of(manager)
    store.calls.clear()
    model.pull("k")
    assert model.error and "cannot be cached" in model.message and store.calls["get"] == 0


def test_delete_from_the_store_asks_first_naming_the_key_and_its_size(counted) -> None:
    manager, _ = counted()
    manager.push(blob(40 * KiB), "team/old")
    model = model_of(manager)
    model.open("team/")
    size = model.rows[0].item.size
    model.ask_delete_remote("team/old")
    pending = model.confirmation
    assert pending is not None and pending.key == "team/old"
    assert f"team/old ({format_size(size)})" in pending.question
    assert "for everyone" in pending.question and "team/old" in pending.confirm_label
    assert manager.exists("team/old")  # nothing happened yet
    model.cancel()
    assert model.confirmation is None and manager.exists("team/old")
    model.ask_delete_remote("team/old")
    model.confirm()
    assert not manager.exists("team/old") and manager.cache.get("team/old") is None
    assert names(model) == [] and "deleted team/old" in model.message
    assert model.confirm() is None  # nothing pending any more


def test_pull_into_a_variable(counted, monkeypatch) -> None:
    manager, _ = counted()
    manager.push([1, 2, 3], "team/sales-2026", meta={"rows": 3})

    class Shell:
        user_ns: dict[str, Any] = {}

        def push(self, variables: dict[str, Any]) -> None:
            self.user_ns.update(variables)

    shell = Shell()
    monkeypatch.setattr(PanelModel, "shell", property(lambda self: shell))
    model = model_of(manager)
    model.pull_into_variable("team/sales-2026")
    assert shell.user_ns == {"sales_2026": [1, 2, 3], "sales_2026_meta": {"rows": 3}}
    model.pull_into_variable("team/sales-2026", "not a name")
    assert model.error and "not a Python variable name" in model.message


def test_pull_into_a_variable_outside_ipython_says_so(counted, monkeypatch) -> None:
    manager, _ = counted()
    monkeypatch.setattr(PanelModel, "shell", property(lambda self: None))
    model = model_of(manager)
    assert model.pull_into_variable("anything") is None
    assert model.error and "inside IPython" in model.message


# -- several keys ----------------------------------------------------------------------------


def test_bulk_actions_say_what_they_use_or_free_before_they_run(counted) -> None:
    manager, _ = counted()
    for key in ("b/1", "b/2", "b/3"):
        manager.push(blob(10 * KiB), key)
    manager.delete("b/1")
    manager.delete("b/2")
    model = model_of(manager)
    model.open("b/")
    model.select_all(on=True)
    assert model.selected == {"b/1", "b/2", "b/3"}
    sizes = {row.key: row.item.size for row in model.rows}
    pull = model.plan("pull")
    assert pull.keys == ["b/1", "b/2"] and pull.download == sizes["b/1"] + sizes["b/2"]
    assert model.plan("delete_local").frees == sizes["b/3"]
    model.bulk("pull")
    assert all(manager.cache.get(key) for key in sizes)
    assert all(row.item.cached for row in model.rows) and model.message == "pull: 2 keys done"
    pin = model.plan("pin")
    assert pin.download == 0 and pin.pins == sum(sizes.values())
    model.bulk("pin")
    assert all(manager.cache.get(key).persist for key in sizes)
    assert model.disc.persisted == sum(sizes.values())
    model.bulk("unpin")
    assert not any(manager.cache.get(key).persist for key in sizes)
    frees = model.plan("delete_local").frees
    used = model.disc.used
    model.bulk("delete_local")
    assert not any(manager.cache.get(key) for key in sizes)
    assert model.disc.used == used - frees and not model.error


def test_a_bulk_pin_that_cannot_fit_is_refused_and_nothing_is_done(counted) -> None:
    manager, store = counted(allocated_space=100 * KiB)
    for key in ("a", "b", "c"):
        manager.push(blob(40 * KiB), key)
    model = model_of(manager)
    model.select_all(on=True)
    plan = model.plan("pin")
    assert plan.refusal is not None and "cannot be persisted" in plan.refusal
    store.calls.clear()
    assert model.bulk("pin") is None
    assert model.error and model.message == plan.refusal
    assert not any(e.persist for e in manager.cache.entries()) and sum(store.calls.values()) == 0


def test_a_bulk_action_reports_the_keys_that_failed_and_does_the_others(counted) -> None:
    manager, _ = counted()
    for key in ("a", "b"):
        manager.push(blob(KiB), key)
        manager.delete(key)
    model = model_of(manager)
    model.select_all(on=True)
    manager.store.inner.delete("a")  # gone from the store behind the panel's back
    model.bulk("pull")
    assert manager.cache.get("b") is not None
    assert model.error and "1 key done, 1 failed: a: key 'a' not found" in model.message


# -- errors and threads ----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_is_one_line_and_the_panel_stays_usable(
    backend: str, tmp_path: Path, make_config
) -> None:
    if backend == "s3":
        config = make_config(
            endpoint_url=f"http://127.0.0.1:{_closed_port()}", max_attempts=1, connect_timeout=1
        )
    else:
        config = Config(storage_name=str(tmp_path / "unmounted"), local_dir=str(tmp_path / "c"))
    with Manager(config) as manager:
        model = model_of(manager)
        assert model.error and model.rows == []
        assert "\n" not in model.message and "Traceback" not in model.message
        assert ("cannot reach" if backend == "s3" else "does not exist") in model.message
        assert model.disc is not None  # the local side still shows
        model.select("k", on=True)
        assert model.selected == {"k"}


def test_after_a_failure_the_panel_recovers(counted) -> None:
    manager, store = counted()
    manager.push(blob(1), "k")
    model = model_of(manager)
    store.down = True
    model.refresh()
    assert model.error and model.message == "cannot reach the store (the test cut it). Try again."
    model.show("k")
    assert model.error and model.details is None
    store.down = False
    model.refresh()
    assert not model.error and model.message == ""  # a success clears the old error
    assert names(model) == ["k"]
    model.show("k")
    assert model.details is not None and not model.error


def test_an_unexpected_failure_is_one_line_too(counted, monkeypatch) -> None:
    manager, _ = counted()
    model = model_of(manager)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(manager, "ls_level", broken)
    model.refresh()
    assert model.message == "listing " + manager.store.describe() + " failed: RuntimeError: a bug"


def test_listing_and_transfers_run_off_the_callers_thread(counted) -> None:
    manager, _ = counted()
    manager.push(blob(1), "k")
    release = threading.Event()
    threads: list[str] = []
    real = manager.store.list_level

    def slow_list_level(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        assert release.wait(30)
        return real(*args, **kwargs)

    manager.store.list_level = slow_list_level  # type: ignore[method-assign]
    model = PanelModel(manager)  # threaded
    try:
        model.start()  # returns while the listing waits
        assert model.busy == f"listing {manager.store.describe()}" and model.rows == []
        model.select("k", on=True)  # the panel answers meanwhile
        assert model.selected == {"k"}
        release.set()
        model.wait()
        assert names(model) == ["k"] and model.busy is None
        model.set_persist("k", on=True)
        model.wait()
        assert manager.cache.get("k").persist
        assert threads and all(name.startswith("daman-panel") for name in threads)
    finally:
        release.set()
        model.close()


def test_a_listing_is_stamped_when_it_arrives_and_shared(counted) -> None:
    """A listing slower than the TTL is still fresh when stored: opening the level again
    at once (or completing a key in it) does not ask the store again."""
    manager, store = counted()
    manager.push(blob(1), "team/k")
    now = [1000.0]
    manager.listings.clock = lambda: now[0]
    real = store.inner.list_level

    def slow(*args: Any, **kwargs: Any) -> Any:
        now[0] += 3 * LISTING_TTL  # the listing takes three TTLs to arrive
        return real(*args, **kwargs)

    store.inner.list_level = slow  # type: ignore[method-assign]
    model = model_of(manager)
    assert store.calls["list_level"] == 1
    model.open("")
    assert store.calls["list_level"] == 1  # from the listing cache
    page = manager.listings.get("", None, model.store_page)
    assert page is not None and page.prefixes == ["team/"]
    model.refresh()  # refresh asks the store, whatever the cache holds
    assert store.calls["list_level"] == 2


# -- the widget ------------------------------------------------------------------------------


def _controls(widget: Any) -> list[Any]:
    import ipywidgets as w

    found = []
    for child in getattr(widget, "children", ()):
        if isinstance(child, (w.Button, w.ToggleButton, w.Checkbox, w.Text, w.ToggleButtons)):
            found.append(child)
        found += _controls(child)
    return found


def test_the_widget_draws_the_model_and_forwards_clicks(counted) -> None:
    import ipywidgets as w

    from daman.panel import Panel

    manager, _ = counted()
    manager.push(blob(KiB), "team/model/v3")
    manager.push(blob(KiB), "top")
    panel = Panel(manager, threaded=False)
    try:
        assert isinstance(panel, w.VBox)
        rows = panel._table.children
        assert [row.children[1].description for row in rows] == ["team/", "top"]
        rows[0].children[1].click()  # open team/
        rows[0].children[1].click()  # open team/model/
        assert panel.model.prefix == "team/model/"
        (row,) = panel._table.children
        toggle = row.children[3]
        assert toggle.description == "persist v3" and toggle.tooltip == "persist team/model/v3"
        toggle.value = True  # what a click in the browser does
        assert manager.cache.get("team/model/v3").persist
        assert "persisted" in row.children[2].value
        row.children[1].click()  # the key's details
        assert panel.model.focus == "team/model/v3"
        panel._delete_remote.click()
        assert panel._confirmation.layout.display is None
        assert "team/model/v3" in panel._question.value and manager.exists("team/model/v3")
        panel._cancel.click()
        assert manager.exists("team/model/v3")
        # Every control names what it acts on, by its text or its tooltip; none is an icon only.
        for control in _controls(panel):
            label = getattr(control, "description", "") or getattr(control, "tooltip", "")
            assert label and label.strip(), control
        for button in (panel._pull, panel._persist, panel._delete_local, panel._delete_remote):
            assert "team/model/v3" in button.description
    finally:
        panel.close()


# -- versions --------------------------------------------------------------------------------


def test_the_details_list_versions_with_pull_and_restore(counted) -> None:
    manager, _ = counted()
    manager.push(blob(KiB), "team/m", meta="first")
    manager.push(blob(2 * KiB), "team/m", meta="second", force=True)
    model = model_of(manager)
    model.open("team/")
    model.show("team/m")
    assert model.version_lines() == []  # asked for only: a key may have many versions
    model.show_versions("team/m")
    lines = model.version_lines()
    newest, oldest = (version for version, _ in lines)
    assert lines[0][1].startswith(f"* {newest}") and "'second'" in lines[0][1]
    assert lines[1][1].startswith(f"  {oldest}") and "'first'" in lines[1][1]

    model.pull_version("team/m", oldest)
    assert manager.cache.get("team/m", oldest) is not None and "pulled version" in model.message
    assert not model.error

    model.restore("team/m", oldest)
    assert not model.error and f"restored team/m to version {oldest}" in model.message
    assert manager.pull("team/m") == (blob(KiB), "first")
    lines = model.version_lines()  # read again: the restore is the newest, and current
    assert len(lines) == 3 and lines[0][1].startswith("* ") and f"from {oldest}" in lines[0][1]
    assert model.details is not None and model.details.meta == "first"

    model.show("other")  # another key's details: its versions are not those
    assert model.version_lines() == []


def test_the_widget_lists_versions_with_their_buttons(counted) -> None:
    from daman.panel import Panel

    manager, _ = counted()
    manager.push(blob(KiB), "k", meta="first")
    manager.push(blob(KiB), "k", meta="second", force=True)
    oldest = manager.history("k")[1].version
    panel = Panel(manager, threaded=False)
    try:
        panel._table.children[0].children[1].click()  # the key's details
        assert panel._versions.children == ()
        panel._show_versions.click()
        rows = panel._versions.children
        assert len(rows) == 2 and oldest in rows[1].children[0].value
        pull, restore = rows[1].children[1:]
        assert pull.description == "pull" and oldest in pull.tooltip
        pull.click()
        assert manager.cache.get("k", oldest) is not None
        restore.click()
        assert manager.pull("k")[1] == "first" and len(panel._versions.children) == 3
    finally:
        panel.close()
