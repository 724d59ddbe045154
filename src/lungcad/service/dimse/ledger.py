"""The listener's durable memory: received instances, studies and result deliveries (SQLite).

:class:`ListenLedger` keeps ``STATE_DIR/listen.sqlite``; every change is one committed
transaction, so a crash or restart at any point neither loses a study nor analyses it twice::

    receiving -> analysing -> delivering -> done
                           -> failed (retried after a growing pause) -> ... -> gave_up

* ``receiving``: instances are arriving; :meth:`settled` lists the study once no new instance
  has come for ``settle_s`` seconds (the last arrival time is stored, so the wait spans
  restarts).
* ``analysing``: the model is running on it. A crash leaves it so; the next start counts one
  failed attempt and retries it at once, and a study that kills the process every time is
  given up after ``max_attempts``.
* ``delivering``: the results are written; one delivery per destination waits in the queue.
  A destination that is down is retried with a doubling pause (capped), never dropped: its
  delivery stays queued across restarts until the destination takes the results.
* ``done``: every destination acknowledged the results.

A study is analysed once: an instance of it that arrives after it settled is acknowledged to
the sender and counted as ``late`` but not analysed (re-send it as a new study, or raise the
settle time). Repeated instances (same SOPInstanceUID) are stored once.

The ledger also names things for logs: :meth:`tag` is a salted SHA-256 prefix of a UID (the
salt is made once per state folder and kept in the database), so log lines can follow a study
without naming it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lungcad.errors import InputError

__all__ = ["DB_FILE", "Delivery", "ListenLedger", "StudyRecord"]

DB_FILE = "listen.sqlite"
LOCK_FILE = "listen.lock"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    uid TEXT PRIMARY KEY,
    tag TEXT NOT NULL,
    status TEXT NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0,
    late INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL,
    last_arrival REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT,
    result TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL REFERENCES studies(uid),
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    study_uid TEXT NOT NULL REFERENCES studies(uid),
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    PRIMARY KEY (study_uid, destination)
);
"""


@dataclass(frozen=True)
class StudyRecord:
    """One study as the ledger holds it (see the module docstring for ``status``)."""

    uid: str
    tag: str
    status: str
    instances: int
    late: int
    failures: int
    last_error: str | None
    result: dict[str, Any] | None


@dataclass(frozen=True)
class Delivery:
    """One study's results owed to one destination (``destination`` is its name)."""

    study_uid: str
    tag: str
    destination: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


