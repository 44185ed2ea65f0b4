"""Where daman keeps its settings, what they are, and how sizes are written.

The configuration is one small JSON file, ``$DAMAN_HOME/config.json`` (``~/.daman`` unless
``DAMAN_HOME`` says otherwise). It is written atomically and readable only by its owner,
because it may later hold a signing secret.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, NotConfiguredError

SERVICES = ("aws", "local", "gcs", "azure")
Service = Literal["aws", "local", "gcs", "azure"]
CHECKSUM_MODES = ("when_supported", "when_required")
SIGNING_KEY_ENV = "DAMAN_SIGNING_KEY"

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
# Google's bucket names (dots allowed, so up to 222 characters) and Azure's container names.
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_AZURE_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def daman_home() -> Path:
    """The folder holding daman's configuration (``DAMAN_HOME`` or ``~/.daman``)."""
    return Path(os.environ.get("DAMAN_HOME") or Path.home() / ".daman").expanduser()


def config_path() -> Path:
    return daman_home() / "config.json"


def parse_size(value: int | float | str | None) -> int | None:
    """Bytes from ``1000``, ``"500MB"``, ``"2GiB"`` or ``"1.5GB"``; None or "none": no limit."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(
            f"invalid size {value!r}: give bytes or a size such as '500MB' or '2GiB'."
        )
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"invalid size {value!r}: a size must be a finite number >= 0.")
        return int(value)
    if isinstance(value, str):
        if value.strip().lower() in ("none", "unlimited", "inf", ""):
            return None
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ConfigError(
        f"invalid size {value!r}: give bytes or a size such as '500MB', '2GiB' or '1.5GB'."
    )


def format_size(n: int | None) -> str:
    """``1288490189`` -> ``'1.2 GiB'``; ``None`` -> ``'no limit'``."""
    if n is None:
        return "no limit"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a :class:`~daman.manager.Manager` needs to know.

    ``storage_name`` is a bucket (``service="aws"`` or ``"gcs"``) or a container
    (``service="azure"``), optionally followed by ``/prefix``, or a folder
    (``service="local"``).
    """

    storage_name: str
    service: Service = "local"
    local_dir: str | None = None
    allocated_space: int | None = None
    endpoint_url: str | None = None
    region: str | None = None
    check_current: bool = True
    """Ask the store (one HEAD) whether a cached copy is current before using it."""
    checksums: str = "when_supported"
    """boto3 request checksums; ``"when_required"`` for S3-compatible stores that reject them."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    progress: bool = True
    signing_key: str | None = dataclasses.field(default=None, repr=False)
    """The team's secret: pushes are signed with it and pulls refuse objects not signed with
    it, before unpickling. ``DAMAN_SIGNING_KEY`` in the environment is used when unset."""

    def __post_init__(self) -> None:
        if not isinstance(self.storage_name, str) or not self.storage_name.strip():
            raise ConfigError(
                "storage_name is required: a bucket (aws, gcs), a container (azure) or a folder "
                "(local)."
            )
        if self.service not in SERVICES:
            raise ConfigError(
                f"unknown service {self.service!r}: choose one of {', '.join(SERVICES)}."
            )
        self._check_cloud_name()
        if self.checksums not in CHECKSUM_MODES:
            raise ConfigError(
                f"unknown checksums mode {self.checksums!r}: choose one of "
                f"{', '.join(CHECKSUM_MODES)}."
            )
        object.__setattr__(self, "allocated_space", parse_size(self.allocated_space))
        if self.endpoint_url and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ConfigError(
                f"invalid endpoint_url {self.endpoint_url!r}: give a full URL such as "
                "https://minio.example.com:9000."
            )
        if self.connect_timeout <= 0 or self.read_timeout <= 0 or self.max_attempts < 1:
            raise ConfigError("timeouts must be > 0 seconds and max_attempts >= 1.")

    def _check_cloud_name(self) -> None:
        """GCS buckets and Azure containers have strict names; say so before any request."""
        name = self.storage_name.strip("/").partition("/")[0]
        if self.service == "gcs" and not _GCS_BUCKET.match(name):
            raise ConfigError(
                f"invalid GCS bucket name {name!r}: 3-222 lowercase letters, digits, '-', '_' "
                "and '.', starting and ending with a letter or digit."
            )
        if self.service == "azure" and not _AZURE_CONTAINER.match(name):
            raise ConfigError(
                f"invalid Azure container name {name!r}: 3-63 lowercase letters, digits and "
                "single '-' between them."
            )

    @property
    def signing_secret(self) -> bytes | None:
        """The signing key in effect (the field, else ``$DAMAN_SIGNING_KEY``), or None."""
        key = self.signing_key or os.environ.get(SIGNING_KEY_ENV) or None
        return key.encode("utf-8") if key else None

    @property
    def cache_dir(self) -> Path:
        """The local cache folder (``local_dir``, default ``$DAMAN_HOME/data``)."""
        if self.local_dir:
            return Path(self.local_dir).expanduser().absolute()
        return daman_home() / "data"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration field(s): {', '.join(unknown)}.")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"incomplete configuration: {exc}") from None


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temp file in the same folder, then rename), mode 0600, in a
    folder made 0700 if it is new: for files that hold settings or secrets."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.incomplete")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_config(config: Config, path: Path | None = None) -> Path:
    """Write ``config`` (mode 0600) and return where it went."""
    path = path or config_path()
    write_private_text(path, json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_config(path: Path | None = None) -> Config:
    """The saved configuration, or :class:`NotConfiguredError` saying how to make one."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotConfiguredError(
            f"daman is not configured ({path} does not exist). Run "
            "`dm_configure --storage_name NAME --service {aws,gcs,azure,local}` or call "
            "dm.configure(...)."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc}). Fix it or run dm_configure again."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a configuration. Run dm_configure again.")
    return Config.from_dict(data)
