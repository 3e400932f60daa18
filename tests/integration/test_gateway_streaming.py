"""Response streaming through the gateway, end to end with real agents and Node.js functions
(``awslambda.streamifyResponse``): InvokeWithResponseStream as boto3 sees it (each chunk its own
PayloadChunk, in order, delivered while the function is still running; InvokeComplete with the error of a
mid-stream failure or timeout, and the log tail), plain Invoke of a streaming function (buffered, its
error a function error, over 6 MB Function.ResponseSizeTooLarge), streamed HTTP routes (prelude status,
headers and cookies, the body chunk by chunk, truncated by a mid-stream error), concurrency while streams
are open, and a caller that goes away mid-stream.

"While the function is still running" is shown without timing: the gated function writes its first chunk
and then waits for a file the test creates only after it has received that chunk."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal as signal_module
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError
from gateway_support import EXAMPLES, RunningGateway, aws_cli, running_gateway, wait_for, write_function

GATED = """
import { existsSync } from 'node:fs';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Writes "first", waits until the file named by `signal` exists, writes "second" and ends; `fail`
// throws after the signal, `hang` never ends, `exit` ends the runtime's process. Called through an
// HTTP route, it answers with a prelude.
export const handler = awslambda.streamifyResponse(async (event, responseStream) => {
  const query = event.queryStringParameters;
  const options = query ?? event;
  let stream = responseStream;
  if (query) {
    stream = awslambda.HttpResponseStream.from(responseStream, {
      statusCode: 201,
      headers: { 'Content-Type': 'text/plain', 'X-Gated': 'yes' },
      cookies: ['a=1; Path=/', 'b=2'],
    });
  } else {
    stream.setContentType('text/plain');
  }
  stream.write('first');
  while (!existsSync(options.signal)) await sleep(10);
  if (options.hang) await sleep(1e9);
  if (options.exit) process.exit(3);
  stream.write('second');
  if (options.fail) throw new Error('failed after the signal');
  stream.end();
});
"""

BIG = """
// Streams `megabytes` MB in 1 MB chunks.
export const handler = awslambda.streamifyResponse(async (event, stream) => {
  for (let i = 0; i < event.megabytes; i += 1) stream.write(Buffer.alloc(1024 * 1024, 97 + i));
  stream.end();
});
"""

CONTEXT = """
// Streams what the invocation carried: the client context and the invoked ARN.
export const handler = awslambda.streamifyResponse(async (event, stream, context) => {
  stream.write(JSON.stringify({ custom: context.clientContext?.custom ?? null }));
  stream.write(JSON.stringify({ arn: context.invokedFunctionArn }));
  stream.end();
});
"""

RAISES = """
def handler(event, context):
    raise ValueError("boom " + str(event.get("n")))
