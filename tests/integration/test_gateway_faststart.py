"""Fast start, the embedded mode's default: every agent is forked from one zygote that imported the agent,
with a spare forked ahead. A forked environment is the environment a plain spawn gives (the function's own
variables and nobody else's, its code directory as working directory, its memory limit, its own session,
the same signal dispositions), the zygote's death costs no cold start, opting out spawns every agent, and
nothing is left once the gateway stops. The zygote and its spare are platform processes: they run in the
gateway's working directory, not in any function's, and hold no function's code or settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from gateway_support import RunningGateway, process_tree, processes_in, running_gateway, wait_for, write_function
from lambdalet_gateway.settings import Settings
from lambdalet_gateway.standby import ZYGOTE_MARK, ForkServer

PROBE = """
import os

def handler(event, context):
    agent = os.getppid()
    print("probe ran in", os.getcwd())
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    with open(f"/proc/{agent}/stat", "rb") as f:
        agent_parent = int(f.read().rsplit(b")", 1)[1].split()[1])
    with open(f"/proc/{agent}/cmdline", "rb") as f:
        agent_cmdline = [a.decode() for a in f.read().split(b"\\0") if a]
    return {
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "agent": agent,
        "agent_parent": agent_parent,
        "agent_cmdline": agent_cmdline,
        "agent_sid": os.getsid(agent),
        "agent_pgid": os.getpgid(agent),
        "runtime_pgid": os.getpgid(0),
        "signals": {key: status[key].strip() for key in ("SigBlk", "SigIgn", "Umask")},
        "open_fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "agent_fds": len(os.listdir(f"/proc/{agent}/fd")),
    }
"""
#: Files of a function named like modules the agent imports: they must not replace the agent's own.
SHADOWS = {f"{name}.py": f"raise ImportError('a function file: {name}.py')\n" for name in ("uuid", "asyncio", "json")}
HOG = """
def handler(event, context):
    hog = bytearray(event["mb"] * 1024 * 1024)
    return len(hog)
"""
#: Variables whose value differs between any two environments (ports, ids), by nature not by start mode.
PER_ENVIRONMENT = {"AWS_LAMBDA_RUNTIME_API", "AWS_LAMBDA_LOG_STREAM_NAME", "_X_AMZN_TRACE_ID"}


def invoke(gateway: RunningGateway, name: str, event: object = None) -> dict[str, Any]:
    status, _, body = gateway.invoke(name, event)
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def zygotes() -> dict[int, int]:
    """Live zygotes of this test process (pid -> parent pid): the zygote's command line carries its mark."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if ZYGOTE_MARK.encode() in cmdline and fields[0] != "Z" and int(fields[1]) == os.getpid():
            found[int(proc.name)] = int(fields[1])
    return found


def children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def spares(zygote: int) -> set[int]:
    """The zygote's children that wait for an order (an agent that serves an environment runs a runtime)."""
    return {child for child in children(zygote) if not children(child)}


def the_zygote() -> int:
    wait_for(lambda: len(zygotes()) == 1, what="the zygote")
    (zygote,) = zygotes()
    return zygote


def test_agents_are_forked_from_the_zygote_by_default(tmp_path: Path) -> None:
    write_function(tmp_path, "probe", {"app.py": PROBE})
    with running_gateway([tmp_path], tmp_path) as gateway:
        zygote = the_zygote()
        wait_for(lambda: len(children(zygote)) == 1, what="a spare agent forked ahead")
        (spare,) = children(zygote)
        # the zygote and its spare are platform processes: no function has an environment or a process yet
        assert gateway.environments("probe") == {"idle": 0, "busy": 0, "starting": 0}
        assert processes_in(tmp_path) == set()
        assert Path(f"/proc/{spare}/cwd").readlink() == Path.cwd()

        result = invoke(gateway, "probe")
        assert result["agent"] == spare  # the spare served this cold start
        assert result["agent_parent"] == zygote
        assert result["agent_cmdline"][1:4] == ["-P", "-m", "lambdalet_agent"]
        assert "probe" in result["agent_cmdline"]
        # a replacement spare is forked in the background
        wait_for(lambda: len(children(zygote) - {spare}) == 1, what="the spare to be replaced")
    assert zygotes() == {}
    assert not process_tree({zygote, spare})


