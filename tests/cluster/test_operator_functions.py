"""The operator, installed by the chart and running as its ServiceAccount, on a real API server:
Functions (the examples and our own) become Ready with owned, restricted children; the API server
refuses invalid specs naming the field; code updates replace the pods; replicas belong to the
autoscaler; problems only the operator can see land in status; deleting a Function collects its
children."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
from chart_support import (
    Release,
    example_functions,
    function_manifest,
    operator,
    operator_log,
    wait_ready,
    wait_reason,
)
from cluster_support import Cluster, wait_until

CHILD_KINDS = ("deployment", "service", "configmap", "serviceaccount")

__all__ = ["operator"]  # the module-scoped release: the chart with the gateway scaled to none


def invoke(cluster: Cluster, namespace: str, name: str, payload: str) -> Any:
    """POST to the function's (only) ready pod, as the gateway would."""

    def ready_pod() -> str | None:
        items = cluster.get("pods", "-n", namespace, "-l", f"lambdalet.dev/function={name}")["items"]
        ready = [
            p["metadata"]["name"]
            for p in items
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]
        return ready[0] if len(ready) == 1 and len(items) == 1 else None

    pod = wait_until(ready_pod, 60, f"exactly one ready pod of {name}")
    with cluster.pod_address(namespace, pod, 8080) as (host, port):
        request = urllib.request.Request(
            f"http://{host}:{port}/2015-03-31/functions/function/invocations", data=payload.encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.read().decode()


def test_a_function_becomes_ready_with_owned_restricted_children(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    files = {"app.py": "def handler(event, context):\n    return {'got': event, 'fn': context.function_name}\n"}
    started = time.monotonic()
    cluster.apply([function_manifest("greeter", files, provisionedConcurrency=1, memoryMB=256)], ns)
    fn = wait_ready(cluster, ns, "greeter", timeout=60)
    elapsed = time.monotonic() - started
    print(f"kubectl apply -> Ready (1 provisioned environment): {elapsed:.2f} s")
    uid = fn["metadata"]["uid"]
    status = fn["status"]
    assert status["readyInstances"] == 1 and status["desiredInstances"] == 1
    assert status["url"].endswith("/2015-03-31/functions/greeter/invocations")
    assert len(status["codeSha256"]) == 64
    for kind in CHILD_KINDS:
        name = "greeter-code" if kind == "configmap" else "greeter"
        child = cluster.get(kind, "-n", ns, name)
        owners = child["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"], o["uid"], o["controller"]) for o in owners] == [
            ("Function", "greeter", uid, True)
        ]
    [pod] = cluster.get("pods", "-n", ns, "-l", "lambdalet.dev/function=greeter")["items"]
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "greeter"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = spec["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"] == "256Mi"
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert '"got": {"x": 1}' in invoke(cluster, ns, "greeter", '{"x": 1}')


def test_pod_security_admission_restricted_accepts_function_pods(cluster: Cluster, operator: Release) -> None:
    """The namespace enforces the `restricted` Pod Security Standard: the ReplicaSet could not create a
    single pod otherwise."""
    ns = operator.functions
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted", "--overwrite")
    try:
        cluster.apply([function_manifest("strict", provisionedConcurrency=1)], ns)
        wait_ready(cluster, ns, "strict")
    finally:
        cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce-", "--overwrite")
        cluster.kubectl("delete", "function", "-n", ns, "strict", "--ignore-not-found")


EXAMPLES = example_functions()


