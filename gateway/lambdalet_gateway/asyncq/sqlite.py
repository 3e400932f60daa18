"""``SqliteQueue``: the embedded platform's durable event queue.

One SQLite file in WAL mode with ``synchronous=FULL`` (the WAL is fsynced at every commit), written by
exactly one thread. Callers on the event loop submit operations; the writer thread runs every operation
waiting at that moment in one transaction and commits once (group commit), then resolves their futures —
so ``put`` returns, and the gateway answers 202, only after the event's commit reached the disk, while a
burst of concurrent puts shares one fsync.

Leases: a leased row carries ``leased_until``. A process that opens the file reclaims every lease (one
process owns a queue file), and marks those events as redelivered: the function may have run already.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from lambdalet_gateway.asyncq.model import Delivery, Event, LastResponse
from lambdalet_gateway.asyncq.queue import QueueUnavailable, Settlement

log = logging.getLogger("lambdalet.asyncq.sqlite")

T = TypeVar("T")

#: A lease outlives the longest invocation (Lambda's 900 s timeout); a live worker settles long before.
LEASE_SECONDS = 960.0
_BATCH = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    function TEXT NOT NULL,
    payload BLOB NOT NULL,
    received_at REAL NOT NULL,
    not_before REAL NOT NULL,
    leased_until REAL NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    invokes INTEGER NOT NULL DEFAULT 0,
    throttles INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_version TEXT,
    last_error TEXT,
    last_payload BLOB
);
CREATE INDEX IF NOT EXISTS events_due ON events (not_before, seq);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_subject ON messages (subject, seq);
"""

_COLUMNS = (
    "seq, request_id, function, payload, received_at, not_before, leased_until, errors, invokes, throttles, "
    "last_status, last_version, last_error, last_payload"
)

Op = Callable[[sqlite3.Connection], Any]


def _event(row: tuple[Any, ...]) -> tuple[int, Event, bool]:
    (seq, request_id, function, payload, received_at, not_before, leased_until, errors, invokes, throttles) = row[:10]
    last_status, last_version, last_error, last_payload = row[10:]
    last = (
        LastResponse(int(last_status), str(last_version), last_error, bytes(last_payload or b""))
        if last_status is not None
        else None
    )
    event = Event(
        request_id=request_id,
        function=function,
        payload=bytes(payload),
        received_at=received_at,
        not_before=not_before,
        errors=errors,
        invokes=invokes,
        throttles=throttles,
        last=last,
    )
    return int(seq), event, leased_until > 0


def _insert(conn: sqlite3.Connection, event: Event) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO events (request_id, function, payload, received_at, not_before, errors, invokes, "
        "throttles) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.request_id,
            event.function,
            event.payload,
            event.received_at,
            event.not_before,
            event.errors,
            event.invokes,
            event.throttles,
        ),
    )


