"""Several processes sharing one local_dir through the manager (real processes, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from daman import Config, Manager

TESTS = Path(__file__).resolve().parent


def spawn(config: Config, code: str, *args: object) -> subprocess.Popen[str]:
    """Run ``code`` in a new interpreter with ``manager`` built from ``config``."""
    prelude = textwrap.dedent(
        """
        import json, sys
        from daman import Config, Manager
        config = Config(**json.loads(sys.argv[1]))
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), json.dumps(config.to_dict()),
         *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )  # fmt: skip


def wait_all(procs: list[subprocess.Popen[str]]) -> list[str]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


def assert_cache_consistent(manager: Manager) -> None:
    cache = manager.cache
    entries = cache.entries()
    on_disc = {p.name: p.stat().st_size for p in cache.objects_dir.iterdir()}
    assert on_disc == {e.path.name: e.size for e in entries}
    assert cache.usage().used == sum(on_disc.values())
    assert list(cache.tmp_dir.iterdir()) == []
    assert cache._db().execute("SELECT COUNT(*) FROM journal").fetchone() == (0,)


def test_processes_pulling_one_uncached_key_download_it_once(config: Config) -> None:
    with Manager(config.replace(local_dir=str(Path(config.cache_dir).parent / "pusher"))) as m:
        m.push(np.arange(2_000_000), "shared/big")  # 16 MB
    go = Path(config.cache_dir).parent / "go"
    code = """
        import os, time
        from counting_store import CountingStore
        from daman.store import open_store
        store = CountingStore(open_store(config))
        with Manager(config, store=store) as manager:
            open(sys.argv[2] + "-ready-" + str(os.getpid()), "w").close()
            while not os.path.exists(sys.argv[2]):  # start together
                time.sleep(0.005)
            obj, _ = manager.pull("shared/big")
            assert obj[-1] == 1_999_999
        print(store.calls["get"])
    """
    procs = [spawn(config, code, go) for _ in range(4)]
    while len(list(go.parent.glob("go-ready-*"))) < 4:
        assert all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    outputs = wait_all(procs)
    assert sum(int(out) for out in outputs) == 1
    with Manager(config) as manager:
        assert manager.cache.get("shared/big") is not None
        assert_cache_consistent(manager)


def test_processes_sharing_a_small_cache_keep_it_consistent(make_config) -> None:
    config = make_config(allocated_space=60_000)
    with Manager(config) as manager:
        for i in range(8):
            manager.push(np.full(1000, i), f"k/{i}")  # ~8 KB each
    code = """
        import random
        import numpy as np
        from daman import KeyNotFoundError, NotCachedWarning
        import warnings
        warnings.simplefilter("ignore", NotCachedWarning)
        rng = random.Random(int(sys.argv[2]))
        with Manager(config) as manager:
            for step in range(40):
                i = rng.randrange(8)
                op = rng.random()
                if op < 0.6:
                    obj, _ = manager.pull(f"k/{i}")
                    assert (obj == i).all(), (i, obj[:3])
                elif op < 0.8:
                    manager.push(np.full(1000, i), f"k/{i}", force=True)
                else:
                    try:
                        manager.delete(f"k/{i}")
                    except KeyNotFoundError:
                        pass
                assert manager.cache.usage().used <= 60_000
    """
    wait_all([spawn(config, code, seed) for seed in range(4)])
    with Manager(config) as manager:
        assert_cache_consistent(manager)
        assert manager.usage().used <= 60_000
        for entry in manager.usage().entries:
            obj, _ = manager.pull(entry.key)
            assert (obj == int(entry.key.split("/")[1])).all()
