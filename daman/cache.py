"""The local cache: files on disc, an SQLite index, an allocation, LRU eviction and pins.

::

    local_dir/
      index.sqlite3            entries (one row per cached (key, version), naming its
                               store, and for a small file the sha256 of all its bytes),
                               journal, totals
      objects/<sha256(key)>.<random>      the file of a key's current version, as last seen
      objects/<sha256(key NUL version)>.<random>
                                          the file of one version pulled by its id
      tmp/<pid>-<random>.incomplete       files being written (downloads, pushes), each
                                          flock-ed by its writer from birth to removal
      tmp/<objects file>.adding           the mark of a file ``add`` is moving into
                                          objects/: a hard link to its key's lock stripe,
                                          locked while the add holds the key
      locks/ab.lock            256 lock stripes; a key's stripe is ab = sha256(key)[:2]

An entry is a key's *current* version (``version = ''``: the copy a pull of the key uses when
the store says it is still current; a newer one replaces it) or one version of the key pulled
by its id (``version = ID``: a version never changes, so its copy needs no check). Both kinds
are evicted, pinned, counted and verified alike.

Least recently used means least recently *used*, not oldest by the wall clock: every use takes
the next number of a sequence kept in the index (``totals.seq``), so a clock that jumps (a
laptop corrected by NTP, a VM resumed) cannot reorder eviction. A cache hit (``touch``) costs no
write lock: its use is kept in memory, in order, and written with the process's next write to
the index (so always before this process evicts anything), after ``TOUCH_BATCH`` hits, at most
``TOUCH_SECONDS`` after it happened, before entries are listed in LRU order, and at ``close``
and exit. What that relaxes: another process sharing ``local_dir`` sees a hit up to
``TOUCH_SECONDS`` (or ``TOUCH_BATCH`` hits) late, and numbered when it is written rather than
when it happened, so it may evict an entry this process used within that window; a process
that ends without exit handlers (``os._exit``, a kill) loses its last unwritten hits.

Invariants, restored on open after any crash:

- a row in ``entries`` exists only while its file exists with the recorded size, and
  ``totals.size`` (kept by triggers) equals the sum of the entries' sizes;
- a file in ``objects/`` without a row is listed in ``journal`` until it is unlinked, or has
  a ``tmp/<file>.adding`` mark: a file being added gets that mark (its key's locked stripe)
  before it is renamed into place and loses it once the row is committed (one write
  transaction), files whose row is deleted are journaled in the same transaction, so a
  SIGKILL at any point leaves only files the next open can find without scanning the cache
  (a mark whose stripe another process holds is left to a later open);
- a file in ``objects/`` is locked only by zero-copy mappings (shared) and by the process
  forgetting it (exclusive, from its transaction until the unlink): a lock anything else
  held would pass for a mapping, and keep the file as ``retired``;
- once an operation has finished, ``totals.size <= allocated_space``. Eviction deletes the
  least recently used rows that are not persisted, in small batches (never a scan), inside
  the transaction that adds the new entry, so concurrent processes cannot over-commit.

Several processes may share one ``local_dir`` on a local filesystem: SQLite (WAL mode)
serialises index writes and a per-key file lock stops two of them downloading the same key
at once. Do not put ``local_dir`` on a network filesystem (SQLite's WAL needs shared memory).
A forked child never uses its parent's SQLite connections or locks (see ``forksafe``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from . import forksafe
from .errors import DamanError, LocalFileError, RepairWarning, map_os_error, os_errors, warn
from .keys import key_digest

_ENTRIES = """CREATE TABLE IF NOT EXISTS {name} (
        key TEXT NOT NULL,
        version TEXT NOT NULL DEFAULT '',  -- '': the key's current version; else a version id
        file TEXT NOT NULL,
        size INTEGER NOT NULL,
        etag TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        created REAL NOT NULL,
        accessed INTEGER NOT NULL,  -- totals.seq at the last use: LRU order, not a time
        persist INTEGER NOT NULL DEFAULT 0,
        store TEXT NOT NULL DEFAULT '',  -- the store it came from ('': adopted by any)
        file_sha256 TEXT NOT NULL DEFAULT '',  -- '<file> <sha256 of all its bytes>' or ''
        PRIMARY KEY (key, version)
    )"""
_SCHEMA = (
    _ENTRIES.format(name="entries"),
    "CREATE INDEX IF NOT EXISTS entries_lru ON entries (persist, accessed)",
    "CREATE TABLE IF NOT EXISTS journal (file TEXT PRIMARY KEY, key TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS totals (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        size INTEGER NOT NULL,
        count INTEGER NOT NULL,
        seq INTEGER NOT NULL DEFAULT 0
    )""",
    "INSERT OR IGNORE INTO totals (id, size, count) VALUES (0, 0, 0)",
    """CREATE TRIGGER IF NOT EXISTS entries_insert AFTER INSERT ON entries BEGIN
        UPDATE totals SET size = size + NEW.size, count = count + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_delete AFTER DELETE ON entries BEGIN
        UPDATE totals SET size = size - OLD.size, count = count - 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS entries_resize AFTER UPDATE OF size ON entries BEGIN
        UPDATE totals SET size = size - OLD.size + NEW.size;
    END""",
    # Versions that left the index while mapped (a zero-copy pull's arrays are alive): kept
    # on disc and counted against the allocation until their last mapping goes.
    "CREATE TABLE IF NOT EXISTS retired (file TEXT PRIMARY KEY, key TEXT NOT NULL, "
    "size INTEGER NOT NULL)",
    """CREATE TRIGGER IF NOT EXISTS retired_insert AFTER INSERT ON retired BEGIN
        UPDATE totals SET size = size + NEW.size;
    END""",
    """CREATE TRIGGER IF NOT EXISTS retired_delete AFTER DELETE ON retired BEGIN
        UPDATE totals SET size = size - OLD.size;
    END""",
)
_COLUMNS = "key, version, file, size, etag, sha256, created, accessed, persist, store"
SCHEMA_VERSION = 5
"""``PRAGMA user_version``: 0 = before the use sequence (``accessed`` held wall-clock times),
1 = before mapped versions were kept (``retired``), 2 = before entries named their store,
3 = one entry per key (before versions), 4 = before whole-file hashes (``file_sha256``).
Upgrades look at the columns, not at this number: a release before one sets it back."""
WHOLE_HASH_BYTES = 1024 * 1024
"""Files up to this size get the sha256 of all their bytes recorded when added (about 3 us
for a small one): ``verify`` then checks them with one read and one hash, footer included,
without parsing it. A larger file's check is the hashing of its payload anyway."""
_MARKS = ", ".join("?" * len(_COLUMNS.split(", ")))
CURRENT = ""
"""The ``version`` of a key's current-version entry."""
_MINE = "(? IN (store, '') OR store = '')"
"""The rows a handle serves (its ``store`` the parameter): its store's, and those added by a
handle naming no store; a handle naming none (tools, tests) sees every row."""
_OBJECT_FILE = re.compile(r"[0-9a-f]{64}\.[0-9a-f]{12}")
"""The names ``add`` gives cached files: ``<sha256 of the key>.<random>``."""
_TEMP_FILE = re.compile(r"\d+-[0-9a-f]{32}\.(incomplete|new)")
"""The names ``temp_file`` gives: ``<pid>-<random>.incomplete`` (``.new`` until locked)."""
_ADDING = ".adding"
_ADDING_FILE = re.compile(r"([0-9a-f]{64}\.[0-9a-f]{12})\.adding")
"""``tmp/<objects file>.adding``: the mark of a file ``add`` is moving into ``objects/``."""
TOUCH_BATCH = 1000
"""Hits recorded in memory before they are written to the index."""
TOUCH_SECONDS = 1.0
"""The longest a hit stays unwritten (a timer writes it)."""
_DAMAGED = ("malformed", "not a database", "corrupt", "no such table", "no such column")
"""What SQLite says of an index that is damaged (or not daman's)."""
_EVICT_BATCH = 64
_CLAIMS_PER_TRANSACTION = _EVICT_BATCH
"""Files one transaction forgets at most when it may stop early (``clear``, shrinking to
fit): each stays open and locked until it is unlinked, and a process may open 1,024 files
on Linux, 256 on macOS, fewer under a tight ``ulimit -n``."""
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
    """When this version was cached (wall clock, for people to read)."""
    accessed: int
    """Its place in the order of use (higher: used more recently); not a time."""
    persist: bool
    store: str = ""
    """The store it came from (``Cache.store`` of the handle that added it); '' if unknown."""
    version: str = CURRENT
    """``""``: the key's current version, as last seen; else the id of the version held."""


