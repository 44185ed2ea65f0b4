"""Azure Blob Storage as the store, through the official ``azure-storage-blob`` client
(``pip install "daman[azure]"``, which brings ``azure-identity`` too).

``storage_name`` is ``container`` or ``container/prefix``. The account and its credentials,
in this order:

1. ``endpoint_url`` given (the account's blob URL, ``https://ACCOUNT.blob.core.windows.net``,
   or an emulator's ``http://127.0.0.1:10000/devstoreaccount1``): the account key from
   ``AZURE_STORAGE_KEY``, else the credential of ``AZURE_STORAGE_CONNECTION_STRING``, else
   (https only) ``DefaultAzureCredential`` (``az login``, a managed identity, ``AZURE_CLIENT_*``).
2. no ``endpoint_url``: ``AZURE_STORAGE_CONNECTION_STRING`` alone; or ``AZURE_STORAGE_ACCOUNT``
   with ``AZURE_STORAGE_KEY`` or ``DefaultAzureCredential``.

- New keys are created with ``If-None-Match: *`` (the SDK's ``overwrite=False``): one PUT up to
  8 MiB, above that 8 MiB blocks staged in parallel and committed with the same condition, so
  of two machines pushing the same new key exactly one wins.
- A force push writes the key from its version record with Copy Blob (no byte sent twice),
  falling back to sending the bytes when the account refuses the copy.
- The version (``ObjectInfo.etag``) is the blob's ETag, which changes on every write.
- Downloads read the first 8 MiB, then the rest in parallel ranges that the SDK pins to the
  first answer's ETag (``If-Match``): a blob replaced meanwhile answers 412 and the download
  starts over, so it never mixes two versions.
- Transient errors are retried by the SDK's retry policy (``max_attempts`` retries, short
  exponential backoff), requests bounded by ``connect_timeout``/``read_timeout``; every SDK
  error becomes a daman error in :meth:`AzureStore._translate`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import forksafe
from ..config import Config
from ..errors import (
    ConfigError,
    CredentialsError,
    DamanError,
    InvalidKeyError,
    KeptChangingError,
    KeyExistsError,
    KeyNotFoundError,
    StorageNotFoundError,
    StoreUnavailableError,
)
from ..keys import listed, validate_key, validate_listing, validate_name, validate_prefix
from ._transfer import (
    TRANSFER_THREADS,
    MiB,
    ObjectChangedError,
    PartedStore,
    PositionalWriter,
)
from .base import (
    Level,
    ObjectInfo,
    Progress,
    Written,
    _no_progress,
    bucket_and_prefix,
)

BLOCK_SIZE = 8 * MiB
"""Single PUT up to this size; above it, staged blocks of this size. Also the first read and
each parallel range of a download."""
COPY_WAIT_SECONDS = 600.0
"""How long a force push waits for a copy on Azure's side that did not finish at once (rare
within one account) before it aborts it and sends the bytes."""
_NO_CREDENTIALS = (
    "Set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_KEY for the account, or sign in "
    "for DefaultAzureCredential (`az login`)"
)


def _sdk() -> Any:
    try:
        from azure.storage import blob
    except ImportError:
        raise ConfigError(
            "service 'azure' needs the Azure Blob Storage client: pip install \"daman[azure]\"."
        ) from None
    return blob


def _one_line(exc: BaseException) -> str:
    # Azure's messages carry the request id, the time and an XML body on further lines.
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _account_of(url: str) -> str:
    """``https://acct.blob.core.windows.net`` -> ``acct``; ``http://host:port/acct`` -> ``acct``
    (emulators put the account first in the path)."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    if path:
        return path.split("/")[0]
    return (parts.hostname or "").split(".")[0]


