"""The panel in a real browser: Voila serves a notebook showing ``Manager(...).panel()`` for a
store on moto's S3 server, headless Debian chromium (driven by Playwright) clicks through it.

Each page load runs the notebook in a fresh kernel (Voila's way), all on one store and one
``local_dir``, which this process also opens to check what the clicks did. Every test saves a
screenshot under build/screenshots/ (git-ignored; docs/panel.png is one of them).

Needs ``/usr/bin/chromium`` (``python tests/system/install.py`` installs it): without it these
tests fail, they do not skip. Never ``playwright install``: Playwright drives Debian's chromium.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import TEST_BUCKET, s3_client

from daman import Config, Manager
from daman.cache import Cache

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]  # fmt: skip
MiB = 1024 * 1024

CELL = """\
import os
from daman import Config, Manager

manager = Manager(Config(
    storage_name=os.environ["DAMAN_PANEL_STORE"],
    service="aws",
    endpoint_url=os.environ["DAMAN_PANEL_ENDPOINT"],
    region="us-east-1",
    local_dir=os.environ["DAMAN_PANEL_CACHE"],
    allocated_space="64MiB",
    progress=False,
))
manager.panel()
"""

# key -> (size, what this machine holds: "persisted", "cached" or "stored")
SEED = {
    "README": (2_000, "cached"),
    "team/model/v1": (6 * MiB, "persisted"),
    "team/model/v2": (5 * MiB, "stored"),
    "team/model/v3": (7 * MiB, "cached"),
    "team/data/2026-10.csv": (900_000, "stored"),
    "team/data/2026-11.csv": (1_200_000, "cached"),
    "team/features-v2": (300_000, "cached"),
    "raw/export-2026-11.csv": (3 * MiB, "stored"),
    "shared/notes": (40_000, "persisted"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60) -> None:
    # A TCP connect, not an HTTP GET of "/": a GET of a Voila page would run the notebook.
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"voila exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"voila did not listen on port {port} in {timeout} s; see {log}")


def _eventually(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll a side effect of a click: the click returns before the kernel handles it."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def site(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bucket seeded with keys under prefixes, and a local_dir holding some of them."""
    if TEST_BUCKET:
        storage = f"{TEST_BUCKET}/daman-panel-{uuid.uuid4().hex[:10]}"
    else:
        storage = f"daman-panel-{uuid.uuid4().hex[:10]}"
        s3_client(s3_endpoint).create_bucket(Bucket=storage)
    work = tmp_path_factory.mktemp("panel-browser")
    config = Config(
        storage_name=storage,
        service="aws",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        local_dir=str(work / "cache"),
        allocated_space=64 * MiB,
        progress=False,
    )
    with Manager(config) as manager:
        for n, (key, (size, state)) in enumerate(SEED.items()):
            manager.push(os.urandom(size), key, meta={"seed": n}, persist=state == "persisted")
            if state == "stored":
                manager.delete(key)
    return {"config": config, "work": work}


def _write_notebook(path: Path) -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)])
    notebook.metadata["kernelspec"] = {
        "name": "python3", "display_name": "Python 3", "language": "python",
    }  # fmt: skip
    nbformat.write(notebook, path)


@contextlib.contextmanager
def _voila(notebook: str, folder: Path, env: dict[str, str]) -> Iterator[str]:
    """Voila serving ``folder/notebook`` on a free port of 127.0.0.1: its URL. Every page load
    runs the notebook in a fresh kernel, which inherits ``env``."""
    port = _free_port()
    log = folder / "voila.log"
    voila = Path(sys.executable).with_name("voila")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(voila), notebook, f"--port={port}", "--Voila.ip=127.0.0.1",
                "--no-browser", "--show_tracebacks=True",
            ],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_port(proc, port, log)
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()  # Voila shuts its kernels down on SIGTERM
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def voila_url(site: dict[str, Any]) -> Iterator[str]:
    config, work = site["config"], site["work"]
    _write_notebook(work / "panel.ipynb")
    home = work / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),  # the kernels never see the real ~/.daman or ~/.aws
        "DAMAN_HOME": str(home / ".daman"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "DAMAN_PANEL_STORE": config.storage_name,
        "DAMAN_PANEL_ENDPOINT": config.endpoint_url,
        "DAMAN_PANEL_CACHE": config.local_dir,
    }
    with _voila("panel.ipynb", work, env) as url:
        yield url


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the panel's browser tests need Debian's chromium. Run "
            "`python tests/system/install.py` (README's test command does), or set CHROMIUM."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, voila_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(voila_url)
    # The panel is drawn once the kernel ran the cell; its first level once the listing came.
    expect(page.get_by_role("button", name="team/", exact=True)).to_be_visible(timeout=90_000)
    try:
        yield page
    finally:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"), full_page=True)
        context.close()


def _button(page: Any, name: str) -> Any:
    return page.get_by_role("button", name=name, exact=True)


