"""Fixtures: one real resource each.

- ``s3_endpoint``: moto's S3 server on 127.0.0.1 (port 0) for the whole session, its requests
  serialised (moto checks conditional writes without a lock; real S3 is atomic): the demo
  store's ``daman.demo.LoopbackS3``. Set
  ``DAMAN_TEST_S3_ENDPOINT`` (plus ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and
  optionally ``DAMAN_TEST_S3_BUCKET``) to run every test against another S3-compatible
  endpoint instead.
- ``daman_home``: ``DAMAN_HOME``, ``HOME`` and the AWS config files point into a temp folder,
  so no test touches the real ``~/.daman`` or ``~/.aws``.
- ``gcs_endpoint`` / ``azure_endpoint``: fake-gcs-server and Azurite on 127.0.0.1 for the
  whole session, started on first use (``tests/clouds.py``); ``gcs_bucket`` /
  ``azure_container``: a fresh bucket or container per test. ``DAMAN_TEST_GCS_BUCKET`` and
  ``DAMAN_TEST_AZURE_CONTAINER`` point them at a real account instead.
- ``config`` / ``manager``: parametrised over the backends (``local``, ``s3``, ``gcs``,
  ``azure``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import clouds
import pytest

import daman
from daman import Config, Manager
from daman.demo import LoopbackS3

TEST_ENDPOINT = os.environ.get("DAMAN_TEST_S3_ENDPOINT")
TEST_BUCKET = os.environ.get("DAMAN_TEST_S3_BUCKET")
BACKENDS = ["local", "s3", "gcs", "azure"]


# fake-gcs-server checks ifGenerationMatch on multipart uploads only, not on the resumable
# uploads daman sends above 8 MiB (tests/test_store_clouds.py proves it still does not): a race
# of two large creates can only be judged against real GCS (DAMAN_TEST_GCS_BUCKET).
_LARGE_RACES = {
    "test_concurrent_creates_exactly_one_wins",
    "test_two_processes_pushing_one_new_key_exactly_one_wins",
}


def _emulator_cannot_judge(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return (
        callspec is not None
        and getattr(item, "originalname", "") in _LARGE_RACES
        and callspec.params.get("backend") == "gcs"
        and "multipart" in callspec.id
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Large GCS create races run against real GCS only: on the emulator they are not
    collected (named in the report header), rather than generated and skipped."""
    if clouds.GCS_BUCKET:
        return
    dropped = [item for item in items if _emulator_cannot_judge(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _emulator_cannot_judge(item)]


def pytest_report_header(config: pytest.Config) -> str | None:
    if clouds.GCS_BUCKET:
        return None
    return (
        "daman: GCS races of two large creates run only with DAMAN_TEST_GCS_BUCKET "
        "(fake-gcs-server does not check ifGenerationMatch on resumable uploads)"
    )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    if TEST_ENDPOINT:
        yield TEST_ENDPOINT
        return
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = LoopbackS3()  # the demo's server: requests one at a time, as S3 checks writes
    try:
        yield server.endpoint
    finally:
        server.stop()


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket per test (or a fresh prefix in the given bucket on a real endpoint)."""
    if TEST_BUCKET:
        return f"{TEST_BUCKET}/daman-test-{uuid.uuid4().hex[:10]}"
    name = f"daman-test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str | None]:
    """fake-gcs-server's URL, or the endpoint (None: Google's) of DAMAN_TEST_GCS_BUCKET."""
    if clouds.GCS_BUCKET:
        yield clouds.GCS_ENDPOINT
        return
    with clouds.fake_gcs_server() as url:
        yield url


@pytest.fixture
def gcs_bucket(gcs_endpoint: str | None) -> Iterator[str]:
    """A fresh bucket per test (or a fresh prefix in DAMAN_TEST_GCS_BUCKET)."""
    client = clouds.gcs_client(gcs_endpoint)
    name = clouds.new_gcs_bucket(client)
    yield name
    clouds.empty_gcs(client, name)
    client.close()


@pytest.fixture(scope="session")
def azure_endpoint() -> Iterator[str | None]:
    """Azurite's account URL (its key in AZURE_STORAGE_KEY for the session, nothing else of
    Azure's in the environment), or DAMAN_TEST_AZURE_ENDPOINT with a real container."""
    if clouds.AZURE_CONTAINER:
        yield clouds.AZURE_ENDPOINT
        return
    with clouds.azurite() as url, clouds.environment(clouds.emulator_environment()):
        yield url


@pytest.fixture
def azure_container(azure_endpoint: str | None) -> Iterator[str]:
    """A fresh container per test (or a fresh prefix in DAMAN_TEST_AZURE_CONTAINER)."""
    client = clouds.azure_client(azure_endpoint)
    name = clouds.new_azure_container(client)
    yield name
    clouds.empty_azure(client, name)
    client.close()


@pytest.fixture(autouse=True)
def daman_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DAMAN_HOME", str(home / ".daman"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / ".aws" / "config"))
    daman.reset()
    yield home / ".daman"
    daman.reset()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_config(tmp_path: Path, backend: str, request: pytest.FixtureRequest):
    """Build a Config on the parametrised backend; keyword arguments override fields."""

    def make(**fields: object) -> Config:
        if backend == "s3":
            endpoint = request.getfixturevalue("s3_endpoint")
            base = dict(
                service="aws",
                storage_name=request.getfixturevalue("bucket"),
                endpoint_url=endpoint,
                region="us-east-1",
                connect_timeout=5,
                read_timeout=30,
                max_attempts=3,
            )
        elif backend in ("gcs", "azure"):
            base = dict(
                service=backend,
                storage_name=request.getfixturevalue(
                    "gcs_bucket" if backend == "gcs" else "azure_container"
                ),
                endpoint_url=request.getfixturevalue(f"{backend}_endpoint"),
                connect_timeout=5,
                read_timeout=30,
                max_attempts=3,
            )
        else:
            store = tmp_path / "store"
            store.mkdir(exist_ok=True)
            base = dict(service="local", storage_name=str(store))
        base.update(local_dir=str(tmp_path / "cache"), progress=False)
        base.update(fields)
        return Config(**base)  # type: ignore[arg-type]

    return make


@pytest.fixture
def config(make_config) -> Config:
    return make_config()


@pytest.fixture
def manager(config: Config) -> Iterator[Manager]:
    with Manager(config) as m:
        yield m
