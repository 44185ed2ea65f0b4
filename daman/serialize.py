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
import stat
import struct
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any

import cloudpickle

from .errors import (
    DeserializationError,
    IntegrityError,
    InvalidArgumentError,
    SerializationError,
    UntrustedObjectError,
)
from .versions import CODE_MARK, check_code, describe_failure, library_versions

FORMAT_VERSION = 2
"""2 adds the hashes of the pickle stream (and, until 2026-12-01, of each buffer); format 1
objects still load."""
MAGIC = b"DAMAN\x00v1"
TRAILER = struct.Struct("<8sQ")
ALIGN = 64
PROTOCOL = 5
TAIL_GUESS = 64 * 1024  # one ranged read of this many bytes usually holds meta + footer
_PAD = bytes(ALIGN)
_HASH_CHUNK = 8 * 1024 * 1024
_MAP_MIN_BYTES = 1024 * 1024  # out-of-band buffers this large are read into fresh mappings
_PARALLEL_HASH_BYTES = 4 * 1024 * 1024
_INLINE_HASH_BYTES = 1024 * 1024
"""Downloads up to this size are hashed in one pass once whole (``PrefixHasher.digest``):
they arrive in one piece, so hashing them as they arrive would overlap nothing."""
_FILE_CHUNK = 8 * 1024 * 1024


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
    key: str = ""
    """The key it was pushed under: a pull checks that the store answered with the object it
    asked for (empty in objects written before the check existed)."""
    code: bool | None = None
    """Whether the pickle holds code pickled by value (functions, lambdas, classes defined in
    ``__main__`` or a notebook): such code only runs under the writer's Python minor version.
    None in objects written before it was recorded."""
    libraries: tuple[tuple[str, str], ...] = ()
    """``(module, version)`` of the main data libraries loaded when it was pushed (numpy,
    pandas, ..., and the module of the object's type): what a colleague needs to load it."""
    readonly: tuple[int, ...] = ()
    """Which out-of-band buffers were read-only (a load gives them back as ``bytes``)."""
    stream_sha256: str = ""
    """Format 2: the pickle stream's sha256. With ``meta_sha256`` it covers all that can run
    code when unpickled, so a signed, mapped cache hit checks these and the signature and
    never reads the buffers (they hold data only)."""
    buffer_sha256: tuple[str, ...] = ()
    """Each out-of-band buffer's sha256, in format 2 objects written before 2026-12-01;
    empty since. Nothing read them (``verify`` checks every payload byte through ``sha256``,
    a mapped hit the stream), and they cost every push a second hash of each array. Kept
    as read, so that such an object's signature, which covers them, still holds."""
    version: str = ""
    """The version id daman gave this write when it keeps the key's versions itself (see
    ``daman.history``: the object was recorded under ``.daman-history/`` under this id before
    it became the key's); empty otherwise, and in objects written before versions existed."""
    restored_from: str = ""
    """The version this one restored (``dm.restore``): its bytes but for this footer."""

    @property
    def file_size(self) -> int:
        return self.payload_size + len(self.encode()) + TRAILER.size

    def _fields(self) -> dict[str, Any]:
        """Every field by name, shallow (``dataclasses.asdict`` deep-copies: a third of a
        tiny push's own work once); JSON writes the tuples inside as lists all the same."""
        return {name: getattr(self, name) for name, _ in _FOOTER_FIELDS}

    def encode(self) -> bytes:
        return json.dumps(self._fields(), sort_keys=True).encode("utf-8")

    def _signed_bytes(self) -> bytes:
        # The footer holds the sha256 of every payload byte (and of the meta), so signing the
        # footer signs the payload: one HMAC over a few hundred bytes, not a second pass.
        fields = self._fields()
        del fields["signature"]
        for name in _LATER_FIELDS:  # absent from objects signed before they existed
            if fields[name] == _DEFAULTS[name]:
                del fields[name]
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


_LATER_FIELDS = (
    "key", "code", "libraries", "readonly", "stream_sha256", "buffer_sha256", "version",
    "restored_from",
)  # fmt: skip
"""Footer fields added after signing existed: a signature covers them only when they are
set, so that objects signed before they existed still verify."""
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Footer)}


