"""Resets and init: timeout cut at the deadline, crash, init errors (reported, then retried), init
timeout, provided runtimes, memory limit and Max Memory Used."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from agent_support import BOOTSTRAP, running_agent, until
from lambdalet_agent.memory import RlimitLimiter


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"


async def test_timeout_cuts_at_the_deadline_kills_the_runtime_and_the_next_invocation_succeeds() -> None:
    async with running_agent("app.sleep", timeout_s=1) as agent:
        await agent.wait_ready()
        old_pid = agent.agent.env.process.pid if agent.agent.env.process else 0
        started = time.monotonic()
        result = await agent.invoke({"seconds": 30})
        elapsed = time.monotonic() - started
        request_id = result.headers["x-amzn-RequestId"]
        after = await agent.invoke({"seconds": 0})
        logs = agent.logs()
    # Cut within 100 ms of the deadline (the agent's own measure, from hand-off to the runtime to the cut),
    # and the caller is answered right away.
    assert 1000 <= float(result.headers["X-Lambdalet-Duration-Ms"]) < 1100
    assert 1.0 <= elapsed < 1.5, elapsed
    assert result.status == 200
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.headers["X-Lambdalet-Reset"] == "1"
    assert result.json() == {
        "errorType": "Sandbox.Timedout",
        "errorMessage": f"RequestId: {request_id} Error: Task timed out after 1.00 seconds",
    }
    assert f"{request_id} Task timed out after 1.00 seconds" in logs
    assert f"END RequestId: {request_id}" in logs
    assert not _alive(old_pid)
    assert after.json() == {"slept": 0}
    assert "X-Lambdalet-Init-Duration-Ms" in after.headers  # a fresh runtime: cold again
    assert f"REPORT RequestId: {after.headers['x-amzn-RequestId']}" in logs


async def test_crash_is_runtime_exit_error_and_the_next_invocation_initialises_again() -> None:
    async with running_agent("app.crash") as agent:
        first = await agent.invoke({"code": 3})
        second = await agent.invoke({"code": 0})
        logs = agent.logs()
    for result, code in ((first, 3), (second, 0)):
        request_id = result.headers["x-amzn-RequestId"]
        assert result.headers["X-Amz-Function-Error"] == "Unhandled"
        assert result.headers["X-Lambdalet-Reset"] == "1"
        assert result.json() == {
            "errorType": "Runtime.ExitError",
            "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: exit status {code}",
        }
        assert "X-Lambdalet-Init-Duration-Ms" in result.headers
    start = logs.index(f"START RequestId: {first.headers['x-amzn-RequestId']}")
    assert "about to crash" in logs[start:]


async def test_killed_runtime_reports_the_signal() -> None:
    async with running_agent("app.sleep", timeout_s=10) as agent:
        await agent.wait_ready()
        process = agent.agent.env.process
        assert process is not None
        pending = asyncio.ensure_future(agent.invoke({"seconds": 5}))
        await until(lambda: agent.agent.env.running is not None)
        os.kill(process.pid, 9)
        result = await pending
    assert result.json()["errorMessage"].endswith("Error: Runtime exited with error: signal: killed")


def _code(tmp_path: Path, source: str, name: str = "fn.py") -> Path:
    (tmp_path / name).write_text(source)
    return tmp_path


@pytest.mark.parametrize(
    ("source", "handler", "error_type", "message"),
    [
        (
            "def handler(event, context)\n    return 1\n",
            "fn.handler",
            "Runtime.UserCodeSyntaxError",
            "Syntax error in module 'fn': ",
        ),
        (
            "import module_that_does_not_exist\n",
            "fn.handler",
            "Runtime.ImportModuleError",
            "Unable to import module 'fn': No module named 'module_that_does_not_exist'",
        ),
        (
            "def other(event, context):\n    return 1\n",
            "fn.handler",
            "Runtime.HandlerNotFound",
            "Handler 'handler' missing on module 'fn'",
        ),
        ("raise RuntimeError('configuration missing')\n", "fn.handler", "RuntimeError", "configuration missing"),
        (
            "def handler(event, context):\n    return 1\n",
            "nomodule.handler",
            "Runtime.ImportModuleError",
            "Unable to import module 'nomodule': No module named 'nomodule'",
        ),
    ],
)
async def test_init_errors_are_reported_to_the_first_invocation_then_init_is_retried(
    tmp_path: Path, source: str, handler: str, error_type: str, message: str
) -> None:
    async with running_agent(handler, code=_code(tmp_path, source)) as agent:
        first = await agent.invoke({})
        second = await agent.invoke({})
        logs = agent.logs()
    for result in (first, second):
        assert result.status == 200
        assert result.headers["X-Amz-Function-Error"] == "Unhandled"
        error = result.json()
        assert error["errorType"] == error_type
        assert error["errorMessage"].startswith(message), error
        assert "X-Lambdalet-Init-Duration-Ms" in result.headers
    assert f"[ERROR] {error_type}" in logs
    assert "Status: error" in logs


async def test_handler_module_shadowing_the_standard_library_is_refused(tmp_path: Path) -> None:
    async with running_agent(
        "json.handler", code=_code(tmp_path, "def handler(e, c):\n    return 1\n", "json.py")
    ) as agent:
        result = await agent.invoke({})
    error = result.json()
    assert error["errorType"] == "Runtime.ImportModuleError"
    assert "standard library" in error["errorMessage"]
    assert "rename" in error["errorMessage"]


async def test_runtime_exiting_during_init_is_exit_error(tmp_path: Path) -> None:
    async with running_agent("fn.handler", code=_code(tmp_path, "import os\nos._exit(7)\n")) as agent:
        result = await agent.invoke({})
    request_id = result.headers["x-amzn-RequestId"]
    assert result.json() == {
        "errorType": "Runtime.ExitError",
        "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: exit status 7",
    }


async def test_init_over_the_budget_is_cut_and_retried(tmp_path: Path) -> None:
    source = "import time\ntime.sleep(30)\ndef handler(e, c):\n    return 1\n"
    async with running_agent("fn.handler", code=_code(tmp_path, source), init_timeout_s=0.5) as agent:
        started = time.monotonic()
        result = await agent.invoke({})
        elapsed = time.monotonic() - started
    assert elapsed < 2
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.json()["errorType"] == "Sandbox.Timedout"
    assert "Init timed out after 0.50 seconds" in result.json()["errorMessage"]


async def test_provided_runtime_runs_code_bootstrap(tmp_path: Path) -> None:
    (tmp_path / "fn.py").write_text("def handler(event, context):\n    return {'provided': event}\n")
    bootstrap = tmp_path / "bootstrap"
    bootstrap.write_text(f"#!/bin/sh\nexec {sys.executable} {BOOTSTRAP}\n")
    bootstrap.chmod(bootstrap.stat().st_mode | stat.S_IXUSR)
    async with running_agent("fn.handler", code=tmp_path, runtime="provided.al2023") as agent:
        result = await agent.invoke({"x": 1})
        env = agent.agent.env.runtime_environment()
    assert result.json() == {"provided": {"x": 1}}
    assert "AWS_EXECUTION_ENV" not in env


async def test_provided_runtime_without_bootstrap_is_invalid_entrypoint(tmp_path: Path) -> None:
    async with running_agent("fn.handler", code=tmp_path, runtime="provided.al2") as agent:
        result = await agent.invoke({})
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.json()["errorType"] == "Runtime.InvalidEntrypoint"


async def test_memory_limit_kills_the_runtime_and_reports_the_limit() -> None:
    async with running_agent("app.allocate", memory=128, timeout_s=10) as agent:
        result = await agent.invoke({"mb": 400})
        after = await agent.invoke({"mb": 8})
        mechanism = agent.agent.limiter.mechanism
    if mechanism == "cgroup-v1":
        assert result.json()["errorType"] == "Runtime.ExitError"
        assert result.json()["errorMessage"].endswith("signal: killed")
        assert result.headers["X-Lambdalet-Max-Memory-Used-MB"] == "128"
    else:
        assert result.json()["errorType"] == "MemoryError"
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert after.json() == {"allocated_mb": 8}


async def test_rlimit_fallback_limits_and_measures_memory() -> None:
    """Where the cgroup hierarchy is not writable (non-root images), RLIMIT_DATA and VmHWM are used."""
    async with running_agent("app.allocate", memory=128, timeout_s=10, limiter=RlimitLimiter(128)) as agent:
        too_much = await agent.invoke({"mb": 400})
        small = await agent.invoke({"mb": 10})
        large = await agent.invoke({"mb": 100})
    assert too_much.headers["X-Amz-Function-Error"] == "Unhandled"
    assert too_much.json()["errorType"] == "MemoryError"
    assert "X-Lambdalet-Reset" not in too_much.headers  # the function survived its failed allocation
    assert (
        int(large.headers["X-Lambdalet-Max-Memory-Used-MB"])
        >= int(small.headers["X-Lambdalet-Max-Memory-Used-MB"]) + 80
    )


async def test_max_memory_used_follows_allocation() -> None:
    async with running_agent("app.allocate", memory=512, timeout_s=10) as agent:
        small = await agent.invoke({"mb": 10})
        large = await agent.invoke({"mb": 200})
        small_again = await agent.invoke({"mb": 10})
        logs = agent.logs()
    small_mb = int(small.headers["X-Lambdalet-Max-Memory-Used-MB"])
    large_mb = int(large.headers["X-Lambdalet-Max-Memory-Used-MB"])
    again_mb = int(small_again.headers["X-Lambdalet-Max-Memory-Used-MB"])
    assert 10 <= small_mb < 100
    assert large_mb >= small_mb + 180
    assert again_mb < large_mb - 150  # measured per invocation
    assert f"Max Memory Used: {large_mb} MB" in logs


class _SlowAttach(RlimitLimiter):
    """Puts the runtime under its limit half a second after its spawn (a slow cgroup write, a loaded machine)."""

    def attach(self, pid: int) -> None:
        time.sleep(0.5)
        super().attach(pid)


LIMITS_SOURCE = """import os, resource
def limits():
    return [resource.getrlimit(resource.RLIMIT_DATA)[0], sorted(k for k in os.environ if "LAMBDALET" in k)]
