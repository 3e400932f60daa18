"""The physical floors, run as their own processes: ``python -m benchmarks.floors {aiohttp,raw} --port-file F``.

- ``aiohttp``: the smallest aiohttp application that answers the invoke path (read the body, reply
  ``null``): what one Python event loop with the HTTP stack our gateway and agent use can do.
- ``raw``: an ``asyncio.Protocol`` that speaks just enough HTTP/1.1 (keep-alive, ``Content-Length``) to
  echo the request body back: the cost of a Python event loop and the loopback socket, without a framework.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from aiohttp import web

INVOKE_PATH = "/2015-03-31/functions/function/invocations"


def write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


async def _aiohttp_invoke(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"null", content_type="application/json")


async def serve_aiohttp(host: str, port: int, port_file: Path) -> None:
    app = web.Application()
    app.router.add_post(INVOKE_PATH, _aiohttp_invoke)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    write_port_file(port_file, server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


class EchoProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive responder that echoes each request's body (``Content-Length`` framing only)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )


async def serve_raw(host: str, port: int, port_file: Path) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port)
    write_port_file(port_file, server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors")
    parser.add_argument("kind", choices=["aiohttp", "raw"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    serve = serve_aiohttp if args.kind == "aiohttp" else serve_raw
    asyncio.run(serve(args.host, args.port, args.port_file))


if __name__ == "__main__":
    main()
