"""One action on several keys at once: pin, unpin, pull into the cache, delete local copies.

What an action will download, free or pin is known before it runs, from the listing alone
(:func:`plan_bulk`), so a front-end can say so before anyone clicks; :func:`run_bulk` then
acts key by key and reports each failure without stopping at the first.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Literal

from .config import format_size
from .errors import DamanError, NotCachedError
from .manager import Manager, TransferProgress
from .results import KeyListing

BulkAction = Literal["pin", "unpin", "pull", "delete_local"]
BULK_ACTIONS: tuple[BulkAction, ...] = ("pin", "unpin", "pull", "delete_local")


@dataclasses.dataclass(frozen=True)
class BulkPlan:
    """What one bulk action will do, before it runs."""

    action: BulkAction
    keys: list[str]
    """The keys it changes (pinning a persisted key changes nothing: it is left out)."""
    download: int
    """Bytes it downloads into the local cache."""
    frees: int
    """Bytes of local disc it frees."""
    pins: int
    """Bytes it persists (``pin``) or lets eviction take again (``unpin``)."""
    refusal: str | None = None
    """Why it cannot run, when that is known up front (None: it can)."""


@dataclasses.dataclass(frozen=True)
class BulkResult:
    plan: BulkPlan
    done: list[str]
    failed: list[tuple[str, str]]
    """``(key, the one-line reason)`` for each key that failed."""


def plan_bulk(
    action: BulkAction, items: Sequence[KeyListing], *, allocated: int | None, persisted: int
) -> BulkPlan:
    """The plan of ``action`` on ``items`` (listed keys), given the allocation and the bytes
    already persisted. Pinning refuses when the pinned bytes would exceed the allocation
    (persisted entries are never evicted); pulling refuses when the keys cannot all stay
    beside the persisted entries (each would evict the ones pulled before it)."""
    if action not in BULK_ACTIONS:
        raise ValueError(f"unknown bulk action {action!r}")
    if action == "pin":
        chosen = [i for i in items if not i.persist]
    elif action == "unpin":
        chosen = [i for i in items if i.persist]
    elif action == "pull":
        chosen = [i for i in items if not i.cached]
    else:
        chosen = [i for i in items if i.cached]
    download = sum(i.size for i in chosen if not i.cached) if action in ("pin", "pull") else 0
    frees = sum(i.size for i in chosen) if action == "delete_local" else 0
    pins = sum(i.size for i in chosen) if action in ("pin", "unpin") else 0
    refusal = None
    if allocated is not None and action in ("pin", "pull"):
        need = pins if action == "pin" else download
        if persisted + need > allocated:
            verb = "persisted" if action == "pin" else "kept in the cache together"
            refusal = (
                f"{len(chosen)} keys ({format_size(need)}) cannot be {verb}: allocated_space "
                f"is {format_size(allocated)} and persisted entries, which are never evicted, "
                f"hold {format_size(persisted)}. Select fewer keys, unpersist entries or raise "
                "allocated_space."
            )
    return BulkPlan(action, [i.key for i in chosen], download, frees, pins, refusal)


def run_bulk(
    manager: Manager, plan: BulkPlan, *, progress: TransferProgress | None = None
) -> BulkResult:
    """Carry out ``plan`` key by key; a key that fails is reported and the others go on.
    ``progress`` hears ``(bytes done, bytes to download)`` over the whole plan."""
    if plan.refusal is not None:
        raise NotCachedError(plan.refusal)
    done: list[str] = []
    failed: list[tuple[str, str]] = []
    moved = [0, 0]  # bytes of the keys finished, bytes of the key under way
    lock = threading.Lock()

    def key_progress(now: int, _total: int) -> None:
        with lock:
            moved[1] = now
            overall = moved[0] + now
        if progress is not None:
            progress(min(overall, plan.download), plan.download)

    for key in plan.keys:
        try:
            if plan.action == "pin":
                manager.pin(key, progress=key_progress)
            elif plan.action == "unpin":
                manager.set_persist(key, False)
            elif plan.action == "pull":
                manager.fetch(key, progress=key_progress)
            else:
                manager.delete(key, local=True)
        except DamanError as exc:
            failed.append((key, str(exc)))
        else:
            done.append(key)
        with lock:
            moved[0], moved[1] = moved[0] + moved[1], 0
    return BulkResult(plan, done, failed)
