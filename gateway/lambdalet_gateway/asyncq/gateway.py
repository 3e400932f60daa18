"""The seam between the async path and the rest of the gateway: the only module here that imports it.

- :func:`accept_event` answers ``X-Amz-Invocation-Type: Event``: 413 beyond Lambda's 1 MB async limit,
  otherwise the event is stored durably and only then 202 with ``x-amzn-RequestId``.
- :func:`lifecycle` (an ``app.cleanup_ctx`` entry, after the dispatcher's) opens the queue chosen by
  :class:`AsyncSettings` and runs the worker, which invokes through the gateway's dispatcher.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from lambdalet.spec import Destination as SpecDestination
from lambdalet.spec import Function
from lambdalet_gateway.asyncq.metrics import AsyncMetrics
from lambdalet_gateway.asyncq.model import (
    Destination,
    FunctionGone,
    FunctionSettings,
    InvokeFailed,
    InvokeResult,
    Throttled,
)
from lambdalet_gateway.asyncq.queue import EventQueue, QueueUnavailable
from lambdalet_gateway.asyncq.settings import AsyncSettings
from lambdalet_gateway.asyncq.worker import Worker
from lambdalet_gateway.dispatcher import Dispatcher
from lambdalet_gateway.errors import LambdaError, RequestTooLarge, ResourceNotFound, ServiceError
from lambdalet_gateway.errors import Throttled as GatewayThrottled

log = logging.getLogger("lambdalet.asyncq")

#: Lambda's payload limit for asynchronous invocation, in bytes.
MAX_ASYNC_PAYLOAD = 1048576

ASYNC: web.AppKey[Worker] = web.AppKey("async_worker", Worker)


class EventTooLarge(RequestTooLarge):
    """413 ``RequestTooLargeException`` for an ``Event`` payload over 1 MB."""

    def __init__(self, *, request_id: str | None = None) -> None:
        LambdaError.__init__(
            self,
            f"Request must be smaller than {MAX_ASYNC_PAYLOAD} bytes for the InvokeFunction operation",
            request_id=request_id,
        )


class DispatcherInvoker:
    """The worker's ``Invoker``: the dispatcher's admission (reserved concurrency, the platform limit),
    environments and agents; the agent runs the function under the event's own request id."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def invoke(self, function: str, payload: bytes, *, request_id: str) -> InvokeResult:
        try:
            result = await self._dispatcher.invoke(function, payload, request_id=request_id)
        except GatewayThrottled as exc:
            raise Throttled(exc.reason) from exc
        except ResourceNotFound as exc:
            raise FunctionGone(exc.message) from exc
        except LambdaError as exc:
            raise InvokeFailed(f"{exc.code}: {exc.message}") from exc
        return InvokeResult(
            status_code=200,
            payload=result.payload,
            function_error=result.function_error,
            executed_version=result.executed_version,
        )


def _destination(spec: SpecDestination | None) -> Destination | None:
    return None if spec is None else Destination(function=spec.function, queue=spec.queue)


class DispatcherFunctions:
    """The worker's ``Functions``: what the dispatcher serves now, with each spec's ``async`` settings."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._cache: dict[str, tuple[Function, FunctionSettings]] = {}

    def lookup(self, name: str) -> FunctionSettings | None:
        function = self._dispatcher.function(name)
        if function is None:
            return None
        cached = self._cache.get(name)
        if cached is not None and cached[0] is function:
            return cached[1]
        spec = function.spec
        config = spec.async_
        found = FunctionSettings(
            name=name,
            arn=self._dispatcher.arn(name),
            maximum_retry_attempts=config.maximumRetryAttempts,
            maximum_event_age_seconds=config.maximumEventAgeSeconds,
            on_success=_destination(config.destinations.onSuccess),
            on_failure=_destination(config.destinations.onFailure),
            reserved_concurrency=spec.reservedConcurrency,
        )
        self._cache[name] = (function, found)
        return found


async def accept_event(request: web.Request, function: str, body: bytes, request_id: str) -> web.Response:
    """``X-Amz-Invocation-Type: Event`` for a known function: 202 once the event is durable."""
    if len(body) > MAX_ASYNC_PAYLOAD:
        raise EventTooLarge(request_id=request_id)
    worker = request.app.get(ASYNC)
    if worker is None:
        raise ServiceError("asynchronous invocation is not running on this gateway", request_id=request_id)
    try:
        await worker.accept(function, body, request_id)
    except QueueUnavailable as exc:
        log.error("async event %s for %s not accepted: %s", request_id, function, exc)
        raise ServiceError("the event could not be stored; it was not accepted", request_id=request_id) from exc
    return web.Response(status=202, headers={"x-amzn-RequestId": request_id})


def open_queue(settings: AsyncSettings, state_dir: Path | None) -> EventQueue:
    if settings.backend == "nats":
        from lambdalet_gateway.asyncq.jetstream import NatsQueue  # noqa: PLC0415 (nats-py only when used)

        return NatsQueue(settings.nats_url, ack_wait=settings.ack_wait, max_pending=settings.worker_concurrency * 4)
    from lambdalet_gateway.asyncq.sqlite import SqliteQueue  # noqa: PLC0415 (symmetry with the broker)

    default = state_dir / "async.sqlite3" if state_dir is not None else Path(".lambdalet") / "async.sqlite3"
    return SqliteQueue(settings.sqlite_path or default)


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    """``app.cleanup_ctx`` entry, after the one that creates the dispatcher and loads the functions."""
    # app.py and invoke.py import this module: their keys are imported here, at startup
    from lambdalet_gateway.app import METRICS, SETTINGS  # noqa: PLC0415
    from lambdalet_gateway.invoke import DISPATCHER  # noqa: PLC0415

    settings = AsyncSettings.from_env(os.environ)
    queue = open_queue(settings, app[SETTINGS].state_dir)
    await queue.start()
    dispatcher = app[DISPATCHER]
    worker = Worker(
        queue,
        DispatcherInvoker(dispatcher),
        DispatcherFunctions(dispatcher),
        settings=settings,
        metrics=AsyncMetrics(app[METRICS].registry),
    )
    await worker.start()
    app[ASYNC] = worker
    log.info("async invocation: %s queue", settings.backend)
    try:
        yield
    finally:
        await worker.stop()
        await queue.close()
