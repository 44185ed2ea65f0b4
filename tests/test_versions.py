"""What a pull does with objects from elsewhere: another Python or library version, another
key's object in the answer. Both backends, real stores; footers are rewritten the way another
interpreter or another key would have written them (tests/test_python_versions.py pushes from
a real second Python)."""

from __future__ import annotations

import dataclasses
import hmac
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from daman import (
    DeserializationError,
    IntegrityError,
    Manager,
    UntrustedObjectError,
    VersionMismatchWarning,
)
from daman import serialize as ser

OTHER_PYTHON = "3.99.1" if sys.version_info[:2] != (3, 99) else "3.98.1"


def rewritten(data: bytes, **changes: object) -> bytes:
    """``data`` (an object file) with footer fields changed; the payload is untouched."""
    footer = ser.parse_footer(data, len(data))
    assert isinstance(footer, ser.Footer)
    encoded = dataclasses.replace(footer, **changes).encode()
    return data[: footer.payload_size] + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))


def put_raw(manager: Manager, key: str, data: bytes) -> None:
    src = manager.cache.tmp_dir / "raw.bin"
    src.write_bytes(data)
    manager.store.put(key, src, overwrite=True)
    src.unlink()


def push_as_if(manager: Manager, obj: object, key: str, meta: object = None, **footer) -> None:
    put_raw(manager, key, rewritten(ser.dump_to_bytes(obj, meta, key=key), **footer))


# -- another Python ----------------------------------------------------------------------------


