"""Scaling with real agent processes: scale from zero, scale out under concurrency, idle environments
stopped with no process left behind, provisioned environments started ahead and warm.

With fast start (the default) two platform processes stay while the gateway runs: the zygote agents are
forked from and one spare agent forked ahead. They are not environments: they run in the gateway's working
directory, hold no function's code, settings or variables, and a function with zero environments has no
process."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway_support import process_tree, processes_in, running_gateway, wait_for, write_function
from test_gateway_faststart import zygotes

HELLO = """
import os

def handler(event, context):
    print("init type", os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE"))
    return {"pid": os.getpid()}
"""
SLEEPER = """
import time

def handler(event, context):
    time.sleep(event.get("seconds", 0))
    return "done"
"""


def tail(headers: dict[str, str]) -> str:
    return base64.b64decode(headers["X-Amz-Log-Result"]).decode()


def test_scale_from_zero_then_warm(tmp_path: Path) -> None:
    write_function(tmp_path, "cold", {"app.py": HELLO})
    with running_gateway([tmp_path], tmp_path) as gateway:
        assert gateway.environments("cold") == {"idle": 0, "busy": 0, "starting": 0}
        assert gateway.agent_pids("cold") == set()
        tail_headers = {"X-Amz-Log-Type": "Tail"}
        status, headers, body = gateway.post("/2015-03-31/functions/cold/invocations", b"{}", tail_headers)
        assert status == 200
        assert "Init Duration" in tail(headers)
        first_pid = json.loads(body)["pid"]
        status, headers, body = gateway.post("/2015-03-31/functions/cold/invocations", b"{}", tail_headers)
        assert "Init Duration" not in tail(headers)
        assert json.loads(body)["pid"] == first_pid
        assert gateway.environments("cold") == {"idle": 1, "busy": 0, "starting": 0}
        assert len(gateway.agent_pids("cold")) == 1


def test_concurrent_invocations_scale_out(tmp_path: Path) -> None:
    write_function(tmp_path, "wide", {"app.py": SLEEPER}, timeoutSeconds=30)
    with running_gateway([tmp_path], tmp_path) as gateway, ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda _: gateway.invoke("wide", {"seconds": 1.5}), range(3)))
        assert [r[0] for r in replies] == [200, 200, 200]
        assert gateway.environments("wide")["idle"] == 3


def test_idle_environments_stop_and_leave_no_process(tmp_path: Path) -> None:
    write_function(tmp_path, "brief", {"app.py": HELLO}, idleTimeoutSeconds=1)
    with running_gateway([tmp_path], tmp_path) as gateway:
        status, _, body = gateway.invoke("brief")
        assert status == 200
        runtime_pid = json.loads(body)["pid"]
        agents = gateway.agent_pids("brief")
        assert len(agents) == 1
        members = process_tree(agents)
        assert runtime_pid in members
        wait_for(lambda: gateway.environments("brief")["idle"] == 0, what="the idle environment to stop")
        wait_for(lambda: not process_tree(agents), timeout=10, what="the processes to exit")
        assert not processes_in(gateway.state_dir)
        assert not process_tree(members)
        # what remains: the zygote and its spare, platform processes that know no function
        (zygote,) = zygotes()
        wait_for(lambda: len(process_tree({zygote})) == 2, what="the zygote's spare")
        for pid in process_tree({zygote}):
            assert b"brief" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert Path(f"/proc/{pid}/cwd").readlink() == Path.cwd()
        # and it starts again on demand
        assert gateway.invoke("brief")[0] == 200


def test_provisioned_environments_are_warm(tmp_path: Path) -> None:
    write_function(tmp_path, "warm", {"app.py": HELLO}, provisionedConcurrency=2, idleTimeoutSeconds=1)
    with running_gateway([tmp_path], tmp_path) as gateway:
        wait_for(lambda: gateway.environments("warm")["idle"] == 2, what="provisioned environments")
        pids = gateway.agent_pids("warm")
        assert len(pids) == 2
        status, headers, _ = gateway.post("/2015-03-31/functions/warm/invocations", b"{}", {"X-Amz-Log-Type": "Tail"})
        assert status == 200
        log = tail(headers)
        assert "Init Duration" not in log
        assert "init type provisioned-concurrency" in log
        # provisioned environments outlive the idle timeout (1 s; the autoscaler runs every 0.1 s)
        time.sleep(2)
        assert gateway.agent_pids("warm") == pids
        assert gateway.environments("warm")["idle"] == 2


def test_an_environment_that_dies_is_replaced(tmp_path: Path) -> None:
    write_function(tmp_path, "fragile", {"app.py": SLEEPER}, timeoutSeconds=30)
    with running_gateway([tmp_path], tmp_path) as gateway:
        assert gateway.invoke("fragile")[0] == 200
        (idle_agent,) = gateway.agent_pids("fragile")
        os.kill(idle_agent, signal.SIGKILL)
        wait_for(lambda: gateway.environments("fragile")["idle"] == 0, what="the dead environment to be dropped")
        assert gateway.invoke("fragile")[0] == 200

        (busy_agent,) = gateway.agent_pids("fragile")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(gateway.invoke, "fragile", {"seconds": 20})
            wait_for(lambda: gateway.environments("fragile")["busy"] == 1, what="the invocation to start")
            os.kill(busy_agent, signal.SIGKILL)
            status, headers, body = pending.result(timeout=30)
        assert status == 500
        assert headers["x-amzn-ErrorType"] == "ServiceException"
        assert json.loads(body)["Type"] == "Service"
        wait_for(lambda: sum(gateway.environments("fragile").values()) == 0, what="no environment left")
        wait_for(lambda: not processes_in(gateway.state_dir), timeout=10, what="the orphaned runtime to end")
        assert gateway.invoke("fragile")[0] == 200