class ListenLedger:
    """Durable record of what ``lungcad listen`` received, analysed and delivered.

    Thread-safe: the SCP's association threads record instances while the worker analyses
    and delivers.

    Args:
        state_dir: the listener's state folder (created).
        max_attempts: failed analyses after which a study is given up.
        retry_after_s: pause before a failed analysis or delivery is retried; doubles per
            failure.
        max_retry_after_s: cap on that pause.
        clock: time source in seconds since the epoch (tests pass a fake).

    Raises:
        InputError: another listener holds the folder, or the database is not a lungcad
            listen ledger.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        max_attempts: int = 3,
        retry_after_s: float = 30.0,
        max_retry_after_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_attempts < 1 or retry_after_s < 0 or max_retry_after_s < retry_after_s:
            raise InputError(
                "need max attempts >= 1 and 0 <= retry pause <= its cap; got "
                f"{max_attempts}, {retry_after_s}, {max_retry_after_s}",
                "--retry-after",
            )
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.max_attempts = int(max_attempts)
        self.retry_after_s = float(retry_after_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self._clock = clock
        self._mutex = threading.Lock()
        self._lock = self._acquire()
        try:
            self._db = sqlite3.connect(
                self.state_dir / DB_FILE, check_same_thread=False, isolation_level=None
            )
            self._salt = self._open()
        except BaseException:
            self._release()
            raise
        # A study left "analysing" was in hand when the last listener stopped.
        for uid in self._uids("analysing"):
            self._fail(uid, "interrupted: lungcad stopped while analysing this study", now=True)

    # -- housekeeping -----------------------------------------------------------------------

    def _acquire(self) -> IO[str]:
        handle = (self.state_dir / LOCK_FILE).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise InputError(
                f"another lungcad listen (pid {holder}) is using this state folder; stop it "
                "or choose another --state-dir",
                self.state_dir,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def _open(self) -> str:
        try:
            self._db.executescript(_SCHEMA)  # CREATE ... IF NOT EXISTS: a no-op once made
            with self._transaction() as db:
                rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
                if not rows:
                    rows = {"version": SCHEMA_VERSION, "salt": secrets.token_hex(16)}
                    db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
        except sqlite3.DatabaseError as exc:
            raise InputError(
                f"not a lungcad listen ledger ({exc}); move it away to start afresh",
                self.state_dir / DB_FILE,
            ) from exc
        if rows.get("version") != SCHEMA_VERSION or "salt" not in rows:
            raise InputError(
                f"not a lungcad listen ledger of version {SCHEMA_VERSION} "
                f"(found {rows.get('version')!r}); move it away to start afresh",
                self.state_dir / DB_FILE,
            )
        return rows["salt"]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database and release the state folder (everything is already saved)."""
        with self._mutex:
            self._db.close()
        self._release()

    def __enter__(self) -> ListenLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tag(self, uid: str) -> str:
        """A UID as log lines and folder names show it: 16 hex digits of a salted SHA-256."""
        return hashlib.sha256(f"{self._salt}:{uid}".encode()).hexdigest()[:16]

    def _pause(self, failures: int) -> float:
        return min(self.max_retry_after_s, self.retry_after_s * 2.0 ** max(0, failures - 1))

    def _uids(self, status: str) -> list[str]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT uid FROM studies WHERE status = ? ORDER BY first_seen", (status,)
            ).fetchall()
        return [r[0] for r in rows]

    # -- receiving --------------------------------------------------------------------------

    def record_instance(self, study_uid: str, sop_uid: str) -> str:
        """Note one received instance; returns what it was.

        Returns:
            ``"new"`` (counted, the study's settle clock restarts), ``"repeat"`` (already held
            and the study still receiving: the file is simply written again) or ``"late"``
            (its study was already analysed: not used, the caller writes nothing; counted in
            ``late`` when it is an instance not held before).
        """
        now = self._clock()
        with self._transaction() as db:
            row = db.execute("SELECT status FROM studies WHERE uid = ?", (study_uid,)).fetchone()
            held = db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO studies (uid, tag, status, first_seen, last_arrival, updated) "
                    "VALUES (?, ?, 'receiving', ?, ?, ?)",
                    (study_uid, self.tag(study_uid), now, now, now),
                )
            elif row[0] != "receiving":
                if not held:
                    db.execute(
                        "UPDATE studies SET late = late + 1, updated = ? WHERE uid = ?",
                        (now, study_uid),
                    )
                return "late"
            if held:
                return "repeat"
            db.execute("INSERT INTO instances VALUES (?, ?, ?)", (sop_uid, study_uid, now))
            db.execute(
                "UPDATE studies SET instances = instances + 1, last_arrival = ?, updated = ? "
                "WHERE uid = ?",
                (now, now, study_uid),
            )
        return "new"

    def settled(self, settle_s: float) -> list[str]:
        """Studies ready for analysis: receiving with no new instance for ``settle_s``
        seconds, or failed with their retry pause over; oldest first."""
        now = self._clock()
        with self._mutex:
            rows = self._db.execute(
                "SELECT uid FROM studies WHERE (status = 'receiving' AND last_arrival <= ?) "
                "OR (status = 'failed' AND next_attempt_at <= ?) ORDER BY first_seen",
                (now - settle_s, now),
            ).fetchall()
        return [r[0] for r in rows]

    def settle_remaining(self, settle_s: float) -> float | None:
        """Seconds until the next receiving study settles (None when none is receiving)."""
        with self._mutex:
            row = self._db.execute(
                "SELECT MAX(last_arrival) FROM studies WHERE status = 'receiving'"
            ).fetchone()
        if row[0] is None:
            return None
        return max(0.0, float(row[0]) + settle_s - self._clock())

    # -- analysing --------------------------------------------------------------------------

    def start(self, uid: str) -> None:
        """Mark a study as being analysed (committed before the work starts)."""
        self._set(uid, "analysing")

    def analysed(self, uid: str, result: dict[str, Any], destinations: list[str]) -> None:
        """Record a study's result and queue one delivery per destination (none: done)."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET status = ?, result = ?, last_error = NULL, "
                "next_attempt_at = NULL, updated = ? WHERE uid = ?",
                ("delivering" if destinations else "done", json.dumps(result), now, uid),
            )
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (study_uid, destination, status, "
                "next_attempt_at) VALUES (?, ?, 'pending', ?)",
                [(uid, d, now) for d in destinations],
            )

    def fail(self, uid: str, error: str) -> str:
        """Count a failed analysis; returns the new status (``failed`` or ``gave_up``)."""
        return self._fail(uid, error)

    def _fail(self, uid: str, error: str, now: bool = False) -> str:
        with self._transaction() as db:
            (failures,) = db.execute(
                "SELECT failures + 1 FROM studies WHERE uid = ?", (uid,)
            ).fetchone()
            status = "gave_up" if failures >= self.max_attempts else "failed"
            at = self._clock() + (0.0 if now else self._pause(failures))
            db.execute(
                "UPDATE studies SET status = ?, failures = ?, last_error = ?, "
                "next_attempt_at = ?, updated = ? WHERE uid = ?",
                (status, failures, error, at if status == "failed" else None, self._clock(), uid),
            )
        return status

    def _set(self, uid: str, status: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET status = ?, updated = ? WHERE uid = ?",
                (status, self._clock(), uid),
            )

    # -- delivering -------------------------------------------------------------------------

    def due_deliveries(self) -> list[Delivery]:
        """Pending deliveries whose (retry) time has come, oldest first."""
        return [d for d in self.deliveries("pending") if d.next_attempt_at <= self._clock()]

    def deliveries(self, status: str | None = None) -> list[Delivery]:
        """Every delivery (or those of one status), oldest first."""
        query = (
            "SELECT d.study_uid, s.tag, d.destination, d.status, d.attempts, "
            "d.next_attempt_at, d.last_error FROM deliveries d JOIN studies s "
            "ON s.uid = d.study_uid"
        )
        params: tuple[str, ...] = ()
        if status is not None:
            query, params = query + " WHERE d.status = ?", (status,)
        with self._mutex:
            rows = self._db.execute(query + " ORDER BY d.next_attempt_at", params).fetchall()
        return [Delivery(*row) for row in rows]

    def delivered(self, uid: str, destination: str) -> bool:
        """Record one destination's acknowledgement; True when the study is now done."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET status = 'sent', attempts = attempts + 1, sent_at = ?, "
                "last_error = NULL WHERE study_uid = ? AND destination = ?",
                (now, uid, destination),
            )
            (left,) = db.execute(
                "SELECT COUNT(*) FROM deliveries WHERE study_uid = ? AND status != 'sent'",
                (uid,),
            ).fetchone()
            if not left:
                db.execute(
                    "UPDATE studies SET status = 'done', updated = ? WHERE uid = ?", (now, uid)
                )
        return not left

    def delivery_failed(self, uid: str, destination: str, error: str) -> float:
        """Keep a delivery queued after a failed attempt; returns the pause before the next."""
        with self._transaction() as db:
            (attempts,) = db.execute(
                "SELECT attempts + 1 FROM deliveries WHERE study_uid = ? AND destination = ?",
                (uid, destination),
            ).fetchone()
            pause = self._pause(attempts)
            db.execute(
                "UPDATE deliveries SET attempts = ?, last_error = ?, next_attempt_at = ? "
                "WHERE study_uid = ? AND destination = ?",
                (attempts, error, self._clock() + pause, uid, destination),
            )
        return pause

    # -- reading ----------------------------------------------------------------------------

    def get(self, uid: str) -> StudyRecord | None:
        """The study's record, or None when it was never received."""
        with self._mutex:
            row = self._db.execute(
                "SELECT uid, tag, status, instances, late, failures, last_error, result "
                "FROM studies WHERE uid = ?",
                (uid,),
            ).fetchone()
        if row is None:
            return None
        uid, tag, status, instances, late, failures, last_error, result = row
        return StudyRecord(
            uid=uid,
            tag=tag,
            status=status,
            instances=instances,
            late=late,
            failures=failures,
            last_error=last_error,
            result=json.loads(result) if result else None,
        )

    def counts(self) -> Counter[str]:
        """Number of studies per status."""
        with self._mutex:
            rows = self._db.execute("SELECT status, COUNT(*) FROM studies GROUP BY status")
            return Counter(dict(rows.fetchall()))
