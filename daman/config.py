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

from .errors import ConfigError, ConfigWarning, NotConfiguredError, warn
from .files import atomic_write

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
_URL = re.compile(r"^https?://[^/\s]+")
# Google's bucket names (dots allowed, so up to 222 characters) and Azure's container names.
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_AZURE_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
# Amazon S3's bucket names. An S3-compatible server (endpoint_url set) may accept more: Ceph
# with rgw_relaxed_s3_bucket_names takes up to 255 letters of either case, digits, '.', '-'
# and '_', MinIO's non-strict check capitals, '_' and ':'. For those, daman refuses only what
# botocore itself refuses before any request (its VALID_BUCKET rule, which has no ':'), and
# leaves the rest to the server.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_COMPATIBLE_BUCKET = re.compile(r"^[a-zA-Z0-9._-]{1,255}$")
# The URL schemes a bucket may be written with, and the service each one belongs to.
_SCHEMES = {"s3://": "aws", "gs://": "gcs"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def expand(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` with ``~`` expanded, made absolute; a ConfigError when there is no home
    folder to expand it to (HOME unset and no entry in the password database)."""
    try:
        return Path(path).expanduser().absolute()
    except RuntimeError:
        raise ConfigError(
            f"cannot find your home folder for {what} {str(path)!r} (HOME is not set and "
            "the system knows no home for your user). Set HOME, or give a full path."
        ) from None


def daman_home() -> Path:
    """The folder holding daman's configuration (``DAMAN_HOME`` or ``~/.daman``)."""
    return expand(os.environ.get("DAMAN_HOME") or "~/.daman", "DAMAN_HOME")


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
            size = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if math.isfinite(size):
                return int(size)
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
    connect_timeout: float = 5.0
    """Seconds to wait for a connection; a store that drops packets fails a transfer after
    max_attempts of these (a cached copy's freshness check gives up after 2 x 2 s)."""
    read_timeout: float = 60.0
    max_attempts: int = 5
    progress: bool = True
    keep_versions: int | None = None
    """How many versions of a key the store keeps (the current one included); the push that
    exceeds it removes the oldest. None: every version is kept."""
    signing_key: str | None = dataclasses.field(default=None, repr=False)
    """The team's secret: pushes are signed with it and pulls refuse objects not signed with
    it, before unpickling. ``DAMAN_SIGNING_KEY`` in the environment is used when unset."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            object.__setattr__(self, field.name, check_field(field.name, value))
        object.__setattr__(self, "storage_name", self._without_scheme())
        self._check_cloud_name()

    def _without_scheme(self) -> str:
        """``storage_name`` without the ``s3://`` (aws) or ``gs://`` (gcs) its console and
        CLI print; such a URL given with another service is refused, not taken for a
        folder or bucket named ``s3:``."""
        name = self.storage_name
        for scheme, service in _SCHEMES.items():
            if name.lower().startswith(scheme):
                if self.service != service:
                    raise ConfigError(
                        f"storage_name must be a name for service {self.service}, not {name!r}: "
                        f"{scheme} URLs are for service {service}. Fix it with `dm_configure "
                        f"--storage_name NAME` (or `--service {service}`)."
                    )
                name = name[len(scheme) :].strip("/")
                if not name:
                    raise ConfigError(
                        f"storage_name must be a bucket name, not {self.storage_name!r}. Fix it "
                        "with `dm_configure --storage_name BUCKET[/PREFIX]`."
                    )
        return name

    def _check_cloud_name(self) -> None:
        """S3 and GCS buckets and Azure containers have strict names; say so before any
        request."""
        name = self.storage_name.strip("/").partition("/")[0]
        if self.service == "aws" and self.endpoint_url is None and not _S3_BUCKET.match(name):
            raise ConfigError(
                f"invalid S3 bucket name {name!r}: 3-63 lowercase letters, digits, '.' and "
                "'-', starting and ending with a letter or digit. Fix it with "
                "`dm_configure --storage_name BUCKET` (a us-east-1 bucket older than 2018 "
                "may have capitals or '_': add --endpoint_url https://s3.amazonaws.com)."
            )
        if self.service == "aws" and self.endpoint_url and not _S3_COMPATIBLE_BUCKET.match(name):
            raise ConfigError(
                f"invalid bucket name {name!r}: up to 255 letters, digits, '.', '-' and '_'. "
                "Fix it with `dm_configure --storage_name BUCKET`."
            )
        if self.service == "gcs" and not _GCS_BUCKET.match(name):
            raise ConfigError(
                f"invalid GCS bucket name {name!r}: 3-222 lowercase letters, digits, '-', '_' "
                "and '.', starting and ending with a letter or digit. Fix it with "
                "`dm_configure --storage_name BUCKET`."
            )
        if self.service == "azure" and not _AZURE_CONTAINER.match(name):
            raise ConfigError(
                f"invalid Azure container name {name!r}: 3-63 lowercase letters, digits and "
                "single '-' between them. Fix it with `dm_configure --storage_name CONTAINER`."
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
            return expand(self.local_dir, "local_dir")
        return daman_home() / "data"

    def check_folders(self) -> None:
        """A local store and the cache must not share a folder, nor hold one another
        (through symbolic links too): cleaning the cache would delete the team's objects,
        and the store would list cached files as keys."""
        if self.service != "local":
            return
        store = Path(os.path.realpath(expand(self.storage_name, "storage_name")))
        cache = Path(os.path.realpath(self.cache_dir))
        if store == cache:
            overlap = f"local_dir and the store folder are the same folder ({store})"
        elif cache in store.parents:
            overlap = f"local_dir {cache} holds the store folder {store}"
        elif store in cache.parents:
            overlap = f"local_dir {cache} is inside the store folder {store}"
        else:
            return
        raise ConfigError(
            f"{overlap}: the cache and a local store must be separate folders. Choose another "
            "local_dir (dm_configure --local_dir DIR) or another storage_name."
        )

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython and Jupyter show a configuration (what ``dm.configure`` returns) in one
        line; ``repr`` keeps every field."""
        from .report import config_line  # report imports this module

        printer.text(config_line(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConfigError(
                f"unknown configuration field(s): {', '.join(map(str, unknown))}. Known: "
                f"{', '.join(FIELDS)}."
            )
        if "storage_name" not in data:
            raise ConfigError(
                "storage_name is required: a bucket name (aws) or a folder (local). Run "
                "dm_configure --storage_name NAME --service {aws,local}."
            )
        return cls(**data)


FIELDS = tuple(field.name for field in dataclasses.fields(Config))
DEFAULTS: dict[str, Any] = {field.name: field.default for field in dataclasses.fields(Config)}
"""Each field's default, as front-ends' help and the checks of given settings quote it."""
_NULLABLE = ("local_dir", "endpoint_url", "region", "signing_key")
"""Fields that may be unset; the text "none" unsets them, in every front-end alike."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_field(name: str, value: Any) -> Any:
    """``value`` checked (and normalised) for the configuration field ``name``; a one-line
    ConfigError that names the field and how to fix it otherwise."""

    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"{name} must be {what}, not {value!r}. Fix it with `dm_configure --{name} VALUE` "
            f"or dm.configure({name}=...)."
        )

    if name in _NULLABLE:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        if not isinstance(value, str):
            raise bad("text (or none)")
    if name == "storage_name":
        if not isinstance(value, str) or not value.strip():
            raise bad("a bucket name (aws) or a folder (local)")
        if any(ord(c) < 32 for c in value):
            raise bad("text without control characters")
        return value
    if name == "service":
        if value not in SERVICES:
            raise bad(f"one of {', '.join(SERVICES)}")
        return value
    if name == "allocated_space":
        try:
            return parse_size(value)
        except ConfigError:
            raise bad("a size such as 500MB, 2GiB or 1.5GB (or none: no limit)") from None
    if name == "endpoint_url" and value is not None and not _URL.match(value):
        raise bad("a full URL such as https://minio.example.com:9000")
    if name in ("check_current", "progress") and not isinstance(value, bool):
        raise bad("true or false")
    if name == "checksums" and value not in CHECKSUM_MODES:
        raise bad(f"one of {', '.join(CHECKSUM_MODES)}")
    if name in ("connect_timeout", "read_timeout"):
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise bad("a number of seconds > 0")
        return float(value)
    if name == "max_attempts" and not (
        _is_number(value) and math.isfinite(value) and value == int(value) >= 1
    ):
        raise bad("a whole number >= 1")
    if name == "max_attempts":
        return int(value)
    if name == "keep_versions" and value is not None:
        if not (_is_number(value) and value == int(value) >= 1):
            raise bad("a whole number >= 1 (or none: keep every version)")
        return int(value)
    return value


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all, mode 0600, in a folder made 0700 if it is new: for
    files that hold settings or secrets. A symbolic link stays a link: its target is written."""
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_write(path, mode=0o600) as out:
        out.file.write(text.encode("utf-8"))


def save_config(
    config: Config, path: Path | None = None, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``config`` (mode 0600) and return where it went. ``extra`` holds fields this
    version does not know (:func:`unknown_fields`), written back as they were so that the
    newer daman that wrote them keeps its settings."""
    path = path or config_path()
    data = {**(extra or {}), **config.to_dict()}
    write_private_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def unknown_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a saved configuration that this version does not know (a newer daman
    wrote them)."""
    return {name: value for name, value in data.items() if name not in FIELDS}


def load_config(path: Path | None = None) -> Config:
    """The saved configuration, or :class:`NotConfiguredError` saying how to make one; a
    ConfigError (one line, naming the file) when it cannot be read or is not valid. Fields
    this version does not know are ignored, with a ConfigWarning naming them."""
    path = path or config_path()
    data = read_config_fields(path)
    config = Config.from_dict({name: value for name, value in data.items() if name in FIELDS})
    unknown = unknown_fields(data)  # said once the rest is known to be valid: an error first
    if unknown:
        names = ", ".join(map(str, sorted(unknown)))
        warn(
            f"{path} holds {'fields' if len(unknown) > 1 else 'a field'} this daman does not "
            f"know ({names}; written by a newer daman?): ignored here, kept in the file.",
            ConfigWarning,
        )
    return config


def read_config_fields(path: Path | None = None) -> dict[str, Any]:
    """The fields saved in the configuration file, unchecked."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        from .migrate import legacy_setup_hint  # here only: it imports most of daman

        raise NotConfiguredError(
            f"daman is not configured ({path} does not exist). Run "
            "`dm_configure --storage_name NAME --service {aws,gcs,azure,local}` or call "
            "dm.configure(...)." + legacy_setup_hint()
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path} is not UTF-8 text. Delete it and run dm_configure again."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path} ({exc.strerror or exc}). Check it is a file you may read, or "
            "set DAMAN_HOME to another folder."
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc}). Fix it or run dm_configure again."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a configuration. Run dm_configure again.")
    return data
