"""The seam between the async path and the rest of the gateway: the only module here that imports it.

- :func:`accept_event` answers ``X-Amz-Invocation-Type: Event``: 413 beyond Lambda's 1 MB async limit,
  otherwise the event is stored durably and only then 202 with ``x-amzn-RequestId``.
- :func:`lifecycle` (an ``app.cleanup_ctx`` entry, after the dispatcher's) opens the queue chosen by
  :class:`AsyncSettings` and runs the worker, which invokes through the gateway's dispatcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
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
from lambdalet_gateway.settings import Settings

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
        raise ServiceError(
            "asynchronous invocation is not running on this gateway (its event queue is not open; see its log)",
            request_id=request_id,
        )
    try:
        await worker.accept(function, body, request_id)
    except QueueUnavailable as exc:
        log.error("async event %s for %s not accepted: %s", request_id, function, exc)
        raise ServiceError("the event could not be stored; it was not accepted", request_id=request_id) from exc
    return web.Response(status=202, headers={"x-amzn-RequestId": request_id})


def default_sqlite_path(gateway: Settings, environ: Mapping[str, str]) -> Path:
    """The embedded queue file when ``LAMBDALET_ASYNC_SQLITE_PATH`` is not set: in the gateway's state
    directory when it has one, else one file per (manifests, address, port) under ``$XDG_STATE_HOME``
    (``~/.local/state``): the same ``lambdalet up`` finds its events again after a restart, and two
    gateways never share a file."""
    if gateway.state_dir is not None:
        return gateway.state_dir / "async.sqlite3"
    identity = [str(p.resolve()) for p in sorted(gateway.manifests)] + [gateway.host, str(gateway.port)]
    if gateway.port == 0:
        identity.append(str(os.getpid()))  # an ephemeral port has no identity to come back to
    digest = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    base = Path(environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "lambdalet" / f"async-{digest}.sqlite3"


def open_queue(settings: AsyncSettings, gateway: Settings, environ: Mapping[str, str]) -> EventQueue | None:
    """The queue the settings choose; None when there is none to use (a Kubernetes gateway without NATS)."""
    if settings.backend == "nats":
        from lambdalet_gateway.asyncq.jetstream import NatsQueue  # noqa: PLC0415 (nats-py only when used)

        return NatsQueue(settings.nats_url, ack_wait=settings.ack_wait, max_pending=settings.worker_concurrency * 4)
    if gateway.backend == "kubernetes" and settings.sqlite_path is None:
        log.error(
            "asynchronous invocation is off: on Kubernetes it needs LAMBDALET_ASYNC_BACKEND=nats "
            "(helm: --set nats.enabled=true); Event invocations are answered 500"
        )
        return None
    from lambdalet_gateway.asyncq.sqlite import SqliteQueue  # noqa: PLC0415 (symmetry with the broker)

    return SqliteQueue(settings.sqlite_path or default_sqlite_path(gateway, environ))


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    """``app.cleanup_ctx`` entry, after the one that creates the dispatcher and loads the functions.

    A queue that cannot be opened turns asynchronous invocation off (Event answered 500, logged) and
    leaves the rest of the gateway serving.
    """
    # app.py and invoke.py import this module: their keys are imported here, at startup
    from lambdalet_gateway.app import METRICS, SETTINGS  # noqa: PLC0415
    from lambdalet_gateway.invoke import DISPATCHER  # noqa: PLC0415

    settings = AsyncSettings.from_env(os.environ)
    queue = open_queue(settings, app[SETTINGS], os.environ)
    if queue is not None:
        try:
            await queue.start()
        except (QueueUnavailable, OSError) as exc:
            log.error("asynchronous invocation is off: %s", exc)
            queue = None
    if queue is None:
        yield
        return
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
