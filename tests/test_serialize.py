from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import mmap
import os
import pickle
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from daman import serialize as ser
from daman import versions
from daman.errors import (
    DeserializationError,
    IntegrityError,
    SerializationError,
    UntrustedObjectError,
    VersionMismatchWarning,
)


def write(path: Path, obj: object, meta: object = None) -> ser.Footer:
    with open(path, "wb") as f:
        return ser.write_object(obj, ser.dumps_meta(meta), f)


def read(path: Path) -> tuple[object, object]:
    with open(path, "rb") as f:
        stored = ser.StoredFile(f)
        stored.verify()
        return stored.load(), stored.meta()


def test_round_trip_of_mixed_objects(tmp_path: Path) -> None:
    obj = {
        "ints": np.arange(1000, dtype=np.int64),
        "floats": np.random.default_rng(0).random((30, 7)),
        "fortran": np.asfortranarray(np.ones((5, 3))),
        "bytes": b"\x00" * 100,
        "fn": lambda x: x + 1,
        "text": "héllo",
    }
    footer = write(tmp_path / "o", obj, meta={"source": "test", "n": 3})
    back, meta = read(tmp_path / "o")
    assert meta == {"source": "test", "n": 3}
    assert back["fn"](1) == 2
    for name in ("ints", "floats", "fortran"):
        np.testing.assert_array_equal(back[name], obj[name])
        assert back[name].flags.writeable
    assert back["bytes"] == obj["bytes"] and back["text"] == "héllo"
    assert footer.file_size == (tmp_path / "o").stat().st_size
    assert footer.python == ".".join(map(str, sys.version_info[:3]))
    assert "@" in footer.pushed_by


def test_buffers_are_out_of_band_and_aligned(tmp_path: Path) -> None:
    arrays = [np.arange(n, dtype=np.float64) for n in (1, 7, 100, 4096)]
    footer = write(tmp_path / "o", arrays)
    assert len(footer.buffers) == len(arrays)
    for (offset, length), array in zip(footer.buffers, arrays, strict=True):
        assert offset % ser.ALIGN == 0
        assert length == array.nbytes
    # The stream holds no array data: it is small even though the arrays are not.
    assert footer.stream[1] < 1000


