"""Deployments on the test cluster behave as on any cluster: pods run with their own IPs, the
EndpointSlice follows readiness probes, and deleting a Deployment garbage-collects everything under it."""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path
from typing import Any

import pytest
from cluster_support import HTTP_ECHO, Cluster, wait_until


def echo_manifests(name: str, replicas: int, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    container: dict[str, Any] = {
        "name": "echo",
        "image": HTTP_ECHO,
        "ports": [{"containerPort": 8080, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [container], "terminationGracePeriodSeconds": 5},
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    ]


def pods(cluster: Cluster, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.get("pods", "-n", namespace, "-l", f"app={app}")["items"]
    return items


def slice_endpoints(cluster: Cluster, namespace: str, service: str) -> dict[str, bool]:
    """Endpoint address -> ready, over the Service's EndpointSlices."""
    slices = cluster.get("endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}")
    result = {}
    for item in slices["items"]:
        for endpoint in item.get("endpoints") or []:
            for address in endpoint["addresses"]:
                result[address] = bool(endpoint.get("conditions", {}).get("ready"))
    return result


def running_pods(cluster: Cluster, namespace: str, app: str, count: int) -> list[dict[str, Any]] | None:
    found = pods(cluster, namespace, app)
    if len(found) == count and all(p["status"].get("phase") == "Running" for p in found):
        return found
    return None


def test_deployment_of_three_runs_three_pods_with_own_ips(cluster: Cluster, namespace: str) -> None:
    cluster.apply(echo_manifests("echo", 3), namespace)
    cluster.kubectl("wait", "-n", namespace, "deployment/echo", "--for=condition=Available", "--timeout=90s")

    running = wait_until(lambda: running_pods(cluster, namespace, "echo", 3), 60, "3 running pods")
    ips = [p["status"]["podIP"] for p in running]
    assert len(set(ips)) == 3, ips
    for ip in ips:
        assert not ipaddress.ip_address(ip).is_loopback, ip

    def all_ready() -> dict[str, bool] | None:
        endpoints = slice_endpoints(cluster, namespace, "echo")
        return endpoints if sorted(endpoints) == sorted(ips) and all(endpoints.values()) else None

    wait_until(all_ready, 60, "3 ready endpoints in the EndpointSlice")

    for pod in running:
        name = pod["metadata"]["name"]
        answer = cluster.pod_http(namespace, name, 8080, "/")
        assert answer.status == 200
        assert answer.json()["pod"] == name


def test_failing_readiness_probe_keeps_the_endpoint_not_ready(cluster: Cluster, namespace: str) -> None:
    cluster.apply(echo_manifests("shy", 1, env={"ECHO_READY": "false"}), namespace)
    pod = wait_until(lambda: running_pods(cluster, namespace, "shy", 1), 60, "a running pod")[0]
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]

    def endpoint_ready() -> bool | None:
        return slice_endpoints(cluster, namespace, "shy").get(ip)

    wait_until(lambda: endpoint_ready() is False, 60, "the endpoint listed as not ready")
    status = cluster.get("pod", "-n", namespace, name)["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "False"
    assert status["containerStatuses"][0]["ready"] is False
    assert "running" in status["containerStatuses"][0]["state"]

    # The probe, not a timer, decides: passing makes the endpoint ready, failing again takes it out.
    assert cluster.pod_http(namespace, name, 8080, "/ready?ok=1", method="POST").status == 200
    wait_until(lambda: endpoint_ready() is True, 30, "the endpoint to become ready")
    assert cluster.pod_http(namespace, name, 8080, "/ready?ok=0", method="POST").status == 200
    wait_until(lambda: endpoint_ready() is False, 30, "the endpoint to become not ready again")


def test_deleting_a_deployment_removes_replicaset_pods_and_processes(cluster: Cluster, namespace: str) -> None:
    cluster.apply(echo_manifests("gone", 2), namespace)
    cluster.kubectl("wait", "-n", namespace, "deployment/gone", "--for=condition=Available", "--timeout=90s")
    before = pods(cluster, namespace, "gone")
    assert len(before) == 2
    assert len(cluster.get("replicasets", "-n", namespace, "-l", "app=gone")["items"]) == 1
    pids = [cluster.pod_http(namespace, p["metadata"]["name"], 8080, "/").json()["pid"] for p in before]
    ips = [p["status"]["podIP"] for p in before]

    cluster.kubectl("delete", "deployment", "gone", "-n", namespace)

    wait_until(lambda: not cluster.get("replicasets", "-n", namespace, "-l", "app=gone")["items"], 60, "no ReplicaSet")
    wait_until(lambda: not pods(cluster, namespace, "gone"), 60, "no pods")
    if cluster.local:
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), f"pod process {pid} still runs"
        for ip in ips:
            with socket.socket() as probe, pytest.raises(OSError) as error:
                probe.bind((ip, 0))  # the pod's address was released: no longer a local address
            assert error.value.errno == errno.EADDRNOTAVAIL
