"""S3 (and S3-compatible: MinIO, Ceph, R2, ...) as the store, through boto3.

Credentials, region, profile and ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` come from the
standard AWS configuration; ``endpoint_url`` in daman's configuration overrides the endpoint.

Writes of new keys are conditional (``IfNoneMatch="*"``), for single uploads and for our own
parallel multipart uploads alike (boto3's managed transfer cannot send the condition), so of
two machines pushing the same new key at once exactly one wins. Large downloads fetch ranges
in parallel, each pinned to the first response's ETag (``IfMatch``), so a download never
mixes two versions of an object.

Objects up to ``MULTIPART_THRESHOLD`` travel in one request each way; larger ones in parts of
about ``MIN_PART_SIZE`` (the last never much smaller than the others), on one pool of
``TRANSFER_THREADS`` threads per store and process (a forked child makes its own).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from .. import forksafe
from ..config import Config
from ..errors import (
    ConcurrentChangeError,
    ConfigError,
    CredentialsError,
    DamanError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    StorageNotFoundError,
    StoreUnavailableError,
)
from ..files import open_empty
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
    TRANSFER_THREADS,
    ObjectChangedError,
    PartedStore,
    Parts,
    Stopped,
    new_pool,
    pwrite_all,
    run_parallel,
    split,
)
from .base import (
    Level,
    ObjectInfo,
    Progress,
    StoredVersion,
    WriteUnconfirmedError,
    Written,
    _no_progress,
    _no_range,
    bucket_and_prefix,
    describe_s3,
)

MULTIPART_THRESHOLD = 17 * 1024 * 1024
"""Objects up to this size are uploaded with one PUT and downloaded with one GET; larger ones
in parallel parts. 16 MiB and a margin, so that 16 MiB of data and daman's footer still make
one request: a multipart upload costs two more requests (create, complete), and parallel
parts pay for themselves only once several of at least MIN_PART_SIZE travel at once."""
QUICK_CONNECT_TIMEOUT = 2.0
QUICK_READ_TIMEOUT = 10.0
QUICK_ATTEMPTS = 2
"""A cached copy's freshness check gives up after about 2 x 2 s on an unreachable store."""
_STREAM_CHUNK = 1024 * 1024
T = TypeVar("T")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_CREDENTIAL_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "403", "AllAccessDisabled",
}  # fmt: skip
_TRANSIENT_READ_ERRORS = (
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
    ResponseStreamingError,
)


class _IncompleteResponse(StoreUnavailableError):
    """An answer without a header every such answer has: http.client takes headers cut short
    by a dropped connection for complete ones."""


def _complete(r: dict[str, Any], *names: str) -> dict[str, Any]:
    missing = [name for name in names if name not in r]
    if missing:
        raise _IncompleteResponse(
            f"an incomplete answer (no {', '.join(missing)}): the connection was cut mid-response"
        )
    return r


class _RangeNotSatisfiable(DamanError):
    """A ranged GET beyond the object's end (or of an empty object)."""


def _credentials_error() -> CredentialsError:
    return CredentialsError(
        "no (complete) AWS credentials found. Run `dm_aws --access_key_id ID "
        "--secret_access_key SECRET`, or set AWS_PROFILE / AWS_ACCESS_KEY_ID."
    )


def _whole(path: Path, size: int) -> bytes:
    """The file's bytes, for a single PUT: botocore sends a file object with ``Expect:
    100-continue``, a round trip to the server before the body; bytes (at most
    MULTIPART_THRESHOLD of them, as a multipart upload holds its parts) go at once."""
    with open(path, "rb", buffering=0) as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise OSError(f"{path} changed size while it was being uploaded")
    return data


def _part_spans(key: str, fd: int, total: int, first: int) -> list[tuple[str, int, int, int]]:
    """``(key, fd, start, end)`` of each part of a download after its first ``first`` bytes."""
    return [(key, fd, s, s + n - 1) for s, n in split(total - first, start=first)]