def test_zero_copy_read_through_mmap(tmp_path: Path) -> None:
    """The layout lets a reader hand mmap slices to pickle: arrays then live in the file."""
    array = np.arange(10_000, dtype=np.float32)
    footer = write(tmp_path / "o", array)
    with open(tmp_path / "o", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        stream = view[footer.stream[0] : footer.stream[0] + footer.stream[1]]
        buffers = [view[o : o + n] for o, n in footer.buffers]
        back = pickle.loads(stream, buffers=buffers)
        np.testing.assert_array_equal(back, array)
        assert not back.flags.writeable and not back.flags.owndata
        del back, stream, buffers, view
        mapped.close()


def test_meta_is_readable_from_the_tail_alone(tmp_path: Path) -> None:
    write(tmp_path / "o", np.zeros(100_000), meta={"k": "v"})
    data = (tmp_path / "o").read_bytes()
    tail = data[-ser.TAIL_GUESS :]
    reads: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return data[offset : offset + length]

    footer = ser.read_footer(read_at, len(data), tail)
    assert ser.load_meta(read_at, footer, tail, len(data)) == {"k": "v"}
    assert reads == []  # everything came from the one tail read


def test_large_meta_needs_a_second_read(tmp_path: Path) -> None:
    big_meta = {"blob": "x" * (ser.TAIL_GUESS * 2)}
    write(tmp_path / "o", [1, 2, 3], meta=big_meta)
    data = (tmp_path / "o").read_bytes()
    footer = ser.read_footer(lambda o, n: data[o : o + n], len(data))
    tail = data[-ser.TAIL_GUESS :]
    assert ser.load_meta(lambda o, n: data[o : o + n], footer, tail, len(data)) == big_meta


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("no pickling for me")


def test_unpicklable_object_raises_serialization_error(tmp_path: Path) -> None:
    # Fails part-way: the big array before it has already been streamed to the file.
    with pytest.raises(SerializationError, match="cannot be pickled"):
        write(tmp_path / "o", [np.zeros(100_000), Unpicklable()])


def test_unpicklable_meta_raises_before_anything_is_written() -> None:
    import threading

    with pytest.raises(SerializationError, match="meta cannot be pickled"):
        ser.dumps_meta({"lock": threading.Lock()})


def corrupt(path: Path, offset: int, value: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


def test_bit_flip_in_payload_is_detected(tmp_path: Path) -> None:
    footer = write(tmp_path / "o", np.arange(1000))
    offset = footer.buffers[0][0] + 10
    data = (tmp_path / "o").read_bytes()
    corrupt(tmp_path / "o", offset, bytes([data[offset] ^ 0x01]))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        read(tmp_path / "o")


@pytest.mark.parametrize("keep", [0, 5, 100, -1, -17])
def test_truncated_files_are_detected(tmp_path: Path, keep: int) -> None:
    write(tmp_path / "o", np.arange(1000))
    data = (tmp_path / "o").read_bytes()
    (tmp_path / "o").write_bytes(data[:keep])
    with pytest.raises(IntegrityError):
        read(tmp_path / "o")


def test_garbage_footer_is_detected(tmp_path: Path) -> None:
    footer = write(tmp_path / "o", [1])
    encoded = footer.encode()
    corrupt(tmp_path / "o", footer.payload_size, b"{" + b" " * (len(encoded) - 1))
    with pytest.raises(IntegrityError, match="footer"):
        read(tmp_path / "o")


def test_not_a_daman_file(tmp_path: Path) -> None:
    (tmp_path / "o").write_bytes(pickle.dumps([1, 2, 3]) * 10)
    with pytest.raises(IntegrityError, match="not a daman object"):
        read(tmp_path / "o")


def test_newer_format_asks_for_an_upgrade() -> None:
    footer = ser.Footer(**{**dataclasses.asdict(_footer()), "format": ser.FORMAT_VERSION + 1})
    tail = _tail(footer)
    with pytest.raises(DeserializationError, match="upgrade daman"):
        ser.parse_footer(tail, len(tail))


def _footer() -> ser.Footer:
    return ser.Footer(
        format=1, python="3.11.7", cloudpickle="3.1.3", stream=(0, 0), buffers=(), meta=(0, 0),
        payload_size=0, sha256="", pushed_by="u@h", pushed_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip


def _tail(footer: ser.Footer) -> bytes:
    encoded = footer.encode()
    return encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))


OTHER_PYTHON = "3.99.0" if sys.version_info[:2] != (3, 99) else "3.98.0"


@pytest.mark.parametrize(
    ("python", "cloudpickle_version", "code", "data", "outcome"),
    [
        # same versions: anything loads, silently
        (None, None, True, b"", "ok"),
        # another Python minor version: data loads silently, code is refused
        (OTHER_PYTHON, None, False, b"", "ok"),
        ("2.7.18", None, False, b"", "ok"),
        (OTHER_PYTHON, None, True, b"", "refused"),
        # objects written before the flag existed: the stream itself is looked at
        (OTHER_PYTHON, None, None, b"\x8c\x17cloudpickle.cloudpickle", "refused"),
        (OTHER_PYTHON, None, None, b"\x8c\x05numpy", "ok"),
        # another patch release of the same minor version is the same bytecode
        (".".join(map(str, sys.version_info[:2])) + ".99", None, True, b"", "ok"),
        # only cloudpickle differs: code may still load, with a warning
        (None, "0.1.0", True, b"", "warns"),
        (None, "0.1.0", False, b"", "ok"),
    ],
)
def test_code_from_another_python_is_refused_data_is_not(
    python: str | None, cloudpickle_version: str | None, code, data: bytes, outcome: str
) -> None:
    import cloudpickle

    footer = dataclasses.replace(
        _footer(),
        python=python or ".".join(map(str, sys.version_info[:3])),
        cloudpickle=cloudpickle_version or cloudpickle.__version__,
        code=code,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome == "refused":
            with pytest.raises(DeserializationError, match="allow_version_mismatch=True"):
                versions.check_code(footer, data, "the object", allow_version_mismatch=False)
            versions.check_code(footer, data, "the object", allow_version_mismatch=True)  # allowed
            outcome = "warns"  # ...with a warning
        else:
            versions.check_code(footer, data, "the object", allow_version_mismatch=False)
    warned = [w for w in caught if issubclass(w.category, VersionMismatchWarning)]
    assert bool(warned) == (outcome == "warns")


def test_missing_module_gives_deserialization_error(tmp_path: Path, monkeypatch) -> None:
    module = tmp_path / "vanishing_module_xyz.py"
    module.write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_module_xyz  # type: ignore[import-not-found]

    buf = io.BytesIO()
    ser.write_object(vanishing_module_xyz.Thing(), ser.dumps_meta(None), buf)
    monkeypatch.delitem(sys.modules, "vanishing_module_xyz")
    module.unlink()
    (tmp_path / "o").write_bytes(buf.getvalue())
    with pytest.raises(DeserializationError, match="could not be unpickled"):
        read(tmp_path / "o")


def test_unknown_footer_fields_are_ignored(tmp_path: Path) -> None:
    """A later daman may add fields (e.g. a signature) without breaking older readers."""
    footer = dataclasses.asdict(write(tmp_path / "o", [1, 2]))
    data = (tmp_path / "o").read_bytes()
    encoded = ser.json.dumps({**footer, "hmac_sha256": "ab" * 32}).encode()
    payload = data[: footer["payload_size"]]
    (tmp_path / "o").write_bytes(payload + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded)))
    assert read(tmp_path / "o") == ([1, 2], None)


