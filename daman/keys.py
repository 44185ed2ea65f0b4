"""Key validation and the mapping from keys to names on disc.

A key is a '/'-separated name such as ``team/dataset/v1``. It is used verbatim as the object
name in the store (after the configured prefix) and, for the local-folder store, as a relative
path. The local cache never uses a key as a path: it names files by a hash of the key.
"""

from __future__ import annotations

import hashlib
import keyword
import re

from .errors import InvalidKeyError

MAX_KEY_BYTES = 1024  # S3's limit on an object name
MAX_SEGMENT_BYTES = 200  # leaves room under the usual 255-byte file-name limit
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
_DRIVE = re.compile(r"^[A-Za-z]:")


def validate_key(key: object) -> str:
    """Return ``key`` unchanged if it is a safe key, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str):
        raise InvalidKeyError(key, f"a key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, "a key cannot be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKeyError(key, f"a key is at most {MAX_KEY_BYTES} bytes long")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(key, "a key must be valid unicode text") from None
    if _FORBIDDEN.search(key):
        raise InvalidKeyError(key, "backslashes and control characters are not allowed")
    if key.startswith("/"):
        raise InvalidKeyError(key, "a key cannot start with '/'")
    if _DRIVE.match(key):
        raise InvalidKeyError(key, "a key cannot start with a drive letter")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidKeyError(key, "a key cannot contain empty parts ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise InvalidKeyError(key, "'.' and '..' are not allowed as parts of a key")
        if segment != segment.strip():
            raise InvalidKeyError(key, "parts of a key cannot start or end with whitespace")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidKeyError(
                key, f"each '/'-part of a key is at most {MAX_SEGMENT_BYTES} bytes"
            )
    return key


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*")
"""Keys of ASCII letters, digits, ``_``, ``.`` and ``-``, without empty parts: valid at a
glance unless a part is ``.`` or ``..`` or too long (listings check many keys)."""


def is_valid_key(key: str) -> bool:
    """Whether :func:`validate_key` accepts ``key``; most keys answer with one regex."""
    if len(key) <= MAX_SEGMENT_BYTES and _PLAIN_KEY.fullmatch(key):
        if "." not in key:
            return True
        parts = key.split("/")
        if "." not in parts and ".." not in parts:
            return True
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def validate_prefix(prefix: object) -> str:
    """A listing prefix: any text that some valid key starts with (``""``, ``"team/"``,
    ``"team/da"``, ``"."``, ``"a "``): its complete parts must be valid parts of a key; its
    last, partial part must be how a valid part can begin."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise InvalidKeyError(prefix, f"a prefix must be a str, not {type(prefix).__name__}")
    *complete, partial = prefix.split("/")
    # The partial part is completed by some valid part: "" -> "x", "." -> ".x", "a " -> "a x".
    unfinished = not partial or partial[-1].isspace() or partial in (".", "..")
    probe = "/".join([*complete, partial + "x" if unfinished else partial])
    try:
        validate_key(probe)
    except InvalidKeyError as exc:
        raise InvalidKeyError(prefix, f"no key starts with it ({exc.reason})") from None
    return prefix


def key_digest(key: str) -> str:
    """A fixed-length, filesystem-safe name for ``key`` (hex sha256)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def variable_name(key: str) -> str:
    """The last '/'-part of ``key`` as a Python identifier: ``'sales/2026-11'`` ->
    ``'_2026_11'``, ``'models/class'`` -> ``'class_'``; ``""`` when it gives no name fit to
    bind (``'v/€'`` would give ``_``, IPython's last result): the caller asks for one."""
    name = "".join(c if ("_" + c).isidentifier() else "_" for c in key.rsplit("/", 1)[-1])
    if not name.isidentifier():  # starts with a digit
        name = "_" + name
    if keyword.iskeyword(name):
        name += "_"
    if not name.strip("_") or _IPYTHON_NAMES.fullmatch(name):
        return ""
    return name


_IPYTHON_NAMES = re.compile(r"_\d+|_i+\d*|_[oid]h|In|Out|exit|quit|get_ipython")
"""Names IPython keeps its own values under (results, inputs, history)."""
