"""The agent's two HTTP faces, aiohttp in one event loop.

- the Runtime API (``/2018-06-01/runtime/...``) for the bootstrap, on loopback;
- the invoke endpoint (``POST /2015-03-31/functions/{name}/invocations``, RIE-compatible) plus
  ``/healthz``, ``/readyz`` and ``/metrics``, on the agent port.

Handlers translate HTTP to :class:`~lambdalet_agent.environment.Environment` calls and its outcomes
back to Lambda's wire formats; no lifecycle logic lives here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import uuid
from typing import Any

from aiohttp import web

from lambdalet_agent.environment import (
    JSON,
    REQUEST_LIMIT,
    RESPONSE_LIMIT,
    Busy,
    Environment,
    Event,
    Invocation,
    Outcome,
    RuntimeGone,
    error_json,
)
from lambdalet_agent.external import Endpoint
from lambdalet_agent.report import billed_ms
from lambdalet_agent.state import RuntimeApiError

ENV: web.AppKey[Environment] = web.AppKey("environment", Environment)

RUNTIME_PREFIX = "/2018-06-01"
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
RESPONSE_MODE_HEADER = "Lambda-Runtime-Function-Response-Mode"
_ACCEPTED = b'{"status":"OK"}'
_OVERSIZE_RESPONSE = json.dumps(
    {
        "errorType": "Function.ResponseSizeTooLarge",
        "errorMessage": f"Response payload size exceeded maximum allowed payload size ({RESPONSE_LIMIT} bytes).",
    },
    separators=(",", ":"),
).encode()


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _runtime_error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(
        status=status, body=_json({"errorMessage": message, "errorType": error_type}), content_type=JSON
    )


def _api_error(exc: RuntimeApiError) -> web.Response:
    return _runtime_error(exc.status, exc.error_type, exc.message)


def _accepted() -> web.Response:
    return web.Response(status=202, body=_ACCEPTED, content_type=JSON)


async def _settle_logs() -> None:
    """Let output the runtime wrote before its HTTP call reach the log framing first (two loop turns:
    one for the selector to see the pipe, one for the pipe callback to run)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    if request.content_length is not None and request.content_length > limit:
        return None
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None


def _error_type_of(body: bytes, header: str | None) -> str:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("errorType"), str) and parsed["errorType"]:
            return str(parsed["errorType"])
    return header or "Unhandled"


# ------------------------------------------------------------------------------------ Runtime API


def _connection_ends(request: web.Request) -> tuple[Endpoint, Endpoint] | None:
    """(runtime end, agent end) of a Runtime API connection."""
    transport = request.transport
    if transport is None:
        return None
    peer, own = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not isinstance(peer, tuple) or not isinstance(own, tuple):
        return None
    return Endpoint(str(peer[0]), int(peer[1])), Endpoint(str(own[0]), int(own[1]))


async def runtime_next(request: web.Request) -> web.StreamResponse:
    env = request.app[ENV]
    try:
        inv = await env.next_event(_connection_ends(request) if env.external else None)
    except RuntimeApiError as exc:
        return _api_error(exc)
    except RuntimeGone:
        return _runtime_error(500, "InternalServerError", "Internal Server Error")
    event = inv.event
    headers = {
        "Content-Type": event.content_type,
        "Lambda-Runtime-Aws-Request-Id": event.request_id,
        "Lambda-Runtime-Deadline-Ms": str(inv.deadline_epoch_ms),
        "Lambda-Runtime-Invoked-Function-Arn": event.invoked_arn,
    }
    if event.trace_id:
        headers["Lambda-Runtime-Trace-Id"] = event.trace_id
    if event.client_context:
        headers["Lambda-Runtime-Client-Context"] = event.client_context
    if event.cognito_identity:
        headers["Lambda-Runtime-Cognito-Identity"] = event.cognito_identity
    return web.Response(body=event.body, headers=headers)