def new_version_id(moment: datetime, push_id: str) -> str:
    """``20261130T123456.789Z-1a2b3c4d``: the write's time (UTC, to the millisecond), for
    people and for ordering, and the start of its random ``push_id``, for uniqueness."""
    return f"{moment:%Y%m%dT%H%M%S}.{moment.microsecond // 1000:03d}Z-{push_id[:8]}"


def _stamp(versioned: bool) -> dict[str, str]:
    """The footer fields that make one write unique: who, when, its random id and, when
    daman keeps the key's versions itself, its version id."""
    moment = datetime.now(timezone.utc)
    push_id = secrets.token_hex(8)
    return dict(
        pushed_by=_writer_identity(),
        pushed_at=moment.isoformat(timespec="milliseconds"),  # a new key's version id (history)
        push_id=push_id,
        version=new_version_id(moment, push_id) if versioned else "",
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
        self.part: Any = None
        """A second hash of the part being written (the pickle stream), or None."""
        self.pos = 0
        self.error: OSError | None = None
        """What writing the file raised, to tell it from what the object's pickling raised."""
        self.watching = True
        """While the pickle stream is written: look for code pickled by value."""
        self.saw_code = False
        self._last = b""

    def _watch(self, data: Any) -> None:
        # Code pickled by value is rebuilt by cloudpickle's own functions, so the stream names
        # the module; plain data (dicts, arrays, DataFrames) never does.
        if isinstance(data, (bytes, bytearray)):
            if CODE_MARK in self._last + data[: len(CODE_MARK)] or CODE_MARK in data:
                self.saw_code = True
            self._last = bytes(data[-(len(CODE_MARK) - 1) :])

    def write(self, data: Any) -> int:
        try:
            return self._write(data)
        except OSError as exc:
            self.error = exc
            raise

    def _write(self, data: Any) -> int:
        if self.watching and not self.saw_code:
            self._watch(data)
        view = memoryview(data)
        if view.nbytes >= _PARALLEL_HASH_BYTES:
            # hashlib and file writes release the GIL: a large buffer's hash runs on another
            # core while this one copies it to the file.
            hashers = [
                threading.Thread(target=hash_.update, args=(view,))
                for hash_ in (self.sha, self.part)
                if hash_ is not None
            ]
            for hasher in hashers:
                hasher.start()
            try:
                self._f.write(view)
            finally:
                for hasher in hashers:
                    hasher.join()
        else:
            self._f.write(view)
            self._hash(view)
        self.pos += view.nbytes
        return view.nbytes

    def _hash(self, view: memoryview) -> None:
        for start in range(0, view.nbytes, _HASH_CHUNK):  # both hashes on one chunk in cache
            chunk = view[start : start + _HASH_CHUNK]
            self.sha.update(chunk)
            if self.part is not None:
                self.part.update(chunk)

    def pad_to(self, align: int) -> None:
        gap = -self.pos % align
        if gap:
            self.write(_PAD[:gap])


class FileBytes:
    """A file's contents, pickled as ``bytes`` written out-of-band in chunks as they are
    read: pushing a file or a pipe holds none of it in memory (nor maps it: a file truncated
    by someone else meanwhile would kill the process with SIGBUS), and any Python reads it
    back as plain ``bytes``. A regular file that changes while it is read is refused."""

    def __init__(self, f: IO[bytes], name: str) -> None:
        self.f = f
        self.name = name
        self.placeholder = pickle.PickleBuffer(b"")
        """What the pickle stream refers to; :func:`write_object` puts the file there."""

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (self.placeholder,)

    def copy_to(self, write: Callable[[Any], object]) -> int:
        """Write the file's bytes through ``write``; how many."""
        fd = self.f.fileno()
        before = os.fstat(fd)
        done = 0
        while True:
            try:
                chunk = self.f.read(_FILE_CHUNK)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot read {self.name} ({exc.strerror or exc}); nothing was pushed."
                ) from None
            if not chunk:
                break
            write(chunk)  # a full disc here is the cache's, and passes as it is
            done += len(chunk)
        after = os.fstat(fd)
        regular = stat.S_ISREG(before.st_mode) and before.st_size > 0  # not /proc, FUSE, pipes
        changed = (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)
        if regular and (done != before.st_size or changed):
            raise InvalidArgumentError(
                f"{self.name} changed while it was being pushed ({before.st_size} bytes when "
                f"the push began, {after.st_size} at its end); nothing was pushed. Push it "
                "again once it is complete."
            )
        return done


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
    *,
    versioned: bool = False,
) -> Footer:
    """Write ``obj`` and pickled meta to the binary file ``f``; return the footer written
    (signed when a ``signing_key`` is given; with a new version id when ``versioned``)."""
    out = _HashingWriter(f)
    buffers: list[pickle.PickleBuffer] = []
    out.part = hashlib.sha256()
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
    stream_sha256 = out.part.hexdigest()
    out.watching = False
    out.part = None  # the buffers are hashed once, into the payload's sha256
    spans, readonly = [], []
    files = {id(obj.placeholder): obj} if isinstance(obj, FileBytes) else {}
    for index, buf in enumerate(buffers):
        out.pad_to(ALIGN)
        start = out.pos
        if id(buf) in files:
            spans.append((start, files[id(buf)].copy_to(out.write)))
        else:
            raw = buf.raw()
            spans.append((start, raw.nbytes))
            if raw.readonly:
                readonly.append(index)
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
        meta_sha256=hashlib.sha256(meta_bytes).hexdigest(),
        **_stamp(versioned),
        key=key,
        code=out.saw_code,
        libraries=library_versions(obj),
        readonly=tuple(readonly),
        stream_sha256=stream_sha256,
    )
    if signing_key is not None:
        footer = footer.signed(signing_key, key)
    encoded = footer.encode()
    f.write(encoded)
    f.write(TRAILER.pack(MAGIC, len(encoded)))
    return footer


