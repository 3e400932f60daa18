"""HTTP handlers of the data path: the Lambda Invoke API and the HTTP routes (payload format 2.0).

Thin: parse the request, call :meth:`Dispatcher.invoke`, write the response; every failure is a
:class:`~lambdalet_gateway.errors.LambdaError` answered in Lambda's wire format.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from aiohttp import web

from lambdalet.names import InvalidFunctionName, parse_function_name

from .asyncq.gateway import accept_event
from .dispatcher import LATEST, Dispatcher
from .errors import (
    MAX_SYNC_PAYLOAD,
    InvalidParameterValue,
    InvalidRequestContent,
    LambdaError,
    RequestTooLarge,
    not_found,
)
from .http_events import BadFunctionResponse, HttpRequest, build_event, map_result

log = logging.getLogger("lambdalet.gateway.invoke")

DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher", Dispatcher)

#: Payloads larger than this are validated as JSON in a worker thread, off the event loop.
_THREAD_JSON_BYTES = 256 * 1024


async def _read_body(request: web.Request, request_id: str) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_SYNC_PAYLOAD:
        raise RequestTooLarge(request_id=request_id)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge(request_id=request_id) from None


async def _validate_json(body: bytes, request_id: str) -> None:
    try:
        if len(body) > _THREAD_JSON_BYTES:
            await asyncio.to_thread(json.loads, body)
        else:
            json.loads(body)
    except ValueError as exc:
        raise InvalidRequestContent(f"Could not parse request body into json: {exc}", request_id=request_id) from None


async def invoke(request: web.Request) -> web.StreamResponse:
    """``POST /2015-03-31/functions/{name}/invocations``."""
    request_id = str(uuid.uuid4())
    try:
        return await _invoke(request, request_id)
    except LambdaError as exc:
        exc.request_id = request_id
        return exc.response()


async def _invoke(request: web.Request, request_id: str) -> web.StreamResponse:
    dispatcher = request.app[DISPATCHER]
    raw_name = request.match_info["name"]
    try:
        ref = parse_function_name(raw_name, request.query.get("Qualifier"))
    except InvalidFunctionName as exc:
        raise InvalidParameterValue(str(exc)) from None
    if dispatcher.function(ref.name) is None or ref.qualifier not in {None, LATEST}:
        raise not_found(dispatcher.arn(ref.name, ref.qualifier))
    headers = request.headers
    invocation_type = headers.get("X-Amz-Invocation-Type", "RequestResponse")
    body = await _read_body(request, request_id)
    if not body:
        body = b"{}"
    await _validate_json(body, request_id)
    if invocation_type == "DryRun":
        dispatcher.admit_check(ref.name)
        return web.Response(status=204, headers={"x-amzn-RequestId": request_id})
    if invocation_type == "Event":
        return await accept_event(request, ref.name, body, request_id)
    if invocation_type != "RequestResponse":
        raise InvalidParameterValue(
            f"InvocationType must be one of RequestResponse, Event, DryRun (got {invocation_type!r})"
        )
    log_type = headers.get("X-Amz-Log-Type", "None")
    if log_type not in {"None", "Tail"}:
        raise InvalidParameterValue(f"LogType must be None or Tail (got {log_type!r})")
    result = await dispatcher.invoke(
        ref.name,
        body,
        request_id=request_id,
        client_context=headers.get("X-Amz-Client-Context"),
        log_tail=log_type == "Tail",
        invoked_arn=dispatcher.arn(ref.name, ref.qualifier) if ref.qualifier else None,
        trace_id=headers.get("X-Amzn-Trace-Id"),
    )
    out = {
        "x-amzn-RequestId": request_id,
        "X-Amz-Executed-Version": result.executed_version,
        "Content-Type": result.content_type,
    }
    if result.function_error is not None:
        out["X-Amz-Function-Error"] = result.function_error
    if result.log_result is not None:
        out["X-Amz-Log-Result"] = result.log_result
    if result.duration_ms is not None:
        out["X-Lambdalet-Duration-Ms"] = f"{result.duration_ms:g}"
    return web.Response(body=result.payload, headers=out)


def _http_error(status: int, message: str, request_id: str, error_type: str | None = None) -> web.Response:
    headers = {"Content-Type": "application/json", "x-amzn-RequestId": request_id}
    if error_type:
        headers["x-amzn-ErrorType"] = error_type
    if status == 429:
        headers["Retry-After"] = "1"
    return web.Response(status=status, body=json.dumps({"message": message}).encode(), headers=headers)


async def http_route(request: web.Request) -> web.StreamResponse:
    """``ANY /fn/{name}[/{path}]``: the request as a payload format 2.0 event, the result as the response."""
    request_id = str(uuid.uuid4())
    dispatcher = request.app[DISPATCHER]
    name = request.match_info["name"]
    if dispatcher.function(name) is None:
        return _http_error(404, "Not Found", request_id, "ResourceNotFoundException")
    try:
        body = await _read_body(request, request_id)
    except RequestTooLarge:
        return _http_error(413, "Request Entity Too Large", request_id, RequestTooLarge.code)
    event = build_event(
        HttpRequest(
            method=request.method,
            path="/" + request.match_info.get("path", ""),
            raw_query=request.query_string,
            headers=tuple(request.headers.items()),
            body=body,
            source_ip=request.remote or "",
            protocol=f"HTTP/{request.version.major}.{request.version.minor}",
            request_id=request_id,
            account_id=dispatcher.account_id,
        )
    )
    try:
        result = await dispatcher.invoke(name, json.dumps(event).encode(), request_id=request_id)
    except LambdaError as exc:
        message = "Too Many Requests" if exc.status == 429 else exc.message
        return _http_error(exc.status, message, request_id, exc.code)
    if result.function_error is not None:
        return _http_error(502, "Internal Server Error", request_id)
    try:
        mapped = map_result(result.payload)
    except BadFunctionResponse as exc:
        log.warning("function %s returned an unusable HTTP response: %s", name, exc)
        return _http_error(502, "Internal Server Error", request_id)
    response = web.Response(status=mapped.status, body=mapped.body)
    for header, value in mapped.headers:
        if header.lower() == "content-length":
            continue
        if header.lower() == "set-cookie":
            response.headers.add(header, value)
        else:
            response.headers[header] = value
    response.headers.setdefault("x-amzn-RequestId", request_id)
    return response
