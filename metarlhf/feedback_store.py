"""Durable feedback log: thumbs, pairs, served completions and adaptation jobs.

Backend: SQLite in WAL mode with ``synchronous=FULL``, so a committed transaction has
been fsynced to the write-ahead log before ``commit`` returns. Every write method
returns only after its transaction is committed: callers (the HTTP server) acknowledge
a write only once it is durable.

Group commit: all writes go through one writer thread. It drains up to
``max_batch`` queued writes, runs each inside its own SAVEPOINT of one transaction
(a failing write is rolled back alone and its caller gets the exception), commits
once (one fsync) and then wakes every caller. Under concurrency this turns N fsyncs
into one; a single writer waits at most one fsync. Reads use per-thread connections
(WAL readers never block the writer).

Schema: versioned through the ``schema_version`` table; :data:`MIGRATIONS` are
applied in order at open. A database written by a newer version is refused.

Other backends: :func:`open_feedback_store` dispatches on a URL. ``sqlite:///path``
(or a plain path) opens SQLite; ``postgresql://...`` is recognised but the PostgreSQL
backend is not implemented in this build (a clear :class:`ConfigError` says so and
names the driver to install). :class:`FeedbackStore` is the interface a backend
implements.

Simplifications: one process owns the database file (the server); ids are random
128-bit hex strings; the per-user "new feedback" counter is a watermark on the
autoincrement ``seq`` of the feedback table (column ``users.attempted_upto``), moved
only when an adaptation job succeeds, to the newest record it trained on: a failed,
cancelled or interrupted job leaves its records "new".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from metarlhf.data import Pair, Record, Thumbs
from metarlhf.errors import ConfigError, DataError, NotFoundError, check_text

SCHEMA_VERSION = 1

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE feedback (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            tenant TEXT NOT NULL,
            user_id TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('thumbs', 'pair')),
            prompt TEXT NOT NULL,
            completion TEXT,
            label INTEGER,
            chosen TEXT,
            rejected TEXT,
            completion_id TEXT,
            created_at REAL NOT NULL)""",
        "CREATE INDEX feedback_user ON feedback (tenant, user_id, seq)",
        """CREATE TABLE completions (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            user_id TEXT NOT NULL,
            prompt TEXT NOT NULL,
            completion TEXT NOT NULL,
            adapter TEXT NOT NULL,
            created_at REAL NOT NULL)""",
        "CREATE INDEX completions_user ON completions (tenant, user_id)",
        """CREATE TABLE idempotency (
            tenant TEXT NOT NULL,
            key TEXT NOT NULL,
            body_sha256 TEXT NOT NULL,
            feedback_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant, key))""",
        """CREATE TABLE users (
            tenant TEXT NOT NULL,
            user_id TEXT NOT NULL,
            attempted_upto INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (tenant, user_id))""",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            user_id TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
            reason TEXT NOT NULL,
            upto_seq INTEGER NOT NULL,
            error TEXT,
            result TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL)""",
        "CREATE INDEX jobs_user ON jobs (tenant, user_id, created_at)",
    ],
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class FeedbackInput:
    """One feedback item as received. ``kind`` is ``thumbs`` or ``pair``."""

    kind: str
    prompt: str
    completion: str | None = None
    label: int | None = None  # 1 = up, 0 = down
    chosen: str | None = None
    rejected: str | None = None
    completion_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "thumbs":
            if self.completion is None or self.label not in (0, 1):
                raise DataError("thumbs feedback needs a completion and a label of 0 or 1")
        elif self.kind == "pair":
            if self.chosen is None or self.rejected is None:
                raise DataError("pair feedback needs chosen and rejected")
        else:
            raise DataError(f"feedback kind must be 'thumbs' or 'pair', got {self.kind!r}")
        for name in ("prompt", "completion", "chosen", "rejected", "completion_id"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"feedback {name} must be a string, got {type(value).__name__}")
            check_text(value, f"feedback {name}", DataError)


def body_sha256(obj: Any) -> str:
    """Canonical hash of a JSON-able request body (for Idempotency-Key checks)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class FeedbackStore:
    """Interface of a feedback store backend. All writes are durable when they return."""

    def add_feedback(self, tenant: str, user: str, item: FeedbackInput, idempotency_key: str | None = None,
                     body_hash: str | None = None) -> tuple[str, bool]:
        """Store one item; returns ``(feedback_id, created)``. A replayed Idempotency-Key with
        the same body returns the first id with ``created=False``; with another body,
        :class:`DataError`."""
        raise NotImplementedError

    def add_completion(self, tenant: str, user: str, completion_id: str, prompt: str, completion: str,
                       adapter: dict[str, Any]) -> None:
        raise NotImplementedError

    def get_completion(self, tenant: str, user: str, completion_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def delete_completions(self, tenant: str, user: str, completion_ids: list[str]) -> int:
        """Remove the user's completions of these ids; returns how many were removed."""
        raise NotImplementedError

    def forget_neighbor(self, tenant: str, neighbor: str, user: str, completion_ids: list[str]) -> int:
        """Remove ``neighbor``'s id from these completions of ``user`` if they were served with
        its adapter (``adapter.neighbor`` becomes null, ``neighbor_erased`` true; the
        erasure itself does so for the whole tenant); returns how many changed."""
        raise NotImplementedError

    def records(self, tenant: str, user: str, limit: int | None = None) -> list[Record]:
        raise NotImplementedError

    def counts(self, tenant: str, user: str) -> dict[str, int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Ack(NamedTuple):
    """What a stored feedback write answers: its id, whether it was new (False for a
    replayed Idempotency-Key), and the user's records past the watermark (not yet covered
    by a successful adaptation), counted inside the same transaction (so the caller needs
    no second query)."""

    id: str
    created: bool
    new: int


class _Write:
    __slots__ = ("fn", "done", "result", "error", "callback")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any],
                 callback: Callable[[_Write], None] | None = None) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.callback = callback  # called by the writer thread once committed (or failed)


