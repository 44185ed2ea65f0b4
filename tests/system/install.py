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
