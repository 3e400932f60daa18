"""HTTP requests as payload format 2.0 events and function results as HTTP responses (pure mapping),
including the prelude of a streamed HTTP response."""

from __future__ import annotations

import base64
import json

import pytest
from lambdalet_gateway.http_events import (
    BadFunctionResponse,
    HttpRequest,
    build_event,
    is_http_integration,
    map_prelude,
    map_result,
    split_prelude,
)


def request(**changes: object) -> HttpRequest:
    base: dict[str, object] = {
        "method": "POST",
        "path": "/items/7",
        "raw_query": "a=1&b=2&a=3",
        "headers": (
            ("Host", "gw.example:8080"),
            ("User-Agent", "tester/1"),
            ("X-Multi", "one"),
            ("X-Multi", "two"),
            ("Cookie", "c1=v1; c2=v2"),
            ("Content-Type", "application/json"),
        ),
        "body": b'{"k": "v"}',
        "source_ip": "127.0.0.9",
        "request_id": "rid-1",
        "account_id": "123456789012",
        "time_ms": 1583348638390,
    }
    base.update(changes)
    return HttpRequest(**base)  # type: ignore[arg-type]


def test_event_fields() -> None:
    event = build_event(request())
    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/items/7"
    assert event["rawQueryString"] == "a=1&b=2&a=3"
    assert event["cookies"] == ["c1=v1", "c2=v2"]
    assert event["headers"] == {
        "host": "gw.example:8080",
        "user-agent": "tester/1",
        "x-multi": "one,two",
        "content-type": "application/json",
    }
    assert event["queryStringParameters"] == {"a": "1,3", "b": "2"}
    ctx = event["requestContext"]
    assert ctx["http"] == {
        "method": "POST",
        "path": "/items/7",
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.9",
        "userAgent": "tester/1",
    }
    assert ctx["requestId"] == "rid-1"
    assert ctx["accountId"] == "123456789012"
    assert ctx["domainName"] == "gw.example:8080"
    assert ctx["stage"] == "$default"
    assert ctx["time"] == "04/Mar/2020:19:03:58 +0000"
    assert ctx["timeEpoch"] == 1583348638390
    assert event["body"] == '{"k": "v"}'
    assert event["isBase64Encoded"] is False


def test_no_cookies_no_query_no_body() -> None:
    event = build_event(request(raw_query="", headers=(("Host", "h"),), body=b"", method="GET"))
    assert "cookies" not in event
    assert "queryStringParameters" not in event
    assert "body" not in event
    assert event["isBase64Encoded"] is False


def test_binary_body_is_base64() -> None:
    payload = bytes(range(256))
    event = build_event(request(body=payload, headers=(("Content-Type", "application/octet-stream"),)))
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == payload


def test_text_type_with_invalid_utf8_is_base64() -> None:
    event = build_event(request(body=b"\xff\xfe", headers=(("Content-Type", "text/plain"),)))
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == b"\xff\xfe"


def test_plain_json_result_is_a_200_json_response() -> None:
    response = map_result(b'{"message": "hi"}')
    assert response.status == 200
    assert ("Content-Type", "application/json") in response.headers
    assert json.loads(response.body) == {"message": "hi"}


def test_string_result_is_the_body() -> None:
    assert map_result(b'"Hello"').body == b"Hello"


def test_structured_result() -> None:
    result = {
        "statusCode": 302,
        "headers": {"Location": "/x", "X-Flag": True},
        "cookies": ["a=1; Max-Age=10", "b=2"],
        "body": base64.b64encode(b"\x00\x01").decode(),
        "isBase64Encoded": True,
    }
    response = map_result(json.dumps(result).encode())
    assert response.status == 302
    assert ("Location", "/x") in response.headers
    assert ("X-Flag", "true") in response.headers
    assert [v for k, v in response.headers if k == "Set-Cookie"] == ["a=1; Max-Age=10", "b=2"]
    assert response.body == b"\x00\x01"


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'{"statusCode": "abc"}', b'{"statusCode": 200, "body": "!!", "isBase64Encoded": true}'],
)
def test_unusable_results(payload: bytes) -> None:
    with pytest.raises(BadFunctionResponse):
        map_result(payload)


# ---- streamed responses with an HTTP prelude ---------------------------------------------------------


def test_a_prelude_gives_status_headers_and_cookies() -> None:
    prelude = json.dumps(
        {"statusCode": 201, "headers": {"Content-Type": "text/plain", "X-A": "1"}, "cookies": ["a=1", "b=2; Path=/"]}
    ).encode()
    assert split_prelude(prelude + b"\0" * 8 + b"body") == (prelude, b"body")
    mapped = map_prelude(prelude)
    assert mapped.status == 201
    assert mapped.headers == [
        ("Content-Type", "text/plain"),
        ("X-A", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2; Path=/"),
    ]
    assert mapped.body == b""


def test_a_prelude_may_leave_out_the_status() -> None:
    assert map_prelude(b'{"headers": {"x": "y"}}').status == 200
    assert map_prelude(b"").status == 200


def test_the_prelude_arrives_in_pieces_within_16_kb() -> None:
    assert split_prelude(b'{"statusCode": 2') is None
    assert split_prelude(b'{"statusCode": 200}\0\0\0') is None
    with pytest.raises(BadFunctionResponse, match="16384"):
        split_prelude(b"x" * (16 * 1024 + 8))
    with pytest.raises(BadFunctionResponse, match="16384"):
        split_prelude(b" " * (16 * 1024 + 1) + b"\0" * 8)


@pytest.mark.parametrize(
    ("prelude", "problem"),
    [(b"not json", "not JSON"), (b"[1]", "JSON object"), (b'{"statusCode": 99}', "statusCode")],
)
def test_a_bad_prelude_is_named(prelude: bytes, problem: str) -> None:
    with pytest.raises(BadFunctionResponse, match=problem):
        map_prelude(prelude)


def test_the_http_integration_content_type() -> None:
    assert is_http_integration("application/vnd.awslambda.http-integration-response")
    assert is_http_integration("Application/vnd.awslambda.http-integration-response; charset=utf-8")
    assert not is_http_integration("text/plain")
