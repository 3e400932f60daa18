"""Pre-started (standby) agents in the local backend (LAMBDALET_STANDBY_AGENTS=N): an environment started
from a standby behaves like one started from scratch (the function's variables, its code directory as the
working directory, Init Duration on the first invocation), the pool is refilled for the next cold start,
and no process is left once the gateway stops."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from gateway_support import RunningGateway, processes_in, running_gateway, wait_for, write_function

PROBE = """
import os

def handler(event, context):
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        agent = f.read()
    return {
        "greeting": os.environ.get("GREETING"),
        "cwd": os.getcwd(),
        "task_root": os.environ.get("LAMBDA_TASK_ROOT"),
        "from_standby": b"from lambdalet_agent import cli" in agent,
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


def invoke(gateway: RunningGateway, name: str) -> tuple[dict[str, object], str]:
    path = f"/2015-03-31/functions/{name}/invocations"
    status, headers, body = gateway.post(path, b"{}", {"X-Amz-Log-Type": "Tail"})
    assert status == 200, body
    result: dict[str, object] = json.loads(body)
    return result, base64.b64decode(headers["X-Amz-Log-Result"]).decode()


def test_environments_start_from_standby_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDALET_STANDBY_AGENTS", "1")
    write_function(tmp_path, "first", {"app.py": PROBE}, environment={"variables": {"GREETING": "hello"}})
    write_function(tmp_path, "second", {"app.py": PROBE}, environment={"variables": {"GREETING": "again"}})
    with running_gateway([tmp_path], tmp_path) as gateway:
        wait_for(lambda: len(idle_standbys()) == 1, what="a standby agent")
        result, log = invoke(gateway, "first")
        assert result["greeting"] == "hello"
        assert result["from_standby"] is True
        assert result["cwd"] == result["task_root"]
        assert "Init Duration" in log
        result, log = invoke(gateway, "first")
        assert "Init Duration" not in log

        wait_for(lambda: len(idle_standbys()) == 1, what="the pool to be refilled")
        result, _ = invoke(gateway, "second")
        assert result["greeting"] == "again"
        assert result["from_standby"] is True
    assert idle_standbys() == set()
    assert processes_in(tmp_path) == set()


def test_without_the_setting_no_standby_is_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMBDALET_STANDBY_AGENTS", raising=False)
    write_function(tmp_path, "plain", {"app.py": PROBE})
    with running_gateway([tmp_path], tmp_path) as gateway:
        result, _ = invoke(gateway, "plain")
        assert result["from_standby"] is False
        assert idle_standbys() == set()
