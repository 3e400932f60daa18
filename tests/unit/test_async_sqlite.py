"""SqliteQueue: durable puts, leases, settling with follow-ups, and reclaiming a dead process's leases."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from lambdalet_gateway.asyncq.model import Event, LastResponse
from lambdalet_gateway.asyncq.queue import Message, QueueUnavailable, Settlement
from lambdalet_gateway.asyncq.sqlite import SqliteQueue, read_events, read_messages


def event(request_id: str, function: str = "f", at: float = 100.0) -> Event:
    return Event(request_id=request_id, function=function, payload=b'{"n": 1}', received_at=at, not_before=at)


async def test_put_is_committed_with_full_sync_in_wal_mode(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.sqlite3")
    await queue.start()
    await asyncio.gather(*(queue.put(event(f"r{i}")) for i in range(50)))
    # another connection sees every event: they are committed, not buffered in this process
    assert len(read_events(tmp_path / "q.sqlite3")) == 50
    conn = sqlite3.connect(tmp_path / "q.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    await queue.close()


async def test_lease_counts_invokes_and_skips_leased_and_excluded(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.sqlite3")
    await queue.start()
    await queue.put(event("a", "f"))
    await queue.put(event("b", "g"))
    await queue.put(event("later", "f", at=500.0))
    first = await queue.lease(10, frozenset({"g"}), now=200.0)
    assert [d.event.request_id for d in first] == ["a"]
    assert first[0].event.invokes == 1
    assert not first[0].redelivered
    assert await queue.lease(10, frozenset({"g"}), now=200.0) == []
    second = await queue.lease(10, frozenset(), now=200.0)
    assert [d.event.request_id for d in second] == ["b"]
    assert await queue.depth() == {"f": 2, "g": 1}
    await queue.close()


async def test_reschedule_after_function_error_and_after_throttle(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.sqlite3")
    await queue.start()
    await queue.put(event("a"))
    [leased] = await queue.lease(1, frozenset(), now=200.0)
    last = LastResponse(200, "$LATEST", "Unhandled", b"{}")
    await queue.reschedule(leased, 260.0, ran=True, function_error=True, last=last)
    assert await queue.lease(1, frozenset(), now=259.0) == []
    [again] = await queue.lease(1, frozenset(), now=260.0)
    assert (again.event.errors, again.event.invokes, again.event.last) == (1, 2, last)
    await queue.reschedule(again, 261.0, ran=False, function_error=False, last=None)
    [third] = await queue.lease(1, frozenset(), now=261.0)
    # a throttle is not an invoke and not an error; it counts toward the backoff
    assert (third.event.errors, third.event.invokes, third.event.throttles) == (1, 2, 1)
    await queue.close()


async def test_complete_removes_and_stores_follow_ups_together(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    queue = SqliteQueue(path)
    await queue.start()
    await queue.put(event("a"))
    [leased] = await queue.lease(1, frozenset(), now=200.0)
    await queue.complete(
        leased, Settlement(events=[event("dest", "other")], messages=[Message("failures", b'{"r": 1}')])
    )
    assert read_events(path) == {"dest": "other"}
    assert read_messages(path, "failures") == [b'{"r": 1}']
    assert await queue.messages("failures") == [b'{"r": 1}']
    await queue.close()


async def test_a_new_process_reclaims_leases_and_marks_them_redelivered(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    crashed = SqliteQueue(path)
    await crashed.start()
    await crashed.put(event("a"))
    await crashed.put(event("b"))
    leased = await crashed.lease(1, frozenset(), now=200.0)
    assert [d.event.request_id for d in leased] == ["a"]
    await crashed.close()  # the lease was never settled: as if the process died mid-invocation

    restarted = SqliteQueue(path)
    await restarted.start()
    found = {d.event.request_id: d for d in await restarted.lease(10, frozenset(), now=201.0)}
    assert set(found) == {"a", "b"}
    assert found["a"].redelivered and found["a"].event.invokes == 2
    assert not found["b"].redelivered
    await restarted.close()


async def test_duplicate_request_id_is_stored_once(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.sqlite3")
    await queue.start()
    await queue.put(event("same"))
    await queue.put(event("same"))
    assert await queue.depth() == {"f": 1}
    await queue.close()


async def test_a_second_process_cannot_open_a_queue_file_in_use(tmp_path: Path) -> None:
    first = SqliteQueue(tmp_path / "q.sqlite3")
    await first.start()
    second = SqliteQueue(tmp_path / "q.sqlite3")
    try:
        await second.start()
    except QueueUnavailable as exc:
        assert "in use by another gateway" in str(exc)
    else:
        raise AssertionError("two owners of one queue file")
    await first.close()
    await second.start()  # free again once the first owner is gone
    await second.close()