class SQLiteFeedbackStore(FeedbackStore):
    """SQLite (WAL, synchronous=FULL) backend with a group-commit writer thread."""

    def __init__(self, path: str | os.PathLike, synchronous: str = "FULL", max_batch: int = 256) -> None:
        if synchronous.upper() not in ("FULL", "EXTRA", "NORMAL", "OFF"):
            raise ConfigError(f"synchronous must be FULL, EXTRA, NORMAL or OFF, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous.upper()
        self.max_batch = max_batch
        self._local = threading.local()
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        self._closed = False
        self._wconn = self._connect()
        self._migrate(self._wconn)
        self._check_usable(self._wconn)
        self._writer = threading.Thread(target=self._write_loop, name="feedback-writer", daemon=True)
        self._writer.start()
        self.commits = 0  # transactions committed (for metrics / benchmarks)

    # -- connections -----------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"feedback database {str(self.path)!r} cannot be opened: {e}") from e
        if str(mode).lower() != "wal":
            raise ConfigError(f"feedback database {str(self.path)!r} could not switch to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.row_factory = sqlite3.Row
        return conn

    def _check_usable(self, conn: sqlite3.Connection) -> None:
        """ConfigError at start-up, not a failure at the first write: the file must take a
        write lock (not read-only) and pass SQLite's quick integrity check."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.Error as e:
            raise ConfigError(f"feedback database {str(self.path)!r} cannot be written: {e}") from e
        if problems != ["ok"]:
            raise ConfigError(f"feedback database {str(self.path)!r} is corrupted (PRAGMA quick_check: "
                              f"{'; '.join(map(str, problems[:3]))}); restore it from a backup")

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"feedback database {str(self.path)!r} has schema v{current}, newer than this build (v{SCHEMA_VERSION})"
            )
        for v in range(current + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in MIGRATIONS[v]:
                    conn.execute(stmt)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (v,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return int(self._reader().execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # -- group commit ------------------------------------------------------------------
    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` in the writer's next transaction; return once committed."""
        if self._closed:
            raise ConfigError("feedback store is closed")
        w = _Write(fn)
        self._queue.put(w)
        w.done.wait()
        if w.error is not None:
            raise w.error
        return w.result

    async def _awrite(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """:meth:`_write` for an asyncio caller: awaits the group commit without holding
        a thread (the writer thread resolves the future through the event loop)."""
        if self._closed:
            raise ConfigError("feedback store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Write] = loop.create_future()

        def resolve(w: _Write) -> None:
            if not fut.done():
                fut.set_result(w)

        self._queue.put(_Write(fn, lambda w: loop.call_soon_threadsafe(resolve, w)))
        w = await fut
        if w.error is not None:
            raise w.error
        return w.result

    def _write_loop(self) -> None:
        conn = self._wconn
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    w = self._queue.get_nowait()
                except queue.Empty:
                    break
                if w is None:
                    stop = True
                    break
                batch.append(w)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for w in batch:
                    conn.execute("SAVEPOINT w")
                    try:
                        w.result = w.fn(conn)
                        conn.execute("RELEASE w")
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        conn.execute("ROLLBACK TO w")
                        conn.execute("RELEASE w")
                        w.error = e
                conn.execute("COMMIT")
                self.commits += 1
            except Exception as e:  # noqa: BLE001 - the whole transaction failed: nobody is acked
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                for w in batch:
                    w.error = w.error or e
                    w.result = None
            for w in batch:
                w.done.set()
                if w.callback is not None:
                    try:
                        w.callback(w)
                    except RuntimeError:  # the caller's event loop is gone: nobody to wake
                        pass
            if stop:
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._wconn.close()

    # -- feedback ----------------------------------------------------------------------
    def add_feedback(self, tenant: str, user: str, item: FeedbackInput, idempotency_key: str | None = None,
                     body_hash: str | None = None) -> tuple[str, bool]:
        ack = self.store_feedback(tenant, user, item, idempotency_key, body_hash)
        return ack.id, ack.created

    def store_feedback(self, tenant: str, user: str, item: FeedbackInput, idempotency_key: str | None = None,
                       body_hash: str | None = None) -> Ack:
        """Store one item durably; see :class:`Ack`."""
        return self._write(self._feedback_tx(tenant, user, item, idempotency_key, body_hash))

    async def astore_feedback(self, tenant: str, user: str, item: FeedbackInput, idempotency_key: str | None = None,
                              body_hash: str | None = None) -> Ack:
        """:meth:`store_feedback` for asyncio callers (the HTTP route): returns once durable."""
        return await self._awrite(self._feedback_tx(tenant, user, item, idempotency_key, body_hash))

    def _feedback_tx(self, tenant: str, user: str, item: FeedbackInput, idempotency_key: str | None,
                     body_hash: str | None) -> Callable[[sqlite3.Connection], Ack]:
        fid = new_id("fb")
        now = time.time()

        def tx(conn: sqlite3.Connection) -> Ack:
            if idempotency_key is not None:
                row = conn.execute("SELECT body_sha256, feedback_id FROM idempotency WHERE tenant=? AND key=?",
                                   (tenant, idempotency_key)).fetchone()
                if row is not None:
                    if row["body_sha256"] != body_hash:
                        raise DataError("Idempotency-Key was already used with a different request body")
                    return Ack(row["feedback_id"], False, 0)
                conn.execute("INSERT INTO idempotency (tenant, key, body_sha256, feedback_id, created_at) "
                             "VALUES (?, ?, ?, ?, ?)", (tenant, idempotency_key, body_hash or "", fid, now))
            conn.execute(
                "INSERT INTO feedback (id, tenant, user_id, kind, prompt, completion, label, chosen, rejected, "
                "completion_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (fid, tenant, user, item.kind, item.prompt, item.completion, item.label, item.chosen, item.rejected,
                 item.completion_id, now),
            )
            return Ack(fid, True, self._new_count(conn, tenant, user))

        return tx

    def has_feedback(self, feedback_id: str) -> bool:
        row = self._reader().execute("SELECT 1 FROM feedback WHERE id=?", (feedback_id,)).fetchone()
        return row is not None

    def records(self, tenant: str, user: str, limit: int | None = None, upto: int | None = None) -> list[Record]:
        """The user's records, oldest first (the most recent ``limit`` if given; only those
        with ``seq <= upto`` if given)."""
        q = "SELECT * FROM feedback WHERE tenant=? AND user_id=?"
        args: tuple = (tenant, user)
        if upto is not None:
            q += " AND seq <= ?"
            args += (int(upto),)
        q += " ORDER BY seq DESC"
        if limit is not None:
            q += " LIMIT ?"
            args += (int(limit),)
        rows = self._reader().execute(q, args).fetchall()[::-1]
        out: list[Record] = []
        for r in rows:
            if r["kind"] == "thumbs":
                out.append(Thumbs(user, r["prompt"], r["completion"], int(r["label"])))
            else:
                out.append(Pair(user, r["prompt"], r["chosen"], r["rejected"]))
        return out

    def max_seq(self, tenant: str, user: str) -> int:
        row = self._reader().execute("SELECT MAX(seq) FROM feedback WHERE tenant=? AND user_id=?",
                                     (tenant, user)).fetchone()
        return int(row[0] or 0)

    def counts(self, tenant: str, user: str) -> dict[str, int]:
        """Feedback counts: ``up``, ``down``, ``pairs``, ``total`` and ``new`` (not yet covered
        by a successful adaptation)."""
        conn = self._reader()
        row = conn.execute(
            "SELECT COUNT(*) AS total, "
            "COALESCE(SUM(kind='thumbs' AND label=1), 0) AS up, "
            "COALESCE(SUM(kind='thumbs' AND label=0), 0) AS down, "
            "COALESCE(SUM(kind='pair'), 0) AS pairs FROM feedback WHERE tenant=? AND user_id=?",
            (tenant, user),
        ).fetchone()
        mark = conn.execute("SELECT attempted_upto FROM users WHERE tenant=? AND user_id=?",
                            (tenant, user)).fetchone()
        upto = int(mark[0]) if mark else 0
        new = conn.execute("SELECT COUNT(*) FROM feedback WHERE tenant=? AND user_id=? AND seq>?",
                           (tenant, user, upto)).fetchone()[0]
        return {"total": int(row["total"]), "up": int(row["up"]), "down": int(row["down"]),
                "pairs": int(row["pairs"]), "new": int(new)}

    def new_count(self, tenant: str, user: str) -> int:
        """Feedback records past the user's watermark (one indexed query)."""
        return self._new_count(self._reader(), tenant, user)

    def count_after(self, tenant: str, user: str, seq: int) -> int:
        """The user's feedback records with a seq above ``seq``."""
        return int(self._reader().execute("SELECT COUNT(*) FROM feedback WHERE tenant=? AND user_id=? AND seq>?",
                                          (tenant, user, seq)).fetchone()[0])

    @staticmethod
    def _new_count(conn: sqlite3.Connection, tenant: str, user: str) -> int:
        return int(conn.execute(
            "SELECT COUNT(*) FROM feedback WHERE tenant=? AND user_id=? AND seq > COALESCE("
            "(SELECT attempted_upto FROM users WHERE tenant=? AND user_id=?), 0)", (tenant, user, tenant, user),
        ).fetchone()[0])

    def users(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """Every ``(tenant, user)`` with feedback."""
        if tenant is None:
            rows = self._reader().execute("SELECT DISTINCT tenant, user_id FROM feedback").fetchall()
        else:
            rows = self._reader().execute("SELECT DISTINCT tenant, user_id FROM feedback WHERE tenant=?",
                                          (tenant,)).fetchall()
        return [(r[0], r[1]) for r in rows]

    # -- completions ---------------------------------------------------------------------
    def add_completion(self, tenant: str, user: str, completion_id: str, prompt: str, completion: str,
                       adapter: dict[str, Any]) -> None:
        now = time.time()
        self._write(lambda conn: conn.execute(
            "INSERT INTO completions (id, tenant, user_id, prompt, completion, adapter, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (completion_id, tenant, user, prompt, completion, json.dumps(adapter), now)))

    def delete_completions(self, tenant: str, user: str, completion_ids: list[str]) -> int:
        if not completion_ids:
            return 0
        marks = ",".join("?" * len(completion_ids))
        return self._write(lambda conn: conn.execute(
            f"DELETE FROM completions WHERE tenant=? AND user_id=? AND id IN ({marks})",
            (tenant, user, *completion_ids)).rowcount)

    def get_completion(self, tenant: str, user: str, completion_id: str) -> dict[str, Any]:
        """A served completion of this tenant's user; :class:`NotFoundError` otherwise."""
        row = self._reader().execute("SELECT * FROM completions WHERE id=? AND tenant=? AND user_id=?",
                                     (completion_id, tenant, user)).fetchone()
        if row is None:
            raise NotFoundError(f"completion {completion_id!r} not found for user {user!r}")
        return {"id": row["id"], "prompt": row["prompt"], "completion": row["completion"],
                "adapter": json.loads(row["adapter"]), "created_at": row["created_at"]}

    # -- adaptation bookkeeping ----------------------------------------------------------
    def create_job(self, tenant: str, user: str, reason: str) -> dict[str, Any]:
        """Record a queued job covering all feedback so far (the watermark does not move:
        see :meth:`update_job`)."""
        jid = new_id("job")
        now = time.time()

        def tx(conn: sqlite3.Connection) -> int:
            upto = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM feedback WHERE tenant=? AND user_id=?",
                                (tenant, user)).fetchone()[0]
            conn.execute("INSERT INTO jobs (id, tenant, user_id, state, reason, upto_seq, created_at) "
                         "VALUES (?, ?, ?, 'queued', ?, ?, ?)", (jid, tenant, user, reason, upto, now))
            return int(upto)

        self._write(tx)
        return self.get_job(tenant, jid)

    def start_job(self, job_id: str) -> int:
        """Mark a job running and let it cover every record of its user so far; returns that
        ``upto`` seq. :class:`NotFoundError` if the job is gone (its user was erased)."""
        now = time.time()

        def tx(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT tenant, user_id FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"job {job_id!r} not found (its user was erased)")
            upto = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM feedback WHERE tenant=? AND user_id=?",
                                    (row["tenant"], row["user_id"])).fetchone()[0])
            conn.execute("UPDATE jobs SET state='running', upto_seq=?, started_at=? WHERE id=?", (upto, now, job_id))
            return upto

        return self._write(tx)

    def update_job(self, job_id: str, state: str, error: str | None = None,
                   result: dict[str, Any] | None = None) -> None:
        """Set a job's state. ``succeeded`` also moves its user's watermark up to the job's
        ``upto_seq`` (in the same transaction): those records are no longer new."""
        now = time.time()
        col = "started_at" if state == "running" else "finished_at"

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(f"UPDATE jobs SET state=?, error=?, result=?, {col}=? WHERE id=?",
                         (state, error, json.dumps(result) if result is not None else None, now, job_id))
            if state == "succeeded":  # nothing is inserted if the job (and its user) was erased
                conn.execute("INSERT INTO users (tenant, user_id, attempted_upto) "
                             "SELECT tenant, user_id, upto_seq FROM jobs WHERE id=? "
                             "ON CONFLICT (tenant, user_id) DO UPDATE SET "
                             "attempted_upto=MAX(attempted_upto, excluded.attempted_upto)", (job_id,))

        self._write(tx)

    def fail_unfinished_jobs(self, error: str = "server restarted before the job finished") -> int:
        """At start-up: jobs left queued/running by a previous process are marked failed."""
        now = time.time()
        return self._write(lambda conn: conn.execute(
            "UPDATE jobs SET state='failed', error=?, finished_at=? WHERE state IN ('queued', 'running')",
            (error, now)).rowcount)

    @staticmethod
    def _job(row: sqlite3.Row) -> dict[str, Any]:
        return {"id": row["id"], "user_id": row["user_id"], "state": row["state"], "reason": row["reason"],
                "error": row["error"], "result": json.loads(row["result"]) if row["result"] else None,
                "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
                "feedback_upto": row["upto_seq"]}

    def get_job(self, tenant: str, job_id: str) -> dict[str, Any]:
        row = self._reader().execute("SELECT * FROM jobs WHERE id=? AND tenant=?", (job_id, tenant)).fetchone()
        if row is None:
            raise NotFoundError(f"job {job_id!r} not found")
        return self._job(row)

    def latest_job(self, tenant: str, user: str) -> dict[str, Any] | None:
        row = self._reader().execute(
            "SELECT * FROM jobs WHERE tenant=? AND user_id=? ORDER BY created_at DESC LIMIT 1", (tenant, user)
        ).fetchone()
        return self._job(row) if row else None

    # -- erasure -------------------------------------------------------------------------
    def delete_user(self, tenant: str, user: str) -> int:
        """Erase every row about the user (feedback, completions, jobs, idempotency keys
        that point at their feedback), and the user's id in other users' completions that
        were served with the user's adapter as a neighbour (``adapter.neighbor`` becomes
        null, ``neighbor_erased`` true). Returns the number of feedback rows removed."""

        def tx(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM idempotency WHERE tenant=? AND feedback_id IN "
                         "(SELECT id FROM feedback WHERE tenant=? AND user_id=?)", (tenant, tenant, user))
            n = conn.execute("DELETE FROM feedback WHERE tenant=? AND user_id=?", (tenant, user)).rowcount
            conn.execute("DELETE FROM completions WHERE tenant=? AND user_id=?", (tenant, user))
            conn.execute("DELETE FROM jobs WHERE tenant=? AND user_id=?", (tenant, user))
            conn.execute("DELETE FROM users WHERE tenant=? AND user_id=?", (tenant, user))
            _forget_neighbor(conn, tenant, user)
            return n

        return self._write(tx)

    def forget_neighbor(self, tenant: str, neighbor: str, user: str, completion_ids: list[str]) -> int:
        if not completion_ids:
            return 0
        return self._write(lambda conn: _forget_neighbor(conn, tenant, neighbor, user, completion_ids))

    def user_exists(self, tenant: str, user: str) -> bool:
        conn = self._reader()
        for table in ("feedback", "completions", "jobs"):
            if conn.execute(f"SELECT 1 FROM {table} WHERE tenant=? AND user_id=? LIMIT 1",
                            (tenant, user)).fetchone():
                return True
        return False


def open_feedback_store(url: str | os.PathLike, **kw: Any) -> FeedbackStore:
    """Open a store from a URL: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``
    (SQLAlchemy's convention), a plain file path, or ``postgresql://...`` (not implemented)."""
    s = str(url)
    if s.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        try:
            import psycopg  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "a PostgreSQL feedback store needs the psycopg driver: pip install 'psycopg[binary]' "
                "(and note that this build only implements the SQLite backend)"
            ) from e
        raise ConfigError("the PostgreSQL feedback store backend is not implemented in this build; use sqlite:///...")
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///"):]
        if not s:
            raise ConfigError("sqlite URL needs a path: sqlite:///path/to/feedback.db")
    elif "://" in s:
        raise ConfigError(f"unsupported feedback store URL {s!r}; use sqlite:///path or postgresql://...")
    return SQLiteFeedbackStore(s, **kw)


def _forget_neighbor(conn: sqlite3.Connection, tenant: str, neighbor: str, user: str | None = None,
                     completion_ids: Sequence[str] = ()) -> int:
    """Null ``neighbor`` in the adapter column of the tenant's completions (only ``user``'s of
    these ids when given), inside a write transaction; returns how many rows changed."""
    where, args = "", ()
    if user is not None:
        where = f" AND user_id=? AND id IN ({','.join('?' * len(completion_ids))})"
        args = (user, *completion_ids)
    return conn.execute(
        "UPDATE completions SET adapter = json_set(adapter, '$.neighbor', json('null'), '$.neighbor_erased', "
        "json('true')) WHERE tenant=? AND CASE WHEN json_valid(adapter) THEN json_extract(adapter, '$.neighbor') "
        f"END = ?{where}", (tenant, neighbor, *args)).rowcount  # a malformed row must not stop an erasure
