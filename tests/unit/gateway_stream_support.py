"""Shared by the gateway's unit tests of streamed responses: a raw fake agent that answers in the
streamed-response wire format, piece by piece as the test writes them."""

from __future__ import annotations

import asyncio

#: The head of a streamed answer, as the agent writes it.
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Amz-Executed-Version: $LATEST\r\n"
    b"X-Lambdalet-Response-Stream: 1\r\nTransfer-Encoding: chunked\r\n"
    b"Trailer: Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body\r\n\r\n"
)
#: Written into ``StreamingAgent.pieces``: ends the current answer / drops the connection.
END = b""
DIE = b"<die>"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def trailers(**fields: str) -> bytes:
    """The last chunk and trailer fields (``X_Lambdalet_Duration_Ms="1"``: ``X-Lambdalet-Duration-Ms: 1``)."""
    return b"0\r\n" + b"".join(f"{k.replace('_', '-')}: {v}\r\n".encode() for k, v in fields.items()) + b"\r\n"


class StreamingAgent:
    """Loopback servers that read each request and then write what the test puts in ``pieces``, in order,
    until :data:`END` (next request) or :data:`DIE` (the connection is dropped)."""

    def __init__(self) -> None:
        self.pieces: asyncio.Queue[bytes] = asyncio.Queue()
        self.requests: list[bytes] = []
        self.connections = 0
        self.servers: list[asyncio.Server] = []

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.pieces.put_nowait(piece)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                self.requests.append(head + await reader.readexactly(length))
                while piece := await self.pieces.get():
                    if piece == DIE:
                        return
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def listen(self) -> int:
        """One more server; its port."""
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for _ in range(self.connections):
            self.pieces.put_nowait(DIE)
        await asyncio.sleep(0.05)
        for server in self.servers:
            server.close()
