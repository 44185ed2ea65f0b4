#!/usr/bin/env python
"""Install the system parts the test suite needs beyond ``pip install -e ".[test]"``.

README.md's test command runs this before pytest, so a newcomer's run equals CI's on a fresh
machine: nothing installed by hand is assumed. Each part is checked first and installed only
when missing, so a second run takes a fraction of a second. Parts go either to the system
(Debian packages, through apt-get) or under ``build/`` in the repository (ignored by git).

    python tests/system/install.py          # everything missing
    python tests/system/install.py --check  # say what is missing, install nothing
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
CHROMIUM = Path("/usr/bin/chromium")

Part = tuple[str, Callable[[], bool], Callable[[], None]]
"""(name, is it there?, install it)."""
PARTS: list[Part] = []


def part(name: str, present: Callable[[], bool]) -> Callable[[Callable[[], None]], None]:
    def register(install: Callable[[], None]) -> None:
        PARTS.append((name, present, install))

    return register


def run(*command: str, **kwargs: object) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def apt_install(*packages: str) -> None:
    """Debian packages, as root (or through sudo when there is one)."""
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"] if shutil.which("sudo") else None
    if prefix is None:
        sys.exit(f"install.py: {' '.join(packages)} missing and not root: install them with apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(*prefix, "apt-get", "update", "-q", env=env)
    run(*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages, env=env)


# -- another Python minor version, for the tests that share objects between two versions ----

OTHER_PYTHON_VENV = BUILD / "other-python"


def other_python_candidates() -> list[Path]:
    """Interpreters of other minor versions (>= 3.10) on this machine: pyenv's, then the
    system's, newest first."""
    here = sys.version_info[:2]
    found: dict[tuple[int, int], Path] = {}
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    patterns = [*sorted(pyenv.glob("3.*/bin/python3"), reverse=True)]
    system = sorted(Path("/usr/bin").glob("python3.*"))
    patterns += [path for path in system if path.name[len("python3.") :].isdigit()]
    for path in patterns:
        try:
            out = subprocess.run(
                [str(path), "-c", "import sys; print(*sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.split()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        version = (int(out[0]), int(out[1]))
        if version != here and version >= (3, 10) and version not in found:
            found[version] = path
    return [found[v] for v in sorted(found, reverse=True)]


def other_python_present() -> bool:
    python = OTHER_PYTHON_VENV / "bin" / "python"
    return (
        python.exists()
        and subprocess.run(
            [str(python), "-c", "import daman, numpy"], capture_output=True
        ).returncode
        == 0
    )


@part("a virtual environment of another Python minor version with daman", other_python_present)
def install_other_python() -> None:
    candidates = other_python_candidates()
    if not candidates:
        sys.exit(
            "install.py: no Python of another minor version (>= 3.10) on this machine: "
            "install one (pyenv install 3.12, or apt-get install python3.X) for the tests "
            "that share objects between two Python versions"
        )
    shutil.rmtree(OTHER_PYTHON_VENV, ignore_errors=True)
    run(str(candidates[0]), "-m", "venv", str(OTHER_PYTHON_VENV))
    pip = [str(OTHER_PYTHON_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    run(*pip, "--upgrade", "pip")
    run(*pip, "-e", str(ROOT), "numpy")


@part("chromium (Debian's, for the panel's browser tests)", lambda: CHROMIUM.exists())
def _chromium() -> None:
    # Debian's package, not `playwright install`: Playwright drives it through
    # executable_path, and the registry stays the only download.
    apt_install("chromium")


NODE = BUILD / "node"
AZURITE = NODE / "node_modules" / ".bin" / "azurite-blob"


@part("azurite (npm, the Azure Blob Storage emulator)", AZURITE.exists)
def install_azurite() -> None:
    # Node and npm are on the machine (Debian's nodejs/npm otherwise); Azurite 3 lands in
    # build/node, out of git, where tests/clouds.py looks for it.
    if shutil.which("npm") is None:
        apt_install("nodejs", "npm")
    NODE.mkdir(parents=True, exist_ok=True)
    run("npm", "install", "--prefix", str(NODE), "--no-audit", "--no-fund", "azurite@3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report only, install nothing")
    args = parser.parse_args(argv)
    missing = [(name, install) for name, present, install in PARTS if not present()]
    for name, install in missing:
        if args.check:
            print(f"missing: {name}")
        else:
            install()
    if args.check:
        return 1 if missing else 0
    still = [name for name, present, _ in PARTS if not present()]
    if still:
        print(f"install.py: could not install {', '.join(still)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
