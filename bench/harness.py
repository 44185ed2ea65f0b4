"""What every benchmark section shares: a result row, the run's context, interleaved pairs,
request counts. ``run.py`` drives the sections; ``everyday.py`` holds those of issue 13."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import HERE, MotoServer


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    section: str
    what: str
    baseline: str
    ours: list[float]
    base: list[float]
    unit: str  # "s", "ms", "x size"
    target: float | None = None
    target_text: str = ""
    paired: bool = True  # ratios of same-repetition pairs; else the figure is `ours` itself
    best: bool = False  # the figure is best over best (min(ours) / min(base)), not the median

    @property
    def ratios(self) -> list[float]:
        return [o / b for o, b in zip(self.ours, self.base, strict=True)]

    @property
    def figure(self) -> float:
        if self.best:
            return min(self.ours) / min(self.base)
        return statistics.median(self.ratios if self.paired else self.ours)

    @property
    def spread(self) -> tuple[float, float]:
        values = self.ratios if self.paired else self.ours
        return min(values), max(values)

    @property
    def met(self) -> str:
        if self.target is None:
            return ""
        return "yes" if self.figure <= self.target else "**no**"


@dataclasses.dataclass
class Context:
    sizes: Any  # run.Sizes
    quick: bool
    server: MotoServer
    work: Path
    candidate: Path | None = None
    file_creation_us: float = 0.0
    """CPU to create a file in ``work`` (see ``run.file_creation_cost``)."""
    new_pages_ms: tuple[float, float] = (0.0, 0.0)
    """CPU per MiB written into new / used page-cache pages (``run.page_cache_cost``)."""
    rows: list[Row] = dataclasses.field(default_factory=list)
    requests: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def note(self, section: str, text: str) -> None:
        self.notes[section].append(text)

    @property
    def sides(self) -> list[str]:
        return ["raw", "daman"] + (["candidate"] if self.candidate else [])

    def child(self, side: str, **spec: Any) -> dict[str, Any]:
        """One measurement in a fresh process; ``side`` is raw, daman, or candidate (daman
        imported from --candidate)."""
        spec.setdefault("endpoint", self.server.endpoint)
        spec["impl"] = "raw" if side == "raw" else "daman"
        spec["cache"] = str(Path(spec["work"]) / f"cache-{side}")
        env = dict(os.environ)
        if side == "candidate":
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.candidate), *filter(None, [env.get("PYTHONPATH")])]
            )
        result = subprocess.run(
            [sys.executable, str(HERE / "child.py"), json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        if result.returncode != 0:
            raise RuntimeError(f"child {spec} failed:\n{result.stderr}")
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        candidate = str(self.candidate / "daman") if self.candidate else None
        if side != "raw" and (side == "candidate") != (answer["daman"] == candidate):
            raise RuntimeError(f"the {side} child imported daman from {answer['daman']}")
        return answer


def interleaved(repeat: int, *sides: str) -> Iterator[tuple[int, str]]:
    """(rep, side) in the order A B, B A, A B, ...: drift hits all sides alike."""
    for rep in range(repeat):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            yield rep, side


def format_requests(counts: dict[str, float]) -> str:
    if not counts:
        return "none"
    parts = []
    for name, n in sorted(counts.items()):
        n_text = f"{n:g}" if float(n).is_integer() else f"{n:.2f}"
        parts.append(f"{name} x{n_text}")
    return ", ".join(parts) + f" (total {sum(counts.values()):g})"


def per_op(counts: dict[str, int], ops: int) -> dict[str, float]:
    return {name: n / ops for name, n in counts.items()}


def ensure_bucket(client: Any, bucket: str) -> None:
    client.create_bucket(Bucket=bucket)
