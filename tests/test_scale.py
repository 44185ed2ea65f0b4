"""One push / pull / delete costs the same whatever the number of keys: no listing of the store,
no scan of the cache index. Checked by counting store calls and by asking SQLite for the plan of
every statement an operation runs (not by timing)."""

from __future__ import annotations

import collections
import sqlite3
from pathlib import Path

import pytest
from counting_store import CountingStore

from daman import Config, Manager
from daman.store import open_store


def fill(manager: Manager, n: int) -> None:
    """``n`` small keys, in the store and in the cache."""
    for i in range(n):
        manager.push(i, f"fill/{i:05d}")


def traced(manager: Manager) -> list[str]:
    """Collect every SQL statement the manager's cache runs on this thread from now on."""
    statements: list[str] = []
    manager.cache._db().set_trace_callback(statements.append)
    return statements


def full_scans(db: sqlite3.Connection, statements: list[str]) -> list[str]:
    """Statements whose plan scans the entries or journal table (the one-row totals table and
    the statements SQLite cannot EXPLAIN, such as BEGIN/COMMIT, do not count)."""
    scans = []
    for sql in statements:
        if not sql.lstrip().upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE")):
            continue
        plan = db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        details = [row[-1] for row in plan]
        if any(d.startswith("SCAN") and ("entries" in d or "journal" in d) for d in details):
            scans.append(f"{sql} -> {details}")
    return scans


def operation_profile(config: Config, n: int) -> tuple[collections.Counter, list[str], list[str]]:
    """Store calls and SQL statements of a push, a cached pull, an uncached pull and a delete
    with ``n`` other keys present; evictions happen because the allocation is nearly full."""
    store = CountingStore(open_store(config))
    with Manager(config, store=store) as manager:
        fill(manager, n)
        assert len(manager.cache.entries()) < n  # the cache is full: the probe push evicts
        store.calls.clear()
        statements = traced(manager)
        manager.push("x", "probe")
        manager.pull("probe")
        manager.pull("probe", force=True)
        manager.delete("probe", remote=True)
        manager.cache._db().set_trace_callback(None)
        return store.calls, statements, full_scans(manager.cache._db(), statements)


@pytest.mark.parametrize("backend", ["local"])
def test_cost_does_not_grow_with_the_number_of_keys(make_config, tmp_path: Path) -> None:
    # Each filler entry is ~350 bytes on disc: an allocation of 1,200 bytes keeps the cache full and
    # evicting, so the eviction path is measured too.
    small = make_config(local_dir=str(tmp_path / "small"), allocated_space=1_200)
    calls_small, sql_small, scans_small = operation_profile(small, 5)
    large = make_config(
        local_dir=str(tmp_path / "large"), storage_name=str(tmp_path / "store2"),
        allocated_space=1_200,
    )  # fmt: skip
    (tmp_path / "store2").mkdir()
    calls_large, sql_large, scans_large = operation_profile(large, 400)
    assert calls_small == calls_large and "list" not in calls_large
    assert len(sql_small) == len(sql_large)
    assert scans_small == scans_large == []
