"""The agent's two HTTP faces, served by :mod:`lambdalet_agent.httpserver` in one event loop.

- the Runtime API (``/2018-06-01/runtime/...``) for the bootstrap, on loopback;
- the invoke endpoint (``POST /2015-03-31/functions/{name}/invocations``, RIE-compatible) plus
  ``/healthz``, ``/readyz`` and ``/metrics``, on the agent port.

Handlers translate HTTP to :class:`~lambdalet_agent.environment.Environment` calls and its outcomes
back to Lambda's wire formats; no lifecycle logic lives here.

A streamed result (the runtime posted ``/response`` with ``Lambda-Runtime-Function-Response-Mode:
streaming``) reaches the invoker as a chunked ``200`` with ``X-Lambdalet-Response-Stream: 1``, the chunks
as the runtime wrote them, and trailer fields: ``Lambda-Runtime-Function-Error-Type`` and
``Lambda-Runtime-Function-Error-Body`` (base64 of the error JSON) when it failed (the runtime's own
mid-stream error, ``Sandbox.Timedout``, ``Runtime.ExitError``, ``Function.ResponseSizeTooLarge``), the
REPORT values (``X-Lambdalet-*-Ms``/``-MB``), ``X-Amz-Log-Result`` when the tail was asked for, and
``X-Lambdalet-Reset: 1`` when the environment was reset. A buffered result carries the same values as
headers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import uuid
from typing import Any

from lambdalet_agent.environment import (
    JSON,
    REQUEST_LIMIT,
    RESPONSE_LIMIT,
    Busy,
    Environment,
    Event,
    Invocation,
    Outcome,
    ResponseStream,
    RuntimeGone,
    error_json,
)
from lambdalet_agent.external import Endpoint
from lambdalet_agent.httpserver import ClientGone, Request, Response, Router, text
from lambdalet_agent.report import billed_ms
from lambdalet_agent.state import RuntimeApiError

RUNTIME_PREFIX = "/2018-06-01"
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"
ERROR_BODY_TRAILER = "Lambda-Runtime-Function-Error-Body"
RESPONSE_MODE_HEADER = "Lambda-Runtime-Function-Response-Mode"
STREAM_HEADER = "X-Lambdalet-Response-Stream"
#: The trailer fields a streamed result may end with (announced in its ``Trailer`` header).
STREAM_TRAILERS = (
    ERROR_TYPE_HEADER,
    ERROR_BODY_TRAILER,
    "X-Lambdalet-Duration-Ms",
    "X-Lambdalet-Billed-Duration-Ms",
    "X-Lambdalet-Max-Memory-Used-MB",
    "X-Lambdalet-Init-Duration-Ms",
    "X-Amz-Log-Result",
    "X-Lambdalet-Reset",
)
_ACCEPTED = b'{"status":"OK"}'
_ERROR_TYPE_KEY = ERROR_TYPE_HEADER.lower()
_ERROR_BODY_KEY = ERROR_BODY_TRAILER.lower()
_MODE_KEY = RESPONSE_MODE_HEADER.lower()


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _oversize(limit: int) -> bytes:
    return error_json(
        "Function.ResponseSizeTooLarge",
        f"Response payload size exceeded maximum allowed payload size ({limit} bytes).",
    )


def _runtime_error(status: int, error_type: str, message: str) -> Response:
    return Response(status, _json({"errorMessage": message, "errorType": error_type}), content_type=JSON)


def _api_error(exc: RuntimeApiError) -> Response:
    return _runtime_error(exc.status, exc.error_type, exc.message)


def _accepted() -> Response:
    return Response(202, _ACCEPTED, content_type=JSON)


def _too_large_for_runtime(limit: int) -> Response:
    return _runtime_error(413, "RequestEntityTooLarge", f"Exceeded maximum allowed payload size ({limit} bytes).")


async def _settle_logs() -> None:
    """Let output the runtime wrote before its HTTP call reach the log framing first (two loop turns:
    one for the selector to see the pipe, one for the pipe callback to run)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def _read_limited(request: Request, limit: int) -> bytes | None:
    length = request.content_length
    if length is not None and length > limit:
        return None
    return await request.body.read(limit)


def _error_type_of(body: bytes, header: str | None) -> str:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("errorType"), str) and parsed["errorType"]:
            return str(parsed["errorType"])
    return header or "Unhandled"


def stream_error(trailers: dict[str, str]) -> tuple[str, bytes] | None:
    """The (error type, error JSON) a streamed ``/response`` ended with, from its trailer fields (lower-case
    names); None when it ended without an error.

    The type is ``Lambda-Runtime-Function-Error-Type`` (else the body's ``errorType``, else ``Unhandled``);
    the body is the base64-decoded ``Lambda-Runtime-Function-Error-Body``. When that trailer is absent or
    not valid base64, the body is ``{"errorMessage":"","errorType":<type>}``."""
    error_type = trailers.get(_ERROR_TYPE_KEY) or None
    encoded = trailers.get(_ERROR_BODY_KEY)
    if error_type is None and encoded is None:
        return None
    body = b""
    if encoded:
        with contextlib.suppress(binascii.Error, ValueError):
            body = base64.b64decode(encoded.strip(), validate=True)
    if error_type is None:
        error_type = _error_type_of(body, None)
    if not body:
        body = error_json(error_type, "")
    return error_type, body


