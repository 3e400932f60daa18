"""Asynchronous invocation end to end through ``lambdalet up`` (a real gateway process, the SQLite queue,
real agents): 202 only with a request id, 413 beyond 1 MB, ``lambdalet invoke --async``, Lambda's retries
with the same request id on every attempt (proved from the function side), both destinations with the
record checked field by field, event-age expiry, throttled events that still run, and the async metrics."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from async_support import (
    AUDIT_FUNCTION,
    LAMBDALET,
    RECORDING_FUNCTION,
    GatewayProcess,
    eventually,
    gateway_process,
    metric,
    read_lines,
    write_function,
)
from lambdalet_gateway.asyncq.sqlite import read_messages

ARN = "arn:aws:lambda:us-east-1:000000000000:function:"


@dataclass
class Platform:
    gateway: GatewayProcess
    runs: Path
    records: Path

    def runs_of(self, request_id: str) -> int:
        return read_lines(self.runs).count(request_id)

    def queue(self, subject: str) -> list[dict[str, Any]]:
        if not self.gateway.queue_path.exists():
            return []
        return [json.loads(body) for body in read_messages(self.gateway.queue_path, subject)]

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in read_lines(self.records)]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    workdir = tmp_path_factory.mktemp("async-gateway")
    manifests = workdir / "functions"
    manifests.mkdir()
    runs, records = workdir / "runs.txt", workdir / "records.jsonl"
    variables = {"environment": {"variables": {"RUNS_FILE": str(runs), "RECORDS_FILE": str(records)}}}
    write_function(
        manifests,
        "recorder",
        RECORDING_FUNCTION,
        **variables,
        **{
            "async": {
                "maximumRetryAttempts": 2,
                "destinations": {"onSuccess": {"function": "audit"}, "onFailure": {"queue": "recorder-failures"}},
            }
        },
    )
    write_function(manifests, "audit", AUDIT_FUNCTION, **variables)
    write_function(
        manifests,
        "expiring",
        RECORDING_FUNCTION,
        **variables,
        **{"async": {"maximumEventAgeSeconds": 60, "destinations": {"onFailure": {"queue": "expired"}}}},
    )
    write_function(
        manifests,
        "narrow",
        RECORDING_FUNCTION,
        reservedConcurrency=1,
        timeoutSeconds=10,
        **variables,
        **{"async": {"destinations": {"onSuccess": {"queue": "narrow-ok"}}}},
    )
    env = {
        # retries after 0.3 s and 0.6 s instead of 1 and 2 minutes
        "LAMBDALET_ASYNC_RETRY_DELAY_SCALE": "0.005",
        # maximumEventAgeSeconds 60 becomes 0.6 s (and the default 6 h becomes 216 s)
        "LAMBDALET_ASYNC_EVENT_AGE_SCALE": "0.01",
        "LAMBDALET_ASYNC_THROTTLE_BACKOFF_MAX": "0.2",
    }
    with gateway_process(workdir, manifests, env) as gateway:
        yield Platform(gateway, runs, records)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def send_event(
    session: aiohttp.ClientSession, platform: Platform, name: str, payload: bytes
) -> tuple[int, str, bytes]:
    async with session.post(
        f"{platform.gateway.url}/2015-03-31/functions/{name}/invocations",
        data=io.BytesIO(payload),
        headers={"X-Amz-Invocation-Type": "Event", "Content-Type": "application/json"},
    ) as response:
        return response.status, response.headers.get("x-amzn-RequestId", ""), await response.read()


async def test_event_is_accepted_with_202_and_request_id_then_runs_once(
    platform: Platform, session: aiohttp.ClientSession
) -> None:
    status, request_id, body = await send_event(session, platform, "recorder", b'{"hello": "world"}')
    assert status == 202
    assert body == b""
    assert len(request_id) == 36

    async def ran() -> bool:
        return platform.runs_of(request_id) == 1

    await eventually(ran)


async def test_payload_over_one_megabyte_is_refused_with_413(
    platform: Platform, session: aiohttp.ClientSession
) -> None:
    payload = json.dumps("x" * 1048576).encode()
    status, _, body = await send_event(session, platform, "recorder", payload)
    assert status == 413
    assert b"1048576" in body
    async with session.post(
        f"{platform.gateway.url}/2015-03-31/functions/recorder/invocations",
        data=io.BytesIO(payload),
        headers={"X-Amz-Invocation-Type": "Event"},
    ) as response:
        assert response.headers["x-amzn-ErrorType"] == "RequestTooLargeException"
    # just under the limit is fine
    status, _, _ = await send_event(session, platform, "recorder", json.dumps("x" * 1000000).encode())
    assert status == 202


async def test_unknown_function_is_404_not_accepted(platform: Platform, session: aiohttp.ClientSession) -> None:
    status, _, _ = await send_event(session, platform, "nope", b"{}")
    assert status == 404


async def test_function_errors_retry_with_the_same_request_id_then_failure_record(
    platform: Platform, session: aiohttp.ClientSession
) -> None:
    status, request_id, _ = await send_event(session, platform, "recorder", b'{"fail": true, "order": 7}')
    assert status == 202

    async def recorded() -> bool:
        return any(r["requestContext"]["requestId"] == request_id for r in platform.queue("recorder-failures"))

    await eventually(recorded)
    # the function saw the same request id on all three attempts
    assert platform.runs_of(request_id) == 3
    [record] = [r for r in platform.queue("recorder-failures") if r["requestContext"]["requestId"] == request_id]
    assert set(record) == {
        "version",
        "timestamp",
        "requestContext",
        "requestPayload",
        "responseContext",
        "responsePayload",
    }
    assert record["version"] == "1.0"
    assert record["timestamp"].endswith("Z") and record["timestamp"][10] == "T"
    assert record["requestContext"] == {
        "requestId": request_id,
        "functionArn": ARN + "recorder:$LATEST",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == {"fail": True, "order": 7}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"}
    assert record["responsePayload"]["errorType"] == "RuntimeError"
    assert record["responsePayload"]["errorMessage"] == "asked to fail"


async def test_success_record_is_delivered_to_the_destination_function(
    platform: Platform, session: aiohttp.ClientSession
) -> None:
    status, request_id, _ = await send_event(session, platform, "recorder", b'{"order": 8}')
    assert status == 202

    def found() -> list[dict[str, Any]]:
        return [a for a in platform.audit_records() if a["record"]["requestContext"]["requestId"] == request_id]

    async def audited() -> bool:
        return bool(found())

    await eventually(audited)
    [audit] = found()
    record = audit["record"]
    assert audit["requestId"] != request_id  # the destination is its own (async) invocation
    assert record["version"] == "1.0"
    assert record["requestContext"] == {
        "requestId": request_id,
        "functionArn": ARN + "recorder:$LATEST",
        "condition": "Success",
        "approximateInvokeCount": 1,
    }
    assert record["requestPayload"] == {"order": 8}
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert record["responsePayload"] == {"echo": {"order": 8}}


async def test_event_older_than_its_maximum_age_goes_to_failure_with_event_age_exceeded(
    platform: Platform, session: aiohttp.ClientSession
) -> None:
    status, request_id, _ = await send_event(session, platform, "expiring", b'{"fail": true}')
    assert status == 202

    async def expired() -> bool:
        return any(r["requestContext"]["requestId"] == request_id for r in platform.queue("expired"))

    await eventually(expired)
    [record] = [r for r in platform.queue("expired") if r["requestContext"]["requestId"] == request_id]
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    runs = platform.runs_of(request_id)
    # it ran at least once, fewer times than its retries allow, and the record counts exactly those runs
    assert 1 <= runs < 3
    assert record["requestContext"]["approximateInvokeCount"] == runs
    assert record["responseContext"]["functionError"] == "Unhandled"


async def test_throttled_events_wait_and_eventually_run(platform: Platform, session: aiohttp.ClientSession) -> None:
    # A synchronous invocation holds narrow's only slot (reservedConcurrency 1) for 1.5 s ...
    sync = asyncio.create_task(
        session.post(
            f"{platform.gateway.url}/2015-03-31/functions/narrow/invocations",
            data=b'{"sleep": 1.5, "sync": true}',
        )
    )
    before = len(read_lines(platform.runs))

    async def sync_running() -> bool:
        return len(read_lines(platform.runs)) > before

    await eventually(sync_running)
    # ... while async events arrive: they are throttled, wait, and run once the slot frees.
    accepted = []
    for i in range(5):
        status, request_id, _ = await send_event(session, platform, "narrow", json.dumps({"i": i}).encode())
        assert status == 202
        accepted.append(request_id)

    async def all_ran() -> bool:
        return all(platform.runs_of(r) == 1 for r in accepted)

    await eventually(all_ran)
    response = await sync
    assert response.status == 200
    response.release()
    delivered = {r["requestContext"]["requestId"] for r in platform.queue("narrow-ok")}
    assert set(accepted) <= delivered
    text = platform.gateway.metrics()
    assert metric(text, "lambdalet_async_events_retried_total", function="narrow", reason="throttled") >= 1
    assert metric(text, "lambdalet_async_events_delivered_total", function="narrow") >= 5
    assert metric(text, "lambdalet_async_events_dropped_total", function="narrow", reason="retries_exhausted") == 0


async def test_metrics_count_received_delivered_retried_and_destinations(platform: Platform) -> None:
    text = platform.gateway.metrics()
    assert metric(text, "lambdalet_async_events_received_total", function="recorder") >= 4
    assert metric(text, "lambdalet_async_events_retried_total", function="recorder", reason="function_error") >= 2
    assert metric(text, "lambdalet_async_events_dropped_total", function="recorder", reason="retries_exhausted") >= 1
    assert (
        metric(
            text,
            "lambdalet_async_destination_deliveries_total",
            function="recorder",
            condition="Success",
            kind="function",
        )
        >= 1
    )
    assert metric(text, "lambdalet_async_event_age_at_delivery_seconds_count", function="recorder") >= 1
    assert "lambdalet_async_queue_depth" in text


async def test_cli_invoke_async_prints_the_request_id(platform: Platform) -> None:
    process = await asyncio.create_subprocess_exec(
        LAMBDALET,
        "invoke",
        "recorder",
        "--async",
        "--payload",
        '{"from": "cli"}',
        "--endpoint",
        platform.gateway.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    request_id = stdout.decode().strip()
    assert len(request_id) == 36

    async def ran() -> bool:
        return platform.runs_of(request_id) == 1

    await eventually(ran)
