"""The chart's NATS JetStream for asynchronous invocation (``nats.enabled``): nothing by default; when
enabled, a broker with JetStream file storage on a volume claim (or an emptyDir), its Service, and objects
the real API server accepts (server-side dry run)."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml
from chart_support import CHART, helm_path
from cluster_support import Cluster


def render(*sets: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [helm_path(), "template", "t", str(CHART), *(arg for value in sets for arg in ("--set", value))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def nats_objects(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        doc["kind"]: doc
        for doc in documents
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "nats"
    }


def test_no_broker_unless_enabled() -> None:
    assert nats_objects(render()) == {}


def test_enabled_broker_runs_jetstream_on_a_volume_claim() -> None:
    objects = nats_objects(render("nats.enabled=true"))
    assert set(objects) == {"Service", "StatefulSet"}
    service, statefulset = objects["Service"], objects["StatefulSet"]
    assert service["metadata"]["name"] == "t-lambdalet-nats"
    assert service["spec"]["ports"][0]["port"] == 4222
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "-js" in args
    assert args[args.index("-sd") + 1] == "/data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert container["securityContext"]["runAsNonRoot"] is True


def test_broker_without_persistence_uses_an_empty_dir() -> None:
    objects = nats_objects(render("nats.enabled=true", "nats.persistence.enabled=false", "nats.image=nats:2.10.22"))
    statefulset = objects["StatefulSet"]
    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert statefulset["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == "nats:2.10.22"


def test_the_api_server_accepts_the_broker_objects(cluster: Cluster, namespace: str) -> None:
    objects = list(nats_objects(render("nats.enabled=true")).values())
    for obj in objects:
        obj["metadata"]["namespace"] = namespace
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))
    assert "statefulset.apps/t-lambdalet-nats created (server dry run)" in result.stdout
    assert "service/t-lambdalet-nats created (server dry run)" in result.stdout