# ------------------------------------------------------------------------------------ Runtime API


def _connection_ends(request: Request) -> tuple[Endpoint, Endpoint] | None:
    """(runtime end, agent end) of a Runtime API connection."""
    ends = request.ends()
    if ends is None:
        return None
    (peer_host, peer_port), (own_host, own_port) = ends
    return Endpoint(peer_host, peer_port), Endpoint(own_host, own_port)


def runtime_handlers(env: Environment) -> Router:
    """The Runtime API for the bootstrap."""

    async def runtime_next(request: Request) -> Response:
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
        return Response(200, event.body, headers=headers)

    async def runtime_response(request: Request) -> Response:
        try:
            inv = env.begin_result(request.params["request_id"], error=False)
        except RuntimeApiError as exc:
            return _api_error(exc)
        content_type = request.header("content-type") or JSON
        mode = request.header(_MODE_KEY)
        if mode is not None and mode != "streaming":
            message = f"Invalid {RESPONSE_MODE_HEADER} value: {mode!r}"
            error_type = "Runtime.InvalidResponseModeHeader"
            env.finish(inv, Outcome(error_json(error_type, message), JSON, error_type))
            return _runtime_error(400, "InvalidFunctionResponseMode", "Invalid function response mode")
        if mode == "streaming":
            return await _stream_response(env, inv, request, content_type)
        body = await _read_limited(request, RESPONSE_LIMIT)
        if body is None:
            env.finish(inv, Outcome(_oversize(RESPONSE_LIMIT), JSON, "Function.ResponseSizeTooLarge"))
            return _too_large_for_runtime(RESPONSE_LIMIT)
        await _settle_logs()
        env.finish(inv, Outcome(body, content_type))
        return _accepted()

    async def runtime_error(request: Request) -> Response:
        try:
            inv = env.begin_result(request.params["request_id"], error=True)
        except RuntimeApiError as exc:
            return _api_error(exc)
        body = await _read_limited(request, RESPONSE_LIMIT)
        header = request.header(_ERROR_TYPE_KEY)
        if body is None:
            body = error_json(header or "Runtime.Unknown", "error body too large")
        error_type = _error_type_of(body, header)
        if not body:
            body = error_json(error_type, "")
        await _settle_logs()
        env.finish(inv, Outcome(body, JSON, error_type))
        return _accepted()

    async def runtime_init_error(request: Request) -> Response:
        body = await _read_limited(request, RESPONSE_LIMIT) or b""
        error_type = _error_type_of(body, request.header(_ERROR_TYPE_KEY))
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

    async def runtime_ping(request: Request) -> Response:
        return text(200, "pong")

    router = Router()
    invocation = f"{RUNTIME_PREFIX}/runtime/invocation"
    router.add("GET", f"{invocation}/next", runtime_next)
    router.add("POST", f"{invocation}/{{request_id}}/response", runtime_response)
    router.add("POST", f"{invocation}/{{request_id}}/error", runtime_error)
    router.add("POST", f"{RUNTIME_PREFIX}/runtime/init/error", runtime_init_error)
    router.add("GET", f"{RUNTIME_PREFIX}/ping", runtime_ping)
    return router


async def _stream_response(env: Environment, inv: Invocation, request: Request, content_type: str) -> Response:
    """Relay a streamed ``/response`` to the caller piece by piece as it is read; its trailers (or the
    size limit) decide how the invocation ends. A connection that drops mid-stream ends nothing here: the
    runtime's exit or the timeout does."""
    stream = env.start_stream(inv, content_type)
    limit = env.settings.stream_response_limit
    size = 0
    body = request.body
    while (piece := await body.piece()) is not None:  # ClientGone: the runtime's connection dropped
        if inv.finished.done():
            continue  # timed out or reset meanwhile: the rest is read and dropped
        size += len(piece)
        if size > limit:
            await _settle_logs()
            env.finish(inv, Outcome(_oversize(limit), JSON, "Function.ResponseSizeTooLarge"))
            return _too_large_for_runtime(limit)
        await stream.put(piece)
    await _settle_logs()
    failure = stream_error(request.trailers)
    if failure is None:
        env.finish(inv, Outcome(b"", content_type, None, stream))
    else:
        error_type, error_body = failure
        env.finish(inv, Outcome(error_body, JSON, error_type, stream))
    return _accepted()


# ------------------------------------------------------------------------------------ invoke side


def _invoke_error(status: int, error_type: str, body: dict[str, Any], request_id: str) -> Response:
    return Response(
        status,
        _json(body),
        content_type=JSON,
        headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": request_id},
    )


