"""HTTP handlers of the data path: the Lambda Invoke API, InvokeWithResponseStream, and the HTTP routes
(payload format 2.0).

Thin: parse the request, call the dispatcher, write the response; every failure before the response
starts is a :class:`~lambdalet_gateway.errors.LambdaError` answered in Lambda's wire format. A function's
streamed response is written on as it arrives: as ``PayloadChunk`` events then ``InvokeComplete`` for
InvokeWithResponseStream, as the HTTP body on an HTTP route (a mid-stream error ends that body without
its last chunk, so the client sees it truncated, as with function URLs).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from dataclasses import dataclass

from aiohttp import web

from lambdalet.names import InvalidFunctionName, parse_function_name

from . import eventstream
from .asyncq.gateway import accept_event
from .dispatcher import LATEST, Dispatcher, InvocationResult, StreamedResult
from .errors import (
    MAX_SYNC_PAYLOAD,
    InvalidParameterValue,
    InvalidRequestContent,
    LambdaError,
    RequestTooLarge,
    not_found,
)
from .http_events import (
    BadFunctionResponse,
    HttpRequest,
    HttpResponse,
    build_event,
    is_http_integration,
    map_prelude,
    map_result,
    split_prelude,
)

log = logging.getLogger("lambdalet.gateway.invoke")

DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher", Dispatcher)

#: Payloads larger than this are validated as JSON in a worker thread, off the event loop.
_THREAD_JSON_BYTES = 256 * 1024

#: A caller's FunctionName and Qualifier, parsed once per distinct pair (parsing is pure; a miss costs a
#: regular-expression match, a hit a dictionary lookup).
_function_ref = functools.lru_cache(maxsize=1024)(parse_function_name)


def new_request_id() -> str:
    """A random (version 4) UUID as Lambda's request ids are: ``str(uuid.uuid4())``, formatted from 16
    random bytes directly (half the time; one is made for every invocation)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


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


@dataclass(frozen=True, slots=True)
class _Invocation:
    """A validated Invoke / InvokeWithResponseStream request."""

    name: str
    qualifier: str | None
    body: bytes
    invocation_type: str
    log_tail: bool
    client_context: str | None
    trace_id: str | None


async def _parse(request: web.Request, request_id: str, types: tuple[str, ...]) -> _Invocation:
    dispatcher = request.app[DISPATCHER]
    qualifier = request.query.get("Qualifier") if request.query_string else None
    try:
        ref = _function_ref(request.match_info["name"], qualifier)
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
    if invocation_type not in types:
        raise InvalidParameterValue(f"InvocationType must be one of {', '.join(types)} (got {invocation_type!r})")
    log_type = headers.get("X-Amz-Log-Type", "None")
    if log_type not in {"None", "Tail"}:
        raise InvalidParameterValue(f"LogType must be None or Tail (got {log_type!r})")
    return _Invocation(
        ref.name,
        ref.qualifier,
        body,
        invocation_type,
        log_type == "Tail",
        headers.get("X-Amz-Client-Context"),
        headers.get("X-Amzn-Trace-Id"),
    )


async def invoke(request: web.Request) -> web.StreamResponse:
    """``POST /2015-03-31/functions/{name}/invocations``."""
    request_id = new_request_id()
    try:
        return await _invoke(request, request_id)
    except LambdaError as exc:
        exc.request_id = request_id
        return exc.response()


async def _invoke(request: web.Request, request_id: str) -> web.StreamResponse:
    dispatcher = request.app[DISPATCHER]
    call = await _parse(request, request_id, ("RequestResponse", "Event", "DryRun"))
    if call.invocation_type == "DryRun":
        dispatcher.admit_check(call.name)
        return web.Response(status=204, headers={"x-amzn-RequestId": request_id})
    if call.invocation_type == "Event":
        return await accept_event(request, call.name, call.body, request_id)
    result = await dispatcher.invoke(
        call.name,
        call.body,
        request_id=request_id,
        client_context=call.client_context,
        log_tail=call.log_tail,
        invoked_arn=dispatcher.arn(call.name, call.qualifier) if call.qualifier else None,
        trace_id=call.trace_id,
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


async def invoke_with_response_stream(request: web.Request) -> web.StreamResponse:
    """``POST /2021-11-15/functions/{name}/response-streaming-invocations``: the result as an event
    stream of ``PayloadChunk`` events (one per chunk the function wrote; one with the whole result for a
    function that does not stream) and a final ``InvokeComplete`` with ``ErrorCode`` (the error type),
    ``ErrorDetails`` (its message) and ``LogResult``."""
    request_id = new_request_id()
    dispatcher = request.app[DISPATCHER]
    try:
        call = await _parse(request, request_id, ("RequestResponse", "DryRun"))
        if call.invocation_type == "DryRun":
            dispatcher.admit_check(call.name)
            return web.Response(status=204, headers={"x-amzn-RequestId": request_id})
        result = await dispatcher.invoke_stream(
            call.name,
            call.body,
            request_id=request_id,
            client_context=call.client_context,
            log_tail=call.log_tail,
            invoked_arn=dispatcher.arn(call.name, call.qualifier) if call.qualifier else None,
            trace_id=call.trace_id,
        )
    except LambdaError as exc:
        exc.request_id = request_id
        return exc.response()
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/vnd.amazon.eventstream",
            "x-amzn-RequestId": request_id,
            "X-Amz-Executed-Version": result.executed_version,
        }
    )
    try:
        await response.prepare(request)
        if isinstance(result, InvocationResult):
            if result.function_error is None:
                if result.payload:
                    await response.write(eventstream.payload_chunk(result.payload))
                complete = eventstream.invoke_complete(log_result=result.log_result)
            else:
                complete = eventstream.invoke_complete(*_error_fields(result.payload), result.log_result)
        else:
            async for chunk in result:
                await response.write(eventstream.payload_chunk(chunk))
            if result.failure is not None:
                complete = eventstream.invoke_complete("ServiceException", result.failure, result.log_result)
            elif result.error is not None:
                complete = eventstream.invoke_complete(*_error_fields(result.error), result.log_result)
            else:
                complete = eventstream.invoke_complete(log_result=result.log_result)
        await response.write(complete)
        await response.write_eof()
    except ConnectionError:
        log.info("the caller of %s went away mid-stream (request %s)", call.name, request_id)
    finally:
        if isinstance(result, StreamedResult):
            result.close()
    return response


