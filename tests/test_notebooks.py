"""The tutorials in notebooks/ run top to bottom in a real Jupyter kernel (nbclient), as a user's
would, against the demo store (moto's S3 server on loopback, started by the notebook itself):
any error in a cell fails the test (widget outputs are fine). The kernel sees a home folder of
its own holding someone's saved configuration, which must come out unchanged. Then the magics
notebook's kernel completes a key through the Jupyter protocol."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TUTORIALS = [
    "01-quickstart.ipynb",
    "02-magics.ipynb",
    "03-panel.ipynb",
    "04-sharing-between-machines.ipynb",
    "05-large-arrays.ipynb",
]
SAVED = b'{"service": "aws", "storage_name": "team-bucket", "signing_key": "team"}\n'
"""Someone's setup in ~/.daman/config.json: a tutorial must neither use nor change it."""
USED = "import daman\nc = daman.current_config()\nused = f'{c.storage_name} {c.endpoint_url}'"
"""Run after the notebook: the store it used."""


def kernel_env(home: Path) -> dict[str, str]:
    """This process's environment with a home folder of the test's: the kernel never sees the
    real ~/.daman or ~/.aws, nor AWS credentials, nor a demo server of another run."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "DAMAN_"))
    }
    env.update(
        HOME=str(home),
        DAMAN_HOME=str(home / ".daman"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / ".aws" / "credentials"),
        AWS_CONFIG_FILE=str(home / ".aws" / "config"),
        JUPYTER_PLATFORM_DIRS="1",
        TMPDIR=str(home.parent / "tmp"),  # the demo's cache folders land here
    )
    return env


def kernel_manager(folder: Path) -> AsyncKernelManager:
    """A kernel on this very interpreter, from a kernelspec made here: the test depends on no
    globally registered ``python3`` kernel."""
    spec = folder / "kernels" / "daman-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "daman test", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return AsyncKernelManager(kernel_name="daman-test", kernel_spec_manager=specs)


def text_of(cell: nbformat.NotebookNode, kind: str | None = None) -> str:
    """A cell's streams (``stdout``/``stderr``), its error (``error``), or all of them with
    its plain-text results."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and kind in (None, output.name):
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data") and kind is None:
            parts.append(output.data.get("text/plain", ""))
        elif output.output_type == "error" and kind in (None, "error"):
            parts.append("\n".join(output.traceback) + "\n")
    return "".join(parts)


def test_the_tutorials_are_the_ones_the_readme_lists() -> None:
    assert [path.name for path in NOTEBOOKS] == TUTORIALS
    readme = (ROOT / "README.md").read_text()
    for name in TUTORIALS:
        assert re.search(rf"^- \[`{re.escape(name)}`\]\(notebooks/{name}\): \S", readme, re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_is_saved_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    # The first code cell starts the demo store, and a markdown cell before it says how to use
    # a real bucket instead, for this process only.
    first = next(i for i, cell in enumerate(nb.cells) if cell.cell_type == "code")
    assert "dm.demo.start(" in nb.cells[first].source
    before = "\n".join(cell.source for cell in nb.cells[:first])
    assert "save=False" in before and "storage_name=" in before


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_runs_in_a_jupyter_kernel_and_leaves_the_setup_alone(
    path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    (home / ".daman").mkdir(parents=True)
    (home / ".daman" / "config.json").write_bytes(SAVED)
    (tmp_path / "tmp").mkdir()
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        km=kernel_manager(tmp_path),
        timeout=120,  # per cell
        startup_timeout=60,
        allow_errors=False,  # an error in a cell fails the test (unless tagged raises-exception)
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.monotonic()
    with client.setup_kernel(env=kernel_env(home), cleanup_kc=True):
        client.execute()
        if path.name == "02-magics.ipynb":
            complete_a_key(client)
        # The tutorial used the demo store, not the saved team bucket.
        reply = client.wait_for_reply(client.kc.execute(USED, user_expressions={"c": "used"}))
    assert reply is not None and reply["content"]["status"] == "ok"
    used = reply["content"]["user_expressions"]["c"]["data"]["text/plain"]
    assert re.fullmatch(r"'daman-demo http://127\.0\.0\.1:\d+'", used), used
    print(f"{path.name}: {time.monotonic() - started:.1f} s")

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)  # every cell ran
    for cell in code:
        tagged = "raises-exception" in cell.metadata.get("tags", [])
        error = text_of(cell, "error")
        assert bool(error) == tagged, f"{path.name}: {cell.source}\n{text_of(cell)}"
        if tagged:  # a daman error is one line, with what to do next
            assert re.fullmatch(r"daman: error: [^\n]+\n", error), error
        assert "Traceback" not in text_of(cell, "stderr"), cell.source
    assert (home / ".daman" / "config.json").read_bytes() == SAVED
    assert sorted(p.name for p in (home / ".daman").iterdir()) == ["config.json"]
    assert not (home / ".aws").exists()


def complete_a_key(client: NotebookClient) -> None:
    """Completion through the Jupyter protocol, as a notebook front-end asks for it."""
    pushed = client.wait_for_reply(client.kc.execute("x = 1\n%dm_push x --key magics/after"))
    assert pushed is not None and pushed["content"]["status"] == "ok"
    reply = client.wait_for_reply(client.kc.complete("%dm_pull magics/a", 17))
    assert reply is not None
    assert reply["content"]["matches"] == ["magics/after"]
    assert (reply["content"]["cursor_start"], reply["content"]["cursor_end"]) == (9, 17)
