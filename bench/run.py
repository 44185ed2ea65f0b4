"""daman's benchmark suite: what daman costs over raw boto3 + pickle, at any number of keys.

    python bench/run.py            # the full suite (about 11 minutes), writes bench/RESULTS.md
    python bench/run.py --quick    # smaller sizes, a smoke check (about 1 minute)

Runs against moto's S3 server on loopback, in its own process (bench/moto_server.py). Every
figure is a ratio to a baseline measured in the same run, with repetitions interleaved
(baseline, daman, daman, baseline, ...), reported as the median of the paired ratios with
their range, so that the noise of a shared machine hits both sides alike. Heavy measurements
(large arrays, peak RSS) each run in a fresh process (bench/child.py); the per-key ones run in
this process, in batches of operations. Sections (``--only``):

    large     push / pull (not cached) / pull (cached) of a 256 MiB array vs boto3 + pickle
    keys      1 KiB push and cached pull with 100,000 keys in bucket and cache vs 100 keys
    evict     1 KiB push into a full cache of 10,000 entries vs into an empty cache
    rss       peak RSS pushing / pulling a 1 GiB array, over the array's size
    panel     opening the panel (its first level) on 100,000 keys under 100 prefixes vs
              dm.ls() of the whole bucket: requests sent and time to the first table
    mapped    zero-copy cached pulls (``mmap=True``) of a 1 GiB array and DataFrame vs
              ``pickle.load`` / an ordinary pull; their memory; ``np.sum`` over them
    small, medium, local, shared
              everyday calls (issue 13): tiny and medium objects, commands that need no
              store, cache hits from several processes; see bench/everyday.py

``--profile [OP]`` adds a py-spy profile of one of daman's large-array operations (default: the
one with the worst ratio). ``--candidate DIR`` also measures the daman package in DIR (a
modified copy) in the large and rss sections, interleaved with the others, so that a change is
judged against the same baseline in the same run. Not part of the test suite: nothing here
asserts on time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import everyday
from common import (
    HERE,
    MotoServer,
    RequestCounter,
    Stopwatch,
    daman_config,
    raw_client,
    set_dummy_credentials,
)
from harness import Context, Row, ensure_bucket, format_requests, interleaved, per_op

MiB = 2**20
SECTIONS = ("large", "keys", "evict", "rss", "panel", "mapped", *everyday.SECTIONS)


@dataclasses.dataclass
class Sizes:
    large_mib: int
    large_repeat: dict[str, int]  # per operation: cheap ones get more pairs
    keys_small: int
    keys_large: int
    evict_entries: int
    batch: int
    small_repeat: int
    rss_mib: int
    rss_repeat: int
    panel_prefixes: int = 100
    panel_repeat: int = 3


FULL = Sizes(
    256, {"push": 7, "pull_uncached": 9, "pull_cached": 11}, 100, 100_000, 10_000, 100, 7, 1024, 2
)
QUICK = Sizes(
    32, {"push": 3, "pull_uncached": 3, "pull_cached": 5}, 100, 2_000, 1_000, 25, 3, 64, 1
)


# -- large: a 256 MiB array ------------------------------------------------------------------


def side_rows(
    ctx: Context,
    section: str,
    what: str,
    baseline: str,
    results: dict[str, list[dict[str, Any]]],
    value: Callable[[dict[str, Any]], float],
    unit: str,
    target: float | None,
    target_text: str,
    paired: bool = True,
) -> None:
    """Rows of daman (and of the candidate) against the raw baseline."""
    for side in ctx.sides[1:]:
        label = what if side == "daman" else f"{what} [candidate]"
        ctx.rows.append(
            Row(
                section,
                label,
                baseline,
                [value(r) for r in results[side]],
                [value(r) for r in results["raw"]],
                unit,
                target,
                target_text,
                paired,
            )
        )
    if ctx.candidate and paired:
        ctx.rows.append(
            Row(
                section,
                f"{what}: candidate over daman",
                "daman, same run",
                [value(r) for r in results["candidate"]],
                [value(r) for r in results["daman"]],
                unit,
            )
        )


def section_large(ctx: Context, profile: str | None) -> None:
    s = ctx.sizes
    nbytes = s.large_mib * MiB
    bucket = "bench-large"
    client = raw_client(ctx.server.endpoint)
    ensure_bucket(client, bucket)
    work = ctx.work / "large"
    work.mkdir()
    common = {"bucket": bucket, "work": str(work), "nbytes": nbytes}
    label = f"{s.large_mib} MiB"

    ctx.log(f"large: warm-up pushes of the {label} array (kept for the pulls)")
    for side in ctx.sides:
        ctx.child(side, op="push", key=f"{side}/obj", keep=True, **common)

    specs = {
        "push": (
            f"push of a {label} array",
            "`cloudpickle.dump` to a file + boto3 `upload_file`",
            1.10,
        ),
        "pull_uncached": ("pull of it, not cached", "boto3 `download_file` + `pickle.load`", 1.10),
        "pull_cached": (
            "pull of it, cached (current-check on)",
            "`pickle.load` of the same file + one HEAD",
            1.20,
        ),
    }
    for op, (what, baseline, target) in specs.items():
        results: dict[str, list[dict[str, Any]]] = {side: [] for side in ctx.sides}
        for rep, side in interleaved(s.large_repeat[op], *ctx.sides):
            key = f"{side}/push/{rep}" if op == "push" else f"{side}/obj"
            results[side].append(ctx.child(side, op=op, key=key, **common))
            ctx.log(f"large: {op} {side} rep {rep}: {results[side][-1]['wall']:.3f} s")
        side_rows(ctx, "large", what, baseline, results, lambda r: r["wall"], "s", target,
                  f"<= {target:.2f}x")  # fmt: skip
        side_rows(ctx, "large", f"{what}: client CPU (user + sys)", baseline, results,
                  lambda r: r["cpu"], "s", None, "")  # fmt: skip
        ctx.requests.append(
            (
                what,
                format_requests(results["daman"][-1]["requests"]),
                format_requests(results["raw"][-1]["requests"]),
            )
        )

    if profile:
        section_profile(ctx, common, profile)
    for side in ctx.sides:
        client.delete_object(Bucket=bucket, Key=f"{side}/obj")
    shutil.rmtree(work, ignore_errors=True)


def section_profile(ctx: Context, common: dict[str, Any], which: str) -> None:
    """py-spy on one daman operation of the large section: ``which``, or the one with the
    worst ratio (``worst``)."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        ctx.note("profile", "py-spy is not installed (`pip install py-spy`): no profile.")
        return
    if which == "worst":
        ops = {"push": "push", "not cached": "pull_uncached", "cached": "pull_cached"}
        timed = [r for r in ctx.rows if r.section == "large" and r.target is not None]
        worst = max(timed, key=lambda r: r.figure)
        op = next(op for word, op in ops.items() if word in worst.what)
    else:
        op = which
    repeat = 3 if op != "pull_cached" else 20
    (HERE / "profiles").mkdir(exist_ok=True)
    out = HERE / "profiles" / f"{op}.txt"
    svg = HERE / "profiles" / f"{op}.svg"
    spec = {
        "impl": "daman",
        "cache": str(Path(common["work"]) / "cache-daman"),
        "op": op,
        "key": "daman/obj",
        "repeat": repeat,
        "force": True,
        "keep": True,
        "endpoint": ctx.server.endpoint,
        **common,
    }
    child = [sys.executable, str(HERE / "child.py"), json.dumps(spec)]
    ctx.log(f"profile: py-spy record of daman {op} x{repeat}")
    for fmt, path in (("raw", out), ("flamegraph", svg)):
        result = subprocess.run(
            [pyspy, "record", "--idle", "-r", "250", "-f", fmt, "-o", str(path), "--", *child],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            ctx.note("profile", f"py-spy failed ({result.returncode}): {result.stderr[-500:]}")
            return
    ctx.note(
        "profile",
        f"daman `{op}` of the {ctx.sizes.large_mib} MiB array, {repeat} times in "
        f"one process, sampled by py-spy at 250 Hz with idle frames (`--idle`): "
        f"flame graph `bench/profiles/{svg.name}`, collapsed stacks `bench/profiles/{out.name}` "
        "(not committed).",
    )
    ctx.note("profile", summarise_profile(out))


def summarise_profile(path: Path, top: int = 14) -> str:
    """Share of the samples taken inside daman's push / pull (not imports or set-up) per
    function: own time (the leaf frame) and inclusive time."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [
            f"{f.split(' (')[0]} ({f.rsplit(' (', 1)[-1].split(':')[0]})"
            for f in stack.split(";")
            if f
        ]
        # The operation on the main thread, and daman's code on transfer threads.
        entry = [i for i, f in enumerate(frames) if f in _ENTRY_POINTS]
        if not entry and frames and frames[0].startswith("Thread._bootstrap "):
            entry = [i for i, f in enumerate(frames) if "(daman/" in f][:1]
        if not entry or any("_find_and_load" in f for f in frames):
            continue  # not daman, or botocore's lazy imports on a first request
        frames = frames[entry[0] :]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [
        f"{total} samples (of all threads) inside `Manager.push` / `Manager.pull` and "
        f"daman's transfer threads; top {top} by own time:",
        "",
        "| function | own | inclusive |",
        "|---|---|---|",
    ]
    for frame, n in own.most_common(top):
        share = f"{100 * n / total:.1f} % | {100 * inclusive[frame] / total:.1f} %"
        lines.append(f"| `{frame}` | {share} |")
    return "\n".join(lines)


_ENTRY_POINTS = {
    "Manager.push (daman/manager.py)",
    "Manager.pull (daman/manager.py)",
    "push (daman/manager.py)",
    "pull (daman/manager.py)",
}


# -- keys: flat at 100,000 keys -----------------------------------------------------------------


def fill_cache(ctx: Context, cache_dir: Path, count: int, size: int) -> float:
    """``count`` entries of ``size`` bytes in a daman cache, each through ``Cache.add``
    (as a push or pull adds them: journal, rename, index row, LRU)."""
    from daman.cache import Cache

    cache = Cache(cache_dir)
    src = cache_dir.parent / f"{cache_dir.name}.src"
    data = os.urandom(size)
    start = time.perf_counter()
    for i in range(count):
        src.write_bytes(data)
        cache.add(f"fill/{i:06d}", src, etag=f'"fill-{i}"', sha256="0" * 64)
        if (i + 1) % 20_000 == 0:
            ctx.log(f"  cache {cache_dir.name}: {i + 1} entries")
    elapsed = time.perf_counter() - start
    assert cache.usage().count == count
    cache.close()
    return elapsed


def batches(
    ctx: Context,
    sides: dict[str, Callable[[int], None]],
    counters: dict[str, RequestCounter],
    first: str,
    second: str,
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Per-operation seconds of each side, one batch per repetition, interleaved; and the
    requests per operation each side sent."""
    s = ctx.sizes
    times: dict[str, list[float]] = {first: [], second: []}
    sent: dict[str, collections.Counter[str]] = {
        first: collections.Counter(),
        second: collections.Counter(),
    }
    for side in (first, second):  # warm-up batch, not counted
        sides[side](-1)
        counters[side].take()
    for rep, side in interleaved(s.small_repeat, first, second):
        with Stopwatch() as sw:
            sides[side](rep)
        times[side].append(sw.wall / s.batch)
        sent[side].update(counters[side].take())
    ops = s.batch * s.small_repeat
    return times, {side: per_op(dict(c), ops) for side, c in sent.items()}


def section_keys(ctx: Context) -> None:
    from daman import Manager

    s = ctx.sizes
    client = raw_client(ctx.server.endpoint)
    raw_counter = RequestCounter(client)
    small, large = s.keys_small, s.keys_large
    managers: dict[int, Any] = {}
    for n in (small, large):
        bucket = f"keys-{n}"
        ensure_bucket(client, bucket)
        fill_seconds = ctx.server.fill(bucket, "fill/", n, 1024)
        ctx.log(f"keys: {n} keys of 1 KiB in s3://{bucket} ({fill_seconds:.1f} s in moto)")
        cache_dir = ctx.work / f"keys-cache-{n}"
        fill_seconds = fill_cache(ctx, cache_dir, n, 1024)
        ctx.log(f"keys: {n} entries in the cache ({fill_seconds:.1f} s)")
        ctx.note(
            "keys",
            f"{n:,} keys: bucket filled in moto's process; cache filled with "
            f"`Cache.add` of 1 KiB files in {fill_seconds:.1f} s "
            f"({1e3 * fill_seconds / n:.2f} ms per entry).",
        )
        managers[n] = Manager(daman_config(ctx.server.endpoint, bucket, cache_dir))
        managers[n].store.check()
    counters = {f"{n}": RequestCounter(m.store.client) for n, m in managers.items()}
    payload = os.urandom(1024)
    probes = [f"probe/{j:04d}" for j in range(s.batch)]
    for m in managers.values():
        for key in probes:
            m.push(payload, key)
    head_stats = {n: m.cache.usage().count for n, m in managers.items()}
    ctx.note(
        "keys",
        f"cache entries before timing: {head_stats}; each side also holds "
        f"{s.batch} probe keys pushed by daman, which the cached pulls read in turn.",
    )

    def pull_batch(n: int) -> Callable[[int], None]:
        def run(rep: int) -> None:
            for key in probes:
                managers[n].pull(key)

        return run

    def push_batch(n: int) -> Callable[[int], None]:
        def run(rep: int) -> None:
            for j in range(s.batch):
                managers[n].push(payload, f"new/{rep + 1:03d}/{j:04d}")  # distinct new keys

        return run

    pickled = ctx.work / "probe.pkl"
    pickled.write_bytes(pickle.dumps(payload, protocol=5))

    def raw_pull_batch(n: int) -> Callable[[int], None]:
        def run(rep: int) -> None:
            for key in probes:
                client.head_object(Bucket=f"keys-{n}", Key=key)
                with open(pickled, "rb") as f:
                    pickle.load(f)

        return run

    def raw_push_batch(n: int) -> Callable[[int], None]:
        def run(rep: int) -> None:
            body = pickle.dumps(payload, protocol=5)
            for j in range(s.batch):
                client.put_object(
                    Bucket=f"keys-{n}",
                    Key=f"rawnew/{rep + 1:03d}/{j:04d}",
                    Body=body,
                    IfNoneMatch="*",
                )

        return run

    a, b = f"{small}", f"{large}"
    cases = [
        ("pull of a 1 KiB object, cached", pull_batch, "pull"),
        ("push of a 1 KiB object (a new key)", push_batch, "push"),
    ]
    for what, make, kind in cases:
        ctx.log(f"keys: {what}, {small} vs {large} keys")
        times, sent = batches(ctx, {a: make(small), b: make(large)}, counters, a, b)
        ctx.rows.append(
            Row(
                "keys",
                f"{what}, {large:,} keys",
                f"the same with {small} keys in bucket and cache",
                [t * 1e3 for t in times[b]],
                [t * 1e3 for t in times[a]],
                "ms",
                1.5,
                "flat: <= 1.50x",
            )
        )
        ctx.requests.append((f"{what}, {large:,} keys", format_requests(sent[b]), ""))
        ctx.requests.append((f"{what}, {small} keys", format_requests(sent[a]), ""))
        raw = raw_pull_batch if kind == "pull" else raw_push_batch
        raw_what = (
            "boto3 HEAD + `pickle.load` of a 1 KiB file"
            if kind == "pull"
            else "boto3 `put_object` of 1 KiB (IfNoneMatch)"
        )
        ctx.log(f"keys: control, {raw_what}, {small} vs {large} keys")
        counters_raw = {a: raw_counter, b: raw_counter}
        raw_times, _ = batches(ctx, {a: raw(small), b: raw(large)}, counters_raw, a, b)
        ctx.rows.append(
            Row(
                "keys",
                f"control: {raw_what}, {large:,} keys",
                f"the same with {small} keys in the bucket",
                [t * 1e3 for t in raw_times[b]],
                [t * 1e3 for t in raw_times[a]],
                "ms",
            )
        )
        for n, side in ((small, a), (large, b)):
            ctx.rows.append(
                Row(
                    "keys",
                    f"{what}, {n:,} keys: daman over raw boto3",
                    raw_what,
                    [t * 1e3 for t in times[side]],
                    [t * 1e3 for t in raw_times[side]],
                    "ms",
                )
            )

    # An uncached small pull: its requests only.
    m = managers[small]
    m.cache.remove(probes[0])
    counters[a].take()
    m.pull(probes[0])
    ctx.requests.append(
        ("pull of a 1 KiB object, not cached", format_requests(counters[a].take()), "")
    )
    for m in managers.values():
        m.close()


# -- evict: a full cache -------------------------------------------------------------------------


def section_evict(ctx: Context) -> None:
    from daman import Manager
    from daman.cache import Cache

    s = ctx.sizes
    client = raw_client(ctx.server.endpoint)
    full_dir, empty_dir = ctx.work / "evict-full", ctx.work / "evict-empty"
    seconds = fill_cache(ctx, full_dir, s.evict_entries, 1024)
    cache = Cache(full_dir)
    allocated = cache.usage().used
    cache.close()
    ctx.log(f"evict: {s.evict_entries} entries in the full cache ({seconds:.1f} s)")
    managers = {}
    for name, folder in (("full", full_dir), ("empty", empty_dir)):
        ensure_bucket(client, f"evict-{name}")
        managers[name] = Manager(
            daman_config(ctx.server.endpoint, f"evict-{name}", folder, allocated_space=allocated)
        )
        managers[name].store.check()
    counters = {name: RequestCounter(m.store.client) for name, m in managers.items()}
    payload = os.urandom(1024)
    evicted = collections.Counter[str]()

    def push_batch(name: str) -> Callable[[int], None]:
        def run(rep: int) -> None:
            cache = managers[name].cache
            before = cache.usage().count
            for j in range(s.batch):
                managers[name].push(payload, f"new/{rep + 1:03d}/{j:04d}")
            if rep >= 0:
                evicted[name] += before + s.batch - cache.usage().count

        return run

    ctx.log("evict: pushes into the full cache vs the empty one")
    times, sent = batches(
        ctx, {"full": push_batch("full"), "empty": push_batch("empty")}, counters, "empty", "full"
    )
    pushes = s.batch * s.small_repeat
    ctx.rows.append(
        Row(
            "evict",
            f"push of 1 KiB that must evict, full cache of {s.evict_entries:,} entries",
            "push into an empty cache (same allocation)",
            [t * 1e3 for t in times["full"]],
            [t * 1e3 for t in times["empty"]],
            "ms",
            2.0,
            "<= 2.00x",
        )
    )
    ctx.requests.append(("push of 1 KiB that must evict", format_requests(sent["full"]), ""))
    ctx.note(
        "evict",
        f"allocation {allocated:,} bytes (the full cache's size); per push, entries "
        f"evicted: full cache {evicted['full'] / pushes:.2f}, empty cache "
        f"{evicted['empty'] / pushes:.2f}; full cache entries after: "
        f"{managers['full'].cache.usage().count:,}.",
    )
    for m in managers.values():
        m.close()


# -- rss: a 1 GiB array ------------------------------------------------------------------------


def section_rss(ctx: Context) -> None:
    s = ctx.sizes
    nbytes = s.rss_mib * MiB
    label = f"{s.rss_mib // 1024} GiB" if s.rss_mib >= 1024 else f"{s.rss_mib} MiB"
    bucket = "bench-rss"
    client = raw_client(ctx.server.endpoint)
    ensure_bucket(client, bucket)
    work = ctx.work / "rss"
    work.mkdir()
    common = {"bucket": bucket, "work": str(work), "nbytes": nbytes}
    ops = {
        "push": (f"peak RSS pushing a {label} array", "`cloudpickle.dump` + `upload_file`"),
        "pull_uncached": ("peak RSS pulling it, not cached", "`download_file` + `pickle.load`"),
        "pull_cached": ("peak RSS pulling it, cached", "HEAD + `pickle.load` of the file"),
    }
    for op, (what, baseline) in ops.items():
        results: dict[str, list[dict[str, Any]]] = {side: [] for side in ctx.sides}
        for rep, side in interleaved(s.rss_repeat, *ctx.sides):
            name = ("obj" if rep == 0 else f"push/{rep}") if op == "push" else "obj"
            r = ctx.child(side, op=op, key=f"{side}/{name}", keep=name == "obj", **common)
            results[side].append(r)
            ctx.log(
                f"rss: {op} {side} rep {rep}: peak {(r['rss_peak'] - r['rss_before']) / MiB:.0f}"
                f" MiB over {r['size'] / MiB:.0f} MiB, {r['wall']:.2f} s"
            )

        def over_size(r: dict[str, Any]) -> float:
            return (r["rss_peak"] - r["rss_before"]) / r["size"]

        side_rows(ctx, "rss", what, baseline, results, over_size, "x size", 1.3, "<= 1.30x size",
                  paired=False)  # fmt: skip
        side_rows(ctx, "rss", f"{what}: time", baseline, results, lambda r: r["wall"], "s", None,
                  "")  # fmt: skip
        ctx.requests.append(
            (
                what.replace("peak RSS ", ""),
                format_requests(results["daman"][-1]["requests"]),
                format_requests(results["raw"][-1]["requests"]),
            )
        )
    for side in ctx.sides:
        client.delete_object(Bucket=bucket, Key=f"{side}/obj")
    shutil.rmtree(work, ignore_errors=True)


# -- panel: browsing a large bucket ------------------------------------------------------------


def section_panel(ctx: Context) -> None:
    """The panel's first table against ``dm.ls()`` of the whole bucket, which is what key
    completion did before it listed levels. Each side starts with an empty listing cache."""
    from daman import Manager
    from daman.magics import KeyCompleter
    from daman.panel import Panel
    from daman.panel_model import PanelModel

    s = ctx.sizes
    keys, prefixes = s.keys_large, s.panel_prefixes
    bucket = "bench-panel"
    ensure_bucket(raw_client(ctx.server.endpoint), bucket)
    seconds = sum(
        ctx.server.fill(bucket, f"p{p:03d}/", keys // prefixes, 16) for p in range(prefixes)
    )
    ctx.log(f"panel: {keys:,} keys under {prefixes} prefixes in moto ({seconds:.1f} s)")
    manager = Manager(daman_config(ctx.server.endpoint, bucket, ctx.work / "panel-cache"))
    manager.store.check()
    counter = RequestCounter(manager.store.client)
    counter.take()
    sent: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def open_model() -> None:
        model = PanelModel(manager, threaded=False)
        model.start()
        assert len(model.rows) == prefixes and not model.error, model.message

    def open_widget() -> None:
        panel = Panel(manager, threaded=False)
        assert len(panel._table.children) == prefixes
        panel.close()

    def ls_all() -> None:
        assert len(manager.ls()) == keys

    def first_tab() -> None:
        assert KeyCompleter._names(manager, "p00") == [f"p{p:03d}/" for p in range(prefixes)]

    sides = {"model": open_model, "widget": open_widget, "ls": ls_all, "tab": first_tab}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for rep, side in interleaved(s.panel_repeat, *sides):
        manager.listings.forget()  # every measurement asks the store
        with Stopwatch() as sw:
            sides[side]()
        times[side].append(sw.wall)
        sent[side].update(counter.take())
        ctx.log(f"panel: {side} rep {rep}: {sw.wall:.3f} s")
    manager.close()
    what = f"{keys:,} keys under {prefixes} prefixes"
    for side, label in (
        ("model", f"open the panel, time to the first table (view-model), {what}"),
        ("widget", f"open the panel widget with its first table drawn (no browser), {what}"),
        ("tab", f"first TAB of `%dm_pull p00` (key completion), {what}"),
    ):
        ctx.rows.append(
            Row("panel", label, "`dm.ls()` of the whole bucket", times[side], times["ls"], "s")
        )
        ctx.requests.append((label, format_requests(per_op(dict(sent[side]), s.panel_repeat)), ""))
    ctx.requests.append(
        (f"`dm.ls()` of the whole bucket, {what}",
         format_requests(per_op(dict(sent["ls"]), s.panel_repeat)), "")
    )  # fmt: skip
    ctx.note(
        "panel",
        f"{what} of 16 bytes, filled in moto's process; {s.panel_repeat} repetitions of each "
        "side, interleaved, each with an empty listing cache (the panel's and completion's "
        "one listing request per level vs the 1,000-key pages of a full listing).",
    )


# -- reporting -------------------------------------------------------------------------------


def run_mapped(ctx: Context) -> None:
    """Zero-copy cached pulls (bench/mapped.py), each measurement in a fresh process."""
    from mapped import section_mapped

    def run_child(spec: dict[str, Any]) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, str(HERE / "mapped.py"), json.dumps(spec)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"mapped child {spec} failed:\n{result.stderr}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def row(what: str, baseline: str, ours: list[float], base: list[float], unit: str,
            target: float | None, target_text: str, paired: bool) -> None:  # fmt: skip
        ctx.rows.append(Row("mapped", what, baseline, ours, base, unit, target, target_text,
                            paired))  # fmt: skip

    section_mapped(ctx, run_child=run_child, interleaved=interleaved, row=row)


def fmt_value(v: float, unit: str) -> str:
    if unit == "x size":
        return f"{v:.2f}x"
    if unit == "ms":
        return f"{v:.2f} ms" if v >= 0.1 else f"{v:.3f} ms"
    if unit == "ops/s":
        return f"{v:,.0f}/s"
    return f"{v:.3f} s"


def fmt_stats(values: list[float], unit: str) -> str:
    med = statistics.median(values)
    return f"{fmt_value(med, unit)} ({fmt_value(min(values), unit)}-{fmt_value(max(values), unit)})"


def _ratio(x: float) -> str:
    """Two decimals, or two significant digits below 0.1 (0.0015, not 0.00)."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def table(rows: list[Row], targets_only: bool) -> list[str]:
    lines = [
        "| what | baseline (same run) | daman, median (min-max) | baseline, median (min-max) "
        "| figure: median (min-max) | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if targets_only != (r.target is not None):
            continue
        lo, hi = (_ratio(x) for x in r.spread)
        if r.best:
            figure = f"{_ratio(r.figure)}x best/best (pairs {lo}-{hi})"
        elif r.paired:
            figure = f"{_ratio(r.figure)}x ({lo}-{hi})"
        elif r.unit == "x size":
            figure = f"{_ratio(r.figure)}x size ({lo}-{hi})"
        else:  # an absolute figure: daman's own median and range
            low, high = (fmt_value(x, r.unit) for x in r.spread)
            figure = f"{fmt_value(r.figure, r.unit)} ({low}-{high})"
        ours = fmt_stats(r.ours, r.unit)
        base = fmt_stats(r.base, r.unit) if r.base else "-"
        lines.append(
            f"| {r.what} | {r.baseline} | {ours} | {base} | {figure} | {r.target_text} | {r.met} |"
        )
    return lines


def machine() -> list[str]:
    import boto3
    import botocore
    import cloudpickle
    import moto
    import numpy

    import daman

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores ({platform.machine()}, {platform.system()} "
        f"{platform.release()}); RAM {mem_kib / 2**20:.1f} GiB",
        f"- Python {platform.python_version()}, boto3 {boto3.__version__}, botocore "
        f"{botocore.__version__}, moto {moto.__version__}, numpy {numpy.__version__}, "
        f"cloudpickle {cloudpickle.__version__}",
        f"- daman from `{Path(daman.__file__).parent}`, git `{commit}`",
    ]


def file_creation_cost(folder: Path, count: int = 300) -> float:
    """CPU microseconds to create (and close) one empty file in ``folder``: every cached
    push and pull creates files, and what that costs depends on the folder on some machines."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    try:
        started = time.process_time()
        for n in range(count):
            os.close(os.open(probe / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return (time.process_time() - started) / count * 1e6
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def page_cache_cost(folder: Path, mib: int = 8, count: int = 5) -> tuple[float, float]:
    """CPU milliseconds per MiB written (1) into files that stay, each in new page-cache
    pages, and (2) over one file rewritten in place, in pages already in use. A cache keeps
    what it writes; the baselines write nothing. On some virtual machines the first (the host
    backing a page the guest never used) costs several times the second."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    data = os.urandom(mib * MiB)

    def cost(names: list[str]) -> float:
        started = time.process_time()
        for name in names:
            with open(probe / name, "r+b" if (probe / name).exists() else "wb") as f:
                f.write(data)
        return (time.process_time() - started) / (len(names) * mib) * 1e3

    try:
        return cost([str(n) for n in range(count)]), cost(["0"] * count)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def write_report(
    ctx: Context,
    path: Path,
    started: datetime.datetime,
    elapsed: float,
    argv: list[str],
    loads: tuple[str, str],
    server_rss: tuple[int, int],
) -> str:
    s = ctx.sizes
    out = [
        "# daman benchmark results",
        "",
        "`" + " ".join(["python bench/run.py", *argv]) + "`",
        "",
        f"Run on {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} minutes"
        f"{' (--quick: smaller sizes, a smoke check)' if ctx.quick else ''}.",
        "",
        *machine(),
        f"- load average at start / end: {loads[0]} / {loads[1]} (the machine is shared: "
        "hence ratios of interleaved repetitions)",
        *(
            [f"- candidate: daman from `{ctx.candidate / 'daman'}` (rows marked [candidate])"]
            if ctx.candidate
            else []
        ),
        f"- moto's server: RSS at the end {server_rss[0] / MiB:.0f} MiB, peak "
        f"{server_rss[1] / MiB:.0f} MiB",
        f"- creating a file in the scratch folder (where the caches are): "
        f"{ctx.file_creation_us:.0f} us of CPU (it has been 10 us or 200 us on this machine, "
        "depending on the folder and the day; a cached push or pull creates one, and "
        "created two before 2026-12-02)",
        f"- writing into new page-cache pages (a file that stays, as a cached copy does): "
        f"{ctx.new_pages_ms[0]:.2f} ms of CPU per MiB; over pages in use (a file rewritten in "
        f"place): {ctx.new_pages_ms[1]:.2f} ms per MiB",
        "",
        "## Targets",
        "",
        "Each figure is the median of the ratios daman / baseline over repetitions run in pairs "
        "(baseline then daman, daman then baseline, ...), with the range of those ratios; for "
        "peak RSS it is the peak over the object's size (defined below). "
        "Large-array operations: "
        + ", ".join(f"{n} pairs for {op.replace('_', ' ')}" for op, n in s.large_repeat.items())
        + ", each measurement in a fresh process. "
        f"Per-key operations: {s.small_repeat} pairs of batches of {s.batch} operations in one "
        "process (times per operation).",
        "",
        *table(ctx.rows, targets_only=True),
        "",
        "## Other figures",
        "",
        "Client CPU (user + system time of the client process, all threads) is less noisy than "
        "wall time and shows daman's own work; the controls show how the store itself (moto) "
        "scales with the number of keys.",
        "",
        *table(ctx.rows, targets_only=False),
        "",
        "## Requests sent to the store, per operation",
        "",
        "Counted with botocore `before-send` hooks on the client (every HTTP attempt, retries "
        "included). The heavy operations' counts are those of one measurement in a fresh process "
        "after one warm-up HeadBucket; the per-key ones are averages over every timed batch.",
        "",
        "| operation | daman | baseline |",
        "|---|---|---|",
        *(f"| {what} | {ours} | {base or '-'} |" for what, ours, base in ctx.requests),
        "",
        "## How it was measured",
        "",
        "- moto's S3 server runs in its own process on 127.0.0.1 (bench/moto_server.py). moto "
        "5.x re-reads a whole object from its spool file for every GET, so a ranged GET of an "
        "N-byte object copies N bytes: a parallel download is O(N^2) in the server (8 s for "
        "256 MiB, minutes and gigabytes for 1 GiB). The bench server keeps each object's bytes "
        "once read, so a ranged GET costs its range as on S3; the same for daman and the "
        "baselines. `--plain-moto` turns this off.",
        "- Baselines use a boto3 client with boto3's defaults; daman uses its own configuration "
        "(`progress=False`; otherwise defaults: checksums `when_supported`, current-check on).",
        "- Peak RSS: each measurement in a fresh process. `RSS before` is VmRSS just before the "
        "operation (for a push: before the array is created, so the array counts); the figure "
        "is (ru_maxrss after the operation - RSS before) / the array's size. A process holding "
        "the object has at least 1.00x by definition. Pages of the page cache are not counted "
        "(they belong to files, not to the process), except pages of files the process maps.",
        "- Arrays are float64 from `numpy.random.default_rng(0).random`.",
    ]
    for section in ("keys", "evict", "panel", *everyday.SECTIONS, "profile"):
        if ctx.notes.get(section):
            out += ["", f"### {section}", ""] + [
                f"- {n}" if "\n" not in n else n for n in ctx.notes[section]
            ]
    text = "\n".join(out) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, ~1-2 minutes")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections, of {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="worst",
        choices=["worst", "push", "pull_uncached", "pull_cached"],
        help="py-spy profile of one of daman's large-array operations (default: the one "
        "with the worst ratio)",
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        default=None,
        help="a folder holding another copy of the daman package: the large and rss sections "
        "also measure it (imported through PYTHONPATH), interleaved with the others",
    )
    parser.add_argument(
        "--plain-moto",
        action="store_true",
        help="moto as it is (ranged GETs re-read the whole object)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report file (default bench/RESULTS.md for a full run; RESULTS-quick.md with "
        "--quick, RESULTS-partial.md with --only; those two are not committed)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)"
    )
    args = parser.parse_args()
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    if args.out:
        out = args.out
    elif args.quick:
        out = HERE / "RESULTS-quick.md"
    elif set(sections) != set(SECTIONS):
        out = HERE / "RESULTS-partial.md"
    else:
        out = HERE / "RESULTS.md"

    set_dummy_credentials()
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="daman-bench-", dir=args.workdir)).resolve()
    server = MotoServer(work / "moto.log", plain=args.plain_moto)
    candidate = args.candidate.resolve() if args.candidate else None
    if candidate and not (candidate / "daman" / "__init__.py").exists():
        parser.error(f"--candidate {candidate}: no daman package in it")
    ctx = Context(QUICK if args.quick else FULL, args.quick, server, work, candidate)
    ctx.file_creation_us = file_creation_cost(work)
    ctx.new_pages_ms = page_cache_cost(work)
    ctx.log(
        f"moto at {server.endpoint}; scratch {work} ({ctx.file_creation_us:.0f} us a file, "
        f"{ctx.new_pages_ms[0]:.2f} / {ctx.new_pages_ms[1]:.2f} ms a MiB in new / used pages)"
    )
    runners = {
        "large": lambda: section_large(ctx, args.profile),
        "keys": lambda: section_keys(ctx),
        "evict": lambda: section_evict(ctx),
        "rss": lambda: section_rss(ctx),
        "panel": lambda: section_panel(ctx),
        "mapped": lambda: run_mapped(ctx),
        **{name: partial(everyday.run_section, ctx, name) for name in everyday.SECTIONS},
    }
    failed = []
    server_rss = (0, 0)
    try:
        for name in SECTIONS:
            if name not in sections:
                continue
            try:
                runners[name]()
            except Exception:  # the other sections' figures are still worth the report
                traceback.print_exc()
                ctx.log(f"{name}: FAILED (traceback above); its rows are missing")
                failed.append(name)
        server_rss = server.rss()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    argv = sys.argv[1:]
    text = write_report(ctx, out, started, elapsed, argv, (load_start, load_end), server_rss)
    print()
    print(text)
    print(f"written to {out}; {elapsed / 60:.1f} minutes")
    if failed:
        sys.exit(f"sections that failed (missing from the report): {', '.join(failed)}")


if __name__ == "__main__":
    main()
