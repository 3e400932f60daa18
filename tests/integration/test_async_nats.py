"""NatsQueue against a real nats-server (JetStream, file storage): the worker's retry policy and
destinations through the broker, and no accepted event lost when the broker is SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from async_support import NatsServer, eventually, nats_server
from lambdalet_gateway.asyncq.jetstream import NatsQueue
from lambdalet_gateway.asyncq.metrics import AsyncMetrics
from lambdalet_gateway.asyncq.model import Destination, FunctionSettings, InvokeResult
from lambdalet_gateway.asyncq.policy import Timing
from lambdalet_gateway.asyncq.queue import QueueUnavailable, StaticFunctions
from lambdalet_gateway.asyncq.settings import AsyncSettings
from lambdalet_gateway.asyncq.worker import Worker
from prometheus_client import CollectorRegistry

ARN = "arn:aws:lambda:us-east-1:000000000000:function:"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path / "nats") as running:
        yield running


@pytest.fixture
async def queue(server: NatsServer) -> AsyncIterator[NatsQueue]:
    q = NatsQueue(server.url, ack_wait=5.0)
    await q.start()
    yield q
    await q.close()


class Invoker:
    """Runs 'ok' successfully and 'boom' with a function error; records every run."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()

    async def invoke(self, function: str, payload: bytes, *, request_id: str) -> InvokeResult:
        self.runs[request_id] += 1
        if function == "boom":
            return InvokeResult(200, b'{"errorMessage":"no","errorType":"Error"}', function_error="Unhandled")
        return InvokeResult(200, b'{"done":true}')


def worker(queue: NatsQueue, invoker: Invoker, registry: CollectorRegistry) -> Worker:
    functions = StaticFunctions(
        {
            "ok": FunctionSettings(name="ok", arn=ARN + "ok", on_success=Destination(queue="results.ok")),
            "boom": FunctionSettings(name="boom", arn=ARN + "boom", on_failure=Destination(queue="results.failed")),
        }
    )
    return Worker(
        queue,
        invoker,
        functions,
        settings=AsyncSettings(worker_concurrency=32, timing=Timing(retry_delay_scale=0.002), ack_wait=5.0),
        metrics=AsyncMetrics(registry),
    )


async def test_retries_and_destinations_through_jetstream(queue: NatsQueue) -> None:
    invoker = Invoker()
    w = worker(queue, invoker, CollectorRegistry())
    await w.start()
    try:
        good = await w.accept("ok", b'{"n": 1}')
        bad = await w.accept("boom", b'{"n": 2}')

        async def both() -> bool:
            return bool(await queue.messages("results.ok")) and bool(await queue.messages("results.failed"))

        await eventually(both)
    finally:
        await w.stop()
    [success] = [json.loads(m) for m in await queue.messages("results.ok")]
    [failure] = [json.loads(m) for m in await queue.messages("results.failed")]
    assert success["requestContext"]["requestId"] == good
    assert success["requestContext"]["condition"] == "Success"
    assert success["responsePayload"] == {"done": True}
    assert failure["requestContext"] == {
        "requestId": bad,
        "functionArn": ARN + "boom:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert failure["requestPayload"] == {"n": 2}
    assert failure["responseContext"]["functionError"] == "Unhandled"
    assert invoker.runs[bad] == 3
    assert await queue.depth() == {}


async def test_broker_sigkill_and_restart_loses_no_accepted_event(queue: NatsQueue, server: NatsServer) -> None:
    """2,000 events accepted while the broker is SIGKILLed and restarted three times: every accepted
    event runs at least once, and each failing one has its record in the failure destination."""
    total = 2000
    invoker = Invoker()
    w = worker(queue, invoker, CollectorRegistry())
    await w.start()
    accepted: dict[str, str] = {}
    refused = 0
    kill_points = set(random.Random(8).sample(range(100, total - 100), 3))
    failed: set[str] = set()
    try:
        for i in range(total):
            if i in kill_points:
                await asyncio.to_thread(server.restart)
            function = "boom" if i % 50 == 0 else "ok"
            try:
                accepted[await w.accept(function, json.dumps({"i": i}).encode())] = function
            except QueueUnavailable:
                refused += 1  # not accepted: the caller got an error, never a 202
        failing = {r for r, f in accepted.items() if f == "boom"}

        async def settled() -> bool:
            nonlocal failed
            if not all(r in invoker.runs for r in accepted):
                return False
            failed = {json.loads(m)["requestContext"]["requestId"] for m in await queue.messages("results.failed")}
            return failed >= failing

        await eventually(settled, within=90, every=0.5)
    finally:
        await w.stop()
    lost = [r for r in accepted if r not in invoker.runs]
    assert lost == []
    assert failed == failing
    assert all(invoker.runs[r] >= 3 for r in failed)
    duplicates = sum(n - 1 for r, n in invoker.runs.items() if accepted.get(r) == "ok")
    print(f"\nNATS broker SIGKILL x3: accepted={len(accepted)} refused={refused} duplicate_runs={duplicates}")
