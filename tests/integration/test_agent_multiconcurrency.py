"""Multi-concurrency (``--max-concurrency N`` / ``AWS_LAMBDA_MAX_CONCURRENCY``, as Lambda Managed Instances),
with real processes: our agent running our Python bootstrap (N worker processes) or AWS's awslambdaric.

Overlap is proven with a barrier handler: each invocation drops a file named after its request id in a
shared folder and waits until ``n`` files are there, so N invocations can only all report N when they ran
at the same time (a sequential run would wait out its limit and report fewer).

Conformance: the same bursts against AWS's emulator and against our agent give callers the same outcomes.
``aws-lambda-rie`` with ``AWS_LAMBDA_MAX_CONCURRENCY`` set switches to its Lambda Managed Instances mode
(internal/lambda-managed-instances), whose rules, read from its source, are checked here: every ``/next`` is
an idle worker; an invocation that finds none fails at once with ``400 Runtime.Unavailable`` (the agent's
answer past N is ``429 Environment.Busy``: the outcome compared is "busy"); a timeout answers that caller
``Sandbox.Timedout`` and leaves the runtime and the other invocations alone (the late ``/response`` gets
``410 InvokeTimeout``); the runtime process exiting fails every invocation in flight with
``Runtime.ExitError``. In this mode the emulator only runs a ``bootstrap`` file from ``/var/task`` (or
``/opt``, ``/var/runtime``), as user 993: each emulator here runs in a private mount namespace with the
function folder bound on ``/var/task``, so these tests need root (they are skipped otherwise).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agent_support import (
    BOOTSTRAP,
    INVOKE_PATH,
    Invoked,
    RunningAgent,
    free_port,
    post,
    rie_binary,
    running_agent,
    until,
)
from lambdalet_agent.memory import CGROUP_V1_MEMORY, CgroupV1Limiter

N = 3
RIC = (sys.executable, "-m", "awslambdaric", "fn.handler")

FUNCTION = """\
import os
import time


def handler(event, context):
    op = event.get("op", "barrier")
    if op == "sleep":
        time.sleep(event["seconds"])
        return {"tag": event.get("tag"), "slept": event["seconds"]}
    if op == "crash":
        time.sleep(event.get("after", 0))
        os._exit(event.get("code", 3))
    # barrier: wait (at most event["wait"] seconds) until event["n"] invocations are inside at once
    print("barrier entered by", context.aws_request_id)
    folder = os.path.join(os.environ["LAMBDA_TASK_ROOT"], event["dir"])
    open(os.path.join(folder, context.aws_request_id), "w").close()
    end = time.monotonic() + event.get("wait", 10)
    while len(os.listdir(folder)) < event["n"] and time.monotonic() < end:
        time.sleep(0.005)
    return {"tag": event.get("tag"), "seen": len(os.listdir(folder)), "pid": os.getpid(),
            "request_id": context.aws_request_id}
"""


def function_dir(tmp_path: Path) -> Path:
    code = tmp_path / "fn"
    code.mkdir(parents=True)
    code.chmod(0o755)  # the emulator runs the runtime as another user
    (code / "fn.py").write_text(FUNCTION)
    return code


class Barriers:
    """Fresh barrier folders inside the function folder (writable by the runtime's user)."""

    def __init__(self, code: Path) -> None:
        self.code = code
        self.count = 0

    def new(self) -> str:
        self.count += 1
        name = f"barrier-{self.count}"
        (self.code / name).mkdir(mode=0o777)
        (self.code / name).chmod(0o777)
        return name


# ------------------------------------------------------------------------------------ AWS's emulator


def _system_python() -> str | None:
    """An interpreter another user may run (ours may live under a private home), of this Python's version."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        path = Path(candidate)
        if not path.exists() or any(not (p.stat().st_mode & 0o001) for p in path.parents):
            continue
        version = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if version == str(sys.version_info[:2]):
            return candidate
    return None


def _cgroups_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


def _lmi_emulator_usable() -> str | None:
    """Why the emulator's LMI mode cannot run here (it needs root for the mount namespace), or None."""
    if os.geteuid() != 0:
        return "needs root (a private mount namespace for /var/task)"
    if _system_python() is None:
        return "no Python of this version runnable by another user"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"unshare --mount failed: {probe.stderr.decode(errors='replace').strip()}"
    return None


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url):
            return True  # (any answer: the emulator only serves POST there)
    except aiohttp.ClientConnectionError:
        return False


