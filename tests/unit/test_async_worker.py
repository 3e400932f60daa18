"""The delivery worker against a real SqliteQueue and a five-line fake invoker: retries, both destinations,
event-age expiry, throttles, reserved concurrency, and the metrics a user would read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lambdalet_gateway.asyncq.metrics import AsyncMetrics
from lambdalet_gateway.asyncq.model import Destination, FunctionSettings, InvokeResult, Throttled
from lambdalet_gateway.asyncq.policy import Timing
from lambdalet_gateway.asyncq.queue import StaticFunctions
from lambdalet_gateway.asyncq.settings import AsyncSettings
from lambdalet_gateway.asyncq.sqlite import SqliteQueue
from lambdalet_gateway.asyncq.worker import Worker
from prometheus_client import CollectorRegistry

ARN = "arn:aws:lambda:us-east-1:000000000000:function:"
Behaviour = Callable[[str, bytes, int], Awaitable[InvokeResult]]


@dataclass
class FakeInvoker:
    behaviours: dict[str, Behaviour]
    calls: list[tuple[str, str, bytes]] = field(default_factory=list)

    async def invoke(self, function: str, payload: bytes, *, request_id: str) -> InvokeResult:
        self.calls.append((function, request_id, payload))
        attempt = sum(1 for f, r, _ in self.calls if (f, r) == (function, request_id))
        return await self.behaviours[function](request_id, payload, attempt)


async def ok(request_id: str, payload: bytes, attempt: int) -> InvokeResult:
    return InvokeResult(200, b'{"ok": true}')


async def boom(request_id: str, payload: bytes, attempt: int) -> InvokeResult:
    return InvokeResult(200, b'{"errorMessage":"boom","errorType":"Error"}', function_error="Unhandled")


def settings(**timing: Any) -> AsyncSettings:
    return AsyncSettings(
        worker_concurrency=8,
        timing=Timing(**{"retry_delay_scale": 0.002, "throttle_backoff_max": 0.05, **timing}),
    )


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return found or 0.0


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SqliteQueue]:
    q = SqliteQueue(tmp_path / "q.sqlite3")
    await q.start()
    yield q
    await q.close()


async def running(
    queue: SqliteQueue, invoker: FakeInvoker, functions: list[FunctionSettings], registry: CollectorRegistry, **kw: Any
) -> Worker:
    worker = Worker(
        queue,
        invoker,
        StaticFunctions({f.name: f for f in functions}),
        settings=settings(**kw),
        metrics=AsyncMetrics(registry),
    )
    await worker.start()
    return worker


async def records(queue: SqliteQueue, subject: str) -> list[dict[str, Any]]:
    return [json.loads(body) for body in await queue.messages(subject)]


async def test_function_errors_retry_twice_then_record_goes_to_failure_queue(queue: SqliteQueue) -> None:
    registry = CollectorRegistry()
    invoker = FakeInvoker({"orders": boom})
    orders = FunctionSettings(name="orders", arn=ARN + "orders", on_failure=Destination(queue="failed"))
    worker = await running(queue, invoker, [orders], registry)
    request_id = await worker.accept("orders", b'{"order": 7}')

    async def recorded() -> bool:
        return bool(await queue.messages("failed"))

    await eventually(recorded)
    await worker.stop()
    # the same request id ran three times: the first attempt and two retries
    assert [r for _, r, _ in invoker.calls] == [request_id] * 3
    [record] = await records(queue, "failed")
    assert record["version"] == "1.0"
    assert record["timestamp"].endswith("Z")
    assert record["requestContext"] == {
        "requestId": request_id,
        "functionArn": ARN + "orders:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == {"order": 7}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"}
    assert record["responsePayload"] == {"errorMessage": "boom", "errorType": "Error"}
    assert value(registry, "lambdalet_async_events_retried_total", function="orders", reason="function_error") == 2
    assert value(registry, "lambdalet_async_events_dropped_total", function="orders", reason="retries_exhausted") == 1
    assert await queue.depth() == {}


async def test_success_record_goes_to_a_destination_function_as_a_new_async_event(queue: SqliteQueue) -> None:
    registry = CollectorRegistry()
    received: list[bytes] = []
    done = asyncio.Event()

    async def audit(request_id: str, payload: bytes, attempt: int) -> InvokeResult:
        received.append(payload)
        done.set()
        return InvokeResult(200, b"null")

    invoker = FakeInvoker({"orders": ok, "audit": audit})
    orders = FunctionSettings(name="orders", arn=ARN + "orders", on_success=Destination(function="audit"))
    audit_fn = FunctionSettings(name="audit", arn=ARN + "audit")
    worker = await running(queue, invoker, [orders, audit_fn], registry)
    request_id = await worker.accept("orders", b'"hello"')
    await asyncio.wait_for(done.wait(), 10)
    await worker.stop()
    record = json.loads(received[0])
    assert record["requestContext"]["requestId"] == request_id
    assert record["requestContext"]["condition"] == "Success"
    assert record["requestContext"]["approximateInvokeCount"] == 1
    assert record["requestPayload"] == "hello"
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert record["responsePayload"] == {"ok": True}
    # the destination ran under its own request id
    assert invoker.calls[1][1] != request_id
    assert (
        value(
            registry,
            "lambdalet_async_destination_deliveries_total",
            function="orders",
            condition="Success",
            kind="function",
        )
        == 1
    )
    assert value(registry, "lambdalet_async_events_delivered_total", function="orders") == 1


async def test_an_error_then_success_is_delivered_without_a_failure_record(queue: SqliteQueue) -> None:
    async def flaky(request_id: str, payload: bytes, attempt: int) -> InvokeResult:
        return await (boom if attempt == 1 else ok)(request_id, payload, attempt)

    registry = CollectorRegistry()
    invoker = FakeInvoker({"orders": flaky})
    orders = FunctionSettings(
        name="orders", arn=ARN + "orders", on_success=Destination(queue="ok"), on_failure=Destination(queue="bad")
    )
    worker = await running(queue, invoker, [orders], registry)
    await worker.accept("orders", b"{}")

    async def succeeded() -> bool:
        return bool(await queue.messages("ok"))

    await eventually(succeeded)
    await worker.stop()
    [record] = await records(queue, "ok")
    assert record["requestContext"]["approximateInvokeCount"] == 2
    assert await queue.messages("bad") == []


async def test_zero_retries_fail_after_one_attempt(queue: SqliteQueue) -> None:
    invoker = FakeInvoker({"orders": boom})
    orders = FunctionSettings(
        name="orders", arn=ARN + "orders", maximum_retry_attempts=0, on_failure=Destination(queue="bad")
    )
    worker = await running(queue, invoker, [orders], CollectorRegistry())
    await worker.accept("orders", b"{}")

    async def failed() -> bool:
        return bool(await queue.messages("bad"))

    await eventually(failed)
    await worker.stop()
    assert len(invoker.calls) == 1


async def test_event_older_than_maximum_age_goes_to_failure_with_event_age_exceeded(queue: SqliteQueue) -> None:
    registry = CollectorRegistry()
    invoker = FakeInvoker({"orders": boom})
    # retries wait 60 s x 0.01 = 0.6 s; the maximum age is 60 s x 0.002 = 0.12 s: the retry finds it expired
    orders = FunctionSettings(
        name="orders", arn=ARN + "orders", maximum_event_age_seconds=60, on_failure=Destination(queue="bad")
    )
    worker = await running(queue, invoker, [orders], registry, retry_delay_scale=0.01, event_age_scale=0.002)
    await worker.accept("orders", b"{}")

    async def failed() -> bool:
        return bool(await queue.messages("bad"))

    await eventually(failed)
    await worker.stop()
    [record] = await records(queue, "bad")
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestContext"]["approximateInvokeCount"] == 1
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert len(invoker.calls) == 1
    assert value(registry, "lambdalet_async_events_dropped_total", function="orders", reason="event_age_exceeded") == 1


async def test_throttled_events_wait_and_eventually_run_without_using_retries(queue: SqliteQueue) -> None:
    registry = CollectorRegistry()
    throttles = 5

    async def busy(request_id: str, payload: bytes, attempt: int) -> InvokeResult:
        if attempt <= throttles:
            raise Throttled("ReservedFunctionConcurrentInvocationLimitExceeded")
        return InvokeResult(200, b"{}")

    invoker = FakeInvoker({"orders": busy})
    orders = FunctionSettings(
        name="orders", arn=ARN + "orders", maximum_retry_attempts=0, on_success=Destination(queue="ok")
    )
    worker = await running(queue, invoker, [orders], registry)
    await worker.accept("orders", b"{}")

    async def succeeded() -> bool:
        return bool(await queue.messages("ok"))

    await eventually(succeeded)
    await worker.stop()
    [record] = await records(queue, "ok")
    # throttles are not invocations
    assert record["requestContext"]["approximateInvokeCount"] == 1
    assert value(registry, "lambdalet_async_events_retried_total", function="orders", reason="throttled") == throttles


async def test_reserved_concurrency_caps_deliveries_in_flight(queue: SqliteQueue) -> None:
    running_now = 0
    peak = 0
    finished = 0
    all_done = asyncio.Event()

    async def slow(request_id: str, payload: bytes, attempt: int) -> InvokeResult:
        nonlocal running_now, peak, finished
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.01)
        running_now -= 1
        finished += 1
        if finished == 20:
            all_done.set()
        return InvokeResult(200, b"{}")

    invoker = FakeInvoker({"orders": slow})
    orders = FunctionSettings(name="orders", arn=ARN + "orders", reserved_concurrency=2)
    worker = await running(queue, invoker, [orders], CollectorRegistry())
    for _ in range(20):
        await worker.accept("orders", b"{}")
    await asyncio.wait_for(all_done.wait(), 20)
    await worker.stop()
    assert peak == 2


async def test_reserved_concurrency_zero_sends_events_straight_to_failure(queue: SqliteQueue) -> None:
    invoker = FakeInvoker({"orders": ok})
    orders = FunctionSettings(
        name="orders", arn=ARN + "orders", reserved_concurrency=0, on_failure=Destination(queue="bad")
    )
    worker = await running(queue, invoker, [orders], CollectorRegistry())
    await worker.accept("orders", b"{}")

    async def failed() -> bool:
        return bool(await queue.messages("bad"))

    await eventually(failed)
    await worker.stop()
    [record] = await records(queue, "bad")
    assert record["requestContext"]["approximateInvokeCount"] == 0
    assert invoker.calls == []


async def test_events_of_an_unknown_function_wait_then_drop_past_the_maximum_age(queue: SqliteQueue) -> None:
    registry = CollectorRegistry()
    invoker = FakeInvoker({})
    # 21600 s x 0.00005 = about 1 s: the events wait (backoff) and are dropped after that
    worker = Worker(
        queue,
        invoker,
        StaticFunctions({}),
        settings=settings(event_age_scale=0.00005),
        metrics=AsyncMetrics(registry),
    )
    await worker.accept("orders", b"{}")
    await worker.accept("orders", b"{}")
    await worker.start()

    async def depth_seen() -> bool:
        return value(registry, "lambdalet_async_queue_depth", function="orders") == 2

    await eventually(depth_seen)

    async def dropped() -> bool:
        return (
            value(registry, "lambdalet_async_events_dropped_total", function="orders", reason="function_not_found") == 2
        )

    await eventually(dropped)
    await worker.stop()
    assert value(registry, "lambdalet_async_events_received_total", function="orders") == 2
    assert value(registry, "lambdalet_async_events_retried_total", function="orders", reason="function_not_found") >= 2
    assert await queue.depth() == {}


async def test_graceful_stop_lets_deliveries_in_flight_finish_and_settle(queue: SqliteQueue) -> None:
    started = asyncio.Event()

    async def slow(request_id: str, payload: bytes, attempt: int) -> InvokeResult:
        started.set()
        await asyncio.sleep(0.2)
        return InvokeResult(200, b"{}")

    registry = CollectorRegistry()
    worker = await running(queue, FakeInvoker({"orders": slow}), [FunctionSettings(name="orders", arn="a")], registry)
    await worker.accept("orders", b"{}")
    await asyncio.wait_for(started.wait(), 10)
    await worker.stop(grace=5.0)
    # settled before the stop returned: nothing left to run again after a restart
    assert await queue.depth() == {}
    assert value(registry, "lambdalet_async_events_delivered_total", function="orders") == 1
