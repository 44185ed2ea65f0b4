"""Google Cloud Storage as the store, through the official ``google-cloud-storage`` client
(``pip install "daman[gcs]"``).

``storage_name`` is ``bucket`` or ``bucket/prefix``. Credentials are Application Default
Credentials, as ``gcloud auth application-default login``, ``GOOGLE_APPLICATION_CREDENTIALS``
or a cloud machine's service account provide them. ``endpoint_url`` (or the SDK's own
``STORAGE_EMULATOR_HOST``) points at another endpoint; an ``http://`` endpoint is taken for an
emulator and is sent no credentials, since a token must never travel in clear text.

- New keys are created with ``ifGenerationMatch=0``: for objects up to 8 MiB in one multipart
  upload, above that in a resumable upload in 8 MiB chunks, both conditional, so of two
  machines pushing the same new key exactly one wins. (fake-gcs-server, the emulator the
  tests use, checks the condition on multipart uploads only; see README.)
- The version (``ObjectInfo.etag``) is the object's generation, which changes on every write.
- Downloads read the first 8 MiB, then the rest in parallel ranges, each pinned to the first
  answer's generation: a download never mixes two versions (a replaced generation answers 404,
  and the download starts over).
- Transient errors are retried by the SDK's policy, bounded by ``max_attempts`` and the
  timeouts; every SDK error becomes a daman error in :meth:`GCSStore._translate`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import forksafe
from ..config import Config
from ..errors import (
    ConfigError,
    CredentialsError,
    DamanError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    StorageNotFoundError,
    StoreUnavailableError,
)
from ..keys import (
    HISTORY,
    SKIP_HISTORY_AFTER,
    listed,
    validate_key,
    validate_listing,
    validate_name,
    validate_prefix,
)
from ._transfer import (
    MiB,
    ObjectChangedError,
    PartedStore,
    PositionalWriter,
    ranges,
    run_parallel,
)
from .base import (
    Level,
    ObjectInfo,
    Progress,
    Written,
    _no_progress,
    bucket_and_prefix,
)

SIMPLE_UPLOAD_LIMIT = 8 * MiB
"""Objects up to this size go in one (multipart) request; the SDK's own limit for it."""
CHUNK_SIZE = 8 * MiB
"""Resumable-upload chunk (a multiple of 256 KiB, as GCS requires)."""
FIRST_READ = 8 * MiB
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def _sdk() -> Any:
    try:
        from google.cloud import storage
    except ImportError:
        raise ConfigError(
            "service 'gcs' needs the Google Cloud Storage client: pip install \"daman[gcs]\"."
        ) from None
    return storage


