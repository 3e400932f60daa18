"""The hot-path HTTP client: one keep-alive connection per environment, Content-Length and chunked
responses, reuse, and a resend only when the agent closed an idle connection before reading the request;
streamed responses read chunk by chunk with their trailers, cancel-safe, and dropped when unfinished."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Self

import pytest
from gateway_loop_support import no_blocking
from gateway_stream_support import DIE, END, STREAM_HEAD, StreamingAgent, chunk, trailers
from lambdalet_gateway import agent_client
from lambdalet_gateway.agent_client import AgentConnection, AgentConnectionError

pytestmark = pytest.mark.usefixtures(no_blocking.__name__)

Reply = Callable[[bytes], bytes | None]


class RawServer:
    """A loopback server answering each request with ``reply(request_bytes)`` (None: close instead)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    def close_all(self) -> None:
        """Close every open connection (as an agent's keep-alive timeout does)."""
        for writer in self.writers:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.reply(request)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


@pytest.fixture
async def echo() -> AsyncIterator[RawServer]:
    async with RawServer(
        lambda request: ok(request.split(b"\r\n\r\n", 1)[1], b"X-Amz-Function-Error: Unhandled\r\n")
    ) as server:
        yield server


async def test_request_and_keep_alive(echo: RawServer) -> None:
    connection = AgentConnection("127.0.0.1", echo.port)
    for i in range(3):
        response = await connection.post(b"/invoke", {"X-Lambdalet-Request-Id": f"r{i}"}, b'{"n": %d}' % i)
        assert response.status == 200
        assert response.body == b'{"n": %d}' % i
        assert response.headers["x-amz-function-error"] == "Unhandled"
        assert response.headers["content-type"] == "application/json"
    assert echo.connections == 1
    first = echo.requests[0]
    assert first.startswith(b"POST /invoke HTTP/1.1\r\n")
    assert b"\r\nX-Lambdalet-Request-Id: r0\r\n" in first
    assert b"\r\nContent-Length: 8\r\n" in first
    connection.close()


async def test_large_body(echo: RawServer) -> None:
    connection = AgentConnection("127.0.0.1", echo.port)
    payload = b"x" * (3 * 1024 * 1024)
    response = await connection.post(b"/invoke", {}, payload)
    assert response.body == payload
    connection.close()


async def test_chunked_response_with_trailers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with RawServer(lambda request: chunked) as server:
        connection = AgentConnection("127.0.0.1", server.port)
        assert (await connection.post(b"/", {}, b"{}")).body == b"hello, world"
        assert (await connection.post(b"/", {}, b"{}")).body == b"hello, world"
        assert server.connections == 1
        connection.close()


async def test_connection_close_is_honoured() -> None:
    async with RawServer(lambda request: ok(b"1", b"Connection: close\r\n")) as server:
        connection = AgentConnection("127.0.0.1", server.port)
        await connection.post(b"/", {}, b"{}")
        assert not connection.open
        await connection.post(b"/", {}, b"{}")
        assert server.connections == 2


async def test_a_connection_the_agent_closed_is_not_reused() -> None:
    served = []

    def reply(request: bytes) -> bytes | None:
        served.append(request)
        return ok(b"fine")

    async with RawServer(reply) as server:
        connection = AgentConnection("127.0.0.1", server.port)
        assert (await connection.post(b"/", {}, b"{}")).body == b"fine"
        server.close_all()
        for _ in range(200):
            if not connection.open:
                break
            await asyncio.sleep(0.01)
        assert not connection.open
        assert (await connection.post(b"/", {}, b"{}")).body == b"fine"
        assert server.connections == 2
        connection.close()


async def test_a_long_idle_connection_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    async with RawServer(lambda request: ok(b"fine")) as server:
        connection = AgentConnection("127.0.0.1", server.port)
        await connection.post(b"/", {}, b"{}")
        monkeypatch.setattr(agent_client, "MAX_IDLE_S", -1.0)
        await connection.post(b"/", {}, b"{}")
        assert server.connections == 2
        connection.close()


async def test_a_request_is_never_sent_twice() -> None:
    served = []

    def reply(request: bytes) -> bytes | None:
        served.append(request)
        # answers the first request, then dies while "running" the second
        return ok(b"fine") if len(served) == 1 else None

    async with RawServer(reply) as server:
        connection = AgentConnection("127.0.0.1", server.port)
        await connection.post(b"/", {}, b"{}")
        with pytest.raises(AgentConnectionError):
            await connection.post(b"/", {}, b"{}")
        assert len(served) == 2
        assert server.connections == 1


async def test_a_fresh_connection_that_fails_is_an_error() -> None:
    async with RawServer(lambda request: None) as server:
        connection = AgentConnection("127.0.0.1", server.port)
        with pytest.raises(AgentConnectionError):
            await connection.post(b"/", {}, b"{}")
        assert len(server.requests) == 1


async def test_nobody_listening() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await AgentConnection("127.0.0.1", port).post(b"/", {}, b"{}")


# ---- streamed responses -----------------------------------------------------------------------------


@pytest.fixture
async def agent() -> AsyncIterator[StreamingAgent]:
    fake = StreamingAgent()
    yield fake
    await fake.close()


