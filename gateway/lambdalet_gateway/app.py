"""The gateway application: ``create_app(settings) -> web.Application``.

Shared objects live under typed ``web.AppKey``s; their lifecycle is one ``cleanup_ctx`` (HTTP client
session, backend, dispatcher, manifest registry, autoscaler task). Routes:

- Lambda Invoke API ``POST /2015-03-31/functions/{name}/invocations`` and InvokeWithResponseStream
  ``POST /2021-11-15/functions/{name}/response-streaming-invocations``;
- the read-only control plane ``GET /2015-03-31/functions/``, ``.../{name}``, ``.../{name}/configuration``;
- HTTP routes ``ANY /fn/{name}`` and ``/fn/{name}/{path}`` (payload format 2.0);
- ``/metrics``, ``/healthz``, ``/readyz``; ``/lambdalet/v1/status`` and
  ``/lambdalet/v1/functions/{name}/logs`` for the CLI.

:func:`event_loop_factory` picks the event loop the gateway runs on: uvloop where it is installed (a third
fewer instructions per warm invocation in the gateway, ``python -m benchmarks.gateway_cpu --callgrind``),
else asyncio's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from lambdalet.names import InvalidFunctionName, parse_function_name

from . import control
from .asyncq.gateway import lifecycle as async_lifecycle
from .backend import Backend, LostCallback
from .dispatcher import LATEST, Dispatcher
from .errors import MAX_SYNC_PAYLOAD, InvalidParameterValue, LambdaError, not_found
from .invoke import DISPATCHER, http_route, invoke, invoke_with_response_stream
from .kube import FunctionSource
from .local import LocalBackend
from .logs import LogStore
from .metrics import Metrics
from .registry import Catalog, FunctionRecord, Registry
from .settings import EVENT_LOOPS, Settings, SettingsError

log = logging.getLogger("lambdalet.gateway")

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
LOGS: web.AppKey[LogStore] = web.AppKey("logs", LogStore)
REGISTRY: web.AppKey[Registry] = web.AppKey("registry", Registry)

#: Builds a backend: (settings, log store, callback for environments that exit on their own).
BackendFactory = Callable[[Settings, LogStore, LostCallback], Backend]


def event_loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """What ``asyncio.Runner(loop_factory=...)`` runs the gateway on. ``auto`` is uvloop when it is
    installed and asyncio's loop otherwise; ``uvloop`` insists on it; ``asyncio`` opts out."""
    if choice not in EVENT_LOOPS:
        raise SettingsError(f"unknown event loop {choice!r} (LAMBDALET_EVENT_LOOP); known: {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop  # noqa: PLC0415 (optional: only where installed)
    except ImportError:
        if choice == "uvloop":
            raise SettingsError(
                "the event loop uvloop (LAMBDALET_EVENT_LOOP=uvloop) is not installed: pip install uvloop"
            ) from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def default_backend(settings: Settings, logs: LogStore, on_lost: LostCallback) -> Backend:
    if settings.backend == "local":
        return LocalBackend(settings, logs, on_lost)
    if settings.backend == "kubernetes":
        from .kube.backend import KubernetesBackend  # noqa: PLC0415 (the Kubernetes client only when used)

        return KubernetesBackend(settings, on_lost)
    raise SettingsError(
        f"unknown backend {settings.backend!r} (LAMBDALET_BACKEND / --backend); known: local, kubernetes"
    )


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json")


def _record(request: web.Request) -> FunctionRecord:
    registry = request.app[REGISTRY]
    try:
        ref = parse_function_name(request.match_info["name"], request.query.get("Qualifier"))
    except InvalidFunctionName as exc:
        raise InvalidParameterValue(str(exc)) from None
    record = registry.catalog.functions.get(ref.name)
    if record is None or ref.qualifier not in {None, LATEST}:
        raise not_found(request.app[DISPATCHER].arn(ref.name, ref.qualifier))
    return record


async def list_functions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    try:
        max_items = int(request.query.get("MaxItems", "50"))
    except ValueError:
        return InvalidParameterValue("MaxItems must be an integer").response()
    records = list(request.app[REGISTRY].catalog.functions.values())
    body = control.list_functions(
        records,
        region=settings.region,
        account=settings.account_id,
        marker=request.query.get("Marker"),
        max_items=max(1, min(max_items, 50)),
    )
    return _json(body)


async def get_function(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    try:
        record = _record(request)
    except LambdaError as exc:
        return exc.response()
    return _json(control.get_function(record, region=settings.region, account=settings.account_id))


async def get_function_configuration(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    try:
        record = _record(request)
    except LambdaError as exc:
        return exc.response()
    return _json(control.function_configuration(record, region=settings.region, account=settings.account_id))


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.StreamResponse:
    if REGISTRY not in request.app:
        return web.Response(status=503, text="starting\n")
    return web.Response(text="ready\n")


async def metrics(request: web.Request) -> web.StreamResponse:
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def status(request: web.Request) -> web.StreamResponse:
    """What ``lambdalet ls`` shows: functions, their environments, and invalid manifests."""
    registry = request.app[REGISTRY]
    snapshots = {snap.function: snap for snap in request.app[DISPATCHER].snapshots()}
    functions: list[dict[str, Any]] = []
    for name, record in sorted(registry.catalog.functions.items()):
        spec = record.function.spec
        snap = snapshots.get(name)
        functions.append(
            {
                "name": name,
                "runtime": spec.runtime,
                "handler": spec.handler,
                "memoryMB": spec.memoryMB,
                "timeoutSeconds": spec.timeoutSeconds,
                "reservedConcurrency": spec.reservedConcurrency,
                "provisionedConcurrency": spec.provisionedConcurrency,
                "source": str(record.source),
                "environments": {
                    "idle": snap.idle if snap else 0,
                    "busy": snap.busy if snap else 0,
                    "starting": snap.starting if snap else 0,
                },
                "waiting": snap.waiting if snap else 0,
            }
        )
    errors = [{"file": e.source, "field": e.field, "reason": e.rule} for e in registry.catalog.errors]
    return _json({"functions": functions, "errors": errors})


async def function_logs(request: web.Request) -> web.StreamResponse:
    """A function's log lines as text; ``?follow=1`` keeps the response open for new lines."""
    name = request.match_info["name"]
    logs = request.app[LOGS]
    if request.app[DISPATCHER].function(name) is None and not logs.lines(name):
        return not_found(request.app[DISPATCHER].arn(name)).response()
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    if request.query.get("follow") in {"1", "true"}:
        async for line in logs.follow(name):
            await response.write(line.encode() + b"\n")
    else:
        await response.write("".join(f"{line}\n" for line in logs.lines(name)).encode())
    await response.write_eof()
    return response


def create_app(settings: Settings, *, backend_factory: BackendFactory = default_backend) -> web.Application:
    """The gateway: routes plus a lifecycle that starts and stops everything it owns."""
    app = web.Application(client_max_size=MAX_SYNC_PAYLOAD, handler_args={"max_field_size": 1 << 20})
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LOGS] = LogStore(settings.log_lines, echo=settings.echo_logs)
    app[_BACKEND_FACTORY] = backend_factory
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(async_lifecycle)  # after the dispatcher: the async queue and its worker
    app.router.add_post("/2015-03-31/functions/{name}/invocations", invoke)
    app.router.add_post("/2021-11-15/functions/{name}/response-streaming-invocations", invoke_with_response_stream)
    app.router.add_get("/2015-03-31/functions/", list_functions)
    app.router.add_get("/2015-03-31/functions", list_functions)
    app.router.add_get("/2015-03-31/functions/{name}", get_function)
    app.router.add_get("/2015-03-31/functions/{name}/configuration", get_function_configuration)
    app.router.add_route("*", "/fn/{name}", http_route)
    app.router.add_route("*", "/fn/{name}/{path:.*}", http_route)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/lambdalet/v1/status", status)
    app.router.add_get("/lambdalet/v1/functions/{name}/logs", function_logs)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    dispatcher_ref: list[Dispatcher] = []

    def on_lost(env: Any) -> None:
        if dispatcher_ref:
            dispatcher_ref[0].environment_lost(env)

    backend = app[_BACKEND_FACTORY](settings, app[LOGS], on_lost)
    dispatcher = Dispatcher(backend, settings, app[METRICS])
    dispatcher_ref.append(dispatcher)
    app[DISPATCHER] = dispatcher

    def apply(catalog: Catalog) -> None:
        dispatcher.set_functions(
            {name: record.function for name, record in catalog.functions.items()},
            {name: record.revision for name, record in catalog.functions.items()},
        )

    # The Kubernetes backend's functions are Function objects it watches; otherwise manifests.
    registry = backend.registry(apply) if isinstance(backend, FunctionSource) else Registry(settings.manifests, apply)
    tasks: list[asyncio.Task[None]] = []
    try:
        await registry.reload()
        app[REGISTRY] = registry
        tasks.append(asyncio.create_task(registry.run(settings.reload_interval_s), name="lambdalet-registry"))
        tasks.append(asyncio.create_task(dispatcher.run_autoscaler(), name="lambdalet-autoscaler"))
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await dispatcher.close()


_BACKEND_FACTORY: web.AppKey[BackendFactory] = web.AppKey("backend_factory")
