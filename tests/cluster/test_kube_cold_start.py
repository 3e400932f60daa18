"""Cold starts through the chart's gateway use a new pod as soon as its agent answers ``GET /readyz``, not
when the kubelet's readiness probe passes and the EndpointSlice follows (as Knative's activator probes
new pods). Each function here has its Deployment's readinessProbe delayed by an hour, so the kubelet
cannot call the pod Ready during the test: an invocation that succeeds was served by a pod that is not
Ready, in its conditions and in its EndpointSlice, when the answer arrives. A pod whose agent never
answers is not used (the invocation fails as it always did: no environment within the queue timeout),
and a pod being deleted is never used even while its agent answers (a preStop ``sleep`` keeps it alive)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import pytest
from chart_support import Release, function_manifest, helm, install, wait_ready
from cluster_support import Cluster, http, wait_until

QUEUE_TIMEOUT_S = 20
#: Longer than any test: the kubelet never reports these pods Ready while a test looks.
READINESS_DELAY_S = 3600
pytestmark = pytest.mark.timeout(300)

HELLO = (
    "def handler(event, context):\n    print('greeting', event.get('name'))\n    return {'hello': event.get('name')}\n"
)


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    installed = install(cluster, f"gateway.queueTimeoutSeconds={QUEUE_TIMEOUT_S}")
    yield installed
    helm(cluster, "uninstall", installed.name, "--namespace", installed.namespace, check=False)
    cluster.delete_namespace(installed.functions)
    cluster.delete_namespace(installed.namespace)


@pytest.fixture(scope="module")
def client(cluster: Cluster, release: Release) -> Iterator[Any]:
    """boto3's Lambda client on the gateway pod (its IP and the Service's port; a port-forward elsewhere)."""
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=gateway"
    [pod] = cluster.get("pods", "-n", release.namespace, "-l", selector)["items"]
    [service] = cluster.get("service", "-n", release.namespace, "-l", "app.kubernetes.io/component=gateway")["items"]
    port = int(service["spec"]["ports"][0]["port"])
    config = botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=120)
    with cluster.pod_address(release.namespace, pod["metadata"]["name"], port) as (host, real_port):
        yield boto3.client(
            "lambda",
            endpoint_url=f"http://{host}:{real_port}",
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=config,
        )


def run_operator(cluster: Cluster, release: Release, run: bool) -> None:
    """Start or stop the chart's operator. It puts back a pod template changed by hand (it repairs drift),
    so it runs only while a Function is being created: these tests then patch its Deployment."""
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=operator"
    [deployment] = cluster.get("deployment", "-n", release.namespace, "-l", selector)["items"]
    replicas = 1 if run else 0
    name = deployment["metadata"]["name"]
    cluster.kubectl("scale", "deployment", "-n", release.namespace, name, f"--replicas={replicas}")

    def settled() -> bool:
        pods = cluster.get("pods", "-n", release.namespace, "-l", selector)["items"]
        return len(pods) == replicas and all(pod_ready(pod) for pod in pods)

    wait_until(settled, 90, f"the operator scaled to {replicas}")


def deploy(cluster: Cluster, release: Release, client: Any, name: str, *patches: dict[str, Any], **spec: Any) -> None:
    """A Function at zero replicas whose Deployment carries ``patches`` (strategic merge, on its one
    container ``function``) and a readiness probe delayed by READINESS_DELAY_S, served by the gateway."""
    files = spec.pop("files", {"app.py": HELLO})
    run_operator(cluster, release, True)
    cluster.apply([function_manifest(name, files, idleTimeoutSeconds=120, **spec)], release.functions)
    wait_ready(cluster, release.functions, name)
    run_operator(cluster, release, False)
    container: dict[str, Any] = {"name": "function", "readinessProbe": {"initialDelaySeconds": READINESS_DELAY_S}}
    for patch in patches:
        container |= patch
    body = {"spec": {"template": {"spec": {"containers": [container]}}}}
    cluster.kubectl("patch", "deployment", "-n", release.functions, name, "-p", json.dumps(body))
    template = cluster.get("deployment", "-n", release.functions, name)["spec"]["template"]
    [probe] = [c["readinessProbe"] for c in template["spec"]["containers"]]
    assert probe["initialDelaySeconds"] == READINESS_DELAY_S and probe["httpGet"]["path"] == "/readyz"

    def served() -> bool | None:
        try:
            client.get_function(FunctionName=name)
        except client.exceptions.ResourceNotFoundException:
            return None
        return True

    wait_until(served, 60, f"the gateway to serve {name}")
    assert cluster.get("deployment", "-n", release.functions, name)["spec"].get("replicas", 0) == 0


def pods_of(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get("pods", "-n", namespace, "-l", f"lambdalet.dev/function={name}")["items"]
    return items


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def endpoint_ready(cluster: Cluster, namespace: str, name: str, pod: str) -> bool | None:
    """The pod's `ready` in the function's EndpointSlices (None: not listed)."""
    slices = cluster.get("endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={name}")["items"]
    for item in slices:
        for entry in item.get("endpoints") or []:
            if (entry.get("targetRef") or {}).get("name") == pod:
                return bool((entry.get("conditions") or {}).get("ready"))
    return None


def invocations(cluster: Cluster, namespace: str, pod: str) -> int:
    return cluster.pod_log(namespace, pod, "function").count("START RequestId")


def test_a_cold_invocation_is_served_by_a_pod_the_kubelet_has_not_called_ready(
    cluster: Cluster, release: Release, client: Any
) -> None:
    namespace = release.functions
    deploy(cluster, release, client, "early")
    response = client.invoke(FunctionName="early", Payload=b'{"name": "early"}')
    # Read at once after the answer: the one pod that served it is not Ready, by any account.
    [pod] = pods_of(cluster, namespace, "early")
    name = pod["metadata"]["name"]
    assert not pod_ready(pod)
    assert endpoint_ready(cluster, namespace, "early", name) in (False, None)
    assert response["StatusCode"] == 200 and "FunctionError" not in response
    assert json.loads(response["Payload"].read()) == {"hello": "early"}
    assert "greeting early" in cluster.pod_log(namespace, name, "function")
    # Its next invocation is warm: the same pod, still not Ready.
    assert json.loads(client.invoke(FunctionName="early", Payload=b'{"name": "warm"}')["Payload"].read()) == {
        "hello": "warm"
    }
    [again] = pods_of(cluster, namespace, "early")
    assert again["metadata"]["name"] == name and not pod_ready(again) and invocations(cluster, namespace, name) == 2


def test_a_pod_whose_agent_never_answers_is_not_used(cluster: Cluster, release: Release, client: Any) -> None:
    namespace = release.functions
    # The agent listens on 8081; the pod's port `http` (8080), which the gateway and the kubelet ask, is closed.
    deploy(cluster, release, client, "deaf", {"env": [{"name": "LAMBDALET_AGENT_PORT", "value": "8081"}]})
    with pytest.raises(client.exceptions.ResourceNotReadyException) as failure:
        client.invoke(FunctionName="deaf", Payload=b"{}")
    assert f"no execution environment of deaf became ready within {QUEUE_TIMEOUT_S} seconds" in str(failure.value)
    [pod] = pods_of(cluster, namespace, "deaf")
    name = pod["metadata"]["name"]
    log = cluster.pod_log(namespace, name, "function")
    assert ":8081" in log and invocations(cluster, namespace, name) == 0  # alive, never invoked


def test_a_pod_being_deleted_is_never_used_even_while_its_agent_answers(
    cluster: Cluster, release: Release, client: Any
) -> None:
    namespace = release.functions
    slow_init = "import time\ntime.sleep(4)\n\n" + HELLO
    # A preStop sleep keeps a deleted pod's agent running (and initialising, then answering) for 30 s.
    deploy(
        cluster,
        release,
        client,
        "doomed",
        {"lifecycle": {"preStop": {"sleep": {"seconds": 30}}}},
        files={"app.py": slow_init},
        timeoutSeconds=30,
    )
    answer: dict[str, Any] = {}

    def invoke() -> None:
        response = client.invoke(FunctionName="doomed", Payload=b'{"name": "survivor"}')
        answer["status"] = response["StatusCode"]
        answer["payload"] = json.loads(response["Payload"].read())

    caller = threading.Thread(target=invoke)
    caller.start()

    def running_pod() -> dict[str, Any] | None:
        for pod in pods_of(cluster, namespace, "doomed"):
            statuses = pod["status"].get("containerStatuses") or []
            if pod["status"].get("podIP") and statuses and "running" in statuses[0]["state"]:
                return pod
        return None

    first = wait_until(running_pod, 60, "the first pod to run")["metadata"]["name"]
    cluster.kubectl("delete", "pod", "-n", namespace, first, "--wait=false")
    deleting = cluster.get("pod", "-n", namespace, first)
    assert deleting["metadata"].get("deletionTimestamp")

    # The deleted pod's agent finishes its init and answers /readyz while the pod is terminating.
    address = deleting["status"]["podIP"]

    def answers() -> bool | None:
        if not cluster.local:
            return True  # pods are reached through port-forward elsewhere, which refuses a terminating pod
        try:
            return http("GET", f"http://{address}:8080/readyz", timeout=2).status == 200 or None
        except OSError:
            return None

    wait_until(answers, 30, "the deleted pod's agent to answer /readyz")
    # ... before the invocation is answered: it looked usable while the invocation waited for a pod.
    looked_usable_while_waiting = caller.is_alive()
    caller.join(90)
    assert not caller.is_alive() and answer == {"status": 200, "payload": {"hello": "survivor"}}
    assert cluster.get("pod", "-n", namespace, first)["metadata"].get("deletionTimestamp")
    assert invocations(cluster, namespace, first) == 0
    others = [p["metadata"]["name"] for p in pods_of(cluster, namespace, "doomed") if p["metadata"]["name"] != first]
    [second] = others
    assert invocations(cluster, namespace, second) == 1
    assert looked_usable_while_waiting or not cluster.local
