"""The operator puts back what it owns (the chart's operator, as its ServiceAccount, on a real API server):
a child deleted by hand comes back with the same content; a loosened NetworkPolicy and an edited pod
template are reverted; replicas set through scaling are not; the Function's ``ChildrenInSync`` condition
and its Events say what was put back. The condition lists every child a repair wrote, so a repair that
also rewrote a child the API server had merely filled in defaults for would show up there.

``test_repair_time`` prints how long a repair takes (median of five Service deletions, from the watch's
DELETED event to its ADDED event)."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chart_support import Release, function_manifest, operator, operator_log, wait_ready
from cluster_support import Cluster, wait_until

__all__ = ["operator"]  # the module-scoped release: the chart with the gateway scaled to none

# kubectl resource → (kind, the child's name from the Function's name)
CHILDREN: dict[str, tuple[str, Callable[[str], str]]] = {
    "service": ("Service", lambda fn: fn),
    "serviceaccount": ("ServiceAccount", lambda fn: fn),
    "configmap": ("ConfigMap", lambda fn: f"{fn}-code"),
    "networkpolicy": ("NetworkPolicy", lambda fn: fn),
}


def deployed(cluster: Cluster, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    """A Function with every kind of child (a NetworkPolicy denying all egress), scaled to zero, Ready."""
    spec.setdefault("network", {"egress": []})
    spec.setdefault("environment", {"variables": {"STAGE": "prod"}})
    cluster.apply([function_manifest(name, **spec)], namespace)
    return wait_ready(cluster, namespace, name, timeout=60)


def in_sync_condition(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    fn = cluster.get("function", "-n", namespace, name)
    for condition in (fn.get("status") or {}).get("conditions") or []:
        if condition["type"] == "ChildrenInSync":
            found: dict[str, Any] = condition
            return found
    return None


def wait_repaired(cluster: Cluster, namespace: str, name: str, changes: str) -> dict[str, Any]:
    """The Function's ChildrenInSync condition once it reports a repair that wrote exactly ``changes``
    (the condition lists every write of the repair)."""
    pattern = re.compile(r"^at \S+ put back children changed outside the Function: (.*)$")

    def check() -> dict[str, Any] | None:
        condition = in_sync_condition(cluster, namespace, name)
        if condition and condition["reason"] == "Repaired":
            match = pattern.match(condition["message"])
            if match and match.group(1) == changes:
                return condition
        return None

    condition = wait_until(check, 30, f"ChildrenInSync of {name} to report exactly: {changes}")
    assert condition["status"] == "True"
    return condition


class Watch:
    """``kubectl get <resource> <name> -w --output-watch-events -o json`` in the background: each event
    with the monotonic time it arrived."""

    def __init__(self, cluster: Cluster, resource: str, namespace: str, name: str) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._changed = threading.Condition()
        self._process = subprocess.Popen(
            [
                cluster.kubectl_path,
                f"--kubeconfig={cluster.kubeconfig}",
                "get",
                resource,
                name,
                "-n",
                namespace,
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        decoder = json.JSONDecoder()
        buffer = ""
        for line in self._process.stdout:
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                continue
            buffer = buffer.lstrip()[end:]
            with self._changed:
                self.events.append((time.monotonic(), event["type"], event["object"]))
                self._changed.notify_all()

    def next(self, kind: str, after: int, timeout: float = 30) -> tuple[int, float, dict[str, Any]]:
        """The first event of type ``kind`` at index ``after`` or later: (index, arrival time, object)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(after, len(self.events)):
                    arrived, event_type, obj = self.events[index]
                    if event_type == kind:
                        return index, arrived, obj
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [e[1] for e in self.events]
                    raise AssertionError(f"no {kind} event within {timeout:.0f} s; events: {seen}")
                self._changed.wait(left)

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        self._reader.join(timeout=10)
        if self._process.stdout is not None:
            self._process.stdout.close()


