"""The ``mapped`` section of bench/run.py: zero-copy cached pulls (``pull(key, mmap=True)``)
against ``pickle.load`` of the same data, each measurement in a fresh process so that its
memory is its own. The store is a local folder: a cached pull asks nothing of it (the local
store's freshness check reads the object's footer), and what is measured is the load.

    python bench/mapped.py CHILD_SPEC_JSON    # one measurement (what the section runs)

Rows: a cached pull of an array (mapped vs ``pickle.load`` of a pickle of it, both from the
page cache), the resident memory it adds, ``np.sum`` over the mapped array on first touch and
warm (vs the same over the array in memory), a DataFrame of numeric columns (mapped vs an
ordinary daman pull), and a signed cached pull (mapped vs ordinary).
"""

from __future__ import annotations

import gc
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SECRET = "bench signing key"


def _make(kind: str, nbytes: int) -> Any:
    import numpy as np

    if kind == "array":
        return np.random.default_rng(0).random(nbytes // 8)
    import pandas as pd

    columns = 8
    rows = nbytes // 8 // columns
    rng = np.random.default_rng(0)
    return pd.DataFrame({f"c{i}": rng.random(rows) for i in range(columns)})


def _manager(spec: dict[str, Any]) -> Any:
    from daman import Config, Manager

    config = Config(
        storage_name=spec["store"],
        service="local",
        local_dir=spec["cache"],
        progress=False,
        signing_key=SECRET if spec.get("signed") else None,
    )
    return Manager(config)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    sys.path.insert(0, str(HERE))
    import numpy as np
    from common import rss_now, rss_peak

    op, out = spec["op"], {}
    if op == "prepare":  # push the object, and write the baseline's pickle of it
        obj = _make(spec["kind"], spec["nbytes"])
        with _manager(spec) as manager:
            manager.push(obj, spec["key"], force=True)
        with open(spec["pickle"], "wb") as f:
            pickle.dump(obj, f, protocol=5)
        return {"size": spec["nbytes"]}
    for path in (spec["pickle"], *Path(spec["cache"]).glob("objects/*")):
        with open(path, "rb") as f:  # both sides read from the page cache
            while f.read(1 << 24):
                pass
    if spec["kind"] == "frame":
        import pandas  # noqa: F401 - imported untimed, as a notebook has it already
    manager = None if op == "pickle_load" else _manager(spec)  # made (and imported) untimed
    if manager is not None:
        manager.cache.get(spec["key"])  # and its index opened
    gc.collect()
    before = rss_now()
    start = time.perf_counter()
    if manager is None:
        with open(spec["pickle"], "rb") as f:
            obj = pickle.load(f)
    else:
        obj, _ = manager.pull(spec["key"], mmap=op == "pull_mmap")
    out["wall"] = time.perf_counter() - start
    out["rss_growth"] = rss_now() - before
    out["rss_peak_growth"] = rss_peak() - before
    if spec.get("sum") and spec["kind"] == "array":
        start = time.perf_counter()
        float(np.sum(obj))
        out["sum_first"] = time.perf_counter() - start
        start = time.perf_counter()
        float(np.sum(obj))
        out["sum_warm"] = time.perf_counter() - start
    return out


def section_mapped(ctx: Any, *, run_child: Any, interleaved: Any, row: Any) -> None:
    """Rows for the ``mapped`` section: ``run_child(spec) -> dict`` runs one child,
    ``row(what, baseline, ours, base, unit, target, target_text, paired)`` adds a row."""

    def side_rows(
        _ctx: Any, _section: str, what: str, baseline: str, results: dict[str, list[Any]],
        value: Any, unit: str, target: float | None, target_text: str, paired: bool = True,
    ) -> None:  # fmt: skip
        ours = [value(r) for r in results["daman"]]
        base = [value(r) for r in results["raw"]]
        row(what, baseline, ours, base, unit, target, target_text, paired)

    MiB = 1 << 20
    mib = 64 if ctx.quick else 1024
    label = f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"
    repeat = 3 if ctx.quick else 5
    work = ctx.work / "mapped"
    (work / "store").mkdir(parents=True)

    def spec(kind: str, op: str, **extra: Any) -> dict[str, Any]:
        return dict(
            kind=kind, op=op, nbytes=mib * MiB, key=f"bench/{kind}",
            store=str(work / "store"), cache=str(work / f"cache-{kind}"),
            pickle=str(work / f"{kind}.pkl"), **extra,
        )  # fmt: skip

    for kind in ("array", "frame"):
        run_child(spec(kind, "prepare"))

    # 1. the array: mapped pull vs pickle.load; its memory; np.sum over it
    results: dict[str, list[dict[str, Any]]] = {"raw": [], "daman": []}
    for _, side in interleaved(repeat, "raw", "daman"):
        op = "pickle_load" if side == "raw" else "pull_mmap"
        results[side].append(run_child(spec("array", op, sum=True)))
    ctx.log(f"mapped: array {results['daman'][-1]} vs {results['raw'][-1]}")
    baseline = "`pickle.load` of a pickle of it (page cache warm)"
    side_rows(ctx, "mapped", f"cached pull of a {label} array, `mmap=True`", baseline, results,
              lambda r: r["wall"], "s", 1 / 50, "<= 1/50 (>= 50x faster)")  # fmt: skip
    side_rows(ctx, "mapped", "its resident memory growth, over the array's size", "-", results,
              lambda r: r["rss_growth"] / (mib * MiB), "x size", None, "< 0.05 (daman)",
              paired=False)  # fmt: skip
    side_rows(ctx, "mapped", "`np.sum` over it, first touch (pages read from the page cache)",
              "`np.sum` over the array in memory", results, lambda r: r["sum_first"], "s", None,
              "")  # fmt: skip
    side_rows(ctx, "mapped", "`np.sum` over it, warm", "`np.sum` over the array in memory",
              results, lambda r: r["sum_warm"], "s", None, "")  # fmt: skip

    # 2. a DataFrame: mapped pull vs an ordinary daman pull
    results = {"raw": [], "daman": []}
    for _, side in interleaved(repeat, "raw", "daman"):
        results[side].append(run_child(spec("frame", "pull" if side == "raw" else "pull_mmap")))
    side_rows(ctx, "mapped", f"cached pull of a {label} DataFrame (8 float columns), mapped",
              "the same pull without `mmap`", results, lambda r: r["wall"], "s", None,
              "")  # fmt: skip

    # 3. with a signing key: mapped (signature + stream hash) vs ordinary (every byte)
    signed = {**spec("array", "prepare", signed=True), "key": "bench/signed"}
    run_child(signed)
    results = {"raw": [], "daman": []}
    for _, side in interleaved(repeat, "raw", "daman"):
        op = "pull" if side == "raw" else "pull_mmap"
        results[side].append(run_child({**signed, "op": op}))
    side_rows(ctx, "mapped", f"signed cached pull of the {label} array, mapped",
              "the same signed pull without `mmap` (hashes every byte)", results,
              lambda r: r["wall"], "s", None, "")  # fmt: skip
    ctx.note(
        "mapped",
        "A mapped pull reads the footer, the pickle stream and the meta, and maps the file: its "
        "time does not grow with the array. Its memory grows only as pages are touched "
        "(`np.sum` then reads them from the page cache).",
    )


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