class CachedCopy(NamedTuple):
    """A cached file as ``verify`` checks it: a plain row (thousands are listed at once, and
    an entry object with a Path cost as much as the check of a small file)."""

    key: str
    path: str
    size: int
    sha256: str
    file_sha256: str
    """The sha256 of all the file's bytes, recorded when it was added; '' if none was (a
    large file, a row from an older daman or a rebuilt index)."""


_COPY_COLUMNS = "key, file, size, sha256, file_sha256"


def _copy(objects: str, row: tuple[str, str, int, str, str]) -> CachedCopy:
    key, file, size, sha256, tagged = row
    # The hash names its file: an older daman that replaces the row's file leaves the
    # column as it was, and the hash is then another file's.
    hashed_file, _, file_sha256 = tagged.partition(" ")
    path = os.path.join(objects, file)
    return CachedCopy(key, path, size, sha256, file_sha256 if hashed_file == file else "")


def _file_sha256(path: Path, size: int) -> str:
    """The sha256 of all the bytes of a file of at most ``WHOLE_HASH_BYTES`` (else '')."""
    if size > WHOLE_HASH_BYTES:
        return ""
    with open(path, "rb", buffering=0) as f:
        data = f.read(size + 1)
    return hashlib.sha256(data).hexdigest() if len(data) == size else ""


class Reconciled(NamedTuple):
    """What ``Cache.reconcile`` repaired (counts, and how many rows a rebuilt index got) and
    the copies it kept, for ``verify`` to hash."""

    repaired: dict[str, int | None]
    kept: list[CachedCopy]


@dataclasses.dataclass(frozen=True)
class CachedState:
    """What the cache holds of a key, as a listing needs it."""

    persist: bool
    etag: str
    """The version cached: compared with the store's to tell an outdated copy."""


@dataclasses.dataclass(frozen=True)
class CacheUsage:
    used: int
    allocated: int | None
    count: int


def _stripe(key: str) -> str:
    """The lock stripe of ``key``: its file is ``locks/<stripe>.lock``."""
    return key_digest(key)[:_LOCK_STRIPES_HEX]


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


def _advance_uses(db: sqlite3.Connection, count: int) -> int:
    """Take ``count`` numbers of the use sequence, inside the open transaction; the last one.
    (An UPDATE then a SELECT, not UPDATE ... RETURNING: that needs SQLite 3.35, newer than
    what Debian 11, RHEL 8 and 9 ship with their Pythons.)"""
    db.execute("UPDATE totals SET seq = seq + ?", (count,))
    (last,) = db.execute("SELECT seq FROM totals").fetchone()
    return last


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); None if none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class _DoesNotFit(Exception):
    pass


class _ThreadConnection:
    """A thread's connection to the index, the process that made it and the index file it
    opened. Let go unclosed (its thread ended, its cache was dropped), it is closed in the
    next fork-safe section, not by its finalizer: a close is a use of SQLite, and one run by
    a finalizer beside a fork left the child waiting for ever on SQLite's memory lock."""

    __slots__ = ("db", "index", "pid")

    def __init__(self, db: sqlite3.Connection, index: tuple[int, int] | None) -> None:
        self.db: sqlite3.Connection | None = db
        self.pid = os.getpid()
        self.index = index

    def close(self) -> None:
        """Close it now (inside a fork-safe section, or in a child before it has threads)."""
        db, self.db = self.db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def __del__(self) -> None:
        if self.db is not None:
            try:  # noqa: SIM105 - not contextlib: at interpreter exit, modules may be gone
                forksafe.close_later(self.db)
            except Exception:  # torn down: the OS closes it
                pass


class IndexDamagedError(LocalFileError):
    """The cache's index cannot be read; ``Cache.rebuild`` makes a new one."""


_open_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


@atexit.register
def _write_uses_at_exit() -> None:
    for cache in list(_open_caches):
        with contextlib.suppress(Exception):  # at exit: an index gone or damaged is no matter
            cache.flush_uses()


def _write_uses_later(cache: Cache) -> None:
    with contextlib.suppress(Exception):  # a timer's thread: the next write tries again
        cache.flush_uses()


