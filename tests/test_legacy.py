"""Reading daman 0.2 objects: pull, info and ls on both backends, written the way 0.2 wrote
them (joblib dumps with ``md5`` metadata, see legacy_helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from legacy_helpers import Tripwire, dump_02, put_02, tripped

from daman import (
    Config,
    DeserializationError,
    IntegrityError,
    Manager,
    UntrustedObjectError,
    report,
)
from daman.legacy import recognise
from daman.serialize import TRAILER, StoredFile
from daman.store import ObjectInfo

KEY = "signing-key-of-the-team"


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    """daman 0.2 wrote to S3 only (copies may sit in a folder): not the cloud backends."""
    return request.param


@pytest.fixture
def no_joblib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "joblib", None)  # `import joblib` raises ImportError


def test_a_02_object_pulls_like_any_other_then_comes_from_the_cache(
    manager: Manager, config: Config
) -> None:
    put_02(config, "team/frame", {"rows": [1, 2, 3]}, meta={"source": "0.2 notebook"})
    pulled = manager.load("team/frame")
    assert (pulled.obj, pulled.meta, pulled.source) == (
        {"rows": [1, 2, 3]},
        {"source": "0.2 notebook"},
        "store",
    )
    # The cache holds today's format (converted on the way in): its own checks pass on it.
    entry = manager.cache.get("team/frame")
    with open(entry.path, "rb") as f:
        stored = StoredFile(f)
        stored.verify()
        footer = stored.footer
    assert footer.sha256 == entry.sha256 and "converted from daman 0.2" in footer.pushed_by
    assert manager.verify().ok
    again = manager.load("team/frame")
    assert (again.obj, again.meta, again.source) == (pulled.obj, pulled.meta, "cache")


def test_a_cache_hit_on_a_converted_copy_needs_no_joblib(
    manager: Manager, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_02(config, "k", [1, 2], meta="m")
    manager.pull("k")
    monkeypatch.setitem(sys.modules, "joblib", None)
    assert manager.pull("k") == ([1, 2], "m")


def test_a_large_02_object_with_arrays_is_pulled_whole(manager: Manager, config: Config) -> None:
    array = np.arange(9 * 1024 * 1024 // 8, dtype=np.float64)  # 9 MiB: a multipart upload
    put_02(config, "big/array", {"x": array, "n": 1}, meta={"shape": array.shape})
    obj, meta = manager.pull("big/array")
    assert np.array_equal(obj["x"], array) and obj["n"] == 1 and meta == {"shape": array.shape}
    assert manager.load("big/array", memory_only=True).meta == {"shape": array.shape}


def test_fetch_and_memory_only_pulls_of_a_02_object(manager: Manager, config: Config) -> None:
    put_02(config, "a", "value", meta=1)
    assert manager.pull("a", memory_only=True) == ("value", 1)
    assert manager.cache.get("a") is None
    entry = manager.fetch("a", persist=True)
    assert entry.persist
    with open(entry.path, "rb") as f:
        StoredFile(f).verify()


def test_a_02_object_changed_in_the_store_is_downloaded_again(
    manager: Manager, config: Config
) -> None:
    put_02(config, "k", "first")
    assert manager.pull("k")[0] == "first"
    put_02(config, "k", "second version")  # a 0.2 client pushes again
    pulled = manager.load("k")
    assert (pulled.obj, pulled.source) == ("second version", "store")


def test_info_says_it_is_a_02_object(manager: Manager, config: Config) -> None:
    data = put_02(config, "old/model", {"w": [0.5]}, meta={"epoch": 3})
    details = manager.info("old/model")
    assert details.legacy and details.size == len(data) and not details.cached
    if config.service == "aws":
        import hashlib

        assert details.md5 == hashlib.md5(data).hexdigest()
    else:
        assert details.md5 == ""  # a folder keeps no md5
    assert details.pushed_by == details.pushed_at == details.sha256 == ""
    text = "\n".join(report.details_lines(details))
    assert "daman 0.2" in text and "dm_migrate" in text
    data_out = report.details_data(details)
    assert data_out["format"] == "daman 0.2" and "pushed_by" not in data_out
    manager.pull("old/model")
    assert manager.info("old/model").cached  # still described as stored: 0.2


def test_ls_marks_02_objects_when_asked(manager: Manager, config: Config) -> None:
    put_02(config, "team/old", [1])
    manager.push([2], "team/new")
    marked = {item.key: item.legacy for item in manager.ls("team/", legacy=True)}
    assert marked == {"team/old": True, "team/new": False}
    assert {item.legacy for item in manager.ls("team/")} == {None}  # not checked: no cost
    lines = report.listing_lines(manager.ls("team/", legacy=True))
    assert "daman 0.2" in lines[1] and "team/old" in lines[1] and "daman 0.2" not in lines[0]
    assert [row["legacy"] for row in report.listing_data(manager.ls("team/", legacy=True))] == [
        False,
        True,
    ]


def test_with_a_signing_key_a_02_object_is_refused_unopened(config: Config, tmp_path: Path) -> None:
    log = tmp_path / "unpickled.log"
    put_02(config, "old", Tripwire(log), meta="m")
    with Manager(config.replace(signing_key=KEY)) as signed:
        with pytest.raises(UntrustedObjectError, match="dm_migrate"):
            signed.pull("old")
        with pytest.raises(UntrustedObjectError, match="dm_migrate"):
            signed.info("old")
        assert signed.cache.get("old") is None
    assert tripped(log) == 0


def test_a_converted_cached_copy_is_refused_once_signing_is_on(
    config: Config, tmp_path: Path
) -> None:
    log = tmp_path / "unpickled.log"
    put_02(config, "old", Tripwire(log))
    with Manager(config) as plain:
        assert plain.pull("old")[0] == "tripped"
    assert tripped(log) == 1
    with Manager(config.replace(signing_key=KEY)) as signed, pytest.raises(UntrustedObjectError):
        signed.pull("old")
    assert tripped(log) == 1


@pytest.mark.parametrize("backend", ["s3"])  # a folder keeps no md5 to check against
def test_a_02_object_whose_md5_does_not_match_is_refused_unopened(
    manager: Manager, config: Config, tmp_path: Path
) -> None:
    log = tmp_path / "unpickled.log"
    put_02(config, "bad", Tripwire(log), md5="0" * 32)
    with pytest.raises(IntegrityError, match="md5"):
        manager.pull("bad")
    assert tripped(log) == 0 and manager.cache.get("bad") is None
    assert list((config.cache_dir / "tmp").iterdir()) == []


def test_a_truncated_02_object_is_refused(manager: Manager, config: Config) -> None:
    import hashlib

    data = dump_02({"x": list(range(100))})
    # Truncated in storage: on S3 its md5 no longer matches; in a folder (no md5) it no
    # longer ends like a whole pickle, so it is not taken for a 0.2 object at all.
    put_02(config, "cut", body=data[: len(data) // 2], md5=hashlib.md5(data).hexdigest())
    with pytest.raises(IntegrityError, match="md5" if config.service == "aws" else "no daman"):
        manager.pull("cut")
    assert manager.cache.get("cut") is None


def test_a_pickle_of_something_else_is_not_taken_for_a_02_object(
    manager: Manager, config: Config
) -> None:
    import io

    import joblib

    buf = io.BytesIO()
    joblib.dump(["not", "a", "daman", "dict"], buf)
    put_02(config, "other", body=buf.getvalue())
    with pytest.raises(IntegrityError, match=r"neither a daman object nor a daman 0\.2"):
        manager.pull("other")
    assert manager.cache.get("other") is None


@pytest.mark.parametrize("backend", ["s3"])  # S3 only: an object with no metadata at all
def test_an_s3_object_without_md5_or_trailer_is_still_not_a_daman_object(
    manager: Manager, config: Config, s3_endpoint: str
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=config.storage_name, Key="foreign", Body=dump_02("x"))
    with pytest.raises(IntegrityError, match="no daman trailer"):
        manager.pull("foreign")
    assert not manager.ls(legacy=True)[0].legacy


def test_without_joblib_the_error_names_the_extra(
    manager: Manager, config: Config, no_joblib: None
) -> None:
    put_02(config, "old", [1])
    with pytest.raises(DeserializationError, match=r'pip install "daman\[legacy\]"') as caught:
        manager.pull("old")
    assert "\n" not in str(caught.value)
    assert manager.info("old").legacy  # describing it needs no joblib


@pytest.mark.parametrize(
    ("tail", "size", "metadata", "head", "expected"),
    [
        (b"x" * 8 + b"DAMAN\x00v1" + b"\x00" * 8, 100, None, b"", False),  # today's trailer
        (b"...." + b"DAMAN\x00v1" + b"\x01" * 8, 100, {"md5": "ab"}, b"", False),
        (b"\x94Nu.", 47, {"md5": "ab"}, b"", True),  # S3: md5 metadata decides
        (b"\x94Nu.", 47, {}, b"", False),  # S3 with no md5: not 0.2
        (b"\x80\x04\x95\x94Nu.", 6, None, b"", True),  # folder: a whole pickle
        (b"\x94Nu.", 47, None, b"\x80", True),
        (b"\x94Nu.", 47, None, b"P", False),  # does not start like a pickle
        (b"\x94Nu", 47, None, b"\x80", False),  # no STOP at the end: truncated
        (b"", 0, None, b"", False),  # empty
    ],
)
def test_what_is_recognised_as_a_02_object(
    tail: bytes, size: int, metadata: dict | None, head: bytes, expected: bool
) -> None:
    assert TRAILER.size == 16
    info = ObjectInfo("k", size, "etag", None, metadata)
    assert recognise(tail, info, head) is expected
