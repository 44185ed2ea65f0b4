"""The notebooks in notebooks/ run top to bottom (their code cells, in one namespace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ALL_NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _uses_magics(path: Path) -> bool:
    """Notebooks with ``%`` magics need IPython: test_magics_notebook.py runs those in a
    real kernel."""
    cells = json.loads(path.read_text())["cells"]
    return any(
        line.lstrip().startswith("%")
        for cell in cells
        if cell["cell_type"] == "code"
        for line in cell["source"]
    )


NOTEBOOKS = [path for path in ALL_NOTEBOOKS if not _uses_magics(path)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_runs(path: Path, daman_home: Path) -> None:
    cells = json.loads(path.read_text())["cells"]
    namespace: dict[str, object] = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    assert (daman_home / "config.json").exists()


def test_there_is_a_notebook() -> None:
    assert NOTEBOOKS and len(NOTEBOOKS) < len(ALL_NOTEBOOKS)