"""


def node(**spec: Any) -> dict[str, Any]:
    return {"runtime": "nodejs20.x", "handler": "index.handler"} | spec


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("streaming")
    manifests = tmp / "manifests"
    manifests.mkdir()
    write_function(manifests, "gated", {"index.mjs": GATED}, **node(timeoutSeconds=30))
    write_function(manifests, "gated-short", {"index.mjs": GATED}, **node(timeoutSeconds=1))
    write_function(manifests, "gated-one", {"index.mjs": GATED}, **node(timeoutSeconds=30, reservedConcurrency=1))
    write_function(manifests, "gated-drop", {"index.mjs": GATED}, **node(timeoutSeconds=30, reservedConcurrency=1))
    write_function(manifests, "gated-kill", {"index.mjs": GATED}, **node(timeoutSeconds=30))
    write_function(manifests, "big", {"index.mjs": BIG}, **node(memoryMB=256, timeoutSeconds=30))
    write_function(manifests, "raises", {"app.py": RAISES})
    write_function(manifests, "context", {"index.mjs": CONTEXT}, **node())
    write_function(manifests, "never", {"index.mjs": GATED}, **node(reservedConcurrency=0))
    with running_gateway([EXAMPLES / "stream-node", EXAMPLES / "hello", manifests], tmp) as gw:
        yield gw


@pytest.fixture
def signal(tmp_path: Path) -> Path:
    return tmp_path / "go"


def stream(gateway: RunningGateway, name: str, payload: object, **options: Any) -> tuple[dict[str, Any], Iterator[Any]]:
    response = gateway.lambda_client().invoke_with_response_stream(
        FunctionName=name, Payload=json.dumps(payload).encode(), **options
    )
    return response, iter(response["EventStream"])


# ---- InvokeWithResponseStream -----------------------------------------------------------------------


def test_chunks_arrive_separately_in_order_while_the_function_runs(gateway: RunningGateway, signal: Path) -> None:
    response, events = stream(gateway, "gated", {"signal": str(signal)})
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert response["ResponseStreamContentType"] == "application/vnd.amazon.eventstream"
    # the function is blocked until the signal exists: this chunk was delivered before it finished
    assert next(events) == {"PayloadChunk": {"Payload": b"first"}}
    assert not signal.exists()
    signal.touch()
    assert next(events) == {"PayloadChunk": {"Payload": b"second"}}
    assert next(events) == {"InvokeComplete": {}}
    assert next(events, None) is None


def test_the_example_streams_each_write_as_its_own_event(gateway: RunningGateway) -> None:
    _, events = stream(gateway, "stream-node", {"chunks": 4, "delayMs": 50})
    assert list(events) == [
        {"PayloadChunk": {"Payload": b"chunk 1 of 4\n"}},
        {"PayloadChunk": {"Payload": b"chunk 2 of 4\n"}},
        {"PayloadChunk": {"Payload": b"chunk 3 of 4\n"}},
        {"PayloadChunk": {"Payload": b"chunk 4 of 4\n"}},
        {"InvokeComplete": {}},
    ]


def test_a_mid_stream_error_completes_with_its_type_and_message(gateway: RunningGateway) -> None:
    _, events = stream(gateway, "stream-node", {"chunks": 3, "delayMs": 10, "failAt": 2})
    assert list(events) == [
        {"PayloadChunk": {"Payload": b"chunk 1 of 3\n"}},
        {"PayloadChunk": {"Payload": b"chunk 2 of 3\n"}},
        {"InvokeComplete": {"ErrorCode": "Error", "ErrorDetails": "failed after chunk 2"}},
    ]


def test_a_timeout_mid_stream_completes_with_sandbox_timedout(gateway: RunningGateway, signal: Path) -> None:
    signal.touch()
    response, events = stream(gateway, "gated-short", {"signal": str(signal), "hang": True})
    request_id = response["ResponseMetadata"]["RequestId"]
    assert list(events) == [
        {"PayloadChunk": {"Payload": b"first"}},
        {
            "InvokeComplete": {
                "ErrorCode": "Sandbox.Timedout",
                "ErrorDetails": f"RequestId: {request_id} Error: Task timed out after 1.00 seconds",
            }
        },
    ]
    # the environment was reset: the next invocation runs normally
    _, events = stream(gateway, "gated-short", {"signal": str(signal)})
    assert [event for event in events if "PayloadChunk" in event] == [
        {"PayloadChunk": {"Payload": b"first"}},
        {"PayloadChunk": {"Payload": b"second"}},
    ]


def test_a_crash_mid_stream_completes_with_runtime_exit_error(gateway: RunningGateway, signal: Path) -> None:
    _, events = stream(gateway, "gated", {"signal": str(signal), "exit": True})
    assert next(events) == {"PayloadChunk": {"Payload": b"first"}}
    signal.touch()
    received = list(events)
    assert len(received) == 1
    complete = received[0]["InvokeComplete"]
    assert complete["ErrorCode"] == "Runtime.ExitError"
    assert "exit status 3" in complete["ErrorDetails"]
    _, events = stream(gateway, "gated", {"signal": str(signal)})
    assert list(events)[-1] == {"InvokeComplete": {}}


def test_an_environment_that_dies_mid_stream_completes_with_a_service_exception(
    gateway: RunningGateway, signal: Path
) -> None:
    _, events = stream(gateway, "gated-kill", {"signal": str(signal)})
    assert next(events) == {"PayloadChunk": {"Payload": b"first"}}
    (agent,) = gateway.agent_pids("gated-kill")
    os.kill(agent, signal_module.SIGKILL)
    (complete,) = list(events)
    assert complete["InvokeComplete"]["ErrorCode"] == "ServiceException"
    assert "mid-stream" in complete["InvokeComplete"]["ErrorDetails"]
    signal.touch()
    _, events = stream(gateway, "gated-kill", {"signal": str(signal)})  # a new environment
    assert list(events)[-1] == {"InvokeComplete": {}}


def test_the_log_tail_comes_with_invoke_complete(gateway: RunningGateway) -> None:
    response, events = stream(gateway, "stream-node", {"chunks": 1}, LogType="Tail")
    complete = list(events)[-1]["InvokeComplete"]
    log = base64.b64decode(complete["LogResult"]).decode()
    request_id = response["ResponseMetadata"]["RequestId"]
    assert f"START RequestId: {request_id}" in log
    assert f"REPORT RequestId: {request_id}" in log


def test_client_context_and_qualifier_reach_the_function(gateway: RunningGateway) -> None:
    context = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    arn = "arn:aws:lambda:us-east-1:000000000000:function:context"
    _, events = stream(gateway, "context", {}, ClientContext=context, Qualifier="$LATEST")
    assert list(events) == [
        {"PayloadChunk": {"Payload": b'{"custom":{"k":"v"}}'}},
        {"PayloadChunk": {"Payload": json.dumps({"arn": arn + ":$LATEST"}, separators=(",", ":")).encode()}},
        {"InvokeComplete": {}},
    ]


def test_a_function_that_does_not_stream_is_one_chunk(gateway: RunningGateway) -> None:
    _, events = stream(gateway, "hello", {"name": "stream"})
    assert list(events) == [
        {"PayloadChunk": {"Payload": b'{"message": "Hello, stream!"}'}},
        {"InvokeComplete": {}},
    ]
    _, events = stream(gateway, "raises", {"n": 3})
    assert list(events) == [{"InvokeComplete": {"ErrorCode": "ValueError", "ErrorDetails": "boom 3"}}]


def test_a_large_stream_is_not_cut(gateway: RunningGateway) -> None:
    _, events = stream(gateway, "big", {"megabytes": 8})
    received = list(events)
    assert received[-1] == {"InvokeComplete": {}}
    payload = b"".join(event["PayloadChunk"]["Payload"] for event in received[:-1])
    assert len(payload) == 8 * 1024 * 1024
    assert payload[0:1] == b"a" and payload[-1:] == b"h"


def test_refusals_come_before_the_stream_as_lambda_errors(gateway: RunningGateway) -> None:
    client = gateway.lambda_client()
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke_with_response_stream(FunctionName="nope", Payload=b"{}")
    with pytest.raises(client.exceptions.TooManyRequestsException) as throttled:
        client.invoke_with_response_stream(FunctionName="never", Payload=b"{}")
    assert throttled.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    with pytest.raises(client.exceptions.InvalidRequestContentException):
        client.invoke_with_response_stream(FunctionName="stream-node", Payload=b"{not json")
    with pytest.raises(client.exceptions.RequestTooLargeException):
        client.invoke_with_response_stream(FunctionName="stream-node", Payload=b" " * (6291456 + 1))
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke_with_response_stream(FunctionName="stream-node", Qualifier="prod", Payload=b"{}")
    status, headers, body = gateway.post(
        "/2021-11-15/functions/stream-node/response-streaming-invocations", b"{}", {"X-Amz-Invocation-Type": "Event"}
    )
    assert status == 400
    assert headers["x-amzn-ErrorType"] == "InvalidParameterValueException"
    assert "RequestResponse, DryRun" in json.loads(body)["message"]
    dry_run = client.invoke_with_response_stream(FunctionName="stream-node", InvocationType="DryRun")
    assert dry_run["StatusCode"] == 204
    dry_run["EventStream"].close()


# ---- Invoke of a streaming function -----------------------------------------------------------------


def test_invoke_returns_the_whole_stream(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="stream-node", Payload=b'{"chunks": 2, "delayMs": 10}')
    assert "FunctionError" not in response
    assert response["Payload"].read() == b"chunk 1 of 2\nchunk 2 of 2\n"
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "text/plain; charset=utf-8"


def test_invoke_of_a_stream_that_fails_is_a_function_error(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="stream-node", Payload=b'{"delayMs": 10, "failAt": 1}')
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Payload"].read())
    assert (error["errorType"], error["errorMessage"]) == ("Error", "failed after chunk 1")


def test_invoke_of_a_stream_over_six_megabytes_is_a_size_error(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="big", Payload=b'{"megabytes": 7}')
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Payload"].read())
    assert error["errorType"] == "Function.ResponseSizeTooLarge"
    assert "6291556 bytes" in error["errorMessage"]
    # the rest of that stream was drained: the function's environment serves the next invocation
    response = gateway.lambda_client().invoke(FunctionName="big", Payload=b'{"megabytes": 1}')
    assert len(response["Payload"].read()) == 1024 * 1024


# ---- HTTP routes ---------------------------------------------------------------------------------------


def open_route(gateway: RunningGateway, path: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = urlsplit(gateway.url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    connection.request("GET", path)
    return connection, connection.getresponse()


def test_a_streamed_http_response_sends_its_head_then_the_body_as_written(
    gateway: RunningGateway, signal: Path
) -> None:
    connection, response = open_route(gateway, f"/fn/gated/page?signal={signal}")
    try:
        assert response.status == 201
        assert response.getheader("Content-Type") == "text/plain"
        assert response.getheader("X-Gated") == "yes"
        assert response.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2"]
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.read1(100) == b"first"  # while the function waits for the signal
        signal.touch()
        assert response.read() == b"second"
    finally:
        connection.close()


def test_the_http_example_streams_its_page(gateway: RunningGateway) -> None:
    connection, response = open_route(gateway, "/fn/stream-http/?lines=2&delayMs=10")
    try:
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/html; charset=utf-8"
        assert response.getheader("Set-Cookie") == "streamed=yes; Path=/"
        assert response.read() == (b"<!doctype html><title>streaming</title>\n<p>line 1 of 2</p>\n<p>line 2 of 2</p>\n")
    finally:
        connection.close()


def test_a_mid_stream_error_truncates_the_http_body(gateway: RunningGateway) -> None:
    connection, response = open_route(gateway, "/fn/stream-http/?lines=3&delayMs=10&failAt=2")
    try:
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead) as cut:
            response.read()
        assert cut.value.partial.endswith(b"<p>line 2 of 3</p>\n")
    finally:
        connection.close()


def test_a_stream_without_a_prelude_is_a_200_with_its_content_type(gateway: RunningGateway) -> None:
    status, headers, body = gateway.get("/fn/stream-node")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == b"chunk 1 of 3\nchunk 2 of 3\nchunk 3 of 3\n"


# ---- environments and concurrency while streams are open -----------------------------------------------


def test_an_open_stream_holds_its_concurrency(gateway: RunningGateway, signal: Path) -> None:
    client = gateway.lambda_client()
    _, events = stream(gateway, "gated-one", {"signal": str(signal)})
    assert next(events) == {"PayloadChunk": {"Payload": b"first"}}
    assert gateway.environments("gated-one")["busy"] == 1
    with pytest.raises(client.exceptions.TooManyRequestsException):
        client.invoke_with_response_stream(FunctionName="gated-one", Payload=b"{}")
    with pytest.raises(ClientError) as caught:
        client.invoke(FunctionName="gated-one", Payload=b"{}")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    status, _, _ = gateway.get("/fn/gated-one")
    assert status == 429
    signal.touch()
    assert [event for event in events if "InvokeComplete" in event] == [{"InvokeComplete": {}}]
    response = client.invoke(FunctionName="gated-one", Payload=json.dumps({"signal": str(signal)}).encode())
    assert response["Payload"].read() == b"firstsecond"


def test_a_caller_that_goes_away_mid_stream_frees_the_environment_when_the_function_ends(
    gateway: RunningGateway, signal: Path
) -> None:
    url = urlsplit(gateway.url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    connection.request(
        "POST",
        "/2021-11-15/functions/gated-drop/response-streaming-invocations",
        body=json.dumps({"signal": str(signal)}).encode(),
    )
    response = connection.getresponse()
    assert response.status == 200
    assert b"first" in response.read1(1000)  # the first PayloadChunk event
    connection.close()  # the caller goes away while the function still runs
    assert gateway.environments("gated-drop")["busy"] == 1
    client = gateway.lambda_client()
    with pytest.raises(client.exceptions.TooManyRequestsException):
        client.invoke(FunctionName="gated-drop", Payload=b"{}")
    signal.touch()  # the function finishes; the gateway has read its stream to the end
    wait_for(lambda: gateway.environments("gated-drop") == {"idle": 1, "busy": 0, "starting": 0}, what="idle")
    response = client.invoke(FunctionName="gated-drop", Payload=json.dumps({"signal": str(signal)}).encode())
    assert response["Payload"].read() == b"firstsecond"


def test_the_aws_cli_invokes_a_streaming_function(gateway: RunningGateway, tmp_path: Path) -> None:
    """AWS's CLI has no ``invoke-with-response-stream`` command (neither v1 nor v2 offers the operation),
    so it calls a streaming function through ``invoke``: the whole stream, or the function error."""
    aws, env = aws_cli()
    command = [str(aws), "lambda", "invoke", "--function-name", "stream-node", "--endpoint-url", gateway.url]
    command += ["--output", "json"]
    outputs: list[tuple[dict[str, Any], bytes]] = []
    for payload in ('{"chunks": 2, "delayMs": 10}', '{"delayMs": 10, "failAt": 2}'):
        out = tmp_path / f"out{len(outputs)}"
        done = subprocess.run(
            [*command, "--payload", payload, str(out)],
            capture_output=True,
            env=env,
            check=True,
            timeout=60,
        )
        outputs.append((json.loads(done.stdout), out.read_bytes()))
    (ok_meta, ok_body), (error_meta, error_body) = outputs
    assert ok_meta["StatusCode"] == 200
    assert "FunctionError" not in ok_meta
    assert ok_body == b"chunk 1 of 2\nchunk 2 of 2\n"
    assert error_meta["FunctionError"] == "Unhandled"
    assert json.loads(error_body)["errorMessage"] == "failed after chunk 2"
