"""Shared helpers of the benchmark scripts: moto's server, clients, request counting, RSS."""

from __future__ import annotations

import collections
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REGION = "us-east-1"


def set_dummy_credentials() -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server in its own process (see moto_server.py), with its command channel."""

    def __init__(self, log: Path, plain: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        args = [sys.executable, str(HERE / "moto_server.py"), str(self.port)]
        self.proc = subprocess.Popen(
            [*args, "--plain"] if plain else args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line != "ready":
            self.stop()
            raise RuntimeError(f"moto's server did not start (said {line!r}); see {log}")

    def command(self, line: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        if not answer or answer[0] == "error":
            raise RuntimeError(f"moto server: {line!r} -> {' '.join(answer)}")
        return answer

    def fill(self, bucket: str, prefix: str, count: int, size: int) -> float:
        return float(self.command(f"fill {bucket} {prefix} {count} {size}")[2])

    def rss(self) -> tuple[int, int]:
        _, now, peak = self.command("rss")
        return int(now), int(peak)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def raw_client(endpoint: str) -> Any:
    """The baseline: a plain boto3 client with boto3's defaults."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION)


def daman_config(endpoint: str, bucket: str, local_dir: Path, **extra: Any) -> Any:
    from daman import Config

    return Config(
        storage_name=bucket,
        service="aws",
        endpoint_url=endpoint,
        region=REGION,
        local_dir=str(local_dir),
        progress=False,
        **extra,
    )


class RequestCounter:
    """Counts the HTTP requests a botocore client sends, per S3 operation (``before-send``
    fires once per attempt, so retries count too)."""

    def __init__(self, client: Any) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        client.meta.events.register("before-send.s3.*", self._count)

    def _count(self, event_name: str, **_: Any) -> None:
        self.counts[event_name.rsplit(".", 1)[-1]] += 1

    def take(self) -> dict[str, int]:
        """The counts since the last take, and reset."""
        counts = dict(self.counts)
        self.counts.clear()
        return counts


def rss_now() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_peak() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stopwatch:
    """Wall and CPU (user + system, all threads) time of a block."""

    def __enter__(self) -> Stopwatch:
        self.cpu = cpu_seconds()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.start
        self.cpu = cpu_seconds() - self.cpu
