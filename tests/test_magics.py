"""The IPython magics, driven through a real ``InteractiveShell`` on both backends (the S3 one
talks to moto's server on loopback): each magic, its flags, what it does to the namespace,
both branches of ``%%dm_cache``, key completion and the one-line error display."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from counting_store import CountingStore
from IPython.core.completer import provisionalcompleter
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config as ShellConfig

import daman as dm
from daman.magics import COMPLETION_TTL, key_fragment, variable_name
from daman.store import open_store

LINE_MAGICS = {"dm_push", "dm_pull", "dm_ls", "dm_info", "dm_delete", "dm_status", "dm_panel",
               "dm_history"}  # fmt: skip


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    """A fresh IPython shell with ``%load_ext daman`` done; its history is in memory (the
    pull magic reads the running cell from it, as in Jupyter)."""
    saved = sys.modules["__main__"], sys.displayhook, sys.excepthook, warnings.filters[:]
    config = ShellConfig()
    config.HistoryManager.hist_file = ":memory:"
    config.InteractiveShell.colors = "nocolor"
    ip = InteractiveShell(config=config)
    ip.run_line_magic("load_ext", "daman")
    try:
        yield ip
    finally:
        atexit.unregister(ip.atexit_operations)
        ip.atexit_operations()  # ends the history session now, not at interpreter exit
        sys.modules["__main__"], sys.displayhook, sys.excepthook = saved[:3]
        warnings.filters[:] = saved[3]


@pytest.fixture
def configured(config: dm.Config) -> dm.Config:
    """The default manager (the one the magics use) on the parametrised backend."""
    return dm.configure(**config.to_dict())


@pytest.fixture
def local(tmp_path) -> dm.Config:
    """The default manager on the local backend only (for tests not about the store)."""
    return dm.configure(
        storage_name=str(tmp_path / "store"),
        service="local",
        local_dir=str(tmp_path / "cache"),
        progress=False,
    )


def run(ip: InteractiveShell, code: str) -> Any:
    """Run a cell as Jupyter does (stored in the history); return its value; fail on an
    exception that escaped to IPython (daman errors must not)."""
    result = ip.run_cell(code, store_history=True)
    assert result.error_before_exec is None and result.error_in_exec is None, result
    return result.result


def fail(ip: InteractiveShell, code: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a cell that must fail with a daman error; return the one line IPython showed for
    it (no traceback)."""
    result = ip.run_cell(code, store_history=True)
    assert isinstance(result.error_in_exec, dm.DamanError), result
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("daman: error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out
    return errors[0]


def completions(ip: InteractiveShell, text: str) -> list[str]:
    with provisionalcompleter():
        return [c.text for c in ip.Completer.completions(text, len(text))]


# -- the extension ---------------------------------------------------------------------------


def test_import_daman_does_not_import_ipython() -> None:
    code = "import sys, daman; print(sorted(m for m in sys.modules if m.startswith('IPython')))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_load_ext_registers_the_magics_and_loading_twice_is_harmless(shell) -> None:
    run(shell, "%load_ext daman")
    dm.load_ipython_extension(shell)  # directly, past %load_ext's own guard
    table = shell.magics_manager.magics
    assert set(table["line"]) >= LINE_MAGICS and "dm_cache" in table["cell"]
    ours = [m for m in shell.Completer.custom_matchers if "KeyCompleter" in repr(m)]
    assert len(ours) == 1


def test_unload_removes_the_magics_and_the_completer(shell, capsys) -> None:
    run(shell, "%unload_ext daman")
    assert not LINE_MAGICS & set(shell.magics_manager.magics["line"])
    assert "dm_cache" not in shell.magics_manager.magics["cell"]
    assert shell.Completer.custom_matchers == []
    shell.run_cell("%dm_ls")
    assert "UsageError: Line magic function `%dm_ls` not found" in capsys.readouterr().err
    run(shell, "%load_ext daman")
    assert set(shell.magics_manager.magics["line"]) >= LINE_MAGICS


def test_help_shows_the_flags(shell, capsys) -> None:
    run(shell, "%dm_pull?")
    out = capsys.readouterr().out
    assert "%dm_pull [--as VAR] [--force] [--persist] [--memory-only] [--mmap]" in out
    assert "[--version ID]" in out


# -- %dm_push and %dm_pull ---------------------------------------------------------------------


def test_push_then_pull_round_trip(shell, configured, capsys) -> None:
    run(shell, "import numpy as np\nprices = np.arange(12.0).reshape(3, 4)")
    run(shell, "%dm_push prices --key team/prices --meta \"{'rows': len(prices)}\"")
    assert capsys.readouterr().out.startswith("pushed prices to team/prices (")
    assert dm.info("team/prices").meta == {"rows": 3}

    run(shell, "del prices")
    assert run(shell, "%dm_pull team/prices") is None  # a bare pull shows nothing
    np.testing.assert_array_equal(shell.user_ns["prices"], np.arange(12.0).reshape(3, 4))
    assert shell.user_ns["prices_meta"] == {"rows": 3}
    out = capsys.readouterr().out
    assert out.startswith("pulled team/prices from the local cache (") and "Out[" not in out
    assert out.rstrip().endswith("into prices, prices_meta")


def test_push_key_defaults_to_the_variable_name(shell, configured) -> None:
    run(shell, "answer = {'value': 42}\n%dm_push answer")
    assert dm.pull("answer") == ({"value": 42}, None)


def test_push_without_force_refuses_an_existing_key_and_force_overwrites(
    shell, configured, capsys
) -> None:
    run(shell, "x = 1\n%dm_push x")
    err = fail(shell, "x = 2\n%dm_push x", capsys)
    assert "already exists" in err
    assert dm.pull("x")[0] == 1
    run(shell, "%dm_push x --force")
    assert dm.pull("x")[0] == 2


def test_push_persist_pins_the_local_copy(shell, local) -> None:
    run(shell, "x = 1\n%dm_push x --persist\ny = 2\n%dm_push y")
    assert [entry.key for entry in dm.usage().persisted] == ["x"]


def test_push_of_an_unknown_variable_pushes_nothing(shell, local, capsys) -> None:
    err = fail(shell, "%dm_push nothing_here", capsys)
    assert "no variable named 'nothing_here'" in err
    assert dm.ls() == []


@pytest.mark.parametrize(
    "expr, message",
    [("1/0", "ZeroDivisionError: division by zero"), ("undefined", "NameError")],
)
def test_push_whose_meta_expression_raises_pushes_nothing(
    shell, local, capsys, expr: str, message: str
) -> None:
    err = fail(shell, f"x = 1\n%dm_push x --meta {expr}", capsys)
    assert f"--meta {expr!r} raised" in err and message in err and "nothing was pushed" in err
    assert not dm.exists("x")


def test_push_meta_is_python_code_not_expanded_by_ipython(shell, local) -> None:
    run(shell, 'n = 5\nx = 1\n%dm_push x --meta "{n}"')  # a set, not IPython's "{n}" -> "5"
    assert dm.info("x").meta == {5}


def test_pull_line_expands_variables_like_other_magics(shell, configured) -> None:
    dm.push("A", "runs/a")
    # `line` is also a local variable name inside the magic: the user's must win.
    assert run(shell, "line = 'a'\n%dm_pull runs/{line}") is None  # bare: shows nothing
    assert shell.user_ns["a"] == "A"
    assert run(shell, "got = %dm_pull runs/$line\ngot") == "A"


def test_pull_default_variable_is_the_keys_last_part(shell, configured, capsys) -> None:
    dm.push([1, 2], "sales/2026-11", meta="m")
    run(shell, "%dm_pull sales/2026-11")
    assert shell.user_ns["_2026_11"] == [1, 2] and shell.user_ns["_2026_11_meta"] == "m"


@pytest.mark.parametrize(
    "key, name",
    [
        ("team/dataset/v1", "v1"),
        ("sales/2026-11", "_2026_11"),
        ("models/class", "class_"),
        ("a/None", "None_"),
        ("my data.csv", "my_data_csv"),
        ("données", "données"),
    ],
)
def test_variable_name(key: str, name: str) -> None:
    assert variable_name(key) == name and name.isidentifier()


def test_pull_as_assigns_the_named_variable(shell, configured) -> None:
    dm.push("hello", "k", meta={"m": 1})
    run(shell, "%dm_pull k --as greeting")
    assert shell.user_ns["greeting"] == "hello" and shell.user_ns["greeting_meta"] == {"m": 1}


def test_assignment_form_returns_the_object(shell, configured) -> None:
    dm.push({"a": 1}, "team/thing")
    run(shell, "got = %dm_pull team/thing")
    assert shell.user_ns["got"] == {"a": 1}
    assert shell.user_ns["thing"] is shell.user_ns["got"]  # the default variable is set too
    assert run(shell, "%dm_pull team/thing --as other") is None


def test_pull_says_whether_it_came_from_the_cache_or_the_store(shell, configured, capsys):
    dm.push(np.zeros(1000), "k")
    dm.delete("k")  # the local copy only
    capsys.readouterr()
    run(shell, "%dm_pull k")
    assert capsys.readouterr().out.startswith("pulled k from the store (8.")  # ~8 KiB
    run(shell, "%dm_pull k")
    assert capsys.readouterr().out.startswith("pulled k from the local cache (8.")
    run(shell, "%dm_pull k --force")
    assert capsys.readouterr().out.startswith("pulled k from the store (8.")


def test_pull_flags_persist_and_memory_only(shell, configured, capsys) -> None:
    dm.push("v", "k")
    dm.delete("k")
    run(shell, "%dm_pull k --memory-only")
    out = capsys.readouterr().out
    assert out.startswith("pulled k from the store (") and "B) into k, k_meta" in out
    assert dm.usage().entries == [] and shell.user_ns["k"] == "v"
    run(shell, "%dm_pull k --persist")
    assert [entry.key for entry in dm.usage().persisted] == ["k"]
    err = fail(shell, "%dm_pull k --persist --memory-only", capsys)
    assert "memory_only" in err


@pytest.mark.parametrize(
    "line, message",
    [
        ("%dm_pull no/such/key", "key 'no/such/key' not found"),
        ("%dm_pull a//b", "invalid key 'a//b'"),
        ("%dm_info no/such/key", "key 'no/such/key' not found"),
        ("%dm_delete no/such/key", "key 'no/such/key' not found"),
        ("%dm_ls a//", "invalid key"),
        ("%%dm_cache a//b x\nx = 1", "invalid key 'a//b'"),
    ],
)
def test_daman_errors_show_as_one_line(shell, configured, capsys, line, message) -> None:
    err = fail(shell, line, capsys)
    assert message in err
    assert not {"no", "key", "b", "x"} & set(shell.user_ns)


@pytest.mark.parametrize(
    "line",
    [
        "%dm_push x",
        "%dm_pull k",
        "%dm_ls",
        "%dm_info k",
        "%dm_delete k",
        "%dm_status",
        "%%dm_cache k x\nx = 1",
    ],
)
def test_every_magic_before_configuring_says_what_to_run(shell, capsys, line: str) -> None:
    run(shell, "x = 0")
    err = fail(shell, line, capsys)
    assert "dm_configure" in err
    assert shell.user_ns["x"] == 0  # %%dm_cache did not run its cell either


@pytest.mark.parametrize(
    "line, message",
    [
        ("%dm_pull", "the following arguments are required: key"),
        ("%dm_pull k --as 1x", "--as '1x' is not a valid Python variable name"),
        ("%dm_pull k --bogus", "unrecognized arguments: --bogus"),
        ("%dm_push x --meta \"{'a': 1}", "No closing quotation"),
        ("%dm_push not-a-name", "VAR 'not-a-name' is not a valid Python variable name"),
        ("%%dm_cache k\nx = 1", "the following arguments are required: VAR"),
        ("%%dm_cache k class\nx = 1", "VAR 'class' is not a valid Python variable name"),
        ("%dm_status --long", "unrecognized arguments: --long"),
        ("%dm_panel anything", "unrecognized arguments: anything"),
    ],
)
def test_bad_usage_is_a_usage_error(shell, local, capsys, line: str, message: str) -> None:
    shell.run_cell(line, store_history=True)
    err = capsys.readouterr().err
    assert err.startswith("UsageError: ") and message in err and "Traceback" not in err
    assert dm.ls() == []


# -- %dm_ls, %dm_info, %dm_delete, %dm_status, %dm_panel ----------------------------------------


def test_ls_lists_keys_with_size_and_state(shell, configured, capsys) -> None:
    dm.push(b"x" * 2000, "team/a")
    dm.push(1, "team/b", persist=True)
    dm.push(2, "other")
    dm.delete("other")
    capsys.readouterr()
    run(shell, "%dm_ls team/")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].startswith("2 keys, ") and lines[2].endswith("KiB")
    assert "KiB" in lines[0] and "  cached     team/a" in lines[0]
    assert lines[1].endswith("  persisted  team/b")
    run(shell, "%dm_ls")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines[:3]] == ["other", "team/a", "team/b"]
    assert lines[0].endswith("  -          other") and lines[3].startswith("3 keys, ")
    run(shell, "%dm_ls nothing/")
    assert capsys.readouterr().out.startswith("no keys under 'nothing/' in ")


