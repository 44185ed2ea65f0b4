"""Payload signing: with a signing_key, nothing unsigned or altered is ever unpickled.

The objects here are traps: unpickling one creates a marker folder (``os.mkdir`` runs as the
object is loaded), so "refused before unpickling" is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import daman
import daman.serialize as ser
from daman import Config, IntegrityError, Manager, UntrustedObjectError

KEY = "team-secret-1"


class Trap:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def put_raw(manager: Manager, key: str, data: bytes) -> None:
    """Write bytes into the store under ``key`` as someone with write access could."""
    src = manager.cache.tmp_dir / "raw.bin"
    src.write_bytes(data)
    manager.store.put(key, src, overwrite=True)
    src.unlink()


def forged(payload: object, signature: str, meta: object = None) -> bytes:
    """An object file built by someone without the key, carrying a signature copied from a
    genuine object (the sha256 in its footer is correct for its own bytes)."""
    data = ser.dump_to_bytes(payload, meta)
    footer = ser.parse_footer(data, len(data))
    assert isinstance(footer, ser.Footer)
    body = data[: footer.payload_size]
    encoded = ser.dataclasses.replace(footer, signature=signature).encode()
    return body + encoded + ser.TRAILER.pack(ser.MAGIC, len(encoded))


@pytest.fixture
def signed(config: Config) -> Manager:
    with Manager(config.replace(signing_key=KEY)) as m:
        yield m


def test_signed_round_trip_and_info(signed: Manager) -> None:
    signed.push({"a": 1}, "k", meta={"m": 2})
    assert signed.pull("k", force=True) == ({"a": 1}, {"m": 2})
    assert signed.pull("k") == ({"a": 1}, {"m": 2})  # cache hit: hash and signature again
    assert signed.info("k").meta == {"m": 2}
    with open(signed.cache.get("k").path, "rb") as f:
        footer = ser.StoredFile(f).footer
    assert len(footer.signature) == 64 and footer.meta_sha256


def test_an_unsigned_object_is_refused_unopened(config: Config, signed: Manager, tmp_path) -> None:
    marker = tmp_path / "ran"
    with Manager(config.replace(local_dir=str(tmp_path / "other"))) as unsigned:
        unsigned.push(Trap(marker), "k", meta=Trap(marker))
    with pytest.raises(UntrustedObjectError, match="not signed"):
        signed.pull("k")
    with pytest.raises(UntrustedObjectError, match="not signed"):
        signed.info("k")  # the meta is a pickle too
    with pytest.raises(UntrustedObjectError):
        signed.fetch("k")
    assert not marker.exists()
    assert signed.cache.get("k") is None and list(signed.cache.tmp_dir.iterdir()) == []


def test_an_object_signed_with_another_key_is_refused(config: Config, signed, tmp_path) -> None:
    marker = tmp_path / "ran"
    with Manager(
        config.replace(signing_key="not-the-team-key", local_dir=str(tmp_path / "o"))
    ) as m:
        m.push(Trap(marker), "k")
    with pytest.raises(UntrustedObjectError, match="does not match"):
        signed.pull("k")
    assert not marker.exists()


def test_a_forged_object_with_a_copied_signature_is_refused(signed: Manager, tmp_path) -> None:
    marker = tmp_path / "ran"
    signed.push("genuine", "k")
    with open(signed.cache.get("k").path, "rb") as f:
        genuine_signature = ser.StoredFile(f).footer.signature
    put_raw(signed, "k", forged(Trap(marker), genuine_signature, meta=Trap(marker)))
    with pytest.raises(UntrustedObjectError, match="does not match"):
        signed.pull("k")
    with pytest.raises(UntrustedObjectError, match="does not match"):
        signed.info("k")
    assert not marker.exists()


def test_a_tampered_cached_copy_is_replaced_by_the_signed_one(
    config: Config, signed: Manager, tmp_path: Path
) -> None:
    """Someone who can write the cache folder (and its index) swaps a cached copy."""
    marker = tmp_path / "ran"
    signed.push(["genuine"], "k")
    entry = signed.cache.get("k")
    evil = forged(Trap(marker), "")
    entry.path.write_bytes(evil)
    with sqlite3.connect(signed.cache.root / "index.sqlite3") as db:
        db.execute("UPDATE entries SET size = ? WHERE key = 'k'", (len(evil),))
        db.execute("UPDATE totals SET size = size - ? + ?", (entry.size, len(evil)))
    assert signed.pull("k") == (["genuine"], None)  # refused from the cache, fetched again
    assert not marker.exists()
    # Without signing, the same swap is loaded: this is the threat signing answers.
    entry = signed.cache.get("k")
    entry.path.write_bytes(evil)
    with sqlite3.connect(signed.cache.root / "index.sqlite3") as db:
        db.execute("UPDATE entries SET size = ? WHERE key = 'k'", (len(evil),))
    with Manager(config.replace(check_current=False)) as unsigned:
        unsigned.pull("k")
    assert marker.exists()


def test_a_bit_flipped_meta_is_caught_by_info_before_unpickling(signed: Manager) -> None:
    signed.push("x", "k", meta={"note": "hello"})
    data = bytearray(signed.cache.get("k").path.read_bytes())
    footer = ser.parse_footer(bytes(data), len(data))
    data[footer.meta[0] + 5] ^= 0x01
    put_raw(signed, "k", bytes(data))
    plain = Manager(signed.config.replace(signing_key=None))
    with plain, pytest.raises(IntegrityError, match="meta"):
        plain.info("k")


def test_the_environment_variable_turns_signing_on(config: Config, monkeypatch) -> None:
    monkeypatch.setenv("DAMAN_SIGNING_KEY", KEY)
    with Manager(config) as m:
        m.push(1, "k")
    monkeypatch.delenv("DAMAN_SIGNING_KEY")
    with Manager(config.replace(signing_key=KEY)) as m:
        assert m.pull("k", force=True) == (1, None)
    with Manager(config.replace(signing_key="other")) as m, pytest.raises(UntrustedObjectError):
        m.pull("k", force=True)


def test_without_a_key_signed_objects_still_load(signed: Manager, config: Config) -> None:
    signed.push(1, "k")
    with Manager(config.replace(local_dir=str(config.cache_dir) + "-2")) as plain:
        assert plain.pull("k") == (1, None)


def test_verify_removes_cached_copies_that_are_not_signed(config: Config) -> None:
    with Manager(config) as plain:
        plain.push(1, "unsigned")
    with Manager(config.replace(signing_key=KEY)) as signed:
        signed.push(2, "signed")
        report = signed.verify()
        assert report.untrusted == ["unsigned"] and report.damaged == [] and not report.ok
        assert [e.key for e in signed.cache.entries()] == ["signed"]


def test_the_key_is_kept_private(tmp_path: Path, daman_home: Path) -> None:
    config = daman.configure(storage_name=str(tmp_path / "store"), service="local",
                             signing_key=KEY)  # fmt: skip
    assert KEY not in repr(config)
    path = daman_home / "config.json"
    assert json.loads(path.read_text())["signing_key"] == KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    exe = Path(sys.executable).parent / "dm_configure"
    result = subprocess.run(
        [exe, "--storage_name", str(tmp_path / "store"), "--service", "local",
         "--signing_key", "second-key"],
        capture_output=True, text=True, env=os.environ,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "second-key" not in result.stdout + result.stderr and "signing_key:" in result.stdout
    assert json.loads(path.read_text())["signing_key"] == "second-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_signed_object_copied_under_another_key_is_refused(signed: Manager, tmp_path) -> None:
    signed.push({"model": "trusted"}, "prod/config")
    signed.push({"model": "debug"}, "scratch/debug")
    copied = signed.cache.get("scratch/debug").path.read_bytes()
    put_raw(signed, "prod/config", copied)  # someone with write access, without the secret
    with pytest.raises(UntrustedObjectError, match="copied here from another key"):
        signed.pull("prod/config")
    with pytest.raises(UntrustedObjectError):
        signed.info("prod/config")
