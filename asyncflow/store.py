"""A result store: finished tasks' values, kept across runs and crashes.

With ``WorkflowEngine(store=PATH)``, a task whose key (see :mod:`asyncflow.keys`)
is already stored resolves from the store without running, and every task that
succeeds is stored.  Without a store nothing changes and nothing is written.

The store is a folder: ``index.sqlite`` (one row per result: key, task name,
time, size, SHA-256 of the pickled value, and the value itself when small) and
``values/`` for values over :data:`INLINE` bytes.  SQLite in WAL mode makes
each write atomic and lets several drivers share one store on a local disk.  On
a cluster's shared filesystem (NFS, Lustre, GPFS, ...; see :func:`journal_mode`)
the index uses a rollback journal and POSIX locks instead, as WAL needs memory
shared by every process using it; drivers on several hosts can then share it.
A task that no driver has stored yet is computed by one of them (see
:mod:`asyncflow.claims`).

Crash safety, in the order of a write: a large value is written to a temporary
file, flushed to disk and renamed into ``values/``; only then is its row
committed.  A SIGKILL at any moment leaves either no row (the task runs again;
an orphan value file is removed by :meth:`ResultStore.prune`) or a whole one.
A row whose value no longer matches its checksum (a truncated or edited file)
is reported with a warning, dropped, and the task recomputed.

Failures, cancellations and timeouts are never stored: only successes reach
:meth:`ResultStore.put`.  A value that cannot be pickled is reported once per
task name and simply not stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from .claims import SCHEMA as _CLAIMS
from .claims import Claims

__all__ = ["INLINE", "MISS", "ResultStore", "StoredResult"]

log = logging.getLogger("asyncflow.store")

#: values up to this many pickled bytes live in the index itself
INLINE = 256 * 1024
#: what :meth:`ResultStore.get` returns for a key it does not hold
MISS: Any = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    data BLOB
)
"""


#: filesystems shared between hosts: SQLite's WAL keeps its index in shared
#: memory, which processes on two hosts do not share, so a store there uses a
#: rollback journal and the filesystem's POSIX locks instead
NETWORK_FS = frozenset(
    [
        "nfs",
        "nfs4",
        "lustre",
        "gpfs",
        "beegfs",
        "cifs",
        "smb3",
        "ceph",
        "fuse.glusterfs",
        "panfs",
        "9p",
    ]
)


def journal_mode(path: Path, mounts: str) -> str:
    """WAL on a local disk; a rollback journal (``DELETE``) on a filesystem
    named in :data:`NETWORK_FS`, going by the longest mount point in ``mounts``
    (the text of ``/proc/mounts``) that holds ``path``."""
    best, kind = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ").rstrip("/") + "/"
        if f"{path}/".startswith(mount) and len(mount) > len(best):
            best, kind = mount, parts[2]
    return "DELETE" if kind in NETWORK_FS else "WAL"


def _set_journal(db: sqlite3.Connection, mode: str, within: float = 60.0) -> None:
    """Switch ``db`` to ``mode`` unless it is in it already.

    SQLite answers a journal-mode change that meets another connection's lock
    with "database is locked" at once, without waiting as for other locks, so
    two drivers opening a new store together would fail without the retries."""
    deadline = time.monotonic() + within
    while True:
        try:
            (now,) = db.execute("PRAGMA journal_mode").fetchone()
            if now.upper() != mode:
                db.execute(f"PRAGMA journal_mode={mode}")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _mounts() -> str:
    try:
        with open("/proc/mounts") as f:
            return f.read()
    except OSError:  # not Linux: a local disk is the likely case
        return ""


@dataclass(frozen=True, slots=True)
class StoredResult:
    """One row of ``asyncflow store ls``."""

    key: str
    task: str
    created: float
    size: int


