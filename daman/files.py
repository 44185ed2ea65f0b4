"""Writing files whole or not at all, in one way everywhere (the configuration, the local
store, ``pull_file``, the AWS credentials file).

A file is written under a temporary name in its own folder (so the final rename never crosses
a file system), flushed to disc, then renamed over the target: a reader sees the old file or
the new one, never half of one. The temporary name is unique across processes and threads and
always short enough for the file system, whatever the target's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".incomplete"
_NAME_BYTES = 100  # of the target's name kept in the temp name: 255 is the usual limit
TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{32}\.incomplete")
"""Names :func:`temp_path` gives; cleanups delete nothing else."""


def temp_path(target: Path) -> Path:
    """``.<start of the name>.<random>.incomplete`` beside ``target``."""
    name = target.name.encode("utf-8", "surrogateescape")[:_NAME_BYTES]
    start = name.decode("utf-8", "ignore")
    return target.with_name(f".{start}.{uuid.uuid4().hex}{TEMP_SUFFIX}")


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it is there; a cleanup that cannot raise (it runs in ``finally``)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def open_empty(path: Path, *, buffering: int = -1) -> BinaryIO:
    """``path`` open for writing from its start, created if missing and emptied, but without
    ``O_TRUNC`` when it is empty already (a temp file just made): on ext4, truncating a file
    to nothing marks it to be flushed to disc when it is closed (``auto_da_alloc``), which
    made closing a 700-byte temp file cost ten times what writing it did, and starts the
    writeback of a large one at once."""
    # The file object owns the descriptor from its first moment: a Ctrl-C between an os.open
    # and the wrapping of its descriptor cannot make two owners that both close it (the
    # second close failed, or closed another thread's newer file of the same number).
    f = open(path, "r+b", buffering=buffering, opener=_open_rw)  # noqa: SIM115 - returned
    try:
        if os.fstat(f.fileno()).st_size:  # a download starting over
            os.ftruncate(f.fileno(), 0)
    except BaseException:
        f.close()
        raise
    return f


def _open_rw(path: str, _flags: int) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class AtomicFile:
    """What :func:`atomic_write` yields: the open temp file and its path."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self.file = file
        self.path = path


@contextlib.contextmanager
def atomic_write(
    target: Path, *, mode: int = 0o644, create_only: bool = False
) -> Iterator[AtomicFile]:
    """Write ``target`` whole or not at all. The block writes to ``.file``; on a clean exit
    it is flushed, synced and renamed over ``target`` (``create_only``: linked, so that an
    existing ``target`` raises ``FileExistsError`` and is never replaced). On any error
    nothing changes at ``target`` and the temp file is gone."""
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w+b") as file:
            yield AtomicFile(file, tmp)
            file.flush()
            os.fsync(file.fileno())
        if create_only:
            os.link(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        unlink_quietly(tmp)
