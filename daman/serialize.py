"""The one file format daman stores, in the bucket and in the cache alike.

::

    [pickle stream, protocol 5][pad][buffer 0][pad][buffer 1]...[pickled meta][footer][trailer]
    footer  = UTF-8 JSON: format, writer's Python and cloudpickle versions, offsets and lengths
              of the stream, each buffer and the meta, sha256 of every byte before the footer,
              who pushed and when
    trailer = 16 bytes: MAGIC + footer length (little-endian u64)

Large buffers (numpy arrays, and anything else whose protocol-5 reduction hands pickle a
``PickleBuffer``) are written out-of-band, each at an offset aligned to 64 bytes, so a reader
can hand ``mmap`` slices of the file to ``pickle.loads`` without copying. ``bytes`` and
``bytearray`` stay in the stream: pickle's C implementation saves them before any hook runs.
Everything needed by ``dm.info`` (meta, sizes, hash, who/when) sits at the end of the file,
so one ranged read of the tail answers it without downloading the object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import hmac
import io
import json
import mmap
import os
import pickle
import secrets
import socket
import struct
import sys
import threading
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

import cloudpickle

from .errors import (
    DeserializationError,
    IntegrityError,
    SerializationError,
    UntrustedObjectError,
    VersionMismatchWarning,
)

FORMAT_VERSION = 1
MAGIC = b"DAMAN\x00v1"
TRAILER = struct.Struct("<8sQ")
ALIGN = 64
PROTOCOL = 5
TAIL_GUESS = 64 * 1024  # one ranged read of this many bytes usually holds meta + footer
_PAD = bytes(ALIGN)
_HASH_CHUNK = 8 * 1024 * 1024
_MAP_MIN_BYTES = 1024 * 1024  # out-of-band buffers this large are read into fresh mappings
_PARALLEL_HASH_BYTES = 4 * 1024 * 1024

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, length) -> bytes``: how the reader reaches a file, local or remote."""


@dataclasses.dataclass(frozen=True)
class Footer:
    format: int
    python: str
    cloudpickle: str
    stream: tuple[int, int]
    buffers: tuple[tuple[int, int], ...]
    meta: tuple[int, int]
    payload_size: int
    sha256: str
    pushed_by: str
    pushed_at: str
    meta_sha256: str = ""
    """Lets ``info`` check the meta it reads from the tail before unpickling it."""
    push_id: str = ""
    """Random, one per write: tells this push's object from an identical one pushed by the
    same person in the same second (a retried write meeting itself is not a conflict)."""
    signature: str = ""
    """HMAC-SHA256 of the rest of the footer with the team's signing key; empty if unsigned."""

    @property
    def file_size(self) -> int:
        return self.payload_size + len(self.encode()) + TRAILER.size

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")

    def _signed_bytes(self) -> bytes:
        # The footer holds the sha256 of every payload byte (and of the meta), so signing the
        # footer signs the payload: one HMAC over a few hundred bytes, not a second pass.
        fields = dataclasses.asdict(self)
        del fields["signature"]
        return json.dumps(fields, sort_keys=True).encode("utf-8")

    def signed(self, signing_key: bytes, key: str) -> Footer:
        """This footer signed for ``key``: the key is part of the message, so a signed
        object copied under another key is refused."""
        message = self._signed_bytes() + b"\0" + key.encode("utf-8")
        mac = hmac.new(signing_key, message, hashlib.sha256).hexdigest()
        return dataclasses.replace(self, signature=mac)

    def check_signature(self, signing_key: bytes, key: str) -> None:
        """Raise :class:`UntrustedObjectError` unless signed with ``signing_key`` for ``key``.
        Call it before unpickling anything of the object, once its sha256 was checked."""
        what = repr(key)
        if not self.signature:
            raise UntrustedObjectError(
                f"refusing to load {what}: it is not signed, and signing_key is set. It was "
                "pushed without the team's signing key (or by an older daman); ask its author "
                "to push it again with the key."
            )
        expected = self.signed(signing_key, key).signature
        if not hmac.compare_digest(expected, self.signature):
            raise UntrustedObjectError(
                f"refusing to load {what}: its signature does not match signing_key and this "
                "key. It was pushed with another signing key, altered after it was signed, or "
                "copied here from another key. Check your signing_key; if it is right, do not "
                "trust this object."
            )


