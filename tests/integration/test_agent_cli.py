"""``lambdalet agent`` and ``python -m lambdalet_agent`` as real processes, the way people run AWS's
emulator: flags, --port-file, logs with START/END/REPORT on stdout, ``-- COMMAND``, clean SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from agent_support import INVOKE_PATH, PYTHON_FUNCTIONS, post

LAMBDALET = str(Path(sys.executable).with_name("lambdalet"))


def _read_port(path: Path) -> int:
    return int(path.read_text())


def _cgroups_of(pid: int) -> list[Path]:
    return list(Path("/sys/fs/cgroup/memory").glob(f"**/lambdalet-{pid}"))


async def _run(
    argv: Sequence[str], port_file: Path, events: list[dict[str, object]]
) -> tuple[list[tuple[int, bytes]], str, int, int]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while b"agent listening" not in await process.stderr.readline():
                pass  # the agent logs this line once it is bound and has written the port file
        port = _read_port(port_file)
        results = []
        async with aiohttp.ClientSession() as session:
            for event in events:
                result = await post(session, f"http://127.0.0.1:{port}{INVOKE_PATH}", event)
                results.append((result.status, result.body))
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, _ = await process.communicate()  # (stderr is drained here too)
    return results, stdout.decode(), process.returncode or 0, process.pid


async def test_lambdalet_agent_runs_one_environment_and_prints_framed_logs(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    argv = [
        LAMBDALET,
        "agent",
        "--code",
        str(PYTHON_FUNCTIONS),
        "--handler",
        "app.log",
        "--runtime",
        "python3.12",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--timeout",
        "5",
        "--memory",
        "256",
    ]
    results, stdout, code, pid = await _run(argv, port_file, [{}, {}])
    assert code == 0
    assert [status for status, _ in results] == [200, 200]
    assert results[0][1] == b'{"logged": true}'
    lines = stdout.splitlines()
    starts = [line for line in lines if line.startswith("START RequestId: ")]
    reports = [line for line in lines if line.startswith("REPORT RequestId: ")]
    assert len(starts) == 2
    assert len(reports) == 2
    assert "Memory Size: 256 MB" in reports[0]
    assert "Init Duration" in reports[0]
    assert "Init Duration" not in reports[1]
    assert sum("stdout line for" in line for line in lines) == 2
    # The agent removed its memory cgroup on the way out.
    assert not _cgroups_of(pid)


async def test_python_m_lambdalet_agent_with_awslambdaric_as_the_command(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    argv = [
        sys.executable,
        "-m",
        "lambdalet_agent",
        "--code",
        str(PYTHON_FUNCTIONS),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--",
        sys.executable,
        "-m",
        "awslambdaric",
        "app.echo",
    ]
    results, stdout, code, _ = await _run(argv, port_file, [{"via": "awslambdaric"}])
    assert code == 0
    assert results == [(200, b'{"via": "awslambdaric"}')]
    assert "REPORT RequestId: " in stdout


async def test_invalid_flags_exit_2_with_a_message() -> None:
    process = await asyncio.create_subprocess_exec(
        LAMBDALET, "agent", "--timeout", "-1", "--handler", "a.b", stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"--timeout" in stderr
