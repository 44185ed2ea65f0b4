"""What the cloud backends (``s3.py``, ``gcs.py``, ``azure.py``) share about moving one
object in parts: a pool whose transfers stop at their first failing part, the part sizes, a
download that starts over when the object is replaced under it, and a file object that SDKs
stream downloads into at positions."""

from __future__ import annotations

import abc
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DamanError, KeptChangingError
from .base import ObjectInfo, Progress, Store, Written, _no_progress, _no_range

T = TypeVar("T")
MiB = 1024 * 1024
TRANSFER_THREADS = 8
MIN_PART_SIZE = 8 * MiB
MAX_PARTS = 10_000
_DOWNLOAD_STARTS = 3


class ObjectChangedError(DamanError):
    """The object was replaced while we read it in parts; the download starts over."""


class Stopped(Exception):
    """Another part failed (or the user pressed Ctrl-C): this part stops early."""


def new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="daman-transfer")


class Parts:
    """The parts of one transfer, started at once on a pool shared with other transfers and
    awaited later. On the first failure (or Ctrl-C in the waiting thread) ``wait`` cancels
    the parts not yet started and tells running ones to stop (``stop``), so an error surfaces
    at once rather than after the whole transfer; nothing returns before every started part
    has ended, so the caller may close the file they write to or read from. ``failed`` tells
    a caller streaming alongside that a part failed."""

    def __init__(self, pool: ThreadPoolExecutor, tasks: list[Callable[[threading.Event], T]]):
        self.stop = threading.Event()
        self.failed = threading.Event()
        self.futures = [pool.submit(self._run, task) for task in tasks]

    def _run(self, task: Callable[[threading.Event], T]) -> T:
        if self.stop.is_set():
            raise Stopped  # stopped before this part's turn came: it never starts
        try:
            return task(self.stop)
        except BaseException:
            self.failed.set()
            raise

    def wait(self) -> list[Any]:
        """The parts' results in order, or the failure that stopped them."""
        try:
            done, _ = wait(self.futures, return_when=FIRST_EXCEPTION)
            failed = any(future.exception() is not None for future in done)
        except BaseException:
            self.cancel()
            raise
        if failed:
            self.cancel()
            errors = [
                future.exception()
                for future in self.futures
                if not future.cancelled() and future.exception() is not None
            ]  # the parts told to stop say Stopped: the cause is another part's error
            raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])  # type: ignore[misc]
        return [future.result() for future in self.futures]

    def cancel(self) -> None:
        """Stop: cancel what has not started, and wait until what has is over, through any
        Ctrl-C meanwhile (raised once they are: a running part still reads or writes the
        caller's file, which the caller closes next). Told to stop, parts end within a chunk."""
        self.stop.set()
        for future in self.futures:
            future.cancel()
        interrupted: KeyboardInterrupt | None = None
        while True:
            try:
                wait(self.futures)
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted


def run_parallel(
    tasks: list[Callable[[threading.Event], T]], pool: ThreadPoolExecutor | None = None
) -> list[T]:
    """Run ``tasks`` on ``pool`` (a pool of TRANSFER_THREADS threads made for them, if none)
    and return their results in order; see :class:`Parts`."""
    if pool is None:
        with new_pool() as own:
            return run_parallel(tasks, own)
    return Parts(pool, tasks).wait()


def part_size_for(size: int) -> int:
    """Parts of at least 8 MiB, few enough for S3's 10,000-part limit, in whole MiB."""
    return max(MIN_PART_SIZE, math.ceil(size / MAX_PARTS / MiB) * MiB)


def split(size: int, start: int = 0) -> list[tuple[int, int]]:
    """``(offset, length)`` of the parts of ``size`` bytes from ``start``: as many parts of at
    least ``part_size_for(size)`` as fit (one at least), of equal size but the last, which is
    at most one byte per part smaller. Never a tiny last part, which would cost a request
    of its own for a few bytes."""
    count = max(1, size // part_size_for(size))
    part = -(-size // count)
    return [(start + offset, min(part, size - offset)) for offset in range(0, size, part)]


def ranges(start: int, total: int) -> list[tuple[int, int]]:
    """``[start, total)`` cut into parts (see ``split``), as inclusive ``(first, last)``
    byte pairs."""
    return [(first, first + n - 1) for first, n in split(total - start, start=start)]


def restarting_on_change(key: str, get_once: Callable[[], ObjectInfo]) -> ObjectInfo:
    """``get_once()``, started over (up to three times in all) when the object was replaced
    while it was read in parts: every part of a download is of one version."""
    for attempt in range(1, _DOWNLOAD_STARTS + 1):
        try:
            return get_once()
        except ObjectChangedError:
            if attempt == _DOWNLOAD_STARTS:
                raise KeptChangingError(
                    f"{key!r} kept changing while it was downloaded. Try again."
                ) from None
    raise AssertionError("unreachable")


class PartedStore(Store):
    """A cloud store whose ``get`` reads an object in parts: each backend reads it once
    (``_get_once``, raising ObjectChangedError when it is replaced under it), and every
    backend starts over the same way (:func:`restarting_on_change`)."""

    def get(
        self,
        key: str,
        dest: Path,
        *,
        progress: Progress = _no_progress,
        on_size: Progress = _no_progress,
        on_written: Written = _no_range,
        **pin: str | None,
    ) -> ObjectInfo:
        """:meth:`Store.get`; ``pin`` is what a backend reads one version with (S3's
        ``version``)."""
        return restarting_on_change(
            key, lambda: self._get_once(key, dest, progress, on_size, on_written, **pin)
        )

    @abc.abstractmethod
    def _get_once(
        self, key: str, dest: Path, progress: Progress, on_size: Progress, on_written: Written
    ) -> ObjectInfo:
        """One reading of ``key`` into ``dest``, from its first byte (a backend that reads
        versions takes ``pin``'s keywords too)."""


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
