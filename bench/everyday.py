"""Benchmark sections for everyday calls (issue 13): what a person does many times a day.

    small    uncached pull of a tiny object vs get_object + pickle.loads; push of one vs
             put_object (wall and client CPU), in batches in this process
    medium   push of 7.99 / 8 / 16 / 24 MiB arrays vs put_object of their pickle (no cliff
             at the multipart threshold); uncached pull of 8 / 16 MiB vs get_object + loads;
             push of 64 MiB vs cloudpickle.dump + upload_file (best of 8)
    local    commands that need no store: dm_status with an S3 configuration vs a folder one
             (a fresh process each); dm.usage() and dm_status's text at 10k / 50k entries;
             dm.ls() of a local-folder store of 100,000 keys vs os.walk + stat; a cached pull
             without the HEAD; dm.verify() of many small entries vs sha256 of their files
    shared   cached pulls (no HEAD) from 1 and 4 processes on one local_dir, against the same
             pulls with the use not recorded (a read of the cache): does a hit scale as a read?

Every figure is, as in run.py, a ratio to a baseline measured in the same run (repetitions
interleaved, median of the paired ratios with their range), or an absolute time where the
issue sets one (dm.usage() < 5 ms, a cached pull without the HEAD <= 0.08 ms).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import RequestCounter, Stopwatch, daman_config, raw_client
from harness import Context, Row, ensure_bucket, format_requests, interleaved, per_op

MiB = 2**20
SECTIONS = ("small", "medium", "local", "shared")


@dataclasses.dataclass
class Sizes:
    batch: int  # small objects per timed batch
    repeat: int  # pairs of batches (small) or of single operations (medium)
    medium_mib: tuple[float, ...]
    medium_pull_mib: tuple[int, ...]
    big_mib: int
    big_repeat: int
    usage_entries: tuple[int, ...]
    usage_repeat: int
    status_repeat: int
    ls_keys: int
    ls_cached: int
    ls_repeat: int
    verify_entries: int
    shared_processes: int
    shared_seconds: float
    shared_repeat: int


FULL = Sizes(
    50,
    7,
    (7.99, 8.0, 16.0, 24.0),
    (8, 16),
    64,
    8,
    (10_000, 50_000),
    7,
    7,
    100_000,
    1_000,
    3,
    2_000,
    4,
    2.0,
    5,
)
QUICK = Sizes(
    20, 3, (7.99, 8.0, 16.0), (8, 16), 32, 3, (2_000, 5_000), 3, 3, 5_000, 100, 2, 300, 4, 0.7, 2
)


def sizes(ctx: Context) -> Sizes:
    return QUICK if ctx.quick else FULL


def tiny_object() -> dict[str, Any]:
    """About 200 bytes pickled: a run's few results, as people push them."""
    return {"run": 7, "score": 0.9312, "tags": ["nightly", "eu-west"], "note": "x" * 120}


def array(nbytes: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).random(nbytes // 8)


def pairs(
    ctx: Context,
    sides: dict[str, Callable[[int], object]],
    repeat: int,
    per: int = 1,
    prepare: dict[str, Callable[[int], object]] | None = None,
    counters: dict[str, RequestCounter] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, dict[str, float]]]:
    """Wall and CPU seconds per operation of each side (a call runs ``per`` operations),
    interleaved, after one warm-up call per side; ``prepare[side](rep)`` runs before each
    call, untimed. Also the requests per operation each side sent."""
    wall: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    sent: dict[str, collections.Counter[str]] = {side: collections.Counter() for side in sides}
    prepare = prepare or {}
    for side, run in sides.items():
        if side in prepare:
            prepare[side](-1)
        run(-1)
        if counters and side in counters:
            counters[side].take()
    for rep, side in interleaved(repeat, *sides):
        if side in prepare:
            prepare[side](rep)
            for counter in (counters or {}).values():
                counter.take()  # what the preparation sent is not the operation's
        with Stopwatch() as sw:
            sides[side](rep)
        wall[side].append(sw.wall / per)
        cpu[side].append(sw.cpu / per)
        if counters and side in counters:
            sent[side].update(counters[side].take())
    return wall, cpu, {side: per_op(dict(c), repeat * per) for side, c in sent.items()}


