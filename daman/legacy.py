"""daman 0.2 objects: recognise them, check them, load them and rewrite them in today's format.

daman 0.2 stored each object at its key as ``joblib.dump({"data": obj, "meta": meta})``
(joblib's pickle, numpy arrays inlined) with S3 user metadata ``md5``, the hex md5 of the
whole file; no trailer, no footer, no signature, no writer or date.

How a file is recognised as one (it never has today's trailer):

- with user metadata (S3): it carries ``md5``, and its bytes must match it before anything
  unpickles them;
- without (a local-folder store keeps none): it must look like a whole pickle (its first byte
  pickle's PROTO, its last STOP). Nothing else can be checked: no hash exists to check it
  against. 0.2 never wrote to folders, so such a file is a copy someone put there.

A pull converts a 0.2 object into today's format (meta kept, sha256 computed) as it downloads
it, before the file enters the cache, so cache hits, ``verify`` and eviction never meet the old
format. The cache entry keeps the stored object's ETag: the copy stays current until the
stored 0.2 object changes (``dm_migrate`` rewriting it counts, and costs one more download).
With a signing key set, a 0.2 object is refused unopened, as any unsigned object is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import (
    DeserializationError,
    IntegrityError,
    KeyNotFoundError,
    UntrustedObjectError,
    map_os_error,
)
from .serialize import MAGIC, TRAILER, Footer, dumps_meta, write_object
from .store import ObjectInfo, Store

if TYPE_CHECKING:
    from .cache import CachedState
    from .results import ObjectDetails

FORMAT = "daman 0.2"
INSTALL_HINT = 'pip install "daman[legacy]"'
_PROTO = b"\x80"
_STOP = b"."
_CHUNK = 8 * 1024 * 1024
_CHECK_THREADS = 8


def recognise(tail: bytes, info: ObjectInfo, head: bytes = b"") -> bool:
    """Whether an object whose last bytes are ``tail`` (and first bytes ``head``, when known)
    is a daman 0.2 object; False for today's format and for anything else."""
    if info.size >= TRAILER.size and tail[-TRAILER.size :][: len(MAGIC)] == MAGIC:
        return False  # today's trailer
    if not tail or info.size < 2:
        return False
    if info.metadata is not None:
        return "md5" in info.metadata
    if not head and info.size <= len(tail):
        head = tail
    return tail.endswith(_STOP) and (not head or head.startswith(_PROTO))


def expected_md5(info: ObjectInfo) -> str | None:
    """The md5 daman 0.2 recorded for the object, if the store keeps user metadata."""
    value = (info.metadata or {}).get("md5")
    return value.strip().lower() if value else None


def refuse_if_signing(key: str, signing_key: bytes | None) -> None:
    if signing_key is not None:
        raise UntrustedObjectError(
            f"refusing to load {key!r}: it is a daman 0.2 object, which is not signed, and "
            "signing_key is set. Someone who trusts it can convert and sign it with "
            f"`dm_migrate {key}` (run with the team's signing key)."
        )


def check_md5(f: IO[bytes], info: ObjectInfo) -> None:
    """Raise :class:`IntegrityError` if the file's md5 is not the one 0.2 recorded."""
    expected = expected_md5(info)
    if expected is None:
        return  # a folder keeps no md5: nothing to check against
    md5 = hashlib.md5(usedforsecurity=False)
    fd, offset = f.fileno(), 0
    while chunk := os.pread(fd, _CHUNK, offset):
        md5.update(chunk)
        offset += len(chunk)
    if md5.hexdigest() != expected:
        raise IntegrityError(
            f"checksum mismatch: the daman 0.2 object {info.key!r} does not match the md5 it "
            "was stored with (corrupted in storage or in transit). Pull it again with "
            "force=True; if it persists, push it again."
        )


def require_joblib(key: str) -> Any:
    """joblib, which reads 0.2 objects, or a one-line error naming the extra that brings it."""
    try:
        import joblib
    except ImportError:
        raise DeserializationError(
            f"{key!r} is a daman 0.2 object; reading it needs joblib: {INSTALL_HINT}."
        ) from None
    return joblib


def load(f: IO[bytes], key: str) -> tuple[Any, Any]:
    """``(obj, meta)`` from a daman 0.2 file. Call it only after :func:`check_md5` and
    :func:`refuse_if_signing`: this unpickles."""
    joblib = require_joblib(key)
    f.seek(0)
    try:
        payload = joblib.load(f)
    except Exception as exc:
        raise DeserializationError(
            f"the daman 0.2 object {key!r} could not be loaded ({type(exc).__name__}: {exc}). "
            "Install the modules it needs in the versions that wrote it."
        ) from exc
    if not (isinstance(payload, dict) and set(payload) == {"data", "meta"}):
        raise IntegrityError(
            f"{key!r} is neither a daman object nor a daman 0.2 object (a pickle of something "
            "else). Push it again with daman."
        )
    return payload["data"], payload["meta"]