def _writer_identity() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class _HashingWriter:
    """Counts and hashes every byte on its way to the file (no second copy in memory)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.pos = 0
        self.error: OSError | None = None
        """What writing the file raised, to tell it from what the object's pickling raised."""

    def write(self, data: Any) -> int:
        try:
            return self._write(data)
        except OSError as exc:
            self.error = exc
            raise

    def _write(self, data: Any) -> int:
        view = memoryview(data)
        if view.nbytes >= _PARALLEL_HASH_BYTES:
            # hashlib and file writes both release the GIL: hash a large buffer on a second
            # core while the first copies it to the file.
            hasher = threading.Thread(target=self.sha.update, args=(view,))
            hasher.start()
            try:
                self._f.write(view)
            finally:
                hasher.join()
        else:
            self._f.write(view)
            self.sha.update(view)
        self.pos += view.nbytes
        return view.nbytes

    def pad_to(self, align: int) -> None:
        gap = -self.pos % align
        if gap:
            self.write(_PAD[:gap])


class FileBytes:
    """A file's contents that pickle as ``bytes`` written out-of-band: pushing a file does
    not hold it in memory, and any Python reads it back as plain ``bytes``."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (pickle.PickleBuffer(self.buffer),)


def dumps_meta(meta: Any) -> bytes:
    """Pickle meta up front, so an unpicklable meta fails before any work is done."""
    try:
        return cloudpickle.dumps(meta, protocol=PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"the meta cannot be pickled ({type(exc).__name__}: {exc}). "
            "Pass plain data (dict, str, numbers) as meta."
        ) from exc


def write_object(
    obj: Any,
    meta_bytes: bytes,
    f: IO[bytes],
    signing_key: bytes | None = None,
    key: str = "",
) -> Footer:
    """Write ``obj`` and pickled meta to the binary file ``f``; return the footer written
    (signed when a ``signing_key`` is given)."""
    out = _HashingWriter(f)
    buffers: list[pickle.PickleBuffer] = []
    try:
        cloudpickle.dump(obj, out, protocol=PROTOCOL, buffer_callback=buffers.append)
    except OSError as exc:
        if exc is out.error:  # the file, not the object: disc full, I/O error
            raise
        raise SerializationError(
            f"the object cannot be pickled ({type(exc).__name__}: {exc})."
        ) from exc
    except Exception as exc:
        raise SerializationError(
            f"the object cannot be pickled ({type(exc).__name__}: {exc}). "
            "daman stores what cloudpickle can pickle; convert or drop the offending part."
        ) from exc
    stream = (0, out.pos)
    spans = []
    for buf in buffers:
        raw = buf.raw()
        out.pad_to(ALIGN)
        spans.append((out.pos, raw.nbytes))
        out.write(raw)
        raw.release()
    buffers.clear()
    meta_span = (out.pos, len(meta_bytes))
    out.write(meta_bytes)
    footer = Footer(
        format=FORMAT_VERSION,
        python=".".join(map(str, sys.version_info[:3])),
        cloudpickle=cloudpickle.__version__,
        stream=stream,
        buffers=tuple(spans),
        meta=meta_span,
        payload_size=out.pos,
        sha256=out.sha.hexdigest(),
        pushed_by=_writer_identity(),
        pushed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        meta_sha256=hashlib.sha256(meta_bytes).hexdigest(),
        push_id=secrets.token_hex(8),
    )
    if signing_key is not None:
        footer = footer.signed(signing_key, key)
    encoded = footer.encode()
    f.write(encoded)
    f.write(TRAILER.pack(MAGIC, len(encoded)))
    return footer


def parse_footer(tail: bytes, file_size: int) -> Footer | int:
    """The footer from the last bytes of a file, or how many tail bytes are needed for it."""
    if file_size < TRAILER.size or len(tail) < TRAILER.size:
        raise IntegrityError("not a daman object: the file is too short. Push it again.")
    magic, footer_len = TRAILER.unpack(tail[-TRAILER.size :])
    if magic != MAGIC:
        raise IntegrityError("not a daman object (no daman trailer): it may be truncated.")
    if footer_len + TRAILER.size > file_size:
        raise IntegrityError("corrupt daman object: the footer length is out of range.")
    if footer_len + TRAILER.size > len(tail):
        return footer_len + TRAILER.size
    raw = tail[-TRAILER.size - footer_len : -TRAILER.size]
    try:
        data = json.loads(raw)
        version = int(data["format"])
    except (ValueError, TypeError, KeyError) as exc:
        raise IntegrityError(f"corrupt daman object: unreadable footer ({exc}).") from None
    if version > FORMAT_VERSION:
        raise DeserializationError(
            f"this object uses daman format {version}; upgrade daman to read it."
        )
    try:
        # Fields a later daman adds (within the same format) are ignored, not fatal.
        known = {
            field.name: data[field.name]
            for field in dataclasses.fields(Footer)
            if field.name in data or field.default is dataclasses.MISSING  # else: older file
        }
        footer = Footer(
            **{
                **known,
                "stream": tuple(known["stream"]),
                "buffers": tuple(tuple(b) for b in known["buffers"]),
                "meta": tuple(known["meta"]),
            }
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise IntegrityError(f"corrupt daman object: unreadable footer ({exc}).") from None
    spans = [footer.stream, footer.meta, *footer.buffers]
    if footer.payload_size + footer_len + TRAILER.size != file_size or any(
        off < 0 or length < 0 or off + length > footer.payload_size for off, length in spans
    ):
        raise IntegrityError("corrupt daman object: the footer does not match the file size.")
    return footer


def read_footer(read_at: ReadAt, file_size: int, tail: bytes = b"") -> Footer:
    """Read the footer through ``read_at``, reusing ``tail`` (the file's last bytes) if given."""
    if len(tail) < min(file_size, TRAILER.size):
        tail = read_at(max(0, file_size - TAIL_GUESS), min(file_size, TAIL_GUESS))
    parsed = parse_footer(tail, file_size)
    if isinstance(parsed, int):
        tail = read_at(file_size - parsed, parsed)
        parsed = parse_footer(tail, file_size)
        assert isinstance(parsed, Footer)
    return parsed


def _read_into(fd: int, buf: bytearray | mmap.mmap, offset: int) -> None:
    """Fill ``buf`` from ``offset``; one read(2) returns at most ~2 GiB on Linux, so loop."""
    view = memoryview(buf)
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise IntegrityError("the file is shorter than its footer says: it was truncated.")
        done += got


def file_reader(f: IO[bytes]) -> ReadAt:
    fd = f.fileno()

    def read_at(offset: int, length: int) -> bytes:
        buf = bytearray(length)
        _read_into(fd, buf, offset)
        return bytes(buf)

    return read_at


def footer_of(f: IO[bytes]) -> Footer:
    return read_footer(file_reader(f), os.fstat(f.fileno()).st_size)


class PrefixHasher:
    """The sha256 of a file while a download writes it, ranges in any order.

    ``written(offset, length)`` says a range is on disc (from any thread); a thread hashes
    the contiguous prefix as it grows, stopping ``TAIL_GUESS`` bytes short of the end, where
    the footer usually starts. Once the file is whole, ``digest(footer)`` hashes what is left
    of the payload, so the check costs a few MiB after the download instead of a second pass
    over the whole file. ``start(size)`` begins (or, for a download that restarted, begins
    again); ``close()`` stops the thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._reset(0)

    def _reset(self, size: int) -> None:
        self._sha = hashlib.sha256()
        self._limit = max(0, size - TAIL_GUESS)
        self._prefix = 0  # bytes [0, prefix) are on disc
        self._pending: dict[int, int] = {}  # start -> end of ranges past the prefix
        self._hashed = 0
        self._stop = False
        self._failed = False

    def start(self, size: int) -> None:
        self.close()
        with self._cond:
            self._reset(size)
        self._thread = threading.Thread(target=self._run, name="daman-hash", daemon=True)
        self._thread.start()

    def written(self, offset: int, length: int) -> None:
        with self._cond:
            end = offset + length
            if offset > self._prefix:
                self._pending[offset] = max(end, self._pending.get(offset, end))
                return
            self._prefix = max(self._prefix, end)
            while self._prefix in self._pending:  # ranges that now adjoin the prefix
                self._prefix = max(self._prefix, self._pending.pop(self._prefix))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and min(self._prefix, self._limit) <= self._hashed:
                    self._cond.wait()
                if self._stop:
                    return
                pos, end = self._hashed, min(self._prefix, self._limit)
            try:
                while pos < end and not self._stop:
                    chunk = os.pread(self._fd, min(_HASH_CHUNK, end - pos), pos)
                    if not chunk:
                        raise OSError("short read")
                    self._sha.update(chunk)
                    pos += len(chunk)
            except OSError:
                self._failed = True
                return
            finally:
                with self._cond:
                    self._hashed = pos

    def close(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify()
            self._thread.join()
            self._thread = None

    def digest(self, footer: Footer) -> str | None:
        """The payload's sha256 once the file is whole, or None if it cannot tell (nothing
        was reported, a read failed, or the footer starts before the hashed prefix ends)."""
        self.close()
        if self._failed or self._hashed > footer.payload_size:
            return None
        sha, offset = self._sha, self._hashed
        while offset < footer.payload_size:
            chunk = os.pread(self._fd, min(_HASH_CHUNK, footer.payload_size - offset), offset)
            if not chunk:
                return None
            sha.update(chunk)
            offset += len(chunk)
        return sha.hexdigest()


def verify_file(
    f: IO[bytes], footer: Footer | None = None, hasher: PrefixHasher | None = None
) -> Footer:
    """Check the sha256 of everything before the footer; raise :class:`IntegrityError` if wrong.
    A ``hasher`` that followed the file's download saves most of the reading and hashing."""
    footer = footer or footer_of(f)
    digest = hasher.digest(footer) if hasher is not None else None
    if digest is None:
        sha = hashlib.sha256()
        fd, offset, remaining = f.fileno(), 0, footer.payload_size
        while remaining:
            chunk = os.pread(fd, min(_HASH_CHUNK, remaining), offset)
            if not chunk:
                break
            sha.update(chunk)
            offset += len(chunk)
            remaining -= len(chunk)
        digest = sha.hexdigest() if not remaining else ""
    if digest != footer.sha256:
        raise IntegrityError(
            "checksum mismatch: the object's bytes differ from what was written "
            "(corrupted in storage or in transit). Pull it again with force=True."
        )
    return footer