def restamp(
    stored: StoredFile,
    out: IO[bytes],
    *,
    key: str,
    signing_key: bytes | None,
    versioned: bool,
    restored_from: str,
) -> Footer:
    """Write ``stored`` (a checked object file of ``key``) to ``out`` as a new write of it:
    the same payload, byte for byte (copied in the kernel where it can), under a footer
    that says who wrote it now, with a new random id (and version id), and which version
    it restores; signed again with ``signing_key`` (unsigned without one)."""
    footer = dataclasses.replace(
        stored.footer, **_stamp(versioned), key=key, signature="", restored_from=restored_from
    )
    if signing_key is not None:
        footer = footer.signed(signing_key, key)
    out.flush()
    done, size, fd = 0, footer.payload_size, out.fileno()
    while done < size:
        try:
            n = os.copy_file_range(stored.fd, fd, size - done, done, done)
        except (AttributeError, OSError):  # not on this platform or file system: read it
            n = os.pwrite(fd, stored.read_at(done, min(_FILE_CHUNK, size - done)), done)
        if n == 0:
            raise IntegrityError(f"{key!r} came short while it was copied; try again.")
        done += n
    out.seek(size)
    encoded = footer.encode()
    out.write(encoded)
    out.write(TRAILER.pack(MAGIC, len(encoded)))
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
        data = json.loads(str(raw, "utf-8"))  # daman writes UTF-8: no encoding to detect
        version = int(data["format"])
    except (ValueError, TypeError, KeyError) as exc:
        raise IntegrityError(f"corrupt daman object: unreadable footer ({exc}).") from None
    if version > FORMAT_VERSION:
        raise DeserializationError(
            f"this object uses daman format {version}; upgrade daman to read it."
        )
    try:
        footer = _footer_from(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise IntegrityError(f"corrupt daman object: unreadable footer ({exc}).") from None
    spans = [footer.stream, footer.meta, *footer.buffers]
    if footer.payload_size + footer_len + TRAILER.size != file_size or any(
        off < 0 or length < 0 or off + length > footer.payload_size for off, length in spans
    ):
        raise IntegrityError("corrupt daman object: the footer does not match the file size.")
    return footer


_TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(Footer) if f.type in (str, "str"))
_FOOTER_FIELDS = tuple(
    (f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    for f in dataclasses.fields(Footer)
)
"""Each footer field's name and whether every footer has it (computed once: it is asked on
every cache hit)."""


def _footer_from(data: Any) -> Footer:
    """A Footer from its decoded JSON, every field's type checked (a foreign or damaged
    footer is not hashed: it must fail here, not deep in a read). Fields a later daman adds
    within the same format are ignored; those an older one lacked take their defaults."""
    if type(data) is not dict:
        raise TypeError("not a JSON object")
    # Keyed by the fields' own (interned) names, not JSON's copies of them: every attribute
    # read of the footer then finds its name by identity.
    known = {name: data[name] for name, required in _FOOTER_FIELDS if required or name in data}
    known["stream"] = _span(known["stream"])
    known["meta"] = _span(known["meta"])
    known["buffers"] = tuple(map(_span, known["buffers"]))
    if "libraries" in known:
        known["libraries"] = tuple(map(_library, known["libraries"]))
    if "readonly" in known:
        known["readonly"] = tuple(map(int, known["readonly"]))
    if "buffer_sha256" in known:
        known["buffer_sha256"] = tuple(map(str, known["buffer_sha256"]))
    for name in _TEXT_FIELDS:
        if type(known.get(name, "")) is not str:
            raise TypeError(f"{name} is not a string")
    if known.get("code") not in (None, True, False):
        raise TypeError("code is not a boolean")
    if type(known["payload_size"]) is not int:
        raise TypeError("payload_size is not an integer")
    # Built as a frozen dataclass is unpickled: its __init__ sets each of 21 fields through
    # object.__setattr__ (a third of a parse). The types were checked above; a field an
    # older file lacks reads its default from the class.
    footer = object.__new__(Footer)
    footer.__dict__.update(known)
    return footer


def _span(value: Any) -> tuple[int, int]:
    """A footer's ``[offset, length]``, checked: a foreign or damaged footer (it is not
    hashed) must be an IntegrityError, not a TypeError deep in a read."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        offset, length = value
        if type(offset) is int and type(length) is int:
            return (offset, length)
    raise TypeError(f"{value!r} is not an [offset, length] pair")


def _library(value: Any) -> tuple[str, str]:
    name, version = value
    return (str(name), str(version))


def read_footer(
    read_at: ReadAt, file_size: int, tail: bytes = b"", *, guess: int = TAIL_GUESS
) -> Footer:
    """Read the footer through ``read_at``, reusing ``tail`` (the file's last bytes) if given,
    else reading the last ``guess`` bytes first (a remote store: one request usually holds
    the footer; a local file: the trailer, then exactly the footer)."""
    if len(tail) < min(file_size, TRAILER.size):
        tail = read_at(max(0, file_size - guess), min(file_size, guess))
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


class PrefixHasher:
    """The sha256 of a file while a download writes it, ranges in any order.

    ``written(offset, length, data)`` says a range is on disc (from any thread). A range
    that continues the hashed prefix and comes with its bytes is hashed at once, from
    memory, by the thread that wrote it (a single-stream download: no thread started, only
    the tail read back). Otherwise a thread, started then, hashes the contiguous prefix from the
    file as it grows. Both stop ``TAIL_GUESS`` bytes short of the end, where the footer
    usually starts. Once the file is whole, ``digest(footer)`` hashes what is left of the
    payload, so the check costs a few MiB after the download instead of a second pass over
    the whole file. ``start(size)`` begins (or, for a download that restarted, begins
    again, once a writer hashing from memory is done); ``close()`` stops the thread. A file
    of at most ``_INLINE_HASH_BYTES`` is left to ``digest``, which hashes all of it; after
    it, ranges told are ignored and ``digest`` answers the same again."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._reset(0)

    def _reset(self, size: int) -> None:
        self._sha = hashlib.sha256()
        self._limit = max(0, size - TAIL_GUESS) if size > _INLINE_HASH_BYTES else 0
        self._prefix = 0  # bytes [0, prefix) are on disc
        self._pending: dict[int, int] = {}  # start -> end of ranges past the prefix
        self._hashed = 0
        self._hashing = False  # someone (the thread, or a writer from memory) is at it
        self._stop = False
        self._failed = False
        self._digest: tuple[str | None] | None = None  # digest()'s answer, once given

    def start(self, size: int) -> None:
        self.close()
        with self._cond:
            while self._hashing:  # a writer still hashing from memory: its hash goes too
                self._cond.wait()
            self._reset(size)

    def written(self, offset: int, length: int, data: bytes | memoryview | None = None) -> None:
        end = offset + length
        with self._cond:
            if self._digest is not None:
                return  # too late to count: the file was taken as whole
            inline = (
                data is not None
                and len(data) == length
                and offset == self._hashed == self._prefix < self._limit
                and not self._hashing
            )
            if inline:
                self._hashing = True
            else:
                self._extend(offset, end)
                self._hand_over()
                return
        assert data is not None
        upto = min(end, self._limit)
        try:
            self._sha.update(memoryview(data)[: upto - offset])
        finally:
            with self._cond:
                self._hashed, self._hashing = upto, False
                self._extend(offset, end)  # may join ranges that arrived out of order
                self._hand_over()

    def _hand_over(self) -> None:
        """Wake the thread for what is on disc and not hashed, starting it the first time
        (the condition's lock held); none is started once stopped (a ``start`` or ``digest``
        waiting for this writer: the thread would end at once, and be taken for running)."""
        if (
            self._thread is None
            and not self._stop
            and min(self._prefix, self._limit) > self._hashed
        ):
            self._thread = threading.Thread(target=self._run, name="daman-hash", daemon=True)
            self._thread.start()
        self._cond.notify_all()  # the thread, and a start() or digest() waiting for a writer

    def _extend(self, offset: int, end: int) -> None:
        """Record ``[offset, end)`` as on disc (the condition's lock held)."""
        if offset > self._prefix:
            self._pending[offset] = max(end, self._pending.get(offset, end))
            return
        self._prefix = max(self._prefix, end)
        while self._prefix in self._pending:  # ranges that now adjoin the prefix
            self._prefix = max(self._prefix, self._pending.pop(self._prefix))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (
                    self._hashing or min(self._prefix, self._limit) <= self._hashed
                ):
                    self._cond.wait()
                if self._stop:
                    return
                pos, end = self._hashed, min(self._prefix, self._limit)
                self._hashing = True
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
                    self._hashed, self._hashing = pos, False
                    self._cond.notify_all()

    def close(self) -> None:
        """Stop: the thread ends, and none starts until ``start`` (a writer still at work
        would otherwise start one for a file being started over or already whole)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            if self._thread.ident is not None:  # started (a Ctrl-C may have come before)
                self._thread.join()
            self._thread = None

    def digest(self, footer: Footer) -> str | None:
        """The payload's sha256 once the file is whole (the same answer if asked again), or
        None if it cannot tell (a read failed, the file is shorter than the payload, or the
        footer starts before the hashed prefix ends)."""
        self.close()
        with self._cond:
            while self._hashing:
                self._cond.wait()
            if self._digest is None:
                self._digest = (self._rest(footer),)
            return self._digest[0]

    def _rest(self, footer: Footer) -> str | None:
        if self._failed or self._hashed > footer.payload_size:
            return None
        return sha256_range(
            self._fd, self._hashed, footer.payload_size - self._hashed, sha=self._sha
        )


def sha256_range(fd: int, offset: int, length: int, *, sha: Any = None) -> str | None:
    """The sha256 of ``length`` bytes of ``fd`` from ``offset`` (continuing ``sha``, a hash
    of the bytes before them, if given); None if the file is shorter."""
    sha = sha or hashlib.sha256()
    while length:
        chunk = os.pread(fd, min(_HASH_CHUNK, length), offset)
        if not chunk:
            return None
        sha.update(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return sha.hexdigest()


def check_file(fd: int, size: int) -> Footer:
    """The footer of the object file open at ``fd`` (``size`` bytes), after checking every
    payload byte against its sha256: ``verify()``'s check of one cached copy. A file of up
    to ``_INLINE_HASH_BYTES`` is read in one call (most cached entries are small: their
    reads, not their hashing, are what a check costs)."""
    if size > _INLINE_HASH_BYTES:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise IntegrityError(f"the file is {actual} bytes, not the {size} it was when cached.")
        stored = StoredFile(os.fdopen(os.dup(fd), "rb"), size=size)
        with stored.f:
            stored.verify()
            return stored.footer
    data = _read_whole(fd, size)
    footer = read_footer(lambda offset, length: data[offset : offset + length], size, data)
    if hashlib.sha256(memoryview(data)[: footer.payload_size]).hexdigest() != footer.sha256:
        raise _mismatch("the object")
    return footer


def check_whole_file(fd: int, size: int, sha256: str) -> None:
    """``verify()``'s check of a small cached copy whose every byte's sha256 (its footer's
    too) the cache recorded when it was added: one read and one hash, no footer to parse."""
    if hashlib.sha256(_read_whole(fd, size)).hexdigest() != sha256:
        raise _mismatch("the file")


def _read_whole(fd: int, size: int) -> bytes:
    """All ``size`` bytes of a small file, in one read of one byte more: a file that has
    grown (or shrunk) since it was cached shows here."""
    data = os.pread(fd, size + 1, 0)
    if len(data) != size:
        raise IntegrityError(
            f"the file is {'longer' if len(data) > size else 'shorter'} than the {size} bytes "
            "it was when cached."
        )
    return data


def _mismatch(what: str) -> IntegrityError:
    return IntegrityError(
        f"checksum mismatch in {what}: the object's bytes differ from what was written "
        "(corrupted in storage or in transit). Pull it again with force=True."
    )


def unpickle_meta(data: bytes, footer: Footer, *, allow_version_mismatch: bool = False) -> Any:
    """The meta from its bytes, after checking them against ``meta_sha256``."""
    if footer.meta_sha256 and hashlib.sha256(data).hexdigest() != footer.meta_sha256:
        raise _mismatch("the meta")
    check_code(footer, data, "the meta", allow_version_mismatch=allow_version_mismatch)
    return _unpickle(lambda: pickle.loads(data), footer, "the meta")


def load_meta(
    read_at: ReadAt,
    footer: Footer,
    tail: bytes = b"",
    file_size: int = 0,
    *,
    allow_version_mismatch: bool = False,
) -> Any:
    """Unpickle a remote object's meta, taking its bytes from ``tail`` when they are there."""
    offset, length = footer.meta
    tail_start = file_size - len(tail)
    if tail and offset >= tail_start:
        data = tail[offset - tail_start : offset - tail_start + length]
    else:
        data = read_at(offset, length)
    return unpickle_meta(data, footer, allow_version_mismatch=allow_version_mismatch)


class KnownFooters:
    """The footers of files that never change (cached copies), by what identifies such a
    file (its name, inode, size and time): a cache hit's footer is parsed once per process.
    Bounded: the oldest are forgotten first."""

    def __init__(self, limit: int = 4096) -> None:
        self._known: dict[tuple[object, ...], Footer] = {}
        self._limit = limit

    def get(self, seen: tuple[object, ...]) -> Footer | None:
        return self._known.get(seen)

    def remember(self, seen: tuple[object, ...], footer: Footer) -> None:
        if len(self._known) >= self._limit:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # other threads
                del self._known[next(iter(self._known))]
        self._known[seen] = footer


class StoredFile:
    """An object file, opened once: its footer is read once (the trailer, then exactly the
    footer: two small reads), then the file is checked and loaded as the caller asks. The
    one place that knows what each check covers:

    - :meth:`check_meta`: the meta's hash (cheap: every cache hit);
    - :meth:`check_executable`: what can run code when unpickled, the pickle stream and the
      meta (format 2: their hashes; format 1 has no stream hash: the whole payload);
    - :meth:`verify`: every payload byte (downloads, ``verify()``, signed hits of format 1).
    """

    def __init__(
        self, f: IO[bytes], footer: Footer | None = None, *, size: int | None = None
    ) -> None:
        """``size``: the file's, if the caller has just asked (a cache hit): not asked again."""
        self.f = f
        self.fd = f.fileno()
        self.size = os.fstat(self.fd).st_size if size is None else size
        self.footer = footer or read_footer(self.read_at, self.size, guess=TRAILER.size)

    def read_at(self, offset: int, length: int) -> bytes:
        return _read_bytes(self.fd, length, offset)

    def check_meta(self) -> None:
        """The meta's bytes against ``meta_sha256`` (objects from before it existed pass)."""
        offset, length = self.footer.meta
        expected = self.footer.meta_sha256
        if expected and hashlib.sha256(self.read_at(offset, length)).hexdigest() != expected:
            raise _mismatch("the meta")

    def verify(self, hasher: PrefixHasher | None = None) -> None:
        """Every payload byte against the footer's sha256; a ``hasher`` that followed the
        file's download saves most of the reading and hashing."""
        digest = hasher.digest(self.footer) if hasher is not None else None
        if digest is None:
            digest = sha256_range(self.fd, 0, self.footer.payload_size)
        if digest != self.footer.sha256:
            raise _mismatch("the object")

    def check_executable(self) -> None:
        """What unpickling can run (the stream and the meta) is what was written; the
        buffers, data only, are not read (format 2)."""
        if not self.footer.stream_sha256:
            self.verify()
            return
        offset, length = self.footer.stream
        if sha256_range(self.fd, offset, length) != self.footer.stream_sha256:
            raise _mismatch("the pickle stream")
        self.check_meta()

    def meta(self, *, allow_version_mismatch: bool = False) -> Any:
        offset, length = self.footer.meta
        return unpickle_meta(
            self.read_at(offset, length), self.footer, allow_version_mismatch=allow_version_mismatch
        )

    def _stream(self, allow_version_mismatch: bool) -> bytearray:
        offset, length = self.footer.stream
        stream = bytearray(length)
        _read_into(self.fd, stream, offset)
        check_code(self.footer, stream, "the object", allow_version_mismatch=allow_version_mismatch)
        return stream

    def load(self, *, allow_version_mismatch: bool = False) -> Any:
        """The object, each out-of-band buffer read into its own memory (one copy from disc
        into the object, none more): ``bytes`` for a read-only buffer, writable memory
        otherwise; the types ``pickle.loads`` of the object would give."""
        footer = self.footer
        stream = self._stream(allow_version_mismatch)
        buffers: list[Any] = []
        mapped: set[int] = set()
        for index, (offset, length) in enumerate(footer.buffers):
            if index in footer.readonly and length < _MAX_READ:
                buffers.append(_read_bytes(self.fd, length, offset))  # as pickle would
                continue
            buf = _uninitialised(length)
            _read_into(self.fd, buf, offset)
            buffers.append(buf)
            if isinstance(buf, mmap.mmap):
                mapped.add(id(buf))
        obj = _unpickle(lambda: pickle.loads(stream, buffers=buffers), footer, "the object")
        return _as_pickle_types(obj, mapped) if mapped else obj

    def load_mapped(self, *, allow_version_mismatch: bool = False) -> Any:
        """The object with its out-of-band buffers (numpy arrays) mapped read-only from the
        file: nothing is copied or read until touched. The mapping lives as long as the
        arrays; it keeps this file's descriptor (a duplicate), so a lock taken on it before
        (the cache's lease) lasts exactly as long."""
        stream = self._stream(allow_version_mismatch)
        if not self.footer.buffers:
            return _unpickle(lambda: pickle.loads(stream), self.footer, "the object")
        whole = memoryview(mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ))
        buffers = [whole[offset : offset + length] for offset, length in self.footer.buffers]
        del whole
        return _unpickle(lambda: pickle.loads(stream, buffers=buffers), self.footer, "the object")


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


_MAX_READ = 2**31 - 4096  # what one read(2) returns at most on Linux
_FIXUP_NODES = 100_000


def _read_bytes(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise IntegrityError("the file is shorter than its footer says: it was truncated.")
    return data


def _as_pickle_types(obj: Any, mapped: set[int]) -> Any:
    """Large buffers are read into anonymous mappings, which numpy and friends take as they
    take a ``bytearray``; a bare ``PickleBuffer`` would come back as the mapping itself. Find
    those among built-in containers (not inside other objects; at most _FIXUP_NODES looked
    at) and give ``pickle.loads``'s types: ``bytearray``, or ``bytes`` when read-only."""
    seen: set[int] = set()
    budget = [_FIXUP_NODES]

    def fix(value: Any) -> Any:
        if id(value) in mapped:
            return bytearray(value)
        if type(value) is memoryview and id(value.obj) in mapped:
            return bytes(value)
        if type(value) not in (list, dict, tuple, set) or id(value) in seen or budget[0] <= 0:
            return value
        seen.add(id(value))
        budget[0] -= len(value)
        if type(value) is list:
            value[:] = [fix(item) for item in value]
        elif type(value) is dict:
            for key, item in value.items():
                value[key] = fix(item)
        elif type(value) is tuple:
            fixed = tuple(fix(item) for item in value)
            if any(a is not b for a, b in zip(fixed, value, strict=True)):
                return fixed
        return value

    return fix(obj)


def _unpickle(load: Callable[[], Any], footer: Footer, what: str) -> Any:
    try:
        return load()
    except Exception as exc:
        raise DeserializationError(describe_failure(exc, footer, what)) from exc


def dump_to_bytes(
    obj: Any, meta: Any = None, signing_key: bytes | None = None, key: str = ""
) -> bytes:
    """Whole object file in memory (small objects and tests)."""
    buf = io.BytesIO()
    write_object(obj, dumps_meta(meta), buf, signing_key, key)
    return buf.getvalue()