def make_client(config: Config) -> Any:
    """A ``BlobServiceClient`` for ``config`` (see the module's docstring for the order in
    which the account and the credentials are looked for)."""
    blob = _sdk()
    kwargs: dict[str, Any] = dict(
        connection_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        retry_policy=blob.ExponentialRetry(
            # Waits of 1.5, 2.25, 3.4, 5.1, 7.6 s (the SDK's default starts at 15 s).
            initial_backoff=0,
            increment_base=1.5,
            retry_total=config.max_attempts,
            random_jitter_range=0.3,
        ),
        max_single_put_size=BLOCK_SIZE,
        max_block_size=BLOCK_SIZE,
        max_single_get_size=BLOCK_SIZE,
        max_chunk_get_size=BLOCK_SIZE,
    )
    connection_string = os.environ.get("AZURE_STORAGE_CONNECTION_STRING") or None
    key = os.environ.get("AZURE_STORAGE_KEY") or None
    account = os.environ.get("AZURE_STORAGE_ACCOUNT") or None
    url = config.endpoint_url
    try:
        if url is None:
            if connection_string:
                return blob.BlobServiceClient.from_connection_string(connection_string, **kwargs)
            if account is None:
                raise CredentialsError(
                    "no Azure storage account given. Give its blob URL as endpoint_url "
                    "(https://ACCOUNT.blob.core.windows.net), or set AZURE_STORAGE_ACCOUNT or "
                    "AZURE_STORAGE_CONNECTION_STRING."
                )
            url = f"https://{account}.blob.core.windows.net"
        credential: Any
        if key:
            credential = {"account_name": account or _account_of(url), "account_key": key}
        elif connection_string:
            credential = blob.BlobServiceClient.from_connection_string(connection_string).credential
        elif url.startswith("http://"):
            raise CredentialsError(
                f"no account key for {url} (an access token is never sent over plain http). "
                f"{_NO_CREDENTIALS.split(', or sign in')[0]}."
            )
        else:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError:
                raise ConfigError(
                    "signing in to Azure without an account key needs azure-identity: "
                    'pip install "daman[azure]".'
                ) from None
            credential = DefaultAzureCredential()
        return blob.BlobServiceClient(url, credential=credential, **kwargs)
    except ValueError as exc:  # the SDK's word for a malformed URL or connection string
        if isinstance(exc, DamanError):
            raise
        raise ConfigError(f"cannot use the Azure account settings: {_one_line(exc)}.") from None


def _etag(value: str | None) -> str:
    """Listings give ETags bare and headers quoted: one form, so versions compare equal."""
    return (value or "").strip('"')


def describe_azure(config: Config) -> str:
    """How messages name the store: ``azure://[account/]container/prefix`` (no client is
    made)."""
    account = config.endpoint_url or os.environ.get("AZURE_STORAGE_ACCOUNT") or ""
    name = _account_of(account) if "://" in account else account
    where = f"{name}/" if name else ""
    container, prefix = bucket_and_prefix(config.storage_name)
    return f"azure://{where}{container}/{prefix}"


class _RangeNotSatisfiable(DamanError):
    """A ranged read beyond the blob's end."""


