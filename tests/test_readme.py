"""README.md's two opening commands are real: CI runs the second, this runs the first."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_quickstart_round_trip_runs_and_leaves_the_saved_configuration_alone(
    daman_home: Path,
) -> None:
    daman_home.mkdir()
    saved = '{"service": "aws", "storage_name": "team-bucket"}\n'  # someone's real setup
    (daman_home / "config.json").write_text(saved)
    install, _, python_part = readme_commands()[0].partition(" && ")
    assert install == "pip install ."  # the install half is what `pip install -e .` did here
    assert python_part.startswith("python -c ")
    code = python_part.removeprefix("python -c ").strip('"')
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "({'answer': 42}, {'by': 'me'})"
    assert (daman_home / "config.json").read_text() == saved  # the test's DAMAN_HOME


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed; it is in the test extras")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _written(function) -> str:
    """``function``'s signature as the README writes it: names and defaults, no annotations."""
    parts, star = [], False
    for param in inspect.signature(function).parameters.values():
        if param.kind is param.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        default = "" if param.default is param.empty else f"={param.default!r}"
        parts.append(param.name + default)
    return f"`{function.__name__}({', '.join(parts)})`"


@pytest.mark.parametrize("name", ["push", "pull", "delete"])
def test_the_readme_s_signatures_are_the_real_ones(name: str) -> None:
    import daman

    assert f"| {_written(getattr(daman, name))} |" in (ROOT / "README.md").read_text()
