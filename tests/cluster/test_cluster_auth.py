"""Authentication and RBAC on the test cluster: ServiceAccount tokens are real, RBAC denies what no Role
grants, and a pod reaches the API server as its own ServiceAccount through the mounted token."""

from __future__ import annotations

import json
import ssl
import tempfile
import urllib.error
import urllib.request
from typing import Any

from cluster_support import HTTP_ECHO, Cluster


def api_call(
    cluster: Cluster, token: str, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    server, ca = cluster.server()
    with tempfile.NamedTemporaryFile("w", suffix=".crt") as ca_file:
        ca_file.write(ca)
        ca_file.flush()
        context = ssl.create_default_context(cafile=ca_file.name)
    request = urllib.request.Request(
        server + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_service_account_without_rights_is_forbidden(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    token = cluster.kubectl("create", "token", "nobody", "-n", namespace).stdout.strip()

    status, review = api_call(
        cluster,
        token,
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert status == 201
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:nobody"

    status, body = api_call(cluster, token, "GET", f"/api/v1/namespaces/{namespace}/pods")
    assert status == 403
    assert body["reason"] == "Forbidden"
    assert f"system:serviceaccount:{namespace}:nobody" in body["message"]

    status, _ = api_call(cluster, "not-a-token", "GET", f"/api/v1/namespaces/{namespace}/pods")
    assert status == 401


def test_pod_reaches_the_api_server_as_its_service_account(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    cluster.kubectl(
        "create", "rolebinding", "reader", "--role=pod-reader", f"--serviceaccount={namespace}:reader", "-n", namespace
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "asker"},
        "spec": {
            "serviceAccountName": "reader",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "echo",
                    "image": HTTP_ECHO,
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
                }
            ],
        },
    }
    cluster.apply([pod], namespace)
    cluster.kubectl("wait", "-n", namespace, "pod/asker", "--for=condition=Ready", "--timeout=60s")

    answer = cluster.pod_http(namespace, "asker", 8080, "/whoami")

    assert answer.status == 200, answer.body
    who = answer.json()
    assert who["username"] == f"system:serviceaccount:{namespace}:reader"
    assert f"system:serviceaccounts:{namespace}" in who["groups"]
    assert who["namespace"] == namespace