def test_info_describes_a_key_without_pulling_it(shell, configured, capsys) -> None:
    dm.push(np.arange(10), "team/a", meta={"source": "test"})
    dm.delete("team/a")
    details = dm.info("team/a")
    capsys.readouterr()
    run(shell, "%dm_info team/a")
    out = capsys.readouterr().out
    assert out.startswith("key:           team/a\n")
    assert f"size:          {dm.format_size(details.size)} ({details.size} bytes)\n" in out
    assert f"sha256:        {details.sha256}\n" in out and "cached:        no\n" in out
    assert out.endswith("meta:          {'source': 'test'}\n")
    assert dm.usage().entries == []  # nothing was downloaded


def test_delete_local_copy_then_stored_object(shell, configured, capsys) -> None:
    dm.push(1, "k")
    run(shell, "%dm_delete k")
    assert capsys.readouterr().out == "deleted the local copy of k (it stays in the store)\n"
    assert dm.usage().entries == [] and dm.exists("k")
    run(shell, "%dm_delete k")  # "deleted" only when something was
    out = capsys.readouterr().out
    assert out == "k is not cached here: nothing deleted (it stays in the store)\n"
    run(shell, "%dm_delete k --remote")
    assert capsys.readouterr().out == "deleted k from the store (there was no local copy)\n"
    assert not dm.exists("k")
    dm.push(2, "k")
    run(shell, "%dm_delete k --remote")
    assert capsys.readouterr().out == "deleted k (the local copy and the stored object)\n"


