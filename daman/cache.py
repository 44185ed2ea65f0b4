"""The local cache: files on disc, an SQLite index, an allocation, LRU eviction and pins.

::

    local_dir/
      index.sqlite3            entries (one row per cached key), journal, totals
      objects/<sha256(key)>.<random>      one file per cached version of a key
      tmp/<pid>-<random>.incomplete       files being written (downloads, pushes), each
                                          flock-ed by its writer from birth to removal
      locks/ab.lock            256 lock stripes; a key's stripe is ab = sha256(key)[:2]

Invariants, restored on open after any crash:

- a row in ``entries`` exists only while its file exists with the recorded size, and
  ``totals.size`` (kept by triggers) equals the sum of the entries' sizes;
- a file in ``objects/`` without a row is listed in ``journal`` until it is unlinked: files
  are journaled *before* they are renamed into place and when their row is deleted, so a
  SIGKILL at any point leaves only files the next open can find without scanning the cache;
- once an operation has finished, ``totals.size <= allocated_space``. Eviction deletes the
  least recently used rows that are not persisted, in small batches (never a scan), inside
  the transaction that adds the new entry, so concurrent processes cannot over-commit.

Several processes may share one ``local_dir`` on a local filesystem: SQLite (WAL mode)
serialises index writes and a per-key file lock stops two of them downloading the same key
at once. Do not put ``local_dir`` on a network filesystem (SQLite's WAL needs shared memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import filelock

from .keys import key_digest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    accessed REAL NOT NULL,
    persist INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (persist, accessed);
CREATE TABLE IF NOT EXISTS journal (file TEXT PRIMARY KEY, key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    size INTEGER NOT NULL,
    count INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS entries_insert AFTER INSERT ON entries BEGIN
    UPDATE totals SET size = size + NEW.size, count = count + 1;
END;
CREATE TRIGGER IF NOT EXISTS entries_delete AFTER DELETE ON entries BEGIN
    UPDATE totals SET size = size - OLD.size, count = count - 1;
END;
CREATE TRIGGER IF NOT EXISTS entries_resize AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET size = size - OLD.size + NEW.size;
END;
"""
_COLUMNS = "key, file, size, etag, sha256, created, accessed, persist"
_EVICT_BATCH = 64
_TEMP_GRACE_SECONDS = 10
_LOCK_STRIPES_HEX = 2  # 256 stripes


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size: int
    etag: str
    sha256: str
    created: float
    accessed: float
    persist: bool


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    used: int
    allocated: int | None
    count: int