def _pinned(version: str | None) -> dict[str, str]:
    """The request parameter that reads one version of a key (none: the current one)."""
    return {"VersionId": version} if version else {}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Store(PartedStore):
    def __init__(
        self,
        make_client: Callable[[], Any],
        storage_name: str,
        max_attempts: int = 5,
        make_quick_client: Callable[[], Any] | None = None,
    ) -> None:
        bucket, prefix = bucket_and_prefix(storage_name)
        # A forked child makes its own client: a pooled keep-alive connection used by two
        # processes crosses their answers (the parent's is neither used nor closed).
        self._client = forksafe.PerProcess(make_client, make_client())
        self._quick_client = forksafe.PerProcess(make_quick_client or make_client)
        # One pool for every transfer of this store: a transfer does not wait for threads to
        # start. A forked child makes its own (its parent's threads do not exist there).
        self._pool = forksafe.PerProcess(new_pool)
        self.bucket = bucket
        self.prefix = prefix
        self.max_attempts = max_attempts
        self._bucket_exists = False  # once seen, a bare 404 can only mean a missing key
        self._versioning: bool | None = None  # asked once: see keeps_versions

    @classmethod
    def from_config(cls, config: Config) -> S3Store:
        def make_client(
            connect: float = config.connect_timeout,
            read: float = config.read_timeout,
            attempts: int = config.max_attempts,
        ) -> Any:
            boto_config = BotoConfig(
                connect_timeout=connect,
                read_timeout=read,
                retries={"max_attempts": attempts, "mode": "standard"},
                max_pool_connections=TRANSFER_THREADS * 2,
                request_checksum_calculation=config.checksums,
                response_checksum_validation="when_required",
            )
            return boto3.session.Session().client(
                "s3",
                endpoint_url=config.endpoint_url or None,
                region_name=config.region or None,
                config=boto_config,
            )

        def make_quick_client() -> Any:
            # Asking whether a cached copy is current must not keep a pull waiting for long
            # on an unreachable store: the cached copy is there to be used.
            return make_client(
                min(config.connect_timeout, QUICK_CONNECT_TIMEOUT),
                min(config.read_timeout, QUICK_READ_TIMEOUT),
                min(config.max_attempts, QUICK_ATTEMPTS),
            )

        try:
            return cls(make_client, config.storage_name, config.max_attempts, make_quick_client)
        except (NoCredentialsError, PartialCredentialsError):  # checked when the client is made
            raise _credentials_error() from None
        except ProfileNotFound as exc:
            raise CredentialsError(
                f"{exc}. Create it with `dm_aws --profile NAME ...` or unset AWS_PROFILE."
            ) from None
        except ValueError as exc:  # botocore's word for a malformed endpoint URL
            raise ConfigError(
                f"cannot use endpoint_url {config.endpoint_url!r}: {exc}. Give a full URL "
                "such as https://minio.example.com:9000."
            ) from None

    @property
    def client(self) -> Any:
        """This process's boto3 client."""
        return self._client.get()

    def describe(self) -> str:
        return describe_s3(self.bucket, self.prefix)

    def _name(self, key: str) -> str:
        return self.prefix + validate_name(key)

    # -- errors --------------------------------------------------------------------------

    def _translate(self, exc: Exception, key: str | None) -> DamanError:
        where = self.describe()
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return _credentials_error()
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = exc.response.get("Error", {}).get("Message", "") or code
            if code == "NoSuchBucket":
                return self._bucket_missing()
            if code == "InvalidRange":
                return _RangeNotSatisfiable(message)
            if code in ("NoSuchKey", "NoSuchVersion", "404", "NotFound") and key is not None:
                return KeyNotFoundError(key, where)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") and key:
                return KeyExistsError(key)
            if code in _CREDENTIAL_CODES or status == 403:
                return CredentialsError(
                    f"{where} refused the request ({code}: {message}). Check the credentials "
                    "with `dm_aws` and that they may read and write this bucket."
                )
            if status is not None and status >= 500:
                return StoreUnavailableError(
                    f"{where} kept failing ({code}: {message}) after {self.max_attempts} "
                    "attempts. Try again later."
                )
            return DamanError(f"{where} refused the request ({code}: {message}).")
        # Refused, timed out (a host that drops packets), TLS failures, broken answers.
        if isinstance(exc, (BotoConnectionError, HTTPClientError, *_TRANSIENT_READ_ERRORS)):
            return StoreUnavailableError(
                f"cannot reach {where} ({exc}). Check the network and the endpoint; a cached "
                "copy is still used by pull when there is one."
            )
        if isinstance(exc, BotoCoreError):  # ParamValidationError's text has several lines
            return DamanError(f"{where}: {' '.join(str(exc).split())}")
        raise exc

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            error = self._translate(exc, key)
            if isinstance(error, KeyNotFoundError):
                self._raise_if_bucket_missing()
            raise error from None

    def _bucket_missing(self) -> StorageNotFoundError:
        return StorageNotFoundError(
            f"the bucket {self.bucket!r} does not exist (or is not visible with these "
            "credentials). Create it, or run `dm_configure --storage_name BUCKET --service aws` "
            "with an existing bucket."
        )

    def _head_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise self._bucket_missing() from None
            raise
        self._bucket_exists = True

    def _raise_if_bucket_missing(self) -> None:
        # A HEAD of a missing key and of a key in a missing bucket both answer a bare 404;
        # ask the bucket once per store, on the first 404 only.
        if not self._bucket_exists:
            with contextlib.suppress(ClientError, BotoCoreError):
                self._head_bucket()

    # -- Store interface -----------------------------------------------------------------

    def check(self) -> None:
        with self._errors():
            self._head_bucket()

    def _idempotent(self, call: Callable[[], T]) -> T:
        """``call`` again while the answer is incomplete (reads and part uploads only)."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return call()
            except _IncompleteResponse:
                if attempt == self.max_attempts:
                    raise
        raise AssertionError("unreachable")

    def head(self, key: str, *, version: str | None = None) -> ObjectInfo:
        return self._head(key, self.client, version)

    def head_current(self, key: str) -> ObjectInfo:
        return self._head(key, self._quick_client.get(), None)

    def _head(self, key: str, client: Any, version: str | None) -> ObjectInfo:
        def once() -> dict[str, Any]:
            with self._errors(key):
                r = client.head_object(Bucket=self.bucket, Key=self._name(key), **_pinned(version))
            return _complete(r, "ContentLength", "ETag")

        r = self._idempotent(once)
        return ObjectInfo(
            key, r["ContentLength"], r["ETag"], r.get("LastModified"), r.get("Metadata") or {},
            r.get("VersionId") or "",
        )  # fmt: skip

    def put(
        self, key: str, path: Path, *, overwrite: bool, progress: Progress = _no_progress
    ) -> ObjectInfo:
        name = self._name(key)
        size = os.path.getsize(path)
        condition = {} if overwrite else {"IfNoneMatch": "*"}
        if size <= MULTIPART_THRESHOLD:
            with self._errors(key):
                r = self.client.put_object(
                    Bucket=self.bucket, Key=name, Body=_whole(path, size), **condition
                )
            progress(size)
            # Written, but the answer was cut: an unknown version makes the next pull fetch it.
            return ObjectInfo(key, size, r.get("ETag", ""), version=r.get("VersionId") or "")
        # The conditional completion settles whether the key exists; a HEAD run beside the
        # parts (no wait added) refuses an existing key before it is completed, on servers
        # that ignore If-None-Match there (some S3-compatible ones do).
        return self._put_multipart(key, name, path, size, condition, progress)

    def put_if_match(
        self, key: str, path: Path, etag: str, *, progress: Progress = _no_progress
    ) -> ObjectInfo:
        # S3 checks IfMatch atomically with the write (PutObject, CompleteMultipartUpload).
        # A store that ignores the header (moto 5.2 on CompleteMultipartUpload, some
        # S3-compatible servers) overwrites: the HEAD before a multipart upload narrows that.
        name = self._name(key)
        size = os.path.getsize(path)
        condition = {"IfMatch": etag}
        try:
            if size <= MULTIPART_THRESHOLD:
                body = _whole(path, size)
                with self._errors(key):
                    r = self.client.put_object(Bucket=self.bucket, Key=name, Body=body, **condition)
                progress(size)
                return ObjectInfo(key, size, r.get("ETag", ""))
            if self.head(key).etag != etag:  # fail before sending gigabytes
                raise KeyExistsError(key)
            return self._put_multipart(key, name, path, size, condition, progress)
        except KeyExistsError:  # a failed condition (412), as _translate names it
            raise ConcurrentChangeError(
                f"{key!r} changed in {self.describe()} while it was being rewritten; it was "
                "left as it is."
            ) from None

    def _put_multipart(
        self,
        key: str,
        name: str,
        path: Path,
        size: int,
        condition: dict[str, str],
        progress: Progress,
        *,
        copy_from: str | None = None,
    ) -> ObjectInfo:
        """A multipart upload of the file at ``path``, or, with ``copy_from`` (a name in this
        bucket holding the same bytes), of parts S3 copies from it on its side."""
        # As boto3's managed transfer does: name the part checksum up front and list each
        # part's checksum on completion, so the store checks every part end to end. (Parts
        # copied on S3's side carry none: S3 copies what it holds.)
        checksum = (
            {"ChecksumAlgorithm": "CRC32"}
            if self.client.meta.config.request_checksum_calculation == "when_supported"
            and copy_from is None
            else {}
        )
        with self._errors(key):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=name, **checksum
            )["UploadId"]
        completed = False
        try:
            fd = os.open(path, os.O_RDONLY)
            try:

                def send(
                    number: int, offset: int, length: int, stop: threading.Event
                ) -> dict[str, Any]:
                    if stop.is_set():
                        raise Stopped
                    if copy_from is not None:

                        def upload() -> dict[str, Any]:
                            with self._errors(key):
                                r = self.client.upload_part_copy(
                                    Bucket=self.bucket,
                                    Key=name,
                                    UploadId=upload_id,
                                    PartNumber=number,
                                    CopySource={"Bucket": self.bucket, "Key": copy_from},
                                    CopySourceRange=f"bytes={offset}-{offset + length - 1}",
                                )
                            return _complete(r.get("CopyPartResult", {}), "ETag")

                    else:
                        body = os.pread(fd, length, offset)

                        def upload() -> dict[str, Any]:
                            with self._errors(key):
                                r = self.client.upload_part(
                                    Bucket=self.bucket,
                                    Key=name,
                                    UploadId=upload_id,
                                    PartNumber=number,
                                    Body=body,
                                    **checksum,
                                )
                            return _complete(r, "ETag")

                    r = self._idempotent(upload)
                    progress(length)
                    done = {"PartNumber": number, "ETag": r["ETag"]}
                    if "ChecksumCRC32" in r:
                        done["ChecksumCRC32"] = r["ChecksumCRC32"]
                    return done

                def refuse_existing(stop: threading.Event) -> None:
                    try:
                        self.head(key)
                    except DamanError:  # absent, or not ours to tell: the condition decides
                        return
                    raise KeyExistsError(key)  # stops the parts; the upload is aborted

                sends = [
                    functools.partial(send, number, offset, length)
                    for number, (offset, length) in enumerate(split(size), start=1)
                ]
                creating = "IfNoneMatch" in condition
                done = run_parallel(
                    [refuse_existing, *sends] if creating else sends, self._pool.get()
                )
                parts = done[1:] if creating else done
            finally:
                os.close(fd)
            with self._errors(key):
                try:
                    r = self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        **condition,
                    )
                except ClientError as exc:
                    if _error_code(exc) != "NoSuchUpload":
                        raise
                    # The upload is gone: completed by an earlier attempt whose answer was
                    # lost (some servers answer the retry so), or aborted by someone else.
                    completed = True  # nothing left to abort
                    raise WriteUnconfirmedError(
                        f"{self.describe()} lost track of the upload of {key!r} (NoSuchUpload)"
                    ) from None
            completed = True
            return ObjectInfo(key, size, r.get("ETag", ""), version=r.get("VersionId") or "")
        finally:
            if not completed:  # never leave a half-upload behind (it costs money on S3)
                with contextlib.suppress(ClientError, BotoCoreError):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=name, UploadId=upload_id
                    )

    def _get_range(
        self, key: str, start: int, end: int | None, etag: str | None, version: str | None = None
    ) -> tuple[dict[str, Any], Iterator[bytes]]:
        """GET bytes ``start..end`` (inclusive; ``end=None``: ``start`` is a suffix length) of
        the key's current version, or of ``version``."""
        byte_range = f"bytes=-{start}" if end is None else f"bytes={start}-{end}"
        extra = {"IfMatch": etag} if etag else {}
        extra.update(_pinned(version))

        def once() -> dict[str, Any]:
            with self._errors(key):
                try:
                    r = self.client.get_object(
                        Bucket=self.bucket, Key=self._name(key), Range=byte_range, **extra
                    )
                except ClientError as exc:  # a 412 on a read: the IfMatch failed
                    if etag and _error_code(exc) in ("PreconditionFailed", "412"):
                        raise ObjectChangedError(
                            f"{key!r} changed while it was being read"
                        ) from None
                    raise
            return _complete(r, "ETag", "ContentLength")

        r = self._idempotent(once)
        return r, r["Body"].iter_chunks(_STREAM_CHUNK)

    def _fetch_part(
        self,
        key: str,
        fd: int,
        start: int,
        end: int,
        etag: str,
        progress: Progress,
        on_written: Written = _no_range,
        stop: threading.Event | None = None,
        *,
        version: str | None = None,
    ) -> None:
        """Fetch bytes ``start..end`` into ``fd``. A stream that breaks, or an answer shorter
        than asked (a server may send less than the range), is resumed where it stopped, up
        to ``max_attempts`` times."""
        offset = start
        for attempt in range(1, self.max_attempts + 1):
            if stop is not None and stop.is_set():
                raise Stopped
            try:
                if offset <= end:
                    r, chunks = self._get_range(key, offset, end, etag, version)
                    answered = _CONTENT_RANGE.match(r.get("ContentRange") or "")
                    if answered is None or int(answered.group(1)) != offset:
                        raise StoreUnavailableError(
                            f"{self.describe()} answered another range than bytes {offset}-{end}"
                        )
                    with self._errors(key):
                        for chunk in chunks:
                            if stop is not None and stop.is_set():
                                raise Stopped
                            chunk = chunk[: end + 1 - offset]  # never past the range
                            pwrite_all(fd, chunk, offset)
                            offset += len(chunk)
                if offset != end + 1:
                    raise StoreUnavailableError(
                        f"{key!r} came short from {self.describe()}: {end + 1 - offset} of "
                        f"{end + 1 - start} bytes missing after {attempt} attempts"
                    )
                on_written(start, end + 1 - start)
                progress(end + 1 - start)
                return
            except StoreUnavailableError:
                if attempt == self.max_attempts:
                    raise
                delay = min(2.0, 0.1 * 2**attempt) * random.random()
                if stop is not None:
                    stop.wait(delay)  # wakes at once if another part failed
                else:
                    time.sleep(delay)

    def _get_once(
        self,
        key: str,
        dest: Path,
        progress: Progress,
        on_size: Progress,
        on_written: Written,
        version: str | None = None,
    ) -> ObjectInfo:
        first_end = MULTIPART_THRESHOLD - 1
        try:
            r, chunks = self._get_range(key, 0, first_end, None, version)
        except _RangeNotSatisfiable:  # an empty object has no byte 0
            info = self.head(key, version=version)
            if info.size:
                raise
            dest.write_bytes(b"")
            return info
        match = _CONTENT_RANGE.match(r.get("ContentRange") or "")
        # A server that ignores Range sends the whole object (no Content-Range): take it all.
        total = int(match.group(3)) if match else r["ContentLength"]
        first_len = min(total, first_end + 1) if match else total
        # S3 always keeps user metadata: {} (not None) says an object has none.
        info = ObjectInfo(
            key, total, r["ETag"], r.get("LastModified"), r.get("Metadata") or {},
            r.get("VersionId") or "",
        )  # fmt: skip
        on_size(total)
        with open_empty(dest) as out:
            fd = out.fileno()
            # The rest, in parallel parts pinned to this version, starts now, while this
            # thread reads the first response: nothing waits for the first range to end.
            rest = None
            if total > first_len:
                fetch, etag = self._fetch_part, info.etag
                rest = Parts(
                    self._pool.get(),
                    [  # each called with the transfer's stop event as its last argument
                        functools.partial(fetch, *part, etag, progress, on_written, version=version)
                        for part in _part_spans(key, fd, total, first_len)
                    ],
                )
            try:
                offset = 0
                with contextlib.suppress(StoreUnavailableError), self._errors(key):
                    for chunk in chunks:
                        if rest is not None and rest.failed.is_set():
                            break  # a part failed: its error is raised below
                        chunk = chunk[: first_len - offset]  # never past the range
                        pwrite_all(fd, chunk, offset)
                        on_written(offset, len(chunk), chunk)  # hashed as it arrives
                        progress(len(chunk))
                        offset += len(chunk)
                if offset != first_len and not (rest is not None and rest.failed.is_set()):
                    # The first stream broke (or came short): fetch what it missed, with retries.
                    self._fetch_part(
                        key, fd, offset, first_len - 1, info.etag, progress, on_written,
                        rest.stop if rest is not None else None, version=version,
                    )  # fmt: skip
                if rest is not None:
                    rest.wait()
            except BaseException:
                if rest is not None:
                    rest.cancel()  # every part has ended before ``out`` closes
                raise
        return info

    def _read_small(
        self, key: str, start: int, end: int | None, version: str | None
    ) -> tuple[dict[str, Any], bytes]:
        """GET a small range whole, asked again (up to max_attempts) when its stream breaks
        midway (tails and footers: small enough to read again from their start)."""
        for attempt in range(1, self.max_attempts + 1):
            r, chunks = self._get_range(key, start, end, None, version)
            try:
                with self._errors(key):
                    return r, b"".join(chunks)
            except StoreUnavailableError:
                if attempt == self.max_attempts:
                    raise
        raise AssertionError("unreachable")

    def read_tail(
        self, key: str, length: int, *, version: str | None = None
    ) -> tuple[bytes, ObjectInfo]:
        try:
            if length <= 0:
                raise _RangeNotSatisfiable("empty range")
            r, data = self._read_small(key, length, None, version)
        except _RangeNotSatisfiable:
            return b"", self.head(key, version=version)
        match = _CONTENT_RANGE.match(r.get("ContentRange", ""))
        total = int(match.group(3)) if match else len(data)
        metadata = r.get("Metadata") or {}
        return data, ObjectInfo(
            key, total, r["ETag"], r.get("LastModified"), metadata, r.get("VersionId") or ""
        )

    def read_range(
        self, key: str, offset: int, length: int, *, version: str | None = None
    ) -> bytes:
        if length <= 0:
            self.head(key, version=version)  # still a KeyNotFoundError for a missing key
            return b""
        try:
            return self._read_small(key, offset, offset + length - 1, version)[1]
        except _RangeNotSatisfiable:  # starts past the end, as reading a file there would
            return b""

    def delete(self, key: str) -> None:
        self.head(key)  # S3 deletes of missing keys succeed silently; we must say so
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_listing(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        request = dict(Bucket=self.bucket, Prefix=self.prefix + prefix)
        records, after = f"{HISTORY}/", SKIP_HISTORY_AFTER
        skip = not prefix.startswith(records)  # daman's versions, unless they are asked for
        resumed = False
        with self._errors():
            pages: Any = paginator.paginate(**request)
            while pages is not None:
                current, pages = pages, None
                for page in current:
                    for item in page.get("Contents", []):
                        key = item["Key"][len(self.prefix) :]
                        if skip and key.startswith(records) and not resumed:
                            # S3 sorts them among the keys: go on after the last of them
                            # rather than read their names
                            resumed = True
                            pages = paginator.paginate(**request, StartAfter=self.prefix + after)
                            break
                        if resumed and key < after:
                            continue  # from a server that ignores StartAfter: seen already
                        if not listed(key, prefix):  # e.g. "folder/" markers of other tools
                            continue
                        yield ObjectInfo(key, item["Size"], item["ETag"], item.get("LastModified"))
                    if pages is not None:
                        break

    # -- versions, when the bucket keeps them ----------------------------------------------

    def keeps_versions(self) -> bool:
        """Whether the bucket's versioning is enabled (asked once per store: one request, or
        one per thread asking at the same moment). A server that will not say (no permission,
        not implemented) is taken to keep none: daman then keeps the versions itself, which is
        right in either case. No lock is held across the request: a child forked meanwhile
        would have inherited it held, and waited for ever."""
        if self._versioning is None:
            try:
                with self._errors():
                    r = self.client.get_bucket_versioning(Bucket=self.bucket)
                self._versioning = r.get("Status") == "Enabled"
            except (StoreUnavailableError, StorageNotFoundError):
                raise
            except DamanError:
                self._versioning = False
        return self._versioning

    def versions(self, key: str) -> list[StoredVersion]:
        """One ``list_object_versions`` request per 1,000 versions: S3 lists a key's versions
        (newest first) before those of the keys it is a prefix of, so the listing stops at
        the first other key."""
        name = self._name(key)
        found: list[tuple[Any, int, StoredVersion]] = []
        paginator = self.client.get_paginator("list_object_versions")
        with self._errors(key):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=name):
                others = False
                for deleted, kind in ((False, "Versions"), (True, "DeleteMarkers")):
                    for item in page.get(kind, []):
                        if item["Key"] != name:
                            others = True
                            continue
                        version = StoredVersion(
                            version=item["VersionId"],
                            size=0 if deleted else item["Size"],
                            etag="" if deleted else item["ETag"],
                            last_modified=item.get("LastModified"),
                            latest=bool(item.get("IsLatest")),
                            deleted=deleted,
                        )
                        found.append((item.get("LastModified"), len(found), version))
                if others:
                    break
        # Newest first: the latest, then by time (each list came newest first; S3's times
        # are to the second, so within one second the order is S3's).
        found.sort(key=lambda f: (not f[2].latest, -(f[0].timestamp() if f[0] else 0), f[1]))
        return [version for _, _, version in found]

    def delete_version(self, key: str, version: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key), VersionId=version)

    # -- copies on S3's side ---------------------------------------------------------------

    def copies(self, size: int, *, overwrite: bool) -> bool:
        return overwrite or size > MULTIPART_THRESHOLD

    def put_copy(
        self,
        key: str,
        path: Path,
        *,
        source: str,
        overwrite: bool,
        progress: Progress = _no_progress,
    ) -> ObjectInfo:
        """Up to MULTIPART_THRESHOLD: ``copy_object`` to overwrite (no condition, which every
        S3-compatible server knows), and a conditional PUT of the bytes to create (the
        condition daman relies on already; not every server checks one on a copy). Above:
        a multipart upload whose parts are copied on S3's side, in parallel, completed as a
        push's is (``IfNoneMatch`` to create)."""
        size = os.path.getsize(path)
        name, src = self._name(key), self._name(source)
        if size <= MULTIPART_THRESHOLD:
            if not overwrite:
                return self.put(key, path, overwrite=False, progress=progress)
            with self._errors(key):
                r = self.client.copy_object(
                    Bucket=self.bucket, Key=name, CopySource={"Bucket": self.bucket, "Key": src}
                )
            progress(size)
            etag = r.get("CopyObjectResult", {}).get("ETag", "")
            return ObjectInfo(key, size, etag, version=r.get("VersionId") or "")
        condition = {} if overwrite else {"IfNoneMatch": "*"}
        return self._put_multipart(key, name, path, size, condition, progress, copy_from=src)

    def list_level(self, prefix: str = "", *, token: str | None = None, limit: int = 1000) -> Level:
        """One ``list_objects_v2`` request with ``Delimiter="/"``: S3 rolls every key below
        the level up into its sub-prefix, so a level costs one request per ``limit`` entries
        however many keys lie below it. ``token`` is S3's own continuation token."""
        validate_prefix(prefix)
        request: dict[str, Any] = dict(
            Bucket=self.bucket, Prefix=self.prefix + prefix, Delimiter="/", MaxKeys=max(1, limit)
        )
        if token is not None:
            request["ContinuationToken"] = token
        with self._errors():
            page = self.client.list_objects_v2(**request)
        start = len(self.prefix)
        prefixes = []
        for item in page.get("CommonPrefixes", []):
            name = item["Prefix"][start:]
            try:
                validate_prefix(name)
            except InvalidKeyError:  # "a//": an empty part no key can have
                continue
            prefixes.append(name)
        objects = []
        for item in page.get("Contents", []):
            key = item["Key"][start:]
            try:
                validate_key(key)
            except InvalidKeyError:  # e.g. "folder/" markers made by other S3 tools
                continue
            objects.append(ObjectInfo(key, item["Size"], item["ETag"], item.get("LastModified")))
        more = page.get("IsTruncated") and page.get("NextContinuationToken")
        return Level(prefix, sorted(prefixes), sorted(objects, key=lambda o: o.key), more or None)

    def close(self) -> None:
        for made in (self._client, self._quick_client):
            client = made.made()  # a forked child leaves its parent's clients alone
            if client is not None:
                client.close()
        pool = self._pool.made()  # and its parent's pool
        if pool is not None:
            self._pool = forksafe.PerProcess(new_pool)  # a later transfer makes a new one
            pool.shutdown(wait=True)
