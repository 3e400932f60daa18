"""Functions on Kubernetes end to end, through the chart's gateway with its Kubernetes backend:
`helm install` → a Function → Ready → boto3 through the gateway (its pod IP, the Service port) scales the
Deployment 0 → 1 and answers → idle for idleTimeoutSeconds: back to 0 replicas, the process gone → a
cold invoke works again → 20 concurrent invocations of `slow` (reservedConcurrency 10) run in exactly 10
pods with the other 10 throttled → the HTTP route → deleting the Function makes the next invoke a
ResourceNotFoundException."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest
import yaml
from chart_support import Release, example_functions, helm, install, wait_ready
from cluster_support import Cluster, http, wait_until

IDLE_TIMEOUT_S = 3
# helm install --wait, cold pods and a gateway restart on a shared 2-core machine: above the 120 s default.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    installed = install(cluster, "gateway.queueTimeoutSeconds=90")
    yield installed
    helm(cluster, "uninstall", installed.name, "--namespace", installed.namespace, check=False)
    cluster.delete_namespace(installed.functions)
    cluster.delete_namespace(installed.namespace)


def gateway_port(cluster: Cluster, release: Release) -> int:
    [service] = cluster.get("service", "-n", release.namespace, "-l", "app.kubernetes.io/component=gateway")["items"]
    return int(service["spec"]["ports"][0]["port"])


def ready_gateway_pod(cluster: Cluster, release: Release, other_than: str = "") -> str:
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=gateway"

    def ready() -> str | None:
        for pod in cluster.get("pods", "-n", release.namespace, "-l", selector)["items"]:
            statuses = pod["status"].get("containerStatuses") or []
            if pod["metadata"]["name"] != other_than and statuses and all(s["ready"] for s in statuses):
                return str(pod["metadata"]["name"])
        return None

    return wait_until(ready, 90, "a ready gateway pod")


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, release: Release) -> Iterator[str]:
    """The gateway's URL: its pod IP and the Service's port (a port-forward on an existing cluster)."""
    pod = ready_gateway_pod(cluster, release)
    with cluster.pod_address(release.namespace, pod, gateway_port(cluster, release)) as (host, port):
        yield f"http://{host}:{port}"


def lambda_client(gateway: str) -> Any:
    config = botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=120, max_pool_connections=32)
    return boto3.client(
        "lambda",
        endpoint_url=gateway,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=config,
    )


def example(name: str, **spec: Any) -> dict[str, Any]:
    """examples/<name>/function.yaml with its code inline (a cluster cannot read code.path)."""
    [document] = [doc for folder, doc in example_functions() if folder == name]
    document["spec"].update(spec)
    return document


def kubectl_apply(cluster: Cluster, namespace: str, document: dict[str, Any], tmp: Any) -> None:
    path = tmp / f"{document['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(document))
    cluster.kubectl("apply", "-n", namespace, "-f", str(path))


def replicas(cluster: Cluster, namespace: str, name: str) -> int:
    return int(cluster.get("deployment", "-n", namespace, name)["spec"].get("replicas") or 0)


def function_pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get("pods", "-n", namespace, "-l", f"lambdalet.dev/function={name}")["items"]
    return items


def invoke(client: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    response = client.invoke(FunctionName=name, Payload=json.dumps(event).encode())
    assert response["StatusCode"] == 200 and "FunctionError" not in response, response
    result: dict[str, Any] = json.loads(response["Payload"].read())
    return result


def served(client: Any, name: str) -> bool | None:
    """Whether the gateway knows the function yet (it learns of Functions by watching them)."""
    try:
        client.get_function(FunctionName=name)
    except client.exceptions.ResourceNotFoundException:
        return None
    return True


def agent_process(cluster: Cluster, namespace: str, pod: str) -> tuple[int, str]:
    """(pid, start time) of the pod's function container, as the node stand-in recorded it."""
    record = json.loads((cluster.pods_dir / f"{namespace}_{pod}" / "function.pid.json").read_text())
    return int(record["pid"]), str(record["start"])