@pytest.mark.slow
def test_buffers_larger_than_one_read_call(tmp_path: Path) -> None:
    """Linux returns at most ~2 GiB per read(2): a bigger buffer needs several."""
    big = np.ones(2**31 + 4096, dtype=np.uint8)
    big[-1] = 7
    write(tmp_path / "o", big)
    del big
    back, _ = read(tmp_path / "o")
    assert back.size == 2**31 + 4096 and back[-1] == 7 and back[0] == 1


def test_picklebuffers_are_out_of_band_bytes_stay_in_the_stream(tmp_path: Path) -> None:
    """pickle's C implementation saves bytes and bytearray before any hook can see them, so
    only objects that reduce to a PickleBuffer (numpy arrays, PickleBuffer itself) go out of
    band. This pins that documented behaviour."""
    blob = os.urandom(200_000)
    footer = write(tmp_path / "o", {"raw": blob, "wrapped": pickle.PickleBuffer(bytearray(blob))})
    assert [length for _, length in footer.buffers] == [200_000]
    assert footer.stream[1] > 200_000  # the bytes object itself is in the stream
    back, _ = read(tmp_path / "o")
    assert back["raw"] == blob and bytes(back["wrapped"]) == blob


def test_a_footer_written_before_signing_existed_still_reads() -> None:
    data = ser.dump_to_bytes({"x": 1}, meta="m")
    footer = ser.parse_footer(data, len(data))
    old = json.loads(footer.encode())
    del old["meta_sha256"], old["signature"]
    encoded = json.dumps(old).encode()
    rebuilt = data[: footer.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))
    parsed = ser.parse_footer(rebuilt, len(rebuilt))
    assert parsed.signature == "" and parsed.meta_sha256 == "" and parsed.sha256 == footer.sha256
    del old["sha256"]  # a field with no default is still required
    encoded = json.dumps(old).encode()
    broken = data[: footer.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))
    with pytest.raises(IntegrityError, match="unreadable footer"):
        ser.parse_footer(broken, len(broken))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("payload_size", "12"),
        ("payload_size", True),
        ("stream", [0, 1, 2]),
        ("stream", 5),
        ("meta", ["a", "b"]),
        ("buffers", [[0, 1.5]]),
        ("sha256", 7),
        ("signature", ["x"]),
        ("key", 3),
        ("code", "yes"),
        ("libraries", [["numpy"]]),
        ("libraries", 5),
        ("readonly", ["first"]),
        ("buffer_sha256", 5),
    ],
)
def test_a_footer_with_values_of_the_wrong_type_is_an_integrity_error(
    field: str, value: object
) -> None:
    """The footer is not hashed: a foreign or damaged one must be refused as corrupt, not
    escape as a TypeError from the arithmetic that follows (pull, info and ls read it)."""
    data = ser.dump_to_bytes({"x": 1}, meta="m")
    footer = ser.parse_footer(data, len(data))
    encoded = json.dumps({**json.loads(footer.encode()), field: value}).encode()
    broken = data[: footer.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))
    with pytest.raises(IntegrityError, match="unreadable footer"):
        ser.parse_footer(broken, len(broken))