def check_meta(read_at: ReadAt, footer: Footer) -> None:
    """Raise :class:`IntegrityError` if the meta's bytes do not match ``meta_sha256`` (cheap:
    the meta is small; files written before meta_sha256 existed pass)."""
    if footer.meta_sha256:
        offset, length = footer.meta
        if hashlib.sha256(read_at(offset, length)).hexdigest() != footer.meta_sha256:
            raise IntegrityError(
                "checksum mismatch in the meta: the object was corrupted in storage or in transit."
            )


def load_meta(read_at: ReadAt, footer: Footer, tail: bytes = b"", file_size: int = 0) -> Any:
    """Unpickle the meta, taking its bytes from ``tail`` when they are already there."""
    offset, length = footer.meta
    tail_start = file_size - len(tail)
    if tail and offset >= tail_start:
        data = tail[offset - tail_start : offset - tail_start + length]
    else:
        data = read_at(offset, length)
    if footer.meta_sha256 and hashlib.sha256(data).hexdigest() != footer.meta_sha256:
        raise IntegrityError(
            "checksum mismatch in the meta: the object was corrupted in storage or in transit."
        )
    return _unpickle(lambda: pickle.loads(data), footer)


def _uninitialised(length: int) -> bytearray | mmap.mmap:
    """Writable memory for one out-of-band buffer that the read will fill. ``bytearray(n)``
    writes n zeros first, touching every page twice; a large buffer gets a private anonymous
    mapping instead (the kernel hands out zeroed pages as the read first touches them), hinted
    for transparent huge pages as numpy does for its own large arrays."""
    if length < _MAP_MIN_BYTES:
        return bytearray(length)
    mapped = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        with contextlib.suppress(OSError):
            mapped.madvise(mmap.MADV_HUGEPAGE)
    return mapped


