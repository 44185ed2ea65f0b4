"""One heavy measurement in a fresh process, so that its peak RSS is its own.

    python bench/child.py '{"impl": "daman", "op": "push", ...}'

Prints one JSON line: wall and CPU seconds of the operation, the RSS before it (before the
object was made, for a push), the process's peak RSS (``ru_maxrss``) after it, the object's
size and the requests sent to the store, per S3 operation. Before timing, each process sends
one warm-up request (HeadBucket) so that connection set-up and credential look-up are not timed,
for daman and baseline alike.

Spec fields: ``impl`` (``daman`` or ``raw``), ``op`` (``push``, ``pull_uncached``,
``pull_cached``), ``endpoint``, ``bucket``, ``key``, ``work`` (a folder for the baseline's files
and daman's cache), ``nbytes`` (push: the float64 array's size), ``keep`` (push: leave the
object in the store for the pulls that follow; otherwise it is deleted after the measurement),
``repeat`` (run the operation this many times, for profiling; the figures are of the last),
``cache`` (daman's local_dir), ``force`` (push: overwrite).
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    RequestCounter,
    Stopwatch,
    daman_config,
    raw_client,
    rss_now,
    rss_peak,
    set_dummy_credentials,
)


def make_array(nbytes: int) -> np.ndarray:
    return np.random.default_rng(0).random(nbytes // 8)


def raw_paths(work: Path, key: str) -> tuple[Path, Path]:
    """The baseline's pickle file (written by its push) and downloaded file (its 'cache')."""
    safe = key.replace("/", "_")
    return work / f"raw-{safe}.pkl", work / f"raw-{safe}.down"


def run_daman(spec: dict[str, Any]) -> dict[str, Any]:
    from daman import Manager

    config = daman_config(spec["endpoint"], spec["bucket"], Path(spec["cache"]))
    key = spec["key"]
    out: dict[str, Any] = {}
    with Manager(config) as manager:
        manager.store.check()  # warm-up: HeadBucket
        counter = RequestCounter(manager.store.client)
        for _ in range(spec.get("repeat", 1)):
            if spec["op"] == "push":
                out["rss_before"] = rss_now()
                obj = make_array(spec["nbytes"])
                with Stopwatch() as sw:
                    manager.push(obj, key, force=spec.get("force", False))
            elif spec["op"] == "pull_uncached":
                manager.cache.remove(key)
                gc.collect()
                out["rss_before"] = rss_now()
                with Stopwatch() as sw:
                    obj, _ = manager.pull(key)
            elif spec["op"] == "pull_cached":
                if manager.cache.get(key) is None:
                    raise RuntimeError(f"{key} is not cached")
                gc.collect()
                out["rss_before"] = rss_now()
                with Stopwatch() as sw:
                    obj, _ = manager.pull(key)
            else:
                raise ValueError(spec["op"])
            out["rss_peak"] = rss_peak()
            out["requests"] = counter.take()
            out["size"] = int(obj.nbytes)
            del obj
        if spec["op"] == "push" and not spec.get("keep"):
            manager.delete(key, remote=True)
    out.update(wall=sw.wall, cpu=sw.cpu)
    return out


def run_raw(spec: dict[str, Any]) -> dict[str, Any]:
    import cloudpickle

    client = raw_client(spec["endpoint"])
    bucket, key = spec["bucket"], spec["key"]
    pickled, downloaded = raw_paths(Path(spec["work"]), key)
    client.head_bucket(Bucket=bucket)  # warm-up
    counter = RequestCounter(client)
    out: dict[str, Any] = {}
    for _ in range(spec.get("repeat", 1)):
        if spec["op"] == "push":
            out["rss_before"] = rss_now()
            obj = make_array(spec["nbytes"])
            with Stopwatch() as sw:
                with open(pickled, "wb") as f:
                    cloudpickle.dump(obj, f, protocol=5)
                client.upload_file(str(pickled), bucket, key)
        elif spec["op"] == "pull_uncached":
            downloaded.unlink(missing_ok=True)
            gc.collect()
            out["rss_before"] = rss_now()
            with Stopwatch() as sw:
                client.download_file(bucket, key, str(downloaded))
                with open(downloaded, "rb") as f:
                    obj = pickle.load(f)
        elif spec["op"] == "pull_cached":
            if not downloaded.exists():
                raise RuntimeError(f"{downloaded} does not exist")
            gc.collect()
            out["rss_before"] = rss_now()
            with Stopwatch() as sw:
                client.head_object(Bucket=bucket, Key=key)
                with open(downloaded, "rb") as f:
                    obj = pickle.load(f)
        else:
            raise ValueError(spec["op"])
        out["rss_peak"] = rss_peak()
        out["requests"] = counter.take()
        out["size"] = int(obj.nbytes)
        del obj
    if spec["op"] == "push" and not spec.get("keep"):
        client.delete_object(Bucket=bucket, Key=key)
        pickled.unlink(missing_ok=True)
    out.update(wall=sw.wall, cpu=sw.cpu)
    return out


def main() -> None:
    set_dummy_credentials()
    spec = json.loads(sys.argv[1])
    result = run_daman(spec) if spec["impl"] == "daman" else run_raw(spec)
    result["pid"] = os.getpid()
    if spec["impl"] == "daman":
        import daman

        result["daman"] = str(Path(daman.__file__).parent)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
