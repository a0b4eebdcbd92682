"""Claims: which driver computes a result that is not stored yet.

Two drivers sharing one store (a parameter sweep launched twice, a restarted
driver while the old one is still draining) must not both run a task that
neither has stored yet.  Before running a task it did not find, a driver
claims its key in the store's index; a driver that finds the key claimed by
another live driver waits for that result instead of computing it.

A claim is a lease: its owner renews all of its claims every :data:`TTL` / 3
seconds, and deletes one when its task fails or is cancelled; storing the
result deletes it in the same statement (a trigger on the results table).  A
driver that dies without cleaning up leaves claims that other drivers ignore
once they expire, or at once when the owner ran on the same host and its pid is
gone (a SIGKILLed driver, the common case on one login node).

Claims and results are written in batches, one transaction per turn of the
event loop (see :class:`asyncflow.caching.Caching`).  Waiting reads the index
every 50 ms to 1 s: SQLite has no change notification,
and on a cluster's shared filesystem the other driver may be on another host,
so there is nothing to wait on but the file itself.
"""

from __future__ import annotations

import enum
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable

__all__ = ["TTL", "ClaimResult", "Claims", "new_owner"]

#: seconds a claim lives without renewal (renewed every TTL / 3)
TTL = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS stored_clears_claim AFTER INSERT ON results BEGIN
    DELETE FROM claims WHERE key = NEW.key;
END;
"""

_CLAIM = """
INSERT INTO claims (key, owner, expires)
SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM results WHERE key = ?1)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE claims.owner = excluded.owner OR claims.expires < ?4
"""

_HOST = socket.gethostname()


class ClaimResult(enum.Enum):
    MINE = "mine"
    """Claimed for this driver: run the task."""
    STORED = "stored"
    """Stored meanwhile: read it from the store."""
    HELD = "held"
    """Another live driver computes it: wait for its result."""


def new_owner() -> str:
    """A name for one engine's claims: host, pid (for the liveness check),
    and a random part, so that two engines in one process are two owners."""
    return f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != _HOST or not pid.isdigit():
        return True  # another host's driver: only its lease says
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:  # a killed driver its parent has not reaped yet is a zombie
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class Claims:
    """The claims of one owner, in the index behind ``connect``."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], owner: str):
        self._db = connect
        self.owner = owner
        self._renewed = time.time()

    def claim(self, key: str) -> ClaimResult:
        """Claim ``key`` unless it is stored or another live driver holds it."""
        return self.claim_many([key])[0]

    def claim_many(self, keys: list[str]) -> list[ClaimResult]:
        """:meth:`claim` for each of ``keys``, in one transaction."""
        if not keys:
            return []
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            found = [self._claim(db, key, now) for key in keys]
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return found

    def _claim(self, db: sqlite3.Connection, key: str, now: float) -> ClaimResult:
        # the common case in one statement: not stored, and free or expired
        if db.execute(_CLAIM, (key, self.owner, now + TTL, now)).rowcount == 1:
            return ClaimResult.MINE
        if db.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone():
            return ClaimResult.STORED
        (owner,) = db.execute(
            "SELECT owner FROM claims WHERE key = ?", (key,)
        ).fetchone()
        if _owner_alive(owner):
            return ClaimResult.HELD
        db.execute(  # its driver is gone: take it over
            "UPDATE claims SET owner = ?, expires = ? WHERE key = ?",
            (self.owner, now + TTL, key),
        )
        return ClaimResult.MINE

    def held(self, key: str) -> bool:
        """Whether another live driver still holds ``key`` (and has not stored it)."""
        db = self._db()
        if db.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone():
            return False
        row = db.execute(
            "SELECT owner, expires FROM claims WHERE key = ?", (key,)
        ).fetchone()
        if row is None or row[0] == self.owner:
            return False
        return bool(row[1] > time.time() and _owner_alive(row[0]))

    def release(self, key: str) -> None:
        """The task ended without a stored result: others may claim it now."""
        self._db().execute(
            "DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner)
        )

    def renew(self) -> None:
        """Push every claim of this owner's lease forward, at most every TTL/3."""
        now = time.time()
        if now - self._renewed < TTL / 3:
            return
        self._renewed = now
        self._db().execute(
            "UPDATE claims SET expires = ? WHERE owner = ?", (now + TTL, self.owner)
        )

    def release_all(self) -> None:
        self._db().execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
