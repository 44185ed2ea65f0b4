"""Writing the AWS shared credentials file without disturbing what else it holds.

The file (``~/.aws/credentials``, or ``AWS_SHARED_CREDENTIALS_FILE``) is edited line by line
rather than through ``configparser``, which would drop comments; lines are read the way
``configparser`` (and so botocore) reads them, so a header with a comment (``[work] # team``)
is the profile it names, and line ends (``\\n`` or ``\\r\\n``) are kept. It is written
whole or not at all with mode 0600 (``~/.aws`` made 0700), since it holds secrets; a symbolic
link stays a link.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
from pathlib import Path

from .config import expand, write_private_text
from .errors import CredentialsError, InvalidArgumentError

_FIELDS = ("aws_access_key_id", "aws_secret_access_key")
_SESSION_FIELDS = ("aws_session_token", "aws_security_token")
"""What belongs to a temporary key: kept beside a new permanent key, the pair is refused."""
_HEADER = configparser.RawConfigParser.SECTCRE
_OPTION = re.compile(r"(?P<option>.*?)\s*[=:]")
_COMMENT = ("#", ";")


def credentials_path() -> Path:
    named = os.environ.get("AWS_SHARED_CREDENTIALS_FILE")
    return expand(named or "~/.aws/credentials", "the AWS credentials file")


def _check(name: str, value: str) -> None:
    if not value or any(c.isspace() for c in value) or any(c in value for c in "[]#;="):
        raise InvalidArgumentError(f"{name} must be non-empty with no spaces or [ ] # ; = in it.")


@dataclasses.dataclass
class _Line:
    text: str
    section: str | None  # the section it belongs to (None: before the first header)
    header: bool = False
    option: str | None = None  # lower-cased option name, on an option's first line


def _parse(lines: list[str]) -> list[_Line]:
    parsed: list[_Line] = []
    section: str | None = None
    for text in lines:
        stripped = text.strip()
        header = _HEADER.match(stripped)
        if header:
            section = header["header"]
            parsed.append(_Line(text, section, header=True))
            continue
        option = None
        continuation = text[:1].isspace() and stripped and parsed and parsed[-1].section == section
        if stripped and not stripped.startswith(_COMMENT) and not continuation:
            match = _OPTION.match(stripped)
            option = match["option"].strip().lower() if match else None
        parsed.append(_Line(text, section, option=option))
    return parsed


def merge_credentials(
    text: str, profile: str, access_key_id: str, secret: str
) -> tuple[str, list[str]]:
    """``text`` with ``profile``'s keys set and the session token of an earlier temporary key
    removed; other profiles, keys and comments are kept. Returns the text and what was
    removed."""
    newline = "\r\n" if "\r\n" in text else "\n"
    parsed = _parse(text.splitlines())
    values = dict(zip(_FIELDS, (access_key_id, secret), strict=True))
    headers = [i for i, line in enumerate(parsed) if line.header and line.section == profile]
    if not headers:
        out = [line.text for line in parsed]
        if out and out[-1].strip():
            out.append("")
        out += [f"[{profile}]", *(f"{k} = {v}" for k, v in values.items())]
        return newline.join(out) + newline, []
    out, removed, dropping = [], [], False
    missing = dict(values)
    for i, line in enumerate(parsed):
        mine = line.section == profile and not line.header
        if mine and line.option is not None:
            dropping = line.option in _SESSION_FIELDS
            if dropping:
                removed.append(line.option)
                continue
            if line.option in missing:
                out.append(f"{line.option} = {missing.pop(line.option)}")
                continue
        elif mine and dropping and line.text[:1].isspace() and line.text.strip():
            continue  # a continuation line of a dropped token
        else:
            dropping = False
        out.append(line.text)
        if i == headers[0]:
            insert_at = len(out)
    out[insert_at:insert_at] = [f"{k} = {v}" for k, v in missing.items()]
    return newline.join(out) + newline, removed


def write_aws_credentials(
    access_key_id: str, secret_access_key: str, profile: str = "default", path: Path | None = None
) -> tuple[Path, list[str]]:
    """Set ``profile``'s access key in the shared credentials file; returns the file's path
    and the session-token fields removed from the profile (they belonged to the old key)."""
    _check("access_key_id", access_key_id)
    _check("secret_access_key", secret_access_key)
    _check("profile", profile)
    path = path or credentials_path()
    try:
        text = path.read_bytes().decode("utf-8") if path.exists() else ""  # keeps \r\n
        merged, removed = merge_credentials(text, profile, access_key_id, secret_access_key)
        write_private_text(path, merged)
        if path.parent == expand("~/.aws", "~/.aws"):
            path.parent.chmod(0o700)  # README's promise, also for a folder made by others
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CredentialsError(
            f"cannot write the AWS credentials file {path} ({reason or exc}). Point "
            "AWS_SHARED_CREDENTIALS_FILE at a file you can write."
        ) from None
    return path, removed
