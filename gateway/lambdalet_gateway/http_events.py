"""HTTP requests as API Gateway HTTP API / Function URL events (payload format 2.0), and results back.

A function that streams its response with the HTTP integration content type
(:data:`HTTP_INTEGRATION_TYPE`, as ``awslambda.HttpResponseStream.from`` writes it) sends a JSON prelude
(``statusCode``, ``headers``, ``cookies``), eight NUL bytes, then the body: :func:`split_prelude` and
:func:`map_prelude` turn its first bytes into the response head, as Lambda function URLs do in
``RESPONSE_STREAM`` mode.

Pure: plain values in, plain values out; the aiohttp handler in ``app`` does the I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

#: Content types sent to the function as text; everything else (and invalid UTF-8) is base64.
_TEXT_TYPES = (
    "text/",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/x-www-form-urlencoded",
    "application/yaml",
    "application/graphql",
)
_TEXT_SUFFIXES = ("+json", "+xml")
#: The content type of a streamed response that starts with an HTTP prelude.
HTTP_INTEGRATION_TYPE = "application/vnd.awslambda.http-integration-response"
#: The prelude and its delimiter must arrive within this many bytes.
PRELUDE_LIMIT = 16 * 1024
_DELIMITER = b"\0" * 8


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    #: The path as the function sees it (``/fn/<name>`` stripped), starting with ``/``.
    path: str
    raw_query: str
    #: Header (name, value) pairs in arrival order; a name may repeat.
    headers: tuple[tuple[str, str], ...]
    body: bytes
    source_ip: str
    protocol: str = "HTTP/1.1"
    request_id: str = ""
    api_id: str = "lambdalet"
    account_id: str = "000000000000"
    #: Milliseconds since the epoch (defaults to now).
    time_ms: int | None = None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    #: (name, value) pairs; ``set-cookie`` may repeat.
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


class BadFunctionResponse(ValueError):
    """The function's result cannot be turned into an HTTP response (answered as 502)."""


def _is_text(content_type: str | None) -> bool:
    if not content_type:
        return True
    value = content_type.split(";", 1)[0].strip().lower()
    return value.startswith(_TEXT_TYPES) or value.endswith(_TEXT_SUFFIXES)


def _joined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for name, value in pairs:
        joined[name] = f"{joined[name]},{value}" if name in joined else value
    return joined


def build_event(request: HttpRequest) -> dict[str, Any]:
    """The payload format 2.0 event for ``request``."""
    cookies: list[str] = []
    header_pairs: list[tuple[str, str]] = []
    for name, value in request.headers:
        lower = name.lower()
        if lower == "cookie":
            cookies.extend(part.strip() for part in value.split(";") if part.strip())
        else:
            header_pairs.append((lower, value))
    headers = _joined(header_pairs)
    query = _joined(parse_qsl(request.raw_query, keep_blank_values=True))
    now_ms = request.time_ms if request.time_ms is not None else int(time.time() * 1000)
    host = headers.get("host", "localhost")
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": request.path,
        "rawQueryString": request.raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if query:
        event["queryStringParameters"] = query
    event["requestContext"] = {
        "accountId": request.account_id,
        "apiId": request.api_id,
        "domainName": host,
        "domainPrefix": host.split(".", 1)[0],
        "http": {
            "method": request.method,
            "path": request.path,
            "protocol": request.protocol,
            "sourceIp": request.source_ip,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": request.request_id,
        "routeKey": "$default",
        "stage": "$default",
        "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now_ms / 1000)),
        "timeEpoch": now_ms,
    }
    if request.body:
        if _is_text(headers.get("content-type")):
            try:
                event["body"] = request.body.decode("utf-8")
                event["isBase64Encoded"] = False
            except UnicodeDecodeError:
                event["body"] = base64.b64encode(request.body).decode("ascii")
                event["isBase64Encoded"] = True
        else:
            event["body"] = base64.b64encode(request.body).decode("ascii")
            event["isBase64Encoded"] = True
    else:
        event["isBase64Encoded"] = False
    return event


def map_result(payload: bytes) -> HttpResponse:
    """Turn the function's result into the HTTP response (the 2.0 response format and its inference)."""
    try:
        result = json.loads(payload) if payload.strip() else None
    except ValueError:
        raise BadFunctionResponse("the function's result is not JSON") from None
    if isinstance(result, dict) and "statusCode" in result:
        return _structured(result)
    if isinstance(result, str):
        body = result.encode()
    elif result is None:
        body = b""
    else:
        body = payload
    return HttpResponse(200, [("Content-Type", "application/json")], body)


def _structured(result: dict[str, Any]) -> HttpResponse:
    status = result["statusCode"]
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise BadFunctionResponse(f"statusCode must be an HTTP status code (got {status!r})")
    headers: list[tuple[str, str]] = []
    raw_headers = result.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise BadFunctionResponse("headers must be an object")
    for name, value in raw_headers.items():
        headers.append((str(name), _header_value(value)))
    multi = result.get("multiValueHeaders") or {}
    if isinstance(multi, dict):
        for name, values in multi.items():
            for value in values if isinstance(values, list) else [values]:
                headers.append((str(name), _header_value(value)))
    cookies = result.get("cookies") or []
    if not isinstance(cookies, list):
        raise BadFunctionResponse("cookies must be a list of strings")
    headers.extend(("Set-Cookie", str(cookie)) for cookie in cookies)
    raw_body = result.get("body")
    if raw_body is None:
        body = b""
    elif not isinstance(raw_body, str):
        body = json.dumps(raw_body).encode()
    elif result.get("isBase64Encoded") is True:
        try:
            body = base64.b64decode(raw_body, validate=True)
        except (binascii.Error, ValueError):
            raise BadFunctionResponse("isBase64Encoded is true but body is not base64") from None
    else:
        body = raw_body.encode()
    return HttpResponse(status, headers, body)


def _header_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def is_http_integration(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == HTTP_INTEGRATION_TYPE


def split_prelude(head: bytes) -> tuple[bytes, bytes] | None:
    """``(prelude, first body bytes)`` once the delimiter is in ``head`` (the stream's first bytes), else
    ``None``; :class:`BadFunctionResponse` when it is not within :data:`PRELUDE_LIMIT` bytes."""
    end = head.find(_DELIMITER)
    if end < 0:
        if len(head) >= PRELUDE_LIMIT + len(_DELIMITER):
            raise BadFunctionResponse(f"no HTTP response prelude within the first {PRELUDE_LIMIT} bytes")
        return None
    if end > PRELUDE_LIMIT:
        raise BadFunctionResponse(f"the HTTP response prelude is over {PRELUDE_LIMIT} bytes")
    return head[:end], head[end + len(_DELIMITER) :]


def map_prelude(prelude: bytes) -> HttpResponse:
    """The status and headers (``Set-Cookie`` one per cookie) of a streamed HTTP response; no body."""
    try:
        value = json.loads(prelude) if prelude.strip() else {}
    except ValueError:
        raise BadFunctionResponse("the HTTP response prelude is not JSON") from None
    if not isinstance(value, dict):
        raise BadFunctionResponse("the HTTP response prelude must be a JSON object")
    value = {key: item for key, item in value.items() if key not in {"body", "isBase64Encoded"}}
    value.setdefault("statusCode", 200)
    return _structured(value)