def running(pid: int, start: str) -> bool:
    """Whether that very process still lives (a reused pid has another start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and fields[19] == start


def test_hello_scales_from_zero_to_zero_and_back(
    cluster: Cluster, release: Release, gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    namespace = release.functions
    kubectl_apply(cluster, namespace, example("hello", idleTimeoutSeconds=IDLE_TIMEOUT_S), tmp_path_factory.mktemp("m"))
    wait_ready(cluster, namespace, "hello")
    assert replicas(cluster, namespace, "hello") == 0
    assert function_pods(cluster, namespace, "hello") == []
    client = lambda_client(gateway)

    # The gateway learns about the Function by its watch; until then hello is unknown to it.
    def first() -> dict[str, Any] | None:
        try:
            return invoke(client, "hello", {"name": "kube"})
        except client.exceptions.ResourceNotFoundException:
            return None

    assert wait_until(first, 60, "the first invocation of hello") == {"message": "Hello, kube!"}
    assert replicas(cluster, namespace, "hello") == 1
    [pod] = function_pods(cluster, namespace, "hello")
    process = agent_process(cluster, namespace, pod["metadata"]["name"]) if cluster.local else None
    assert process is None or running(*process)
    assert "greeting kube" in cluster.pod_log(namespace, pod["metadata"]["name"], "function")

    # Idle for idleTimeoutSeconds: the gateway deletes the pod and scales the Deployment to zero.
    wait_until(lambda: replicas(cluster, namespace, "hello") == 0, 30, "hello to scale to zero")
    wait_until(lambda: function_pods(cluster, namespace, "hello") == [], 30, "hello's pod to be gone")
    if process is not None:
        wait_until(lambda: not running(*process), 30, "the agent process to exit")

    # Cold again: a new pod, the same answer.
    assert invoke(client, "hello", {"name": "again"}) == {"message": "Hello, again!"}
    [second] = function_pods(cluster, namespace, "hello")
    assert second["metadata"]["name"] != pod["metadata"]["name"]
    assert replicas(cluster, namespace, "hello") == 1


def test_concurrency_scales_out_to_reserved_concurrency_and_throttles_the_rest(
    cluster: Cluster, release: Release, gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    namespace = release.functions
    document = example("slow")
    reserved = document["spec"]["reservedConcurrency"]
    kubectl_apply(cluster, namespace, document, tmp_path_factory.mktemp("m"))
    wait_ready(cluster, namespace, "slow")
    client = lambda_client(gateway)
    wait_until(lambda: served(client, "slow"), 60, "the gateway to serve slow")
    assert replicas(cluster, namespace, "slow") == 0

    def call(_: int) -> str:
        try:
            result = invoke(client, "slow", {"seconds": 3})
        except client.exceptions.TooManyRequestsException:
            return "throttled"
        assert result["slept"] == 3
        return "ok"

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(call, range(20)))
    assert outcomes.count("ok") == reserved and outcomes.count("throttled") == 20 - reserved
    assert replicas(cluster, namespace, "slow") == reserved
    # From the function's side: each admitted invocation ran in its own environment, one per pod.
    pods = function_pods(cluster, namespace, "slow")
    assert len(pods) == reserved
    starts = [cluster.pod_log(namespace, p["metadata"]["name"], "function").count("START RequestId") for p in pods]
    assert starts == [1] * reserved


def test_http_route_through_the_gateway(
    cluster: Cluster, release: Release, gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    namespace = release.functions
    kubectl_apply(cluster, namespace, example("http-echo"), tmp_path_factory.mktemp("m"))
    wait_ready(cluster, namespace, "http-echo")

    def answer() -> Any:
        result = http("GET", f"{gateway}/fn/http-echo/items/42?color=blue", timeout=60)
        return result if result.status == 200 else None

    event = wait_until(answer, 60, "the HTTP route of http-echo").json()["event"]
    assert event["version"] == "2.0"
    assert event["rawPath"] == "/items/42" and event["queryStringParameters"] == {"color": "blue"}
    assert event["requestContext"]["http"]["method"] == "GET"


def test_new_code_is_served_after_an_update(
    cluster: Cluster, release: Release, gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    namespace = release.functions
    document = example("hello", idleTimeoutSeconds=60)
    document["metadata"]["name"] = "updated"
    folder = tmp_path_factory.mktemp("m")
    kubectl_apply(cluster, namespace, document, folder)
    wait_ready(cluster, namespace, "updated")
    client = lambda_client(gateway)
    wait_until(lambda: served(client, "updated"), 60, "the gateway to serve updated")
    assert invoke(client, "updated", {"name": "v1"}) == {"message": "Hello, v1!"}
    code = "def handler(event, context):\n    return {'version': 2}\n"
    document["spec"]["code"] = {"inline": {"files": {"app.py": code}}}
    kubectl_apply(cluster, namespace, document, folder)

    def second_version() -> bool:
        return invoke(client, "updated", {}) == {"version": 2}

    wait_until(second_version, 60, "the new code to answer")
    # The rollout settles on one pod of the new template, and only new code answers from then on.
    wait_until(lambda: len(function_pods(cluster, namespace, "updated")) == 1, 60, "one pod left")
    assert all(invoke(client, "updated", {}) == {"version": 2} for _ in range(3))


def test_deleted_function_is_not_found(
    cluster: Cluster, release: Release, gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    namespace = release.functions
    kubectl_apply(cluster, namespace, example("hello", idleTimeoutSeconds=IDLE_TIMEOUT_S), tmp_path_factory.mktemp("m"))
    wait_ready(cluster, namespace, "hello")
    client = lambda_client(gateway)
    wait_until(lambda: served(client, "hello"), 60, "the gateway to serve hello")
    assert invoke(client, "hello", {})["message"] == "Hello, world!"
    cluster.kubectl("delete", "function", "-n", namespace, "hello")

    def not_found() -> str | None:
        try:
            invoke(client, "hello", {})
        except client.exceptions.ResourceNotFoundException as error:
            return str(error)
        return None

    message = wait_until(not_found, 30, "invoking the deleted hello to be ResourceNotFoundException")
    assert "hello" in message


def test_provisioned_pods_stay_warm_and_are_adopted_by_a_restarted_gateway(
    cluster: Cluster, release: Release, gateway: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    namespace = release.functions
    document = example("hello", provisionedConcurrency=2, idleTimeoutSeconds=IDLE_TIMEOUT_S)
    document["metadata"]["name"] = "warm"
    kubectl_apply(cluster, namespace, document, tmp_path_factory.mktemp("m"))
    wait_ready(cluster, namespace, "warm")

    def ready_pods() -> list[str] | None:
        pods = function_pods(cluster, namespace, "warm")
        ready = [
            p["metadata"]["name"]
            for p in pods
            if all(s["ready"] for s in p["status"].get("containerStatuses") or [{"ready": False}])
        ]
        return sorted(ready) if len(ready) == 2 and len(pods) == 2 else None

    warm = wait_until(ready_pods, 60, "two ready provisioned pods")
    client = lambda_client(gateway)
    wait_until(lambda: served(client, "warm"), 60, "the gateway to serve warm")
    assert invoke(client, "warm", {"name": "warm"}) == {"message": "Hello, warm!"}
    time.sleep(IDLE_TIMEOUT_S + 2)  # longer than the idle timeout: provisioned pods are not retired
    assert replicas(cluster, namespace, "warm") == 2 and ready_pods() == warm

    # A new gateway pod adopts the running pods: no scaling, no new pods.
    old = ready_gateway_pod(cluster, release)
    cluster.kubectl("delete", "pod", "-n", release.namespace, old, "--wait=false")
    new = ready_gateway_pod(cluster, release, other_than=old)
    with cluster.pod_address(release.namespace, new, gateway_port(cluster, release)) as (host, port):
        restarted = lambda_client(f"http://{host}:{port}")
        assert invoke(restarted, "warm", {"name": "again"}) == {"message": "Hello, again!"}
    assert replicas(cluster, namespace, "warm") == 2 and ready_pods() == warm