@pytest.fixture
async def connection(agent: StreamingAgent) -> AsyncIterator[AgentConnection]:
    connection = AgentConnection("127.0.0.1", await agent.listen())
    yield connection
    connection.close()


async def test_a_streamed_body_arrives_chunk_by_chunk_then_its_trailers(
    agent: StreamingAgent, connection: AgentConnection
) -> None:
    agent.send(STREAM_HEAD, chunk(b"first"))
    response = await connection.post(b"/", {}, b"{}")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain"
    stream = response.stream
    assert stream is not None
    # the first chunk is readable while the agent has not written the second one yet
    assert await stream.read() == b"first"
    agent.send(chunk(b"second"))
    assert await stream.read() == b"second"
    agent.send(trailers(Lambda_Runtime_Function_Error_Type="Sandbox.Timedout", X_Lambdalet_Duration_Ms="12.5"), END)
    assert await stream.read() is None
    assert stream.trailers == {
        "lambda-runtime-function-error-type": "Sandbox.Timedout",
        "x-lambdalet-duration-ms": "12.5",
    }
    assert await stream.read() is None
    # the connection is reused for the next request once the stream has ended
    agent.send(ok(b"next"), END)
    assert (await connection.post(b"/", {}, b"{}")).body == b"next"
    assert agent.connections == 1


async def test_a_large_chunk_is_handed_on_in_pieces(agent: StreamingAgent, connection: AgentConnection) -> None:
    big = bytes(range(256)) * 2048  # 512 KB in one chunk
    agent.send(STREAM_HEAD + chunk(big) + trailers(), END)
    response = await connection.post(b"/", {}, b"{}")
    assert response.stream is not None
    pieces = []
    while (piece := await response.stream.read()) is not None:
        pieces.append(piece)
    assert b"".join(pieces) == big
    assert all(len(piece) >= 64 * 1024 for piece in pieces[:-1])


async def test_a_read_cancelled_while_waiting_can_be_resumed(
    agent: StreamingAgent, connection: AgentConnection
) -> None:
    agent.send(STREAM_HEAD + b"5\r\nhel")
    response = await connection.post(b"/", {}, b"{}")
    assert response.stream is not None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await response.stream.read()
    agent.send(b"lo\r\n" + trailers(), END)
    assert await response.stream.read() == b"hello"
    assert await response.stream.read() is None


async def test_an_agent_that_dies_mid_stream_is_an_error_and_the_connection_is_dropped(
    agent: StreamingAgent, connection: AgentConnection
) -> None:
    agent.send(STREAM_HEAD + chunk(b"partial"), DIE)
    response = await connection.post(b"/", {}, b"{}")
    assert response.stream is not None
    assert await response.stream.read() == b"partial"
    with pytest.raises(AgentConnectionError):
        await response.stream.read()
    assert not connection.open


async def test_closing_an_unfinished_stream_drops_the_connection(
    agent: StreamingAgent, connection: AgentConnection
) -> None:
    agent.send(STREAM_HEAD + chunk(b"one"))
    response = await connection.post(b"/", {}, b"{}")
    assert response.stream is not None
    assert await response.stream.read() == b"one"
    response.stream.close()
    assert not connection.open
    assert await response.stream.read() is None


async def test_a_chunked_answer_without_the_stream_marker_is_buffered() -> None:
    plain = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"a") + chunk(b"b") + trailers()
    async with RawServer(lambda request: plain) as server:
        connection = AgentConnection("127.0.0.1", server.port)
        response = await connection.post(b"/", {}, b"{}")
        assert response.stream is None
        assert response.body == b"ab"
        connection.close()


# ---- the deadline -----------------------------------------------------------------------------------


async def test_no_answer_by_the_deadline_is_a_timeout_and_drops_the_connection(
    agent: StreamingAgent, connection: AgentConnection
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await connection.post(b"/", {}, b"{}", deadline=started + 0.2)
    assert 0.2 <= loop.time() - started < 2
    assert not connection.open
    assert len(agent.requests) == 1
    # a body that stops arriving halfway is a timeout too (DIE ends the first connection's handler)
    agent.send(DIE, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    with pytest.raises(TimeoutError):
        await connection.post(b"/", {}, b"{}", deadline=loop.time() + 0.2)
    assert agent.connections == 2


async def test_a_timely_answer_leaves_no_timer_behind(agent: StreamingAgent, connection: AgentConnection) -> None:
    loop = asyncio.get_running_loop()
    agent.send(ok(b"first"), END)
    assert (await connection.post(b"/", {}, b"{}", deadline=loop.time() + 0.1)).body == b"first"
    await asyncio.sleep(0.2)  # past the first deadline: the connection is still good for the next request
    agent.send(ok(b"second"), END)
    assert (await connection.post(b"/", {}, b"{}", deadline=loop.time() + 5)).body == b"second"
    assert agent.connections == 1
    # a streamed answer's head arrived in time: its body is read past that deadline
    agent.send(STREAM_HEAD, chunk(b"late"))
    response = await connection.post(b"/", {}, b"{}", deadline=loop.time() + 0.1)
    assert response.stream is not None
    await asyncio.sleep(0.2)
    assert await response.stream.read() == b"late"
