"""binder/ as Binder runs it, without Docker: a copy of the repository's files (what Binder
clones), a fresh virtual environment with ``binder/requirements.txt``, ``binder/postBuild``
from the repository's root, then ``binder/start`` with a command that executes every notebook
(``jupyter nbconvert --execute``, which fails on any error cell). The notebooks must have used
the container's demo store, and once the command has ended the store's server must be gone.

Slow (one fresh environment per run, about a minute here with pip's cache), so it is marked
``binder``: ``-m "not binder"`` leaves it out locally; CI runs it. It needs the package index
pip is configured with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_demo import listens

pytestmark = [pytest.mark.binder, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
PIP_CACHE = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
"""The user's pip cache (read at import, before the tests' HOME points elsewhere): one fresh
environment per run, but its wheels need not be downloaded again each time."""
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def copy_of_the_repository(to: Path) -> Path:
    """The files a clone would hold: tracked and new ones, not what .gitignore names."""
    git = shutil.which("git")
    listed = git and subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True,
    )  # fmt: skip
    if not listed or listed.returncode != 0:  # no git checkout: all but builds and caches
        shutil.copytree(ROOT, to, ignore=NOT_SOURCES)
        return to
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():  # a file deleted but not yet committed is not there
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)
    return to


def run(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def demo_servers(cwd: Path) -> list[int]:
    """Live processes running ``python -m daman.demo`` in ``cwd`` (a zombie has ended)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            here = Path(os.readlink(proc / "cwd")) == cwd
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # not a process, ended meanwhile, or not ours to read
        if here and b"daman.demo" in argv and state != "Z":
            found.append(int(proc.name))
    return found


def errors_in(notebook: Path) -> list[str]:
    """The error outputs of cells not tagged ``raises-exception``."""
    cells = json.loads(notebook.read_text())["cells"]
    return [
        cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        for cell in cells
        if cell["cell_type"] == "code"
        and "raises-exception" not in cell.get("metadata", {}).get("tags", [])
        and any(out["output_type"] == "error" for out in cell.get("outputs", []))
    ]


def test_binder_builds_starts_the_demo_store_runs_every_notebook_and_stops_it(
    tmp_path: Path,
) -> None:
    repo = copy_of_the_repository(tmp_path / "repo")
    venv = tmp_path / "venv"
    home = tmp_path / "home"  # the daman_home fixture's, with someone's saved setup
    (home / ".daman").mkdir(parents=True, exist_ok=True)
    saved = b'{"service": "aws", "storage_name": "team-bucket"}\n'
    (home / ".daman" / "config.json").write_bytes(saved)
    (tmp_path / "tmp").mkdir()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "DAMAN_", "PYTHON", "VIRTUAL_ENV", "CONDA", "JUPYTER"))
    }
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",  # Binder's python comes first
        VIRTUAL_ENV=str(venv),
        HOME=str(home),
        TMPDIR=str(tmp_path / "tmp"),
        PIP_CACHE_DIR=PIP_CACHE,
        JUPYTER_PLATFORM_DIRS="1",
    )
    timings = {}

    started = time.monotonic()
    run([sys.executable, "-m", "venv", str(venv)], env, tmp_path, 120)
    requirements = str(repo / "binder" / "requirements.txt")
    run(["python", "-m", "pip", "install", "-q", "-r", requirements], env, repo, 600)
    timings["environment"] = time.monotonic() - started

    started = time.monotonic()
    run(["bash", "binder/postBuild"], env, repo, 300)
    where = run(["python", "-c", "import daman; print(daman.__file__)"], env, tmp_path, 60)
    assert Path(where.strip()).is_relative_to(venv)  # installed from the repository, not linked
    timings["postBuild"] = time.monotonic() - started

    started = time.monotonic()
    executed = tmp_path / "executed"
    command = (
        'echo "$DAMAN_DEMO_ENDPOINT" > ../endpoint && '
        "jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=120 "
        f"--output-dir={executed} notebooks/*.ipynb"
    )
    out = run([str(repo / "binder" / "start"), "bash", "-c", command], env, repo, 600)
    timings["start + notebooks"] = time.monotonic() - started
    print(", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items()))

    # The start script announced the store, on loopback, to the command it ran.
    announced = re.search(r"daman demo store at (http://127\.0\.0\.1:\d+) \(pid (\d+)\)", out)
    assert announced, out
    endpoint, pid = announced[1], int(announced[2])
    assert (tmp_path / "endpoint").read_text().strip() == endpoint
    # Every notebook ran without an error, on the container's store (not one of its own).
    assert sorted(p.name for p in executed.glob("*.ipynb")) == NOTEBOOKS
    for notebook in sorted(executed.glob("*.ipynb")):
        assert errors_in(notebook) == [], notebook.name
    quickstart = (executed / "01-quickstart.ipynb").read_text()
    assert f"on {endpoint} (moto's S3 server shared by this machine)" in quickstart
    assert (home / ".daman" / "config.json").read_bytes() == saved
    # The command has ended: so has the server.
    deadline = time.monotonic() + 30
    while (listens(endpoint) or demo_servers(repo)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listens(endpoint)
    assert demo_servers(repo) == [], f"the demo server (pid {pid}) outlived binder/start"


def test_the_binder_scripts_are_strict_and_start_ends_with_exec() -> None:
    post_build = (ROOT / "binder" / "postBuild").read_text().splitlines()
    start = (ROOT / "binder" / "start").read_text().splitlines()
    for script in (post_build, start):
        assert script[0] == "#!/bin/bash" and "set -euo pipefail" in script
    assert start[-1] == 'exec "$@"'
    for name in ("postBuild", "start"):
        assert os.access(ROOT / "binder" / name, os.X_OK), name
    # Every requirement is pinned: a Binder build next month gets what the suite verified.
    lines = (ROOT / "binder" / "requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line.strip() and not line.startswith("#")]
    assert requirements and all(re.fullmatch(r"[\w\-\[\]]+==[\w.]+", r) for r in requirements)