def test_status_shows_the_store_and_the_cache(shell, configured, capsys) -> None:
    dm.push(1, "a", persist=True)
    dm.push(2, "b")
    capsys.readouterr()
    run(shell, "%dm_status")
    out = capsys.readouterr().out
    manager = dm.get_manager()
    assert out.startswith(f"store:      {manager.store.describe()}\n")
    assert f"local_dir:  {manager.config.cache_dir}\n" in out
    assert "entries:    2 cached, 1 persisted\n" in out and out.endswith("  a\n")


def test_status_json_is_what_dm_status_json_prints(shell, local, capsys) -> None:
    dm.push(1, "a", persist=True)
    capsys.readouterr()
    run(shell, "%dm_status --json")
    status = json.loads(capsys.readouterr().out)
    assert status["entries"] == 1 and status["persisted"][0]["key"] == "a"
    assert status["mapped"] == [] and status["store"] == dm.get_manager().store.describe()


def test_a_daman_warning_is_one_line_not_a_pointer_into_ipython(shell, local, capsys) -> None:
    warnings.simplefilter("default")  # not pytest's "error": see it as a notebook does
    dm.push(list(range(3)), "k")
    capsys.readouterr()
    run(shell, "%dm_pull k --memory-only --mmap")
    err = capsys.readouterr().err
    assert err.startswith("daman: warning: ") and err.count("\n") == 1, err
    assert "interactiveshell" not in err and "Warning:" not in err
    assert shell.user_ns["k"] == [0, 1, 2]


