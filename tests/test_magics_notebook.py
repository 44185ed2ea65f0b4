"""notebooks/magics.ipynb runs top to bottom in a real Jupyter kernel (nbclient), as a user's
would (the magics need IPython, so plain ``exec`` cannot run it); then the kernel completes a
key through the Jupyter protocol."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "magics.ipynb"


@pytest.fixture
def kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """A kernel on this very interpreter, from a kernelspec made here: the test depends on no
    globally registered ``python3`` kernel. It inherits the test's environment (``HOME`` and
    ``DAMAN_HOME`` in a temp folder)."""
    spec = tmp_path / "kernels" / "daman-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "daman test", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return AsyncKernelManager(kernel_name="daman-test", kernel_spec_manager=specs)


def text_of(cell: nbformat.NotebookNode, stream: str | None = None) -> str:
    """A cell's stream output (``stdout``/``stderr``), its error (``error``), or all of them
    with its plain-text results."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and stream in (None, output.name):
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data") and stream is None:
            parts.append(output.data.get("text/plain", ""))
        elif output.output_type == "error" and stream in (None, "error"):
            parts.append("\n".join(output.traceback) + "\n")
    return "".join(parts)


def test_the_notebook_is_saved_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_magics_notebook_runs_in_a_jupyter_kernel(
    kernel_manager: AsyncKernelManager,
    daman_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's temp store and cache go here
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(
        nb,
        km=kernel_manager,
        timeout=60,
        startup_timeout=60,
        allow_errors=False,  # any exception in a cell fails the test
        resources={"metadata": {"path": str(tmp_path)}},
    )
    with client.setup_kernel(cleanup_kc=True):
        client.execute()
        # Completion through the Jupyter protocol, as a notebook front-end asks for it.
        pushed = client.wait_for_reply(client.kc.execute("x = 1\n%dm_push x --key demo/after"))
        assert pushed is not None and pushed["content"]["status"] == "ok"
        reply = client.wait_for_reply(client.kc.complete("%dm_pull demo/a", 15))
        assert reply is not None
        assert reply["content"]["matches"] == ["demo/after"]
        assert (reply["content"]["cursor_start"], reply["content"]["cursor_end"]) == (9, 15)

    cells = [cell for cell in nb.cells if cell.cell_type == "code"]

    def output(source_start: str, stream: str | None = None) -> str:
        (cell,) = [c for c in cells if c.source.startswith(source_start)]
        return text_of(cell, stream)

    # The kernel runs this venv (paths compared resolved: a venv made through a relative
    # path or a symlink names the same interpreter differently).
    assert Path(output("import sys").strip()).resolve() == Path(sys.executable).resolve()
    assert (daman_home / "config.json").exists()  # ... with the test's DAMAN_HOME
    assert output("prices = ").startswith("pushed prices to demo/prices (")
    pulled = output("del prices")
    assert pulled.startswith("pulled demo/prices from the local cache (")
    assert "into prices, prices_meta\n" in pulled
    assert "(1000, 20)" in pulled and "'rows': 1000" in pulled
    assert output("same = %dm_pull").rstrip().endswith("True")
    assert output("%dm_ls demo/").splitlines()[0].endswith("  cached     demo/prices")
    assert "meta:          {'rows': 1000, 'source': 'simulated'}" in output("%dm_info")
    assert "entries:    1 cached, 0 persisted" in output("%dm_status")
    first, second = [text_of(c) for c in cells if c.source.startswith("%%dm_cache")]
    assert first.startswith("demo/price-summary: ran the cell and pushed summary (")
    assert second.startswith("demo/price-summary: set summary from the local cache (")
    assert second.rstrip().endswith("cell not run")
    assert "'mean'" in output("summary")
    error = output("%dm_pull demo/no-such-key", "error")  # the cell failed, in one line
    assert error.startswith("daman: error: key 'demo/no-such-key' not found")
    assert error.count("\n") == 1 and output("%dm_pull demo/no-such-key") == error
    cleanup = output("%dm_delete demo/prices --remote")
    assert "deleted demo/prices (the local copy and the stored object)" in cleanup
    last = cleanup.splitlines()[-1]
    assert last.startswith(f"no keys under 'demo/' in local folder {tmp_path}/daman-store-")