async def runtime_response(request: web.Request) -> web.StreamResponse:
    env = request.app[ENV]
    try:
        inv = env.begin_result(request.match_info["request_id"], error=False)
    except RuntimeApiError as exc:
        return _api_error(exc)
    content_type = request.headers.get("Content-Type") or JSON
    mode = request.headers.get(RESPONSE_MODE_HEADER)
    if mode is not None and mode != "streaming":
        message = f"Invalid {RESPONSE_MODE_HEADER} value: {mode!r}"
        env.finish(
            inv,
            Outcome(
                error_json("Runtime.InvalidResponseModeHeader", message), JSON, "Runtime.InvalidResponseModeHeader"
            ),
        )
        return _runtime_error(400, "InvalidFunctionResponseMode", "Invalid function response mode")
    if mode == "streaming":
        return await _stream_response(env, inv, request, content_type)
    body = await _read_limited(request, RESPONSE_LIMIT)
    if body is None:
        env.finish(inv, Outcome(_OVERSIZE_RESPONSE, JSON, "Function.ResponseSizeTooLarge"))
        return _runtime_error(
            413, "RequestEntityTooLarge", f"Exceeded maximum allowed payload size ({RESPONSE_LIMIT} bytes)."
        )
    await _settle_logs()
    env.finish(inv, Outcome(body, content_type))
    return _accepted()


async def _stream_response(
    env: Environment, inv: Invocation, request: web.Request, content_type: str
) -> web.StreamResponse:
    queue = env.start_stream(inv, content_type)
    async for chunk in request.content.iter_any():
        if inv.finished.done():
            break
        queue.put_nowait(chunk)
    queue.put_nowait(None)
    await _settle_logs()
    env.finish(inv, Outcome(b"", content_type, None, queue))
    return _accepted()


async def runtime_error(request: web.Request) -> web.StreamResponse:
    env = request.app[ENV]
    try:
        inv = env.begin_result(request.match_info["request_id"], error=True)
    except RuntimeApiError as exc:
        return _api_error(exc)
    body = await _read_limited(request, RESPONSE_LIMIT)
    header = request.headers.get(ERROR_TYPE_HEADER)
    if body is None:
        body = error_json(header or "Runtime.Unknown", "error body too large")
    error_type = _error_type_of(body, header)
    if not body:
        body = error_json(error_type, "")
    await _settle_logs()
    env.finish(inv, Outcome(body, JSON, error_type))
    return _accepted()


async def runtime_init_error(request: web.Request) -> web.StreamResponse:
    env = request.app[ENV]
    body = await _read_limited(request, RESPONSE_LIMIT) or b""
    header = request.headers.get(ERROR_TYPE_HEADER)
    error_type = _error_type_of(body, header)
    try:
        json.loads(body)
        content_type = JSON
    except ValueError:
        content_type = "application/octet-stream"
    await _settle_logs()
    try:
        env.init_error(body, content_type, error_type)
    except RuntimeApiError as exc:
        return _api_error(exc)
    return _accepted()


async def runtime_ping(request: web.Request) -> web.StreamResponse:
    return web.Response(text="pong")


def create_runtime_api_app(env: Environment) -> web.Application:
    app = web.Application(client_max_size=RESPONSE_LIMIT)
    app[ENV] = env
    app.router.add_get(f"{RUNTIME_PREFIX}/runtime/invocation/next", runtime_next)
    app.router.add_post(f"{RUNTIME_PREFIX}/runtime/invocation/{{request_id}}/response", runtime_response)
    app.router.add_post(f"{RUNTIME_PREFIX}/runtime/invocation/{{request_id}}/error", runtime_error)
    app.router.add_post(f"{RUNTIME_PREFIX}/runtime/init/error", runtime_init_error)
    app.router.add_get(f"{RUNTIME_PREFIX}/ping", runtime_ping)
    return app


# ------------------------------------------------------------------------------------ invoke side


def _invoke_error(status: int, error_type: str, body: dict[str, Any], request_id: str) -> web.Response:
    return web.Response(
        status=status,
        body=_json(body),
        content_type=JSON,
        headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": request_id},
    )


def _too_large(request_id: str) -> web.Response:
    return _invoke_error(
        413,
        "RequestTooLargeException",
        {
            "Type": "User",
            "message": f"Request must be smaller than {REQUEST_LIMIT} bytes for the InvokeFunction operation",
        },
        request_id,
    )


