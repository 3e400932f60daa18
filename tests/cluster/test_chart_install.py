"""The Helm chart on a real API server: lint, server-side validation of what it renders, `helm install
--wait` with the operator and the gateway running as the chart's ServiceAccounts, permissions equal to the
README's table (no Secrets), and `helm uninstall` leaving nothing behind."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
import yaml
from chart_support import (
    CHART,
    Release,
    baseline,
    function_manifest,
    granted,
    helm,
    install,
    operator_log,
    readme_permissions,
    release,
    uninstall,
    wait_ready,
)
from cluster_support import Cluster, wait_until

__all__ = ["release"]  # the module-scoped Helm release fixture


def test_helm_lint_is_clean(cluster: Cluster) -> None:
    result = helm(cluster, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["gateway.replicas=2", "operator.logLevel=debug", "image.tag=dev", "functions.registry=registry.local/fn"],
    ],
    ids=["defaults", "overrides"],
)
def test_rendered_chart_is_accepted_by_the_api_server(cluster: Cluster, namespace: str, values: list[str]) -> None:
    for scope in ([], [f"watchNamespaces={{{namespace}}}"]):
        sets = [arg for value in [*values, *scope] for arg in ("--set", value)]
        rendered = helm(cluster, "template", "dry", str(CHART), "--namespace", namespace, "--include-crds", *sets)
        result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered.stdout, check=False)
        assert result.returncode == 0, result.stderr
        kinds = {line.split("/")[0] for line in result.stdout.splitlines()}
        assert "deployment.apps" in kinds and "customresourcedefinition.apiextensions.k8s.io" in kinds


def test_service_monitor_is_optional(cluster: Cluster) -> None:
    def kinds(*sets: str) -> list[dict[str, Any]]:
        rendered = helm(cluster, "template", "sm", str(CHART), *(a for v in sets for a in ("--set", v))).stdout
        return [doc for doc in yaml.safe_load_all(rendered) if doc]

    assert "ServiceMonitor" not in {doc["kind"] for doc in kinds()}
    [monitor] = [doc for doc in kinds("serviceMonitor.enabled=true") if doc["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


def pods(cluster: Cluster, release: Release, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component={component}"
    items: list[dict[str, Any]] = cluster.get("pods", "-n", release.namespace, "-l", selector)["items"]
    return items


def test_operator_and_gateway_run_as_the_charts_service_accounts(cluster: Cluster, release: Release) -> None:
    for component, account in (("operator", release.operator_account), ("gateway", release.gateway_account)):
        [pod] = pods(cluster, release, component)
        assert pod["spec"]["serviceAccountName"] == account
        assert pod["status"]["phase"] == "Running"
        assert all(status["ready"] for status in pod["status"]["containerStatuses"]), component
        context = pod["spec"]["containers"][0]["securityContext"]
        assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
        assert context["capabilities"]["drop"] == ["ALL"] and context["allowPrivilegeEscalation"] is False
    assert "using the pod's ServiceAccount credentials" in operator_log(cluster, release)
    service = cluster.get("service", "-n", release.namespace, "-l", "app.kubernetes.io/component=gateway")["items"]
    assert [s["metadata"]["name"] for s in service] == [release.gateway_account]


@pytest.mark.parametrize("component", ["operator", "gateway"])
def test_permissions_are_exactly_the_readme_table(cluster: Cluster, release: Release, component: str) -> None:
    account = release.operator_account if component == "operator" else release.gateway_account
    subject = f"system:serviceaccount:{release.namespace}:{account}"
    everyone = baseline(cluster, release.functions)
    actual = {
        resource: verbs - everyone.get(resource, set())
        for resource, verbs in granted(cluster, subject, release.functions).items()
    }
    actual = {resource: verbs for resource, verbs in actual.items() if verbs}
    assert actual == readme_permissions()[component]
    assert not any(resource.split(".")[0].startswith("secrets") or resource == "*" for resource in actual)
    # Outside the namespaces it serves, the release grants nothing.
    everyone_there = baseline(cluster, release.namespace)
    outside = {r: v - everyone_there.get(r, set()) for r, v in granted(cluster, subject, release.namespace).items()}
    assert not {r: v for r, v in outside.items() if v}


def test_a_function_answers_through_the_installed_gateway_from_zero(cluster: Cluster, release: Release) -> None:
    """What NOTES.txt promises: apply a Function, invoke it through the gateway (scaled from zero)."""
    files = {"app.py": "def handler(event, context):\n    return {'hello': event['name']}\n"}
    cluster.apply([function_manifest("notes", files)], release.functions)
    fn = wait_ready(cluster, release.functions, "notes")
    assert fn["status"]["desiredInstances"] == 0
    path = "/2015-03-31/functions/notes/invocations"
    assert fn["status"]["url"].endswith(f".{release.namespace}.svc:8080{path}")
    [gateway] = pods(cluster, release, "gateway")
    with cluster.pod_address(release.namespace, gateway["metadata"]["name"], 8080) as (host, port):
        request = urllib.request.Request(f"http://{host}:{port}{path}", data=b'{"name": "k8s"}', method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read()) == {"hello": "k8s"}
    assert cluster.get("deployment", "-n", release.functions, "notes")["spec"]["replicas"] >= 1


def test_uninstall_removes_everything(cluster: Cluster) -> None:
    installed = install(cluster)
    selector = f"app.kubernetes.io/instance={installed.name}"
    namespaced = "deployments,services,serviceaccounts,roles,rolebindings,pods"
    assert cluster.get(namespaced, "-A", "-l", selector)["items"]
    uninstall(cluster, installed)

    def gone() -> bool:
        left = cluster.get(f"{namespaced},clusterroles,clusterrolebindings", "-A", "-l", selector)["items"]
        return not left

    wait_until(gone, 60, f"every object of release {installed.name} to be deleted")
    # The CRD stays (Helm never deletes CRDs: deleting it would delete every Function).
    assert cluster.get("crd", "functions.lambdalet.dev")["metadata"]["name"] == "functions.lambdalet.dev"
    cluster.delete_namespace(installed.functions)
    cluster.delete_namespace(installed.namespace)