def test_a_forked_environment_is_the_one_a_spawn_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the gateway's own settings variables and another function's variables stay out of an environment
    monkeypatch.setenv("LAMBDALET_QUEUE_SIZE", "77")
    write_function(tmp_path, "mine", {"app.py": PROBE}, environment={"variables": {"MINE": "1", "SHARED": "a"}})
    write_function(tmp_path, "other", {"app.py": PROBE}, environment={"variables": {"OTHER": "1", "SHARED": "b"}})
    results: dict[bool, dict[str, Any]] = {}
    for fast in (True, False):
        with running_gateway([tmp_path], tmp_path / ("fast" if fast else "plain"), fast_start=fast) as gateway:
            assert (zygotes() != {}) == fast
            results[fast] = invoke(gateway, "mine")
            # the function's output and the agent's START/END/REPORT lines reach `lambdalet logs`
            status, _, logs = gateway.get("/lambdalet/v1/functions/mine/logs")
            assert status == 200
            assert f"probe ran in {results[fast]['cwd']}" in logs.decode()
            assert "REPORT RequestId:" in logs.decode()
            other = invoke(gateway, "other")
            assert other["env"]["SHARED"] == "b"
            assert "MINE" not in other["env"]
    forked, spawned = results[True], results[False]
    assert forked["agent_parent"] != os.getpid()  # forked by the zygote
    assert spawned["agent_parent"] == os.getpid()  # spawned by the gateway

    for result in (forked, spawned):
        env = result["env"]
        assert env["MINE"] == "1"
        assert env["SHARED"] == "a"
        assert "OTHER" not in env
        assert not [key for key in env if key.startswith("LAMBDALET_")]
        assert result["cwd"] == env["LAMBDA_TASK_ROOT"]
        assert Path(result["cwd"]).is_relative_to(tmp_path)
        # the agent leads a session of its own; its runtime runs in a process group of its own
        assert result["agent_sid"] == result["agent"] == result["agent_pgid"]
        assert result["runtime_pgid"] == result["pid"]
        # the runtime inherits no descriptor of the zygote (stdin, stdout, stderr only)
        assert result["open_fds"] == spawned["open_fds"]

    def comparable(result: dict[str, Any]) -> dict[str, str]:
        root = str(Path(result["cwd"]).parents[2])
        return {key: value.replace(root, "STATE") for key, value in result["env"].items() if key not in PER_ENVIRONMENT}

    assert comparable(forked) == comparable(spawned)
    assert forked["signals"] == spawned["signals"]


@pytest.mark.parametrize("fast", [True, False], ids=["forked", "spawned"])
def test_a_functions_files_do_not_replace_the_agents_modules(tmp_path: Path, fast: bool) -> None:
    write_function(tmp_path, "shadow", {"app.py": PROBE, **SHADOWS})
    with running_gateway([tmp_path], tmp_path, fast_start=fast) as gateway:
        result = invoke(gateway, "shadow")
        assert set(SHADOWS) <= set(os.listdir(result["cwd"]))
        assert invoke(gateway, "shadow")["agent"] == result["agent"]


def test_the_memory_limit_applies_to_a_forked_environment(tmp_path: Path) -> None:
    write_function(tmp_path, "hog", {"app.py": HOG}, memoryMB=128)
    with running_gateway([tmp_path], tmp_path) as gateway:
        the_zygote()
        status, _, body = gateway.invoke("hog", {"mb": 16})
        assert (status, json.loads(body)) == (200, 16 * 1024 * 1024)
        status, headers, body = gateway.invoke("hog", {"mb": 400})
        assert status == 200
        assert headers["X-Amz-Function-Error"] == "Unhandled"
        error = json.loads(body)
        if error["errorType"] == "Runtime.ExitError":  # a memory cgroup (root): the kernel kills the runtime
            assert error["errorMessage"].endswith("signal: killed")
        else:  # RLIMIT_DATA: the allocation fails inside the function
            assert error["errorType"] == "MemoryError"


def test_the_zygotes_death_costs_no_cold_start(tmp_path: Path) -> None:
    names = [f"fn{i}" for i in range(4)]
    for name in ["warm", *names]:
        write_function(tmp_path, name, {"app.py": PROBE})
    with running_gateway([tmp_path], tmp_path) as gateway:
        zygote = the_zygote()
        warm = invoke(gateway, "warm")
        assert warm["agent_parent"] == zygote

        # killed while idle: its spare exits, the environments it forked keep serving
        waiting = spares(zygote)
        os.kill(zygote, signal.SIGKILL)
        wait_for(lambda: not process_tree(waiting), what="the dead zygote's spare to exit")
        assert invoke(gateway, "warm")["agent"] == warm["agent"]

        # the next cold start does not wait for a new zygote; one is started again for the ones after
        first = invoke(gateway, names[0])
        assert first["agent_parent"] in (os.getpid(), *zygotes())
        zygote = the_zygote()
        wait_for(lambda: len(spares(zygote)) == 1, what="the new zygote's spare")
        second = invoke(gateway, names[1])
        assert second["agent_parent"] == zygote

        # killed the moment a cold start needs it: that invocation still succeeds
        os.kill(zygote, signal.SIGKILL)
        assert invoke(gateway, names[2])["env"]["AWS_LAMBDA_FUNCTION_NAME"] == names[2]
        # a spare killed before its turn is replaced, and the cold start it would have served still succeeds
        zygote = the_zygote()
        wait_for(lambda: len(spares(zygote)) == 1, what="the spare")
        (spare,) = spares(zygote)
        os.kill(spare, signal.SIGKILL)
        assert invoke(gateway, names[3])["agent"] != spare

        # an environment forked by a dead zygote is still stopped like any other
        orphan_tree = process_tree({warm["agent"]})
        assert orphan_tree
    assert not process_tree(orphan_tree)
    assert zygotes() == {}
    assert processes_in(tmp_path) == set()


