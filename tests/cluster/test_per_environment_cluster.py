"""``perEnvironmentConcurrency`` on Kubernetes, through the chart's gateway: a Function with
``perEnvironmentConcurrency: 4`` and ``reservedConcurrency: 4`` gets five concurrent invocations from
zero; four run in ONE pod — proven by the handler, which waits (bounded) until four invocations are inside
its pod's ``/tmp`` together and fails otherwise — and the fifth is throttled."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import test_e2e_scale_from_zero as e2e
from chart_support import Release, wait_ready
from cluster_support import Cluster, wait_until
from test_e2e_scale_from_zero import function_pods, kubectl_apply, lambda_client, replicas, served

# the chart installed once for this module, and its gateway's URL
release = e2e.release
gateway = e2e.gateway

pytestmark = pytest.mark.timeout(300)

BARRIER = """
import os, time

def handler(event, context):
    arrived = "/tmp/arrived"
    os.makedirs(arrived, exist_ok=True)
    open(os.path.join(arrived, context.aws_request_id), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(arrived)) < 4:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(os.listdir(arrived))} of 4 arrived in this pod")
        time.sleep(0.02)
    return {"together": len(os.listdir(arrived)), "pid": os.getpid()}
"""


def test_four_invocations_share_one_pod_and_the_fifth_is_throttled(
    cluster: Cluster, release: Release, gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    namespace = release.functions
    document = {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": "gather"},
        "spec": {
            "runtime": "python3.12",
            "handler": "app.handler",
            "code": {"inline": {"files": {"app.py": BARRIER}}},
            "timeoutSeconds": 90,
            "perEnvironmentConcurrency": 4,
            "reservedConcurrency": 4,
        },
    }
    kubectl_apply(cluster, namespace, document, tmp_path_factory.mktemp("m"))
    wait_ready(cluster, namespace, "gather")
    client = lambda_client(gateway)
    wait_until(lambda: served(client, "gather"), 60, "the gateway to serve gather")
    assert replicas(cluster, namespace, "gather") == 0

    def call(_: int) -> dict[str, Any] | str:
        try:
            response = client.invoke(FunctionName="gather", Payload=b"{}")
        except client.exceptions.TooManyRequestsException:
            return "throttled"
        payload: dict[str, Any] = json.loads(response["Payload"].read())
        assert "FunctionError" not in response, payload
        return payload

    with ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(call, range(5)))
    assert outcomes.count("throttled") == 1, outcomes
    results = [o for o in outcomes if isinstance(o, dict)]
    assert len(results) == 4 and all(r["together"] == 4 for r in results)
    assert len({r["pid"] for r in results}) == 4  # four runtime workers of one agent
    assert replicas(cluster, namespace, "gather") == 1
    [pod] = function_pods(cluster, namespace, "gather")
    assert cluster.pod_log(namespace, pod["metadata"]["name"], "function").count("START RequestId") == 4