def test_data_from_another_python_loads_silently(manager: Manager) -> None:
    push_as_if(manager, {"a": np.arange(5), "b": [1, "x"]}, "data", python=OTHER_PYTHON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj, meta = manager.pull("data")
    np.testing.assert_array_equal(obj["a"], np.arange(5))
    assert obj["b"] == [1, "x"] and meta is None


@pytest.mark.parametrize("code", [True, None], ids=["flagged", "written-before-the-flag"])
def test_code_from_another_python_is_refused_before_unpickling(
    manager: Manager, tmp_path: Path, code: bool | None
) -> None:
    marker = tmp_path / "unpickled"

    def trap() -> None:  # a function pickled by value; unpickling it would make the marker
        pass

    obj = {"f": trap, "side": _SideEffect(marker)}
    push_as_if(manager, obj, "code", python=OTHER_PYTHON, code=code)
    with pytest.raises(DeserializationError) as caught:
        manager.pull("code")
    message = str(caught.value)
    assert f"Python {OTHER_PYTHON}" in message and sys.version.split()[0] in message
    assert "allow_version_mismatch=True" in message and "push it again" in message.lower()
    assert "\n" not in message
    assert not marker.exists()  # refused before anything was unpickled

    with pytest.warns(VersionMismatchWarning) as warned:
        obj, _ = manager.pull("code", allow_version_mismatch=True)
    assert marker.exists() and callable(obj["f"])
    assert warned[0].filename == __file__


def test_code_in_the_meta_from_another_python_is_refused(manager: Manager) -> None:
    push_as_if(manager, 1, "k", meta={"f": lambda: 1}, python=OTHER_PYTHON)
    with pytest.raises(DeserializationError, match="the meta"):
        manager.pull("k")
    with pytest.raises(DeserializationError, match="the meta"):
        manager.info("k")


class _SideEffect:
    """Unpickling it creates a file: proof that unpickling happened."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_the_footer_says_whether_an_object_holds_code(manager: Manager) -> None:
    manager.push(lambda x: x, "code")
    manager.push({"a": np.arange(3)}, "data")
    assert manager.info("code").holds_code is True
    assert manager.info("data").holds_code is False


# -- library versions ------------------------------------------------------------------------------


def test_a_push_records_library_versions_and_info_shows_them(manager: Manager) -> None:
    manager.push(np.arange(3), "arr")
    assert manager.info("arr").libraries["numpy"] == np.__version__


def test_an_unpickling_failure_is_short_and_names_the_library_and_versions(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = types.ModuleType("fakelib_xyz")
    lib.__version__ = "2.0.0"
    exec(
        "class Frame:\n"
        "    def __init__(self, rows):\n"
        "        self.rows = rows\n"
        "    def __reduce__(self):\n"
        "        return (_rebuild, (self.rows,))\n"
        "def _rebuild(rows):\n"
        "    return Frame(rows)\n",
        lib.__dict__,
    )
    lib.Frame.__module__ = lib._rebuild.__module__ = "fakelib_xyz"
    lib.Frame.__qualname__ = "Frame"
    monkeypatch.setitem(sys.modules, "fakelib_xyz", lib)
    manager.push(lib.Frame(list(range(100_000))), "frame")
    # Here, an older fakelib without _rebuild, which raises with a huge message.
    older = types.ModuleType("fakelib_xyz")
    older.__version__ = "1.0.0"

    def __getattr__(name: str):
        raise AttributeError(f"no {name} in " + ", ".join(map(str, range(100_000))))

    older.__getattr__ = __getattr__
    monkeypatch.setitem(sys.modules, "fakelib_xyz", older)
    with pytest.raises(DeserializationError) as caught:
        manager.pull("frame", force=True)
    message = str(caught.value)
    assert len(message) < 600, len(message)
    assert "fakelib_xyz 2.0.0" in message and "here 1.0.0" in message
    assert "fakelib_xyz==2.0.0" in message


# -- the answer holds the key asked for --------------------------------------------------------


def test_an_answer_holding_another_keys_object_is_refused_and_never_cached(
    manager: Manager,
) -> None:
    manager.push({"who": "b"}, "b")
    put_raw(manager, "a", manager.cache.get("b").path.read_bytes())  # b's object under "a"
    with pytest.raises(IntegrityError, match="pushed as 'b'"):
        manager.pull("a")
    assert manager.cache.get("a") is None
    with pytest.raises(IntegrityError, match="pushed as 'b'"):
        manager.info("a")
    with pytest.raises(IntegrityError, match="pushed as 'b'"):
        manager.fetch("a")
    assert manager.cache.get("a") is None


def test_a_cached_copy_holding_another_keys_object_is_dropped(manager: Manager) -> None:
    manager.push({"who": "a"}, "a")
    manager.push({"who": "b"}, "b")
    a, b = manager.cache.get("a"), manager.cache.get("b")
    a.path.write_bytes(b.path.read_bytes())  # same size? not needed: dropped on any mismatch
    with manager.cache._write() as db:
        db.execute("UPDATE entries SET size = ? WHERE key = 'a'", (b.size,))
    assert manager.pull("a") == ({"who": "a"}, None)  # fetched again from the store


def test_objects_written_before_footers_named_their_key_still_pull(manager: Manager) -> None:
    put_raw(manager, "k", rewritten(ser.dump_to_bytes({"old": True}, key="k"), key=""))
    assert manager.pull("k") == ({"old": True}, None)


def test_signatures_made_before_the_new_footer_fields_still_verify() -> None:
    """A footer signed by the previous release (no key, code or libraries fields) verifies."""
    secret = b"team secret"
    data = ser.dump_to_bytes({"x": 1})
    footer = ser.parse_footer(data, len(data))
    old = dataclasses.replace(
        footer, format=1, key="", code=None, libraries=(), readonly=(), stream_sha256="",
        buffer_sha256=(),
    )  # fmt: skip
    fields = dataclasses.asdict(old)
    for name in ("signature", *ser._LATER_FIELDS):
        del fields[name]
    message = json.dumps(fields, sort_keys=True).encode() + b"\0" + b"team/k"
    signature = hmac.new(secret, message, "sha256").hexdigest()
    dataclasses.replace(old, signature=signature).check_signature(secret, "team/k")
    with pytest.raises(UntrustedObjectError):
        dataclasses.replace(old, signature=signature).check_signature(secret, "team/other")
