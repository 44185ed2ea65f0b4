"""Bulk actions (daman/bulk.py): the plan, known before anything runs, as a table of cases;
running a plan on both backends, key by key, reporting each failure."""

from __future__ import annotations

import pytest

from daman import KeyListing, Manager, NotCachedError, report
from daman.bulk import plan_bulk, run_bulk


def item(key: str, size: int, state: str) -> KeyListing:
    return KeyListing(key, size, None, state != "stored", state == "persisted")


ITEMS = [item("s", 100, "stored"), item("c", 200, "cached"), item("p", 400, "persisted")]


@pytest.mark.parametrize(
    ("action", "keys", "download", "frees", "pins", "line"),
    [
        ("pin", ["s", "c"], 100, 0, 300, "persist 2 keys: downloads 100 B, persists 300 B"),
        ("unpin", ["p"], 0, 0, 400, "unpersist 1 key: lets eviction take 400 B again"),
        ("pull", ["s"], 100, 0, 0, "pull 1 key: downloads 100 B"),
        ("delete_local", ["c", "p"], 0, 600, 0, "delete 2 local copies: frees 600 B"),
    ],
)
def test_the_plan_says_what_an_action_will_do(action, keys, download, frees, pins, line) -> None:
    plan = plan_bulk(action, ITEMS, allocated=None, persisted=0)
    assert (plan.keys, plan.download, plan.frees, plan.pins) == (keys, download, frees, pins)
    assert plan.refusal is None and report.bulk_line(plan) == line


@pytest.mark.parametrize(
    ("action", "allocated", "persisted", "refused"),
    [
        ("pin", 1000, 400, False),  # 400 pinned + 300 more fits in 1000
        ("pin", 600, 400, True),
        ("pull", 500, 400, False),  # 100 to download beside 400 pinned
        ("pull", 450, 400, True),
        ("unpin", 1, 400, False),
        ("delete_local", 1, 400, False),
    ],
)
def test_the_plan_refuses_what_cannot_fit(action, allocated, persisted, refused) -> None:
    plan = plan_bulk(action, ITEMS, allocated=allocated, persisted=persisted)
    assert (plan.refusal is not None) == refused
    if refused:
        assert "allocated_space" in plan.refusal and "\n" not in plan.refusal


def test_nothing_to_do_is_said_so() -> None:
    plan = plan_bulk("unpin", ITEMS[:2], allocated=None, persisted=0)
    assert plan.keys == [] and report.bulk_line(plan) == "unpersist 0 keys: nothing to do"


def test_run_does_each_key_and_reports_the_ones_that_failed(manager: Manager) -> None:
    for key in ("a", "b", "c"):
        manager.push(b"x" * 1000, key)
        manager.delete(key)
    listing = manager.ls_level().keys
    manager.store.delete("b")  # gone behind the plan's back
    plan = plan_bulk("pin", listing, allocated=None, persisted=0)
    heard: list[tuple[int, int]] = []
    result = run_bulk(manager, plan, progress=lambda done, total: heard.append((done, total)))
    assert result.done == ["a", "c"] and [key for key, _ in result.failed] == ["b"]
    assert "not found" in result.failed[0][1]
    assert all(manager.cache.get(key).persist for key in ("a", "c"))
    assert heard[-1][0] == heard[-1][1] - listing[1].size  # b's bytes never came
    assert report.bulk_result_line(result).startswith("persist: 2 keys done, 1 failed: b: ")


def test_run_refuses_a_refused_plan(manager: Manager) -> None:
    plan = plan_bulk("pin", ITEMS, allocated=10, persisted=0)
    with pytest.raises(NotCachedError):
        run_bulk(manager, plan)
