"""daman 0.2's objects and setups, written the way 0.2 wrote them, for the upgrade tests.

0.2 dumped ``{"data": obj, "meta": meta}`` with joblib and uploaded it with boto3's
``upload_file``/``upload_fileobj`` (multipart above 8 MiB) at the bucket's root, with user
metadata ``md5`` = the hex md5 of the whole file. It never wrote to folders: in a local store
a 0.2 object is a copy someone put at ``<store>/<key>.daman``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import joblib

from daman import Config
from daman.store import Store

BIN = Path(sys.executable).parent


def dump_02(obj: Any, meta: Any = None) -> bytes:
    buf = io.BytesIO()
    joblib.dump({"data": obj, "meta": meta}, buf)
    return buf.getvalue()


def put_02(
    config: Config,
    key: str,
    obj: Any = None,
    meta: Any = None,
    *,
    body: bytes | None = None,
    md5: str | None = None,
) -> bytes:
    """Store ``obj`` (or the raw ``body``) under ``key`` as daman 0.2 did; ``md5`` overrides
    the recorded md5 (a corrupted object). Returns the bytes stored."""
    data = dump_02(obj, meta) if body is None else body
    md5 = md5 or hashlib.md5(data).hexdigest()
    if config.service == "aws":
        bucket, _, prefix = config.storage_name.strip("/").partition("/")
        name = f"{prefix}/{key}" if prefix else key
        client = boto3.client("s3", endpoint_url=config.endpoint_url, region_name="us-east-1")
        client.upload_fileobj(io.BytesIO(data), bucket, name, ExtraArgs={"Metadata": {"md5": md5}})
        client.close()
    else:
        path = Path(config.storage_name, *key.split("/"))
        path = path.with_name(path.name + ".daman")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return data


def _tripped(log: str) -> str:
    with open(log, "a") as f:
        f.write("unpickled\n")
    return "tripped"


class Tripwire:
    """Unpickling it appends a line to ``log``: proves whether something was unpickled."""

    def __init__(self, log: Path) -> None:
        self.log = str(log)

    def __reduce__(self) -> tuple[Any, ...]:
        return _tripped, (self.log,)


def tripped(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def write_setup_02(
    home: Path,
    *,
    bucket: str,
    data_dir: Path,
    allocated_mib: str | None = None,
    registry: dict[str, Any] | None = None,
    config_text: str | None = None,
) -> Path:
    """``~/.daman/config`` (and ``data_registery.json``) as daman 0.2's configure wrote them."""
    folder = home / ".daman"
    folder.mkdir(parents=True, exist_ok=True)
    if config_text is None:
        config_text = (
            f"[service]\nservice = aws\nname = {bucket}\n\n"
            f"[local]\ndata_dir = {data_dir}\nregistery = {folder / 'registery.json'}\n"
        )
        if allocated_mib is not None:
            config_text += f"allocated_space = {allocated_mib}\n"
    (folder / "config").write_text(config_text)
    if registry is not None:
        (folder / "data_registery.json").write_text(json.dumps(registry))
    return folder / "config"


def registry_entry(data_dir: Path, key: str, persist: bool) -> dict[str, Any]:
    return {
        "path": str(data_dir / key),
        "used": 3,
        "created_at": "2021-03-08T10:00:00.000000",
        "last_used": "2021-03-09T11:00:00.000000",
        "size": 1234,
        "persist": persist,
    }


class HookedStore(Store):
    """A real store whose calls can be intercepted: ``hooks[name](*args)`` runs before (or,
    for ``after_get``, after) the inner call."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.hooks: dict[str, Callable[..., object]] = {}

    def _hook(self, name: str, *args: object) -> None:
        if name in self.hooks:
            self.hooks[name](*args)

    def describe(self):
        return self.inner.describe()

    def check(self):
        return self.inner.check()

    def head(self, key):
        return self.inner.head(key)

    def put(self, key, path, **kw):
        return self.inner.put(key, path, **kw)

    def get(self, key, dest, **kw):
        info = self.inner.get(key, dest, **kw)
        self._hook("after_get", key)
        return info

    def read_tail(self, key, length):
        return self.inner.read_tail(key, length)

    def read_range(self, key, offset, length):
        return self.inner.read_range(key, offset, length)

    def delete(self, key):
        return self.inner.delete(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def put_if_match(self, key, path, etag, **kw):
        self._hook("put_if_match", key)
        return self.inner.put_if_match(key, path, etag, **kw)

    def recover_interrupted(self, prefix=""):
        return self.inner.recover_interrupted(prefix)

    def close(self) -> None:
        self.inner.close()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """An installed console script (or ``python -m daman ...`` as ``("-m", ...)``)."""
    if args[0] == "-m":
        command = [sys.executable, *args]
    else:
        exe = shutil.which(args[0], path=str(BIN))
        assert exe, f"{args[0]} is not installed next to {sys.executable}"
        command = [exe, *args[1:]]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