def load_object(f: IO[bytes], footer: Footer) -> Any:
    """Unpickle the object from an open file, reading each out-of-band buffer into its own
    writable memory (one copy from disc into the object, none more)."""
    fd = f.fileno()
    stream = bytearray(footer.stream[1])
    _read_into(fd, stream, footer.stream[0])
    buffers = []
    for offset, length in footer.buffers:
        buf = _uninitialised(length)
        _read_into(fd, buf, offset)
        buffers.append(buf)
    return _unpickle(lambda: pickle.loads(stream, buffers=buffers), footer)


def version_problem(footer: Footer) -> str | None:
    """A sentence describing a writer/reader version gap that can break loading, or None."""
    here_py = ".".join(map(str, sys.version_info[:2]))
    there_py = ".".join(footer.python.split(".")[:2])
    here_cp = ".".join(cloudpickle.__version__.split(".")[:2])
    there_cp = ".".join(footer.cloudpickle.split(".")[:2])
    gaps = []
    if here_py != there_py:
        gaps.append(f"Python {footer.python} (here {sys.version.split()[0]})")
    if here_cp != there_cp:
        gaps.append(f"cloudpickle {footer.cloudpickle} (here {cloudpickle.__version__})")
    if not gaps:
        return None
    return "written with " + " and ".join(gaps)


def warn_if_versions_differ(footer: Footer, key: str) -> None:
    problem = version_problem(footer)
    if problem:
        warnings.warn(
            f"{key!r} was {problem}; functions and classes pickled by value may not load or "
            "may behave differently. Match the writer's versions if loading fails.",
            VersionMismatchWarning,
            stacklevel=3,
        )


def _unpickle(load: Callable[[], Any], footer: Footer) -> Any:
    try:
        return load()
    except Exception as exc:
        problem = version_problem(footer)
        hint = f" It was {problem}." if problem else ""
        raise DeserializationError(
            f"the object could not be unpickled ({type(exc).__name__}: {exc}).{hint} "
            "Install the modules it needs in the versions that wrote it."
        ) from exc


def dump_to_bytes(
    obj: Any, meta: Any = None, signing_key: bytes | None = None, key: str = ""
) -> bytes:
    """Whole object file in memory (small objects and tests)."""
    buf = io.BytesIO()
    write_object(obj, dumps_meta(meta), buf, signing_key, key)
    return buf.getvalue()