@contextlib.asynccontextmanager
async def running_lmi_rie(
    code: Path, workers: int, *, timeout_s: int = 3, command: Sequence[str] = ()
) -> AsyncIterator[str]:
    """AWS's emulator in LMI mode running ``code/bootstrap`` (our bootstrap unless ``command``); its URL."""
    reason = _lmi_emulator_usable()
    if reason is not None:
        pytest.skip(f"AWS's emulator in LMI mode: {reason}")
    python = _system_python()
    assert python is not None
    argv = command or (python, str(BOOTSTRAP))
    (code / "bootstrap").write_text("#!/bin/sh\nexec " + " ".join(argv) + "\n")
    (code / "bootstrap").chmod(0o755)
    port, api_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        {
            "AWS_LAMBDA_MAX_CONCURRENCY": str(workers),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(timeout_s),
            "AWS_LAMBDA_FUNCTION_NAME": "function",
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
            "LAMBDA_TASK_ROOT": "/var/task",
            "_HANDLER": "fn.handler",
            "PYTHONPATH": str(next(p for p in map(Path, sys.path) if p.name == "site-packages")),
        }
    )
    script = (
        "[ -d /var/task ] || { mount -t tmpfs tmpfs /var && mkdir /var/task; } && "
        'mount --bind "$0" /var/task && exec "$@"'
    )
    log = (code.parent / "emulator.log").open("wb")  # kept with the test's files, for a failure's story
    rie = [rie_binary(), "--runtime-interface-emulator-address", f"127.0.0.1:{port}"]
    rie += ["--runtime-api-address", f"127.0.0.1:{api_port}"]
    process = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(code), *rie,
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}{INVOKE_PATH}"
    try:
        async with asyncio.timeout(15), aiohttp.ClientSession() as session:
            for _ in range(750):
                if await _answers(session, url):
                    break
                await asyncio.sleep(0.02)
        yield url
    finally:
        # The runtime runs in a process group of its own: end it with the emulator.
        for pid in [*_descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await process.wait()
        log.close()


async def burst(session: aiohttp.ClientSession, url: str, events: Sequence[dict[str, Any]]) -> list[Invoked]:
    headers = {"Content-Type": "application/json"}  # (the emulator passes the caller's on to the runtime)
    return list(await asyncio.gather(*(post(session, url, event, headers=headers) for event in events)))


async def all_workers_waiting(session: aiohttp.ClientSession, url: str, barriers: Barriers, workers: int) -> None:
    """Until a barrier of ``workers`` invocations passes: every worker has initialised and called /next.

    (The emulator answers an invocation that finds no waiting worker at once, so right after start
    some bursts may fail; and after a burst each worker needs a moment to come back to /next.)"""
    async with asyncio.timeout(20):
        while True:
            folder = barriers.new()
            results = await burst(session, url, [{"dir": folder, "n": workers, "wait": 0.5}] * workers)
            if all(r.status == 200 and r.json().get("seen") == workers for r in results):
                break
            await asyncio.sleep(0.6)  # (a worker still in a failed barrier comes back)
    await asyncio.sleep(0.2)  # (no signal says the workers are back at /next)


# ------------------------------------------------------------------------------------ the bootstrap alone


def test_bootstrap_refuses_a_bad_max_concurrency() -> None:
    env = {**os.environ, "AWS_LAMBDA_MAX_CONCURRENCY": "three", "AWS_LAMBDA_RUNTIME_API": "127.0.0.1:9"}
    result = subprocess.run([sys.executable, str(BOOTSTRAP)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "AWS_LAMBDA_MAX_CONCURRENCY='three' is not a whole number of at least 1" in result.stderr


# ------------------------------------------------------------------------------------ our agent


def concurrent_agent(
    code: Path, *, workers: int = N, timeout_s: float = 3.0, command: Sequence[str] = ()
) -> contextlib.AbstractAsyncContextManager[RunningAgent]:
    return running_agent(
        "fn.handler", code=code, timeout_s=timeout_s, args=["--max-concurrency", str(workers)], command=command
    )


async def workers_waiting(agent: RunningAgent, workers: int = N) -> None:
    env = agent.agent.env
    await until(lambda: env.cstate.waiting == workers)


async def test_n_invocations_run_at_once_and_each_caller_gets_its_own(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    folder = Barriers(code).new()
    async with concurrent_agent(code) as agent:
        await workers_waiting(agent)
        tail = {"X-Amz-Log-Type": "Tail"}
        results = await asyncio.gather(
            *(agent.invoke({"dir": folder, "n": N, "tag": i}, headers=tail) for i in range(N))
        )
        logs = agent.logs()
        limiter = agent.agent.limiter
        cgroups = [_cgroups_of(r.json()["pid"]) for r in results]
    bodies = [r.json() for r in results]
    assert [r.status for r in results] == [200] * N
    assert [b["tag"] for b in bodies] == list(range(N))  # each caller got the answer to its own event
    assert [b["request_id"] for b in bodies] == [r.headers["x-amzn-RequestId"] for r in results]
    assert {b["seen"] for b in bodies} == {N}
    assert len({b["pid"] for b in bodies}) == N
    ids = [b["request_id"] for b in bodies]
    for request_id in ids:  # START, END and REPORT per invocation
        for line in (
            f"START RequestId: {request_id} ",
            f"END RequestId: {request_id}",
            f"REPORT RequestId: {request_id}\t",
        ):
            assert logs.count(line) == 1
    for result, request_id in zip(results, ids, strict=True):
        tail_log = base64.b64decode(result.headers["X-Amz-Log-Result"]).decode()
        assert f"barrier entered by {request_id}" in tail_log
        assert f"REPORT RequestId: {request_id}" in tail_log
        assert not any(other in tail_log for other in ids if other != request_id)
    assert sum("X-Lambdalet-Init-Duration-Ms" in r.headers for r in results) == 1  # the one cold start
    if isinstance(limiter, CgroupV1Limiter):  # every worker is under the memory limit
        own = f":memory:/{limiter.path.relative_to(CGROUP_V1_MEMORY)}\n"
        assert all(own in text for text in cgroups)


async def test_one_more_than_n_is_busy(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    folder = Barriers(code).new()
    async with concurrent_agent(code) as agent:
        await workers_waiting(agent)
        env = agent.agent.env
        held = [asyncio.create_task(agent.invoke({"dir": folder, "n": N + 1, "wait": 60})) for _ in range(N)]
        await until(lambda: len(env.handed_out) == N)
        busy = await agent.invoke({"op": "sleep", "seconds": 0})
        (code / folder / "release").touch()  # the (N+1)th arrival the held invocations wait for
        released = await asyncio.gather(*held)
        after = await agent.invoke({"op": "sleep", "seconds": 0, "tag": "after"})
    assert busy.status == 429
    assert busy.headers["x-amzn-ErrorType"] == "TooManyRequestsException"
    assert busy.json() == {
        "errorType": "Environment.Busy",
        "errorMessage": f"{N} invocations are already running in this execution environment.",
    }
    assert [r.json()["seen"] for r in released] == [N + 1] * N
    assert after.json() == {"tag": "after", "slept": 0}


async def test_a_timeout_cuts_one_invocation_and_its_worker_comes_back(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    barriers = Barriers(code)
    async with concurrent_agent(code, timeout_s=1) as agent:
        await workers_waiting(agent)
        env = agent.agent.env
        runtime_pid = env.process.pid if env.process is not None else 0
        hold = barriers.new()
        slow = {"dir": hold, "n": 2, "wait": 60}  # inside until a second file appears in its folder
        results = await asyncio.gather(
            agent.invoke(slow), *(agent.invoke({"op": "sleep", "seconds": 0.2, "tag": i}) for i in range(N - 1))
        )
        # Its worker is still inside: one fewer invocation fits now.
        reduced = await asyncio.gather(*(agent.invoke({"op": "sleep", "seconds": 0.2}) for _ in range(N)))
        (code / hold / "release").touch()
        await until(lambda: not env.cstate.timed_out)  # the late result came (and was refused)
        await workers_waiting(agent)
        folder = barriers.new()
        again = await asyncio.gather(*(agent.invoke({"dir": folder, "n": N}) for _ in range(N)))
        same_runtime = env.process is not None and env.process.pid == runtime_pid
        logs = agent.logs()
    timed_out = results[0]
    request_id = timed_out.headers["x-amzn-RequestId"]
    assert timed_out.headers["X-Amz-Function-Error"] == "Unhandled"
    assert timed_out.json() == {
        "errorType": "Sandbox.Timedout",
        "errorMessage": f"RequestId: {request_id} Error: Task timed out after 1.00 seconds",
    }
    assert "X-Lambdalet-Reset" not in timed_out.headers
    assert [r.json() for r in results[1:]] == [{"tag": i, "slept": 0.2} for i in range(N - 1)]
    assert sorted(r.status for r in reduced) == [200] * (N - 1) + [429]
    refused = '410 {"errorMessage":"Invoke timeout","errorType":"InvokeTimeout"}'
    assert f"Runtime API /invocation/{request_id}/response: {refused}" in logs  # (what our bootstrap prints)
    assert [r.json()["seen"] for r in again] == [N] * N
    assert same_runtime


async def test_every_worker_held_by_a_timeout_resets_the_runtime(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    async with concurrent_agent(code, timeout_s=1) as agent:
        await workers_waiting(agent)
        results = await asyncio.gather(*(agent.invoke({"op": "sleep", "seconds": 30}) for _ in range(N)))
        await workers_waiting(agent)
        after = await agent.invoke({"op": "sleep", "seconds": 0, "tag": "after"})
    assert [r.json()["errorType"] for r in results] == ["Sandbox.Timedout"] * N
    assert sum("X-Lambdalet-Reset" in r.headers for r in results) == 1  # the last one
    assert after.json() == {"tag": "after", "slept": 0}


async def test_a_runtime_with_fewer_workers_than_n_is_reset_when_none_is_left(tmp_path: Path) -> None:
    """A runtime that ignores AWS_LAMBDA_MAX_CONCURRENCY (one loop) and hangs: the invocation that waited for
    a worker in vain resets it, and the next one is served."""
    code = function_dir(tmp_path)
    hold = Barriers(code).new()
    one_loop = ("/bin/sh", "-c", f'AWS_LAMBDA_MAX_CONCURRENCY=1 exec "{sys.executable}" "{BOOTSTRAP}"')
    async with concurrent_agent(code, workers=2, timeout_s=1, command=one_loop) as agent:
        env = agent.agent.env
        await workers_waiting(agent, 1)
        hung = asyncio.create_task(agent.invoke({"dir": hold, "n": 99, "wait": 60}))
        await until(lambda: len(env.handed_out) == 1)
        waited = await agent.invoke({"op": "sleep", "seconds": 0})  # no worker for it
        first = await hung
        after = await agent.invoke({"op": "sleep", "seconds": 0, "tag": "after"})
    assert first.json()["errorType"] == "Sandbox.Timedout"
    assert "X-Lambdalet-Reset" not in first.headers
    assert waited.json()["errorType"] == "Sandbox.Timedout"
    assert waited.headers["X-Lambdalet-Reset"] == "1"
    assert after.json() == {"tag": "after", "slept": 0}


async def test_a_crash_fails_every_invocation_in_flight_then_a_new_runtime_serves(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    barriers = Barriers(code)
    async with concurrent_agent(code) as agent:
        await workers_waiting(agent)
        hold = barriers.new()
        crash = agent.invoke({"op": "crash", "after": 0.3, "code": 7})
        results = await asyncio.gather(crash, *(agent.invoke({"dir": hold, "n": 99, "wait": 30}) for _ in range(N - 1)))
        await workers_waiting(agent)
        folder = barriers.new()
        again = await asyncio.gather(*(agent.invoke({"dir": folder, "n": N}) for _ in range(N)))
    for result in results:
        request_id = result.headers["x-amzn-RequestId"]
        assert result.headers["X-Amz-Function-Error"] == "Unhandled"
        assert result.headers["X-Lambdalet-Reset"] == "1"
        assert result.json() == {
            "errorType": "Runtime.ExitError",
            "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: exit status 7",
        }
    assert [r.json()["seen"] for r in again] == [N] * N


async def test_an_init_error_answers_every_waiting_invocation(tmp_path: Path) -> None:
    (tmp_path / "fn.py").write_text("raise KeyError('config')\n")
    async with concurrent_agent(tmp_path) as agent:
        results = await asyncio.gather(*(agent.invoke({}) for _ in range(N)))
    assert [(r.status, r.json()["errorType"]) for r in results] == [(200, "KeyError")] * N


async def test_awslambdaric_runs_n_workers_under_the_agent(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    folder = Barriers(code).new()
    async with concurrent_agent(code, command=RIC) as agent:
        await workers_waiting(agent)
        results = await asyncio.gather(*(agent.invoke({"dir": folder, "n": N, "tag": i}) for i in range(N)))
    assert [r.json()["tag"] for r in results] == list(range(N))
    assert {r.json()["seen"] for r in results} == {N}
    assert len({r.json()["pid"] for r in results}) == N


async def test_the_runtime_api_with_the_test_as_the_runtime(tmp_path: Path) -> None:
    """Two workers at /next, a third refused; results in any order, each to its caller; no second result."""
    idle = (sys.executable, "-c", "import time; time.sleep(600)")
    async with concurrent_agent(tmp_path, workers=2, command=idle) as agent:
        base = f"http://{agent.agent.env.runtime_api_address}/2018-06-01/runtime"

        async def next_event() -> tuple[str, bytes]:
            async with agent.session.get(f"{base}/invocation/next") as response:
                return response.headers["Lambda-Runtime-Aws-Request-Id"], await response.read()

        async def respond(request_id: str, body: bytes) -> tuple[int, Any]:
            async with agent.session.post(f"{base}/invocation/{request_id}/response", data=body) as response:
                return response.status, await response.json(content_type=None)

        workers = [asyncio.create_task(next_event()) for _ in range(2)]
        await until(lambda: agent.agent.env.cstate.waiting == 2)
        async with agent.session.get(f"{base}/invocation/next") as third:
            refused = (third.status, await third.json())
        callers = [asyncio.create_task(agent.invoke({"caller": i})) for i in range(2)]
        events = dict(await asyncio.gather(*workers))
        by_caller = {json.loads(body)["caller"]: request_id for request_id, body in events.items()}
        answers = [await respond(by_caller[i], json.dumps({"answer": i}).encode()) for i in (1, 0)]
        again = await respond(by_caller[0], b"{}")
        async with agent.session.post(f"{base}/init/error", data=b"{}") as late_init_error:
            init_status = late_init_error.status
        results = await asyncio.gather(*callers)
    assert refused == (
        403,
        {
            "errorMessage": "State transition from Ready to Ready failed for runtime. "
            "Error: State transition is not allowed",
            "errorType": "InvalidStateTransition",
        },
    )
    assert [status for status, _ in answers] == [202, 202]
    assert again == (400, {"errorMessage": "Invalid request ID", "errorType": "InvalidRequestID"})
    assert init_status == 403
    assert [r.json() for r in results] == [{"answer": 0}, {"answer": 1}]
    assert [r.headers["x-amzn-RequestId"] for r in results] == [by_caller[0], by_caller[1]]


# ------------------------------------------------------------------------------------ conformance

SCENARIOS = ("overlap", "one_more", "timeout", "crash")


def _outcome(result: Invoked) -> str:
    """What a caller sees, in words that hold for both: the emulator answers one more than N with
    ``400 Runtime.Unavailable`` where the agent answers ``429 Environment.Busy`` (its documented busy
    answer), and writes error types in ``Error-Type`` where the agent writes ``X-Amz-Function-Error``."""
    if (result.status, result.json().get("errorType")) in ((400, "Runtime.Unavailable"), (429, "Environment.Busy")):
        return "busy"
    body = result.json()
    if result.status == 200 and "errorType" in body:
        return str(body["errorType"])
    if result.status == 200 and "seen" in body:
        return f"ok, {body['seen']} at once"
    return f"{result.status} {body}"


async def _scenario(name: str, session: aiohttp.ClientSession, url: str, barriers: Barriers) -> list[str]:
    await all_workers_waiting(session, url, barriers, N)
    folder = barriers.new()
    if name == "overlap":
        events = [{"dir": folder, "n": N}] * N
    elif name == "one_more":
        events = [{"dir": folder, "n": N + 1, "wait": 1.5}] * (N + 1)
    elif name == "timeout":
        events = [{"op": "sleep", "seconds": 4}] + [{"dir": folder, "n": N - 1}] * (N - 1)
    else:
        # The others are inside (waiting for a barrier that never fills) when the crash comes.
        events = [{"op": "crash", "after": 0.3, "code": 7}] + [{"dir": folder, "n": 99, "wait": 1.5}] * (N - 1)
    return sorted(_outcome(r) for r in await burst(session, url, events))


@pytest.mark.parametrize("runtime", ["bootstrap", "awslambdaric"])
@pytest.mark.parametrize("name", SCENARIOS)
async def test_callers_see_what_they_see_under_awss_emulator(tmp_path: Path, name: str, runtime: str) -> None:
    """The same burst against AWS's emulator in LMI mode and against our agent gives the same outcomes."""
    reason = _lmi_emulator_usable()
    if reason is not None:
        pytest.skip(f"AWS's emulator in LMI mode: {reason}")
    rie_command: Sequence[str] = ()
    agent_command: Sequence[str] = ()
    if runtime == "awslambdaric":
        python = _system_python()
        assert python is not None
        rie_command, agent_command = (python, "-m", "awslambdaric", "fn.handler"), RIC
    code = function_dir(tmp_path / "rie")
    async with running_lmi_rie(code, N, timeout_s=3, command=rie_command) as url, aiohttp.ClientSession() as session:
        theirs = await _scenario(name, session, url, Barriers(code))
    code = function_dir(tmp_path / "agent")
    async with concurrent_agent(code, timeout_s=3, command=agent_command) as agent:
        ours = await _scenario(name, agent.session, agent.url + INVOKE_PATH, Barriers(code))
    assert ours == theirs
    expected = {
        "overlap": [f"ok, {N} at once"] * N,
        "one_more": ["busy"] + [f"ok, {N} at once"] * N,
        "timeout": ["Sandbox.Timedout"] + [f"ok, {N - 1} at once"] * (N - 1),
        # awslambdaric's parent process outlives a worker that exits: its invocation times out instead.
        "crash": ["Runtime.ExitError"] * N
        if runtime == "bootstrap"
        else ["Sandbox.Timedout"] + [f"ok, {N - 1} at once"] * (N - 1),
    }
    assert ours == sorted(expected[name])


# ------------------------------------------------------------------------------------ the command line


async def test_lambdalet_agent_max_concurrency_flag(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    folder = Barriers(code).new()
    port_file = tmp_path / "port"
    lambdalet = str(Path(sys.executable).with_name("lambdalet"))
    argv = [lambdalet, "agent", "--code", str(code), "--handler", "fn.handler", "--port", "0"]
    argv += ["--port-file", str(port_file), "--max-concurrency", "2"]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while b"agent listening" not in (line := await process.stderr.readline()):
                pass
        url = f"http://127.0.0.1:{int(port_file.read_text())}{INVOKE_PATH}"
        async with aiohttp.ClientSession() as session:
            results = await burst(session, url, [{"dir": folder, "n": 2}] * 2)
    finally:
        process.send_signal(signal.SIGTERM)
        await process.communicate()
    assert b"2 invocation(s) at once" in line
    assert [r.json()["seen"] for r in results] == [2, 2]


async def test_lambdalet_agent_refuses_a_bad_max_concurrency() -> None:
    lambdalet = str(Path(sys.executable).with_name("lambdalet"))
    process = await asyncio.create_subprocess_exec(
        lambdalet, "agent", "--handler", "a.b", "--max-concurrency", "0", stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"--max-concurrency/AWS_LAMBDA_MAX_CONCURRENCY=0 must be 1-1024" in stderr
