"""Issue 16: a cached pull of a key's current version is no slower with version history.

Two copies of daman run the same workload in turns, each in fresh processes: the release
before versions (``git archive`` of BASE, default ``main``, unpacked in a temp folder) and
this tree. Each pushes a 1 MiB array to a key (this tree: then 20 more versions of it, and
pulls 5 old versions into its cache, so that its index holds (key, version) entries beside
the current one), then times PULLS cached pulls of the current version, each with its
current-check (one HEAD). Reported: the median per-pull time of each, over REPEAT interleaved
pairs of processes, and the median of the paired ratios (this tree / before), on moto's S3
server and on a local-folder store.

    python bench/versions.py [--base main] [--repeat 5] [--pulls 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

from common import MotoServer

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import json, sys, time, statistics
    import numpy as np
    import daman
    from daman import Config, Manager
    fields, pulls, history = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    with Manager(Config(**fields)) as m:
        m.push(np.arange(131072), "bench/k", force=True)
        if history:
            for n in range(20):
                m.push(np.arange(131072) + n, "bench/k", force=True)
            for v in list(m.history("bench/k"))[1:6]:
                m.pull("bench/k", version=v.version)
        m.pull("bench/k")
        times = []
        for _ in range(pulls):
            t = time.perf_counter()
            m.pull("bench/k")
            times.append(time.perf_counter() - t)
    print(statistics.median(times), daman.__file__)
    """
)


def unpack(base: str, into: Path) -> Path:
    """The ``daman`` package as it is at ``base``, unpacked under ``into``."""
    into.mkdir(parents=True)
    archive = into / "base.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", base, "daman"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def run(code_root: Path, fields: dict, pulls: int, *, history: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(code_root), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(fields), str(pulls), "1" if history else "0"],
        capture_output=True, text=True, env=env, check=True, cwd=code_root,
    )  # fmt: skip
    median, used = out.stdout.split()
    assert Path(used).is_relative_to(code_root), f"{used} is not the daman of {code_root}"
    return float(median)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pulls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = unpack(args.base, tmp / "base")
        server = MotoServer(tmp / "moto.log")
        try:
            import boto3

            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
            s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
            stores = {}
            for name in ("before", "ours"):
                s3.create_bucket(Bucket=f"bench-{name}")
                (tmp / f"folder-{name}").mkdir()
            for store in ("s3", "local"):
                rows = {"before": [], "ours": []}
                for n in range(args.repeat):
                    for name, code in (("before", base), ("ours", ROOT)):
                        if store == "s3":
                            where = dict(
                                service="aws",
                                storage_name=f"bench-{name}",
                                endpoint_url=server.endpoint,
                                region="us-east-1",
                            )
                        else:
                            where = dict(service="local", storage_name=str(tmp / f"folder-{name}"))
                        fields = dict(where, local_dir=str(tmp / f"cache-{store}-{name}-{n}"),
                                      progress=False)  # fmt: skip
                        rows[name].append(run(code, fields, args.pulls, history=name == "ours"))
                stores[store] = rows
        finally:
            server.stop()
    print(f"cached pull of the current version, median of {args.pulls} pulls per process, "
          f"{args.repeat} interleaved pairs of processes")  # fmt: skip
    for store, rows in stores.items():
        ratios = [o / b for o, b in zip(rows["ours"], rows["before"], strict=True)]
        print(
            f"  {store:5}  before {statistics.median(rows['before']) * 1e3:.3f} ms  "
            f"with history {statistics.median(rows['ours']) * 1e3:.3f} ms  "
            f"ratio {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