class _CountingSha256:
    """hashlib.sha256 that adds the bytes it is fed to a shared count."""

    def __init__(self, counted: list[int], data: bytes = b"") -> None:
        self._sha, self._counted = hashlib.sha256(), counted
        self.update(data)

    def update(self, data: object) -> None:
        self._counted[0] += memoryview(data).nbytes  # type: ignore[arg-type]
        self._sha.update(data)  # type: ignore[arg-type]

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def test_a_push_hashes_each_byte_of_an_array_once(monkeypatch, tmp_path: Path) -> None:
    """The payload's sha256 covers every buffer: a second hash per buffer cost every push
    of an array a full pass more, for a field nothing read."""
    counted = [0]
    fake = type(sys)("hashlib")
    fake.sha256 = lambda data=b"": _CountingSha256(counted, data)  # type: ignore[attr-defined]
    monkeypatch.setattr(ser, "hashlib", fake)
    array = np.arange(1_000_000, dtype=np.float64)  # 8 MB: hashed beside the file write
    footer = write(tmp_path / "obj", {"a": array, "b": np.arange(10)}, meta="m")
    stream, meta = footer.stream[1], footer.meta[1]
    assert counted[0] == footer.payload_size + stream + meta  # stream and meta: their own too
    assert footer.buffer_sha256 == ()
    monkeypatch.undo()
    obj, _ = read(tmp_path / "obj")  # verified
    np.testing.assert_array_equal(obj["a"], array)  # type: ignore[index]


def test_a_signed_object_with_buffer_hashes_from_an_older_daman_still_verifies() -> None:
    """Objects pushed before 2026-12-01 carry each buffer's sha256, and their signature
    covers it: a reader keeps the field as read, or their signature would fail."""
    key, signing_key = "team/frame", b"k" * 32
    buf = io.BytesIO()
    ser.write_object({"a": np.arange(100_000)}, ser.dumps_meta("m"), buf, None, key)
    data = buf.getvalue()
    plain = ser.parse_footer(data, len(data))
    ((offset, length),) = plain.buffers
    older = dataclasses.replace(
        plain, buffer_sha256=(hashlib.sha256(data[offset : offset + length]).hexdigest(),)
    ).signed(signing_key, key)
    encoded = older.encode()
    old_file = data[: plain.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))
    parsed = ser.parse_footer(old_file, len(old_file))
    assert parsed.buffer_sha256 == older.buffer_sha256
    parsed.check_signature(signing_key, key)
    with pytest.raises(UntrustedObjectError):  # the field is signed: dropping it is noticed
        dataclasses.replace(parsed, buffer_sha256=()).check_signature(signing_key, key)


def test_a_footer_that_is_not_a_json_object_is_an_integrity_error() -> None:
    data = ser.dump_to_bytes({"x": 1})
    footer = ser.parse_footer(data, len(data))
    encoded = json.dumps([ser.FORMAT_VERSION]).encode()
    broken = data[: footer.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))
    with pytest.raises(IntegrityError, match="unreadable footer"):
        ser.parse_footer(broken, len(broken))


