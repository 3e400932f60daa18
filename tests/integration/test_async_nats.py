"""NatsQueue against a real nats-server (JetStream, file storage): the worker's retry policy and
destinations through the broker; no accepted event lost when the broker is SIGKILLed and restarted; and
``lambdalet up`` on the NATS queue with both the gateway and the broker SIGKILLed at random points."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from async_support import (
    RECORDING_FUNCTION,
    NatsServer,
    eventually,
    gateway_process,
    nats_server,
    read_lines,
    write_function,
)
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


@pytest.mark.slow
@pytest.mark.timeout(240)  # usually 5-40 s; headroom for a machine shared with heavy builds
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


@pytest.mark.slow
@pytest.mark.timeout(240)  # usually 5-40 s; headroom for a machine shared with heavy builds
async def test_lambdalet_up_on_nats_survives_gateway_and_broker_sigkills(tmp_path: Path, server: NatsServer) -> None:
    """The Kubernetes arrangement on one machine: the gateway (``lambdalet up`` with the NATS queue) and the
    broker are separate processes. 2,000 events; the gateway is SIGKILLed twice and the broker twice, at
    random points; every accepted event runs (function-side proof) or has its failure record."""
    manifests = tmp_path / "functions"
    manifests.mkdir()
    runs = tmp_path / "runs.txt"
    write_function(
        manifests,
        "recorder",
        RECORDING_FUNCTION,
        reservedConcurrency=4,
        environment={"variables": {"RUNS_FILE": str(runs)}},
        **{"async": {"maximumRetryAttempts": 1, "destinations": {"onFailure": {"queue": "nats-failures"}}}},
    )
    env = {
        "LAMBDALET_ASYNC_BACKEND": "nats",
        "LAMBDALET_NATS_URL": server.url,
        "LAMBDALET_ASYNC_ACK_WAIT": "2",
        "LAMBDALET_ASYNC_RETRY_DELAY_SCALE": "0.005",
        "LAMBDALET_ASYNC_THROTTLE_BACKOFF_MAX": "0.2",
    }
    total, failing_every = 2000, 40
    rng = random.Random(4222)
    faults = dict(
        zip(sorted(rng.sample(range(200, total - 200), 4)), ["gateway", "broker", "gateway", "broker"], strict=True)
    )
    accepted: dict[str, int] = {}
    refused = 0
    reader = NatsQueue(server.url)
    with gateway_process(tmp_path / "gw", manifests, env) as gateway:
        url = f"{gateway.url}/2015-03-31/functions/recorder/invocations"
        next_index = 0
        progress = asyncio.Event()

        async def sender(session: aiohttp.ClientSession) -> None:
            nonlocal next_index, refused
            while next_index < total:
                index = next_index
                next_index += 1
                event = {"i": index, "fail": index % failing_every == 0}
                while True:
                    try:
                        async with session.post(
                            url, data=io.BytesIO(json.dumps(event).encode()), headers={"X-Amz-Invocation-Type": "Event"}
                        ) as response:
                            if response.status == 202:
                                accepted[response.headers["x-amzn-RequestId"]] = index
                                progress.set()
                                break
                    except (aiohttp.ClientError, OSError):
                        pass
                    refused += 1
                    await asyncio.sleep(0.2)

        async def faulter() -> None:
            for point, target in faults.items():
                while len(accepted) < point:
                    progress.clear()
                    await progress.wait()
                if target == "gateway":
                    await asyncio.to_thread(gateway.kill)
                    await asyncio.to_thread(gateway.start)
                else:
                    await asyncio.to_thread(server.restart)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
            await asyncio.gather(faulter(), *(sender(session) for _ in range(16)))

        failing = {r for r, i in accepted.items() if i % failing_every == 0}
        failed: set[str] = set()
        await reader.start()
        try:

            async def settled() -> bool:
                nonlocal failed
                ran = set(read_lines(runs))
                if not all(r in ran for r in accepted):
                    return False
                failed = {json.loads(m)["requestContext"]["requestId"] for m in await reader.messages("nats-failures")}
                return failed >= failing

            await eventually(settled, within=90, every=0.5)
        finally:
            await reader.close()

    counts = Counter(read_lines(runs))
    assert [r for r in accepted if counts[r] == 0] == []
    assert failed >= failing
    duplicates = sum(max(0, counts[r] - (2 if r in failing else 1)) for r in accepted)
    print(
        f"\nlambdalet up on NATS, gateway SIGKILL x2 + broker SIGKILL x2: accepted={len(accepted)} "
        f"refused_attempts={refused} duplicate_runs={duplicates}"
    )
