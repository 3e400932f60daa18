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