def _remove_if_abandoned(tmp: Path, grace: float = 0.0) -> None:
    """Unlink a temp file that nobody holds a lock on (its writer finished or died). A
    ``grace`` spares files younger than that, whose writer may not have locked them yet."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        if grace and time.time() - os.fstat(fd).st_mtime < grace:
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # in use
    else:
        tmp.unlink(missing_ok=True)
    finally:
        os.close(fd)


class _DoesNotFit(Exception):
    pass


class Cache:
    """One ``local_dir``. Thread-safe; several processes may open the same folder."""

    def __init__(self, root: str | os.PathLike[str], allocated_space: int | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.allocated_space = allocated_space
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        for folder in (self.objects_dir, self.tmp_dir, self.locks_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # The two UPDATEs (no net change) write the first frame of a new WAL now: SQLite syncs
        # a new WAL's header even with synchronous=NORMAL, and that fsync, if it came at the
        # first commit after a push or a download wrote a large file, would wait (ext4,
        # data=ordered) for the whole file to reach the disc: 0.25 s for 256 MiB.
        self._db().executescript(
            f"BEGIN IMMEDIATE;\n{_SCHEMA}\nUPDATE totals SET count = count + 1;\n"
            "UPDATE totals SET count = count - 1;\nCOMMIT;"
        )
        self.recover()
        self.evict_until_fits()

    # -- plumbing ------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.root / "index.sqlite3", timeout=60, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
            db.execute("PRAGMA busy_timeout=60000")
            for attempt in range(600):
                try:
                    # Switching a new database to WAL takes a lock that SQLite does not wait
                    # for: processes opening a fresh local_dir together retry here.
                    db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 599:
                        raise
                    time.sleep(0.05)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrades
        that could deadlock between processes)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # also when COMMIT itself failed (disc full, I/O error)
                db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def key_lock(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """Hold ``key``'s lock stripe across threads and processes; re-entrant per thread.

        With ``blocking=False`` yields whether the lock was had instead of waiting."""
        stripe = key_digest(key)[:_LOCK_STRIPES_HEX]
        held: dict[str, list[object]] = self._local.__dict__.setdefault("held", {})
        if stripe in held:
            held[stripe][1] += 1  # type: ignore[operator]
            try:
                yield True
            finally:
                held[stripe][1] -= 1  # type: ignore[operator]
            return
        lock = filelock.FileLock(
            self.locks_dir / f"{stripe}.lock", thread_local=False, preserve_lock_file=True
        )
        try:
            lock.acquire(timeout=-1 if blocking else 0)
        except filelock.Timeout:
            yield False
            return
        held[stripe] = [lock, 0]
        try:
            yield True
        finally:
            del held[stripe]
            lock.release()

    @contextlib.contextmanager
    def temp_file(self) -> Iterator[Path]:
        """A new empty file in ``tmp/`` for a download or a push, removed afterwards unless
        ``add`` moved it into the cache. It is flock-ed while in use, so that recovery in
        another process (or container) never deletes it; a crashed owner's lock is gone."""
        name = f"{os.getpid()}-{uuid.uuid4().hex}"
        path = self.tmp_dir / f"{name}.incomplete"
        born = self.tmp_dir / f"{name}.new"
        # Created and locked under a name recovery does not look at, then renamed: a file
        # named *.incomplete is locked from birth, so an unlocked one is abandoned.
        fd = os.open(born, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(born, path)
            yield path
        finally:
            born.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            os.close(fd)

    def _entry(self, row: tuple) -> CacheEntry:
        key, file, size, etag, sha256, created, accessed, persist = row
        return CacheEntry(
            key, self.objects_dir / file, size, etag, sha256, created, accessed, bool(persist)
        )

    def _unlink_journaled(self, files: list[str]) -> None:
        for file in files:
            (self.objects_dir / file).unlink(missing_ok=True)
        if files:
            with self._write() as db:
                db.executemany("DELETE FROM journal WHERE file = ?", [(f,) for f in files])

    # -- reading -------------------------------------------------------------------------

    def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key`` if its file is whole (size check on every hit), else None;
        a row whose file is missing or the wrong size is dropped on the way."""
        row = self._db().execute(f"SELECT {_COLUMNS} FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        entry = self._entry(row)
        try:
            actual = entry.path.stat().st_size
        except FileNotFoundError:
            actual = -1
        if actual != entry.size:
            self.discard(entry)
            return None
        return entry

    def discard(self, entry: CacheEntry) -> None:
        """Forget ``entry`` (a damaged copy) unless its key has moved on to another file
        meanwhile (a file name is unique to one version, so journaling it is safe either way)."""
        with self._write() as db:
            files = self._forget(db, [(entry.key, entry.path.name)])
        self._unlink_journaled(files)

    def _forget(self, db: sqlite3.Connection, rows: list[tuple[str, str]]) -> list[str]:
        """Delete these ``(key, file)`` entries inside the open transaction; their files are
        journaled, for unlinking after the commit. Returns the files."""
        db.executemany("DELETE FROM entries WHERE key = ? AND file = ?", rows)
        db.executemany(
            "INSERT OR IGNORE INTO journal (file, key) VALUES (?, ?)", [(f, k) for k, f in rows]
        )
        return [file for _, file in rows]

    def states(self, keys: list[str]) -> dict[str, bool]:
        """``{key: persist}`` for those of ``keys`` that are cached (one query per 500)."""
        found: dict[str, bool] = {}
        db = self._db()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, persist in db.execute(
                f"SELECT key, persist FROM entries WHERE key IN ({marks})", chunk
            ):
                found[key] = bool(persist)
        return found

    def entries(self) -> list[CacheEntry]:
        rows = self._db().execute(f"SELECT {_COLUMNS} FROM entries ORDER BY accessed DESC")
        return [self._entry(row) for row in rows]

    def eviction_candidates(self, limit: int) -> list[CacheEntry]:
        """The entries eviction would remove next, least recently used first: what the next
        push or pull that needs room takes (persisted entries never are)."""
        rows = self._db().execute(
            f"SELECT {_COLUMNS} FROM entries WHERE persist = 0 ORDER BY accessed LIMIT ?",
            (limit,),
        )
        return [self._entry(row) for row in rows]

    def persisted_size(self) -> int:
        """Bytes held by persisted entries: the part of the allocation eviction cannot free.
        Reads the persisted rows only (the LRU index starts with ``persist``)."""
        (size,) = (
            self._db()
            .execute("SELECT COALESCE(SUM(size), 0) FROM entries WHERE persist = 1")
            .fetchone()
        )
        return size

    def usage(self) -> CacheUsage:
        size, count = self._db().execute("SELECT size, count FROM totals").fetchone()
        return CacheUsage(used=size, allocated=self.allocated_space, count=count)

    # -- writing -------------------------------------------------------------------------

    def touch(self, key: str) -> None:
        with self._write() as db:
            db.execute("UPDATE entries SET accessed = ? WHERE key = ?", (time.time(), key))

    def add(
        self, key: str, tmp_path: Path, *, etag: str, sha256: str, persist: bool = False
    ) -> CacheEntry | None:
        """Move the finished file ``tmp_path`` into the cache as ``key``'s entry.

        Evicts least recently used, non-persisted entries to make room. Returns None, and
        leaves ``tmp_path`` where it is, when the file cannot fit even so. An entry that was
        persisted stays persisted when it is replaced."""
        size = tmp_path.stat().st_size
        if self.allocated_space is not None and size > self.allocated_space:
            self.remove(key, unless_etag=etag)  # superseded by the version that does not fit
            return None
        file = f"{key_digest(key)}.{uuid.uuid4().hex[:12]}"
        final = self.objects_dir / file
        with self.key_lock(key):
            with self._write() as db:  # journaled first: a crash after the rename leaves no orphan
                db.execute("INSERT INTO journal (file, key) VALUES (?, ?)", (file, key))
            try:
                with self._write() as db:
                    old = db.execute(
                        "SELECT file, size, persist FROM entries WHERE key = ?", (key,)
                    ).fetchone()
                    evicted = self._evict(db, size - (old[1] if old else 0), exclude=key)
                    os.replace(tmp_path, final)
                    now = time.time()
                    persist = persist or bool(old and old[2])
                    if old:
                        db.execute(
                            "UPDATE entries SET file = ?, size = ?, etag = ?, sha256 = ?, "
                            "created = ?, accessed = ?, persist = ? WHERE key = ?",
                            (file, size, etag, sha256, now, now, int(persist), key),
                        )
                        db.execute(
                            "INSERT OR IGNORE INTO journal (file, key) VALUES (?, ?)", (old[0], key)
                        )
                        evicted.append(old[0])
                    else:
                        db.execute(
                            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (key, file, size, etag, sha256, now, now, int(persist)),
                        )
                    db.execute("DELETE FROM journal WHERE file = ?", (file,))
            except BaseException as exc:
                if final.exists() and not tmp_path.exists():
                    os.replace(final, tmp_path)  # give the caller its file back
                with self._write() as db:
                    db.execute("DELETE FROM journal WHERE file = ?", (file,))
                if isinstance(exc, _DoesNotFit):
                    # A cached older version is superseded by the one that did not fit:
                    # keeping it would let a pull without the current-check serve stale data.
                    self.remove(key, unless_etag=etag)
                    return None
                raise
        self._unlink_journaled(evicted)
        return CacheEntry(key, final, size, etag, sha256, now, now, persist)

    def _evict(
        self, db: sqlite3.Connection, need: int, exclude: str, *, best_effort: bool = False
    ) -> list[str]:
        """Forget LRU non-persisted entries (not ``exclude``) until ``need`` more bytes fit,
        in batches; returns their files, journaled for unlinking after commit. When even
        that is not enough: stop (``best_effort``) or raise ``_DoesNotFit``, which rolls the
        transaction back."""
        if self.allocated_space is None:
            return []
        (used,) = db.execute("SELECT size FROM totals").fetchone()
        over = used + need - self.allocated_space
        evicted: list[str] = []
        while over > 0:
            rows = db.execute(
                "SELECT key, file, size FROM entries WHERE persist = 0 AND key != ? "
                "ORDER BY accessed LIMIT ?",
                (exclude, _EVICT_BATCH),
            ).fetchall()
            if not rows:
                if best_effort:
                    break
                raise _DoesNotFit
            chosen = []
            for key, file, size in rows:
                chosen.append((key, file))
                over -= size
                if over <= 0:
                    break
            evicted += self._forget(db, chosen)
        return evicted

    def remove(self, key: str, *, unless_etag: str | None = None) -> bool:
        """Delete ``key``'s entry and file (persisted or not); False if it was not cached.
        With ``unless_etag``, only an entry holding another version is deleted."""
        with self.key_lock(key), self._write() as db:
            row = db.execute(
                "SELECT file FROM entries WHERE key = ? AND etag != ?", (key, unless_etag or "")
            ).fetchone()
            if row is None:
                return False
            files = self._forget(db, [(key, row[0])])
        self._unlink_journaled(files)
        return True

    def set_persist(self, key: str, persist: bool) -> bool:
        """Pin or unpin ``key``; False if it is not cached."""
        with self._write() as db:
            changed = db.execute(
                "UPDATE entries SET persist = ? WHERE key = ?", (int(persist), key)
            ).rowcount
        return bool(changed)

    def evict_until_fits(self, extra: int = 0) -> int:
        """Evict LRU non-persisted entries until ``extra`` more bytes would fit; bytes freed.

        Used after the allocation shrank. Evicts what it can when even that is not enough
        (persisted entries are only removed by an explicit delete)."""
        if self.allocated_space is None:
            return 0
        with self._write() as db:
            (before,) = db.execute("SELECT size FROM totals").fetchone()
            files = self._evict(db, extra, exclude="", best_effort=True)
            (after,) = db.execute("SELECT size FROM totals").fetchone()
        self._unlink_journaled(files)
        return before - after

    def clear(self) -> int:
        """Evict every entry that is not persisted; bytes freed."""
        with self._write() as db:
            rows = db.execute("SELECT key, file, size FROM entries WHERE persist = 0").fetchall()
            files = self._forget(db, [(key, file) for key, file, _ in rows])
        self._unlink_journaled(files)
        return sum(size for _, _, size in rows)

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish what crashed processes left: journaled files without a row are unlinked
        (unless their key's lock is held: that add may still be in progress), and temp files
        no writer holds a lock on are removed. Cheap: no scan of the cache."""
        pending = self._db().execute("SELECT file, key FROM journal").fetchall()
        for file, key in pending:
            with self.key_lock(key, blocking=False) as locked:
                if not locked:
                    continue
                referenced = (
                    self._db().execute("SELECT 1 FROM entries WHERE file = ?", (file,)).fetchone()
                )
                if referenced:
                    with self._write() as db:
                        db.execute("DELETE FROM journal WHERE file = ?", (file,))
                else:
                    self._unlink_journaled([file])
        for tmp in self.tmp_dir.glob("*.incomplete"):
            _remove_if_abandoned(tmp)
        for born in self.tmp_dir.glob("*.new"):  # crashed between creating and renaming
            _remove_if_abandoned(born, grace=_TEMP_GRACE_SECONDS)

    def reconcile(self) -> dict[str, int]:
        """Full check (a scan of the index and the folder): drop rows whose file is missing
        or has the wrong size, unlink files nothing refers to. Returns what it repaired."""
        self.recover()
        dropped = 0
        for entry in self.entries():
            try:
                ok = entry.path.stat().st_size == entry.size
            except FileNotFoundError:
                ok = False
            if not ok:
                self.discard(entry)
                dropped += 1
        db = self._db()
        referenced = {row[0] for row in db.execute("SELECT file FROM entries")}
        journaled = {row[0] for row in db.execute("SELECT file FROM journal")}
        orphans = 0
        for path in self.objects_dir.iterdir():
            if path.name not in referenced and path.name not in journaled:
                # Re-check under the index lock: an add may have committed since we looked.
                with self._write() as db:
                    still_orphan = not db.execute(
                        "SELECT 1 FROM entries WHERE file = ? UNION ALL "
                        "SELECT 1 FROM journal WHERE file = ?",
                        (path.name, path.name),
                    ).fetchone()
                    if still_orphan:
                        path.unlink(missing_ok=True)
                        orphans += 1
        return {"dropped_rows": dropped, "orphan_files": orphans}

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
