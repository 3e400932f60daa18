"""Streaming response mode end to end over raw sockets: the runtime's chunks reach the invoker as they are
written, and the invocation's end (the runtime's mid-stream error trailers, a timeout, a crash, the size
cap) reaches it as trailer fields after the last chunk (the agent's streamed-result contract)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator

import pytest
from agent_support import RunningAgent, connection, invoke_request, running_agent, until
from lambdalet_agent.server import STREAM_TRAILERS
from runtimes_support import PEER_BUILD_TIMEOUT, Toolchains, flavor_by_id, running

IDLE = (sys.executable, "-c", "import time; time.sleep(600)")
API = "/2018-06-01/runtime"
TOOLCHAINS = Toolchains()
RT8_BODY = "eyJlcnJvck1lc3NhZ2UiOiJzdHJlYW0gYnJva2UiLCJlcnJvclR5cGUiOiJSdW50aW1lRXJyb3IifQ=="

# A runtime (a real process) that streams its responses over a raw socket, as AWS's clients do, and
# does what the event says mid-stream.
STREAMING_RUNTIME = r"""
import json, os, socket, sys, time
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")

def request(sock, head, body=b""):
    sock.sendall(head.encode() + body)

def answer(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest[:length]

def chunk(data):
    return b"%x\r\n%b\r\n" % (len(data), data)

sock = socket.create_connection((host, int(port)))
while True:
    request(sock, f"GET {sys.argv[1]}/invocation/next HTTP/1.1\r\nHost: api\r\n\r\n")
    _, headers, body = answer(sock)
    rid = headers["lambda-runtime-aws-request-id"]
    event = json.loads(body)
    request(sock, f"POST {sys.argv[1]}/invocation/{rid}/response HTTP/1.1\r\nHost: api\r\n"
            "Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: text/plain\r\n"
            "Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n\r\n")
    sock.sendall(chunk(b"partial"))
    action = event.get("action")
    if action == "hang":
        time.sleep(600)
    if action == "crash":
        os._exit(3)
    if action == "big":
        piece = b"x" * 65536
        for _ in range(event["pieces"]):
            sock.sendall(chunk(piece))
    sock.sendall(chunk(b" done") + b"0\r\n\r\n")
    status, _, reply = answer(sock)
    print("posted", status, reply.decode(), flush=True)
"""


def _streaming_runtime() -> tuple[str, ...]:
    return (sys.executable, "-c", STREAMING_RUNTIME, API)


@pytest.fixture
async def idle() -> AsyncIterator[RunningAgent]:
    """The test plays the runtime (the agent's child is an idle stand-in)."""
    async with running_agent("app.handler", command=IDLE, runtime=None, timeout_s=5) as running:
        yield running


def _invoke_address(agent: RunningAgent) -> str:
    return f"127.0.0.1:{agent.agent.port}"


async def _read_until(reader: asyncio.StreamReader, data: bytes, end: bytes) -> bytes:
    while not data.endswith(end):
        more = await reader.read(65536)
        assert more, f"connection closed; got {data!r}"
        data += more
    return data


async def test_rt8_vector_reaches_the_invoker_as_chunks_then_error_trailers(idle: RunningAgent) -> None:
    api_host, _, api_port = idle.agent.env.runtime_api_address.rpartition(":")
    invoker_r, invoker_w = await asyncio.open_connection("127.0.0.1", idle.agent.port)
    runtime_r, runtime_w = await asyncio.open_connection(api_host, int(api_port))
    try:
        invoker_w.write(invoke_request(b'{"n":1}'))
        runtime_w.write(f"GET {API}/invocation/next HTTP/1.1\r\nHost: api\r\n\r\n".encode())
        head = await _read_until(runtime_r, b"", b'{"n":1}')
        request_id = next(
            line.split(": ", 1)[1]
            for line in head.decode().split("\r\n")
            if line.lower().startswith("lambda-runtime-aws-request-id")
        )
        runtime_w.write(
            f"POST {API}/invocation/{request_id}/response HTTP/1.1\r\n"
            "Lambda-Runtime-Function-Response-Mode: streaming\r\n"
            "Transfer-Encoding: chunked\r\n"
            "Content-Type: application/octet-stream\r\n"
            "Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n"
            "\r\n"
            "6\r\nchunk1\r\n".encode()
        )
        # The chunk reaches the invoker before the runtime has finished its response.
        received = await _read_until(invoker_r, b"", b"6\r\nchunk1\r\n")
        head_text, _, first = received.partition(b"\r\n\r\n")
        assert first == b"6\r\nchunk1\r\n"
        runtime_w.write(
            b"0\r\n"
            b"Lambda-Runtime-Function-Error-Type: Function.RuntimeError\r\n"
            b"Lambda-Runtime-Function-Error-Body: " + RT8_BODY.encode() + b"\r\n"
            b"\r\n"
        )
        accepted = await _read_until(runtime_r, b"", b'{"status":"OK"}')
        assert accepted.startswith(b"HTTP/1.1 202 Accepted\r\n")
        rest = await _read_until(invoker_r, b"", b"\r\n\r\n")
    finally:
        for writer in (invoker_w, runtime_w):
            writer.close()
    lines = head_text.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["x-amzn-RequestId"] == request_id
    assert headers["X-Amz-Executed-Version"] == "$LATEST"
    assert headers["X-Lambdalet-Response-Stream"] == "1"
    assert headers["Transfer-Encoding"] == "chunked"
    assert headers["Trailer"] == ", ".join(STREAM_TRAILERS)
    assert "X-Amz-Function-Error" not in headers
    # Byte for byte: the last chunk, the error trailers as the runtime sent them, the REPORT values, the end.
    assert rest.startswith(
        b"0\r\n"
        b"Lambda-Runtime-Function-Error-Type: Function.RuntimeError\r\n"
        b"Lambda-Runtime-Function-Error-Body: " + RT8_BODY.encode() + b"\r\n"
    )
    trailers = dict(line.split(": ", 1) for line in rest[3:-4].decode().split("\r\n"))
    assert base64.b64decode(trailers["Lambda-Runtime-Function-Error-Body"]) == (
        b'{"errorMessage":"stream broke","errorType":"RuntimeError"}'
    )
    assert set(trailers) == {
        "Lambda-Runtime-Function-Error-Type",
        "Lambda-Runtime-Function-Error-Body",
        "X-Lambdalet-Duration-Ms",
        "X-Lambdalet-Billed-Duration-Ms",
        "X-Lambdalet-Max-Memory-Used-MB",
        "X-Lambdalet-Init-Duration-Ms",  # the environment's first invocation
    }
    assert float(trailers["X-Lambdalet-Duration-Ms"]) > 0
    logs = idle.logs()
    assert f"END RequestId: {request_id}" in logs
    assert f"REPORT RequestId: {request_id}" in logs
    metrics = idle.agent.env.metrics.render().decode()
    assert 'lambdalet_agent_errors_total{error_type="Function.RuntimeError"} 1.0' in metrics
    assert 'lambdalet_agent_invocations_total{outcome="error"} 1.0' in metrics


@pytest.mark.parametrize(
    ("trailers", "expected_type", "expected_body"),
    [
        (
            {"Lambda-Runtime-Function-Error-Type": "Custom.Broken"},
            "Custom.Broken",
            {"errorMessage": "", "errorType": "Custom.Broken"},
        ),
        (
            {
                "Lambda-Runtime-Function-Error-Type": "Custom.Broken",
                "Lambda-Runtime-Function-Error-Body": "not base64!",
            },
            "Custom.Broken",
            {"errorMessage": "", "errorType": "Custom.Broken"},
        ),
        ({}, None, None),
    ],
    ids=["no-body", "bad-base64", "no-error"],
)
async def test_error_trailers_without_a_usable_body_and_a_clean_end(
    idle: RunningAgent, trailers: dict[str, str], expected_type: str | None, expected_body: object
) -> None:
    async with (
        connection(_invoke_address(idle)) as (invoker, responses),
        connection(idle.agent.env.runtime_api_address) as (runtime, answers),
    ):
        invoker.write(invoke_request(headers={"X-Amz-Log-Type": "Tail"}))
        runtime.write(f"GET {API}/invocation/next HTTP/1.1\r\nHost: api\r\n\r\n".encode())
        request_id = (await answers.next()).headers["lambda-runtime-aws-request-id"]
        tail = "".join(f"{k}: {v}\r\n" for k, v in trailers.items())
        runtime.write(
            f"POST {API}/invocation/{request_id}/response HTTP/1.1\r\nHost: api\r\n"
            "Lambda-Runtime-Function-Response-Mode: streaming\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"3\r\none\r\n3\r\ntwo\r\n0\r\n{tail}\r\n".encode()
        )
        assert (await answers.next()).status == 202
        result = await responses.next()
    assert result.status == 200
    assert result.headers["content-type"] == "application/json"  # the default when the runtime names none
    assert result.body == b"onetwo"
    assert result.trailers.get("lambda-runtime-function-error-type") == expected_type
    if expected_body is None:
        assert "lambda-runtime-function-error-body" not in result.trailers
    else:
        assert json.loads(base64.b64decode(result.trailers["lambda-runtime-function-error-body"])) == expected_body
    assert f"START RequestId: {request_id}" in base64.b64decode(result.trailers["x-amz-log-result"]).decode()
    assert "x-lambdalet-reset" not in result.trailers


async def _invoke_streamed(agent: RunningAgent, event: object) -> tuple[str, dict[str, str], bytes]:
    async with connection(_invoke_address(agent)) as (invoker, responses):
        invoker.write(invoke_request(json.dumps(event).encode()))
        result = await responses.next()
    assert result.status == 200
    assert result.headers["x-lambdalet-response-stream"] == "1"
    return result.headers["x-amzn-requestid"], result.trailers, result.body


def _error_of(trailers: dict[str, str]) -> object:
    return json.loads(base64.b64decode(trailers["lambda-runtime-function-error-body"]))


@pytest.mark.parametrize(
    ("action", "error_type", "message"),
    [
        ("hang", "Sandbox.Timedout", "RequestId: {} Error: Task timed out after 1.00 seconds"),
        ("crash", "Runtime.ExitError", "RequestId: {} Error: Runtime exited with error: exit status 3"),
    ],
    ids=["timeout", "crash"],
)
async def test_a_timeout_or_crash_mid_stream_ends_with_its_error_trailers_and_resets(
    action: str, error_type: str, message: str
) -> None:
    async with running_agent(command=_streaming_runtime(), runtime=None, timeout_s=1) as agent:
        request_id, trailers, body = await _invoke_streamed(agent, {"action": action})
        _, after, again = await _invoke_streamed(agent, {})
        logs = agent.logs()
        metrics = agent.agent.env.metrics.render().decode()
    assert body == b"partial"
    assert trailers["lambda-runtime-function-error-type"] == error_type
    assert _error_of(trailers) == {"errorType": error_type, "errorMessage": message.format(request_id)}
    assert trailers["x-lambdalet-reset"] == "1"
    assert f"END RequestId: {request_id}" in logs
    assert f'lambdalet_agent_errors_total{{error_type="{error_type}"}} 1.0' in metrics
    # A fresh runtime serves the next invocation, cold again.
    assert again == b"partial done"
    assert "lambda-runtime-function-error-type" not in after
    assert "x-lambdalet-init-duration-ms" in after


async def test_a_timeout_mid_stream_cuts_at_the_deadline() -> None:
    async with running_agent(command=_streaming_runtime(), runtime=None, timeout_s=1) as agent:
        request_id, trailers, _ = await _invoke_streamed(agent, {"action": "hang"})
        logs = agent.logs()
    assert 1000 <= float(trailers["x-lambdalet-duration-ms"]) < 1500
    assert f"{request_id} Task timed out after 1.00 seconds" in logs


async def test_a_stream_past_the_size_cap_ends_with_response_size_too_large() -> None:
    limit = 1024 * 1024
    async with running_agent(command=_streaming_runtime(), runtime=None, stream_response_limit=limit) as agent:
        _, trailers, body = await _invoke_streamed(agent, {"action": "big", "pieces": 32})  # 2 MiB
        _, after, again = await _invoke_streamed(agent, {})
        logs = agent.logs()
    assert len(body) <= limit
    assert body.startswith(b"partialxxx")
    assert trailers["lambda-runtime-function-error-type"] == "Function.ResponseSizeTooLarge"
    assert _error_of(trailers) == {
        "errorType": "Function.ResponseSizeTooLarge",
        "errorMessage": f"Response payload size exceeded maximum allowed payload size ({limit} bytes).",
    }
    # The runtime was told (413) and carries on: the same process serves the next invocation.
    assert f'posted 413 {{"errorMessage":"Exceeded maximum allowed payload size ({limit} bytes).",' in logs
    assert again == b"partial done"
    assert "x-lambdalet-reset" not in after


async def test_an_invoker_that_goes_away_mid_stream_does_not_hold_the_runtime_up() -> None:
    async with running_agent(command=_streaming_runtime(), runtime=None) as agent:
        async with connection(_invoke_address(agent)) as (invoker, responses):
            # 20 MiB: far more than the socket buffers and the agent's stream buffer hold.
            invoker.write(invoke_request(json.dumps({"action": "big", "pieces": 320}).encode()))
            await responses.started()
        # The invoker is gone; the runtime finishes its response and serves the next invocation.
        await until(lambda: 'posted 202 {"status":"OK"}' in agent.logs())
        _, trailers, again = await _invoke_streamed(agent, {})
    assert again == b"partial done"
    assert "lambda-runtime-function-error-type" not in trailers


NODE_STREAMING_CASES = [
    ("streaming.failsMidStream", b"partial", "TypeError", "stream broke"),
    ("streaming.failsBeforeWriting", b"", "RangeError", "nothing written"),
    ("streaming.chunks", "chunk 0 ✓\nchunk 1 ✓\nchunk 2 ✓\n".encode(), None, None),
]


@pytest.mark.slow
@PEER_BUILD_TIMEOUT
@pytest.mark.parametrize(
    ("handler", "expected_body", "error_type", "message"),
    NODE_STREAMING_CASES,
    ids=[c[0] for c in NODE_STREAMING_CASES],
)
async def test_nodejs_streams_end_the_same_through_our_bootstrap_and_aws_lambda_ric(
    handler: str, expected_body: bytes, error_type: str | None, message: str | None
) -> None:
    """``awslambda.streamifyResponse`` handlers: what the invoker receives (chunks, then the error trailers
    when the handler throws) is the same with our Node.js bootstrap and with AWS's ``aws-lambda-ric``."""
    seen = []
    for flavor in (flavor_by_id("nodejs20.x"), flavor_by_id("nodejs20.x-aws-ric")):
        async with running(TOOLCHAINS, flavor, handler=handler) as env:
            for _ in range(2):  # the environment serves the next invocation after a streamed one
                async with connection(f"127.0.0.1:{env.agent.port}") as (invoker, responses):
                    invoker.write(invoke_request(json.dumps({"count": 3}).encode()))
                    result = await responses.next()
                error = None
                if "lambda-runtime-function-error-body" in result.trailers:
                    shape = json.loads(base64.b64decode(result.trailers["lambda-runtime-function-error-body"]))
                    error = (shape["errorType"], shape["errorMessage"])
                seen.append(
                    (
                        result.status,
                        result.headers.get("x-lambdalet-response-stream"),
                        result.body,
                        result.trailers.get("lambda-runtime-function-error-type"),
                        error,
                        "x-lambdalet-reset" in result.trailers,
                    )
                )
    assert seen[:2] == seen[2:], f"our bootstrap {seen[:2]} != AWS's aws-lambda-ric {seen[2:]}"
    expected_error = None if error_type is None else (error_type, message)
    assert seen[0] == (200, "1", expected_body, error_type, expected_error, False)
    assert seen[1] == seen[0]


async def test_a_slow_invoker_slows_the_runtime_down_and_gets_every_byte() -> None:
    async with running_agent(command=_streaming_runtime(), runtime=None, timeout_s=30) as agent:
        async with connection(_invoke_address(agent)) as (invoker, responses):
            invoker.write(invoke_request(json.dumps({"action": "big", "pieces": 320}).encode()))  # 20 MiB
            await responses.started()
            await asyncio.sleep(0.5)  # not reading: the agent stops reading the runtime's stream
            assert "posted" not in agent.logs()
            result = await responses.next()
            # The connection serves the next invocation after a streamed one.
            invoker.write(invoke_request(b"{}"))
            after = await responses.next()
        logs = agent.logs()
    assert result.body == b"partial" + b"x" * 65536 * 320 + b" done"
    assert "lambda-runtime-function-error-type" not in result.trailers
    assert 'posted 202 {"status":"OK"}' in logs
    assert after.body == b"partial done"


@pytest.mark.slow
@PEER_BUILD_TIMEOUT
async def test_a_nodejs_stream_never_ended_runs_into_the_timeout_with_both_bootstraps() -> None:
    """A handler that returns without ending its stream: AWS's ``aws-lambda-ric`` keeps the invocation open
    until the function's timeout, and so does our bootstrap; the invoker gets what was written, then the
    ``Sandbox.Timedout`` trailers, and the environment is reset."""
    seen = []
    for flavor in (flavor_by_id("nodejs20.x"), flavor_by_id("nodejs20.x-aws-ric")):
        async with running(TOOLCHAINS, flavor, handler="streaming.neverEnds", timeout=1.0) as env:
            async with connection(f"127.0.0.1:{env.agent.port}") as (invoker, responses):
                invoker.write(invoke_request(b"{}"))
                result = await responses.next()
            shape = json.loads(base64.b64decode(result.trailers["lambda-runtime-function-error-body"]))
            seen.append(
                (
                    result.status,
                    result.body,
                    result.trailers.get("lambda-runtime-function-error-type"),
                    shape["errorType"],
                    "Task timed out after 1.00 seconds" in shape["errorMessage"],
                    result.trailers.get("x-lambdalet-reset"),
                )
            )
    assert seen[0] == seen[1], f"our bootstrap {seen[0]} != AWS's aws-lambda-ric {seen[1]}"
    assert seen[0] == (200, b"started", "Sandbox.Timedout", "Sandbox.Timedout", True, "1")