def test_panel_shows_the_panel_of_the_default_store(shell, local) -> None:
    from daman.panel import Panel

    dm.push(1, "team/a")
    panel = run(shell, "p = %dm_panel\np")
    try:
        assert isinstance(panel, Panel) and panel.model.manager is dm.get_manager()
        panel.model.wait()
        assert [row.name for row in panel.model.rows] == ["team/"]
    finally:
        panel.close()


def test_panel_without_a_configuration_says_so_in_one_line(shell, capsys) -> None:
    assert "not configured" in fail(shell, "%dm_panel", capsys)


# -- %%dm_cache --------------------------------------------------------------------------------

CELL = """%%dm_cache team/summary total mean
runs += 1
total = sum(data)
mean = total / len(data)
"""


def test_cell_cache_runs_the_cell_once_then_pulls(shell, configured, capsys) -> None:
    run(shell, "runs = 0\ndata = [1, 2, 3, 4]")
    run(shell, CELL)
    assert shell.user_ns["runs"] == 1 and shell.user_ns["mean"] == 2.5
    assert capsys.readouterr().out.startswith("team/summary: ran the cell and pushed total, mean")
    assert dm.pull("team/summary")[0] == {"total": 10, "mean": 2.5}
    assert dm.info("team/summary").meta["cell"].startswith("runs += 1\n")

    run(shell, "del total, mean\ndata = []")  # a division by zero if the cell ran again
    dm.delete("team/summary")  # as on a teammate's machine: only in the store
    run(shell, CELL)
    assert shell.user_ns["runs"] == 1  # not run
    assert (shell.user_ns["total"], shell.user_ns["mean"]) == (10, 2.5)
    out = capsys.readouterr().out
    assert out == "team/summary: set total, mean from the store (" + out.split("(", 1)[1]
    assert out.rstrip().endswith("; cell not run")
    run(shell, CELL)
    assert "from the local cache" in capsys.readouterr().out and shell.user_ns["runs"] == 1


