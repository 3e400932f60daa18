"""The agent's HTTP/1.1 server: an :class:`asyncio.Protocol` on ``httptools`` (llhttp, uvicorn's parser).

Why not aiohttp, which the agent used before:

- **Trailers, both ways.** Streaming response mode ends a runtime's chunked ``/response`` with the trailer
  fields ``Lambda-Runtime-Function-Error-Type`` and ``-Error-Body`` when the function fails mid-stream.
  aiohttp's request parsers (C and Python) drop request trailers, and its server cannot send response
  trailers, which is how the agent hands the error and the REPORT values of a streamed result to the
  invoker. llhttp reports trailer fields through the same header callback after the last chunk.
- **The hottest path.** Every invocation crosses this server three times (invoke, ``/next``,
  ``/response``). A protocol that parses with llhttp and writes one pre-built buffer per response costs
  less CPU per invocation than aiohttp's request/response objects, and the agent process starts faster
  without aiohttp's imports (the standby and fork-server programs import the agent before every cold start).

What it does: keep-alive and pipelined requests, answered in order, one at a time per connection;
``Content-Length`` and chunked request bodies, read piece by piece or whole with a limit; ``Expect:
100-continue`` (``100 Continue`` is sent when the handler first reads the body); flow control (reading
pauses while a body's reader or the queue of pipelined requests is behind, and a response writer waits
while the peer is not reading); a body the handler left unread is read and discarded before the next
request; malformed requests get ``400`` and the connection closes; ``404``/``405`` (with ``Allow``) as
aiohttp answered them; ``HEAD`` on ``GET`` routes. Streamed responses use chunked encoding and may end
with trailer fields. A handler is not cancelled when its client goes away (reads raise
:class:`ClientGone`, writes are dropped), as with aiohttp's defaults.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote

import httptools

log = logging.getLogger("lambdalet.agent")

HIGH_WATER = 256 * 1024  # buffered request body bytes at which reading pauses
LOW_WATER = 64 * 1024  # ...and resumes
MAX_PIPELINED = 16  # parsed requests waiting for their turn at which reading pauses
MAX_HEAD = 64 * 1024  # request line and headers (or trailers)

_REASONS = {
    100: "Continue",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CONTROL = re.compile(r"[\r\n\0]")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientGone(ConnectionError):
    """The peer closed the connection before the request body was complete."""


class _Date:
    """The ``Date`` header, formatted once a second."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
        return cls.value


def _field(name: str, value: str) -> str:
    if _CONTROL.search(value) or _CONTROL.search(name):
        raise ValueError(f"header {name!r}: CR, LF or NUL in the value")
    return f"{name}: {value}\r\n"


class Response:
    """A complete (buffered) response."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        *,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers: dict[str, str] = dict(headers) if headers else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type


def text(status: int, body: str) -> Response:
    return Response(status, body.encode(), content_type="text/plain; charset=utf-8")


class Body:
    """A request body as it arrives: pieces in order, then the end (trailers are known by then)."""

    __slots__ = ("_conn", "_error", "_pieces", "_size", "_waiter", "complete", "continue_pending", "received")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pieces: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self.complete = False
        self.received = 0
        self.continue_pending = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def feed(self, data: bytes) -> None:
        self._pieces.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > HIGH_WATER:
            self._conn.hold("body")
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: Exception) -> None:
        if not self.complete:
            self._error = error
            self._wake()

    def discard(self) -> None:
        """Drop what is buffered and whatever still arrives."""
        self._pieces.clear()
        self._size = 0
        self._conn.release("body")

    async def piece(self) -> bytes | None:
        """The next piece as it was read from the socket, or None at the end. Raises :class:`ClientGone`."""
        while not self._pieces:
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            if self.continue_pending:
                self.continue_pending = False
                self._conn.write(_CONTINUE)
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._pieces.popleft()
        self._size -= len(data)
        if self._size < LOW_WATER:
            self._conn.release("body")
        return data

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None when it is longer than ``limit`` bytes (the rest is discarded)."""
        pieces: list[bytes] = []
        size = 0
        while (data := await self.piece()) is not None:
            size += len(data)
            if size > limit:
                return None
            pieces.append(data)
        return b"".join(pieces)


