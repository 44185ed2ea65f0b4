"""report.py: the lines every front-end prints, one wording per event."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from daman import report
from daman.config import Config
from daman.errors import ConfigWarning
from daman.results import Deleted, ObjectDetails, Usage


def details(**changes) -> ObjectDetails:
    fields = dict(key="k", size=10, etag="e", last_modified=None, sha256="0" * 64,
                  pushed_by="me", pushed_at="2026-11-30", python="3.11.7", cloudpickle="3.0",
                  meta=None, cached=False, persist=False)  # fmt: skip
    return ObjectDetails(**{**fields, **changes})


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({}, "no"),
        ({"cached": True}, "yes"),
        ({"cached": True, "persist": True}, "yes, persisted"),
        ({"cached": True, "outdated": True}, "yes (an older version than the store's)"),
    ],
)
def test_info_says_whether_a_key_is_cached_in_words_that_read(changes: dict, shown: str) -> None:
    lines = report.details_lines(details(**changes))
    assert f"{'cached:':<15}{shown}" in lines


def test_status_without_a_limit_says_so_once() -> None:
    lines = report.usage_lines(Usage(used=2048, allocated=None, count=1), Path("/c"))
    assert "used:       2.0 KiB (no limit)" in lines
    lines = report.usage_lines(Usage(used=512, allocated=2048, count=1), Path("/c"))
    assert "used:       512 B of 2.0 KiB (25%)" in lines


def test_every_configuration_field_is_shown_but_the_secret() -> None:
    config = Config(storage_name="bucket/team", service="aws", signing_key="hush-hush")
    lines = report.config_lines(config, Path("/h/config.json"))
    text = "\n".join(lines)
    assert lines[0] == "saved to /h/config.json:"
    for name in Config.__dataclass_fields__:
        assert f"  {name}:" in text, name
    assert "hush-hush" not in text and "signing_key:" in text and " set (" in text
    unsigned = "\n".join(report.config_lines(config.replace(signing_key=None), Path("/c")))
    assert "not set" in unsigned


def test_one_wording_for_a_local_delete() -> None:
    line = report.deleted_line(Deleted("k", local=True, remote=False))
    assert line == "deleted the local copy of k (it stays in the store)"
    freed = report.deleted_line(Deleted("k", local=True, remote=False), freed=2048)
    assert freed == "deleted the local copy of k (it stays in the store; freed 2.0 KiB)"


@pytest.mark.parametrize(
    ("prefix", "line"),
    [("", "no keys in s3://b/"), ("team/", "no keys under 'team/' in s3://b/")],
)
def test_the_empty_listing_line(prefix: str, line: str) -> None:
    assert report.empty_listing_line(prefix, "s3://b/") == line


def test_daman_warnings_are_one_line_other_warnings_as_usual(capsys) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with report.one_line_warnings("dm_x"):
            warnings.warn("mind the gap", ConfigWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.startswith("dm_x: warning: mind the gap\n")
    assert "something else" not in err  # left to Python (and here to pytest) to show