def _open(page: Any, *prefixes: str) -> None:
    from playwright.sync_api import expect

    for prefix in prefixes:
        _button(page, prefix).first.click()
        crumb = page.locator(".daman-panel .widget-button.mod-primary", has_text=prefix)
        expect(crumb).to_be_visible()  # the breadcrumb of the level now shown


def test_the_keys_of_the_store_appear(page: Any, site: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    for name in ("team/", "raw/", "shared/", "README"):
        expect(_button(page, name)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^2\.\d KiB\s*\S+ \S+\s*cached$"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"of 64\.0 MiB, 6\.0 MiB persisted"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"next to evict: "))).to_be_visible()


def test_navigating_into_a_prefix_shows_its_keys(page: Any) -> None:
    from playwright.sync_api import expect

    _open(page, "team/")
    for name in ("model/", "data/", "features-v2"):
        expect(_button(page, name)).to_be_visible()
    expect(_button(page, "README")).to_have_count(0)
    _open(page, "model/")
    for name in ("v1", "v2", "v3"):
        expect(_button(page, name)).to_be_visible()
    expect(page.get_by_title("persist team/model/v2 (pulls it first)")).to_be_visible()
    _button(page, "v3").click()  # the details of a key
    expect(page.get_by_text("pushed_by", exact=True)).to_be_visible()
    expect(page.get_by_text('obj, meta = dm.pull("team/model/v3")')).to_be_visible()
    expect(page.get_by_text("%dm_pull team/model/v3")).to_be_visible()


def test_clicking_a_persist_toggle_pins_the_entry(page: Any, site: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    config = site["config"]
    cache = Cache(config.cache_dir, config.allocated_space)
    try:
        assert cache.get("team/data/2026-11.csv") is not None
        assert not cache.get("team/data/2026-11.csv").persist
        _open(page, "team/", "data/")
        toggle = _button(page, "persist 2026-11.csv")
        toggle.click()
        expect(toggle).to_have_class(re.compile(r"\bmod-active\b"))
        _eventually(lambda: cache.get("team/data/2026-11.csv").persist, "the entry is persisted")
        expect(page.get_by_text("persisted team/data/2026-11.csv", exact=False)).to_be_visible()
        # A key not cached here: the toggle fetches it first, then pins it.
        assert cache.get("team/data/2026-10.csv") is None
        _button(page, "persist 2026-10.csv").click()
        _eventually(
            lambda: (e := cache.get("team/data/2026-10.csv")) is not None and e.persist,
            "the key was fetched and persisted",
        )
    finally:
        cache.close()


def test_a_delete_from_the_store_asks_for_confirmation(page: Any, site: dict[str, Any]) -> None:
    from playwright.sync_api import expect

    _open(page, "team/", "model/")
    _button(page, "v3").click()
    _button(page, "delete team/model/v3 from the store...").click()
    bucket = site["config"].storage_name
    asked = rf"Delete team/model/v3 \(7\.0 MiB\) from s3://{re.escape(bucket)}/ for everyone"
    question = page.get_by_text(re.compile(asked))
    expect(question).to_be_visible()
    expect(_button(page, "delete team/model/v3 from the store")).to_be_visible()
    with Manager(site["config"]) as manager:
        assert manager.exists("team/model/v3")  # asked, not done
        _button(page, "cancel: keep team/model/v3").click()
        expect(question).to_be_hidden()
        expect(page.get_by_text("nothing deleted")).to_be_visible()
        assert manager.exists("team/model/v3")


def test_the_panel_at_work(page: Any) -> None:
    """The screenshot for the README: a level, a key's details and a bulk selection."""
    from playwright.sync_api import expect

    _open(page, "team/", "model/")
    _button(page, "v3").click()
    expect(page.get_by_text("pushed_by", exact=True)).to_be_visible()
    page.get_by_title("select team/model/v1").check()
    page.get_by_title("select team/model/v2").check()
    expect(page.get_by_text("2 selected", exact=False)).to_be_visible()
    expect(_button(page, re.compile(r"pull 1 key: downloads"))).to_be_visible()


# -- the same panel in JupyterLab 4 and Notebook 7 ----------------------------------------------

APPS = {
    # app: (command, the page of the notebook)
    "jupyterlab": (
        ["jupyter-lab", "--LabApp.expose_app_in_browser=True"],
        "lab/tree/panel.ipynb?reset",
    ),
    "notebook7": (
        ["jupyter-notebook", "--JupyterNotebookApp.expose_app_in_browser=True"],
        "notebooks/panel.ipynb",
    ),
}


def _run_all_cells(page: Any) -> None:
    """Run All, again until the cell has started: a command given while the app is still
    settling (the notebook not yet its current widget, on a slow machine) does nothing."""
    from playwright.sync_api import expect

    prompt = page.locator(".jp-Notebook .jp-InputPrompt").first
    for _ in range(8):
        # Not awaited: the command's promise ends when the cells do, or never if it did not
        # start them (the prompt below tells).
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            expect(prompt).not_to_have_text(re.compile(r"^\[\s*\]:?$"), timeout=15_000)
            return
        except AssertionError:
            continue
    raise AssertionError("Run All never started the notebook's cell:\n" + page.content()[:2000])


@pytest.mark.timeout(600)  # a whole Jupyter server and its kernel on a busy machine
@pytest.mark.parametrize("app", list(APPS))
def test_the_panel_renders_in_jupyterlab_and_notebook_7(
    app: str, browser: Any, site: dict[str, Any], tmp_path: Path
) -> None:
    """Core ipywidgets only: the same widget draws in JupyterLab 4 and Notebook 7 (their own
    widget managers), run as a person runs a notebook there (Run All)."""
    from playwright.sync_api import expect

    config = site["config"]
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _write_notebook(folder / "panel.ipynb")
    home = tmp_path / "app-home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "DAMAN_HOME": str(home / ".daman"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "DAMAN_PANEL_STORE": config.storage_name,
        "DAMAN_PANEL_ENDPOINT": config.endpoint_url,
        "DAMAN_PANEL_CACHE": config.local_dir,
    }
    command, path = APPS[app]
    port = _free_port()
    log = tmp_path / f"{app}.log"
    exe = Path(sys.executable).with_name(command[0])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(exe), *command[1:], "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                "--allow-root", "--IdentityProvider.token=", "--ServerApp.password=",
                f"--ServerApp.root_dir={folder}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
                f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
            ],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(90_000)
        try:
            _wait_port(proc, port, log)
            page.goto(f"http://127.0.0.1:{port}/{path}")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            page.wait_for_function("() => window.jupyterapp !== undefined")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            _run_all_cells(page)
            output = page.locator(".jp-OutputArea")
            expect(output.get_by_role("button", name="team/", exact=True)).to_be_visible(
                timeout=120_000
            )
            expect(output.get_by_text(re.compile(r"of 64\.0 MiB"))).to_be_visible()
            output.get_by_role("button", name="team/", exact=True).first.click()
            expect(output.get_by_role("button", name="model/", exact=True)).to_be_visible()
        finally:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / f"panel-in-{app}.png"))
            context.close()
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the tutorial notebooks/03-panel.ipynb, as it is, on the demo store ----------------------


