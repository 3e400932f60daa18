"""HTTP routes end to end: the payload 2.0 event as the function receives it (examples/http-echo),
binary bodies, cookies, multi-value headers, and the response mapping back to HTTP."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.request
from collections.abc import Iterator

import pytest
from gateway_support import EXAMPLES, RunningGateway, running_gateway, write_function

RESPONDER = """
import base64, json

def handler(event, context):
    kind = event["rawPath"].strip("/")
    if kind == "redirect":
        return {"statusCode": 302, "headers": {"Location": "/elsewhere"}, "cookies": ["a=1; Path=/", "b=2"]}
    if kind == "binary":
        return {"statusCode": 200, "headers": {"Content-Type": "image/png"},
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64Encoded": True}
    if kind == "text":
        return "plain words"
    if kind == "fail":
        raise RuntimeError("no")
    return {"plain": True}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("http")
    manifests = tmp / "manifests"
    manifests.mkdir()
    write_function(manifests, "responder", {"app.py": RESPONDER})
    with running_gateway([EXAMPLES / "http-echo", manifests], tmp) as gw:
        yield gw


def test_event_shape(gateway: RunningGateway) -> None:
    request = urllib.request.Request(
        gateway.url + "/fn/http-echo/orders/42?color=red&size=L&color=blue",
        data=b'{"qty": 2}',
        method="PUT",
        headers={"Content-Type": "application/json", "User-Agent": "probe/1.0", "Cookie": "session=abc; theme=dark"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        event = json.loads(response.read())["event"]
    assert event["version"] == "2.0"
    assert event["routeKey"] == "$default"
    assert event["rawPath"] == "/orders/42"
    assert event["rawQueryString"] == "color=red&size=L&color=blue"
    assert event["queryStringParameters"] == {"color": "red,blue", "size": "L"}
    assert event["cookies"] == ["session=abc", "theme=dark"]
    assert "cookie" not in event["headers"]
    assert event["headers"]["content-type"] == "application/json"
    assert event["headers"]["user-agent"] == "probe/1.0"
    assert all(name == name.lower() for name in event["headers"])
    http = event["requestContext"]["http"]
    assert http == {
        "method": "PUT",
        "path": "/orders/42",
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.1",
        "userAgent": "probe/1.0",
    }
    assert event["requestContext"]["requestId"] == response.headers["x-amzn-RequestId"]
    assert isinstance(event["requestContext"]["timeEpoch"], int)
    assert event["body"] == '{"qty": 2}'
    assert event["isBase64Encoded"] is False


def test_root_path_and_no_body(gateway: RunningGateway) -> None:
    status, _, body = gateway.get("/fn/http-echo")
    assert status == 200
    event = json.loads(body)["event"]
    assert event["rawPath"] == "/"
    assert event["requestContext"]["http"]["method"] == "GET"
    assert "body" not in event
    assert "queryStringParameters" not in event


def test_binary_request_body(gateway: RunningGateway) -> None:
    payload = bytes(range(256)) * 4
    status, _, body = gateway.post("/fn/http-echo/upload", payload, {"Content-Type": "application/octet-stream"})
    assert status == 200
    event = json.loads(body)["event"]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == payload


def test_multi_value_headers_are_comma_joined(gateway: RunningGateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("GET", "/fn/http-echo/h")
    connection.putheader("X-Tag", "a")
    connection.putheader("X-Tag", "b")
    connection.endheaders()
    response = connection.getresponse()
    event = json.loads(response.read())["event"]
    connection.close()
    assert event["headers"]["x-tag"] == "a,b"


def test_structured_response_with_cookies(gateway: RunningGateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", "/fn/responder/redirect")
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 302
    assert response.getheader("Location") == "/elsewhere"
    assert response.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2"]


def test_binary_response(gateway: RunningGateway) -> None:
    status, headers, body = gateway.get("/fn/responder/binary")
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    assert body == bytes(range(256))


def test_inferred_responses(gateway: RunningGateway) -> None:
    status, headers, body = gateway.get("/fn/responder/plain")
    assert (status, headers["Content-Type"], json.loads(body)) == (200, "application/json", {"plain": True})
    status, _, body = gateway.get("/fn/responder/text")
    assert (status, body) == (200, b"plain words")


def test_function_error_and_missing_function(gateway: RunningGateway) -> None:
    status, _, body = gateway.get("/fn/responder/fail")
    assert status == 502
    assert json.loads(body) == {"message": "Internal Server Error"}
    status, _, _ = gateway.get("/fn/nope/x")
    assert status == 404
