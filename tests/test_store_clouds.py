"""What the GCS and Azure backends promise beyond the store contract (tests/test_store.py runs
that on them too): the delimiter listing, names that are not keys, a forked child's own
client, credentials, missing buckets and containers, unreachable endpoints, lost answers and
transient faults, the extras, and where the emulators fall short.

Everything talks HTTP to fake-gcs-server and Azurite on 127.0.0.1 (``tests/clouds.py``), or to
a real account when DAMAN_TEST_GCS_BUCKET / DAMAN_TEST_AZURE_CONTAINER say so; nothing in the
SDKs is patched.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import clouds
import pytest
from faultproxy import FaultProxy, at_most, black_hole, closed_port, first, fraction
from reliability_helpers import check_object, make_object

from daman import Config, Manager, OfflineWarning
from daman.cli import configure_main
from daman.errors import (
    ConfigError,
    CredentialsError,
    DamanError,
    InvalidKeyError,
    KeyNotFoundError,
    StorageNotFoundError,
    StoreUnavailableError,
)
from daman.store import open_store
from daman.store.azure import AzureStore
from daman.store.base import Level, ObjectInfo, Store

MiB = 1024 * 1024
CLOUDS = ["gcs", "azure"]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip() and "\n" not in message, repr(message)
    return message


@pytest.fixture
def store(make_config: Callable[..., Config]) -> Iterator[Store]:
    s = open_store(make_config())
    yield s
    s.close()


def _cloud(request: pytest.FixtureRequest, service: str) -> tuple[str | None, str]:
    """(endpoint, storage_name) of a fresh bucket or container."""
    endpoint = request.getfixturevalue(f"{service}_endpoint")
    name = request.getfixturevalue("gcs_bucket" if service == "gcs" else "azure_container")
    return endpoint, name


def _config(service: str, storage_name: str, endpoint: str | None, **fields: Any) -> Config:
    base: dict[str, Any] = dict(
        service=service, storage_name=storage_name, endpoint_url=endpoint,
        connect_timeout=5, read_timeout=30, max_attempts=3,
    )  # fmt: skip
    base.update(fields)
    return Config(**base)


# -- list_level: one level, paged; the same answers on every backend ----------------------------

LEVEL_KEYS = ["a", "a/b", "a/b/c", "a/bc", "a/d/e", "a-b", "b/x", "b/y/z", "c", "é/k"]


def _all_pages(store: Store, prefix: str, limit: int) -> tuple[list[str], list[str], int]:
    prefixes: list[str] = []
    keys: list[str] = []
    token = None
    pages = 0
    while True:
        level = store.list_level(prefix, token=token, limit=limit)
        assert isinstance(level, Level) and level.prefix == prefix
        assert len(level.prefixes) + len(level.objects) <= limit
        prefixes += level.prefixes
        keys += [o.key for o in level.objects]
        pages += 1
        if level.token is None:
            return prefixes, keys, pages
        token = level.token
        assert pages < 50, "the listing does not end"


def test_list_level_shows_one_level_in_pages(store: Store, tmp_path: Path) -> None:
    src = _write(tmp_path / "src", b"abc")
    etags = {key: store.put(key, src, overwrite=False).etag for key in LEVEL_KEYS}

    top = store.list_level("")
    assert top.prefixes == ["a/", "b/", "é/"]
    assert [o.key for o in top.objects] == ["a", "a-b", "c"]
    assert [(o.size, o.etag) for o in top.objects] == [(3, etags[k]) for k in ("a", "a-b", "c")]
    assert top.token is None

    a = store.list_level("a/")
    assert (a.prefixes, [o.key for o in a.objects]) == (["a/b/", "a/d/"], ["a/b", "a/bc"])
    assert [o.key for o in store.list_level("a/b/").objects] == ["a/b/c"]
    assert store.list_level("nothing/").prefixes == [] == store.list_level("nothing/").objects

    for limit in (1, 2, 3):  # every page full but the last, nothing lost or repeated
        prefixes, keys, pages = _all_pages(store, "", limit)
        assert (prefixes, keys) == (["a/", "b/", "é/"], ["a", "a-b", "c"]), limit
        assert pages >= 6 // limit
        prefixes, keys, _ = _all_pages(store, "b/", limit)
        assert (prefixes, keys) == (["b/y/"], ["b/x"]), limit


@pytest.mark.parametrize("prefix", ["/a/", "a//", "../"])
def test_list_level_refuses_invalid_prefixes(store: Store, prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.list_level(prefix)


@pytest.mark.parametrize("backend", CLOUDS)
def test_names_that_are_not_keys_are_never_listed(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Console "folders" (names ending in '/'), empty parts and '.' parts, written by other
    tools: neither list nor list_level returns them, so nothing listed fails to head."""
    endpoint, name = _cloud(request, backend)
    store = open_store(_config(backend, f"{name}/shared", endpoint))
    try:
        store.put("team/v1", _write(tmp_path / "v1", b"v1"), overwrite=False)
        raws = ["shared/", "shared/team/", "shared/ pad", "shared/team/ x"]
        if backend == "gcs":  # Azure's SDK signs the URL before normalising these away
            raws += ["shared/team//y", "shared/./z"]
        for raw in raws:
            clouds.raw_put(backend, endpoint, name, raw, b"foreign")
        keys = [info.key for info in store.list()]
        assert keys == ["team/v1"]
        for key in keys:
            store.head(key)
        top = store.list_level("")
        assert (top.prefixes, top.objects) == (["team/"], [])
        assert [o.key for o in store.list_level("team/").objects] == ["team/v1"]
    finally:
        store.close()