class Cache:
    """One ``local_dir``. Thread-safe; several processes may open the same folder, and a
    forked child may go on using a cache its parent opened."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        allocated_space: int | None = None,
        *,
        store: str = "",
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self.allocated_space = allocated_space
        self.store = store
        """The store this handle serves: one ``local_dir`` may cache several stores (one
        allocation for all), and a key cached from one is never another's hit. '' (tools,
        tests): every store's entries."""
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.index_path = self.root / "index.sqlite3"
        with os_errors(f"local_dir {self.root}", "Choose another with dm_configure --local_dir"):
            for folder in (self.objects_dir, self.tmp_dir, self.locks_dir):
                folder.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._stripes: dict[str, threading.Lock] = {}
        self._stripes_lock = threading.Lock()
        self._temp_locks: dict[str, int] = {}
        """Temp files this process holds the lock of (``temp_file``): path -> descriptor."""
        self._uses: dict[tuple[str, str], None] = {}
        """Entries used (``touch``: key, version) and not yet written, oldest use first."""
        self._uses_lock = threading.Lock()
        self._hits = 0  # touches since the uses were last written
        self._uses_timer: threading.Timer | None = None
        forksafe.at_fork_in_child(self, Cache._after_fork_in_child)
        _open_caches.add(self)
        try:
            with self._rebuilding(exclusive=False):  # not a half-rebuilt index
                self._migrate()
        except IndexDamagedError:
            self.rebuild()
        self.recover()
        self.evict_until_fits()

    # -- plumbing ------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Create or upgrade the index. The two UPDATEs (no net change) also write the first
        frame of a new WAL now: SQLite syncs a new WAL's header even with synchronous=NORMAL,
        and that fsync, if it came at the first commit after a push or a download wrote a
        large file, would wait (ext4, data=ordered) for the whole file to reach the disc."""
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if (
                version == 0
                and db.execute("SELECT 1 FROM sqlite_master WHERE name = 'totals'").fetchone()
            ):
                # An index made before the use sequence: ``accessed`` held times. Number the
                # entries in that order, so the upgrade keeps what was least recently used.
                db.execute("ALTER TABLE totals ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
                keys = db.execute("SELECT key FROM entries ORDER BY accessed, key").fetchall()
                db.executemany(
                    "UPDATE entries SET accessed = ? WHERE key = ?",
                    [(n, key) for n, (key,) in enumerate(keys, start=1)],
                )
                db.execute("UPDATE totals SET seq = ?", (len(keys),))
            columns = [row[1] for row in db.execute("PRAGMA table_info(entries)")]
            if columns and "store" not in columns:  # an index made before entries named it
                db.execute("ALTER TABLE entries ADD COLUMN store TEXT NOT NULL DEFAULT ''")
                # Most likely the store configured then and now: the first to open adopts them.
                db.execute("UPDATE entries SET store = ?", (self.store,))
            if columns and "file_sha256" not in columns:  # rows added before: verify parses
                db.execute("ALTER TABLE entries ADD COLUMN file_sha256 TEXT NOT NULL DEFAULT ''")
            if columns and "version" not in columns:
                # An index of one entry per key: every entry becomes its key's current
                # version. The primary key changes, so the table is made again (its rows
                # copied: totals, pins and the order of use stay as they were).
                for trigger in ("entries_insert", "entries_delete", "entries_resize"):
                    db.execute(f"DROP TRIGGER IF EXISTS {trigger}")  # totals do not change
                db.execute(_ENTRIES.format(name="entries_v4"))
                db.execute(
                    "INSERT INTO entries_v4 (key, version, file, size, etag, sha256, created, "
                    "accessed, persist, store) SELECT key, '', file, size, etag, sha256, "
                    "created, accessed, persist, store FROM entries"
                )
                db.execute("DROP TABLE entries")  # and its LRU index, made again below
                db.execute("ALTER TABLE entries_v4 RENAME TO entries")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("UPDATE totals SET count = count + 1")
            db.execute("UPDATE totals SET count = count - 1")

    def _after_fork_in_child(self) -> None:
        """In a forked child: the parent's connection and locks stay the parent's."""
        conn = self._local.__dict__.pop("conn", None)
        self._local.__dict__.pop("held", None)
        self._local.__dict__.pop("writing", None)
        if conn is not None:
            # Closing releases SQLite's in-process record of the parent's locks (the child
            # holds none: fcntl locks are not inherited); the parent's connections keep the
            # WAL from being checkpointed away by this close.
            conn.close()
        self._stripes = {}
        self._stripes_lock = threading.Lock()
        self._temp_locks = {}  # their locks are the parent's
        self._uses = {}  # the parent's hits: the parent writes them
        self._hits = 0
        self._uses_lock = threading.Lock()
        self._uses_timer = None  # threads do not survive a fork

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (made in this process: never one a parent made)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.db is None or conn.pid != os.getpid():
            return self._connect()
        if conn.index == _identity(self.index_path):
            return conn.db
        # Another process rebuilt the index (this one was set aside): use the new one once
        # that rebuild is over, its tables upgraded (an older build's rebuild makes its own,
        # without the columns added since).
        conn.close()
        with self._rebuilding(exclusive=False):
            db = self._connect()
            self._migrate()
        return db

    def _connect(self) -> sqlite3.Connection:
        """A new connection to the index, made this thread's."""
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
        self._local.conn = _ThreadConnection(db, _identity(self.index_path))
        return db

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, for statements that a fork must not interrupt; SQLite's
        errors come out as one-line daman errors."""
        with forksafe.sqlite_section():
            try:
                db = self._db()
                if db.in_transaction and not getattr(self._local, "writing", False):
                    # Left open by a write that Ctrl-C interrupted between two statements: it
                    # would hold the index's write lock (every other process waiting) for ever.
                    db.execute("ROLLBACK")
                yield db
            except sqlite3.Error as exc:
                raise self._index_error(exc) from exc

    def _index_error(self, exc: sqlite3.Error) -> DamanError:
        text = str(exc)
        where = f"the cache index {self.index_path}"
        if any(sign in text for sign in _DAMAGED):
            return IndexDamagedError(
                f"{where} is damaged ({text}). Run dm_verify (or dm.verify()) to rebuild it "
                "from the cached files."
            )
        if "locked" in text or "busy" in text:
            return LocalFileError(
                f"{where} stayed locked by another process for over a minute ({text}). Is a "
                "daman process stuck? Try again once it is done."
            )
        if "full" in text:
            return LocalFileError(
                f"no space left on the device holding {self.root} ({text}). Free some space, "
                "or move local_dir with dm_configure."
            )
        return LocalFileError(
            f"cannot use {where} ({text}). Check that local_dir is a local folder you may "
            "write to, or choose another with dm_configure --local_dir."
        )

    def rebuild(self, *, announce: bool = True) -> int:
        """Set a damaged index aside (``index.sqlite3.damaged-<time>-<pid>``) and make a new
        one from the cached files, whose footers name their keys; returns the entries kept.
        Pins, the order of use and the versions pulled by id (whose files are named for
        their version) are lost; the rest is checked against the store on the next pull.
        One process at a time: one that finds the index rebuilt meanwhile by another (the
        same damage seen by both) uses that one. The others' connections follow (``_db``)."""
        with self._rebuilding(exclusive=True):
            self.close()
            try:
                self._migrate()
                healthy = self._query("PRAGMA quick_check") == [("ok",)]
            except IndexDamagedError:
                healthy = False
            if healthy:
                return self.usage().count
            return self._rebuild(announce)

    @contextlib.contextmanager
    def _rebuilding(self, *, exclusive: bool) -> Iterator[None]:
        """``locks/rebuild.lock``: held exclusively by a rebuild, shared by a process that
        opens the index (or follows a rebuilt one), which so waits for a rebuild to end."""
        with forksafe.sqlite_section():  # no fork between opening and tracking
            fd = os.open(
                self.locks_dir / "rebuild.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            forksafe.track_fd(fd)  # a child forked meanwhile never holds the rebuild
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            forksafe.release_locked(fd)

    def _rebuild(self, announce: bool) -> int:
        from .serialize import StoredFile  # the one place the cache reads the file format

        self.close()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = f"{self.index_path.name}.damaged-{stamp}-{os.getpid()}"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.index_path}{suffix}", self.root / f"{aside}{suffix}")
        self._migrate()
        newest: dict[str, os.stat_result] = {}
        files: dict[str, tuple[str, str]] = {}  # key -> (file, sha256) of its newest copy
        for path in sorted(self.objects_dir.iterdir()):
            if not _OBJECT_FILE.fullmatch(path.name):
                continue  # not a name the cache gives: not ours
            try:
                with open(path, "rb") as f:
                    footer, st = StoredFile(f).footer, os.fstat(f.fileno())
                key = footer.key if key_digest(footer.key) == path.name[:64] else ""
            except (OSError, DamanError):
                key = ""
            if not key or (key in newest and newest[key].st_mtime >= st.st_mtime):
                path.unlink(missing_ok=True)  # no key can claim it, or an older copy
                continue
            if key in files:
                (self.objects_dir / files[key][0]).unlink(missing_ok=True)
            newest[key], files[key] = st, (path.name, footer.sha256)
        order = sorted(newest, key=lambda key: newest[key].st_mtime)
        superseded = []
        with self._write() as db:
            for use, key in enumerate(order, start=1):
                file, sha256 = files[key]
                st = newest[key]
                # No ETag: the next pull asks the store whether this copy is current.
                added = db.execute(  # the files do not say their store: the rebuilding one's
                    f"INSERT OR IGNORE INTO entries ({_COLUMNS}) "
                    "VALUES (?, '', ?, ?, '', ?, ?, ?, 0, ?)",
                    (key, file, st.st_size, sha256, st.st_mtime, use, self.store),
                ).rowcount
                if not added:  # a process that had the index open added a newer one since
                    superseded.append((file, key))
            db.executemany("INSERT OR IGNORE INTO journal (file, key) VALUES (?, ?)", superseded)
            db.execute("UPDATE totals SET seq = MAX(seq, ?)", (len(order),))
        self._unlink_journaled([file for file, _ in superseded])
        if announce:
            warn(
                f"the cache index in {self.root} was damaged: it was set aside as {aside} and "
                f"rebuilt from {len(order)} cached files (pins and the order of use were lost; "
                "pin entries again with dm_persist).",
                RepairWarning,
            )
        return len(order)

    def _query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self._connection() as db:
            return db.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrades
        that could deadlock between processes). The hits recorded in memory are written
        first, so that whatever the transaction decides (eviction) knows them."""
        with self._connection() as db:
            uses: list[tuple[str, str]] = []
            try:
                self._local.writing = True
                db.execute("BEGIN IMMEDIATE")
                uses = self._take_uses()
                if uses:
                    last = _advance_uses(db, len(uses))
                    db.executemany(
                        "UPDATE entries SET accessed = ? WHERE key = ? AND version = ?",
                        [(last - len(uses) + n, *use) for n, use in enumerate(uses, start=1)],
                    )
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # also when COMMIT itself failed (disc full, I/O error)
                    db.execute("ROLLBACK")
                self._release_claim()  # files it claimed stay as they were
                self._restore_uses(uses)
                raise
            finally:
                self._local.writing = False

    def _take_uses(self) -> list[tuple[str, str]]:
        with self._uses_lock:
            uses, self._uses, self._hits = list(self._uses), {}, 0
            if self._uses_timer is not None:
                self._uses_timer.cancel()
                self._uses_timer = None
        return uses

    def _restore_uses(self, uses: list[tuple[str, str]]) -> None:
        """Put back hits whose transaction rolled back (before any recorded since)."""
        if uses:
            with self._uses_lock:
                later, self._uses = self._uses, dict.fromkeys(uses)
                for key in later:
                    self._uses.pop(key, None)
                    self._uses[key] = None

    def _stripe_lock(self, stripe: str) -> threading.Lock:
        with self._stripes_lock:
            return self._stripes.setdefault(stripe, threading.Lock())

    @contextlib.contextmanager
    def key_lock(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """Hold ``key``'s lock stripe across threads and processes; re-entrant per thread.

        With ``blocking=False`` yields whether the lock was had instead of waiting. The
        process-wide part is an ``flock`` on ``locks/<stripe>.lock``, released by the kernel
        if the process dies; threads of one process queue on a lock of their own first."""
        stripe = _stripe(key)
        held: dict[str, int] = self._local.__dict__.setdefault("held", {})
        if stripe in held:
            held[stripe] += 1
            try:
                yield True
            finally:
                held[stripe] -= 1
            return
        in_process = self._stripe_lock(stripe)
        if not in_process.acquire(blocking):
            yield False
            return
        try:
            with forksafe.sqlite_section():  # no fork between opening and tracking
                fd = os.open(
                    self._stripe_file(stripe), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                forksafe.track_fd(fd)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    got = False
                else:
                    got = True
                if not got:
                    yield False
                    return
                held[stripe] = 0
                try:
                    yield True
                finally:
                    del held[stripe]
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                forksafe.untrack_fd(fd)
                os.close(fd)
        finally:
            in_process.release()

    def _stripe_file(self, stripe: str) -> Path:
        return self.locks_dir / f"{stripe}.lock"

    @contextlib.contextmanager
    def temp_file(self) -> Iterator[Path]:
        """A new empty file in ``tmp/`` for a download or a push, removed afterwards unless
        ``add`` moved it into the cache. It is flock-ed while in use, so that recovery in
        another process (or container) never deletes it; a crashed owner's lock is gone."""
        path = self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.incomplete"
        fd: int | None = None
        try:  # from the start: a Ctrl-C at any point leaves no file behind
            fd = self._create_locked(path)
            self._temp_locks[str(path)] = fd
            yield path
        finally:
            self._temp_locks.pop(str(path), None)
            path.unlink(missing_ok=True)
            if fd is not None:
                forksafe.untrack_fd(fd)
                os.close(fd)

    def _create_locked(self, path: Path) -> int:
        """A new empty file at ``path`` in ``tmp/``, flock-ed from the moment it bears that
        name: made and locked under a ``.new`` name (which recovery spares a few seconds),
        then renamed, so that an unlocked ``*.incomplete`` or ``*.adding`` is abandoned."""
        born = self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.new"
        fd: int | None = None
        try:  # from the start: a Ctrl-C at any point leaves no locked file, no descriptor
            with forksafe.sqlite_section():  # no fork between opening and tracking
                fd = os.open(born, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                forksafe.track_fd(fd)
            os.rename(born, path)
        except BaseException:
            born.unlink(missing_ok=True)
            if fd is not None:
                forksafe.untrack_fd(fd)
                os.close(fd)
            raise
        assert fd is not None
        return fd

    def _temp_lock(self, tmp: Path, *, held: bool) -> None:
        """Drop the writer's lock on a temp file of ours once ``add`` has renamed it into the
        cache (only mappings may lock a cached file), or take it again before the file goes
        back to ``tmp/``; the descriptor stays ``temp_file``'s to close."""
        fd = self._temp_locks.get(str(tmp))
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX if held else fcntl.LOCK_UN)

    def _entry(self, row: tuple) -> CacheEntry:
        key, version, file, size, etag, sha256, created, accessed, persist, store = row
        return CacheEntry(
            key, self.objects_dir / file, size, etag, sha256, created, accessed, bool(persist),
            store, version,
        )  # fmt: skip

    def _unlink_journaled(self, files: list[str]) -> None:
        for file in files:
            if _OBJECT_FILE.fullmatch(file):  # a damaged index cannot name a file elsewhere
                (self.objects_dir / file).unlink(missing_ok=True)
            self._release_claim(file)
        if files:
            with self._write() as db:
                db.executemany("DELETE FROM journal WHERE file = ?", [(f,) for f in files])

    def _claim(self, file: str) -> bool:
        """Lock a cached file exclusively, from the transaction that forgets it until it is
        unlinked, so that no mapping can start on it meanwhile; False if a mapping holds it
        (a zero-copy pull's arrays are alive somewhere): then it stays on disc."""
        claims: dict[str, int] = self._local.__dict__.setdefault("claims", {})
        if file in claims:
            return True
        try:
            with forksafe.sqlite_section():  # no fork between opening and tracking
                fd = os.open(self.objects_dir / file, os.O_RDONLY | os.O_CLOEXEC)
                forksafe.track_fd(fd)
        except FileNotFoundError:
            return True  # gone already: nothing maps it
        except OSError as exc:  # too many files open, above all
            raise map_os_error(exc, f"local_dir {self.root}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            forksafe.untrack_fd(fd)
            os.close(fd)
            return False
        claims[file] = fd
        return True

    def _release_claim(self, file: str | None = None) -> None:
        """Let go of one claimed file (or all of this thread's, when a transaction failed)."""
        claims: dict[str, int] = self._local.__dict__.setdefault("claims", {})
        for name in [file] if file is not None else list(claims):
            fd = claims.pop(name, None)
            if fd is not None:
                forksafe.release_locked(fd)

    def lease(self, entry: CacheEntry, f: IO[bytes]) -> bool:
        """Hold ``entry``'s file (open as ``f``) for a zero-copy load: a shared lock on ``f``
        that every mapping of it keeps (a mapping holds a duplicate of the descriptor), so
        that while any array from it is alive, in this process or a forked one, eviction,
        replacement and deletion leave the file on disc (and counted); the kernel drops the
        lock when the last mapping goes or the process dies. False (nothing held) if the
        entry moved on to another version meanwhile."""
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # waits while an eviction of it finishes
        current = self._query(
            "SELECT file FROM entries WHERE key = ? AND version = ?", (entry.key, entry.version)
        )
        if current and current[0][0] == entry.path.name:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False

    def _reclaim_retired(self) -> None:
        """Remove the retired versions whose last mapping has gone."""
        if self._query("SELECT 1 FROM retired LIMIT 1"):
            with self._write() as db:
                files = self._unmapped_retired(db)
            self._unlink_journaled(files)

    def _unmapped_retired(self, db: sqlite3.Connection) -> list[str]:
        """Inside the open transaction: forget the retired versions no mapping holds any
        more (they stop counting), journaled and claimed for unlinking after the commit."""
        rows = [
            (file, key) for file, key in db.execute("SELECT file, key FROM retired").fetchall()
            if self._claim(file)
        ]  # fmt: skip
        db.executemany("DELETE FROM retired WHERE file = ?", [(file,) for file, _ in rows])
        db.executemany("INSERT OR IGNORE INTO journal (file, key) VALUES (?, ?)", rows)
        return [file for file, _ in rows]

    def mapped(self) -> list[tuple[str, int, bool, str]]:
        """``(key, size, cached, version)`` of every cached file a zero-copy pull maps now, in
        any process: entries of the index (``cached``: a key's current version, or a version
        pulled by its id, ``version``), and files they replaced, kept until unmapped
        (``cached`` False)."""
        found = []
        rows = self._query(
            "SELECT key, file, size, 1, version FROM entries "
            "UNION ALL SELECT key, file, size, 0, '' FROM retired"
        )
        for key, file, size, current, version in rows:
            if self._claim(file):
                self._release_claim(file)
            else:
                found.append((key, size, bool(current), version))
        return found

    # -- reading -------------------------------------------------------------------------

    def get(self, key: str, version: str = CURRENT) -> CacheEntry | None:
        """The entry for ``key``'s current version (or for ``version``) if its file is whole
        (size check on every hit), else None; a row whose file is missing or the wrong size
        is dropped on the way."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM entries WHERE key = ? AND version = ? AND {_MINE}",
            (key, version, self.store),
        )
        if not rows:
            return None
        entry = self._entry(rows[0])
        try:
            actual = entry.path.stat().st_size
        except FileNotFoundError:
            actual = -1
        if actual != entry.size:
            self.discard(entry)
            return None
        return entry

    def discard(self, entry: CacheEntry | CachedCopy) -> bool:
        """Forget ``entry`` (a damaged copy) unless its key has moved on to another file
        meanwhile (a file name is unique to one version, so journaling it is safe either way).
        Whether its row was still there to drop."""
        row = (entry.key, os.path.basename(entry.path))
        with self._write() as db:
            dropped = bool(
                db.execute("SELECT 1 FROM entries WHERE key = ? AND file = ?", row).fetchone()
            )
            files = self._forget(db, [row])
        self._unlink_journaled(files)
        return dropped

    def _forget(self, db: sqlite3.Connection, rows: list[tuple[str, str]]) -> list[str]:
        """Delete these ``(key, file)`` entries inside the open transaction; their files are
        journaled (and claimed), for unlinking after the commit, except those a mapping holds:
        retired, kept and counted until unmapped. Returns the files to unlink."""
        unlink, retire = [], []
        for key, file in rows:
            (unlink if self._claim(file) else retire).append((key, file))
        db.executemany(
            "INSERT OR IGNORE INTO retired (file, key, size) SELECT file, key, size FROM entries "
            "WHERE key = ? AND file = ?",
            retire,
        )
        db.executemany("DELETE FROM entries WHERE key = ? AND file = ?", rows)
        db.executemany(
            "INSERT OR IGNORE INTO journal (file, key) VALUES (?, ?)", [(f, k) for k, f in unlink]
        )
        return [file for _, file in unlink]

    def copies_of(self, key: str) -> list[CachedCopy]:
        """Every cached file of ``key`` (its current version and versions by id), as
        ``verify`` checks them."""
        rows = self._query(
            f"SELECT {_COPY_COLUMNS} FROM entries WHERE key = ? AND {_MINE} ORDER BY version",
            (key, self.store),
        )
        return [_copy(str(self.objects_dir), row) for row in rows]

    def states(self, keys: list[str]) -> dict[str, CachedState]:
        """What is cached of ``keys``' current versions (those that are): pinned or not,
        which version (one query per 500 keys)."""
        found: dict[str, CachedState] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, persist, etag in self._query(
                f"SELECT key, persist, etag FROM entries WHERE key IN ({marks}) "
                f"AND version = '' AND {_MINE}",
                [*chunk, self.store],
            ):
                found[key] = CachedState(bool(persist), etag)
        return found

    def states_under(self, prefix: str) -> dict[str, CachedState]:
        """What is cached of the keys starting with ``prefix`` (one range read of the
        primary key, as a listing of that prefix needs it)."""
        sql = f"SELECT key, persist, etag FROM entries WHERE version = '' AND {_MINE}"
        params: tuple[str, ...] = (self.store,)
        if prefix:
            sql += " AND key >= ?"  # UTF-8 text compares as code points: a range
            params += (prefix,)
            following = ord(prefix[-1]) + 1
            if 0xD800 <= following <= 0xDFFF:  # surrogates are not text: the next is U+E000
                following = 0xE000
            if following <= 0x10FFFF:
                sql += " AND key < ?"
                params += (prefix[:-1] + chr(following),)
        return {
            key: CachedState(bool(persist), etag)
            for key, persist, etag in self._query(sql, params)
            if key.startswith(prefix)
        }

    def entries(self) -> list[CacheEntry]:
        self.flush_uses()  # listed in the order of use: this process's hits included
        rows = self._query(f"SELECT {_COLUMNS} FROM entries ORDER BY accessed DESC")
        return [self._entry(row) for row in rows]

    def eviction_candidates(self, limit: int) -> list[CacheEntry]:
        """The entries eviction would remove next, least recently used first: what the next
        push or pull that needs room takes (persisted entries never are)."""
        self.flush_uses()
        rows = self._query(
            f"SELECT {_COLUMNS} FROM entries WHERE persist = 0 ORDER BY accessed LIMIT ?",
            (limit,),
        )
        return [self._entry(row) for row in rows]

    def persisted_entries(self) -> list[CacheEntry]:
        """The persisted entries, most recently used first: the LRU index starts with
        ``persist``, so this reads those rows only."""
        self.flush_uses()
        rows = self._query(
            f"SELECT {_COLUMNS} FROM entries WHERE persist = 1 ORDER BY accessed DESC"
        )
        return [self._entry(row) for row in rows]

    def persisted_size(self) -> int:
        """Bytes held by persisted entries: the part of the allocation eviction cannot free.
        Reads the persisted rows only (the LRU index starts with ``persist``)."""
        ((size,),) = self._query("SELECT COALESCE(SUM(size), 0) FROM entries WHERE persist = 1")
        return size

    def usage(self) -> CacheUsage:
        ((size, count),) = self._query("SELECT size, count FROM totals")
        return CacheUsage(used=size, allocated=self.allocated_space, count=count)

    # -- writing -------------------------------------------------------------------------

    def touch(self, key: str, version: str = CURRENT) -> None:
        """Record a use of ``key``'s entry (a cache hit) for LRU eviction, without a write to
        the index now: see the module's docstring for when it is written."""
        use = (key, version)
        with self._uses_lock:
            self._uses.pop(use, None)
            self._uses[use] = None
            self._hits += 1
            due = self._hits >= TOUCH_BATCH
            if not due and self._uses_timer is None:
                # The timer holds the cache: hits of a cache dropped unclosed are written too.
                timer = threading.Timer(TOUCH_SECONDS, _write_uses_later, (self,))
                timer.daemon = True  # never keeps the interpreter from exiting
                timer.name = "daman-uses"
                self._uses_timer = timer
                timer.start()
        if due:
            self.flush_uses()

    def flush_uses(self) -> None:
        """Write the hits recorded in memory to the index (one write transaction; nothing to
        do when there are none)."""
        if self._uses:
            with self._write():
                pass  # _write writes them first

    def add(
        self,
        key: str,
        tmp_path: Path,
        *,
        etag: str,
        sha256: str,
        persist: bool = False,
        evict: bool = True,
        version: str = CURRENT,
    ) -> CacheEntry | None:
        """Move the finished file ``tmp_path`` into the cache as the entry of ``key``'s
        current version (or of ``version``, pulled by its id).

        Evicts least recently used, non-persisted entries to make room (unless ``evict`` is
        false: then it must fit in the free space). Returns None, and leaves ``tmp_path``
        where it is, when the file cannot fit; an older copy of the key's current version is
        removed then, since it is outdated. An entry that was persisted stays persisted when
        replaced. One that needs more evictions than a transaction may hold open has that
        room made first (``_make_room``): those evictions stand even if the add then fails."""
        size = tmp_path.stat().st_size
        if self.allocated_space is not None and size > self.allocated_space:
            if version == CURRENT:  # superseded by the version that does not fit
                self.remove(key, unless_etag=etag, version=CURRENT)
            return None
        if evict and self.allocated_space is not None:
            self._make_room((key, version), size)
        # A version pulled by id is named for its key and version: a rebuilt index, which
        # can tell only the key of a file (its footer), does not take it for the current one.
        named = key if version == CURRENT else f"{key}\0{version}"
        file = f"{key_digest(named)}.{uuid.uuid4().hex[:12]}"
        final = self.objects_dir / file
        file_sha256 = _file_sha256(tmp_path, size)
        tagged_sha256 = f"{file} {file_sha256}" if file_sha256 else ""
        with self.key_lock(key), self._marked(file, key) as marked:
            if not marked:  # journaled first: a crash after the rename leaves no orphan
                with self._write() as db:
                    db.execute("INSERT INTO journal (file, key) VALUES (?, ?)", (file, key))
            try:
                with self._write() as db:
                    old = db.execute(
                        "SELECT file, size, persist, store FROM entries "
                        "WHERE key = ? AND version = ?",
                        (key, version),
                    ).fetchone()
                    old_mapped = bool(old) and not self._claim(old[0])
                    need = size - (old[1] if old and not old_mapped else 0)
                    evicted = self._evict(db, need, exclude=(key, version), may_evict=evict)
                    os.replace(tmp_path, final)
                    self._temp_lock(tmp_path, held=False)  # a cached file now (the mark
                    # stays locked: recovery reads an unlocked one as a dead add)
                    now = time.time()
                    use = _advance_uses(db, 1)
                    # A pin stays with the key, not with another store's copy of its name.
                    persist = persist or bool(old and old[2] and old[3] in ("", self.store))
                    if old:
                        db.execute(
                            "UPDATE entries SET file = ?, size = ?, etag = ?, sha256 = ?, "
                            "created = ?, accessed = ?, persist = ?, store = ?, file_sha256 = ? "
                            "WHERE key = ? AND version = ?",
                            (
                                file,
                                size,
                                etag,
                                sha256,
                                now,
                                use,
                                int(persist),
                                self.store,
                                tagged_sha256,
                                key,
                                version,
                            ),
                        )
                        if old_mapped:  # kept, and counted, until its last mapping goes
                            db.execute(
                                "INSERT OR IGNORE INTO retired VALUES (?, ?, ?)",
                                (old[0], key, old[1]),
                            )
                        else:
                            db.execute(
                                "INSERT OR IGNORE INTO journal (file, key) VALUES (?, ?)",
                                (old[0], key),
                            )
                            evicted.append(old[0])
                    else:
                        db.execute(
                            f"INSERT INTO entries ({_COLUMNS}, file_sha256) VALUES ({_MARKS}, ?)",
                            (
                                key,
                                version,
                                file,
                                size,
                                etag,
                                sha256,
                                now,
                                use,
                                int(persist),
                                self.store,
                                tagged_sha256,
                            ),
                        )
                    if not marked:
                        db.execute("DELETE FROM journal WHERE file = ?", (file,))
            except BaseException as exc:
                if final.exists() and not tmp_path.exists():
                    self._temp_lock(tmp_path, held=True)  # locked before it is a temp file
                    os.replace(final, tmp_path)  # give the caller its file back
                if not marked:
                    with self._write() as db:
                        db.execute("DELETE FROM journal WHERE file = ?", (file,))
                if isinstance(exc, _DoesNotFit):
                    # A cached older version is superseded by the one that did not fit:
                    # keeping it would let a pull without the current-check serve stale data.
                    if version == CURRENT:
                        self.remove(key, unless_etag=etag, version=CURRENT)
                    return None
                raise
        self._unlink_journaled(evicted)
        return CacheEntry(key, final, size, etag, sha256, now, use, persist, self.store, version)

    def _make_room(self, entry: tuple[str, str], size: int) -> None:
        """Before an add (of ``entry``: a key and version) that would evict more entries than
        one transaction may hold open (many small ones for a large one; see
        ``_CLAIMS_PER_TRANSACTION``): evict in bounded transactions first, leaving the add's
        own, which decides, little to do. Not when the add cannot fit anyway: a refused add
        changes nothing."""
        assert self.allocated_space is not None
        ((used,),) = self._query("SELECT size FROM totals")
        if used + size <= self.allocated_space:
            return  # the common case: room enough, one read
        old = self._query("SELECT size FROM entries WHERE key = ? AND version = ?", entry)
        need = size - (old[0][0] if old else 0)  # a replaced version frees its own room
        first = self._query(
            "SELECT size FROM entries WHERE persist = 0 AND NOT (key = ? AND version = ?) "
            "ORDER BY accessed LIMIT ?",
            (*entry, _CLAIMS_PER_TRANSACTION),
        )
        if used + need - self.allocated_space <= sum(n for (n,) in first):
            return  # the add's transaction frees it with few files
        if self.persisted_size() + size > self.allocated_space:
            return  # cannot fit: the add refuses it, and nothing is evicted
        self.evict_until_fits(need)

    @contextlib.contextmanager
    def _marked(self, file: str, key: str) -> Iterator[bool]:
        """``tmp/<file>.adding``, locked while ``add`` renames a file into ``objects/<file>``
        and commits its row, so that ``add`` needs one write transaction: if the process dies
        in between, the next ``recover`` finds the file by the mark's name (``objects/`` is
        never scanned). The mark is a second name (a hard link) of ``key``'s stripe lock,
        which the caller holds: no file is created (that costs 3 to 200 us, depending on the
        folder), and the mark is locked as long as the caller holds the key (never past its
        process), and removed before the caller lets the key go. What that costs: a
        dead add's mark is recovered by an open that finds its stripe free (one holding it
        for another key of the stripe cannot be told from the add). Where the file system
        refuses hard links it is a small locked file of its own. Never the added file's lock
        (see the invariants). Yields False when no mark can be made (a full disc): the caller
        then journals the file first, in a transaction of its own."""
        stripe = _stripe(key)
        assert stripe in self._local.__dict__.get("held", {}), "mark without the key's lock"
        marker = self.tmp_dir / f"{file}{_ADDING}"
        fd: int | None = None
        marked = True  # before the link: a Ctrl-C right after it still removes the mark
        try:
            try:
                os.link(self._stripe_file(stripe), marker)
            except OSError:
                marked = False
                with contextlib.suppress(OSError):
                    fd = self._create_locked(marker)
                marked = fd is not None
            yield marked
        finally:
            if marked:
                marker.unlink(missing_ok=True)
            if fd is not None:
                forksafe.untrack_fd(fd)
                os.close(fd)

    def _evict(
        self,
        db: sqlite3.Connection,
        need: int,
        exclude: tuple[str, str],
        *,
        best_effort: bool = False,
        may_evict: bool = True,
    ) -> list[str]:
        """Forget LRU non-persisted entries (not ``exclude``: a key and version) until
        ``need`` more bytes fit, in batches; returns their files, journaled for unlinking
        after commit. When even that is not enough (or nothing ``may_evict``): stop
        (``best_effort``, also after ``_CLAIMS_PER_TRANSACTION`` files: the caller goes on in
        another transaction) or raise ``_DoesNotFit``, which rolls the transaction back."""
        if self.allocated_space is None:
            return []
        (used,) = db.execute("SELECT size FROM totals").fetchone()
        over = used + need - self.allocated_space
        evicted: list[str] = []
        if over > 0 and db.execute("SELECT 1 FROM retired LIMIT 1").fetchone():
            # Older versions kept while mapped, whose mappings have gone since: free first.
            evicted += self._unmapped_retired(db)
            (used,) = db.execute("SELECT size FROM totals").fetchone()
            over = used + need - self.allocated_space
        if over > 0 and not may_evict:
            raise _DoesNotFit
        after = -1  # the use order of the last entry looked at: mapped ones are passed over
        while over > 0 and not (best_effort and len(evicted) >= _CLAIMS_PER_TRANSACTION):
            rows = db.execute(
                "SELECT key, version, file, size, accessed FROM entries WHERE persist = 0 "
                "AND accessed > ? ORDER BY accessed LIMIT ?",
                (after, _EVICT_BATCH),
            ).fetchall()
            if not rows:
                if best_effort:
                    break
                raise _DoesNotFit
            chosen = []
            for key, version, file, size, accessed in rows:
                after = accessed
                if (key, version) == exclude:
                    continue
                if not self._claim(file):
                    continue  # mapped by a zero-copy pull: it stays
                chosen.append((key, file))
                over -= size
                if over <= 0:
                    break
            evicted += self._forget(db, chosen)
        return evicted

    def remove(
        self, key: str, *, unless_etag: str | None = None, version: str | None = None
    ) -> bool:
        """Delete ``key``'s entries and their files (persisted or not): every version cached,
        or only ``version`` (``""``: the current one); False if none was cached. With
        ``unless_etag``, only entries holding another stored version are deleted."""
        sql = f"SELECT file FROM entries WHERE key = ? AND etag != ? AND {_MINE}"
        params = [key, unless_etag, self.store]
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        with self.key_lock(key), self._write() as db:
            params[1] = params[1] or ""
            rows = db.execute(sql, params).fetchall()
            if not rows:
                return False
            files = self._forget(db, [(key, row[0]) for row in rows])
        self._unlink_journaled(files)
        return True

    def set_persist(self, key: str, persist: bool, *, version: str = CURRENT) -> bool:
        """Pin or unpin ``key``'s current version (or ``version``); False if not cached."""
        with self._write() as db:
            changed = db.execute(
                f"UPDATE entries SET persist = ? WHERE key = ? AND version = ? AND {_MINE}",
                (int(persist), key, version, self.store),
            ).rowcount
        return bool(changed)

    def evict_until_fits(self, extra: int = 0) -> int:
        """Evict LRU non-persisted entries until ``extra`` more bytes would fit; bytes freed.

        Used after the allocation shrank. Evicts what it can when even that is not enough
        (persisted entries are only removed by an explicit delete)."""
        if self.allocated_space is None:
            return 0
        freed = 0
        while True:  # transactions of a bounded number of files (see _CLAIMS_PER_TRANSACTION)
            with self._write() as db:
                (before,) = db.execute("SELECT size FROM totals").fetchone()
                files = self._evict(db, extra, exclude=("", ""), best_effort=True)
                (after,) = db.execute("SELECT size FROM totals").fetchone()
            self._unlink_journaled(files)
            freed += before - after
            if len(files) < _CLAIMS_PER_TRANSACTION:
                return freed

    def clear(self) -> int:
        """Evict every entry that is not persisted; bytes freed."""
        freed = 0
        while True:  # transactions of a bounded number of files (see _CLAIMS_PER_TRANSACTION)
            with self._write() as db:
                rows = db.execute(
                    "SELECT key, file, size FROM entries WHERE persist = 0 LIMIT ?",
                    (_CLAIMS_PER_TRANSACTION,),
                ).fetchall()
                files = self._forget(db, [(key, file) for key, file, _ in rows])
            self._unlink_journaled(files)
            freed += sum(size for _, _, size in rows)
            if len(rows) < _CLAIMS_PER_TRANSACTION:
                return freed

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish what crashed processes left: journaled files without a row are unlinked
        (unless their key's lock is held: that add may still be in progress), and temp files
        no writer holds a lock on are removed. Cheap: no scan of the cache."""
        pending = self._query("SELECT file, key FROM journal")
        for file, key in pending:
            with self.key_lock(key, blocking=False) as locked:
                if not locked:
                    continue
                referenced = self._query("SELECT 1 FROM entries WHERE file = ?", (file,))
                if referenced:
                    with self._write() as db:
                        db.execute("DELETE FROM journal WHERE file = ?", (file,))
                else:
                    self._unlink_journaled([file])
        self._reclaim_retired()
        for tmp in self.tmp_dir.iterdir():
            adding = _ADDING_FILE.fullmatch(tmp.name)
            if adding is not None:
                self._recover_add(tmp, adding[1])
                continue
            match = _TEMP_FILE.fullmatch(tmp.name)
            if match is None:
                continue  # not a name temp_file gives: not ours to delete
            # A *.new file is between creation and its lock: spare it a few seconds.
            _remove_if_abandoned(tmp, grace=_TEMP_GRACE_SECONDS if match[1] == "new" else 0)

    def _recover_add(self, marker: Path, file: str) -> None:
        """The mark of an add (see ``_marked``) that nobody holds locked: its process is
        gone. The file it renamed into ``objects/`` stays only if its row was committed.
        Taking the mark's lock takes its key's stripe: a child forked meanwhile closes its
        copy of the descriptor (tracked until the lock is released), or it would hold the
        stripe for as long as it lives."""
        try:
            with forksafe.sqlite_section():  # no fork between opening and tracking
                fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
                forksafe.track_fd(fd)
        except OSError:
            return  # removed meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # the add is in progress, or another key of its stripe is in use
            if not self._query("SELECT 1 FROM entries WHERE file = ?", (file,)):
                (self.objects_dir / file).unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
        finally:
            forksafe.release_locked(fd)

    def reconcile(self) -> Reconciled:
        """Full check (a scan of the index and the folder): rebuild a damaged index, drop
        rows whose file is missing or has the wrong size, unlink files of the cache's naming
        that nothing refers to. Returns what it repaired, and the copies it kept."""
        try:
            healthy = self._query("PRAGMA quick_check") == [("ok",)]
        except IndexDamagedError:
            healthy = False
        rebuilt = None if healthy else self.rebuild(announce=False)
        self.recover()
        dropped = 0
        objects = str(self.objects_dir)
        kept: list[CachedCopy] = []
        for row in self._query(f"SELECT {_COPY_COLUMNS} FROM entries"):
            copy = _copy(objects, row)
            try:
                ok = os.stat(copy.path).st_size == copy.size
            except FileNotFoundError:
                ok = False
            if ok:
                kept.append(copy)
            elif self.discard(copy):  # not when another process replaced it meanwhile
                dropped += 1
        known = {
            row[0]
            for row in self._query(
                "SELECT file FROM entries UNION ALL SELECT file FROM journal "
                "UNION ALL SELECT file FROM retired"
            )
        }
        orphans = 0
        for name in os.listdir(objects):
            if name in known or not _OBJECT_FILE.fullmatch(name):
                continue  # in use, or not a name this cache gives: not ours to delete
            path = self.objects_dir / name
            adding = (self.tmp_dir / f"{path.name}{_ADDING}").exists()  # recover() decides
            if not adding:
                # Re-check under the index lock: an add may have committed since we looked.
                with self._write() as db:
                    still_orphan = not db.execute(
                        "SELECT 1 FROM entries WHERE file = ? UNION ALL "
                        "SELECT 1 FROM journal WHERE file = ? UNION ALL "
                        "SELECT 1 FROM retired WHERE file = ?",
                        (path.name, path.name, path.name),
                    ).fetchone()
                    if still_orphan and self._claim(path.name):  # never a mapped file
                        path.unlink(missing_ok=True)
                        orphans += 1
                    self._release_claim(path.name)
        repaired = {"dropped_rows": dropped, "orphan_files": orphans, "rebuilt_index": rebuilt}
        return Reconciled(repaired, kept)

    def close(self) -> None:
        """Write the hits recorded in memory, and close this thread's connection (and those
        that ended threads let go)."""
        with contextlib.suppress(DamanError):  # a damaged index: rebuild() keeps them
            self.flush_uses()
        conn = self._local.__dict__.pop("conn", None)
        if conn is not None:
            with forksafe.sqlite_section():
                conn.close()