@pytest.mark.parametrize(("example", "manifest"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_each_example_becomes_ready(
    cluster: Cluster, operator: Release, example: str, manifest: dict[str, Any]
) -> None:
    ns = operator.functions
    cluster.apply([manifest], ns)
    fn = wait_ready(cluster, ns, manifest["metadata"]["name"], timeout=30)
    assert fn["status"]["desiredInstances"] == 0  # scaled to zero until the gateway needs it
    cluster.kubectl("delete", "function", "-n", ns, manifest["metadata"]["name"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"memoryMB": 64}, "spec.memoryMB"),
        ({"timeoutSeconds": 0}, "spec.timeoutSeconds"),
        ({"code": {"inline": {"files": {"a.py": "x"}}, "image": "example.com/fn:1"}}, "spec.code"),
        ({"runtime": "cobol9"}, "spec.runtime"),
        ({"handler": None}, "spec.handler"),
        ({"reservedConcurrency": 1, "provisionedConcurrency": 2}, "spec.provisionedConcurrency"),
        ({"code": {"path": "./src"}}, "spec.code.path"),
    ],
    ids=["memory", "timeout", "two-code-sources", "unknown-runtime", "missing-handler", "provisioned", "path"],
)
def test_the_api_server_refuses_invalid_functions_naming_the_field(
    cluster: Cluster, operator: Release, change: dict[str, Any], field: str
) -> None:
    manifest = function_manifest("bad")
    manifest["spec"].update(change)
    manifest["spec"] = {k: v for k, v in manifest["spec"].items() if v is not None}
    result = cluster.kubectl("apply", "-n", operator.functions, "-f", "-", input=json.dumps(manifest), check=False)
    assert result.returncode != 0
    assert f"{field}:" in result.stderr, result.stderr