def _credentials_error(detail: str = "") -> CredentialsError:
    return CredentialsError(
        "no usable Google Cloud credentials"
        + (f" ({detail})" if detail else "")
        + ". Run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
        "to a service account's key file."
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def make_client(config: Config) -> Any:
    """A ``storage.Client`` for ``config``; credentials are looked up here, once per process."""
    storage = _sdk()
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError

    endpoint = config.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST") or ""
    options = ClientOptions(api_endpoint=config.endpoint_url) if config.endpoint_url else None
    try:
        if endpoint.startswith("http://"):  # an emulator: no tokens over plain HTTP
            return storage.Client(
                project="daman", credentials=AnonymousCredentials(), client_options=options
            )
        return storage.Client(project=None, client_options=options)
    except DefaultCredentialsError as exc:
        raise _credentials_error(_one_line(exc)) from None


@functools.lru_cache(maxsize=1)
def _blob_class() -> type:
    storage = _sdk()

    class HeadersBlob(storage.Blob):  # type: ignore[misc, name-defined]
        """A Blob that keeps the size a ranged download's answer carries (Content-Range),
        which the SDK reads past: so one request gives bytes, size and generation. When the
        SDK stops calling this hook, ``total`` stays None and callers ask for the size."""

        total: int | None = None

        def _extract_headers_from_download(self, response: Any) -> None:
            super()._extract_headers_from_download(response)
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match:
                self.total = int(match.group(3))
            elif response.status_code == 200:  # the whole object
                length = response.headers.get("Content-Length")
                self.total = int(length) if length is not None else None

    return HeadersBlob


def describe_gcs(config: Config) -> str:
    """How messages name the store (no client is made)."""
    return "gs://{}/{}".format(*bucket_and_prefix(config.storage_name))


class _RangeNotSatisfiable(DamanError):
    """A ranged read beyond the object's end (or of an empty object)."""


class GCSStore(PartedStore):
    def __init__(self, config: Config) -> None:
        _sdk()  # a missing extra is said at once, not at the first request
        self.config = config
        self.bucket_name, self.prefix = bucket_and_prefix(config.storage_name)
        self.max_attempts = config.max_attempts
        self.timeout = (config.connect_timeout, config.read_timeout)
        # A forked child makes its own client: sockets shared with the parent would mix two
        # processes' requests and answers (the parent's client is neither used nor closed).
        self._clients: forksafe.PerProcess[Any] = forksafe.PerProcess(lambda: make_client(config))
        self._bucket_exists = False

    @classmethod
    def from_config(cls, config: Config) -> GCSStore:
        return cls(config)

    def describe(self) -> str:
        return describe_gcs(self.config)

    @property
    def client(self) -> Any:
        return self._clients.get()

    def _bucket(self) -> Any:
        return self.client.bucket(self.bucket_name)

    def _blob(self, key: str, generation: int | None = None) -> Any:
        name = self.prefix + validate_name(key)
        return _blob_class()(name, self._bucket(), generation=generation)

    def _retry(self, requests: int = 1) -> Any:
        """The SDK's retry policy (its own test of which errors are transient), bounded: at
        most ``max_attempts`` retries per request (``requests`` of them share one policy: the
        chunks of one upload), backing off from 0.2 s to 4 s. The deadline only stops a
        request that keeps failing slowly: it fits every attempt waiting out both timeouts."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        count = itertools.count(1)
        transient = DEFAULT_RETRY._predicate
        allowed = self.max_attempts * max(1, requests)

        def predicate(exc: Exception) -> bool:
            return bool(transient(exc)) and next(count) <= allowed

        attempts = self.max_attempts + 1
        deadline = attempts * (sum(self.timeout) + 4.0)
        return (
            DEFAULT_RETRY.with_predicate(predicate)
            .with_delay(initial=0.2, maximum=4.0, multiplier=2.0)
            .with_timeout(deadline)
        )

    # -- errors --------------------------------------------------------------------------

    def _translate(self, exc: BaseException, key: str | None) -> BaseException:
        """The one place where SDK and transport errors become daman errors."""
        import requests
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        where = self.describe()
        if isinstance(exc, InvalidResponse):  # from the resumable-upload machinery
            status = getattr(exc.response, "status_code", 0)
            exc = api.from_http_status(status, _one_line(exc), response=exc.response)
        if isinstance(exc, api.RetryError) and exc.cause is not None:
            return self._translate(exc.cause, key)
        if isinstance(exc, auth.DefaultCredentialsError):
            return _credentials_error(_one_line(exc))
        if isinstance(exc, auth.RefreshError):
            return _credentials_error(f"refreshing the access token failed: {_one_line(exc)}")
        if isinstance(exc, auth.TransportError):
            return StoreUnavailableError(
                f"cannot reach Google's token service for {where} ({_one_line(exc)}). Check the "
                "network; a cached copy is still used by pull when there is one."
            )
        if isinstance(exc, api.RequestRangeNotSatisfiable):
            return _RangeNotSatisfiable(str(exc))
        if isinstance(exc, api.NotFound):
            return KeyNotFoundError(key, where) if key is not None else self._bucket_missing()
        if isinstance(exc, api.PreconditionFailed) and key is not None:
            return KeyExistsError(key)
        if isinstance(exc, (api.Unauthorized, api.Forbidden)):
            return CredentialsError(
                f"{where} refused the request ({exc.code}: {_one_line(exc.message)}). Check "
                "that these credentials may read and write this bucket "
                "(`gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS)."
            )
        if isinstance(exc, (api.ServerError, api.TooManyRequests)):
            return StoreUnavailableError(
                f"{where} kept failing ({exc.code}: {_one_line(exc.message)}) after "
                f"{self.max_attempts} retries. Try again later."
            )
        if isinstance(exc, api.GoogleAPICallError):
            return DamanError(f"{where} refused the request ({exc.code}: {_one_line(exc)}).")
        if isinstance(exc, DataCorruption):
            return StoreUnavailableError(
                f"a transfer with {where} was corrupted in transit ({_one_line(exc)}). Try again."
            )
        if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
            return StoreUnavailableError(
                f"cannot reach {where} ({_one_line(exc)}). Check the network and the endpoint; "
                "a cached copy is still used by pull when there is one."
            )
        return exc

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        import requests
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        try:
            yield
        except (
            GoogleAPIError,
            GoogleAuthError,
            InvalidResponse,
            DataCorruption,
            requests.exceptions.RequestException,
        ) as exc:
            error = self._translate(exc, key)
            if error is exc:
                raise
            if isinstance(error, KeyNotFoundError):
                self._raise_if_bucket_missing()
            raise error from None

    def _bucket_missing(self) -> StorageNotFoundError:
        return StorageNotFoundError(
            f"the bucket {self.bucket_name!r} does not exist (or is not visible with these "
            "credentials). Create it (`gcloud storage buckets create gs://BUCKET`), or run "
            "`dm_configure --service gcs --storage_name BUCKET` with an existing bucket."
        )

    def _raise_if_bucket_missing(self) -> None:
        # A missing object and an object in a missing bucket both answer 404: ask about the
        # bucket once per store, on the first 404 only (a one-entry listing, which needs no
        # more rights than using the bucket does).
        if self._bucket_exists:
            return
        from google.api_core.exceptions import NotFound

        try:
            blobs = self.client.list_blobs(
                self.bucket_name, max_results=1, timeout=self.timeout, retry=self._retry()
            )
            next(iter(blobs), None)
        except NotFound:
            raise self._bucket_missing() from None
        except Exception:  # unreachable, refused...: the 404 stands as it is
            return
        self._bucket_exists = True

    # -- Store interface -----------------------------------------------------------------

    def check(self) -> None:
        with self._errors():
            # One listing: it needs storage.objects.list, which every role that can use the
            # bucket has (reading the bucket's metadata needs storage.buckets.get, which the
            # object roles lack); a missing bucket answers 404.
            blobs = self.client.list_blobs(
                self.bucket_name, max_results=1, timeout=self.timeout, retry=self._retry()
            )
            next(iter(blobs), None)
        self._bucket_exists = True

    def _info(self, key: str, blob: Any, size: int | None = None) -> ObjectInfo:
        updated: datetime | None = blob.updated
        return ObjectInfo(key, blob.size if size is None else size, str(blob.generation), updated)

    def head(self, key: str) -> ObjectInfo:
        blob = self._blob(key)
        with self._errors(key):
            blob.reload(timeout=self.timeout, retry=self._retry())
        return self._info(key, blob)

    def put(
        self, key: str, path: Path, *, overwrite: bool, progress: Progress = _no_progress
    ) -> ObjectInfo:
        blob = self._blob(key)
        size = os.path.getsize(path)
        condition = {} if overwrite else {"if_generation_match": 0}
        if size > SIMPLE_UPLOAD_LIMIT:
            if not overwrite:  # fail before sending gigabytes; the condition settles races
                with contextlib.suppress(KeyNotFoundError):
                    self.head(key)
                    raise KeyExistsError(key)
            blob.chunk_size = CHUNK_SIZE  # resumable, in chunks: memory stays at one chunk
        with open(path, "rb") as f, self._errors(key):
            reader = _ProgressReader(f, progress if size > SIMPLE_UPLOAD_LIMIT else _no_progress)
            chunks = math.ceil(size / CHUNK_SIZE) if size > SIMPLE_UPLOAD_LIMIT else 1
            blob.upload_from_file(
                reader, size=size, timeout=self.timeout, retry=self._retry(chunks), **condition
            )
        if size <= SIMPLE_UPLOAD_LIMIT:
            progress(size)
        else:
            reader.report_rest(size)
        return self._info(key, blob, size)

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
        """To overwrite: a copy on GCS's side (``rewrite``, which takes an object of any size
        in as many calls as GCS asks for), no byte sent. To create: the bytes, under the
        condition daman relies on already (``ifGenerationMatch=0``)."""
        if not overwrite:
            return self.put(key, path, overwrite=False, progress=progress)
        size = os.path.getsize(path)
        blob, token = self._blob(key), None
        with self._errors(key):
            while True:  # GCS may ask for more calls (``token``) to copy a large object
                token, _, _ = blob.rewrite(
                    self._blob(source), token=token, timeout=self.timeout, retry=self._retry()
                )
                if token is None:
                    break
        progress(size)
        return self._info(key, blob, size)

    def _download(
        self,
        key: str,
        fd: int,
        start: int,
        end: int | None,
        generation: int | None,
        on_write: Written,
        stop: threading.Event | None = None,
    ) -> Any:
        """Bytes ``start..end`` (inclusive) of one generation of ``key`` into ``fd`` at
        ``start``. The SDK retries a broken stream from where it broke. Returns the blob."""
        blob = self._blob(key, generation)
        writer = PositionalWriter(fd, max(start, 0), on_write, stop)
        with self._errors(key):
            try:
                blob.download_to_file(
                    writer,
                    start=start,
                    end=end,
                    raw_download=True,
                    checksum=None,  # daman checks a sha256 of the whole object
                    timeout=self.timeout,
                    retry=self._retry(),
                )
            except Exception as exc:
                from google.api_core.exceptions import NotFound

                if generation is not None and isinstance(exc, NotFound):
                    # The generation we pinned is gone: replaced (or deleted) meanwhile.
                    raise ObjectChangedError(f"{key!r} changed while it was being read") from None
                raise
        return blob

    def _get_once(
        self, key: str, dest: Path, progress: Progress, on_size: Progress, on_written: Written
    ) -> ObjectInfo:
        # The first range is read into memory (8 MiB at most), so that a missing key leaves
        # no dest file behind and an existing dest untouched.
        first = _Collector()
        try:
            blob = self._download_into(key, first, 0, FIRST_READ - 1)
        except _RangeNotSatisfiable:  # an empty object has no byte 0
            info = self.head(key)
            if info.size:
                raise
            on_size(0)
            dest.write_bytes(b"")
            return info
        first_len = len(first.data)
        total = blob.total
        if total is None:  # the SDK did not show us the answer's headers: ask
            total = self._sized(key, blob.generation).size
        on_size(total)
        with open(dest, "wb") as out:
            out.write(first.data)
            out.flush()
            on_written(0, first_len, first.data)
            del first
            progress(first_len)
            if total > first_len:
                fd = out.fileno()
                generation = int(blob.generation)

                def fetch(start: int, end: int, stop: threading.Event) -> None:
                    def on_write(offset: int, length: int) -> None:
                        progress(length)

                    self._download(key, fd, start, end, generation, on_write, stop)
                    on_written(start, end - start + 1)

                run_parallel([functools.partial(fetch, s, e) for s, e in ranges(first_len, total)])
        return self._info(key, blob, total)

    def _sized(self, key: str, generation: Any) -> ObjectInfo:
        """The info of one generation of ``key`` (the fallback when a download's answer did
        not tell the size)."""
        blob = self._blob(key, int(generation))
        with self._errors(key):
            try:
                blob.reload(timeout=self.timeout, retry=self._retry())
            except Exception as exc:
                from google.api_core.exceptions import NotFound

                if isinstance(exc, NotFound):
                    raise ObjectChangedError(f"{key!r} changed while it was being read") from None
                raise
        return self._info(key, blob)

    def read_tail(self, key: str, length: int) -> tuple[bytes, ObjectInfo]:
        buffer = _Collector()
        if length <= 0:
            return b"", self.head(key)
        try:
            blob = self._download_into(key, buffer, -length, None)
        except _RangeNotSatisfiable:
            return b"", self.head(key)
        data = bytes(buffer.data)
        total = blob.total
        if total is None:
            try:
                return data, self._sized(key, blob.generation)
            except ObjectChangedError:
                return self.read_tail(key, length)  # replaced between the two requests
        return data, self._info(key, blob, total)

    def _download_into(self, key: str, sink: Any, start: int, end: int | None) -> Any:
        blob = self._blob(key)
        with self._errors(key):
            blob.download_to_file(
                sink, start=start, end=end, raw_download=True, checksum=None,
                timeout=self.timeout, retry=self._retry(),
            )  # fmt: skip
        return blob

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            self.head(key)  # still a KeyNotFoundError for a missing key
            return b""
        buffer = _Collector()
        try:
            self._download_into(key, buffer, offset, offset + length - 1)
        except _RangeNotSatisfiable:  # starts past the end, as reading a file there would
            return b""
        return bytes(buffer.data)

    def delete(self, key: str) -> None:
        blob = self._blob(key)
        with self._errors(key):  # a missing key answers 404: no HEAD needed first
            blob.delete(timeout=self.timeout, retry=self._retry())

    def _key_of(self, name: str) -> str | None:
        key = name[len(self.prefix) :]
        try:
            return validate_key(key)
        except InvalidKeyError:  # e.g. "folder/" placeholders made by the console
            return None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_listing(prefix)
        records, after = f"{HISTORY}/", SKIP_HISTORY_AFTER
        skip = not prefix.startswith(records)  # daman's versions, unless they are asked for
        start: str | None = None
        with self._errors():
            while True:
                blobs = self.client.list_blobs(
                    self.bucket_name,
                    prefix=self.prefix + prefix,
                    fields="items(name,size,generation,updated),nextPageToken",
                    timeout=self.timeout,
                    retry=self._retry(),
                    **({"start_offset": self.prefix + start} if start else {}),
                )
                for blob in blobs:
                    key = blob.name[len(self.prefix) :]
                    if skip and key.startswith(records) and start is None:
                        start = after  # GCS sorts them among the keys: go on after them
                        break
                    if start is not None and key < start:
                        continue  # from a server that ignores start_offset: seen already
                    if listed(key, prefix):  # not "folder/" placeholders of the console
                        yield self._info(key, blob)
                else:
                    return

    def list_level(self, prefix: str = "", *, token: str | None = None, limit: int = 1000) -> Level:
        """One request per page in the usual case. The token is the last name returned (a
        key, or a sub-prefix ending in '/'); the next page asks for names from just after it
        (``startOffset``). GCS counts objects and prefixes together against ``maxResults``,
        fake-gcs-server counts objects only: either way a page is cut at ``limit`` entries
        and at the last object the server returned, past which its answer may be partial."""
        validate_prefix(prefix)  # a partial last part ("team/mo") narrows the level
        after = token
        while True:
            # Past a sub-prefix "a/": from "a0" on ('0' follows '/'), skipping all under it.
            start = None if after is None else after[:-1] + "0" if after.endswith("/") else after
            with self._errors():
                found = self.client.list_blobs(
                    self.bucket_name,
                    prefix=self.prefix + prefix,
                    delimiter="/",
                    # One more: the start is inclusive, and may be the last page's last key.
                    max_results=limit + 1,
                    start_offset=None if start is None else self.prefix + start,
                    fields="items(name,size,generation,updated),prefixes,nextPageToken",
                    timeout=self.timeout,
                    retry=self._retry(),
                )
                page = next(found.pages)
                blobs = list(page)
                raw_prefixes = list(page.prefixes)
                more = bool(found.next_page_token)
            bound = blobs[-1].name[len(self.prefix) :] if more and blobs else None
            entries: list[tuple[str, ObjectInfo | None]] = []
            for blob in blobs:
                key = self._key_of(blob.name)
                if key is not None and (after is None or key > after):
                    entries.append((key, self._info(key, blob)))
            for name in raw_prefixes:
                sub = self._sub_prefix(name)
                in_page = (after is None or sub > after) and (bound is None or sub < bound)
                if sub is not None and in_page:
                    entries.append((sub, None))
            entries.sort(key=lambda entry: entry[0])
            page_entries = entries[:limit]
            if page_entries or not more:
                break
            # A page of names that are not keys: go on past them.
            names = [b.name for b in blobs] + raw_prefixes
            if not names:
                break
            after = max(names)[len(self.prefix) :]
        cut = len(entries) > limit or more
        return Level(
            prefix,
            [name for name, info in page_entries if info is None],
            [info for _, info in page_entries if info is not None],
            page_entries[-1][0] if cut and page_entries else None,
        )

    def _sub_prefix(self, name: str) -> str | None:
        sub = name[len(self.prefix) :]
        try:
            validate_key(sub[:-1])
        except InvalidKeyError:  # e.g. "a//" from a name with an empty part
            return None
        return sub

    def close(self) -> None:
        self._clients.close(lambda client: client.close())


class _Collector:
    """A write-only sink for small reads (a tail, a range)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)

    def seek(self, pos: int, whence: int = 0) -> int:
        del self.data[pos:]  # the SDK rewinds only to start a transcoded answer over
        return pos

    def tell(self) -> int:
        return len(self.data)


class _ProgressReader:
    """The file an upload reads, reporting bytes read for the first time: the SDK reads one
    chunk per request and may rewind to send a chunk again, which is not progress."""

    def __init__(self, f: Any, progress: Progress) -> None:
        self._f = f
        self._progress = progress
        self._high = 0
        self._reported = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        pos = self._f.tell()
        if pos > self._high:
            # Reported one read late: what was read before this call has now been sent.
            if self._high > self._reported:
                self._progress(self._high - self._reported)
                self._reported = self._high
            self._high = pos
        return data

    def report_rest(self, size: int) -> None:
        if size > self._reported:
            self._progress(size - self._reported)
            self._reported = size

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


__all__ = ["GCSStore", "make_client"]