def test_cell_cache_pushes_nothing_when_the_cell_raises(shell, local, capsys) -> None:
    shell.run_cell("%%dm_cache k x\nx = 1\nraise ValueError('boom')", store_history=True)
    captured = capsys.readouterr()
    assert "ValueError: boom" in captured.out + captured.err  # the cell's own traceback
    assert captured.out.endswith("daman: error: the cell failed; nothing was pushed to 'k'.\n")
    assert not dm.exists("k")


def test_cell_cache_pushes_nothing_when_a_variable_is_not_set(shell, local, capsys) -> None:
    err = fail(shell, "%%dm_cache k x y\nx = 1", capsys)
    assert "the cell did not set y; nothing was pushed" in err
    assert not dm.exists("k")


def test_cell_cache_on_a_key_that_holds_something_else(shell, local, capsys) -> None:
    dm.push([1], "plain")
    dm.push({"x": 1}, "cached")
    err = fail(shell, "%%dm_cache plain x\nx = 2", capsys)
    assert "'plain' holds a list, not variables" in err
    err = fail(shell, "%%dm_cache cached x y\nx = 2", capsys)
    assert "'cached' holds x, not y" in err
    assert "x" not in shell.user_ns


# -- completion --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("%dm_pull ", ""),
        ("%dm_pull te", "te"),
        ("%dm_pull --force team/a", "team/a"),
        ("x = %dm_pull team/", "team/"),
        ("%dm_info  sales", "sales"),
        ("%dm_delete --remote k", "k"),
        ("%%dm_cache te", "te"),
        ("%dm_pull k --as ", None),  # a variable name goes there
        ("%dm_pull k ", None),  # the key is already there
        ("%dm_pull --", None),
        ("%dm_push te", None),  # a variable, not a key
        ("%dm_ls te", None),
        ("print(1)", None),
        ("%dm_pullx te", None),
    ],
)
def test_key_fragment(line: str, fragment: str | None) -> None:
    found = key_fragment(line)
    assert (found and found[1]) == fragment if fragment is not None else found is None