def test_a_code_update_replaces_the_pods(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    v1 = {"app.py": "def handler(event, context):\n    return 'v1'\n"}
    v2 = {"app.py": "def handler(event, context):\n    return 'v2'\n"}
    cluster.apply([function_manifest("rolling", v1, provisionedConcurrency=1)], ns)
    wait_ready(cluster, ns, "rolling")
    [old] = cluster.get("pods", "-n", ns, "-l", "lambdalet.dev/function=rolling")["items"]
    assert invoke(cluster, ns, "rolling", "{}") == '"v1"'
    cluster.apply([function_manifest("rolling", v2, provisionedConcurrency=1)], ns)

    def replaced() -> bool:
        pods = cluster.get("pods", "-n", ns, "-l", "lambdalet.dev/function=rolling")["items"]
        return [p["metadata"]["uid"] for p in pods] not in ([], [old["metadata"]["uid"]]) and all(
            p["metadata"]["uid"] != old["metadata"]["uid"] for p in pods
        )

    wait_until(replaced, 60, "the old pod to be replaced")
    wait_ready(cluster, ns, "rolling")
    assert invoke(cluster, ns, "rolling", "{}") == '"v2"'


def test_replicas_belong_to_the_autoscaler_after_creation(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    cluster.apply([function_manifest("scaled", provisionedConcurrency=1)], ns)
    wait_ready(cluster, ns, "scaled")
    cluster.kubectl("scale", "deployment", "-n", ns, "scaled", "--replicas=2")
    cluster.apply([function_manifest("scaled", provisionedConcurrency=1, timeoutSeconds=9)], ns)
    wait_ready(cluster, ns, "scaled")
    deployment = cluster.get("deployment", "-n", ns, "scaled")
    assert deployment["spec"]["replicas"] == 2
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_LAMBDA_FUNCTION_TIMEOUT"] == "9"

    def scaled_status() -> dict[str, Any] | None:
        status: dict[str, Any] = cluster.get("function", "-n", ns, "scaled").get("status") or {}
        return status if status.get("readyInstances") == 2 else None

    status = wait_until(scaled_status, 60, "readyInstances 2")
    assert status["desiredInstances"] == 2


def test_variables_and_secret_references_reach_the_handler(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    cluster.kubectl("create", "secret", "generic", "-n", ns, "db", "--from-literal=password=hunter2")
    cluster.kubectl("create", "secret", "generic", "-n", ns, "keys", "--from-literal=API_KEY=k-123")
    files = {
        "app.py": "import os\n"
        "def handler(event, context):\n"
        "    names = ('STAGE', 'DB_PASSWORD', 'API_KEY', 'AWS_LAMBDA_FUNCTION_MEMORY_SIZE', 'LAMBDA_TASK_ROOT')\n"
        "    return {k: os.environ.get(k) for k in names}\n"
    }
    environment = {
        "variables": {"STAGE": "prod"},
        "secretKeyRefs": [{"name": "DB_PASSWORD", "secretKeyRef": {"name": "db", "key": "password"}}],
        "envFrom": [{"secretRef": {"name": "keys"}}],
    }
    cluster.apply([function_manifest("envy", files, provisionedConcurrency=1, environment=environment)], ns)
    wait_ready(cluster, ns, "envy")
    assert json.loads(invoke(cluster, ns, "envy", "{}")) == {
        "STAGE": "prod",
        "DB_PASSWORD": "hunter2",
        "API_KEY": "k-123",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
        "LAMBDA_TASK_ROOT": "/var/task",
    }


def test_a_code_configmap_is_waited_for_and_its_changes_roll_the_pods(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    manifest = function_manifest("fromcm", provisionedConcurrency=1)
    manifest["spec"]["code"] = {"configMap": {"name": "fromcm-src"}}
    cluster.apply([manifest], ns)
    condition = wait_reason(cluster, ns, "fromcm", "CodeUnavailable")
    assert "'fromcm-src'" in condition["message"] and condition["status"] == "False"
    source = "def handler(event, context):\n    return '{}'\n"
    cluster.kubectl("create", "configmap", "-n", ns, "fromcm-src", f"--from-literal=app.py={source.format('one')}")
    first = wait_ready(cluster, ns, "fromcm", timeout=30)
    assert invoke(cluster, ns, "fromcm", "{}") == '"one"'
    patch = json.dumps({"data": {"app.py": source.format("two")}})
    cluster.kubectl("patch", "configmap", "-n", ns, "fromcm-src", "--type=merge", "-p", patch)

    def rolled() -> dict[str, Any] | None:
        fn: dict[str, Any] = cluster.get("function", "-n", ns, "fromcm")
        return fn if fn["status"].get("codeSha256") != first["status"]["codeSha256"] else None

    wait_until(rolled, 30, "the new ConfigMap content to reach the Function's status")
    wait_until(lambda: invoke(cluster, ns, "fromcm", "{}") == '"two"', 60, "the new code to answer")


def test_a_deployment_deleted_by_hand_comes_back(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    cluster.apply([function_manifest("phoenix", provisionedConcurrency=1)], ns)
    wait_ready(cluster, ns, "phoenix")
    old_uid = cluster.get("deployment", "-n", ns, "phoenix")["metadata"]["uid"]
    cluster.kubectl("delete", "deployment", "-n", ns, "phoenix", "--wait=true")

    def recreated() -> bool:
        found = cluster.kubectl("get", "deployment", "-n", ns, "phoenix", "-o", "json", check=False)
        return found.returncode == 0 and json.loads(found.stdout)["metadata"]["uid"] != old_uid

    wait_until(recreated, 30, "the operator to re-create the Deployment")
    assert cluster.get("deployment", "-n", ns, "phoenix")["spec"]["replicas"] == 1  # provisionedConcurrency
    wait_ready(cluster, ns, "phoenix")


def test_a_rule_only_the_operator_checks_is_shown_in_status(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    cluster.apply([function_manifest("escape", {"../outside.py": "x"})], ns)
    condition = wait_reason(cluster, ns, "escape", "InvalidSpec")
    assert "spec.code.inline.files" in condition["message"] and "relative path" in condition["message"]
    assert not cluster.get("deployments", "-n", ns, "-l", "lambdalet.dev/function=escape")["items"]


def test_deleting_a_function_garbage_collects_its_children(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    manifest = function_manifest("doomed", provisionedConcurrency=1, network={"egress": []})
    cluster.apply([manifest], ns)
    wait_ready(cluster, ns, "doomed")
    assert cluster.get("networkpolicy", "-n", ns, "doomed")["spec"]["policyTypes"] == ["Egress"]
    fn = cluster.get("function", "-n", ns, "doomed")
    assert not fn["metadata"].get("finalizers")  # deletion never waits for the operator
    cluster.kubectl("delete", "function", "-n", ns, "doomed", "--wait=true")
    selector = "lambdalet.dev/function=doomed"

    def collected() -> bool:
        kinds = "deployments,services,configmaps,serviceaccounts,networkpolicies,pods"
        return not cluster.get(kinds, "-n", ns, "-l", selector)["items"]

    wait_until(collected, 60, "the Function's children to be garbage-collected")
    assert "Traceback" not in operator_log(cluster, operator)
