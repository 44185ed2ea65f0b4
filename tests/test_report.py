"""What notebooks show: ``ls``, ``ls_level``, ``info`` and ``usage`` as HTML tables (their
``_repr_html_``, written by ``report``), a configuration in one line, and the magics'
tables in Jupyter with today's text kept for terminals. Keys and meta holding markup show as
text. Then the lines every front-end prints, one wording per event."""

from __future__ import annotations

import atexit
import re
import sys
import warnings
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.formatters import DisplayFormatter
from IPython.core.interactiveshell import InteractiveShell
from IPython.lib.pretty import pretty
from traitlets.config import Config as ShellConfig

import daman as dm
from daman import report
from daman.config import Config
from daman.errors import ConfigWarning
from daman.results import Deleted, ObjectDetails, Usage

SCRIPT = "<script>alert('x')</script>"


class _Parsed(HTMLParser):
    """The tags and the text of an HTML fragment, as a browser reads them."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.styles += [value or "" for name, value in attrs if name == "style"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(markup: str) -> _Parsed:
    return _Parsed(markup)


@pytest.fixture
def store(tmp_path: Path) -> dm.Config:
    return dm.configure(
        storage_name=str(tmp_path / "store"),
        service="local",
        local_dir=str(tmp_path / "cache"),
        allocated_space="10KB",
        progress=False,
        save=False,
    )


def test_markup_in_keys_and_meta_shows_as_text(store: dm.Config) -> None:
    key = f"team/{SCRIPT}"
    dm.push(1, key, meta={"note": SCRIPT, SCRIPT: "<b>bold</b>"})
    for markup in (
        dm.ls()._repr_html_(),
        dm.ls_level("team/")._repr_html_(),
        dm.info(key)._repr_html_(),
        dm.usage()._repr_html_(),
    ):
        assert "script" not in parsed(markup).tags, markup
    listing = parsed(dm.ls()._repr_html_())
    assert key in "".join(listing.text)  # the key as it is, read as text
    details = parsed(dm.info(key)._repr_html_())
    assert "script" not in details.tags and "<b>bold</b>" in "".join(details.text)
    assert SCRIPT in "".join(details.text)


def test_ls_shows_a_table_of_keys_and_a_total(store: dm.Config) -> None:
    dm.push(b"x" * 2000, "team/a")
    dm.push(2, "team/b", persist=True)
    listing = dm.ls("team/")
    assert isinstance(listing, list) and [item.key for item in listing] == ["team/a", "team/b"]
    html = parsed(listing._repr_html_())
    assert html.tags.count("tr") == 3 and "table" in html.tags
    text = " ".join(t.strip() for t in html.text if t.strip())
    assert "cached team/a" in text and "persisted team/b" in text
    assert re.search(r"2 keys, \d\.\d KiB$", text)


def test_a_long_listing_shows_its_first_rows_only(store: dm.Config, monkeypatch) -> None:
    monkeypatch.setattr(report, "HTML_ROWS", 3)
    for n in range(5):
        dm.push(n, f"k{n}")
    html = parsed(dm.ls()._repr_html_())
    assert html.tags.count("tr") == 1 + 3
    assert "5 keys, " in "".join(html.text) and "(the first 3 shown)" in "".join(html.text)


def test_usage_draws_a_bar_of_used_against_allocated(store: dm.Config) -> None:
    dm.push(b"x" * 2000, "a", persist=True)
    dm.push(b"y" * 2000, "b")
    usage = dm.usage()
    persisted = usage.persisted[0].size
    other = usage.used - persisted
    widths = [
        float(m[1]) for style in parsed(usage._repr_html_()).styles
        if (m := re.match(r"width: ([\d.]+)%", style))
    ]  # fmt: skip
    assert widths == [
        pytest.approx(100 * persisted / 10_000, abs=0.01),
        pytest.approx(100 * other / 10_000, abs=0.01),
    ]
    text = "".join(parsed(usage._repr_html_()).text)
    assert "2 cached, 1 persisted" in text and "a (" in text


def test_usage_without_an_allocation_draws_no_bar(tmp_path: Path) -> None:
    dm.configure(storage_name=str(tmp_path / "s"), service="local", save=False)
    html = dm.usage()._repr_html_()
    assert "width:" not in html and "no limit" in html


def test_jupyter_gets_html_and_terminals_keep_their_text(store: dm.Config) -> None:
    dm.push(1, "k", meta={"m": 1})
    formatter = DisplayFormatter()  # what a kernel sends for a cell's value
    for value in (dm.ls(), dm.info("k"), dm.usage()):
        data, _ = formatter.format(value)
        assert data["text/html"].startswith("<") and "text/plain" in data
    data, _ = formatter.format(dm.ls())
    assert data["text/plain"].startswith("[KeyListing(key='k'")  # as before


def test_a_configuration_shows_in_one_line_without_its_secret(tmp_path: Path) -> None:
    config = dm.configure(
        storage_name=str(tmp_path / "store"),
        service="local",
        local_dir=str(tmp_path / "cache"),
        allocated_space="64MiB",
        signing_key="team-secret",
        save=False,
    )
    line = pretty(config)
    assert line == (
        f"daman: local folder {tmp_path / 'store'}; cache {tmp_path / 'cache'} (64.0 MiB, signed)"
    )
    assert "team-secret" not in line and "team-secret" not in repr(config)
    assert repr(config).startswith("Config(storage_name=")  # repr keeps every field


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    """A shell whose displays are recorded, as a kernel would send them to Jupyter."""
    saved = sys.modules["__main__"], sys.displayhook, sys.excepthook, warnings.filters[:]
    config = ShellConfig()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell(config=config)
    ip.run_line_magic("load_ext", "daman")
    ip.display_pub = CapturingDisplayPublisher()
    try:
        yield ip
    finally:
        atexit.unregister(ip.atexit_operations)
        ip.atexit_operations()
        sys.modules["__main__"], sys.displayhook, sys.excepthook = saved[:3]
        warnings.filters[:] = saved[3]


@pytest.mark.parametrize("magic", ["%dm_ls", "%dm_info k", "%dm_status"])
def test_the_magics_show_a_table_and_the_same_text_as_before(
    magic: str, shell: InteractiveShell, store: dm.Config
) -> None:
    dm.push(1, "k", meta={"note": SCRIPT})
    manager = dm.get_manager()
    expected = {
        "%dm_ls": report.listing_lines(manager.ls()),
        "%dm_info k": report.details_lines(manager.info("k")),
        "%dm_status": report.usage_lines(manager.usage(), manager.cache.root),
    }[magic]
    result = shell.run_cell(magic)
    assert result.success
    (shown,) = shell.display_pub.outputs
    assert shown["data"]["text/plain"] == "\n".join(expected)
    assert "script" not in parsed(shown["data"]["text/html"]).tags
    assert "table" in parsed(shown["data"]["text/html"]).tags


# -- the lines every front-end prints --------------------------------------------------------


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
