"""Services from inside pods: a Service's names (short, name.namespace, ...svc.cluster.local) resolve and
its port is answered by its ready pods, as with cluster DNS and kube-proxy (on the local cluster: the node
stand-in's hosts files and userspace proxy)."""

from __future__ import annotations

import functools
import json
from typing import Any

from cluster_support import HTTP_ECHO, Cluster, http, wait_until


def echo_pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "echo",
                    "image": HTTP_ECHO,
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
                }
            ],
        },
    }


def test_pods_reach_a_service_by_name_and_every_ready_pod_answers(cluster: Cluster, namespace: str) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]},
    }
    cluster.apply(
        [
            service,
            echo_pod("backend-1", {"app": "backend"}),
            echo_pod("backend-2", {"app": "backend"}),
            echo_pod("client", {}),
        ],
        namespace,
    )
    for pod in ("backend-1", "backend-2", "client"):
        cluster.kubectl("wait", "-n", namespace, f"pod/{pod}", "--for=condition=Ready", "--timeout=60s")

    def both_endpoints_ready() -> bool:
        slices = cluster.get("endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=backend")
        ready = [e for s in slices["items"] for e in s.get("endpoints") or [] if e["conditions"].get("ready")]
        return len(ready) == 2

    wait_until(both_endpoints_ready, 60, "2 ready endpoints")

    def fetch(url: str) -> dict[str, Any] | None:
        answer = cluster.pod_http(namespace, "client", 8080, f"/fetch?url={url}")
        result: dict[str, Any] = answer.json()
        return result if answer.status == 200 else None

    names = [f"backend.{namespace}.svc.cluster.local", f"backend.{namespace}.svc", f"backend.{namespace}", "backend"]
    answered = set()
    for name in names * 2:
        url = f"http://{name}/"
        result = wait_until(functools.partial(fetch, url), 30, f"an answer from {url}")
        assert result["status"] == 200
        answered.add(json.loads(result["body"])["pod"])
    assert answered <= {"backend-1", "backend-2"}
    if cluster.local:
        assert answered == {"backend-1", "backend-2"}  # round-robin over the ready endpoints
        cluster_ip = cluster.get("service", "-n", namespace, "backend")["spec"]["clusterIP"]
        assert http("GET", f"http://{cluster_ip}:80/").json()["pod"] in {"backend-1", "backend-2"}

    # A pod that is not ready gets no traffic.
    assert cluster.pod_http(namespace, "backend-2", 8080, "/ready?ok=0", method="POST").status == 200
    wait_until(lambda: not both_endpoints_ready(), 30, "backend-2 out of the EndpointSlice")
    for _ in range(4):
        only = fetch("http://backend/")
        assert only is not None
        assert json.loads(only["body"])["pod"] == "backend-1"


def test_pods_reach_the_api_server_through_the_kubernetes_service(cluster: Cluster, namespace: str) -> None:
    cluster.apply([echo_pod("client", {})], namespace)
    cluster.kubectl("wait", "-n", namespace, "pod/client", "--for=condition=Ready", "--timeout=60s")

    answer = cluster.pod_http(namespace, "client", 8080, "/fetch?url=https://kubernetes.default.svc/healthz")

    # The pod does not trust the cluster CA by default, so TLS verification fails: that is an answer from
    # the API server (a certificate), not a name or connection error.
    body = answer.json()
    assert answer.status == 502
    assert "CERTIFICATE_VERIFY_FAILED" in body["error"], body
