"""The hot-path HTTP client: one keep-alive connection per environment, Content-Length and chunked
responses, reuse, and a resend only when the agent closed an idle connection before reading the request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from gateway_loop_support import no_blocking
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

    async def __aenter__(self) -> RawServer:
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