def test_a_stuck_zygote_is_replaced_and_costs_no_cold_start(tmp_path: Path) -> None:
    write_function(tmp_path, "probe", {"app.py": PROBE})
    with running_gateway([tmp_path], tmp_path) as gateway:
        zygote = the_zygote()
        wait_for(lambda: len(spares(zygote)) == 1, what="the zygote to be ready")
        os.kill(zygote, signal.SIGSTOP)
        try:
            result = invoke(gateway, "probe")  # waits REPLY_TIMEOUT_S for the zygote, then spawns
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote, signal.SIGCONT)
        assert result["agent_parent"] == os.getpid()
        wait_for(lambda: zygote not in zygotes() and len(zygotes()) == 1, what="a new zygote")


def test_a_zygote_that_cannot_start_is_not_restarted_in_a_loop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lambdalet.gateway.standby")

    async def scenario() -> list[asyncio.subprocess.Process | None]:
        zygote = ForkServer("/bin/false", dict(os.environ), 1)  # an interpreter that exits at once
        zygote.start_soon()
        taken = []
        for _ in range(45):  # 4.5 s of cold starts, each asking the zygote first
            taken.append(await asyncio.wait_for(zygote.take(["--help"], str(Path.cwd())), 1))
            await asyncio.sleep(0.1)
        await zygote.close()
        return taken

    assert asyncio.run(scenario()) == [None] * 45  # every cold start spawned its agent instead
    starts = [r for r in caplog.records if r.getMessage().startswith("agent zygote started")]
    # started at 0 s, then after 2 s and 4 s more (the backoff doubles while it never gets ready)
    assert 2 <= len(starts) <= 3


def test_opting_out_spawns_every_agent(tmp_path: Path) -> None:
    write_function(tmp_path, "probe", {"app.py": PROBE})
    with running_gateway([tmp_path], tmp_path, fast_start=False) as gateway:
        result = invoke(gateway, "probe")
        assert result["agent_parent"] == os.getpid()
        assert result["agent_cmdline"][1:4] == ["-P", "-m", "lambdalet_agent"]
        assert zygotes() == {}

    on = Settings.from_env({})
    assert (on.fast_start, on.standby_agents) == (True, 1)
    assert not Settings.from_env({"LAMBDALET_FAST_START": "0"}).fast_start
    assert not Settings.from_env({"LAMBDALET_AGENT_FORK_SERVER": "false"}).fast_start
    assert Settings.from_env({"LAMBDALET_AGENT_FORK_SERVER": "1"}).fast_start
    assert Settings.from_env({"LAMBDALET_STANDBY_AGENTS": "3"}).standby_agents == 3


LAMBDALET = str(Path(sys.executable).parent / "lambdalet")


@pytest.mark.parametrize("flags", [[], ["--no-fast-start"]], ids=["default", "no-fast-start"])
def test_lambdalet_up_leaves_no_process(tmp_path: Path, flags: list[str]) -> None:
    write_function(tmp_path, "probe", {"app.py": PROBE})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, LAMBDALET_STATE_DIR=str(tmp_path / "state"))
    up = subprocess.Popen(
        [LAMBDALET, "up", str(tmp_path), "--port", str(port), "--quiet", *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/2015-03-31/functions/probe/invocations"

        def answered() -> bool:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=b"{}"), timeout=30) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(answered, timeout=60, what="lambdalet up to serve")
        # the environment (agent and runtime), plus with fast start the zygote and its spare
        expected = 2 if flags else 4
        wait_for(lambda: len(process_tree({up.pid}) - {up.pid}) == expected, what=f"{expected} processes")
        tree = process_tree({up.pid}) - {up.pid}
    finally:
        up.send_signal(signal.SIGINT)
        stderr = up.communicate(timeout=30)[1].decode()
    assert up.returncode == 0, stderr
    assert not process_tree(tree), "processes left after lambdalet up stopped"
