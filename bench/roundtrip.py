"""Push / pull of a large numpy array through daman against raw boto3 + pickle, same run.

    python bench/roundtrip.py [--mib 256] [--repeat 3]

Starts moto's S3 server in a separate process on 127.0.0.1 (so the server does not share the
client's GIL) and prints, for each operation, the median and spread of daman's time, the
baseline's, and their ratio. Baselines:

- push:           cloudpickle.dump to a file + boto3 upload_file
- pull, uncached: boto3 download_file + pickle.load
- pull, cached:   pickle.load of a local file + one HEAD request
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import cloudpickle
import numpy as np

from daman import Config, Manager

SERVER = """
import sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):7.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdout.readline().strip() == b"ready"
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        array = np.random.default_rng(0).random(args.mib * 2**20 // 8)
        work = Path(tempfile.mkdtemp(prefix="daman-bench-"))
        config = Config(
            storage_name=bucket, service="aws", endpoint_url=endpoint, region="us-east-1",
            local_dir=str(work / "cache"), progress=False,
        )  # fmt: skip
        rows = []
        with Manager(config) as manager:
            n = iter(range(10**6))

            def raw_push() -> None:
                path = work / "raw.pkl"
                with open(path, "wb") as f:
                    cloudpickle.dump(array, f, protocol=5)
                client.upload_file(str(path), bucket, f"raw/{next(n)}")

            def dm_push() -> None:
                manager.push(array, f"dm/{next(n)}")

            rows.append(("push", timed(dm_push, args.repeat), timed(raw_push, args.repeat)))

            client.upload_file(str(work / "raw.pkl"), bucket, "raw/pull")
            manager.push(array, "dm/pull")

            def raw_pull() -> None:
                client.download_file(bucket, "raw/pull", str(work / "down.pkl"))
                with open(work / "down.pkl", "rb") as f:
                    pickle.load(f)

            def dm_pull_uncached() -> None:
                manager.cache.remove("dm/pull")
                manager.pull("dm/pull")

            rows.append(
                ("pull, not cached", timed(dm_pull_uncached, args.repeat),
                 timed(raw_pull, args.repeat))
            )  # fmt: skip

            def raw_cached() -> None:
                client.head_object(Bucket=bucket, Key="raw/pull")
                with open(work / "down.pkl", "rb") as f:
                    pickle.load(f)

            manager.pull("dm/pull")
            rows.append(
                ("pull, cached", timed(lambda: manager.pull("dm/pull"), args.repeat),
                 timed(raw_cached, args.repeat))
            )  # fmt: skip
        print(f"\n{args.mib} MiB float64 array, {args.repeat} repetitions, moto on loopback\n")
        print("| operation | daman | baseline | ratio (medians) |\n|---|---|---|---|")
        for name, ours, base in rows:
            ratio = statistics.median(ours) / statistics.median(base)
            print(f"| {name} | {summary(ours)} | {summary(base)} | {ratio:.2f}x |")
    finally:
        server.kill()


if __name__ == "__main__":
    main()