def test_a_parsed_footer_is_the_footer_written() -> None:
    """Parsing builds the footer without its __init__: it must still be the same value
    (equal, same hash, the same encoding), with later fields ignored and older ones absent
    read as their defaults."""
    readonly = np.arange(50_000)
    readonly.flags.writeable = False
    buf = io.BytesIO()
    written = ser.write_object(  # every kind of field filled: buffers, readonly, libraries
        {"a": np.arange(50_000), "r": readonly}, ser.dumps_meta("m"), buf, None, "k"
    )
    written = dataclasses.replace(written, buffer_sha256=("a" * 64, "b" * 64))  # as before
    assert written.readonly and written.libraries
    payload = buf.getvalue()[: written.payload_size]
    data = payload + written.encode() + ser.TRAILER.pack(ser.MAGIC, len(written.encode()))
    parsed = ser.parse_footer(data, len(data))
    assert parsed == written and hash(parsed) == hash(written)
    assert parsed == ser.Footer(**parsed._fields())  # as __init__ builds it
    assert parsed.encode() == written.encode() and parsed.file_size == len(data)
    assert dataclasses.replace(parsed, key="k").key == "k"
    fields = {**json.loads(parsed.encode()), "added_by_a_later_daman": 1}
    del fields["restored_from"], fields["libraries"]
    encoded = json.dumps(fields).encode()
    older = data[: parsed.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))
    footer = ser.parse_footer(older, len(older))
    assert (footer.restored_from, footer.libraries) == ("", ())
    assert footer == dataclasses.replace(parsed, libraries=())


def test_every_footer_default_is_on_the_class() -> None:
    """A parsed footer reads the fields an older file lacks from the class: a field given a
    default_factory would have none there."""
    for field in dataclasses.fields(ser.Footer):
        assert field.default_factory is dataclasses.MISSING, field.name
        if field.default is not dataclasses.MISSING:
            assert getattr(ser.Footer, field.name) == field.default, field.name