def write(
    obj: Any,
    meta: Any,
    out: IO[bytes],
    key: str,
    *,
    signing_key: bytes | None = None,
    pushed_at: datetime | None = None,
) -> Footer:
    """Write ``obj`` and ``meta`` to ``out`` in today's format, as converted from 0.2: the
    writer is marked as a conversion, and the date is the 0.2 object's (when the store said).
    Signed when a ``signing_key`` is given. Returns the footer written."""
    out.seek(0)
    out.truncate()
    footer = write_object(obj, dumps_meta(meta), out, key=key)
    # Rewrite the footer (it follows the payload, then the trailer) with what 0.2 knew.
    footer = dataclasses.replace(
        footer,
        pushed_by=f"{footer.pushed_by} (converted from {FORMAT})",
        pushed_at=pushed_at.isoformat(timespec="seconds") if pushed_at else footer.pushed_at,
    )
    if signing_key is not None:
        footer = footer.signed(signing_key, key)
    encoded = footer.encode()
    out.seek(footer.payload_size)
    out.truncate()
    out.write(encoded)
    out.write(TRAILER.pack(MAGIC, len(encoded)))
    out.flush()
    return footer


def _ends(f: IO[bytes]) -> tuple[bytes, bytes]:
    fd = f.fileno()
    size = os.fstat(fd).st_size
    return os.pread(fd, 1, 0), os.pread(fd, TRAILER.size, max(0, size - TRAILER.size))


def is_legacy_file(f: IO[bytes], info: ObjectInfo) -> bool:
    head, tail = _ends(f)
    return recognise(tail, dataclasses.replace(info, size=os.fstat(f.fileno()).st_size), head)


def convert_download(
    f: IO[bytes], path: Path, key: str, info: ObjectInfo, signing_key: bytes | None
) -> Footer | None:
    """If the file just downloaded to ``path`` (open as ``f``) is a daman 0.2 object, rewrite
    it in place in today's format and return its footer; None if it is not one (today's
    format, or neither: then the usual checks say what is wrong). Refused with a signing key;
    loaded only after its md5 matched."""
    if not is_legacy_file(f, info):
        return None
    refuse_if_signing(key, signing_key)
    check_md5(f, info)
    obj, meta = load(f, key)
    try:
        with open(path, "r+b") as out:  # the same file: ``f`` reads the new bytes
            return write(obj, meta, out, key, pushed_at=info.last_modified)
    except OSError as exc:
        raise map_os_error(
            exc, path.parent, "Free some space, or move local_dir with dm_configure"
        ) from exc


def details(
    key: str, info: ObjectInfo, states: dict[str, CachedState], signing_key: bytes | None
) -> ObjectDetails:
    """What ``info`` shows for a daman 0.2 object: size, md5, dates; its meta is inside it."""
    from .results import ObjectDetails

    if signing_key is not None:
        raise UntrustedObjectError(
            f"refusing to describe {key!r}: it is a daman 0.2 object, which is not signed, and "
            f"signing_key is set. Convert and sign it with `dm_migrate {key}`."
        )
    return ObjectDetails(
        key=key,
        size=info.size,
        etag=info.etag,
        last_modified=info.last_modified,
        sha256="",
        pushed_by="",
        pushed_at="",
        python="",
        cloudpickle="",
        meta=None,
        cached=key in states,
        persist=key in states and states[key].persist,
        legacy=True,
        md5=expected_md5(info) or "",
    )


def _check_one(store: Store, info: ObjectInfo) -> bool:
    try:
        tail, fresh = store.read_tail(info.key, TRAILER.size)
    except KeyNotFoundError:  # deleted since the listing
        return False
    return recognise(tail, fresh)


def find(store: Store, infos: Iterable[ObjectInfo]) -> set[str]:
    """The keys among ``infos`` that hold daman 0.2 objects. A listing cannot tell (S3 lists
    no user metadata), so this reads each object's last 16 bytes: one small request per key
    on S3, several at a time."""
    infos = list(infos)
    if not infos:
        return set()
    with ThreadPoolExecutor(min(_CHECK_THREADS, len(infos))) as pool:
        found = pool.map(lambda info: _check_one(store, info), infos)
        return {info.key for info, old in zip(infos, found, strict=True) if old}