def test_key_fragment_of_the_cell_magic_only_on_its_first_line() -> None:
    assert key_fragment("%%dm_cache te", first_line=False) is None
    assert key_fragment("%dm_pull te", first_line=False) == ("te", "te")


def test_completion_of_keys_one_part_at_a_time(shell, configured) -> None:
    for key in ("team/a/1", "team/a/2", "team/b", "other"):
        dm.push(0, key)
    assert completions(shell, "%dm_pull ") == ["other", "team/"]
    assert completions(shell, "%dm_pull te") == ["team/"]
    assert completions(shell, "%dm_info team/") == ["team/a/", "team/b"]
    assert completions(shell, "%dm_delete --remote team/a/") == ["team/a/1", "team/a/2"]
    assert completions(shell, "x = %dm_pull team/b") == ["team/b"]
    assert completions(shell, "%%dm_cache ot") == ["other"]
    with provisionalcompleter():
        (completion,) = shell.Completer.completions("%dm_pull te", 11)
    assert (completion.start, completion.end, completion.type) == (9, 11, "daman key")


@pytest.fixture
def counting(local, monkeypatch) -> Iterator[CountingStore]:
    """The magics' default manager with every store call counted."""
    store = CountingStore(open_store(local))
    manager = dm.Manager(local, store=store)
    monkeypatch.setattr(dm.api, "get_manager", lambda: manager)
    yield store
    manager.close()


def test_completion_lists_once_per_level_within_the_ttl(shell, counting) -> None:
    dm.get_manager().push(0, "team/a")
    now = [1000.0]
    dm.api.get_manager().listings.clock = lambda: now[0]  # the counting manager
    assert completions(shell, "%dm_pull ") == ["team/"]
    assert completions(shell, "%dm_pull t") == ["team/"]  # filters the level: no request
    assert counting.calls["list_level"] == 1
    now[0] += COMPLETION_TTL / 2
    assert completions(shell, "%dm_pull team/") == ["team/a"]  # another level: one request
    assert completions(shell, "%dm_pull team/") == ["team/a"]
    assert counting.calls["list_level"] == 2

    now[0] += COMPLETION_TTL
    assert completions(shell, "%dm_pull team/") == ["team/a"]
    assert counting.calls["list_level"] == 3

    run(shell, "x = 1\n%dm_push x --key team/x")  # a push makes the next keystroke list again
    assert completions(shell, "%dm_pull team/") == ["team/a", "team/x"]
    assert counting.calls["list_level"] == 4
    assert counting.calls["list"] == 0  # never the whole bucket


def test_ls_feeds_the_completion(shell, counting) -> None:
    dm.get_manager().push(0, "team/a")
    run(shell, "%dm_ls")
    assert completions(shell, "%dm_pull t") == ["team/"]
    assert completions(shell, "%dm_pull team/") == ["team/a"]
    assert counting.calls["list"] == 1 and counting.calls["list_level"] == 0