def test_the_prefix_hasher_checks_a_file_written_in_any_order(tmp_path: Path) -> None:
    """The download hashes ranges as they land (in any order, restarting if the download
    starts over); the result is the same check as a full pass, and a flipped byte fails."""
    import random

    rng = random.Random(7)
    for trial in range(12):
        data = ser.dump_to_bytes(np.arange(rng.randrange(1, 400_000)), meta=trial)
        path = tmp_path / f"o{trial}"
        ranges = []
        pos = 0
        while pos < len(data):
            n = rng.randrange(1, 300_000)
            ranges.append((pos, min(n, len(data) - pos)))
            pos += n
        rng.shuffle(ranges)
        flip = trial % 3 == 2
        with open(path, "w+b") as out:
            out.truncate(len(data))
            hasher = ser.PrefixHasher(out.fileno())
            hasher.start(len(data))
            if trial % 4 == 1:  # a restart midway: what was hashed so far is forgotten
                for offset, length in ranges[: len(ranges) // 2]:
                    os.pwrite(out.fileno(), bytes(length), offset)
                    hasher.written(offset, length)
                hasher.start(len(data))
            for offset, length in ranges:
                chunk = bytearray(data[offset : offset + length])
                if flip and offset == 0:
                    chunk[10] ^= 0x01
                os.pwrite(out.fileno(), chunk, offset)
                # Some writers still hold the bytes (hashed from memory when they continue
                # the prefix), others say only where they wrote (hashed from the file).
                hasher.written(offset, length, chunk if rng.random() < 0.5 else None)
            try:
                if flip:
                    with pytest.raises(IntegrityError, match="checksum mismatch"):
                        ser.StoredFile(out).verify(hasher)
                else:
                    stored = ser.StoredFile(out)
                    stored.verify(hasher)
                    footer = stored.footer
                    assert footer.sha256 == ser.parse_footer(data, len(data)).sha256
            finally:
                hasher.close()


@contextlib.contextmanager
def _hashed_object(
    tmp_path: Path, nbytes: int
) -> Iterator[tuple[bytes, ser.Footer, IO[bytes], ser.PrefixHasher]]:
    """An object file of ``nbytes`` random bytes on disc, its footer, the file open, and a
    hasher started on it (closed afterwards)."""
    data = ser.dump_to_bytes(np.frombuffer(os.urandom(nbytes), np.uint8))
    path = tmp_path / "o"
    path.write_bytes(data)
    with open(path, "rb") as f:
        hasher = ser.PrefixHasher(f.fileno())
        hasher.start(len(data))
        try:
            yield data, ser.parse_footer(data, len(data)), f, hasher
        finally:
            hasher.close()


@pytest.mark.parametrize("with_bytes", [True, False])
@pytest.mark.parametrize("nbytes", [1_000, 3 * 1024 * 1024])
def test_the_prefix_hasher_hashes_what_it_can_without_a_thread(
    tmp_path: Path, nbytes: int, with_bytes: bool
) -> None:
    """A small download is left to ``digest`` (one hash of the file: nothing to overlap). A
    larger one that arrives in order with its bytes (one stream) is hashed from memory as
    it arrives: no thread, no byte read back. Ranges told without their bytes start a
    thread that hashes them from the file."""
    with _hashed_object(tmp_path, nbytes) as (data, footer, f, hasher):
        for offset in range(0, len(data), 1024 * 1024):
            chunk = data[offset : offset + 1024 * 1024]
            hasher.written(offset, len(chunk), chunk if with_bytes else None)
        large = len(data) > ser._INLINE_HASH_BYTES
        assert (hasher._thread is not None) == (large and not with_bytes)
        if large and with_bytes:  # all but the tail, where the footer starts
            assert hasher._hashed == len(data) - ser.TAIL_GUESS
        assert hasher.digest(footer) == hashlib.sha256(data[: footer.payload_size]).hexdigest()
        assert ser.StoredFile(f).footer == footer


def test_a_range_hashed_from_memory_hands_what_it_joins_to_the_thread(tmp_path: Path) -> None:
    """Later parts arrive first (told without their bytes); the first range's bytes then
    join them to the prefix: the thread hashes them while the download goes on, rather than
    ``digest`` afterwards."""
    import time

    cut = 1024 * 1024
    with _hashed_object(tmp_path, 4 * 1024 * 1024) as (data, footer, _, hasher):
        hasher.written(cut, len(data) - cut)  # the rest, on disc before the start
        assert hasher._thread is None  # nothing contiguous to hash yet
        hasher.written(0, cut, data[:cut])  # hashed from memory, then the rest joins
        assert hasher._thread is not None
        deadline = time.monotonic() + 30
        while hasher._hashed < len(data) - ser.TAIL_GUESS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hasher._hashed == len(data) - ser.TAIL_GUESS
        assert hasher.digest(footer) == hashlib.sha256(data[: footer.payload_size]).hexdigest()


def test_the_prefix_hasher_follows_parts_written_by_many_threads(tmp_path: Path) -> None:
    """A parallel download: the first range streams in order with its bytes while other
    threads write later parts; what is hashed from memory and from the file never overlaps
    or leaves a gap."""
    import random
    import threading

    data = ser.dump_to_bytes(np.frombuffer(os.urandom(6 * 1024 * 1024), np.uint8))
    footer = ser.parse_footer(data, len(data))
    expected = hashlib.sha256(data[: footer.payload_size]).hexdigest()
    chunk = 64 * 1024
    for trial in range(8):
        rng = random.Random(trial)
        with open(tmp_path / f"o{trial}", "w+b") as out:
            out.truncate(len(data))
            hasher = ser.PrefixHasher(out.fileno())
            hasher.start(len(data))

            def write(
                start: int, end: int, *, with_bytes: bool, fd: int, hasher: ser.PrefixHasher
            ) -> None:
                for offset in range(start, end, chunk):
                    piece = data[offset : min(end, offset + chunk)]
                    os.pwrite(fd, piece, offset)
                    hasher.written(offset, len(piece), piece if with_bytes else None)

            cuts = sorted(rng.sample(range(chunk, len(data), chunk), 3))
            spans = list(zip([0, *cuts], [*cuts, len(data)], strict=True))
            threads = [
                threading.Thread(
                    target=write,
                    args=span,
                    kwargs={"with_bytes": i == 0, "fd": out.fileno(), "hasher": hasher},
                )
                for i, span in enumerate(spans)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            try:
                assert hasher.digest(footer) == expected
            finally:
                hasher.close()


class _HeldSha:
    """A sha256 whose next ``update`` waits until ``release`` is set: a writer caught
    hashing from memory."""

    def __init__(self, sha: Any) -> None:
        self.sha = sha
        self.entered = threading.Event()
        self.release = threading.Event()

    def update(self, data: Any) -> None:
        self.entered.set()
        assert self.release.wait(30)
        self.sha.update(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def test_a_restart_waits_for_a_writer_still_hashing_from_memory(tmp_path: Path) -> None:
    """A download that starts over while a writer of its first attempt is hashing from
    memory: the restart waits for it, so that the new attempt's hash is not the old one's
    and its position is not the old writer's, and the new attempt is hashed as it arrives."""
    import time

    with _hashed_object(tmp_path, 3 * 1024 * 1024) as (data, footer, _, hasher):
        held = hasher._sha = _HeldSha(hasher._sha)
        cut = 1024 * 1024
        hasher.written(cut, len(data) - cut)  # later parts: the writer's range joins them
        writer = threading.Thread(target=hasher.written, args=(0, cut, data[:cut]))
        writer.start()
        assert held.entered.wait(30)
        hasher.written(0, cut // 2)  # said again without bytes: a thread waits to hash it
        assert hasher._thread is not None
        restart = threading.Thread(target=hasher.start, args=(len(data),))
        restart.start()
        try:
            restart.join(0.3)
            assert restart.is_alive()  # waits for the writer
        finally:
            held.release.set()
            writer.join(30)
        restart.join(30)
        assert not restart.is_alive()
        assert hasher._hashed == 0 and hasher._sha is not held
        for offset in range(0, len(data), cut):  # told without bytes: a thread hashes them
            hasher.written(offset, min(cut, len(data) - offset))
        deadline = time.monotonic() + 30  # (not a thread the stopped writer started, ended)
        while hasher._hashed < len(data) - ser.TAIL_GUESS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hasher._hashed == len(data) - ser.TAIL_GUESS
        assert hasher.digest(footer) == hashlib.sha256(data[: footer.payload_size]).hexdigest()


def test_a_stopped_prefix_hasher_starts_no_thread(tmp_path: Path) -> None:
    """A writer that finishes after the hasher was stopped (by a ``start`` or a ``digest``
    waiting for it) starts no thread: one would end at once and, still named, keep the next
    attempt from getting its own."""
    cut = 1024 * 1024
    with _hashed_object(tmp_path, 3 * 1024 * 1024) as (data, footer, _, hasher):
        hasher.written(0, cut)  # without its bytes: a thread hashes it
        assert hasher._thread is not None
        hasher.close()
        hasher.written(cut, cut)
        assert hasher._thread is None
        hasher.start(len(data))
        hasher.close()  # stopped before any thread ran
        hasher.written(0, cut)
        assert hasher._thread is None
        hasher.start(len(data))
        for offset in range(0, len(data), cut):
            hasher.written(offset, min(cut, len(data) - offset))
        assert hasher._thread is not None and hasher._thread.is_alive()
        assert hasher.digest(footer) == hashlib.sha256(data[: footer.payload_size]).hexdigest()


def test_the_prefix_hasher_answers_the_same_after_its_digest(tmp_path: Path) -> None:
    """``digest`` asked twice gives the same answer (not the hash of the tail hashed again),
    and a range told after it is ignored: no thread is started for a finished file."""
    with _hashed_object(tmp_path, 3 * 1024 * 1024) as (data, footer, _, hasher):
        expected = hashlib.sha256(data[: footer.payload_size]).hexdigest()
        hasher.written(0, 1024 * 1024, data[: 1024 * 1024])
        assert hasher.digest(footer) == expected
        hasher.written(1024 * 1024, len(data) - 1024 * 1024)
        assert hasher._thread is None
        assert hasher.digest(footer) == expected
