"""Spare agents (``LAMBDALET_STANDBY_AGENTS=N``, default 1): the zygote keeps N agents forked ahead, each
serves one cold start as a full environment (Init Duration on its first invocation, none after) and is
replaced in the background; with none kept, the zygote forks an agent per cold start, and a burst of
concurrent invocations gets an environment each. A forked agent that dies is noticed (its exit comes from
the zygote) and replaced on demand, and no process is left once the gateway stops."""

from __future__ import annotations

import base64
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway_support import RunningGateway, process_tree, processes_in, running_gateway, wait_for, write_function
from test_gateway_faststart import PROBE, children, the_zygote, zygotes

SLEEPER = """
import os, time

def handler(event, context):
    time.sleep(event.get("seconds", 0))
    return {"agent": os.getppid()}
"""


def invoke(gateway: RunningGateway, name: str) -> tuple[dict[str, Any], str]:
    path = f"/2015-03-31/functions/{name}/invocations"
    status, headers, body = gateway.post(path, b"{}", {"X-Amz-Log-Type": "Tail"})
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result, base64.b64decode(headers["X-Amz-Log-Result"]).decode()


def test_spares_serve_cold_starts_and_are_replaced(tmp_path: Path) -> None:
    write_function(tmp_path, "first", {"app.py": PROBE}, environment={"variables": {"GREETING": "hello"}})
    write_function(tmp_path, "second", {"app.py": PROBE}, environment={"variables": {"GREETING": "again"}})
    with running_gateway([tmp_path], tmp_path, standby_agents=2) as gateway:
        zygote = the_zygote()
        wait_for(lambda: len(children(zygote)) == 2, what="two spare agents")
        spares = children(zygote)
        result, log = invoke(gateway, "first")
        assert result["env"]["GREETING"] == "hello"
        assert result["agent"] in spares
        assert "Init Duration" in log
        result, log = invoke(gateway, "first")
        assert "Init Duration" not in log

        result, _ = invoke(gateway, "second")
        assert result["env"]["GREETING"] == "again"
        assert result["agent"] in spares
        # two environments, and two new spares
        wait_for(lambda: len(children(zygote)) == 4, what="the spares to be replaced")
        assert len(children(zygote) - spares) == 2
    assert zygotes() == {}
    assert processes_in(tmp_path) == set()
    assert not process_tree(spares)


def test_without_spares_the_zygote_forks_per_cold_start(tmp_path: Path) -> None:
    write_function(tmp_path, "wide", {"app.py": SLEEPER}, timeoutSeconds=30)
    with running_gateway([tmp_path], tmp_path, standby_agents=0) as gateway:
        zygote = the_zygote()
        assert children(zygote) == set()
        # concurrent invocations get environments of their own, all forked
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: gateway.invoke("wide", {"seconds": 1.0}), range(3)))
        assert [status for status, _, _ in replies] == [200, 200, 200]
        agents = {json.loads(body)["agent"] for _, _, body in replies}
        assert len(agents) == 3
        assert agents == children(zygote)
        assert gateway.environments("wide")["idle"] == 3

        # an agent that dies is noticed (its exit comes from the zygote) and replaced on demand
        victim = agents.pop()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gateway.environments("wide")["idle"] == 2, what="the dead environment to be dropped")
        status, _, _ = gateway.invoke("wide", {"seconds": 0})
        assert status == 200
    assert processes_in(tmp_path) == set()
    assert zygotes() == {}
