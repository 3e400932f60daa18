"""Helpers shared by the chart and operator cluster tests: a Helm release of charts/lambdalet installed
with ``helm install --wait`` (operator and gateway running as the chart's ServiceAccounts), Function
manifests, and the README's permission table.

Test releases serve only their own namespaces (``watchNamespaces``): other engineers' tests may run
their own operator in the same cluster, and two operators must never reconcile the same Function.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_support import ROOT, VENV_BIN, Cluster, wait_until

CHART = ROOT / "charts" / "lambdalet"
README = ROOT / "README.md"


def helm_path() -> str:
    local = VENV_BIN / "helm"
    return str(local) if local.exists() else "helm"


def helm(cluster: Cluster, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [helm_path(), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str  # where the operator and the gateway run
    functions: str  # the namespace whose Functions this release serves

    @property
    def operator_account(self) -> str:
        return f"{self.name}-lambdalet-operator"

    @property
    def gateway_account(self) -> str:
        return f"{self.name}-lambdalet-gateway"


def install(cluster: Cluster, *sets: str) -> Release:
    """``helm install --wait`` into a fresh namespace, serving another fresh namespace."""
    system = cluster.create_namespace("lambdalet-system")
    functions = cluster.create_namespace("functions")
    name = f"l{uuid.uuid4().hex[:6]}"
    result = helm(
        cluster,
        "install",
        name,
        str(CHART),
        "--namespace",
        system,
        "--set",
        f"watchNamespaces={{{functions}}}",
        *(arg for value in sets for arg in ("--set", value)),
        "--wait",
        "--timeout",
        "60s",
        check=False,
    )
    if result.returncode != 0:
        why = diagnose(cluster, system)
        helm(cluster, "uninstall", name, "--namespace", system, check=False)
        cluster.delete_namespace(functions)
        cluster.delete_namespace(system)
        raise AssertionError(f"helm install --wait failed: {result.stderr}\n{why}")
    return Release(name, system, functions)


def diagnose(cluster: Cluster, namespace: str) -> str:
    """Pod states and the last log lines of each container: why an install did not become ready."""
    lines = [cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout]
    for pod in cluster.get("pods", "-n", namespace)["items"]:
        for container in pod["spec"]["containers"]:
            log = cluster.pod_log(namespace, pod["metadata"]["name"], container["name"])
            tail = "\n".join(log.splitlines()[-15:])
            lines.append(f"--- {pod['metadata']['name']}/{container['name']}:\n{tail}")
    return "\n".join(lines)


def uninstall(cluster: Cluster, release: Release) -> None:
    helm(cluster, "uninstall", release.name, "--namespace", release.namespace, "--wait", "--timeout", "60s")


def _installed(cluster: Cluster, *sets: str) -> Iterator[Release]:
    installed = install(cluster, *sets)
    yield installed
    helm(cluster, "uninstall", installed.name, "--namespace", installed.namespace, check=False)
    cluster.delete_namespace(installed.functions)
    cluster.delete_namespace(installed.namespace)


@pytest.fixture(scope="module")
def release(cluster: Cluster) -> Iterator[Release]:
    yield from _installed(cluster)


@pytest.fixture(scope="module")
def operator(cluster: Cluster) -> Iterator[Release]:
    """The chart with the gateway scaled to none: the operator alone (invocations, if any, go to a pod's
    agent directly)."""
    yield from _installed(cluster, "gateway.replicas=0")


def operator_log(cluster: Cluster, release: Release) -> str:
    pods = cluster.get("pods", "-n", release.namespace, "-l", "app.kubernetes.io/component=operator")["items"]
    return "".join(cluster.pod_log(release.namespace, pod["metadata"]["name"], "operator") for pod in pods)


def function_manifest(name: str, files: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "runtime": "python3.12",
        "handler": "app.handler",
        "code": {"inline": {"files": files or {"app.py": "def handler(event, context):\n    return event\n"}}},
    }
    body.update(spec)
    return {"apiVersion": "lambdalet.dev/v1alpha1", "kind": "Function", "metadata": {"name": name}, "spec": body}


def condition_of(fn: dict[str, Any]) -> dict[str, Any] | None:
    for condition in (fn.get("status") or {}).get("conditions") or []:
        if condition["type"] == "Ready":
            found: dict[str, Any] = condition
            return found
    return None


def ready_condition(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    return condition_of(cluster.get("function", "-n", namespace, name))


def wait_ready(cluster: Cluster, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    """The Function once its Ready condition is True for its current generation (one read: the status
    returned is the one that was Ready)."""

    def check() -> dict[str, Any] | None:
        fn: dict[str, Any] = cluster.get("function", "-n", namespace, name)
        condition = condition_of(fn)
        status = fn.get("status") or {}
        if (
            condition
            and condition["status"] == "True"
            and status.get("observedGeneration") == fn["metadata"]["generation"]
        ):
            return fn
        return None

    return wait_until(check, timeout, f"Function {namespace}/{name} to be Ready")


def wait_reason(cluster: Cluster, namespace: str, name: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        condition = ready_condition(cluster, namespace, name)
        return condition if condition and condition["reason"] == reason else None

    return wait_until(check, timeout, f"Function {namespace}/{name} Ready reason {reason}")


# ------------------------------------------------------------------------------------------ permissions


def readme_permissions() -> dict[str, dict[str, set[str]]]:
    """The README's permission table: component → resource (``plural.group``) → verbs."""
    text = README.read_text()
    section = text.split("## Permissions", 1)[1].split("\n## ", 1)[0]
    table: dict[str, dict[str, set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        component, resource, verbs = cells[0].lower(), cells[1].strip("`"), cells[2]
        table.setdefault(component, {})[resource] = {v.strip() for v in verbs.split(",") if v.strip()}
    return table


def granted(cluster: Cluster, account: str, namespace: str) -> dict[str, set[str]]:
    """``kubectl auth can-i --list`` for a ServiceAccount in a namespace: resource → verbs."""
    output = cluster.kubectl("auth", "can-i", "--list", f"--as={account}", "-n", namespace).stdout
    rules: dict[str, set[str]] = {}
    for line in output.splitlines()[1:]:
        match = re.match(r"^(\S+)\s+\[[^\]]*\]\s+\[[^\]]*\]\s+\[([^\]]*)\]\s*$", line)
        if match:
            rules.setdefault(match.group(1), set()).update(match.group(2).split())
    return rules


def baseline(cluster: Cluster, namespace: str) -> dict[str, set[str]]:
    """What every authenticated ServiceAccount may do (self reviews): not the chart's doing."""
    return granted(cluster, f"system:serviceaccount:{namespace}:default", namespace)


# --------------------------------------------------------------------------------------------- examples


def example_functions() -> list[tuple[str, dict[str, Any]]]:
    """Each example in examples/ whose code is source text, as a cluster Function with its files inline
    (``code.path`` points at the local directory, which a cluster cannot read)."""
    found: list[tuple[str, dict[str, Any]]] = []
    for manifest in sorted((ROOT / "examples").glob("*/function.yaml")):
        for document in yaml.safe_load_all(manifest.read_text()):
            if not document or document.get("kind") != "Function":
                continue
            runtime = document["spec"].get("runtime", "")
            if not runtime.startswith(("python", "nodejs", "ruby")):
                continue  # compiled examples (Java, Go) need a build step and an image or url
            files = _source_files(manifest.parent / document["spec"]["code"].get("path", "."))
            document["spec"]["code"] = {"inline": {"files": files}}
            found.append((manifest.parent.name, document))
    return found


def _source_files(folder: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "function.yaml" and path.suffix in {".py", ".js", ".mjs", ".rb", ".json"}:
            relative = str(path.relative_to(folder))
            if "node_modules" not in relative and "__pycache__" not in relative:
                files[relative] = path.read_text()
    return files


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)
