"""Concurrency: real processes sharing one ``local_dir`` and one store, on both backends.

- 8 processes pull / push / delete overlapping keys in a small allocation for a bounded time;
- 50 trials per object size of two processes pushing the same new key at the same moment;
- several processes pulling the same uncached keys download each once.

Every pulled object checks itself (``reliability_helpers.make_object``: each byte depends on
the key and the version, the meta names both), and afterwards the cache is checked file by
file and every stored object is pulled from a fresh cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability_helpers import (
    assert_cache_consistent,
    assert_left_at_rest,
    check_object,
    finish,
    kill_all,
    make_object,
    spawn,
    store_leftovers,
)

from daman import Config, Manager
from daman.store.s3 import MULTIPART_THRESHOLD

PROCESSES = 8
KEYS = 12
ALLOCATION = 64_000
DURATION = 3.0  # seconds of mixed operations in every process
RACE_TRIALS = 50
PULLERS = 6
PULLED_KEYS = 6


def fresh_machine(config: Config, tmp_path: Path, name: str) -> Manager:
    return Manager(config.replace(local_dir=str(tmp_path / name)))


def start_together(procs: list) -> None:
    """Each child prints "ready" and waits for a line on stdin: release them at once."""
    for proc in procs:
        line = proc.stdout.readline()
        assert line == "ready\n", line + proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


MIXED = """
    import random, time, warnings
    from daman import KeyExistsError, KeyNotFoundError, NotCachedError, NotCachedWarning
    from reliability_helpers import check_object, make_object

    seed, keys, duration, allocation = map(int, sys.argv[2:6])
    rng = random.Random(seed)
    counts = {"pull": 0, "pull_memory_only": 0, "push": 0, "push_refused": 0, "delete": 0,
              "delete_missing": 0, "fetch": 0, "fetch_not_cached": 0}
    pushed, pulled = [], set()
    with Manager(config) as manager, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotCachedWarning)  # a big version may not fit
        print("ready", flush=True)
        sys.stdin.readline()
        end = time.monotonic() + duration / 1000
        n = 0
        while time.monotonic() < end:
            n += 1
            key = f"k/{rng.randrange(keys)}"
            op = rng.random()
            if op < 0.45:
                obj, meta = manager.pull(key)
                pulled.add(check_object(obj, meta, key))
                counts["pull"] += 1
            elif op < 0.55:
                obj, meta = manager.pull(key, memory_only=True)
                pulled.add(check_object(obj, meta, key))
                counts["pull_memory_only"] += 1
            elif op < 0.75:
                version = f"{seed}-{n}"
                obj, meta = make_object(key, version, rng.choice([2_000, 6_000, 20_000]))
                manager.push(obj, key, meta=meta, force=True, persist=rng.random() < 0.05)
                pushed.append(version)
                counts["push"] += 1
            elif op < 0.8:
                obj, meta = make_object(key, f"{seed}-{n}-refused")
                try:
                    manager.push(obj, key, meta=meta)
                except KeyExistsError:
                    counts["push_refused"] += 1
                else:
                    raise AssertionError(f"a push without force replaced {key}")
            elif op < 0.95:
                try:
                    manager.delete(key)
                    counts["delete"] += 1
                except KeyNotFoundError:
                    counts["delete_missing"] += 1
            else:
                try:
                    manager.fetch(key)
                    counts["fetch"] += 1
                except NotCachedError:  # pinned entries fill the allocation
                    counts["fetch_not_cached"] += 1
                manager.cache.set_persist(key, False)
            used = manager.cache.usage().used
            assert used <= allocation, ("over the allocation", used, allocation)
    print(json.dumps({"counts": counts, "pushed": pushed, "pulled": sorted(pulled)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eight_processes_share_a_small_cache(make_config, tmp_path: Path) -> None:
    """8 processes, one local_dir of 64 KB (3-20 objects' worth), 12 overlapping keys, 3 s of
    pulls, forced pushes, refused pushes, deletes and fetches each: every pull is whole and
    is a version someone pushed; afterwards the index equals the files, the allocation holds,
    no temp file or journal row is left, and no stored object is lost."""
    config = make_config(allocated_space=ALLOCATION)
    with Manager(config) as seeder:
        for i in range(KEYS):
            obj, meta = make_object(f"k/{i}", "initial", 4_000)
            seeder.push(obj, f"k/{i}", meta=meta)
    procs = [
        spawn(config, MIXED, seed, KEYS, int(DURATION * 1000), ALLOCATION, stdin=True)
        for seed in range(PROCESSES)
    ]
    try:
        start_together(procs)
        reports = [json.loads(finish(proc, timeout=180)) for proc in procs]
    finally:
        kill_all(procs)

    pushed = {"initial"} | {v for r in reports for v in r["pushed"]}
    pulled = {v for r in reports for v in r["pulled"]}
    assert pulled <= pushed, f"pulled versions nobody pushed: {pulled - pushed}"
    totals = {op: sum(r["counts"][op] for r in reports) for op in reports[0]["counts"]}
    assert totals["pull"] > 20 and totals["push"] > 10 and totals["delete"] > 5, totals
    assert_left_at_rest(config.cache_dir)

    with Manager(config) as manager:
        assert_cache_consistent(manager, ALLOCATION)
        for entry in manager.usage().entries:
            assert check_object(*manager.pull(entry.key), entry.key) in pushed
    with fresh_machine(config, tmp_path, "auditor") as auditor:  # objects lost: 0
        assert sorted(item.key for item in auditor.ls("k/")) == sorted(
            f"k/{i}" for i in range(KEYS)
        )
        for i in range(KEYS):
            assert check_object(*auditor.pull(f"k/{i}"), f"k/{i}") in pushed
    assert store_leftovers(config) == []
    print(f"\n{PROCESSES} processes, {DURATION} s: {totals}; objects lost: 0")


RACER = """
    from daman import KeyExistsError
    from reliability_helpers import check_object, make_object

    me = sys.argv[2]
    with Manager(config) as manager:
        for line in sys.stdin:
            trial, nbytes = line.split()
            key = f"race/{trial}"
            obj, meta = make_object(key, me, int(nbytes))
            print("ready", flush=True)
            sys.stdin.readline()  # "go", written to both racers at once
            try:
                manager.push(obj, key, meta=meta)
                outcome = "won"
            except KeyExistsError:
                outcome = "lost"
                if manager.cache.get(key) is not None:
                    outcome = "lost, but cached its own object"
            # Either way, this machine now pulls the stored object: the winner's.
            stored = check_object(*manager.pull(key), key)
            print(json.dumps({"outcome": outcome, "pulled": stored}), flush=True)
"""

RACE_SIZES = {"small": 4_000, "multipart": MULTIPART_THRESHOLD + 64 * 1024}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", list(RACE_SIZES))
def test_two_processes_pushing_one_new_key_exactly_one_wins(
    config: Config, tmp_path: Path, size: str
) -> None:
    """50 trials: two processes (two machines: own caches) released at the same moment push
    the same new key. Exactly one succeeds, the other gets KeyExistsError and caches nothing,
    and the stored object is whole and the winner's, as both then pull it."""
    nbytes = RACE_SIZES[size]
    racers = [
        spawn(config.replace(local_dir=str(tmp_path / name)), RACER, name, stdin=True)
        for name in ("a", "b")
    ]
    wins = {"a": 0, "b": 0}
    try:
        with fresh_machine(config, tmp_path, "auditor") as auditor:
            for trial in range(RACE_TRIALS):
                for racer in racers:
                    racer.stdin.write(f"{trial} {nbytes}\n")
                    racer.stdin.flush()
                start_together(racers)
                results = [json.loads(racer.stdout.readline()) for racer in racers]
                outcomes = sorted(r["outcome"] for r in results)
                assert outcomes == ["lost", "won"], f"trial {trial}: {results}"
                winner = "ab"[[r["outcome"] for r in results].index("won")]
                wins[winner] += 1
                assert [r["pulled"] for r in results] == [winner, winner], f"trial {trial}"
                key = f"race/{trial}"
                obj, meta = auditor.pull(key, memory_only=True)
                assert check_object(obj, meta, key) == winner
                auditor.store.delete(key)  # keeps moto's memory small
        for racer in racers:
            finish(racer)
    finally:
        kill_all(racers)
    assert store_leftovers(config) == []
    for name in ("a", "b"):
        assert_left_at_rest(tmp_path / name)
    assert sum(wins.values()) == RACE_TRIALS
    print(f"\n{RACE_TRIALS} races ({size}, {nbytes} B): wins {wins}; objects lost: 0")


PULLER = """
    import random
    from counting_store import CountingStore
    from daman.store import open_store
    from reliability_helpers import check_object

    seed, nkeys = int(sys.argv[2]), int(sys.argv[3])
    keys = [f"shared/{i}" for i in range(nkeys)]
    random.Random(seed).shuffle(keys)
    store = CountingStore(open_store(config))
    print("ready", flush=True)
    sys.stdin.readline()
    with Manager(config, store=store) as manager:  # the folder is created concurrently
        for key in keys:
            check_object(*manager.pull(key), key)
    print(store.calls["get"])
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_processes_pulling_the_same_uncached_keys_download_each_once(
    config: Config, tmp_path: Path
) -> None:
    """6 processes open a new local_dir at the same moment and pull the same 6 keys (one of
    them multipart-sized) in different orders: each key is downloaded once in all, and one
    intact copy of each is cached."""
    with fresh_machine(config, tmp_path, "pusher") as pusher:
        for i in range(PULLED_KEYS):
            nbytes = MULTIPART_THRESHOLD + 4096 if i == 0 else 50_000
            obj, meta = make_object(f"shared/{i}", "v1", nbytes)
            pusher.push(obj, f"shared/{i}", meta=meta)
    procs = [spawn(config, PULLER, seed, PULLED_KEYS, stdin=True) for seed in range(PULLERS)]
    try:
        start_together(procs)
        downloads = sum(int(finish(proc)) for proc in procs)
    finally:
        kill_all(procs)
    assert downloads == PULLED_KEYS
    assert_left_at_rest(config.cache_dir)
    with Manager(config) as manager:
        assert sorted(e.key for e in manager.usage().entries) == sorted(
            f"shared/{i}" for i in range(PULLED_KEYS)
        )
        assert_cache_consistent(manager)
    print(f"\n{PULLERS} processes x {PULLED_KEYS} keys: {downloads} downloads")