def test_completion_of_a_level_longer_than_a_page_asks_for_what_is_typed(
    shell, counting, monkeypatch
) -> None:
    monkeypatch.setattr(dm.magics, "LEVEL_PAGE", 3)
    for key in ("a", "b", "c", "k/1", "kx", "ky", "z"):
        dm.api.get_manager().push(0, key)
    assert completions(shell, "%dm_pull k") == ["k/", "kx", "ky"]
    assert counting.calls["list_level"] == 2  # the level (truncated), then the names "k..."
    assert completions(shell, "%dm_pull kx") == ["kx"]  # filters the "k" listing
    assert counting.calls["list_level"] == 2


def test_completion_does_not_wait_on_an_unreachable_store_at_every_tab(
    shell, local, monkeypatch
) -> None:
    manager = dm.get_manager()
    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise dm.StoreUnavailableError("cannot reach the store")

    monkeypatch.setattr(manager.store, "list_level", unreachable)
    assert completions(shell, "%dm_pull zzz_") == []
    assert completions(shell, "%dm_pull zzz_/zzz_") == []
    assert len(calls) == 1  # quiet for LISTING_TTL seconds after a failure
    manager.listings.clock = lambda: 1e12  # much later
    assert completions(shell, "%dm_pull zzz_/zzz_") == []
    assert len(calls) == 2


def test_completion_without_a_configuration_offers_no_keys(shell, capsys) -> None:
    assert completions(shell, "%dm_pull zzz_") == []
    assert capsys.readouterr().err == ""


def test_completion_leaves_other_lines_alone(shell, counting) -> None:
    shell.user_ns["my_variable"] = 1
    assert "my_variable" in completions(shell, "my_var")
    assert "%dm_pull" in completions(shell, "%dm_pu")
    assert counting.calls["list"] == counting.calls["list_level"] == 0


def test_completion_follows_a_new_configuration(shell, tmp_path) -> None:
    for name in ("one", "two"):
        dm.configure(storage_name=str(tmp_path / name), service="local", progress=False)
        dm.push(0, f"{name}/k")
        assert completions(shell, "%dm_pull ") == [f"{name}/"]  # within the TTL


@pytest.mark.parametrize("backend", ["local", "s3"])  # daman 0.2 knew S3 (and copies in folders)
def test_a_daman_02_object_is_pulled_described_and_marked(
    shell: InteractiveShell, configured: dm.Config, capsys: pytest.CaptureFixture[str]
) -> None:
    from legacy_helpers import put_02

    put_02(configured, "team/old_frame", {"rows": 3}, meta={"by": "0.2"})
    run(shell, "%dm_pull team/old_frame")
    assert shell.user_ns["old_frame"] == {"rows": 3}
    assert shell.user_ns["old_frame_meta"] == {"by": "0.2"}
    capsys.readouterr()
    run(shell, "%dm_info team/old_frame")
    assert "daman 0.2" in capsys.readouterr().out
    run(shell, "%dm_ls team/ --legacy")
    assert "daman 0.2" in capsys.readouterr().out


def test_history_and_pull_of_an_older_version(shell, local, capsys) -> None:
    dm.push([1], "team/a", meta="first")
    dm.push([2], "team/a", meta="second", force=True)
    newest, oldest = (v.version for v in dm.history("team/a"))
    capsys.readouterr()
    run(shell, "%dm_history team/a")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "team/a: 2 versions, newest first"
    assert lines[1].startswith(f"* {newest}") and "meta 'second'" in lines[1]
    assert lines[2].startswith(f"  {oldest}") and "meta 'first'" in lines[2]
    run(shell, f"%dm_pull team/a --version {oldest} --as a_old")
    assert shell.user_ns["a_old"] == [1] and shell.user_ns["a_old_meta"] == "first"
    error = fail(shell, "%dm_pull team/a --version 20200101T000000.000Z-0", capsys)
    assert "dm_history" in error
