"""What the cloud backends (``gcs.py``, ``azure.py``) share about moving one object in parts:
a small pool that stops at the first failing part, part ranges, and a file object that SDKs
stream downloads into at positions.

``s3.py`` has its own copies of the pool and the part sizes (it predates this module); it
could use these.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

from ..errors import DamanError

T = TypeVar("T")
MiB = 1024 * 1024
TRANSFER_THREADS = 8
MIN_PART_SIZE = 8 * MiB
MAX_PARTS = 10_000


class ObjectChangedError(DamanError):
    """The object was replaced while we read it in parts; the download starts over."""


class Stopped(Exception):
    """Another part failed (or the user pressed Ctrl-C): this part stops early."""


def run_parallel(tasks: list[Callable[[threading.Event], T]]) -> list[T]:
    """Run ``tasks`` on TRANSFER_THREADS threads and return their results in order. On the
    first failure, or Ctrl-C, parts not yet started are cancelled and running ones are told
    to stop (the event), so an error surfaces at once rather than after the whole transfer."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(TRANSFER_THREADS)
    futures = []
    try:
        futures.extend(pool.submit(task, stop) for task in tasks)
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]
    except BaseException:
        stop.set()
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True)


def part_size_for(size: int) -> int:
    """Parts of at least 8 MiB, at most 10,000 of them, in whole MiB."""
    return max(MIN_PART_SIZE, math.ceil(size / MAX_PARTS / MiB) * MiB)


def ranges(start: int, total: int) -> list[tuple[int, int]]:
    """``[start, total)`` cut into parts, as inclusive ``(first, last)`` byte pairs."""
    part = part_size_for(total)
    return [(s, min(s + part, total) - 1) for s in range(start, total, part)]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class PositionalWriter:
    """A write-only file object over ``fd`` starting at ``offset``: what an SDK streams a
    download into. Each ``write`` lands at the next position with ``pwrite``, so parts of one
    file can be written by several threads at once; ``seek`` (some SDKs write chunks at
    explicit positions) is honoured; ``stop`` set by another part ends this one."""

    def __init__(
        self,
        fd: int,
        offset: int,
        on_write: Callable[[int, int], object],
        stop: threading.Event | None = None,
    ) -> None:
        self.fd, self.start, self.pos = fd, offset, offset
        self.on_write = on_write
        self.stop = stop

    def write(self, data: bytes) -> int:
        if self.stop is not None and self.stop.is_set():
            raise Stopped
        pwrite_all(self.fd, data, self.pos)
        self.on_write(self.pos, len(data))
        self.pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("only absolute seeks")
        self.pos = self.start + pos
        return pos

    def tell(self) -> int:
        return self.pos - self.start

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        return None
