"""The cluster's nodes: Ready, with capacity and a renewed Lease (on the local cluster: the node stand-in,
with this machine's capacity and the Kubernetes version the control plane was built at)."""

from __future__ import annotations

import datetime as dt
import json
import os

from cluster_support import NODE_NAME, Cluster, wait_until


def test_nodes_are_ready_with_capacity(cluster: Cluster) -> None:
    nodes = cluster.get("nodes")["items"]
    assert nodes
    for node in nodes:
        conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        assert int(node["status"]["allocatable"]["pods"]) > 0
    if cluster.local:
        (node,) = nodes
        assert node["metadata"]["name"] == NODE_NAME
        assert node["status"]["capacity"]["cpu"] == str(os.cpu_count())
        version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)["gitVersion"]
        assert node["status"]["nodeInfo"]["kubeletVersion"] == version
        assert not node["spec"].get("taints")


def test_node_lease_is_renewed(cluster: Cluster) -> None:
    name = cluster.get("nodes")["items"][0]["metadata"]["name"]
    first = cluster.get("lease", "-n", "kube-node-lease", name)["spec"]["renewTime"]

    def renewed() -> str | None:
        renew: str = cluster.get("lease", "-n", "kube-node-lease", name)["spec"]["renewTime"]
        return renew if renew != first else None

    later = wait_until(renewed, 30, "the node's Lease to be renewed", interval=1)
    parsed = dt.datetime.fromisoformat(later.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - parsed).total_seconds()) < 30