def ms(values: list[float]) -> list[float]:
    return [v * 1e3 for v in values]


# -- small: tiny objects on S3 --------------------------------------------------------------


class BareCopy:
    """The least a local copy of a download costs: its sha256, a new file written and
    renamed into a folder, one SQLite row committed (WAL, as daman's index). No locks, no
    crash recovery, no allocation: a floor to measure daman's cache against, not a cache."""

    def __init__(self, folder: Path) -> None:
        import sqlite3

        self.objects = folder / "objects"
        self.tmp = folder / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.db = sqlite3.connect(folder / "index.sqlite3", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS e (key TEXT PRIMARY KEY, file TEXT, etag TEXT)")

    def keep(self, key: str, body: bytes, etag: str) -> None:
        hashlib.sha256(body).hexdigest()
        name = os.urandom(8).hex()
        fd = os.open(self.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        os.rename(self.tmp / name, self.objects / name)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT OR REPLACE INTO e VALUES (?, ?, ?)", (key, name, etag))
        self.db.execute("COMMIT")


def section_small(ctx: Context) -> None:
    from daman import Manager

    s = sizes(ctx)
    bucket = "bench-small"
    client = raw_client(ctx.server.endpoint)
    ensure_bucket(client, bucket)
    manager = Manager(daman_config(ctx.server.endpoint, bucket, ctx.work / "small-cache"))
    manager.store.check()
    counters = {"daman": RequestCounter(manager.store.client), "raw": RequestCounter(client)}
    obj = tiny_object()
    pulled = [f"pull/{j:04d}" for j in range(s.batch)]
    for key in pulled:
        manager.push(obj, key)
        client.put_object(Bucket=bucket, Key=f"raw/{key}", Body=pickle.dumps(obj, protocol=5))
    size = manager.store.head(pulled[0]).size
    ctx.log(f"small: {s.batch} keys of {size} bytes (daman) in s3://{bucket}")

    def daman_pull(rep: int) -> None:
        for key in pulled:
            manager.pull(key)

    def raw_pull(rep: int) -> None:
        for key in pulled:
            pickle.loads(client.get_object(Bucket=bucket, Key=f"raw/{key}")["Body"].read())

    bare = BareCopy(ctx.work / "small-bare")

    def bare_pull(rep: int) -> None:
        for key in pulled:
            r = client.get_object(Bucket=bucket, Key=f"raw/{key}")
            body = r["Body"].read()
            bare.keep(key, body, r["ETag"])
            pickle.loads(body)

    def daman_push(rep: int) -> None:
        for j in range(s.batch):
            manager.push(obj, f"push/{rep + 1:03d}/{j:04d}")

    def raw_push(rep: int) -> None:
        for j in range(s.batch):
            body = pickle.dumps(obj, protocol=5)
            client.put_object(
                Bucket=bucket, Key=f"raw/push/{rep + 1:03d}/{j:04d}", Body=body, IfNoneMatch="*"
            )

    ctx.log("small: uncached pulls of a tiny object")
    wall, cpu, sent = pairs(
        ctx,
        {"raw": raw_pull, "daman": daman_pull, "bare": bare_pull},
        s.repeat,
        s.batch,
        prepare={"daman": lambda rep: manager.cache.clear()},
        counters={**counters, "bare": counters["raw"]},  # each side takes its own
    )
    what = f"uncached pull of a tiny object ({size} bytes)"
    base = "boto3 `get_object` + `pickle.loads`"
    ctx.rows.append(
        Row("small", what, base, ms(wall["daman"]), ms(wall["raw"]), "ms", 1.15, "<= 1.15x")
    )
    ctx.rows.append(
        Row("small", f"{what}: client CPU", base, ms(cpu["daman"]), ms(cpu["raw"]), "ms")
    )
    # What any local copy costs, apart from what daman's cache adds to it (locked temp files,
    # the add's mark, key locks, the index's bookkeeping): the floor under the row above.
    bare_base = "the same + a bare local copy (sha256, new file, rename, one SQLite commit)"
    control = Row("small", f"control: {what} with a bare local copy", base, ms(wall["bare"]),
                  ms(wall["raw"]), "ms")  # fmt: skip
    over = Row("small", f"{what}: over a bare local copy", bare_base, ms(wall["daman"]),
               ms(wall["bare"]), "ms")  # fmt: skip
    ctx.rows += [control, over]
    ctx.requests.append((what, format_requests(sent["daman"]), format_requests(sent["raw"])))

    ctx.log("small: pushes of a tiny object (new keys)")
    wall, cpu, sent = pairs(
        ctx, {"raw": raw_push, "daman": daman_push}, s.repeat, s.batch, counters=counters
    )
    what = "push of a tiny object (a new key)"
    base = "boto3 `put_object` of its pickle (IfNoneMatch)"
    ctx.rows.append(
        Row(
            "small",
            f"{what}: client CPU",
            base,
            ms(cpu["daman"]),
            ms(cpu["raw"]),
            "ms",
            1.2,
            "CPU <= 1.20x",
        )
    )
    ctx.rows.append(Row("small", what, base, ms(wall["daman"]), ms(wall["raw"]), "ms"))
    ctx.requests.append((what, format_requests(sent["daman"]), format_requests(sent["raw"])))
    ctx.note(
        "small",
        f"{s.repeat} pairs of batches of {s.batch} operations; the uncached pulls read "
        f"{s.batch} keys whose cached copies are removed (`Cache.clear`, untimed) before each "
        "batch; pushes create new keys. CPU is the client process's user + system time, all "
        "threads (moto runs in its own process).",
    )
    manager.close()


# -- medium: 8 to 64 MiB arrays on S3 -------------------------------------------------------


def section_medium(ctx: Context) -> None:
    import cloudpickle

    from daman import Manager
    from daman.store.s3 import MULTIPART_THRESHOLD

    s = sizes(ctx)
    bucket = "bench-medium"
    client = raw_client(ctx.server.endpoint)
    ensure_bucket(client, bucket)
    manager = Manager(daman_config(ctx.server.endpoint, bucket, ctx.work / "medium-cache"))
    manager.store.check()
    counters = {"daman": RequestCounter(manager.store.client), "raw": RequestCounter(client)}
    cleanup: list[str] = []

    def forget(rep: int) -> None:  # untimed: the store and the cache keep nothing between pairs
        for key in cleanup:
            client.delete_object(Bucket=bucket, Key=key)
        cleanup.clear()
        manager.cache.clear()

    for mib in s.medium_mib:
        nbytes = int(mib * MiB) // 8 * 8
        obj = array(nbytes)
        label = f"{mib:g} MiB"

        def daman_push(rep: int, obj: Any = obj, label: str = label) -> None:
            key = f"push/{label}/{rep + 1}"
            cleanup.append(key)
            manager.push(obj, key)

        def raw_push(rep: int, obj: Any = obj, label: str = label) -> None:
            key = f"raw/push/{label}/{rep + 1}"
            cleanup.append(key)
            body = pickle.dumps(obj, protocol=5)
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")

        def raw_multipart(rep: int, obj: Any = obj, label: str = label) -> None:
            key = f"raw/multipart/{label}/{rep + 1}"
            cleanup.append(key)
            body = io.BytesIO(pickle.dumps(obj, protocol=5))
            client.upload_fileobj(body, bucket, key)  # boto3's defaults: 8 MiB parts

        # Above daman's threshold a push is a multipart upload: boto3's own of the same bytes
        # shows what the server charges for one, apart from what daman adds.
        multipart = nbytes > MULTIPART_THRESHOLD
        sides = {"raw": raw_push, "daman": daman_push}
        if multipart:
            sides["multipart"] = raw_multipart
        ctx.log(f"medium: push of {label}")
        wall, cpu, sent = pairs(
            ctx,
            sides,
            s.repeat,
            prepare={side: forget for side in sides},
            counters={**counters, "multipart": counters["raw"]},  # each side takes its own
        )
        what = f"push of a {label} array"
        base = "boto3 `put_object` of its pickle (`pickle.dumps`)"
        ctx.rows.append(
            Row("medium", what, base, ms(wall["daman"]), ms(wall["raw"]), "ms", 1.15, "<= 1.15x")
        )
        ctx.rows.append(
            Row("medium", f"{what}: client CPU", base, ms(cpu["daman"]), ms(cpu["raw"]), "ms")
        )
        ctx.requests.append((what, format_requests(sent["daman"]), format_requests(sent["raw"])))
        if multipart:
            mp = "boto3 `upload_fileobj` of its pickle (a multipart upload in 8 MiB parts)"
            over = Row("medium", f"{what}: over boto3's multipart", mp, ms(wall["daman"]),
                       ms(wall["multipart"]), "ms")  # fmt: skip
            control = Row("medium", f"control: boto3's multipart upload of {label} over one PUT",
                          base, ms(wall["multipart"]), ms(wall["raw"]), "ms")  # fmt: skip
            ctx.rows += [over, control]
    forget(0)

    for mib in s.medium_pull_mib:
        obj = array(mib * MiB)
        key = f"pull/{mib}"
        manager.push(obj, key)
        client.put_object(Bucket=bucket, Key=f"raw/{key}", Body=pickle.dumps(obj, protocol=5))
        del obj

        def daman_pull(rep: int, key: str = key) -> None:
            manager.pull(key)

        def raw_pull(rep: int, key: str = key) -> None:
            pickle.loads(client.get_object(Bucket=bucket, Key=f"raw/{key}")["Body"].read())

        def raw_checked_pull(rep: int, key: str = key) -> None:
            body = client.get_object(Bucket=bucket, Key=f"raw/{key}")["Body"].read()
            hashlib.sha256(body).hexdigest()
            pickle.loads(body)

        ctx.log(f"medium: uncached pull of {mib} MiB")
        wall, cpu, sent = pairs(
            ctx,
            {"raw": raw_pull, "daman": daman_pull, "checked": raw_checked_pull},
            s.repeat,
            prepare={"daman": lambda rep, key=key: manager.cache.remove(key)},
            counters={**counters, "checked": counters["raw"]},  # each side takes its own
        )
        what = f"uncached pull of a {mib} MiB array"
        base = "boto3 `get_object` + `pickle.loads`"
        ctx.rows.append(
            Row("medium", what, base, ms(wall["daman"]), ms(wall["raw"]), "ms", 1.15, "<= 1.15x")
        )
        ctx.rows.append(
            Row("medium", f"{what}: client CPU", base, ms(cpu["daman"]), ms(cpu["raw"]), "ms")
        )
        # daman checks a sha256 of every byte it downloads: the same raw pull with that check
        # shows what daman adds besides it.
        checked = "boto3 `get_object` + `hashlib.sha256` of the body + `pickle.loads`"
        over = Row("medium", f"{what}: over a raw pull that checks a sha256", checked,
                   ms(wall["daman"]), ms(wall["checked"]), "ms")  # fmt: skip
        ctx.rows.append(over)
        ctx.requests.append((what, format_requests(sent["daman"]), format_requests(sent["raw"])))
        manager.delete(key, remote=True)
        client.delete_object(Bucket=bucket, Key=f"raw/{key}")

    obj = array(s.big_mib * MiB)
    pickled = ctx.work / "medium-big.pkl"

    def daman_big(rep: int) -> None:
        key = f"big/{rep + 1}"
        cleanup.append(key)
        manager.push(obj, key)

    def raw_big(rep: int) -> None:
        key = f"raw/big/{rep + 1}"
        cleanup.append(key)
        with open(pickled, "wb") as f:
            cloudpickle.dump(obj, f, protocol=5)
        client.upload_file(str(pickled), bucket, key)

    ctx.log(f"medium: push of {s.big_mib} MiB, {s.big_repeat} pairs")
    wall, cpu, sent = pairs(
        ctx,
        {"raw": raw_big, "daman": daman_big},
        s.big_repeat,
        prepare={"raw": forget, "daman": forget},
        counters=counters,
    )
    forget(0)
    what = f"push of a {s.big_mib} MiB array, in a process that pushed before"
    base = "`cloudpickle.dump` to a file + boto3 `upload_file`"
    ctx.rows.append(
        Row(
            "medium",
            f"{what} (best of {s.big_repeat})",
            base,
            ms(wall["daman"]),
            ms(wall["raw"]),
            "ms",
            1.10,
            "<= 1.10x",
            best=True,
        )
    )
    ctx.rows.append(Row("medium", what, base, ms(wall["daman"]), ms(wall["raw"]), "ms"))
    ctx.rows.append(
        Row("medium", f"{what}: client CPU", base, ms(cpu["daman"]), ms(cpu["raw"]), "ms")
    )
    ctx.requests.append((what, format_requests(sent["daman"]), format_requests(sent["raw"])))
    ctx.note(
        "medium",
        f"{s.repeat} pairs of single operations per size ({s.big_repeat} for {s.big_mib} MiB), "
        "all in this process (so a push after the first finds whatever daman keeps between "
        "calls); pushed keys are deleted and the cache emptied between operations, untimed. "
        "Arrays are float64 from `numpy.random.default_rng(0).random`; daman's object is a "
        "few hundred bytes larger than the pickle (its footer).",
    )
    manager.close()


# -- local: commands that need no store -----------------------------------------------------


def fill_index(cache_dir: Path, count: int, size: int, persisted_every: int = 100) -> None:
    """``count`` rows in a cache's index, inserted in one transaction as ``Cache.add`` leaves
    them (one in ``persisted_every`` persisted); no files: usage() reads the index only."""
    from daman.cache import Cache
    from daman.keys import key_digest

    cache = Cache(cache_dir)
    now = time.time()
    rows = [
        (
            f"fill/{i:06d}",
            f"{key_digest(f'fill/{i:06d}')}.{i:012x}",
            size,
            f'"fill-{i}"',
            "0" * 64,
            now,
            i + 1,
            int(i % persisted_every == 0),
        )
        for i in range(count)
    ]
    with cache._write() as db:
        db.executemany(
            "INSERT INTO entries (key, file, size, etag, sha256, created, accessed, persist) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.execute("UPDATE totals SET seq = seq + ?", (count,))
    cache.close()


def section_local(ctx: Context) -> None:
    status_rows(ctx)
    usage_rows(ctx)
    ls_rows(ctx)
    cached_and_verify_rows(ctx)


def status_rows(ctx: Context) -> None:
    import daman
    from daman import Config
    from daman.config import save_config

    s = sizes(ctx)
    bucket = "bench-status"
    ensure_bucket(raw_client(ctx.server.endpoint), bucket)
    homes = {}
    for kind in ("s3", "folder"):
        home = ctx.work / f"status-{kind}"
        home.mkdir()
        if kind == "s3":
            config = daman_config(ctx.server.endpoint, bucket, home / "cache")
        else:
            (home / "store").mkdir()
            config = Config(
                storage_name=str(home / "store"),
                service="local",
                local_dir=str(home / "cache"),
                progress=False,
            )
        save_config(config, home / "config.json")
        fill_index(home / "cache", 100, 1024, persisted_every=10)
        homes[kind] = home

    def run(kind: str, code: str | None = None) -> str:
        env = dict(os.environ, DAMAN_HOME=str(homes[kind]), HOME=str(homes[kind]))
        argv = ["-c", code] if code else ["-m", "daman", "status"]
        result = subprocess.run(  # not in the worktree: ``-c``/``-m`` put the cwd first
            [sys.executable, *argv], capture_output=True, text=True, env=env, check=False,
            cwd=homes[kind],
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"dm_status ({kind}) failed: {result.stderr}")
        return result.stdout

    ctx.log("local: dm_status in a fresh process, S3 vs folder configuration")
    wall, _, _ = pairs(
        ctx, {"folder": lambda rep: run("folder"), "s3": lambda rep: run("s3")}, s.status_repeat
    )
    ctx.rows.append(
        Row(
            "local",
            "`dm_status` with an S3 configuration (a fresh process)",
            "`dm_status` with a folder store (a fresh process)",
            ms(wall["s3"]),
            ms(wall["folder"]),
            "ms",
            1.10,
            "<= 1.10x: no store client",
        )
    )
    probe = (
        "import sys, daman\nfrom daman.cli import COMMANDS\nCOMMANDS['status'](['--json'])\n"
        "print(daman.__file__)\nprint('boto3 imported:', 'boto3' in sys.modules)"
    )
    *_, imported, said = run("s3", probe).strip().splitlines()
    if imported != daman.__file__:
        raise RuntimeError(f"the dm_status child imported {imported}")
    ctx.note("local", f"`dm_status` with an S3 configuration, in a fresh process: {said}.")


def usage_rows(ctx: Context) -> None:
    from daman import Config, Manager, report

    s = sizes(ctx)
    for count in s.usage_entries:
        home = ctx.work / f"usage-{count}"
        (home / "store").mkdir(parents=True)
        fill_index(home / "cache", count, 1024)
        config = Config(
            storage_name=str(home / "store"),
            service="local",
            local_dir=str(home / "cache"),
            progress=False,
        )
        manager = Manager(config)

        def totals(manager: Manager = manager, count: int = count) -> None:
            usage = manager.usage()
            assert usage.used == count * 1024, usage.used
            str(usage.free)

        def status_text(manager: Manager = manager) -> None:
            report.usage_lines(manager.usage(), manager.cache.root)

        def entries(manager: Manager = manager, count: int = count) -> None:
            assert len(manager.usage().entries) == count

        for what, call, target in (
            (f"`dm.usage()` at {count:,} entries: totals (used, allocated, free)", totals, 5.0),
            (
                f"`dm_status`'s text (`report.usage_lines`) at {count:,} entries, {count // 100} "
                "persisted",
                status_text,
                None,
            ),
            (f"`dm.usage().entries` at {count:,} entries (the list, when asked)", entries, None),
        ):
            call()
            times = []
            for _ in range(s.usage_repeat):
                with Stopwatch() as sw:
                    call()
                times.append(sw.wall * 1e3)
            ctx.rows.append(
                Row(
                    "local",
                    what,
                    "-",
                    times,
                    [],
                    "ms",
                    target,
                    "< 5 ms" if target else "",
                    paired=False,
                )
            )
            ctx.log(f"local: {what}: {statistics.median(times):.2f} ms")
        manager.close()


def ls_rows(ctx: Context) -> None:
    from daman import Config, Manager
    from daman.serialize import dump_to_bytes

    s = sizes(ctx)
    root = ctx.work / "ls-store"
    per_folder = 1000
    start = time.perf_counter()
    for i in range(s.ls_keys):
        folder = root / f"p{i // per_folder:03d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
        key = f"{folder.name}/k{i:06d}"
        (folder / f"k{i:06d}.daman").write_bytes(dump_to_bytes(i, key=key))
    ctx.log(f"local: {s.ls_keys:,} objects in a store folder ({time.perf_counter() - start:.1f} s)")
    managers = {}
    for name, cached in (("none", 0), ("some", s.ls_cached)):
        config = Config(
            storage_name=str(root),
            service="local",
            local_dir=str(ctx.work / f"ls-cache-{name}"),
            progress=False,
        )
        managers[name] = Manager(config)
        step = max(1, s.ls_keys // max(1, cached))
        for i in range(0, s.ls_keys, step)[:cached]:
            managers[name].fetch(f"p{i // per_folder:03d}/k{i:06d}")

    def walk(rep: int) -> None:
        found = []
        for folder, _dirs, files in os.walk(root):
            for name in files:
                st = os.stat(os.path.join(folder, name))
                found.append((name, st.st_size, st.st_mtime))
        assert len(found) == s.ls_keys

    def ls(name: str) -> Callable[[int], None]:
        def run(rep: int) -> None:
            listing = managers[name].ls()
            assert len(listing) == s.ls_keys
            assert sum(item.cached for item in listing) == s.ls_cached * (name == "some")
            assert not any(item.outdated for item in listing)

        return run

    ctx.log(f"local: dm.ls() of {s.ls_keys:,} keys vs os.walk + stat")
    wall, _, _ = pairs(ctx, {"walk": walk, "none": ls("none"), "some": ls("some")}, s.ls_repeat)
    base = "`os.walk` + `os.stat` of every file"
    ctx.rows.append(
        Row(
            "local",
            f"`dm.ls()` of a local-folder store of {s.ls_keys:,} keys, none cached",
            base,
            wall["none"],
            wall["walk"],
            "s",
            2.0,
            "<= 2.00x",
        )
    )
    ctx.rows.append(
        Row(
            "local",
            f"`dm.ls()` of it, {s.ls_cached:,} of the keys cached here",
            base,
            wall["some"],
            wall["walk"],
            "s",
            2.0,
            "<= 2.00x",
        )
    )
    for manager in managers.values():
        manager.close()


def cached_and_verify_rows(ctx: Context) -> None:
    """The lead's rows of issue 13 (measured here on today's code): a cached pull without
    the HEAD, and dm.verify() over many small entries."""
    from daman import Config, Manager

    s = sizes(ctx)
    home = ctx.work / "verify"
    (home / "store").mkdir(parents=True)
    config = Config(
        storage_name=str(home / "store"),
        service="local",
        local_dir=str(home / "cache"),
        progress=False,
        check_current=False,
    )
    manager = Manager(config)
    obj = tiny_object()
    keys = [f"v/{j:05d}" for j in range(s.verify_entries)]
    for key in keys:
        manager.push(obj, key)
    probes = keys[:100]

    def cached_pulls() -> None:
        for key in probes:
            manager.pull(key)

    cached_pulls()
    times = []
    for _ in range(s.repeat):
        with Stopwatch() as sw:
            cached_pulls()
        times.append(sw.wall / len(probes) * 1e3)
    ctx.rows.append(
        Row(
            "local",
            "cached pull of a tiny object without the HEAD (`check_current=False`)",
            "-",
            times,
            [],
            "ms",
            0.08,
            "<= 0.08 ms",
            paired=False,
        )
    )
    files = [entry.path for entry in manager.cache.entries()]

    def verify(rep: int) -> None:
        assert manager.verify().ok

    def sha256_files(rep: int) -> None:
        for path in files:
            with open(path, "rb") as f:
                hashlib.sha256(f.read()).hexdigest()

    ctx.log(f"local: dm.verify() of {len(files):,} small entries vs sha256 of their files")
    wall, _, _ = pairs(ctx, {"sha": sha256_files, "verify": verify}, s.repeat)
    ctx.rows.append(
        Row(
            "local",
            f"`dm.verify()` of {len(files):,} small entries",
            "sha256 of the same files (open, read, hash)",
            ms(wall["verify"]),
            ms(wall["sha"]),
            "ms",
            1.5,
            "<= 1.50x",
        )
    )
    manager.close()


# -- shared: cache hits from several processes ----------------------------------------------

SHARED_CHILD = """
import json, sys, time
from daman import Config, Manager
from daman.cache import Cache

spec = json.loads(sys.argv[1])
config = Config(storage_name=spec["store"], service="local", local_dir=spec["cache"],
                progress=False, check_current=False)
manager = Manager(config)
if spec["mode"] == "read":  # the same pull, its use not recorded: what a read-only hit costs
    Cache.touch = lambda self, key, version="": None
keys = spec["keys"]
for key in keys:
    manager.pull(key)
print("ready", flush=True)
sys.stdin.readline()
done, end = 0, time.perf_counter() + spec["seconds"]
while time.perf_counter() < end:
    for key in keys:
        manager.pull(key)
    done += len(keys)
manager.close()
import daman
print(json.dumps({"done": done, "daman": daman.__file__}), flush=True)
"""


def section_shared(ctx: Context) -> None:
    import daman
    from daman import Config, Manager

    s = sizes(ctx)
    home = ctx.work / "shared"
    (home / "store").mkdir(parents=True)
    keys = [f"s/{j:02d}" for j in range(20)]
    config = Config(
        storage_name=str(home / "store"),
        service="local",
        local_dir=str(home / "cache"),
        progress=False,
    )
    with Manager(config) as manager:
        for key in keys:
            manager.push(tiny_object(), key)

    def run(mode: str, processes: int) -> float:
        """Seconds per pull, all processes together (1 / throughput)."""
        spec = {
            "store": str(home / "store"),
            "cache": str(home / "cache"),
            "mode": mode,
            "keys": keys,
            "seconds": s.shared_seconds,
        }
        children = [
            subprocess.Popen(
                [sys.executable, "-c", SHARED_CHILD, json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=home,  # not the worktree: ``-c`` puts the cwd first on sys.path
            )
            for _ in range(processes)
        ]
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        done = 0
        for child in children:
            out, _ = child.communicate(timeout=120)
            if child.returncode != 0:
                raise RuntimeError(f"a shared-cache child failed ({child.returncode})")
            answer = json.loads(out.strip().splitlines()[-1])
            if answer["daman"] != daman.__file__:
                raise RuntimeError(f"a shared-cache child imported {answer['daman']}")
            done += answer["done"]
        return s.shared_seconds / done

    n = s.shared_processes
    ctx.log(f"shared: cached pulls from 1 and {n} processes, {s.shared_seconds} s each")
    times: dict[str, list[float]] = collections.defaultdict(list)
    for rep, side in interleaved(s.shared_repeat, "hit-1", "read-1", f"hit-{n}", f"read-{n}"):
        mode, processes = side.split("-")
        times[side].append(run(mode, int(processes)) * 1e3)
        ctx.log(f"shared: {side} rep {rep}: {1e3 / times[side][-1]:,.0f} pulls/s")
    label = f"{n} processes on one local_dir"
    ctx.rows.append(
        Row(
            "shared",
            f"cached pulls (no HEAD), {label}: hit over read",
            f"the same pulls with their use not recorded (`Cache.touch` a no-op), {n} processes",
            times[f"hit-{n}"],
            times[f"read-{n}"],
            "ms",
            1.15,
            "<= 1.15x: hits scale like reads",
        )
    )
    ctx.rows.append(
        Row(
            "shared",
            "cached pulls (no HEAD), 1 process: hit over read",
            "the same pulls with their use not recorded, 1 process",
            times["hit-1"],
            times["read-1"],
            "ms",
        )
    )
    ctx.rows.append(
        Row(
            "shared",
            f"cached pulls, time per pull (1 / throughput), {label}",
            "the same from 1 process",
            times[f"hit-{n}"],
            times["hit-1"],
            "ms",
        )
    )
    ctx.rows.append(
        Row(
            "shared",
            f"reads (use not recorded), time per pull, {label}",
            "the same from 1 process",
            times[f"read-{n}"],
            times["read-1"],
            "ms",
        )
    )
    ctx.note(
        "shared",
        f"{len(keys)} tiny keys cached from a local-folder store, `check_current=False`; each "
        f"measurement starts {n} (or 1) fresh processes that pull the keys in turn for "
        f"{s.shared_seconds} s after a common start; {s.shared_repeat} repetitions, "
        "interleaved. A time per pull is the measurement's length over all processes' pulls; "
        f"on 2 cores, {n} processes can at best halve it. The read baseline replaces "
        "`Cache.touch` with a no-op in its processes (the index write of a hit).",
    )


def run_section(ctx: Context, name: str) -> None:
    {
        "small": section_small,
        "medium": section_medium,
        "local": section_local,
        "shared": section_shared,
    }[name](ctx)
