"""The agent's HTTP/1.1 server (lambdalet_agent.httpserver) over raw sockets: keep-alive, pipelining in
order, ``Expect: 100-continue``, chunked request bodies, malformed requests, routing answers, clients that
close mid-request, and a slow reader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from agent_support import INVOKE_PATH, RunningAgent, connection, invoke_request, running_agent
from lambdalet_agent.environment import REQUEST_LIMIT


@pytest.fixture
async def agent() -> AsyncIterator[RunningAgent]:
    async with running_agent("app.echo") as running:
        await running.wait_ready()
        yield running


def _address(agent: RunningAgent) -> str:
    return f"127.0.0.1:{agent.agent.port}"


def _get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode()


async def test_pipelined_requests_are_answered_in_order_on_one_connection(agent: RunningAgent) -> None:
    async with connection(_address(agent)) as (writer, responses):
        # One write: three invocations (each waits for the runtime), probes and a 404 between them.
        writer.write(
            invoke_request(b'{"n":1}')
            + _get("/healthz")
            + invoke_request(b'{"n":2}')
            + _get("/nowhere")
            + invoke_request(b'{"n":3}')
            + _get("/readyz")
        )
        answers = [await responses.next() for _ in range(6)]
        # Keep-alive: the same connection serves more afterwards.
        writer.write(invoke_request(b'{"n":4}'))
        last = await responses.next()
    assert [(a.status, a.body) for a in answers] == [
        (200, b'{"n": 1}'),
        (200, b"ok"),
        (200, b'{"n": 2}'),
        (404, b"404: Not Found"),
        (200, b'{"n": 3}'),
        (200, b"ready"),
    ]
    assert len({a.headers["x-amzn-requestid"] for a in answers if "x-amzn-requestid" in a.headers}) == 3
    assert (last.status, last.body) == (200, b'{"n": 4}')


def _expecting(length: int) -> bytes:
    return (
        f"POST {INVOKE_PATH} HTTP/1.1\r\nHost: agent\r\nContent-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()


async def test_expect_100_continue_is_answered_before_the_body_is_sent(agent: RunningAgent) -> None:
    body = b'{"expect":"continue"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.agent.port)
    try:
        writer.write(_expecting(len(body)))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        length = next(
            int(v)
            for k, v in (line.split(": ", 1) for line in head.decode().split("\r\n")[1:-2])
            if k == "Content-Length"
        )
        assert await reader.readexactly(length) == b'{"expect": "continue"}'
    finally:
        writer.close()


async def test_expect_100_continue_with_a_body_over_the_limit_gets_413_without_continue(agent: RunningAgent) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.agent.port)
    try:
        writer.write(_expecting(REQUEST_LIMIT + 1))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
        assert b"Connection: close\r\n" in head  # the client never sends the body: nothing else can follow
        rest = await asyncio.wait_for(reader.read(), 5)
        assert json.loads(rest)["message"].startswith("Request must be smaller than 6291456 bytes")
    finally:
        writer.close()


async def test_a_chunked_request_body_is_read_whole(agent: RunningAgent) -> None:
    async with connection(_address(agent)) as (writer, responses):
        writer.write(
            f"POST {INVOKE_PATH} HTTP/1.1\r\nHost: agent\r\nTransfer-Encoding: chunked\r\n\r\n"
            '5\r\n{"a":\r\n4\r\n"b"}\r\n0\r\n\r\n'.encode()
        )
        answer = await responses.next()
    assert (answer.status, answer.body) == (200, b'{"a": "b"}')


@pytest.mark.parametrize(
    "garbage",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"],
    ids=["request-line", "content-length", "version"],
)
async def test_a_malformed_request_gets_400_and_the_connection_closes(agent: RunningAgent, garbage: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.agent.port)
    try:
        writer.write(garbage + _get("/healthz"))
        everything = await asyncio.wait_for(reader.read(), 5)  # read() returns at the server's close
    finally:
        writer.close()
    assert everything.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close\r\n" in everything
    assert everything.count(b"HTTP/1.1") == 1  # nothing after the malformed request is answered


async def test_routing_answers_404_405_and_head_like_before(agent: RunningAgent) -> None:
    async with connection(_address(agent)) as (writer, responses):
        writer.write(_get(INVOKE_PATH))
        wrong_method = await responses.next()
        writer.write(_get("/healthz", "HEAD"))
        head = await responses.next(head=True)
    async with connection(_address(agent)) as (writer, responses):
        writer.write(_get(INVOKE_PATH, "HEAD"))
        head_invoke = await responses.next(head=True)
        writer.write(_get("/2015-03-31/functions/"))
        not_found = await responses.next()
    assert (wrong_method.status, wrong_method.headers["allow"]) == (405, "POST")
    assert wrong_method.body == b"405: Method Not Allowed"
    assert head.status == 200
    assert head.headers["content-length"] == "2"  # the GET's length, no body
    assert head.body == b""
    assert head_invoke.status == 405
    assert not_found.status == 404


async def test_a_client_closing_mid_request_starts_no_invocation(agent: RunningAgent) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", agent.agent.port)
    writer.write(f"POST {INVOKE_PATH} HTTP/1.1\r\nHost: agent\r\nContent-Length: 100\r\n\r\n".encode() + b'{"cut":')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    result = await agent.invoke({"after": "cut"})
    assert result.json() == {"after": "cut"}
    assert agent.logs().count("START RequestId") == 1


async def test_a_slow_reader_gets_every_byte_of_a_large_response() -> None:
    # 5 MB to a client that reads slowly (a small stream buffer, one read per loop turn) arrives whole.
    async with running_agent("app.big_response") as agent:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.agent.port, limit=1024)
        try:
            writer.write(invoke_request(json.dumps({"bytes": 5_000_000}).encode()))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            received = bytearray()
            while len(received) < length:
                received += await reader.read(65536)
                await asyncio.sleep(0)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert length == 5_000_002  # a JSON string
    assert received == b'"' + b"x" * 5_000_000 + b'"'