def _error_fields(error: bytes) -> tuple[str, str]:
    """``(ErrorCode, ErrorDetails)`` of a function error object: its ``errorType`` and ``errorMessage``."""
    try:
        value = json.loads(error)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return "Unhandled", error.decode("utf-8", "replace")
    error_type = value.get("errorType")
    message = value.get("errorMessage")
    return (
        error_type if isinstance(error_type, str) and error_type else "Unhandled",
        message if isinstance(message, str) else json.dumps(value),
    )


def _http_error(status: int, message: str, request_id: str, error_type: str | None = None) -> web.Response:
    headers = {"Content-Type": "application/json", "x-amzn-RequestId": request_id}
    if error_type:
        headers["x-amzn-ErrorType"] = error_type
    if status == 429:
        headers["Retry-After"] = "1"
    return web.Response(status=status, body=json.dumps({"message": message}).encode(), headers=headers)


async def http_route(request: web.Request) -> web.StreamResponse:
    """``ANY /fn/{name}[/{path}]``: the request as a payload format 2.0 event, the result as the response."""
    request_id = new_request_id()
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
        result = await dispatcher.invoke_stream(name, json.dumps(event).encode(), request_id=request_id)
    except LambdaError as exc:
        message = "Too Many Requests" if exc.status == 429 else exc.message
        return _http_error(exc.status, message, request_id, exc.code)
    if isinstance(result, StreamedResult):
        try:
            return await _stream_http(request, name, result)
        finally:
            result.close()
    if result.function_error is not None:
        return _http_error(502, "Internal Server Error", request_id)
    try:
        mapped = map_result(result.payload)
    except BadFunctionResponse as exc:
        log.warning("function %s returned an unusable HTTP response: %s", name, exc)
        return _http_error(502, "Internal Server Error", request_id)
    response = web.Response(status=mapped.status, body=mapped.body)
    _copy_headers(mapped, response, request_id)
    return response


def _copy_headers(mapped: HttpResponse, response: web.StreamResponse, request_id: str) -> None:
    for header, value in mapped.headers:
        if header.lower() in {"content-length", "transfer-encoding"}:
            continue
        if header.lower() == "set-cookie":
            response.headers.add(header, value)
        else:
            response.headers[header] = value
    response.headers.setdefault("x-amzn-RequestId", request_id)


async def _stream_http(request: web.Request, name: str, result: StreamedResult) -> web.StreamResponse:
    """A streamed result as the HTTP response, written on chunk by chunk."""
    request_id = result.request_id
    head = b""
    if is_http_integration(result.content_type):
        try:
            async for chunk in result:
                head += chunk
                if (split := split_prelude(head)) is not None:
                    prelude, head = split
                    break
            else:
                raise BadFunctionResponse("the stream ended before its HTTP response prelude")
            mapped = map_prelude(prelude)
        except BadFunctionResponse as exc:
            if result.function_error is None and result.failure is None:
                log.warning("function %s streamed an unusable HTTP response: %s", name, exc)
            return _http_error(502, "Internal Server Error", request_id)
    else:
        first = await anext(result, None)
        if first is None and (result.function_error is not None or result.failure is not None):
            return _http_error(502, "Internal Server Error", request_id)
        head = first or b""
        mapped = HttpResponse(200, [("Content-Type", result.content_type)])
    response = web.StreamResponse(status=mapped.status)
    _copy_headers(mapped, response, request_id)
    try:
        await response.prepare(request)
        if head:
            await response.write(head)
        async for chunk in result:
            await response.write(chunk)
        if result.function_error is not None or result.failure is not None:
            # too late for an error status: end the body without its last chunk (a truncated response)
            log.warning("function %s failed mid-stream (request %s)", name, request_id)
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
    except ConnectionError:
        log.info("the caller of %s went away mid-stream (request %s)", name, request_id)
    return response