def test_the_panel_tutorial_in_voila_on_the_demo_store(browser: Any, tmp_path: Path) -> None:
    """notebooks/03-panel.ipynb with nothing configured: the notebook starts its own demo store
    in the kernel, pins a model and draws the panel; here a person opens the model level and
    pins the other model, and the disc bar's line follows. Its screenshot is kept."""
    from playwright.sync_api import expect

    shutil.copy(ROOT / "notebooks" / "03-panel.ipynb", tmp_path / "03-panel.ipynb")
    home = tmp_path / "home"  # someone's saved setup, which the tutorial leaves alone
    (home / ".daman").mkdir(parents=True)
    saved = b'{"service": "aws", "storage_name": "team-bucket"}\n'
    (home / ".daman" / "config.json").write_bytes(saved)
    (tmp_path / "tmp").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAMAN_"))},
        "HOME": str(home),
        "DAMAN_HOME": str(home / ".daman"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "TMPDIR": str(tmp_path / "tmp"),  # the demo's cache folder lands here
    }
    with _voila("03-panel.ipynb", tmp_path, env) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        try:
            page.goto(url)
            expect(_button(page, "team/")).to_be_visible(timeout=120_000)
            # The notebook ran to its end: v1 persisted, v2 pinned and unpinned (cached).
            disc = page.get_by_text(re.compile(r"of 16\.0 MiB, \d\.\d MiB persisted"))
            expect(disc).to_have_text(re.compile(r"of 16\.0 MiB, 3\.0 MiB persisted"))
            _open(page, "team/", "model/")
            expect(
                page.get_by_text(re.compile(r"^3\.0 MiB\s*\S+ \S+\s*persisted$"))
            ).to_be_visible()
            toggle = _button(page, "persist v2")
            toggle.click()
            expect(toggle).to_have_class(re.compile(r"\bmod-active\b"))
            expect(disc).to_have_text(re.compile(r"of 16\.0 MiB, 8\.0 MiB persisted"))
            (cache_dir,) = (tmp_path / "tmp").glob("daman-demo-*/cache-1")
            cache = Cache(cache_dir, 16 * MiB)
            try:
                assert cache.get("team/model/v2").persist  # the kernel's cache, on disc
                assert cache.get("team/model/v1").persist
            finally:
                cache.close()
        finally:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "notebook-03-panel.png"), full_page=True)
            context.close()
    assert (home / ".daman" / "config.json").read_bytes() == saved