class AzureStore(PartedStore):
    def __init__(self, config: Config) -> None:
        _sdk()  # a missing extra is said at once, not at the first request
        self.config = config
        self.container_name, self.prefix = bucket_and_prefix(config.storage_name)
        self.max_attempts = config.max_attempts
        # A forked child makes its own client: sockets shared with the parent would mix two
        # processes' requests and answers (the parent's client is neither used nor closed).
        self._clients: forksafe.PerProcess[Any] = forksafe.PerProcess(lambda: make_client(config))
        self._where: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> AzureStore:
        return cls(config)

    def describe(self) -> str:
        return describe_azure(self.config)

    @property
    def client(self) -> Any:
        return self._clients.get()

    def _container(self) -> Any:
        return self.client.get_container_client(self.container_name)

    def _blob(self, key: str) -> Any:
        return self._container().get_blob_client(self.prefix + validate_name(key))

    # -- errors --------------------------------------------------------------------------

    def _translate(self, exc: BaseException, key: str | None) -> BaseException:
        """The one place where SDK and transport errors become daman errors."""
        from azure.core import exceptions as az

        where = self.describe()
        code = str(getattr(exc, "error_code", "") or "")
        status = getattr(exc, "status_code", None)
        if isinstance(exc, az.ResourceNotFoundError) or status == 404:
            if code == "ContainerNotFound" or key is None:
                return self._container_missing()
            return KeyNotFoundError(key, where)
        if isinstance(exc, az.ResourceExistsError) and key is not None:
            return KeyExistsError(key)
        if isinstance(exc, az.ResourceModifiedError) and key is not None:
            return ObjectChangedError(f"{key!r} changed while it was being read")
        if status == 416 or code == "InvalidRange":
            return _RangeNotSatisfiable(_one_line(exc))
        if isinstance(exc, az.ClientAuthenticationError) or status in (401, 403):
            return CredentialsError(
                f"{where} refused the credentials ({code or status}: {_one_line(exc)}). "
                f"{_NO_CREDENTIALS} with access to this container."
            )
        if isinstance(exc, az.HttpResponseError) and status is not None and status >= 500:
            return StoreUnavailableError(
                f"{where} kept failing ({code or status}: {_one_line(exc)}) after "
                f"{self.max_attempts} retries. Try again later."
            )
        if isinstance(exc, (az.ServiceRequestError, az.ServiceResponseError)):
            return StoreUnavailableError(
                f"cannot reach {where} ({_one_line(exc)}). Check the network and the endpoint; "
                "a cached copy is still used by pull when there is one."
            )
        if isinstance(exc, az.AzureError):
            return DamanError(f"{where} refused the request ({code or status}: {_one_line(exc)}).")
        return exc

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        from azure.core.exceptions import AzureError

        try:
            yield
        except AzureError as exc:
            error = self._translate(exc, key)
            if error is exc:
                raise
            raise error from None

    def _container_missing(self) -> StorageNotFoundError:
        return StorageNotFoundError(
            f"the container {self.container_name!r} does not exist in {self.describe()} (or is "
            "not visible with these credentials). Create it (`az storage container create`), "
            "or run `dm_configure --service azure --storage_name CONTAINER` with an existing one."
        )

    # -- Store interface -----------------------------------------------------------------

    def check(self) -> None:
        with self._errors():
            pages = self._container().list_blobs(results_per_page=1).by_page()
            next(pages, None)

    def _info(self, key: str, props: Any, size: int | None = None) -> ObjectInfo:
        size = props.size if size is None else size
        return ObjectInfo(key, size, _etag(props.etag), props.last_modified)

    def head(self, key: str) -> ObjectInfo:
        blob = self._blob(key)
        with self._errors(key):
            props = blob.get_blob_properties()
        return self._info(key, props)

    def put(
        self, key: str, path: Path, *, overwrite: bool, progress: Progress = _no_progress
    ) -> ObjectInfo:
        blob = self._blob(key)
        size = os.path.getsize(path)
        if size > BLOCK_SIZE and not overwrite:  # fail before sending gigabytes
            with contextlib.suppress(KeyNotFoundError):
                self.head(key)
                raise KeyExistsError(key)
        told = _Told(progress)
        with open(path, "rb") as f, self._errors(key):
            r = blob.upload_blob(
                f,
                length=size,
                overwrite=overwrite,  # False: If-None-Match: * on the PUT or the commit
                max_concurrency=TRANSFER_THREADS,
                progress_hook=told,
            )
        told(size, size)
        return ObjectInfo(key, size, _etag(r.get("etag")), r.get("last_modified"))

    def copies(self, size: int, *, overwrite: bool) -> bool:
        return overwrite

    def put_copy(
        self,
        key: str,
        path: Path,
        *,
        source: str,
        overwrite: bool,
        progress: Progress = _no_progress,
    ) -> ObjectInfo:
        """To overwrite: Copy Blob from ``source`` (a blob of this account, which the
        request's own credentials read), no byte sent; a copy within one account is usually
        done when it is answered, and is waited for otherwise. To create: the bytes, under
        the condition daman relies on (``If-None-Match: *``). A copy the account refuses (a
        sign-in that may not read a copy's source) or that does not finish sends the bytes."""
        if not overwrite:
            return self.put(key, path, overwrite=False, progress=progress)
        size = os.path.getsize(path)
        blob = self._blob(key)
        copied = self._start_copy(blob, source)
        if copied is None:
            return self.put(key, path, overwrite=True, progress=progress)
        if copied.get("copy_status") == "success":
            info = ObjectInfo(key, size, _etag(copied.get("etag")), copied.get("last_modified"))
        else:
            props = self._finished_copy(key, blob, str(copied.get("copy_id") or ""))
            if props is None:
                return self.put(key, path, overwrite=True, progress=progress)
            info = self._info(key, props, size)
        progress(size)
        return info

    def _start_copy(self, blob: Any, source: str) -> dict[str, Any] | None:
        """Copy Blob's answer; None if the account refused to read the source for this
        sign-in (403: Azure answers CannotVerifyCopySource, as for a missing source, but
        with another status). A missing source is KeyNotFoundError (for the record)."""
        from azure.core.exceptions import HttpResponseError

        with self._errors(source):
            try:
                return dict(blob.start_copy_from_url(self._copy_source(source)))
            except HttpResponseError as exc:
                if exc.status_code in (401, 403):
                    return None
                raise

    def _copy_source(self, source: str) -> str:
        """The URL Copy Blob reads ``source`` from."""
        return str(self._blob(source).url)

    def _finished_copy(self, key: str, blob: Any, copy_id: str) -> Any | None:
        """The blob's properties once a pending copy succeeded; None if it failed, was
        aborted, or is still pending after ``COPY_WAIT_SECONDS`` (then it is aborted: a blob
        being copied to cannot be written)."""
        deadline = time.monotonic() + COPY_WAIT_SECONDS
        delay = 0.05
        while True:
            with self._errors(key):
                props = blob.get_blob_properties()
            status = props.copy.status if props.copy is not None else None
            if status == "success" and (props.copy.id or "") == copy_id:
                return props
            if status != "pending" or time.monotonic() > deadline:
                break
            time.sleep(delay)
            delay = min(1.0, delay * 2)
        if status == "pending":
            with contextlib.suppress(DamanError), self._errors(key):
                blob.abort_copy(copy_id)
        return None

    def _get_once(
        self, key: str, dest: Path, progress: Progress, on_size: Progress, on_written: Written
    ) -> ObjectInfo:
        blob = self._blob(key)
        with self._errors(key):
            # The first 8 MiB arrive with the blob's size and ETag; the SDK then fetches the
            # rest in parallel, each range with If-Match on that ETag.
            stream = blob.download_blob(max_concurrency=TRANSFER_THREADS)
        on_size(stream.size)
        with open(dest, "wb") as out:
            lock = threading.Lock()

            def written(offset: int, length: int) -> None:
                on_written(offset, length)
                with lock:
                    progress(length)

            with self._errors(key):
                stream.readinto(PositionalWriter(out.fileno(), 0, written))
        return self._info(key, stream.properties, stream.size)

    def read_tail(self, key: str, length: int) -> tuple[bytes, ObjectInfo]:
        # Azure has no suffix ranges: ask for the size first, then read the tail of exactly
        # that version (If-Match), so both answers describe one blob.
        from azure.core import MatchConditions

        for _ in range(3):
            info = self.head(key)
            start = max(0, info.size - max(length, 0))
            if start == info.size:
                return b"", info
            try:
                with self._errors(key):
                    data = self._blob(key).download_blob(
                        offset=start, length=info.size - start, etag=f'"{info.etag}"',
                        match_condition=MatchConditions.IfNotModified,
                    ).readall()  # fmt: skip
            except ObjectChangedError:
                continue  # replaced between the two requests: ask again
            return data, info
        raise KeptChangingError(f"{key!r} kept changing while it was read. Try again.")

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self.head(key)  # still a KeyNotFoundError for a missing key
            return b""
        try:
            with self._errors(key):
                return bytes(self._blob(key).download_blob(offset=offset, length=length).readall())
        except _RangeNotSatisfiable:  # starts past the end, as reading a file there would
            return b""

    def delete(self, key: str) -> None:
        blob = self._blob(key)
        with self._errors(key):  # a missing key answers 404 BlobNotFound: no HEAD first
            blob.delete_blob()

    def _key_of(self, name: str) -> str | None:
        key = name[len(self.prefix) :]
        try:
            return validate_key(key)
        except InvalidKeyError:  # e.g. "folder/" placeholders other tools make
            return None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Azure lists from a prefix only (no start-after): a listing of the whole container
        also reads the names of daman's versions (``.daman-history/``), 5,000 a request,
        and leaves them out."""
        validate_listing(prefix)
        with self._errors():
            for props in self._container().list_blobs(name_starts_with=self.prefix + prefix):
                key = props.name[len(self.prefix) :]
                if listed(key, prefix):  # not "folder/" placeholders other tools make
                    yield self._info(key, props)

    def list_level(self, prefix: str = "", *, token: str | None = None, limit: int = 1000) -> Level:
        validate_prefix(prefix)  # a partial last part ("team/mo") narrows the level
        from azure.storage.blob import BlobPrefix

        prefixes: list[str] = []
        objects: list[ObjectInfo] = []
        with self._errors():
            pages = (
                self._container()
                .walk_blobs(
                    name_starts_with=self.prefix + prefix, delimiter="/", results_per_page=limit
                )
                .by_page(continuation_token=token)
            )
            for item in next(pages, []):  # Azure counts blobs and prefixes together, as we do
                if isinstance(item, BlobPrefix):
                    sub = item.name[len(self.prefix) :]
                    with contextlib.suppress(InvalidKeyError):
                        validate_key(sub[:-1])
                        prefixes.append(sub)
                elif (key := self._key_of(item.name)) is not None:
                    objects.append(self._info(key, item))
            next_token = pages.continuation_token
        return Level(
            prefix, sorted(prefixes), sorted(objects, key=lambda o: o.key), next_token or None
        )

    def close(self) -> None:
        self._clients.close(lambda client: client.close())


class _Told:
    """Turns the SDK's ``progress_hook(current, total)`` (running totals, from several
    threads) into the byte counts daman's progress callbacks take."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._told = 0
        self._lock = threading.Lock()

    def __call__(self, current: int, total: int | None) -> None:
        with self._lock:
            if current > self._told:
                new, self._told = current - self._told, current
            else:
                return
        self._progress(new)


__all__ = ["AzureStore", "make_client"]