AT_IMPORT = limits()
def handler(event, context):
    return {"import": AT_IMPORT, "invocation": limits()}
"""


async def test_the_function_is_imported_under_its_memory_limit_even_when_attaching_is_slow(tmp_path: Path) -> None:
    """The runtime's interpreter starts while the agent attaches it; the function's code waits for the limit."""
    limit = 128 * 1024 * 1024
    async with running_agent(
        "fn.handler", code=_code(tmp_path, LIMITS_SOURCE), memory=128, limiter=_SlowAttach(128)
    ) as agent:
        result = await agent.invoke({})
    assert result.json() == {"import": [limit, []], "invocation": [limit, []]}


async def test_a_runtime_that_does_not_wait_gets_no_invocation_before_its_memory_limit(tmp_path: Path) -> None:
    """A bootstrap other than ours (it ignores the agent's pipe) may start its function's code early, but no
    invocation is handed to it before the runtime is under the limit."""
    bootstrap = tmp_path / "bootstrap"
    bootstrap.write_text(f"#!/bin/sh\nunset _LAMBDALET_MEMORY_GATE_FD\nexec {sys.executable} {BOOTSTRAP}\n")
    bootstrap.chmod(bootstrap.stat().st_mode | stat.S_IXUSR)
    _code(tmp_path, LIMITS_SOURCE)
    async with running_agent(
        "fn.handler", code=tmp_path, runtime="provided.al2023", memory=128, limiter=_SlowAttach(128)
    ) as agent:
        result = await agent.invoke({})
    assert result.json()["invocation"] == [128 * 1024 * 1024, []]
