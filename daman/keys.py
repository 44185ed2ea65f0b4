"""Key validation and the mapping from keys to names on disc.

A key is a '/'-separated name such as ``team/dataset/v1``. It is used verbatim as the object
name in the store (after the configured prefix) and, for the local-folder store, as a relative
path. The local cache never uses a key as a path: it names files by a hash of the key.

One top-level name is reserved: ``.daman-history/`` holds the versions of keys that daman keeps
itself (where the store does not: see ``daman.history``), as *record names*
``.daman-history/<sha256 of the key>/<version id>``. No key may start with it; the stores
accept record names (``validate_name``) but list them only when asked for that folder.
"""

from __future__ import annotations

import hashlib
import keyword
import re

from .errors import InvalidKeyError

MAX_KEY_BYTES = 1024  # S3's limit on an object name
MAX_SEGMENT_BYTES = 200  # leaves room under the usual 255-byte file-name limit
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
HISTORY = ".daman-history"
"""The reserved top-level folder of version records (see the module's docstring)."""
VERSION_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,99}")
"""What a version id daman makes looks like (S3's own version ids are opaque, any text)."""
_RECORD = re.compile(rf"{re.escape(HISTORY)}/[0-9a-f]{{64}}/{VERSION_ID.pattern}")
_RECORD_FOLDER = re.compile(rf"{re.escape(HISTORY)}/[0-9a-f]{{64}}/")
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
    if key == HISTORY or key.startswith(HISTORY + "/"):  # (the name too: a folder's test)
        raise InvalidKeyError(key, f"{HISTORY}/ is reserved for the versions daman keeps")
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
    if len(key) <= MAX_SEGMENT_BYTES and _PLAIN_KEY.fullmatch(key) and key[:1] != ".":
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


def record_folder(key: str) -> str:
    """Where the versions daman keeps of ``key`` lie: ``.daman-history/<sha256 of key>/``
    (a hash: any key, however long or deep, gets a folder of one fixed-length name)."""
    return f"{HISTORY}/{key_digest(key)}/"


def record_name(key: str, version: str) -> str:
    """The record of one version of ``key`` (``version`` as :data:`VERSION_ID` allows)."""
    if not VERSION_ID.fullmatch(version):
        raise InvalidKeyError(version, "not a version id daman makes")
    return record_folder(key) + version


def is_record_name(name: str) -> bool:
    return _RECORD.fullmatch(name) is not None


def is_record_folder(prefix: str) -> bool:
    return _RECORD_FOLDER.fullmatch(prefix) is not None


def validate_name(name: object) -> str:
    """What a store may be asked to read or write: a key, or a record name."""
    if isinstance(name, str) and _RECORD.fullmatch(name):
        return name
    return validate_key(name)


def validate_listing(prefix: object) -> str:
    """What a store may be asked to list: a prefix some key starts with, or one key's record
    folder (:func:`record_folder`)."""
    if isinstance(prefix, str) and _RECORD_FOLDER.fullmatch(prefix):
        return prefix
    return validate_prefix(prefix)


def listed(name: str, prefix: str) -> bool:
    """Whether a listing of ``prefix`` shows ``name``: keys in an ordinary listing, records in
    a listing of a record folder, nothing else."""
    if prefix.startswith(HISTORY + "/"):
        return _RECORD.fullmatch(name) is not None
    return is_valid_key(name)


SKIP_HISTORY_AFTER = f"{HISTORY}/g"
"""A name just after every record name (their next character is a hex digit): a listing of
the root that meets the records continues from here, so that they cost it nothing."""
