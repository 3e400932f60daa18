"""`code.image` Functions on a real API server: the user's image (here AWS's own Python Runtime Interface
Client, `lambdalet.test/python-ric`) runs its own entrypoint beside the agent sidecar in external-runtime
mode; invocations through the pod's agent return the handler's result, and a timeout or a crash replaces
the runtime's process (the agent kills it, the kubelet restarts the container) before the next one."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from chart_support import Release, operator, wait_ready
from cluster_support import Cluster, wait_until

__all__ = ["operator"]  # the module-scoped release: the chart with the gateway scaled to none

IMAGE = "lambdalet.test/python-ric:latest"
NAME = "ric"
TIMEOUT_S = 2


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: Any


def image_function() -> dict[str, Any]:
    return {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": NAME},
        "spec": {
            "code": {"image": IMAGE},
            "handler": "app.handler",
            "memoryMB": 256,
            "timeoutSeconds": TIMEOUT_S,
            "provisionedConcurrency": 1,
        },
    }


def call(url: str, method: str = "GET", payload: Any = None, timeout: float = 30) -> Result:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, headers, body = error.code, dict(error.headers), error.read()
    return Result(status, headers, json.loads(body) if body.startswith((b"{", b"[")) else body.decode())


class Pod:
    def __init__(self, cluster: Cluster, namespace: str, name: str, base: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.name = name
        self.base = base

    def invoke(self, payload: Any) -> Result:
        return call(f"{self.base}/2015-03-31/functions/function/invocations", "POST", payload)

    def wait_ready(self) -> None:
        """The agent's own readiness: a runtime waits at /next (503 from the reset until then)."""
        wait_until(lambda: call(f"{self.base}/readyz").status == 200, 60, f"the agent of {self.name} to be ready")

    def restarts(self) -> int:
        pod = self.cluster.get("pod", "-n", self.namespace, self.name)
        [runtime] = [c for c in pod["status"]["containerStatuses"] if c["name"] == "function"]
        return int(runtime["restartCount"])


@pytest.fixture(scope="module")
def pod(cluster: Cluster, operator: Release) -> Iterator[Pod]:
    ns = operator.functions
    started = time.monotonic()
    cluster.apply([image_function()], ns)
    wait_ready(cluster, ns, NAME, timeout=90)
    print(f"kubectl apply (code.image) -> Ready: {time.monotonic() - started:.2f} s")
    pods = cluster.get("pods", "-n", ns, "-l", f"lambdalet.dev/function={NAME}")["items"]
    [name] = [p["metadata"]["name"] for p in pods]
    with cluster.pod_address(ns, name, 8080) as (host, port):
        yield Pod(cluster, ns, name, f"http://{host}:{port}")


def test_the_image_runs_its_own_entrypoint_beside_the_agent(cluster: Cluster, pod: Pod) -> None:
    spec = cluster.get("pod", "-n", pod.namespace, pod.name)["spec"]
    assert spec["shareProcessNamespace"] is True
    containers = {c["name"]: c for c in spec["containers"]}
    assert containers["function"]["image"] == IMAGE and "command" not in containers["function"]
    assert containers["agent"]["args"][0] == "--external-runtime"
    first = pod.invoke({"name": "kubernetes"})
    assert first.status == 200, first.body
    assert first.body["hello"] == "kubernetes"
    assert first.body["function"] == NAME
    assert int(first.body["memory"]) == 256  # awslambdaric gives memory_limit_in_mb as a string
    assert first.body["handler"] == "app.handler"
    second = pod.invoke({"name": "again"})
    assert second.body["hello"] == "again" and second.body["pid"] == first.body["pid"]  # the same warm runtime


def test_a_timeout_replaces_the_runtime_process(pod: Pod) -> None:
    pod.wait_ready()
    before = pod.invoke({"name": "before"}).body["pid"]
    restarts = pod.restarts()
    timed_out = pod.invoke({"action": "sleep", "seconds": 60})
    assert timed_out.body["errorType"] == "Sandbox.Timedout"
    assert timed_out.headers["X-Lambdalet-Reset"] == "1"
    reset_at = time.monotonic()
    pod.wait_ready()
    back_after = time.monotonic() - reset_at
    after = pod.invoke({"name": "after"})
    assert after.status == 200 and after.body["hello"] == "after"
    assert after.body["pid"] != before
    init_ms = float(after.headers["X-Lambdalet-Init-Duration-Ms"])  # a new init after the reset
    print(f"timeout reset -> agent ready again: {back_after:.2f} s (Init Duration {init_ms:.0f} ms)")
    # The kubelet restarted the container (its status may be published a moment later).
    wait_until(lambda: pod.restarts() > restarts, 30, "the function container's restartCount to grow")


def test_a_crash_is_reported_and_the_next_invocation_succeeds(pod: Pod) -> None:
    pod.wait_ready()
    before = pod.invoke({"name": "before"}).body["pid"]
    crashed = pod.invoke({"action": "crash"})
    assert crashed.body["errorType"] == "Runtime.ExitError"
    assert crashed.headers["X-Lambdalet-Reset"] == "1"
    pod.wait_ready()
    after = pod.invoke({"name": "after"})
    assert after.status == 200 and after.body["hello"] == "after"
    assert after.body["pid"] != before