class SqliteQueue:
    """The ``EventQueue`` of the embedded platform (see the module docstring)."""

    def __init__(self, path: Path, *, reclaim: bool = True) -> None:
        self.path = path
        self._reclaim = reclaim
        self._ops: queue.SimpleQueue[tuple[Op, Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: BinaryIO | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One process owns a queue file: a second one would reclaim the first one's leases.
        lock = self.path.with_name(self.path.name + ".lock").open("a+b")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise QueueUnavailable(
                f"the async queue {self.path} is in use by another gateway process "
                "(give each one its own LAMBDALET_ASYNC_SQLITE_PATH or LAMBDALET_STATE_DIR)"
            ) from None
        self._lock = lock
        opened: Future[None] = Future()
        self._thread = threading.Thread(target=self._writer, args=(opened,), name="asyncq-sqlite", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(opened)
        if self._reclaim:
            reclaimed = await self._submit(
                lambda c: c.execute("UPDATE events SET leased_until = 1 WHERE leased_until > 1").rowcount
            )
            if reclaimed:
                log.warning("reclaimed %d events leased by a previous process", reclaimed)
        self._ready.set()

    async def close(self) -> None:
        if self._thread is not None:
            self._ops.put(None)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _writer(self, opened: Future[None]) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            opened.set_exception(QueueUnavailable(f"cannot open {self.path}: {exc}"))
            return
        opened.set_result(None)
        try:
            while True:
                first = self._ops.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < _BATCH:
                    try:
                        item = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._run(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    @staticmethod
    def _run(conn: sqlite3.Connection, batch: list[tuple[Op, Future[Any]]]) -> None:
        # A caller that gave up (cancelled) before its operation started does not get it run.
        batch = [(op, future) for op, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        results: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((future, op(conn), None))
                    conn.execute("RELEASE op")
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((future, None, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, future in batch:
                future.set_exception(QueueUnavailable(f"commit failed: {exc}"))
            return
        for future, result, error in results:
            if error is not None:
                future.set_exception(QueueUnavailable(str(error)))
            else:
                future.set_result(result)

    async def _submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None:
            raise QueueUnavailable("the queue is not open")
        future: Future[T] = Future()
        self._ops.put((op, future))
        return await asyncio.wrap_future(future)

    # -- EventQueue -----------------------------------------------------------------------------------------

    async def put(self, event: Event) -> None:
        await self._submit(lambda c: _insert(c, event))
        self._ready.set()

    async def lease(self, limit: int, exclude: frozenset[str], now: float) -> list[Delivery]:
        def op(conn: sqlite3.Connection) -> list[Delivery]:
            sql = f"SELECT {_COLUMNS} FROM events WHERE not_before <= ? AND leased_until <= ?"
            params: list[Any] = [now, now]
            if exclude:
                sql += f" AND function NOT IN ({','.join('?' * len(exclude))})"
                params += sorted(exclude)
            sql += " ORDER BY not_before, seq LIMIT ?"
            params.append(limit)
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                return []
            seqs = [row[0] for row in rows]
            conn.execute(
                f"UPDATE events SET leased_until = ?, invokes = invokes + 1 WHERE seq IN ({','.join('?' * len(seqs))})",
                [now + LEASE_SECONDS, *seqs],
            )
            deliveries = []
            for row in rows:
                seq, event, redelivered = _event(row)
                leased = replace(event, invokes=event.invokes + 1)
                deliveries.append(Delivery(leased, redelivered=redelivered, token=seq))
            return deliveries

        return await self._submit(op)

    async def complete(self, delivery: Delivery, settlement: Settlement) -> None:
        created = time.time()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM events WHERE seq = ?", (delivery.token,))
            for event in settlement.events:
                _insert(conn, event)
            for message in settlement.messages:
                conn.execute(
                    "INSERT INTO messages (subject, body, created_at) VALUES (?, ?, ?)",
                    (message.subject, message.body, created),
                )

        await self._submit(op)
        if settlement.events:
            self._ready.set()

    async def reschedule(
        self,
        delivery: Delivery,
        not_before: float,
        *,
        ran: bool,
        function_error: bool,
        last: LastResponse | None,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            sets = "not_before = ?, leased_until = 0, errors = errors + ?"
            params: list[Any] = [not_before, 1 if function_error else 0]
            if ran:
                sets += ", throttles = 0"
            else:
                sets += ", throttles = throttles + 1, invokes = invokes - 1"
            if last is not None:
                sets += ", last_status = ?, last_version = ?, last_error = ?, last_payload = ?"
                params += [last.status_code, last.executed_version, last.function_error, last.payload]
            conn.execute(f"UPDATE events SET {sets} WHERE seq = ?", [*params, delivery.token])

        await self._submit(op)

    async def release(self, delivery: Delivery) -> None:
        await self._submit(
            lambda c: c.execute(
                "UPDATE events SET leased_until = ?, invokes = invokes - 1 WHERE seq = ?",
                (1 if delivery.redelivered else 0, delivery.token),
            )
        )

    async def wait(self, within: float) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), within)
        except TimeoutError:
            return
        self._ready.clear()

    async def depth(self) -> Mapping[str, int]:
        rows = await self._submit(
            lambda c: c.execute("SELECT function, COUNT(*) FROM events GROUP BY function").fetchall()
        )
        return {str(name): int(count) for name, count in rows}

    async def heartbeat(self, delivery: Delivery) -> None:
        return None

    # -- destination queues (embedded) ----------------------------------------------------------------------

    async def messages(self, subject: str) -> list[bytes]:
        """Every record stored for a destination queue subject, oldest first."""
        rows = await self._submit(
            lambda c: c.execute("SELECT body FROM messages WHERE subject = ? ORDER BY seq", (subject,)).fetchall()
        )
        return [bytes(row[0]) for row in rows]


def read_messages(path: Path, subject: str) -> list[bytes]:
    """Read a destination queue's records straight from a queue file (tools and tests; read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT body FROM messages WHERE subject = ? ORDER BY seq", (subject,)).fetchall()
    finally:
        conn.close()
    return [bytes(row[0]) for row in rows]


def read_events(path: Path) -> Mapping[str, str]:
    """Request id to function for every event still queued (tools and tests; read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT request_id, function FROM events").fetchall()
    finally:
        conn.close()
    return {str(r): str(f) for r, f in rows}
