"""External runtime mode without Kubernetes: the agent starts no bootstrap; AWS's own Python Runtime
Interface Client (``python -m awslambdaric``) runs as a separate process pointed at the agent's Runtime API,
restarted by a small supervisor whenever it exits (the kubelet's part with ``restartPolicy: Always``)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from agent_support import INVOKE_PATH, Invoked, free_port, post, until
from lambdalet_agent.agent import Agent
from lambdalet_agent.settings import from_args

HANDLER = textwrap.dedent(
    """\
    import os, threading, time

    def handler(event, context):
        action = event.get("action")
        if action == "sleep":
            time.sleep(event["seconds"])
        if action == "crash":
            os._exit(3)
        if action == "exit_after_response":
            threading.Timer(0.1, os._exit, (4,)).start()
        if action == "fail":
            raise ValueError("bad input")
        return {"hello": event.get("name"), "pid": os.getpid(), "function": context.function_name}
    """
)


class Supervisor:
    """Runs the RIC and starts it again whenever it exits, like a kubelet; records each process's pid."""

    def __init__(self, code: Path, api: str) -> None:
        self.code = code
        self.api = api
        self.pids: list[int] = []
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        env = dict(os.environ)
        env.update(
            {
                "AWS_LAMBDA_RUNTIME_API": self.api,
                "LAMBDA_TASK_ROOT": str(self.code),
                "AWS_LAMBDA_FUNCTION_NAME": "external-fn",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            }
        )
        while True:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "awslambdaric",
                "app.handler",
                cwd=str(self.code),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a container's main process leads its own session
            )
            self.pids.append(self.process.pid)
            await self.process.wait()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class Setup:
    def __init__(self, agent: Agent, session: aiohttp.ClientSession, runtime: Supervisor, out: io.BytesIO) -> None:
        self.agent = agent
        self.session = session
        self.runtime = runtime
        self.out = out
        self.url = f"http://127.0.0.1:{agent.port}"

    async def invoke(self, payload: object) -> Invoked:
        return await post(self.session, self.url + INVOKE_PATH, payload)

    async def ready(self) -> bool:
        async with self.session.get(self.url + "/readyz") as response:
            return response.status == 200

    async def wait_ready(self) -> None:
        async with asyncio.timeout(30):
            while True:
                if await self.ready():
                    return
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def external(tmp_path: Path, *, timeout_s: float = 2.0, source: str = HANDLER) -> AsyncIterator[Setup]:
    code = tmp_path / "code"
    code.mkdir()
    (code / "app.py").write_text(source)
    api = f"127.0.0.1:{free_port()}"
    settings = from_args(
        ["--external-runtime", "--port", "0", "--runtime-api-address", api, "--timeout", str(timeout_s)],
        {"AWS_LAMBDA_FUNCTION_NAME": "external-fn"},
    )
    out = io.BytesIO()
    agent = Agent(settings, environ={}, out=out)
    await agent.start()
    runtime = Supervisor(code, api)
    try:
        async with aiohttp.ClientSession() as session:
            setup = Setup(agent, session, runtime, out)
            assert not await setup.ready()  # no runtime has called /next yet
            runtime.start()
            yield setup
    finally:
        await runtime.stop()
        await agent.stop()


async def test_external_runtime_serves_invocations_with_init_duration(tmp_path: Path) -> None:
    async with external(tmp_path) as s:
        await s.wait_ready()
        first = await s.invoke({"name": "ric"})
        assert first.status == 200, first.body
        assert first.json() == {"hello": "ric", "pid": s.runtime.pids[0], "function": "external-fn"}
        assert float(first.headers["X-Lambdalet-Init-Duration-Ms"]) > 0
        second = await s.invoke({"name": "again"})
        assert second.json()["hello"] == "again"
        assert "X-Lambdalet-Init-Duration-Ms" not in second.headers
        failed = await s.invoke({"action": "fail"})
        assert failed.headers["X-Amz-Function-Error"] == "Unhandled"
        assert failed.json()["errorType"] == "ValueError"
        assert "X-Lambdalet-Reset" not in failed.headers
        assert s.runtime.pids == [first.json()["pid"]]  # errors raised by the handler reset nothing


async def test_timeout_kills_the_external_runtime_and_waits_for_its_restart(tmp_path: Path) -> None:
    async with external(tmp_path, timeout_s=1.0) as s:
        await s.wait_ready()
        before = (await s.invoke({})).json()["pid"]
        timed_out = await s.invoke({"action": "sleep", "seconds": 30})
        assert timed_out.json()["errorType"] == "Sandbox.Timedout"
        assert timed_out.headers["X-Lambdalet-Reset"] == "1"
        await until(lambda: len(s.runtime.pids) == 2)
        await s.wait_ready()
        after = await s.invoke({"name": "fresh"})
        assert after.status == 200
        assert after.json()["hello"] == "fresh"
        assert after.json()["pid"] != before
        assert after.json()["pid"] == s.runtime.pids[1]
        assert float(after.headers["X-Lambdalet-Init-Duration-Ms"]) > 0  # a new init after the reset
        with pytest.raises(ProcessLookupError):
            os.kill(before, 0)


async def test_crash_is_reported_and_the_restarted_runtime_serves(tmp_path: Path) -> None:
    async with external(tmp_path) as s:
        await s.wait_ready()
        crashed = await s.invoke({"action": "crash"})
        assert crashed.json()["errorType"] == "Runtime.ExitError"
        assert crashed.headers["X-Lambdalet-Reset"] == "1"
        await s.wait_ready()
        after = await s.invoke({"name": "back"})
        assert after.json()["hello"] == "back"
        assert after.json()["pid"] == s.runtime.pids[-1] != s.runtime.pids[0]


async def test_runtime_dying_between_invocations_is_reported_on_the_next_one(tmp_path: Path) -> None:
    async with external(tmp_path) as s:
        await s.wait_ready()
        ok = await s.invoke({"action": "exit_after_response"})
        assert ok.status == 200
        await until(lambda: len(s.runtime.pids) == 2)
        died = await s.invoke({"name": "x"})
        assert died.json()["errorType"] == "Runtime.ExitError"
        assert died.headers["X-Lambdalet-Reset"] == "1"
        await s.wait_ready()
        after = await s.invoke({"name": "y"})
        assert after.json() == {"hello": "y", "pid": s.runtime.pids[1], "function": "external-fn"}


async def test_an_init_error_is_the_answer_to_every_invocation_until_the_code_works(tmp_path: Path) -> None:
    async with external(tmp_path, source="raise RuntimeError('broken at import')\n") as s:
        await s.wait_ready()  # ready to report the error
        for _ in range(2):  # the client exits after /init/error; each reset lets the next one try again
            failed = await s.invoke({})
            assert failed.headers["X-Amz-Function-Error"] == "Unhandled"
            assert failed.json()["errorType"] == "RuntimeError"
            assert failed.json()["errorMessage"] == "broken at import"
            assert failed.headers["X-Lambdalet-Reset"] == "1"
            assert "X-Lambdalet-Init-Duration-Ms" in failed.headers
            await s.wait_ready()
        assert "INIT_REPORT" in s.out.getvalue().decode()
