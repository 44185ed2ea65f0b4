"""Writing the AWS shared credentials file without disturbing what else it holds.

The file (``~/.aws/credentials``, or ``AWS_SHARED_CREDENTIALS_FILE``) is edited line by line
rather than through ``configparser``, which would drop comments. It is written atomically with
mode 0600 inside a 0700 folder, since it holds secrets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import write_private_text
from .errors import CredentialsError, InvalidArgumentError

_FIELDS = ("aws_access_key_id", "aws_secret_access_key")
_HEADER = re.compile(r"^\s*\[([^\]]+)\]\s*$")


def credentials_path() -> Path:
    return Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials").expanduser()


def _check(name: str, value: str) -> None:
    if not value or any(c.isspace() for c in value) or any(c in value for c in "[]#;="):
        raise InvalidArgumentError(f"{name} must be non-empty with no spaces or [ ] # ; = in it.")


def merge_credentials(text: str, profile: str, access_key_id: str, secret: str) -> str:
    """``text`` with ``profile``'s keys set; other profiles, keys and comments are kept."""
    lines = text.splitlines()
    values = dict(zip(_FIELDS, (access_key_id, secret), strict=True))
    start = next(
        (
            i
            for i, line in enumerate(lines)
            if (m := _HEADER.match(line)) and m[1].strip() == profile
        ),
        None,
    )
    if start is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [f"[{profile}]", *(f"{k} = {v}" for k, v in values.items())]
        return "\n".join(lines) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
    missing = dict(values)
    for i in range(start + 1, end):
        name = lines[i].split("=", 1)[0].strip().lower()
        if "=" in lines[i] and name in missing:
            lines[i] = f"{name} = {missing.pop(name)}"
    lines[start + 1 : start + 1] = [f"{k} = {v}" for k, v in missing.items()]
    return "\n".join(lines) + "\n"


def write_aws_credentials(
    access_key_id: str, secret_access_key: str, profile: str = "default", path: Path | None = None
) -> Path:
    """Set ``profile``'s access key in the shared credentials file; returns the file's path."""
    _check("access_key_id", access_key_id)
    _check("secret_access_key", secret_access_key)
    _check("profile", profile)
    path = path or credentials_path()
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        write_private_text(path, merge_credentials(text, profile, access_key_id, secret_access_key))
    except OSError as exc:
        raise CredentialsError(
            f"cannot write the AWS credentials file {path} ({exc.strerror or exc}). Point "
            "AWS_SHARED_CREDENTIALS_FILE at a file you can write."
        ) from None
    return path
