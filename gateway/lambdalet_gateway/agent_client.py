"""The hot path's HTTP client: one keep-alive HTTP/1.1 connection per execution environment.

An environment takes one invocation at a time, so each has at most one connection in use; this client
keeps it open between invocations, writes each request with a single ``write`` (request line, headers and
payload), and parses the agent's response (``Content-Length`` or chunked) without per-request objects
beyond the result.

A streamed function response (the agent marks it ``X-Lambdalet-Response-Stream: 1``, chunked, with the
error and report values in trailers) is not buffered: ``post`` returns once the head has arrived, with
an :class:`AgentStream` that yields the body chunk by chunk and then holds the trailers. The connection
is busy until that stream has been read to its end (or closed, which drops the connection).

Nothing is ever sent twice: once a request is written, any failure is the caller's error (the agent may
have started the invocation). To keep that safe, a connection is not reused once the agent has closed it
or once it has been idle for ``MAX_IDLE_S`` — well under any keep-alive timeout an agent may have (the
agent's own server closes no idle connection; aiohttp's default is 75 s), so the agent never closes a
connection at the moment a request is written to it. Failing to *connect* raises ``OSError`` before a
byte is sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

_MAX_HEAD = 64 * 1024
#: A connection idle longer than this is replaced rather than reused.
MAX_IDLE_S = 30.0
#: Bodies above this are written as a second buffer rather than joined with the head.
_JOIN_LIMIT = 64 * 1024
#: A chunk of a streamed body is handed on whole, or in pieces of at least this size while it arrives.
_PIECE = 64 * 1024
#: The head of a streamed response carries this header (value ``1``).
STREAM_MARKER = "x-lambdalet-response-stream"


class AgentConnectionError(ConnectionError):
    """The agent closed the connection or answered with something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class AgentResponse:
    status: int
    #: Lower-cased header names (the agent sends each at most once).
    headers: dict[str, str]
    #: The whole body; empty for a streamed response, whose body is read from ``stream``.
    body: bytes
    stream: AgentStream | None = None


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.error: BaseException | None = None
        #: Set by the deadline's timer: every wait for bytes raises ``TimeoutError`` from then on.
        self.expired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a TCP connection's transport (uvloop's is not a subclass of asyncio.Transport, so no isinstance)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def expire(self) -> None:
        """The deadline passed: the pending wait (and any later one) raises ``TimeoutError``."""
        self.expired = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    async def more(self) -> None:
        """Wait for more bytes; raise if the connection ended first."""
        if self.eof:
            raise AgentConnectionError(f"the agent closed the connection ({self.error!r})")
        await self.wait()

    async def wait(self) -> None:
        """Wait for more bytes or the end of the connection."""
        if self.expired:
            raise TimeoutError
        if self.eof:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class AgentConnection:
    """A keep-alive connection to one agent; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._protocol: _Protocol | None = None
        self._host_header = f"Host: {host}:{port}\r\n".encode()
        self._last_used = 0.0

    @property
    def open(self) -> bool:
        return self._protocol is not None and not self._protocol.eof

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def post(
        self, path: bytes, headers: dict[str, str], body: bytes, *, deadline: float | None = None
    ) -> AgentResponse:
        """POST ``body``; ``OSError`` when connecting fails (nothing sent), else
        :class:`AgentConnectionError` when the agent fails after the request was written, and
        ``TimeoutError`` (the connection dropped) when the response head has not arrived by ``deadline``
        (the loop's clock). The deadline is one timer on the loop rather than ``asyncio.timeout_at``
        around the call: on the hot path that saves a third of the cost of waiting with a deadline."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.open and now - self._last_used > MAX_IDLE_S:
            self.close()
        protocol = self._protocol
        if protocol is None or protocol.eof:
            if deadline is None:
                protocol = await self._connect()
            else:
                async with asyncio.timeout_at(deadline):
                    protocol = await self._connect()
        head = [b"POST ", path, b" HTTP/1.1\r\n", self._host_header]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        timer = loop.call_at(deadline, protocol.expire) if deadline is not None else None
        try:
            response = await self._exchange(protocol, head, body)
        finally:
            if timer is not None:
                timer.cancel()
        self._last_used = loop.time()
        return response

    async def _exchange(self, protocol: _Protocol, head: list[bytes], body: bytes) -> AgentResponse:
        transport = protocol.transport
        assert transport is not None
        if len(body) <= _JOIN_LIMIT:
            transport.write(b"".join(head) + body)
        else:
            transport.write(b"".join(head))
            transport.write(body)
        try:
            response, keep_alive, streamed = await _read_response(protocol)
        except BaseException:
            self.close()
            raise
        if streamed:
            stream = AgentStream(self, protocol, keep_alive)
            return AgentResponse(response.status, response.headers, b"", stream)
        if not keep_alive:
            self.close()
        return response


class AgentStream:
    """The body of a streamed response, read incrementally: ``read()`` until it returns ``None``, then
    ``trailers`` (lower-cased names) holds the values the agent sent after the body.

    Cancel-safe: a ``read`` cancelled while waiting for bytes leaves the parser where it was, so reading
    can go on later (for example to drain a stream whose caller went away).
    """

    __slots__ = ("_connection", "_crlf", "_in_trailers", "_keep_alive", "_left", "_protocol", "done", "trailers")

    def __init__(self, connection: AgentConnection, protocol: _Protocol, keep_alive: bool) -> None:
        self._connection = connection
        self._protocol = protocol
        self._keep_alive = keep_alive
        self._left = 0  # bytes of the current chunk not yet read
        self._crlf = False  # the CRLF after a chunk's data is due
        self._in_trailers = False
        self.done = False
        self.trailers: dict[str, str] = {}

    async def read(self) -> bytes | None:
        """The next piece of the body (a whole chunk as the agent wrote it, or a part of at least 64 KB
        of a large one); ``None`` at the end. :class:`AgentConnectionError` if the agent fails."""
        if self.done:
            return None
        protocol = self._protocol
        buffer = protocol.buffer
        try:
            while True:
                if self._left:
                    have = len(buffer)
                    if have < self._left and have < _PIECE:
                        await protocol.more()
                        continue
                    take = min(have, self._left)
                    piece = bytes(buffer[:take])
                    del buffer[:take]
                    self._left -= take
                    self._crlf = self._left == 0
                    return piece
                if self._crlf:
                    if len(buffer) < 2:
                        await protocol.more()
                        continue
                    if buffer[:2] != b"\r\n":
                        raise AgentConnectionError("malformed chunked body (no CRLF after a chunk)")
                    del buffer[:2]
                    self._crlf = False
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        raise AgentConnectionError("malformed chunked body (line too long)")
                    await protocol.more()
                    continue
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if self._in_trailers:
                    if not line:
                        self._finish()
                        return None
                    name, _, value = line.decode("latin-1").partition(":")
                    self.trailers[name.strip().lower()] = value.strip()
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise AgentConnectionError(f"malformed chunk size {line[:40]!r}") from None
                if size == 0:
                    self._in_trailers = True
                else:
                    self._left = size
        except AgentConnectionError:
            self.done = True
            self._connection.close()
            raise

    def _finish(self) -> None:
        self.done = True
        connection = self._connection
        connection._last_used = asyncio.get_running_loop().time()
        if not self._keep_alive:
            connection.close()

    def close(self) -> None:
        """Stop reading: an unfinished stream's connection cannot be reused, so it is closed."""
        if not self.done:
            self.done = True
            self._connection.close()


async def _read_response(protocol: _Protocol) -> tuple[AgentResponse, bool, bool]:
    """The response and whether the connection stays open; the third value is True for a streamed
    response, whose body is still on the wire."""
    buffer = protocol.buffer
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buffer) > _MAX_HEAD:
            raise AgentConnectionError("response head too large")
        await protocol.more()
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise AgentConnectionError(f"not an HTTP/1.1 response: {lines[0]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
    length = headers.get("content-length")
    if length is not None:
        size = int(length)
        while len(buffer) < size:
            await protocol.more()
        body = bytes(buffer[:size])
        del buffer[:size]
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        if headers.get(STREAM_MARKER) == "1":
            return AgentResponse(status, headers, b""), keep_alive, True
        body = await _read_chunked(protocol)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        # no framing: the body runs to the end of the connection
        while not protocol.eof:
            await protocol.wait()
        body = bytes(buffer)
        buffer.clear()
        keep_alive = False
    return AgentResponse(status, headers, body), keep_alive, False


async def _read_chunked(protocol: _Protocol) -> bytes:
    buffer = protocol.buffer
    chunks: list[bytes] = []
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            await protocol.more()
        size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
        del buffer[: end + 2]
        if size == 0:
            # trailers, then the empty line
            while True:
                while (end := buffer.find(b"\r\n")) < 0:
                    await protocol.more()
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if not line:
                    return b"".join(chunks)
        while len(buffer) < size + 2:
            await protocol.more()
        chunks.append(bytes(buffer[:size]))
        del buffer[: size + 2]
