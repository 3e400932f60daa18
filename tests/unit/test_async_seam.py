"""The seam to the gateway: the dispatcher's errors become the worker's outcomes, a Function spec's
``async`` block becomes the worker's settings, and the Event answer is 202 after the durable write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from lambdalet_gateway.asyncq.gateway import (
    ASYNC,
    MAX_ASYNC_PAYLOAD,
    DispatcherFunctions,
    DispatcherInvoker,
    EventTooLarge,
    accept_event,
    default_sqlite_path,
    open_queue,
)
from lambdalet_gateway.asyncq.metrics import AsyncMetrics
from lambdalet_gateway.asyncq.model import Destination, FunctionGone, InvokeFailed, Throttled
from lambdalet_gateway.asyncq.queue import StaticFunctions
from lambdalet_gateway.asyncq.settings import AsyncSettings
from lambdalet_gateway.asyncq.sqlite import SqliteQueue, read_events
from lambdalet_gateway.asyncq.worker import Worker
from lambdalet_gateway.dispatcher import InvocationResult
from lambdalet_gateway.errors import RESERVED_LIMIT, ResourceNotReady, not_found
from lambdalet_gateway.errors import Throttled as GatewayThrottled
from lambdalet_gateway.settings import Settings
from prometheus_client import CollectorRegistry

from lambdalet.spec import Function


class FakeDispatcher:
    def __init__(self, functions: dict[str, Function], outcome: Any = None) -> None:
        self.functions = functions
        self.outcome = outcome
        self.calls: list[tuple[str, str]] = []

    def function(self, name: str) -> Function | None:
        return self.functions.get(name)

    def arn(self, name: str, qualifier: str | None = None) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{name}"

    async def invoke(self, name: str, payload: bytes, *, request_id: str) -> InvocationResult:
        self.calls.append((name, request_id))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return InvocationResult(request_id, b'{"ok":1}', "application/json", function_error=self.outcome)


def function(name: str, **spec: Any) -> Function:
    return Function.model_validate(
        {
            "apiVersion": "lambdalet.dev/v1alpha1",
            "kind": "Function",
            "metadata": {"name": name},
            "spec": {"runtime": "python3.12", "handler": "app.handler", "code": {"path": "."}} | spec,
        }
    )


async def test_invoker_maps_the_dispatchers_outcomes() -> None:
    orders = {"orders": function("orders")}
    invoker = DispatcherInvoker(FakeDispatcher(orders))  # type: ignore[arg-type]
    result = await invoker.invoke("orders", b"{}", request_id="r-1")
    assert (result.status_code, result.payload, result.function_error) == (200, b'{"ok":1}', None)
    failing = DispatcherInvoker(FakeDispatcher(orders, "Unhandled"))  # type: ignore[arg-type]
    assert (await failing.invoke("orders", b"{}", request_id="r")).function_error == "Unhandled"
    cases: list[tuple[Exception, type[Exception]]] = [
        (GatewayThrottled(RESERVED_LIMIT), Throttled),
        (not_found("arn"), FunctionGone),
        (ResourceNotReady("no environment"), InvokeFailed),
    ]
    for raised, expected in cases:
        with pytest.raises(expected):
            await DispatcherInvoker(FakeDispatcher(orders, raised)).invoke(  # type: ignore[arg-type]
                "orders", b"{}", request_id="r"
            )


def test_function_settings_come_from_the_spec() -> None:
    spec = {
        "reservedConcurrency": 3,
        "async": {
            "maximumRetryAttempts": 1,
            "maximumEventAgeSeconds": 120,
            "destinations": {"onSuccess": {"function": "audit"}, "onFailure": {"queue": "failed"}},
        },
    }
    dispatcher = FakeDispatcher({"orders": function("orders", **spec), "plain": function("plain")})
    functions = DispatcherFunctions(dispatcher)  # type: ignore[arg-type]
    orders = functions.lookup("orders")
    assert orders is not None
    assert orders.arn == "arn:aws:lambda:us-east-1:000000000000:function:orders"
    assert (orders.maximum_retry_attempts, orders.maximum_event_age_seconds, orders.reserved_concurrency) == (1, 120, 3)
    assert orders.on_success == Destination(function="audit")
    assert orders.on_failure == Destination(queue="failed")
    plain = functions.lookup("plain")
    assert plain is not None
    assert (plain.maximum_retry_attempts, plain.maximum_event_age_seconds, plain.on_failure) == (2, 21600, None)
    assert functions.lookup("missing") is None


async def test_accept_answers_202_after_the_event_is_stored(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.sqlite3")
    await queue.start()
    app = web.Application()
    app[ASYNC] = Worker(
        queue,
        DispatcherInvoker(FakeDispatcher({})),  # type: ignore[arg-type]
        StaticFunctions({}),
        settings=AsyncSettings(),
        metrics=AsyncMetrics(CollectorRegistry()),
    )
    request = make_mocked_request("POST", "/2015-03-31/functions/orders/invocations", app=app)
    response = await accept_event(request, "orders", b'{"n": 1}', "req-1")
    assert response.status == 202
    assert response.headers["x-amzn-RequestId"] == "req-1"
    assert read_events(tmp_path / "q.sqlite3") == {"req-1": "orders"}
    with pytest.raises(EventTooLarge) as raised:
        await accept_event(request, "orders", b"x" * (MAX_ASYNC_PAYLOAD + 1), "req-2")
    assert raised.value.status == 413
    assert raised.value.code == "RequestTooLargeException"
    assert str(MAX_ASYNC_PAYLOAD) in raised.value.message
    await queue.close()


def test_default_queue_file_is_per_gateway_and_stable(tmp_path: Path) -> None:
    environ = {"XDG_STATE_HOME": str(tmp_path)}
    with_state = Settings(state_dir=tmp_path / "state")
    assert default_sqlite_path(with_state, environ) == tmp_path / "state" / "async.sqlite3"
    here = Settings(manifests=(Path("examples"),), port=8080)
    again = default_sqlite_path(here, environ)
    assert again == default_sqlite_path(Settings(manifests=(Path("examples"),), port=8080), environ)
    assert again.parent == tmp_path / "lambdalet"
    assert default_sqlite_path(Settings(manifests=(Path("examples"),), port=8081), environ) != again


def test_a_kubernetes_gateway_without_nats_has_no_queue() -> None:
    assert open_queue(AsyncSettings(), Settings(backend="kubernetes"), {}) is None
    assert isinstance(open_queue(AsyncSettings(), Settings(state_dir=Path("/tmp/x")), {}), SqliteQueue)
