"""Multi-concurrency (``AWS_LAMBDA_MAX_CONCURRENCY`` = N, as in Lambda Managed Instances), with real processes.

Our Python bootstrap runs N worker processes that each loop on ``/next``. Overlap is proven with a barrier
handler: each invocation drops a file named after its request id in a shared folder and waits until N
files are there, so N invocations can only all succeed when they ran at the same time (a sequential run
would wait out its limit and report fewer).

AWS's emulator (``aws-lambda-rie`` with ``AWS_LAMBDA_MAX_CONCURRENCY`` set switches to its Lambda Managed
Instances mode) is the reference. Its behaviour, read from its source (internal/lambda-managed-instances)
and checked here: every ``/next`` is an idle worker; an invocation that finds none fails at once with
``400 Runtime.Unavailable``; a timeout answers that caller ``Sandbox.Timedout`` and leaves the runtime and
the other invocations alone (the late ``/response`` gets ``410 InvokeTimeout``); the runtime process
exiting fails every invocation in flight with ``Runtime.ExitError`` and ends the environment. In this mode
the emulator only runs a ``bootstrap`` file from ``/var/task`` (or ``/opt``, ``/var/runtime``), as user
993: each emulator here runs in a private mount namespace with the function folder bound on ``/var/task``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agent_support import BOOTSTRAP, INVOKE_PATH, Invoked, free_port, post, rie_binary

N = 3

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
    code.mkdir()
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
    rie = [rie_binary(), "--runtime-interface-emulator-address", f"127.0.0.1:{port}"]
    rie += ["--runtime-api-address", f"127.0.0.1:{api_port}"]
    process = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(code), *rie,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
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


# ------------------------------------------------------------------------------------ under AWS's emulator


async def test_emulator_runs_our_workers_concurrently_and_refuses_one_more(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    barriers = Barriers(code)
    async with running_lmi_rie(code, N) as url, aiohttp.ClientSession() as session:
        await all_workers_waiting(session, url, barriers, N)
        folder = barriers.new()
        results = await burst(session, url, [{"dir": folder, "n": N, "tag": i} for i in range(N)])
        await asyncio.sleep(0.2)
        folder = barriers.new()
        over = await burst(session, url, [{"dir": folder, "n": N + 1, "wait": 1.5, "tag": i} for i in range(N + 1)])
    assert [r.status for r in results] == [200] * N
    assert sorted(r.json()["tag"] for r in results) == list(range(N))
    assert {r.json()["seen"] for r in results} == {N}
    assert len({r.json()["pid"] for r in results}) == N  # one process per invocation
    refused = [r for r in over if r.status != 200]
    assert len(refused) == 1
    assert refused[0].status == 400
    assert refused[0].json() == {"errorType": "Runtime.Unavailable"}


async def test_emulator_timeout_of_one_leaves_the_others(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    async with running_lmi_rie(code, N, timeout_s=1) as url, aiohttp.ClientSession() as session:
        await all_workers_waiting(session, url, Barriers(code), N)
        slow = {"op": "sleep", "seconds": 2.5, "tag": "slow"}
        results = await burst(session, url, [slow] + [{"op": "sleep", "seconds": 0.3, "tag": i} for i in range(N - 1)])
    assert results[0].headers["Error-Type"] == "Sandbox.Timedout"
    assert results[0].json()["errorType"] == "Sandbox.Timedout"
    assert [r.json() for r in results[1:]] == [{"tag": i, "slept": 0.3} for i in range(N - 1)]


async def test_emulator_runtime_exit_fails_every_invocation_in_flight(tmp_path: Path) -> None:
    code = function_dir(tmp_path)
    async with running_lmi_rie(code, N) as url, aiohttp.ClientSession() as session:
        await all_workers_waiting(session, url, Barriers(code), N)
        crash = {"op": "crash", "after": 0.3, "code": 7}
        results = await burst(session, url, [crash] + [{"op": "sleep", "seconds": 2, "tag": i} for i in range(N - 1)])
    assert [(r.status, r.json()["errorType"]) for r in results] == [(200, "Runtime.ExitError")] * N
