"""Helpers shared by the agent's integration tests: run one agent (in this event loop, the runtime as a
real child process) or AWS's emulator, and invoke it over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httptools
from lambdalet_agent.agent import Agent
from lambdalet_agent.memory import MemoryLimiter
from lambdalet_agent.settings import from_args
from multidict import CIMultiDictProxy

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS = Path(__file__).resolve().parent / "functions"
PYTHON_FUNCTIONS = FUNCTIONS / "python"
BOOTSTRAP = REPO / "runtime-images" / "python" / "bootstrap.py"
INVOKE_PATH = "/2015-03-31/functions/function/invocations"


@dataclass
class Invoked:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Invoked:
    data = raw if raw is not None else json.dumps({} if payload is None else payload).encode()
    body: bytes | io.BytesIO = io.BytesIO(data) if len(data) > 1024 * 1024 else data
    async with session.post(url, data=body, headers=headers or {}) as response:
        body = await response.read()
        return Invoked(response.status, response.headers, body)


class RunningAgent:
    def __init__(self, agent: Agent, out: io.BytesIO, session: aiohttp.ClientSession) -> None:
        self.agent = agent
        self.out = out
        self.session = session
        self.url = f"http://127.0.0.1:{agent.port}"

    async def invoke(
        self, payload: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Invoked:
        return await post(self.session, self.url + INVOKE_PATH, payload, raw=raw, headers=headers)

    def logs(self) -> str:
        return self.out.getvalue().decode(errors="replace")

    async def wait_ready(self, limit_s: float = 10.0) -> None:
        async with asyncio.timeout(limit_s):
            while True:
                async with self.session.get(self.url + "/readyz") as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_agent(
    handler: str = "",
    *,
    code: Path = PYTHON_FUNCTIONS,
    timeout_s: float = 3.0,
    memory: int = 128,
    runtime: str | None = "python3.12",
    command: Sequence[str] = (),
    args: Sequence[str] = (),
    init_timeout_s: float | None = None,
    limiter: MemoryLimiter | None = None,
    stream_response_limit: int | None = None,
) -> AsyncIterator[RunningAgent]:
    argv = ["--code", str(code), "--port", "0", "--timeout", str(timeout_s), "--memory", str(memory), *args]
    if handler:
        argv += ["--handler", handler]
    if runtime:
        argv += ["--runtime", runtime]
    if command:
        argv += ["--", *command]
    settings = from_args(argv, {})
    if init_timeout_s is not None:
        settings = dataclasses.replace(settings, init_timeout_s=init_timeout_s)
    if stream_response_limit is not None:
        settings = dataclasses.replace(settings, stream_response_limit=stream_response_limit)
    out = io.BytesIO()
    agent = Agent(settings, environ=os.environ, out=out, limiter=limiter)
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield RunningAgent(agent, out, session)
    finally:
        await agent.stop()


async def until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (state inside the agent that has no event of its own)."""
    for _ in range(int(limit_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"condition not reached within {limit_s} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rie_binary() -> str:
    """AWS's emulator, built (once, cached outside the repository) by benchmarks/tools/build-rie.sh."""
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "tools" / "build-rie.sh")], check=True, capture_output=True, text=True
    )
    return result.stdout.strip().splitlines()[-1]


@contextlib.asynccontextmanager
async def running_rie(
    handler: str, *, code: Path = PYTHON_FUNCTIONS, timeout_s: float = 3.0, memory: int = 128
) -> AsyncIterator[str]:
    """AWS's emulator running our Python bootstrap; yields its invoke URL."""
    port, api_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        {
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(int(timeout_s)),
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory),
            "AWS_LAMBDA_FUNCTION_NAME": "function",
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "LAMBDA_TASK_ROOT": str(code),
        }
    )
    process = await asyncio.create_subprocess_exec(
        rie_binary(),
        "--runtime-interface-emulator-address",
        f"127.0.0.1:{port}",
        "--runtime-api-address",
        f"127.0.0.1:{api_port}",
        sys.executable,
        str(BOOTSTRAP),
        handler,
        cwd=str(code),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield f"http://127.0.0.1:{port}{INVOKE_PATH}"
    finally:
        process.kill()
        await process.wait()


# ------------------------------------------------------------------------------------ raw HTTP


@dataclass
class Exchange:
    """One HTTP response as it arrived: status, headers and trailers (lower-case names), the body's pieces
    in the order they were parsed (``on_body`` calls: one per chunk when the chunks came apart)."""

    status: int = 0
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    trailers: dict[str, str] = dataclasses.field(default_factory=dict)
    pieces: list[bytes] = dataclasses.field(default_factory=list)
    complete: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


class ResponseReader:
    """Reads HTTP/1.1 responses (pipelined ones too) from a stream, trailers included."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._done: list[Exchange] = []
        self._current = Exchange()
        self._in_head = True
        self._parser = httptools.HttpResponseParser(self)
        self.first_piece = asyncio.Event()

    def on_message_begin(self) -> None:
        self._current = Exchange()
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._current.headers if self._in_head else self._current.trailers
        fields[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._current.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._current.pieces.append(body)
        self.first_piece.set()

    def on_message_complete(self) -> None:
        self._current.complete = True
        self._done.append(self._current)

    async def next(self, *, head: bool = False) -> Exchange:
        """The next complete response (``head``: the answer to a HEAD request, which has no body)."""
        while not self._done:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError(f"connection closed before a complete response: {self._current}")
            self._parser.feed_data(data)
            if head and not self._done and not self._in_head:
                self._current.complete = True
                self._done.append(self._current)
                self._parser = httptools.HttpResponseParser(self)
        return self._done.pop(0)

    async def started(self) -> Exchange:
        """The response being received once its head is in (for streamed bodies)."""
        while self._in_head and not self._done:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("connection closed before the response head")
            self._parser.feed_data(data)
        return self._done[0] if self._done else self._current

    async def pump(self) -> None:
        """Read one more piece of input into the current response."""
        data = await self._reader.read(65536)
        if not data:
            raise ConnectionError("connection closed")
        self._parser.feed_data(data)


@contextlib.asynccontextmanager
async def connection(address: str) -> AsyncIterator[tuple[asyncio.StreamWriter, ResponseReader]]:
    """A raw TCP connection to ``host:port``: write bytes, read parsed responses."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield writer, ResponseReader(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def invoke_request(payload: bytes = b"{}", headers: dict[str, str] | None = None) -> bytes:
    """A raw invoke request for the agent's invoke endpoint."""
    fields = {"Host": "agent", "Content-Length": str(len(payload)), **(headers or {})}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"POST {INVOKE_PATH} HTTP/1.1\r\n{head}\r\n".encode() + payload