class ResultStore:
    """The store at ``path`` (created if missing).

    Safe to use from several threads: each gets its own SQLite connection.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).absolute()
        self.values = self.path / "values"
        self.values.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._journal = journal_mode(self.path, _mounts())
        self._unpicklable: set[str] = set()
        self._db().execute(_SCHEMA)
        self._db().executescript(_CLAIMS)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path / "index.sqlite", timeout=60, isolation_level=None
            )
            _set_journal(db, self._journal)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    # -- reading ---------------------------------------------------------------------
    def get(self, key: str) -> Any:
        """The value stored under ``key``, or :data:`MISS`."""
        row = (
            self._db()
            .execute("SELECT task, sha256, data FROM results WHERE key = ?", (key,))
            .fetchone()
        )
        if row is None:
            return MISS
        task, digest, data = row
        if data is None:
            try:
                data = (self.values / key).read_bytes()
            except OSError:
                data = b""
        if hashlib.sha256(data).hexdigest() != digest:
            self._corrupt(key, task, "its value does not match its checksum")
            return MISS
        try:
            return cloudpickle.loads(data)
        except Exception as exc:
            self._corrupt(key, task, f"its value cannot be unpickled ({exc})")
            return MISS

    def _corrupt(self, key: str, task: str, why: str) -> None:
        warnings.warn(
            f"result store {self.path}: the stored result of task {task!r} is "
            f"damaged ({why}); it is dropped and the task runs again",
            RuntimeWarning,
            stacklevel=3,
        )
        self.delete([key])

    # -- writing ---------------------------------------------------------------------
    def put(self, key: str, task: str, value: Any) -> bool:
        """Store ``value`` under ``key``; whether it was stored."""
        return not self.put_many([(key, task, value)])

    def put_many(self, items: list[tuple[str, str, Any]]) -> list[str]:
        """Store each ``(key, task, value)`` in one transaction; the keys of the
        values that could not be pickled, which are not stored."""
        rows, missed = [], []
        for key, task, value in items:
            data = self._pickle(task, value)
            if data is None:
                missed.append(key)
                continue
            inline: bytes | None = data
            if len(data) > INLINE:
                self._write_value(key, data)
                inline = None
            digest = hashlib.sha256(data).hexdigest()
            rows.append((key, task, time.time(), len(data), digest, inline))
        if rows:  # each row clears its claim (a trigger: asyncflow.claims)
            with self._db() as db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)", rows
                )
        return missed

    def _pickle(self, task: str, value: Any) -> bytes | None:
        try:
            return cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            if task not in self._unpicklable:
                self._unpicklable.add(task)
                warnings.warn(
                    f"result store {self.path}: results of task {task!r} cannot "
                    f"be pickled ({type(exc).__name__}: {exc}), so they are not "
                    "stored and the task runs every time",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return None

    def claims(self, owner: str) -> Claims:
        """Claims in this store's index, as ``owner`` (see :mod:`asyncflow.claims`)."""
        return Claims(self._db, owner)

    def _write_value(self, key: str, data: bytes) -> None:
        """Write, flush and rename: the file is whole or absent."""
        tmp = self.values / f".{key}.{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.values / key)

    # -- housekeeping ----------------------------------------------------------------
    def __iter__(self) -> Iterator[StoredResult]:
        rows = self._db().execute(
            "SELECT key, task, created, size FROM results ORDER BY created"
        )
        for key, task, created, size in rows.fetchall():
            yield StoredResult(key, task, created, size)

    def __len__(self) -> int:
        (count,) = self._db().execute("SELECT COUNT(*) FROM results").fetchone()
        return int(count)

    def size(self) -> int:
        """Bytes on disk: the index and every value file."""
        files = [self.path / n for n in os.listdir(self.path) if n.startswith("index")]
        files += list(self.values.iterdir())
        return sum(f.stat().st_size for f in files if f.is_file())

    def delete(self, keys: list[str]) -> None:
        db = self._db()
        for key in keys:
            db.execute("DELETE FROM results WHERE key = ?", (key,))
            with contextlib.suppress(OSError):
                (self.values / key).unlink()

    def prune(self, older_than: float | None = None, task: str | None = None) -> int:
        """Drop results older than ``older_than`` seconds and/or of task names
        ``task``, and value files no row names (left by a crash); how many
        results were dropped."""
        query, params = "SELECT key FROM results WHERE 1", list[Any]()
        if older_than is not None:
            query += " AND created < ?"
            params.append(time.time() - older_than)
        if task is not None:
            query += " AND task = ?"
            params.append(task)
        keys = [k for (k,) in self._db().execute(query, params).fetchall()]
        if older_than is not None or task is not None:
            self.delete(keys)
        else:
            keys = []
        named = {k for (k,) in self._db().execute("SELECT key FROM results")}
        for entry in self.values.iterdir():
            if entry.name not in named:
                with contextlib.suppress(OSError):
                    entry.unlink()
        return len(keys)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