def _too_large(request_id: str) -> Response:
    return _invoke_error(
        413,
        "RequestTooLargeException",
        {
            "Type": "User",
            "message": f"Request must be smaller than {REQUEST_LIMIT} bytes for the InvokeFunction operation",
        },
        request_id,
    )


def _report_fields(fields: dict[str, str], inv: Invocation) -> None:
    fields["X-Lambdalet-Duration-Ms"] = f"{inv.duration_ms:.2f}"
    fields["X-Lambdalet-Billed-Duration-Ms"] = str(billed_ms(inv.duration_ms))
    fields["X-Lambdalet-Max-Memory-Used-MB"] = str(inv.max_memory_mb)
    if inv.init_duration_ms is not None:
        fields["X-Lambdalet-Init-Duration-Ms"] = f"{inv.init_duration_ms:.2f}"
    if inv.tail is not None:
        fields["X-Amz-Log-Result"] = base64.b64encode(inv.tail.value()).decode()


def stream_trailers(inv: Invocation) -> dict[str, str]:
    """The trailer fields that end a streamed result (see the module docstring)."""
    fields: dict[str, str] = {}
    final = inv.final
    if final is not None and final.error_type is not None:
        fields[ERROR_TYPE_HEADER] = final.error_type
        fields[ERROR_BODY_TRAILER] = base64.b64encode(final.body).decode()
    _report_fields(fields, inv)
    if inv.reset:
        fields["X-Lambdalet-Reset"] = "1"
    return fields


def invoke_handlers(env: Environment) -> Router:
    """The invoke endpoint and the probes."""
    version = env.settings.function_version
    default_arn = env.settings.function_arn

    async def invoke(request: Request) -> Response | None:
        h = request.headers
        request_id = h.get("x-lambdalet-request-id") or str(uuid.uuid4())
        body = await _read_limited(request, REQUEST_LIMIT)
        if body is None:
            return _too_large(request_id)
        client_context = None
        raw_context = h.get("x-amz-client-context")
        if raw_context:
            try:
                client_context = base64.b64decode(raw_context, validate=True).decode()
                if "\n" in client_context or "\r" in client_context:
                    # Pretty-printed JSON: compacted, as it travels in a header (Lambda-Runtime-Client-Context).
                    client_context = json.dumps(json.loads(client_context), separators=(",", ":"))
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return _invoke_error(
                    400,
                    "InvalidRequestContentException",
                    {"Type": "User", "message": "Client context must be a valid Base64-encoded JSON object."},
                    request_id,
                )
        event = Event(
            request_id=request_id,
            body=body,
            invoked_arn=h.get("x-lambdalet-invoked-function-arn") or default_arn,
            content_type=JSON,
            trace_id=h.get("x-amzn-trace-id"),
            client_context=client_context,
            cognito_identity=h.get("x-lambdalet-cognito-identity"),
            want_tail=h.get("x-amz-log-type") == "Tail",
        )
        try:
            inv = env.invoke(event)
        except Busy as busy:
            refusal = {"errorType": "Environment.Busy", "errorMessage": str(busy)}
            return _invoke_error(429, "TooManyRequestsException", refusal, request_id)
        outcome = await inv.result
        headers = {
            "Content-Type": outcome.content_type,
            "x-amzn-RequestId": request_id,
            "X-Amz-Executed-Version": version,
        }
        if outcome.stream is not None:
            headers[STREAM_HEADER] = "1"
            headers["Trailer"] = ", ".join(STREAM_TRAILERS)
            await _relay_stream(request, inv, outcome.stream, headers)
            return None
        if outcome.error_type is not None:
            headers["X-Amz-Function-Error"] = "Unhandled"
        if inv.reset:
            headers["X-Lambdalet-Reset"] = "1"
        _report_fields(headers, inv)
        return Response(200, outcome.body, headers=headers)

    async def healthz(request: Request) -> Response:
        return text(200, "ok")

    async def readyz(request: Request) -> Response:
        if env.init_failure is not None:
            return text(200, "init failed; the next invocation reports the error")
        if env.ready:
            return text(200, "ready")
        return text(503, "initializing")

    async def metrics(request: Request) -> Response:
        return Response(200, env.metrics.render(), content_type="text/plain; version=0.0.4")

    router = Router()
    router.add("POST", "/2015-03-31/functions/{function_name}/invocations", invoke)
    router.add("GET", "/healthz", healthz)
    router.add("GET", "/readyz", readyz)
    router.add("GET", "/metrics", metrics)
    return router


async def _relay_stream(request: Request, inv: Invocation, stream: ResponseStream, headers: dict[str, str]) -> None:
    """Send the chunks as they come, then the trailers. A caller that goes away does not hold the runtime
    up: the chunks are still taken (and dropped) until the stream ends."""
    response = request.stream(200, headers)
    writable = True
    while (chunk := await stream.get()) is not None:
        if writable:
            try:
                await response.write(chunk)
            except ClientGone:
                writable = False
    await inv.finished
    response.end(stream_trailers(inv))