@pytest.mark.parametrize("backend", CLOUDS)
def test_storage_prefix_keeps_to_its_own_names(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    endpoint, name = _cloud(request, backend)
    store = open_store(_config(backend, f"{name}/some/prefix/", endpoint))
    try:
        big = os.urandom(9 * MiB)
        store.put("big", _write(tmp_path / "big", big), overwrite=False)
        store.put("d/e", _write(tmp_path / "e", b"eee"), overwrite=False)
        for neighbour in ("some/prefixk", "some/prefix-other/k", "some/k"):
            clouds.raw_put(backend, endpoint, name, neighbour, b"foreign")
        assert [(i.key, i.size) for i in store.list()] == [("big", len(big)), ("d/e", 3)]
        with pytest.raises(KeyNotFoundError):
            store.head("prefixk")
        store.get("big", tmp_path / "got")
        assert (tmp_path / "got").read_bytes() == big
        store.delete("big")
        assert [i.key for i in store.list()] == ["d/e"]
    finally:
        store.close()


# -- get: the size before the bytes, every range once -------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, 20 * MiB + 5], ids=["empty", "small", "parts"])
def test_get_tells_the_size_first_and_every_range_once(
    store: Store, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    store.put("k", _write(tmp_path / "src", data), overwrite=False)
    events: list[tuple[str, int, int]] = []
    told_bytes: list[tuple[int, bytes]] = []

    def on_size(n: int) -> None:
        events.append(("size", n, 0))

    def on_written(offset: int, length: int, data: bytes | memoryview | None = None) -> None:
        events.append(("written", offset, length))
        if data is not None:  # a writer that still holds the range's bytes passes them on
            assert len(data) == length
            told_bytes.append((offset, bytes(data)))

    store.get("k", tmp_path / "dest", on_size=on_size, on_written=on_written)
    assert (tmp_path / "dest").read_bytes() == data
    assert all(data[offset : offset + len(told)] == told for offset, told in told_bytes)
    if size == 0 and not events:  # no bytes arrive: hearing the size is optional (S3 does not)
        return
    assert events[0] == ("size", size, 0)
    covered = sorted((o, n) for kind, o, n in events[1:] if kind == "written")
    assert all(kind == "written" for kind, _, _ in events[1:])
    position = 0
    for offset, length in covered:
        assert offset == position, covered
        position += length
    assert position == size


# -- fork: a child never uses its parent's connections ---------------------------------------

_FORKED: Store | None = None
_TOGETHER: Any = None  # a Barrier the forked workers inherit
_PARENTS_CLIENT: Any = None


def _child_rounds(args: tuple[int, int, str]) -> list[str]:
    """In a forked pool worker: push and pull this worker's own key, several rounds, through
    the store inherited from the parent."""
    worker, rounds, folder = args
    assert _FORKED is not None
    # The direct check: the child's client (and so its connection pool) is its own.
    assert _FORKED.client is not _PARENTS_CLIENT  # type: ignore[attr-defined]
    digests = []
    for n in range(rounds):
        # All workers send at the same moment: on a shared kept-alive socket, requests and
        # answers would cross (a broken fork safety fails here most of the time).
        _TOGETHER.wait(30)
        for _ in range(3):
            _FORKED.head("parent")
        data = f"worker {worker} round {n} ".encode() * (1000 + 37 * worker)
        src = _write(Path(folder) / f"src-{worker}-{n}", data)
        _FORKED.put(f"fork/{worker}", src, overwrite=True)
        dest = Path(folder) / f"dest-{worker}-{n}"
        _FORKED.get(f"fork/{worker}", dest)
        _FORKED.head(f"fork/{worker}")
        digests.append(hashlib.sha256(dest.read_bytes()).hexdigest())
        assert dest.read_bytes() == data, (worker, n)
    return digests


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", CLOUDS)  # S3's is tested with it; local has no pool
def test_forked_children_use_their_own_connections(
    backend: str, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """The store is used in the parent (its connection pool now holds kept-alive sockets),
    then a fork pool's children push and pull their own keys through the store object they
    inherited, all starting each round at once: each gets its own bytes back, every round,
    each uses a client of its own, and the parent still works. (Without the fork check the
    crossed answers show in most runs; the client check fails in every run.)"""
    global _FORKED, _TOGETHER, _PARENTS_CLIENT
    workers, rounds = 6, 8
    store = open_store(make_config())
    _FORKED = store
    _TOGETHER = multiprocessing.get_context("fork").Barrier(workers)
    try:
        src = _write(tmp_path / "parent", b"parent " * 1000)
        store.put("parent", src, overwrite=False)
        store.get("parent", tmp_path / "parent-got")
        store.head("parent")
        _PARENTS_CLIENT = store.client  # type: ignore[attr-defined]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(
                _child_rounds, [(w, rounds, str(tmp_path)) for w in range(workers)], chunksize=1
            )
        for worker, digests in enumerate(results):
            data = f"worker {worker} round {rounds - 1} ".encode() * (1000 + 37 * worker)
            assert digests[-1] == hashlib.sha256(data).hexdigest()
        # The parent's own client was neither used nor closed by the children.
        store.get("parent", tmp_path / "parent-again")
        assert (tmp_path / "parent-again").read_bytes() == src.read_bytes()
        assert sorted(i.key for i in store.list("fork/")) == [f"fork/{w}" for w in range(workers)]
    finally:
        _FORKED = _TOGETHER = _PARENTS_CLIENT = None
        store.close()


# -- configuration, extras, credentials -------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "name", "word"),
    [
        ("gcs", "AB", "bucket"),
        ("gcs", "-leading-dash", "bucket"),
        ("gcs", "has space/prefix", "bucket"),
        ("azure", "ab", "container"),
        ("azure", "Upper", "container"),
        ("azure", "double--dash", "container"),
        ("azure", "under_score/prefix", "container"),
    ],
)
def test_malformed_bucket_and_container_names(service: str, name: str, word: str) -> None:
    with pytest.raises(ConfigError, match=word) as caught:
        Config(service=service, storage_name=name)
    _one_line(caught.value)


def test_well_formed_names_and_services_are_accepted() -> None:
    Config(service="gcs", storage_name="my-bucket.example_1/team/a")
    Config(service="azure", storage_name="my-container-2/team")
    with pytest.raises(ConfigError, match="gcs, azure"):
        Config(service="gcp", storage_name="x")


@pytest.mark.parametrize(("service", "module"), [("gcs", "google.cloud.storage"),
                                                   ("azure", "azure.storage.blob")])  # fmt: skip
def test_a_missing_sdk_names_the_extra(service: str, module: str, tmp_path: Path) -> None:
    """In a fresh interpreter where the SDK cannot be imported (``sys.modules[name] = None``
    is Python's own way to say a module is absent), opening the store says which extra to
    install, in one line."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from daman import Config, DamanError\n"
        "from daman.store import open_store\n"
        f"config = Config(service={service!r}, storage_name='some-bucket')\n"
        "try:\n"
        "    open_store(config)\n"
        "except DamanError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.startswith("ConfigError") and f"daman[{service}]" in out, out
    assert out.count("\n") == 1


@pytest.fixture
def no_cloud_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Google or Azure credentials anywhere, and no metadata server asked (HOME is already
    a temp folder: no gcloud or az sign-in in it)."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "CLOUDSDK_CONFIG",
                 "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT",
                 "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                 "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # google-auth: do not probe a metadata server


@pytest.mark.timeout(60)
def test_gcs_without_credentials(no_cloud_credentials: None) -> None:
    config = Config(service="gcs", storage_name="some-bucket", endpoint_url=closed_port()
                    .replace("http://", "https://"))  # fmt: skip
    with pytest.raises(CredentialsError) as caught:
        open_store(config).check()
    message = _one_line(caught.value)
    assert "gcloud auth application-default login" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message


@pytest.mark.timeout(60)
def test_gcs_with_an_unreadable_credentials_file(
    no_cloud_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(_write(tmp_path / "key.json", b"{")))
    with pytest.raises(CredentialsError) as caught:
        open_store(Config(service="gcs", storage_name="some-bucket")).head("k")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in _one_line(caught.value)


@pytest.mark.timeout(60)
def test_azure_emulator_endpoint_without_a_key(no_cloud_credentials: None) -> None:
    """No access token is ever sent over plain http, so an http endpoint needs a key."""
    config = Config(service="azure", storage_name="some-container",
                    endpoint_url=closed_port() + "/devstoreaccount1")  # fmt: skip
    with pytest.raises(CredentialsError) as caught:
        open_store(config).check()
    assert "AZURE_STORAGE_KEY" in _one_line(caught.value)


@pytest.mark.timeout(60)
def test_azure_without_any_account(no_cloud_credentials: None) -> None:
    with pytest.raises(CredentialsError) as caught:
        open_store(Config(service="azure", storage_name="some-container")).head("k")
    message = _one_line(caught.value)
    assert "endpoint_url" in message and "AZURE_STORAGE_CONNECTION_STRING" in message


@pytest.mark.timeout(120)
def test_azure_https_account_without_any_sign_in(no_cloud_credentials: None) -> None:
    """DefaultAzureCredential finds nothing (no variables, no az login, no managed identity
    reachable): a CredentialsError saying what to set, not a traceback."""
    config = Config(service="azure", storage_name="some-container", max_attempts=1,
                    connect_timeout=2, read_timeout=2,
                    endpoint_url=closed_port().replace("http://", "https://"))  # fmt: skip
    with pytest.raises((CredentialsError, StoreUnavailableError)) as caught:
        open_store(config).check()
    message = _one_line(caught.value)
    if isinstance(caught.value, CredentialsError):
        assert "az login" in message


def test_an_azure_force_push_copies_its_record_on_azures_side(
    azure_endpoint: str | None, azure_container: str, tmp_path: Path
) -> None:
    """A force push writes the key from its version record with Copy Blob: its bytes are
    not sent a second time (the blob says it was copied, and from the record)."""
    store = open_store(_config("azure", azure_container, azure_endpoint))
    try:
        data = os.urandom(3 * MiB)
        src = _write(tmp_path / "a", data)
        store.put("rec/1", src, overwrite=False)
        store.put("k", _write(tmp_path / "b", b"older"), overwrite=False)
        told: list[int] = []
        assert store.copies(len(data), overwrite=True)
        info = store.put_copy("k", src, source="rec/1", overwrite=True, progress=told.append)
        copy = store._blob("k").get_blob_properties().copy  # type: ignore[attr-defined]
        assert copy.status == "success" and copy.source.endswith("/rec/1")
        assert (info.size, info.etag) == (len(data), store.head("k").etag)
        assert sum(told) == len(data)  # a progress bar still reaches its end
        store.get("k", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == data
    finally:
        store.close()


class _RefusedCopySource(AzureStore):
    """Names a copy's source with a signature the account refuses: what a sign-in that may
    not read a copy's source meets (Azure answers 403 CannotVerifyCopySource)."""

    def _copy_source(self, source: str) -> str:
        return super()._copy_source(source) + "?sv=2021-08-06&sr=b&sp=r&sig=bm90LXZhbGlk"


def test_an_azure_force_push_sends_the_bytes_when_the_copy_is_refused(
    azure_endpoint: str | None, azure_container: str, tmp_path: Path
) -> None:
    """A refused copy is not a missing record (the same error code, another status; a
    missing one is KeyNotFoundError: tests/test_store.py): the push sends the bytes
    instead, and the key holds them."""
    store = _RefusedCopySource(_config("azure", azure_container, azure_endpoint))
    try:
        data = os.urandom(1000)
        src = _write(tmp_path / "a", data)
        store.put("rec/1", src, overwrite=False)
        store.put("k", _write(tmp_path / "b", b"older"), overwrite=False)
        info = store.put_copy("k", src, source="rec/1", overwrite=True)
        copy = store._blob("k").get_blob_properties().copy
        assert copy.status is None  # uploaded, not copied
        assert info.etag == store.head("k").etag
        store.get("k", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == data
    finally:
        store.close()


class _PendingCopy(AzureStore):
    """Reports each copy as pending, as Azure may answer one: daman must wait for it (here
    it is done, as Azurite's are) and read the result from the blob's properties."""

    def _start_copy(self, blob: Any, source: str) -> dict[str, Any] | None:
        copied = super()._start_copy(blob, source)
        assert copied is not None
        return {**copied, "copy_status": "pending", "etag": None}


def test_an_azure_copy_answered_pending_is_waited_for(
    azure_endpoint: str | None, azure_container: str, tmp_path: Path
) -> None:
    store = _PendingCopy(_config("azure", azure_container, azure_endpoint))
    try:
        data = os.urandom(1000)
        src = _write(tmp_path / "a", data)
        store.put("rec/1", src, overwrite=False)
        info = store.put_copy("k", src, source="rec/1", overwrite=True)
        assert store._blob("k").get_blob_properties().copy.status == "success"
        assert (info.size, info.etag) == (len(data), store.head("k").etag)
    finally:
        store.close()


@pytest.mark.skipif(bool(clouds.AZURE_CONTAINER), reason="needs Azurite's shared-key check")
def test_azure_wrong_account_key(
    azure_endpoint: str, azure_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_KEY", "A" * 86 + "==")
    store = open_store(_config("azure", azure_container, azure_endpoint))
    try:
        for call in (store.check, lambda: store.head("k"), lambda: list(store.list())):
            with pytest.raises(CredentialsError) as caught:
                call()
            assert azure_container in _one_line(caught.value)
    finally:
        store.close()


@pytest.mark.skipif(bool(clouds.AZURE_CONTAINER), reason="the emulator's connection string")
def test_azure_connection_string_alone(
    azure_endpoint: str, azure_container: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """AZURE_STORAGE_CONNECTION_STRING without endpoint_url: account, endpoint and key."""
    monkeypatch.delenv("AZURE_STORAGE_KEY")
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName={clouds.AZURITE_ACCOUNT};"
        f"AccountKey={clouds.AZURITE_KEY};BlobEndpoint={azure_endpoint};",
    )
    store = open_store(_config("azure", azure_container, None))
    try:
        store.check()
        info = store.put("k", _write(tmp_path / "k", b"via the connection string"),
                         overwrite=False)  # fmt: skip
        assert store.head("k").etag == info.etag
    finally:
        store.close()


@pytest.mark.skipif(bool(clouds.GCS_BUCKET), reason="the emulator's variable")
def test_gcs_storage_emulator_host_is_honoured(
    gcs_endpoint: str, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The SDK's own STORAGE_EMULATOR_HOST, without endpoint_url, reaches the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    store = open_store(_config("gcs", gcs_bucket, None))
    try:
        store.check()
        store.put("k", _write(tmp_path / "k", b"emulated"), overwrite=False)
        assert store.read_range("k", 0, 8) == b"emulated"
    finally:
        store.close()


# -- dm_configure says what is missing ---------------------------------------------------------


@pytest.mark.parametrize("backend", CLOUDS)
def test_dm_configure_names_a_missing_bucket_or_container(
    backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = request.getfixturevalue(f"{backend}_endpoint")
    argv = ["--service", backend, "--storage_name", "daman-no-such-place"]
    if endpoint:
        argv += ["--endpoint_url", endpoint]
    assert configure_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "'daman-no-such-place' does not exist" in err and "dm_configure" in err
    word = "bucket" if backend == "gcs" else "container"
    assert word in err


@pytest.mark.parametrize("backend", CLOUDS)
def test_dm_configure_saves_a_reachable_store(
    backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint, name = _cloud(request, backend)
    argv = ["--service", backend, "--storage_name", name]
    if endpoint:
        argv += ["--endpoint_url", endpoint]
    assert configure_main(argv) == 0, capsys.readouterr().err
    assert f"service:         {backend}" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_dm_configure_without_azure_credentials(
    no_cloud_credentials: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--service", "azure", "--storage_name", "some-container",
            "--endpoint_url", closed_port() + "/devstoreaccount1"]  # fmt: skip
    assert configure_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "AZURE_STORAGE_KEY" in err, err


# -- unreachable endpoints: one-line errors, quickly; cached pulls go on ------------------------

OPERATIONS = ["check", "head", "get", "put", "put-large", "list", "list_level", "read_tail",
              "read_range", "delete"]  # fmt: skip


def _call(store: Store, operation: str, tmp_path: Path) -> object:
    calls: dict[str, Callable[[], object]] = {
        "check": store.check,
        "head": lambda: store.head("k"),
        "get": lambda: store.get("k", tmp_path / "dest"),
        "put": lambda: store.put("k", _write(tmp_path / "src", b"abc"), overwrite=False),
        "put-large": lambda: store.put(
            "k", _write(tmp_path / "big", os.urandom(9 * MiB)), overwrite=True
        ),
        "list": lambda: list(store.list()),
        "list_level": lambda: store.list_level(""),
        "read_tail": lambda: store.read_tail("k", 10),
        "read_range": lambda: store.read_range("k", 0, 10),
        "delete": lambda: store.delete("k"),
    }
    return calls[operation]()


# Every operation against a refused connection; a few against a server that never answers
# (each waits out the read timeout, so not all of them).
DEAD = [("closed-port", op) for op in OPERATIONS] + [
    ("black-hole", op) for op in ("check", "head", "get", "put-large", "list_level")
]


@contextlib.contextmanager
def _dead_endpoint(mode: str) -> Iterator[str]:
    if mode == "closed-port":
        yield closed_port()
    else:
        with black_hole() as url:
            yield url


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", CLOUDS)
@pytest.mark.parametrize(("mode", "operation"), DEAD, ids=[f"{m}-{o}" for m, o in DEAD])
def test_unreachable_endpoint_fails_with_one_line(
    backend: str, mode: str, operation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused connection or a server that never answers: StoreUnavailableError naming the
    store, bounded by connect_timeout/read_timeout and max_attempts (the test's timeout is
    the hang detector); nothing is left at ``dest``."""
    with _dead_endpoint(mode) as dead_endpoint:
        _fail_against(backend, dead_endpoint, operation, tmp_path, monkeypatch)


def _fail_against(
    backend: str, dead_endpoint: str, operation: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if backend == "azure":
        monkeypatch.setenv("AZURE_STORAGE_KEY", clouds.AZURITE_KEY)
        endpoint = dead_endpoint + "/devstoreaccount1"
        name = "some-container"
    else:
        endpoint, name = dead_endpoint, "some-bucket"
    config = Config(service=backend, storage_name=name, endpoint_url=endpoint,
                    connect_timeout=0.5, read_timeout=0.5, max_attempts=1)  # fmt: skip
    store = open_store(config)
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            _call(store, operation, tmp_path)
    finally:
        store.close()
    assert isinstance(caught.value, ConnectionError)
    assert name in _one_line(caught.value)
    assert not (tmp_path / "dest").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", CLOUDS)
def test_offline_pull_serves_the_cache(
    backend: str, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config()
    obj, meta = make_object("cached", "v1")
    with Manager(config) as manager:
        manager.push(obj, "cached", meta=meta)
        manager.push(1, "stored")
        manager.delete("stored")
    endpoint = closed_port() + ("/devstoreaccount1" if backend == "azure" else "")
    offline = config.replace(endpoint_url=endpoint, connect_timeout=0.5, read_timeout=0.5,
                             max_attempts=1)  # fmt: skip
    with Manager(offline) as manager:
        with pytest.warns(OfflineWarning):
            assert check_object(*manager.pull("cached"), "cached") == "v1"
        with pytest.raises((StoreUnavailableError, StorageNotFoundError)) as caught:
            manager.pull("stored")
        _one_line(caught.value)


# -- lost answers and transient faults, through the fault proxy ---------------------------------


def _proxied(backend: str, endpoint: str, proxy: FaultProxy) -> str:
    return proxy.url + ("/devstoreaccount1" if backend == "azure" else "")


def _emulated(backend: str, request: pytest.FixtureRequest) -> str:
    if clouds.GCS_BUCKET if backend == "gcs" else clouds.AZURE_CONTAINER:
        pytest.skip("the fault proxy speaks plain http to an emulator")
    return request.getfixturevalue(f"{backend}_endpoint")


def _is_upload(backend: str) -> Callable[[Any], bool]:
    if backend == "gcs":  # the multipart upload: POST .../upload/storage/v1/b/B/o?...
        return lambda r: r.method == "POST" and "/upload/" in r.target
    # a single PUT, or the commit of the block list
    return lambda r: r.method == "PUT" and ("comp=block&" not in r.target + "&")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("backend", "size"),
    [
        pytest.param(backend, size, id=f"{kind}-{backend}")
        for backend in CLOUDS
        for size, kind in ((3_000, "small"), (9 * MiB, "staged"))
        # Not GCS's resumable upload: its chunks go to the URL the emulator hands out, which
        # bypasses the fault proxy.
        if not (backend == "gcs" and size > 8 * MiB)
    ],
)
def test_a_lost_answer_to_a_conditional_create_is_our_own_write(
    backend: str, size: int, make_config: Callable[..., Config], request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The create reaches the store and is carried out, then the connection drops before the
    answer: the SDK retries, meets its own object (412 / 409), and the push still succeeds
    because the stored footer is this push's."""
    endpoint = _emulated(backend, request)
    config = make_config()
    with FaultProxy(endpoint, first(1, "lost", _is_upload(backend))) as proxy:
        proxied = config.replace(endpoint_url=_proxied(backend, endpoint, proxy))
        with Manager(proxied) as manager:
            obj, meta = make_object("k", "v1", size)
            manager.push(obj, "k", meta=meta)
            assert manager.cache.get("k") is not None
    assert proxy.faults == {"lost": 1}
    with Manager(config.replace(local_dir=str(tmp_path / "other"))) as other:
        assert check_object(*other.pull("k"), "k") == "v1"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", CLOUDS)
@pytest.mark.parametrize("kinds", [["500", "503"], ["drop", "reset"]], ids=["5xx", "dropped"])
def test_transient_faults_are_retried(
    backend: str, kinds: list[str], make_config: Callable[..., Config],
    request: pytest.FixtureRequest, tmp_path: Path,
) -> None:  # fmt: skip
    """A fifth of the requests fail (at most twice each) over pushes, pulls, a listing, an
    info and a delete: every operation succeeds through the SDK's retries."""
    endpoint = _emulated(backend, request)
    config = make_config(max_attempts=3)
    plan = at_most(2, fraction(0.2, kinds, seed=len(kinds[0])))
    keys = {f"t/{i}": 3_000 for i in range(4)} | {"t/big": 9 * MiB}
    with FaultProxy(endpoint, plan) as proxy:
        proxied = config.replace(endpoint_url=_proxied(backend, endpoint, proxy))
        with Manager(proxied) as alice:
            for key, nbytes in keys.items():
                obj, meta = make_object(key, "v1", nbytes)
                alice.push(obj, key, meta=meta)
        with Manager(proxied.replace(local_dir=str(tmp_path / "bob"))) as bob, \
                warnings.catch_warnings():  # fmt: skip
            warnings.simplefilter("error")  # never "offline": the store is there
            for key in keys:
                assert check_object(*bob.pull(key), key) == "v1"
                assert check_object(*bob.pull(key), key) == "v1"  # the HEAD, from the cache
            assert sorted(item.key for item in bob.ls("t/")) == sorted(keys)
            assert bob.info("t/1").meta == {"key": "t/1", "version": "v1"}
            bob.delete("t/1", remote=True)
            assert not bob.exists("t/1")
    assert sum(proxy.faults.values()) > 0


# -- where the GCS emulator falls short --------------------------------------------------------


@pytest.mark.skipif(bool(clouds.GCS_BUCKET), reason="about the emulator only")
def test_fake_gcs_server_still_ignores_preconditions_on_resumable_uploads(
    gcs_endpoint: str, gcs_bucket: str
) -> None:
    """Why the large-object create races are skipped on the emulator (tests/conftest.py):
    fake-gcs-server checks ifGenerationMatch on multipart uploads (below) but not on resumable
    ones. When this test fails, the emulator has learnt it: remove the skip."""
    from google.api_core.exceptions import PreconditionFailed

    bucket = clouds.gcs_client(gcs_endpoint).bucket(gcs_bucket)
    bucket.blob("k").upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("k").upload_from_string(b"second", if_generation_match=0)
    resumable = bucket.blob("k", chunk_size=256 * 1024)
    resumable.upload_from_string(os.urandom(9 * MiB), if_generation_match=0)  # not refused
    assert bucket.get_blob("k").size == 9 * MiB


def test_store_errors_are_daman_errors(store: Store) -> None:
    """Sanity for every backend: a missing key is a KeyNotFoundError, nothing else leaks."""
    with pytest.raises(KeyNotFoundError):
        store.head("no/such/key")
    with pytest.raises(DamanError):
        store.read_tail("no/such/key", 10)
    assert isinstance(store.list_level(""), Level)
    assert all(isinstance(i, ObjectInfo) for i in store.list())
