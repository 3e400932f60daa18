"""Agents started without an interpreter start in the local backend: pre-started (standby) agents
(LAMBDALET_STANDBY_AGENTS=N) and agents forked by a fork server (LAMBDALET_AGENT_FORK_SERVER=1). Such an
environment behaves like one started from scratch (the function's variables, its code directory as the
working directory, Init Duration on the first invocation, one environment per concurrent invocation, a
dead agent noticed), the standby pool is refilled for the next cold start, and no process is left once the
gateway stops."""

from __future__ import annotations

import base64
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gateway_support import RunningGateway, processes_in, running_gateway, wait_for, write_function

PROBE = """
import os

def handler(event, context):
    agent = os.getppid()
    with open(f"/proc/{agent}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\\0")
    with open(f"/proc/{agent}/stat", "rb") as f:
        agent_parent = int(f.read().rsplit(b")", 1)[1].split()[1])
    return {
        "greeting": os.environ.get("GREETING"),
        "cwd": os.getcwd(),
        "task_root": os.environ.get("LAMBDA_TASK_ROOT"),
        "agent": agent,
        "agent_parent": agent_parent,
        "agent_cmdline": [a.decode() for a in cmdline if a],
    }
"""
MARK = b"from lambdalet_agent import cli"


def idle_standbys() -> set[int]:
    """Standby agents of this test process that serve no environment yet (no runtime child)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            children = (proc / "task" / proc.name / "children").read_text().split()
        except OSError:
            continue
        if MARK in cmdline and int(fields[1]) == os.getpid() and fields[0] != "Z" and not children:
            found.add(int(proc.name))
    return found


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def invoke(gateway: RunningGateway, name: str) -> tuple[dict[str, Any], str]:
    path = f"/2015-03-31/functions/{name}/invocations"
    status, headers, body = gateway.post(path, b"{}", {"X-Amz-Log-Type": "Tail"})
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result, base64.b64decode(headers["X-Amz-Log-Result"]).decode()


def test_environments_start_from_standby_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALET_STANDBY_AGENTS", "1")
    write_function(tmp_path, "first", {"app.py": PROBE}, environment={"variables": {"GREETING": "hello"}})
    write_function(tmp_path, "second", {"app.py": PROBE}, environment={"variables": {"GREETING": "again"}})
    with running_gateway([tmp_path], tmp_path) as gateway:
        wait_for(lambda: len(idle_standbys()) == 1, what="a standby agent")
        standbys = idle_standbys()
        result, log = invoke(gateway, "first")
        assert result["greeting"] == "hello"
        assert result["agent"] in standbys
        assert result["cwd"] == result["task_root"]
        assert "Init Duration" in log
        # its command line is the agent's (ps, and tools that find agents by it, see which function it runs)
        assert result["agent_cmdline"][1:3] == ["-m", "lambdalet_agent"]
        assert "first" in result["agent_cmdline"]
        assert str(tmp_path / "state") in " ".join(result["agent_cmdline"])
        result, log = invoke(gateway, "first")
        assert "Init Duration" not in log

        wait_for(lambda: len(idle_standbys()) == 1, what="the pool to be refilled")
        standbys = idle_standbys()
        result, _ = invoke(gateway, "second")
        assert result["greeting"] == "again"
        assert result["agent"] in standbys
    assert idle_standbys() == set()
    assert processes_in(tmp_path) == set()


def test_without_the_setting_no_standby_is_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMBDALET_STANDBY_AGENTS", raising=False)
    write_function(tmp_path, "plain", {"app.py": PROBE})
    with running_gateway([tmp_path], tmp_path) as gateway:
        result, _ = invoke(gateway, "plain")
        assert result["agent_parent"] == os.getpid()
        assert MARK not in cmdline(int(result["agent"]))
        assert idle_standbys() == set()


SLEEPER = """
import os, time

def handler(event, context):
    time.sleep(event.get("seconds", 0))
    return {"agent": os.getppid()}
"""


def test_agents_forked_by_the_fork_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALET_AGENT_FORK_SERVER", "1")
    write_function(tmp_path, "forked", {"app.py": PROBE}, environment={"variables": {"GREETING": "forked"}})
    write_function(tmp_path, "wide", {"app.py": SLEEPER}, timeoutSeconds=30)
    with running_gateway([tmp_path], tmp_path) as gateway:
        result, log = invoke(gateway, "forked")
        assert result["greeting"] == "forked"
        assert result["cwd"] == result["task_root"]
        assert b"gc.freeze()" in cmdline(int(result["agent_parent"]))  # forked by the fork server
        assert result["agent_cmdline"][1:3] == ["-m", "lambdalet_agent"]
        assert "forked" in result["agent_cmdline"]
        assert "Init Duration" in log

        # concurrent invocations get environments of their own
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: gateway.invoke("wide", {"seconds": 1.0}), range(3)))
        assert [status for status, _, _ in replies] == [200, 200, 200]
        agents = {json.loads(body)["agent"] for _, _, body in replies}
        assert len(agents) == 3
        assert gateway.environments("wide")["idle"] == 3

        # an agent that dies is noticed (its exit comes from the fork server) and replaced on demand
        victim = agents.pop()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gateway.environments("wide")["idle"] == 2, what="the dead environment to be dropped")
        status, _, _ = gateway.invoke("wide", {"seconds": 0})
        assert status == 200
    assert processes_in(tmp_path) == set()
    assert idle_standbys() == set()