class Request:
    __slots__ = (
        "body",
        "conn",
        "head_size",
        "headers",
        "keep_alive",
        "method",
        "params",
        "path",
        "query",
        "streaming",
        "trailers",
        "url",
        "version",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.url = b""
        self.head_size = 0
        self.method = ""
        self.path = ""
        self.query = ""
        self.version = "1.1"
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.params: dict[str, str] = {}
        self.keep_alive = True
        self.body = Body(conn)
        self.streaming: Stream | None = None

    def header(self, name: str) -> str | None:
        """A request header by lower-case name (repeated fields joined with ", ")."""
        return self.headers.get(name)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    def ends(self) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """(peer, own) addresses of the connection."""
        return self.conn.ends

    def stream(self, status: int, headers: Mapping[str, str]) -> Stream:
        """Start a chunked response (trailers allowed at the end): write pieces, then :meth:`Stream.end`."""
        self.streaming = Stream(self, status, headers)
        return self.streaming


class Stream:
    """A response sent piece by piece: chunked on HTTP/1.1 (ending with optional trailers), else ended by
    closing the connection."""

    __slots__ = ("_chunked", "_conn", "_request", "ended")

    def __init__(self, request: Request, status: int, headers: Mapping[str, str]) -> None:
        self._request = request
        self._conn = request.conn
        self._chunked = request.version == "1.1"
        if not self._chunked:
            request.keep_alive = False
        self.ended = False
        fields = dict(headers)
        if self._chunked:
            fields["Transfer-Encoding"] = "chunked"
        self._conn.write_head(request, status, fields, None)

    @property
    def open(self) -> bool:
        """The peer is still there."""
        return not self._conn.lost

    async def write(self, data: bytes) -> None:
        """Send one piece (as one chunk); waits while the peer is not reading. Raises :class:`ClientGone`."""
        if not data or self._request.method == "HEAD":
            return
        if self._conn.lost:
            raise ClientGone("the client went away")
        if self._chunked:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._conn.write(data)
        await self._conn.drain()

    def end(self, trailers: Mapping[str, str] | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self._conn.lost or self._request.method == "HEAD" or not self._chunked:
            return
        tail = "".join(_field(k, v) for k, v in (trailers or {}).items())
        self._conn.write(b"0\r\n" + tail.encode("utf-8", "surrogateescape") + b"\r\n")


Handler = Callable[[Request], Awaitable[Response | None]]


class Router:
    """Routes by method and path; ``{name}`` matches one path segment (percent-decoded into
    ``request.params``). ``GET`` routes also answer ``HEAD``."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: dict[tuple[str, ...], dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        if "{" in path:
            methods = self._patterns.setdefault(tuple(path.split("/")), {})
        else:
            methods = self._exact.setdefault(path, {})
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    def match(self, request: Request) -> Handler | Response:
        methods = self._exact.get(request.path)
        if methods is None:
            parts = request.path.split("/")
            for segments, candidate in self._patterns.items():
                if len(segments) != len(parts):
                    continue
                params: dict[str, str] = {}
                for pattern, part in zip(segments, parts, strict=True):
                    if pattern.startswith("{"):
                        if not part:
                            break
                        params[pattern[1:-1]] = unquote(part)
                    elif pattern != part:
                        break
                else:
                    request.params = params
                    methods = candidate
                    break
        if methods is None:
            return text(404, "404: Not Found")
        handler = methods.get(request.method)
        if handler is None:
            response = text(405, "405: Method Not Allowed")
            response.headers["Allow"] = ",".join(sorted(m for m in methods if m != "HEAD"))
            return response
        return handler


class Connection(asyncio.Protocol):
    """One client connection: parses requests, runs the handler for each in turn, writes the answers."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.router = server.router
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.ends: tuple[tuple[str, int], tuple[str, int]] | None = None
        self.lost = False
        self._parsing: Request | None = None  # the request whose head or body is arriving
        self._in_head = False
        self._pipeline: collections.deque[Request | None] = collections.deque()  # None: malformed, answer 400
        self._task: asyncio.Task[None] | None = None
        self._holds: set[str] = set()
        self._reading = True
        self._writable: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._stop_reading = False  # after an upgrade request or a parse error: nothing more is read
        self.busy = False  # a request is being handled

    # -------------------------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        peer, own = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if isinstance(peer, tuple) and isinstance(own, tuple):
            self.ends = ((str(peer[0]), int(peer[1])), (str(own[0]), int(own[1])))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        gone = ClientGone("the client closed the connection")
        if self._parsing is not None:
            self._parsing.body.fail(gone)
        for request in self._pipeline:
            if request is not None:
                request.body.fail(gone)
        self._pipeline.clear()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def drain(self) -> None:
        if self._paused_writing and not self.lost:
            self._writable = self.loop.create_future()
            await self._writable

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def hold(self, reason: str) -> None:
        """Pause reading (a body's reader or the pipeline is behind)."""
        self._holds.add(reason)
        if self._reading and self.transport is not None and not self.lost:
            self._reading = False
            self.transport.pause_reading()

    def release(self, reason: str) -> None:
        self._holds.discard(reason)
        if not self._holds and not self._reading and not self._stop_reading and not self.lost:
            self._reading = True
            assert self.transport is not None
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._stop_reading:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request before the upgrade is answered; nothing after it is HTTP/1.1 we could read.
            self._stop_reading = True
            for request in self._pipeline:
                if request is not None:
                    request.keep_alive = False
        except httptools.HttpParserError:
            self._malformed()

    def _malformed(self) -> None:
        self._stop_reading = True
        if self._parsing is not None:
            self._parsing.body.fail(ClientGone("malformed request"))
            if self._in_head:
                self._parsing = None
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self._pipeline.append(None)
        self._kick()

    # -------------------------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._parsing = Request(self)
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.url += url
        request.head_size += len(url)
        if request.head_size > MAX_HEAD:
            raise ValueError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.head_size += len(name) + len(value)
        if request.head_size > MAX_HEAD:
            raise ValueError("request head too large")
        key = name.decode("latin-1").lower()
        text_value = value.decode("utf-8", "surrogateescape")
        fields = request.headers if self._in_head else request.trailers
        previous = fields.get(key)
        fields[key] = text_value if previous is None else f"{previous}, {text_value}"

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        self._in_head = False
        request.method = self.parser.get_method().decode("latin-1")
        request.version = self.parser.get_http_version()
        request.keep_alive = self.parser.should_keep_alive()
        target = request.url.decode("utf-8", "surrogateescape")
        path, _, request.query = target.partition("?")
        request.path = path
        request.head_size = 0  # trailers get a budget of their own
        expect = request.headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and request.version == "1.1":
            request.body.continue_pending = True
        self._pipeline.append(request)
        if len(self._pipeline) > MAX_PIPELINED:
            self.hold("pipeline")
        self._kick()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.body.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        request.body.continue_pending = False
        request.body.finish()
        self._parsing = None

    # -------------------------------------------------------------------------------- serving

    def _kick(self) -> None:
        if self._task is None and self._pipeline:
            self._task = self.loop.create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while self._pipeline and not self.lost:
                request = self._pipeline.popleft()
                if len(self._pipeline) <= MAX_PIPELINED:
                    self.release("pipeline")
                if request is None:
                    self._answer_malformed()
                    return
                self.busy = True
                try:
                    keep = await self._handle(request)
                finally:
                    self.busy = False
                if not keep:
                    self.close()
                    return
                if self.server.closing:
                    self.close()
                    return
        finally:
            self._task = None
        self._kick()  # a request parsed while the last one finished

    def _answer_malformed(self) -> None:
        response = text(400, "400: Bad Request")
        response.headers["Connection"] = "close"
        body = response.body
        self.write(self._head(400, response.headers, len(body)) + body)
        self.close()

    async def _handle(self, request: Request) -> bool:
        """Run one request's handler and write its answer; returns whether the connection stays open."""
        route = self.router.match(request)
        response: Response | None
        if isinstance(route, Response):
            response = route
        else:
            try:
                response = await route(request)
            except ClientGone:
                return False
            except Exception:
                log.exception("%s %s failed", request.method, request.path)
                if request.streaming is not None:
                    return False
                response = text(500, "500 Internal Server Error")
        body = request.body
        if response is not None:
            keep = request.keep_alive and not self.server.closing
            if not body.complete and (body.continue_pending or self._stop_reading):
                keep = False  # the client waits for 100 Continue, or nothing more is read: do not wait
            payload = b"" if request.method == "HEAD" else response.body
            if not keep:
                response.headers["Connection"] = "close"
            try:
                head = self._head(response.status, response.headers, len(response.body))
            except ValueError:  # a header value with CR/LF: never sent as is
                log.exception("%s %s: unsendable response header", request.method, request.path)
                response = text(500, "500 Internal Server Error")
                response.headers["Connection"] = "close"
                keep = False
                payload = response.body
                head = self._head(500, response.headers, len(payload))
            self.write(head + payload)
        else:
            stream = request.streaming
            if stream is None or not stream.ended:
                return False
            keep = request.keep_alive and not self.server.closing
        if not keep:
            return False
        if not body.complete:
            # Read and drop the rest of the body before the next request (as aiohttp does).
            body.discard()
            try:
                while await body.piece() is not None:
                    body.discard()
            except ClientGone:
                return False
        return not self.lost

    def _head(self, status: int, headers: Mapping[str, str], length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        lines.extend(_field(k, v) for k, v in headers.items())
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append(f"Date: {_Date.now()}\r\n\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def write_head(self, request: Request, status: int, headers: dict[str, str], length: int | None) -> None:
        if not request.keep_alive:
            headers["Connection"] = "close"
        self.write(self._head(status, headers, length))


class Server:
    """A listening socket serving ``router``; ``await close(grace_s)`` stops it."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.connections: set[Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, backlog: int = 128, reuse_address: bool | None = None) -> None:
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {"backlog": backlog}
        if reuse_address is not None:
            kwargs["reuse_address"] = reuse_address
        self._server = await loop.create_server(lambda: Connection(self), host, port, **kwargs)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self, grace_s: float) -> None:
        """Stop listening, close idle connections, give requests in progress ``grace_s`` to finish."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        busy = [conn._task for conn in self.connections if conn.busy and conn._task is not None]
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
            task = conn._task
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._server is not None:
            await self._server.wait_closed()
