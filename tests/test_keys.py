from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daman.errors import InvalidKeyError
from daman.keys import MAX_KEY_BYTES, key_digest, validate_key, validate_prefix
from daman.store.local import LocalStore

VALID = ["a", "a/b/c", "team/dataset/v1.2", "x-y_z", "données/été", ".hidden/x", "a..b", "C/x"]
INVALID = [
    "",
    "../x",
    "/etc/x",
    "a/../../x",
    "a/./b",
    "C:\\x",
    "C:x",
    "a\\b",
    "a//b",
    "a/",
    "a/b/",
    "..",
    ".",
    "a\x00b",
    "line\nbreak",
    " a",
    "a/ b",
    "x" * (MAX_KEY_BYTES + 1),
    "x" * 201,
    "\ud800",
]


@pytest.mark.parametrize("key", VALID)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", INVALID)
def test_invalid_keys_raise(key: str) -> None:
    with pytest.raises(InvalidKeyError) as info:
        validate_key(key)
    assert isinstance(info.value, ValueError)
    assert "invalid key" in str(info.value)


@pytest.mark.parametrize("key", [None, 3, b"a", ["a"]])
def test_non_string_keys_raise(key: object) -> None:
    with pytest.raises(InvalidKeyError, match="must be a str"):
        validate_key(key)


@pytest.mark.parametrize("prefix", ["", "a", "a/", "team/da"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "../", "a//", "/a"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_prefix(prefix)


def test_digest_is_fixed_length_hex_and_distinct() -> None:
    assert len(key_digest("a")) == 64
    assert key_digest("a") != key_digest("b")
    int(key_digest("a/b"), 16)


segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\"),
    min_size=1,
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(segment, min_size=1, max_size=6).map("/".join))
def test_any_accepted_key_maps_inside_the_local_store(key: str) -> None:
    root = Path("/srv/store")
    try:
        validate_key(key)
    except InvalidKeyError:
        return
    path = LocalStore(root)._path(key)
    assert path.resolve(strict=False).is_relative_to(root.resolve())
    assert ".." not in path.relative_to(root).parts


@settings(max_examples=200, deadline=None)
@given(
    st.lists(segment, min_size=0, max_size=3),
    st.sampled_from(["..", "../..", "/..", "\\..", "C:\\"]),
    st.lists(segment, min_size=0, max_size=3),
)
def test_traversal_forms_are_always_refused(before: list, bad: str, after: list) -> None:
    key = "/".join([*before, bad, *after])
    with pytest.raises(InvalidKeyError):
        validate_key(key)


@pytest.mark.parametrize("key", VALID + INVALID + ["a..", "a/.", "./a", "x" * 200, "a/C:x"])
def test_the_quick_check_agrees_with_validate_key(key: str) -> None:
    from daman.keys import is_valid_key

    try:
        validate_key(key)
        valid = True
    except InvalidKeyError:
        valid = False
    assert is_valid_key(key) == valid


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab.-_/ :\\é\x00", max_size=12))
def test_the_quick_check_agrees_with_validate_key_on_any_text(key: str) -> None:
    from daman.keys import is_valid_key

    try:
        validate_key(key)
        valid = True
    except InvalidKeyError:
        valid = False
    assert is_valid_key(key) == valid
