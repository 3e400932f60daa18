"""Single pods on the test cluster: environment and volumes as a container sees them, probes, restarts,
termination, and what an image the node cannot run looks like."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

from cluster_support import HTTP_ECHO, Cluster, wait_until


def pod_manifest(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"test": name}},
        "spec": {"containers": containers, "terminationGracePeriodSeconds": 5, **spec},
    }


def pod_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = cluster.get("pod", "-n", namespace, name).get("status", {})
    return status


def wait_running(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("wait", "-n", namespace, f"pod/{name}", "--for=jsonpath={.status.phase}=Running", "--timeout=60s")


def wait_ready(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("wait", "-n", namespace, f"pod/{name}", "--for=condition=Ready", "--timeout=60s")


def test_container_sees_env_and_volumes(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "settings"},
                "data": {"greeting": "hello", "MODE": "fast", "app.conf": "level=3\n"},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "creds"},
                "stringData": {"password": "s3cret"},
            },
            pod_manifest(
                "envy",
                [
                    {
                        "name": "echo",
                        "image": HTTP_ECHO,
                        "workingDir": "/scratch/work",
                        "env": [
                            {
                                "name": "GREETING",
                                "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}},
                            },
                            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                            {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                            {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "MY_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "MESSAGE", "value": "$(GREETING), $(MY_NAME)"},
                            {
                                "name": "MEMORY_MB",
                                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
                            },
                        ],
                        "resources": {"limits": {"memory": "256Mi"}},
                        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                        "volumeMounts": [
                            {"name": "config", "mountPath": "/etc/envy"},
                            {"name": "secret", "mountPath": "/etc/envy-secret", "readOnly": True},
                            {"name": "scratch", "mountPath": "/scratch"},
                            {"name": "info", "mountPath": "/etc/podinfo"},
                        ],
                    }
                ],
                initContainers=[
                    {
                        "name": "prepare",
                        "image": HTTP_ECHO,
                        "command": ["python", "-c", "open('/scratch/init.txt', 'w').write('from init')"],
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    }
                ],
                volumes=[
                    {
                        "name": "config",
                        "configMap": {"name": "settings", "items": [{"key": "app.conf", "path": "app.conf"}]},
                    },
                    {"name": "secret", "secret": {"secretName": "creds"}},
                    {"name": "scratch", "emptyDir": {}},
                    {
                        "name": "info",
                        "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
                    },
                ],
            ),
        ],
        namespace,
    )
    wait_ready(cluster, namespace, "envy")
    ip = pod_status(cluster, namespace, "envy")["podIP"]

    def env(name: str) -> str | None:
        answer = cluster.pod_http(namespace, "envy", 8080, f"/env?name={name}")
        value: str | None = answer.json()["value"]
        return value

    assert env("GREETING") == "hello"
    assert env("PASSWORD") == "s3cret"
    assert env("MY_IP") == ip
    assert env("MY_NAME") == "envy"
    assert env("MY_NAMESPACE") == namespace
    assert env("MESSAGE") == "hello, envy"
    assert env("CFG_MODE") == "fast"
    assert env("LAMBDALET_BIND_ADDRESS") == ip
    assert env("KUBERNETES_SERVICE_HOST")
    assert env("MEMORY_MB") == "256"

    def file(path: str) -> tuple[int, bytes]:
        answer = cluster.pod_http(namespace, "envy", 8080, f"/file?path={path}")
        return answer.status, answer.body

    assert file("/etc/envy/app.conf") == (200, b"level=3\n")
    assert file("/etc/envy/greeting")[0] == 404  # only the listed item is projected
    assert file("/etc/envy-secret/password") == (200, b"s3cret")
    assert file("/var/run/secrets/kubernetes.io/serviceaccount/namespace") == (200, namespace.encode())
    assert file("/scratch/init.txt") == (200, b"from init")  # written by the init container
    assert file("/etc/podinfo/labels") == (200, b'test="envy"')
    init = pod_status(cluster, namespace, "envy")["initContainerStatuses"][0]
    assert init["state"]["terminated"]["exitCode"] == 0
    root = cluster.pod_http(namespace, "envy", 8080, "/").json()
    assert root["cwd"] == "/scratch/work"
    assert root["pod"] == "envy"


def test_unknown_image_is_reported_as_an_image_pull_error(cluster: Cluster, namespace: str) -> None:
    image = "registry.invalid/nobody/nothing:1.0"
    cluster.apply([pod_manifest("nowhere", [{"name": "main", "image": image}])], namespace)

    def waiting() -> dict[str, Any] | None:
        statuses = pod_status(cluster, namespace, "nowhere").get("containerStatuses") or []
        state: dict[str, Any] | None = statuses[0]["state"].get("waiting") if statuses else None
        return state if state and state.get("reason") in ("ErrImagePull", "ImagePullBackOff") else None

    state = wait_until(waiting, 60, "an image pull error")
    if cluster.local:
        assert state["reason"] == "ErrImagePull"
        assert image in state["message"]
    assert pod_status(cluster, namespace, "nowhere")["phase"] == "Pending"


def test_liveness_failure_restarts_the_container(cluster: Cluster, namespace: str) -> None:
    container = {
        "name": "echo",
        "image": HTTP_ECHO,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1, "failureThreshold": 1},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 1},
    }
    cluster.apply([pod_manifest("fragile", [container])], namespace)
    wait_ready(cluster, namespace, "fragile")
    first = cluster.pod_http(namespace, "fragile", 8080, "/").json()["pid"]

    assert cluster.pod_http(namespace, "fragile", 8080, "/healthz?ok=0", method="POST").status == 200

    def restarted() -> dict[str, Any] | None:
        status = pod_status(cluster, namespace, "fragile")["containerStatuses"][0]
        return status if status["restartCount"] >= 1 and status["ready"] else None

    status = wait_until(restarted, 90, "a restart after the liveness probe failed")
    assert "terminated" in status["lastState"]
    second = cluster.pod_http(namespace, "fragile", 8080, "/").json()["pid"]
    assert second != first


def test_exec_and_tcp_probes_decide_readiness_per_container(cluster: Cluster, namespace: str) -> None:
    token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    containers = [
        {
            "name": "good",
            "image": HTTP_ECHO,
            "env": [{"name": "PORT", "value": "8080"}],
            "readinessProbe": {"exec": {"command": ["test", "-s", token]}, "periodSeconds": 1},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        },
        {
            "name": "bad",
            "image": HTTP_ECHO,
            "env": [{"name": "PORT", "value": "8081"}],
            "readinessProbe": {"exec": {"command": ["test", "-e", "/nonexistent"]}, "periodSeconds": 1},
        },
    ]
    cluster.apply([pod_manifest("duo", containers)], namespace)

    def readiness() -> dict[str, bool] | None:
        statuses = pod_status(cluster, namespace, "duo").get("containerStatuses") or []
        if len(statuses) == 2 and all("running" in s["state"] for s in statuses) and any(s["ready"] for s in statuses):
            return {s["name"]: s["ready"] for s in statuses}
        return None

    assert wait_until(readiness, 60, "the good container ready") == {"good": True, "bad": False}
    conditions = {c["type"]: c["status"] for c in pod_status(cluster, namespace, "duo")["conditions"]}
    assert conditions["Ready"] == "False"
    assert conditions["ContainersReady"] == "False"

    # Both containers share the pod's address (a running container's server may still be binding: its
    # readiness here is an exec probe, not its port).
    def answers(port: int) -> bool | None:
        try:
            return cluster.pod_http(namespace, "duo", port, "/").status == 200 or None
        except urllib.error.URLError:
            return None

    assert wait_until(lambda: answers(8081), 30, "the bad container's server on the pod's address")
    assert wait_until(lambda: answers(8080), 30, "the good container's server on the pod's address")


def test_restart_policy_decides_the_final_phase(cluster: Cluster, namespace: str) -> None:
    def exiting(name: str, code: int, policy: str) -> dict[str, Any]:
        script = f"print('exiting with {code}', flush=True); raise SystemExit({code})"
        return pod_manifest(
            name,
            [{"name": "main", "image": HTTP_ECHO, "command": ["python", "-c", script]}],
            restartPolicy=policy,
        )

    cluster.apply([exiting("fails", 3, "Never"), exiting("succeeds", 0, "OnFailure")], namespace)
    cluster.kubectl("wait", "-n", namespace, "pod/fails", "--for=jsonpath={.status.phase}=Failed", "--timeout=60s")
    cluster.kubectl(
        "wait", "-n", namespace, "pod/succeeds", "--for=jsonpath={.status.phase}=Succeeded", "--timeout=60s"
    )
    terminated = pod_status(cluster, namespace, "fails")["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert pod_status(cluster, namespace, "succeeds")["containerStatuses"][0]["restartCount"] == 0
    assert "exiting with 3" in cluster.pod_log(namespace, "fails", "main")


def test_deletion_kills_a_process_that_ignores_sigterm_after_the_grace_period(cluster: Cluster, namespace: str) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('SIGTERM ignored', flush=True))\n"
        "print('started', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    manifest = pod_manifest(
        "stubborn",
        [{"name": "main", "image": HTTP_ECHO, "command": ["python", "-c", script]}],
        terminationGracePeriodSeconds=2,
    )
    cluster.apply([manifest], namespace)
    wait_running(cluster, namespace, "stubborn")
    container_id = pod_status(cluster, namespace, "stubborn")["containerStatuses"][0].get("containerID", "")

    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=true", "--timeout=60s")

    assert "SIGTERM ignored" in cluster.pod_log(namespace, "stubborn", "main")
    if cluster.local:
        pid = int(container_id.rsplit("/", 1)[1])
        assert not Path(f"/proc/{pid}").exists()