def owner_uid(obj: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return [(o["kind"], o["uid"], o.get("controller", False)) for o in obj["metadata"].get("ownerReferences", [])]


def content(resource: str, obj: dict[str, Any]) -> Any:
    """What the operator writes into a child (a re-created Service gets a new cluster IP: not compared)."""
    if resource == "service":
        return {k: obj["spec"].get(k) for k in ("type", "selector", "ports")}
    if resource == "serviceaccount":
        return obj.get("automountServiceAccountToken")
    if resource == "configmap":
        return obj["data"]
    return obj["spec"]


@pytest.mark.parametrize("resource", list(CHILDREN))
def test_a_deleted_child_comes_back_with_its_content(cluster: Cluster, operator: Release, resource: str) -> None:
    ns = operator.functions
    kind, child_of = CHILDREN[resource]
    fn_name = f"gone-{resource}"
    child = child_of(fn_name)
    fn = deployed(cluster, ns, fn_name)
    before = cluster.get(resource, "-n", ns, child)
    assert before["kind"] == kind
    cluster.kubectl("delete", resource, "-n", ns, child, "--wait=true")

    def recreated() -> dict[str, Any] | None:
        found = cluster.kubectl("get", resource, "-n", ns, child, "-o", "json", check=False)
        if found.returncode != 0:
            return None
        obj: dict[str, Any] = json.loads(found.stdout)
        return obj if obj["metadata"]["uid"] != before["metadata"]["uid"] else None

    after = wait_until(recreated, 30, f"the operator to re-create {kind} {child}")
    assert content(resource, after) == content(resource, before)
    assert owner_uid(after) == [("Function", fn["metadata"]["uid"], True)]
    assert after["metadata"]["labels"] == before["metadata"]["labels"]
    # Exactly that child was written: nothing the API server had filled in elsewhere counted as drift.
    wait_repaired(cluster, ns, fn_name, f"created {kind} {child}")

    def repaired_event() -> dict[str, Any] | None:
        events = cluster.get("events", "-n", ns, "--field-selector", f"involvedObject.name={fn_name}")["items"]
        found = [e for e in events if e["reason"] == "Repaired" and f"created {kind} {child}" in e["message"]]
        return found[0] if found else None

    event = wait_until(repaired_event, 30, f"a Repaired event on Function {fn_name}")
    assert event["type"] == "Normal" and event["involvedObject"]["kind"] == "Function"


SHAPES: dict[str, dict[str, Any]] = {
    # One vCPU: the request is written as 1000m and stored as "1".
    "one-vcpu": {"memoryMB": 1769},
    # Written as 2048Mi, stored as "2Gi".
    "2gi": {"memoryMB": 2048, "ephemeralStorageMB": 1024},
    "image": {"code": {"image": "lambdalet.test/python-ric:latest"}, "runtime": None},
    "url": {"code": {"url": "http://code.invalid/fn.zip", "sha256": "0" * 64}},
    "secrets": {
        "environment": {
            "variables": {"STAGE": "prod"},
            "secretKeyRefs": [{"name": "DB_PASSWORD", "secretKeyRef": {"name": "db", "key": "password"}}],
            "envFrom": [{"secretRef": {"name": "keys", "optional": True}}],
        }
    },
    # The server defaults the port's protocol.
    "dns-egress": {"network": {"egress": [{"ports": [{"port": 53}], "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_repair_rewrites_nothing_the_api_server_filled_in(cluster: Cluster, operator: Release, shape: str) -> None:
    """For each shape of Function, a repair (which reconciles every child) writes only the deleted child:
    the server's defaults and canonical forms in the others are not drift, so nothing loops."""
    ns = operator.functions
    name = f"shape-{shape}"
    spec = {"network": {"egress": []}, **{k: v for k, v in SHAPES[shape].items() if v is not None}}
    manifest = function_manifest(name, **spec)
    if SHAPES[shape].get("runtime", "") is None:
        del manifest["spec"]["runtime"]
    cluster.apply([manifest], ns)
    wait_ready(cluster, ns, name, timeout=60)
    resources = container(cluster, ns, name)["resources"] if shape != "image" else {}
    if shape == "one-vcpu":
        assert resources["requests"]["cpu"] == "1"  # the operator wrote 1000m
    if shape == "2gi":
        assert resources["limits"]["memory"] == "2Gi"  # the operator wrote 2048Mi
    cluster.kubectl("delete", "serviceaccount", "-n", ns, name, "--wait=true")
    wait_repaired(cluster, ns, name, f"created ServiceAccount {name}")


def test_a_network_policy_opened_to_everything_is_reverted(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    deployed(cluster, ns, "walled")
    original = cluster.get("networkpolicy", "-n", ns, "walled")["spec"]
    assert original["policyTypes"] == ["Egress"] and not original.get("egress")  # deny all egress
    allow_all: dict[str, Any] = {"spec": {"egress": [{}]}}
    cluster.kubectl("patch", "networkpolicy", "-n", ns, "walled", "--type=merge", "-p", json.dumps(allow_all))

    def reverted() -> dict[str, Any] | None:
        spec: dict[str, Any] = cluster.get("networkpolicy", "-n", ns, "walled")["spec"]
        return spec if not spec.get("egress") else None

    assert wait_until(reverted, 30, "the NetworkPolicy's egress to be denied again") == original
    wait_repaired(cluster, ns, "walled", "updated NetworkPolicy walled (spec.egress)")


def container(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    deployment = cluster.get("deployment", "-n", namespace, name)
    [found] = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = found
    return result


def test_an_edited_pod_template_is_reverted(cluster: Cluster, operator: Release) -> None:
    ns = operator.functions
    deployed(cluster, ns, "templated")
    original = container(cluster, ns, "templated")
    names = [e["name"] for e in original["env"]]
    stage = names.index("STAGE")
    assert original["env"][stage]["value"] == "prod"

    cluster.kubectl("set", "env", "deployment/templated", "-n", ns, "STAGE=hacked")
    wait_until(
        lambda: container(cluster, ns, "templated")["env"] == original["env"], 30, "the environment to be put back"
    )
    path = f"spec.template.spec.containers[0].env[{stage}].value"
    wait_repaired(cluster, ns, "templated", f"updated Deployment templated ({path})")

    cluster.kubectl("set", "image", "deployment/templated", "-n", ns, "function=registry.example/evil:1")
    wait_until(
        lambda: container(cluster, ns, "templated")["image"] == original["image"], 30, "the image to be put back"
    )
    wait_repaired(cluster, ns, "templated", "updated Deployment templated (spec.template.spec.containers[0].image)")
    assert container(cluster, ns, "templated") == original


def test_scaled_replicas_are_not_reverted(cluster: Cluster, operator: Release) -> None:
    """Scaling (the gateway's job) is not drift: after it, a repair of another child leaves replicas alone."""
    ns = operator.functions
    deployed(cluster, ns, "scaled-by-hand")
    assert cluster.get("deployment", "-n", ns, "scaled-by-hand")["spec"]["replicas"] == 0
    cluster.kubectl("scale", "deployment", "-n", ns, "scaled-by-hand", "--replicas=2")
    # Something the operator does put back, after the scaling: it has seen the scaled Deployment by then.
    cluster.kubectl("delete", "service", "-n", ns, "scaled-by-hand", "--wait=true")
    wait_repaired(cluster, ns, "scaled-by-hand", "created Service scaled-by-hand")
    assert cluster.get("deployment", "-n", ns, "scaled-by-hand")["spec"]["replicas"] == 2
    assert "Traceback" not in operator_log(cluster, operator)


def test_repair_time(cluster: Cluster, operator: Release) -> None:
    """Five deletions of a Function's Service: each comes back; prints the median time from the watch's
    DELETED event to its ADDED event (the repair, as a client watching the Service sees it)."""
    ns = operator.functions
    deployed(cluster, ns, "timed")
    watch = Watch(cluster, "service", ns, "timed")
    try:
        index, _, first = watch.next("ADDED", 0)  # the watch's initial listing
        uid = first["metadata"]["uid"]
        durations = []
        for _ in range(5):
            cluster.kubectl("delete", "service", "-n", ns, "timed", "--wait=false")
            index, deleted_at, _ = watch.next("DELETED", index + 1)
            index, added_at, added = watch.next("ADDED", index + 1)
            assert added["metadata"]["uid"] != uid and added["spec"]["selector"] == {"lambdalet.dev/function": "timed"}
            uid = added["metadata"]["uid"]
            durations.append(added_at - deleted_at)
    finally:
        watch.close()
    median = statistics.median(durations) * 1000
    print(
        f"Service deleted -> re-created (watch events), 5 deletions: median {median:.0f} ms"
        f" (min {min(durations) * 1000:.0f}, max {max(durations) * 1000:.0f})"
    )


@pytest.mark.slow
def test_repairs_past_the_budget_wait_then_happen(cluster: Cluster, operator: Release) -> None:
    """Deleting a Service over and over (a script, another controller): ten repairs a minute, then the
    Function says the repair waits, and the Service comes back once the minute has passed."""
    ns = operator.functions
    deployed(cluster, ns, "hounded")
    uid = cluster.get("service", "-n", ns, "hounded")["metadata"]["uid"]
    for attempt in range(10):

        def recreated(old: str = uid) -> str | None:
            found = cluster.kubectl("get", "service", "-n", ns, "hounded", "-o", "json", check=False)
            new: str = json.loads(found.stdout)["metadata"]["uid"] if found.returncode == 0 else old
            return new if new != old else None

        cluster.kubectl("delete", "service", "-n", ns, "hounded", "--wait=true")
        uid = wait_until(recreated, 30, f"repair {attempt + 1} of 10")
    cluster.kubectl("delete", "service", "-n", ns, "hounded", "--wait=true")

    def throttled() -> dict[str, Any] | None:
        condition = in_sync_condition(cluster, ns, "hounded")
        return condition if condition and condition["reason"] == "RepairThrottled" else None

    condition = throttled() or wait_until(throttled, 30, "ChildrenInSync RepairThrottled")
    assert condition["status"] == "False"
    assert condition["message"].startswith("Service hounded: deleted: not repaired yet")
    assert cluster.kubectl("get", "service", "-n", ns, "hounded", check=False).returncode != 0
    wait_until(
        lambda: cluster.kubectl("get", "service", "-n", ns, "hounded", check=False).returncode == 0,
        75,
        "the delayed repair",
    )
    wait_repaired(cluster, ns, "hounded", "created Service hounded")

    def throttle_events() -> list[dict[str, Any]] | None:
        events = cluster.get("events", "-n", ns, "--field-selector", "involvedObject.name=hounded")["items"]
        return [e for e in events if e["reason"] == "RepairThrottled"] or None

    [event] = wait_until(throttle_events, 30, "a RepairThrottled event on Function hounded")
    assert event["type"] == "Warning" and event["message"].startswith("Service hounded: deleted: repaired too often")


@contextlib.contextmanager
def admission_policy(cluster: Cluster, kind: str, name: str, spec: dict[str, Any], namespace: str) -> Iterator[None]:
    """A cluster-wide ``kind`` (ValidatingAdmissionPolicy or MutatingAdmissionPolicy) bound to
    ``namespace`` only; removed afterwards."""
    binding_spec: dict[str, Any] = {
        "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
    }
    if kind == "ValidatingAdmissionPolicy":
        binding_spec |= {"policyName": name, "validationActions": ["Deny"]}
    else:
        binding_spec |= {"policyName": name}
    group = "admissionregistration.k8s.io/v1"
    documents = [
        {"apiVersion": group, "kind": kind, "metadata": {"name": name}, "spec": spec},
        {"apiVersion": group, "kind": f"{kind}Binding", "metadata": {"name": name}, "spec": binding_spec},
    ]
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))
    try:
        yield
    finally:
        cluster.kubectl("delete", f"{kind.lower()}binding", name, "--ignore-not-found")
        cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found")


def test_a_write_the_api_server_undoes_is_reported_not_fought(cluster: Cluster, operator: Release) -> None:
    """A MutatingAdmissionPolicy opens the NetworkPolicy's egress on every update: the operator's repair
    comes back changed, and the Function says so (RepairFailed) instead of writing again and again."""
    ns = operator.functions
    deployed(cluster, ns, "undone")
    opener = {
        "matchConstraints": {
            "resourceRules": [
                {
                    "apiGroups": ["networking.k8s.io"],
                    "apiVersions": ["v1"],
                    "operations": ["UPDATE"],
                    "resources": ["networkpolicies"],
                }
            ]
        },
        "matchConditions": [{"name": "only-undone", "expression": "object.metadata.name == 'undone'"}],
        "failurePolicy": "Fail",
        "reinvocationPolicy": "Never",
        "mutations": [
            {
                "patchType": "JSONPatch",
                "jsonPatch": {"expression": '[JSONPatch{op: "add", path: "/spec/egress", value: [{}]}]'},
            }
        ],
    }
    with admission_policy(cluster, "MutatingAdmissionPolicy", f"open-egress-{ns}", opener, ns):
        touches = iter(range(1000))

        def failed() -> dict[str, Any] | None:
            """Touch the NetworkPolicy (a label) until the policy, once in force, opens it on the update."""
            condition = in_sync_condition(cluster, ns, "undone")
            if condition and condition["reason"] == "RepairFailed":
                return condition
            cluster.kubectl("label", "networkpolicy", "-n", ns, "undone", f"touched={next(touches)}", "--overwrite")
            return None

        condition = wait_until(failed, 30, "ChildrenInSync RepairFailed")
        assert condition["status"] == "False"
        assert condition["message"].startswith(
            "the API server did not keep what the operator wrote: NetworkPolicy undone (spec.egress)"
        )

        def failure_events() -> list[dict[str, Any]] | None:
            events = cluster.get("events", "-n", ns, "--field-selector", "involvedObject.name=undone")["items"]
            return [e for e in events if e["reason"] == "RepairFailed"] or None

        [event] = wait_until(failure_events, 30, "a RepairFailed event on Function undone")
        assert event["type"] == "Warning" and "NetworkPolicy undone (spec.egress)" in event["message"]


def test_a_repair_refused_by_an_admission_policy_is_reported(cluster: Cluster, operator: Release) -> None:
    """A ValidatingAdmissionPolicy refuses the Service the operator would re-create: Ready keeps its state
    (the spec is fine), ChildrenInSync says what refused the repair."""
    ns = operator.functions
    deployed(cluster, ns, "frozen")
    freeze = {
        "matchConstraints": {
            "resourceRules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["services"]}
            ]
        },
        "failurePolicy": "Fail",
        "validations": [
            {"expression": "object.metadata.name != 'frozen'", "message": "no new Service named frozen (test policy)"}
        ],
    }
    with admission_policy(cluster, "ValidatingAdmissionPolicy", f"freeze-{ns}", freeze, ns):

        def active() -> bool:
            dry = cluster.kubectl(
                "create", "service", "clusterip", "frozen", "-n", ns, "--tcp=8080", "--dry-run=server", check=False
            )
            return "no new Service named frozen" in dry.stderr

        wait_until(active, 30, "the ValidatingAdmissionPolicy to be in force")
        cluster.kubectl("delete", "service", "-n", ns, "frozen", "--wait=true")

        def failed() -> dict[str, Any] | None:
            condition = in_sync_condition(cluster, ns, "frozen")
            return condition if condition and condition["reason"] == "RepairFailed" else None

        condition = wait_until(failed, 30, "ChildrenInSync RepairFailed")
        assert condition["status"] == "False"
        assert condition["message"].startswith("the API server refused to put back a child:")
        assert "no new Service named frozen (test policy)" in condition["message"]
        fn = cluster.get("function", "-n", ns, "frozen")
        ready = next(c for c in fn["status"]["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("True", "Ready")