def _result_headers(env: Environment, inv: Invocation, outcome: Outcome) -> dict[str, str]:
    headers = {
        "Content-Type": outcome.content_type,
        "x-amzn-RequestId": inv.event.request_id,
        "X-Amz-Executed-Version": env.settings.function_version,
    }
    if outcome.error_type is not None:
        headers["X-Amz-Function-Error"] = "Unhandled"
    if inv.reset:
        headers["X-Lambdalet-Reset"] = "1"
    return headers


def _report_headers(headers: dict[str, str], inv: Invocation) -> None:
    headers["X-Lambdalet-Duration-Ms"] = f"{inv.duration_ms:.2f}"
    headers["X-Lambdalet-Billed-Duration-Ms"] = str(billed_ms(inv.duration_ms))
    headers["X-Lambdalet-Max-Memory-Used-MB"] = str(inv.max_memory_mb)
    if inv.init_duration_ms is not None:
        headers["X-Lambdalet-Init-Duration-Ms"] = f"{inv.init_duration_ms:.2f}"
    if inv.tail is not None:
        headers["X-Amz-Log-Result"] = base64.b64encode(inv.tail.value()).decode()


async def invoke(request: web.Request) -> web.StreamResponse:
    env = request.app[ENV]
    h = request.headers
    request_id = h.get("X-Lambdalet-Request-Id") or str(uuid.uuid4())
    body = await _read_limited(request, REQUEST_LIMIT)
    if body is None:
        return _too_large(request_id)
    client_context = None
    raw_context = h.get("X-Amz-Client-Context")
    if raw_context:
        try:
            client_context = base64.b64decode(raw_context, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return _invoke_error(
                400,
                "InvalidRequestContentException",
                {"Type": "User", "message": "Client context must be a valid Base64-encoded JSON object."},
                request_id,
            )
    event = Event(
        request_id=request_id,
        body=body,
        invoked_arn=h.get("X-Lambdalet-Invoked-Function-Arn") or env.settings.function_arn,
        content_type=JSON,
        trace_id=h.get("X-Amzn-Trace-Id"),
        client_context=client_context,
        cognito_identity=h.get("X-Lambdalet-Cognito-Identity"),
        want_tail=h.get("X-Amz-Log-Type") == "Tail",
    )
    try:
        inv = env.invoke(event)
    except Busy:
        return _invoke_error(
            429,
            "TooManyRequestsException",
            {
                "errorType": "Environment.Busy",
                "errorMessage": "An invocation is already running in this execution environment.",
            },
            request_id,
        )
    outcome = await inv.result
    headers = _result_headers(env, inv, outcome)
    if outcome.stream is None:
        _report_headers(headers, inv)
        return web.Response(body=outcome.body, headers=headers)
    return await _relay_stream(request, inv, outcome.stream, headers)


async def _relay_stream(
    request: web.Request, inv: Invocation, queue: asyncio.Queue[bytes | None], headers: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(headers=headers)
    response.enable_chunked_encoding()
    await response.prepare(request)
    writable = True
    while True:
        chunk = await queue.get()
        if chunk is None:
            break
        if writable:
            try:
                await response.write(chunk)
            except (ConnectionError, RuntimeError):
                writable = False  # the caller went away; keep draining so the runtime is not blocked
    await inv.finished
    if writable:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.StreamResponse:
    env = request.app[ENV]
    if env.init_failure is not None:
        return web.Response(text="init failed; the next invocation reports the error")
    if env.ready:
        return web.Response(text="ready")
    return web.Response(status=503, text="initializing")


async def metrics(request: web.Request) -> web.StreamResponse:
    env = request.app[ENV]
    return web.Response(body=env.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


def create_invoke_app(env: Environment) -> web.Application:
    # Invoke bodies are checked against Lambda's limit in the handler (to answer in Lambda's format).
    app = web.Application(client_max_size=REQUEST_LIMIT)
    app[ENV] = env
    app.router.add_post("/2015-03-31/functions/{function_name}/invocations", invoke)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
