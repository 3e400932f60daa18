"""The Kubernetes backend's pure bookkeeping: EndpointSlices folded into ready pods per Service, and one
function's pods (handed out, free, deleting, waited for) — who gets which pod, what counts as lost, what
is idle long enough to remove."""

from __future__ import annotations

import asyncio
from typing import Any

from lambdalet_gateway.kube.book import (
    Endpoint,
    EndpointBook,
    Instances,
    Templates,
    function_of,
    lambda_time,
    select_functions,
    slice_endpoints,
)


def endpoint_slice(
    name: str, service: str, pods: list[tuple[str, str, dict[str, bool]]], namespace: str = "ns"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": [ip], "conditions": conditions, "targetRef": {"kind": "Pod", "name": pod, "uid": f"u-{pod}"}}
            for pod, ip, conditions in pods
        ],
    }


READY = {"ready": True}
STARTING = {"ready": False}
TERMINATING = {"ready": False, "terminating": True}


def endpoint(pod: str, ready: bool = True, terminating: bool = False) -> Endpoint:
    return Endpoint(pod, f"u-{pod}", f"10.0.0.{len(pod)}", 8080, ready, terminating)


def test_slice_endpoints_reads_pod_address_port_and_conditions() -> None:
    obj = endpoint_slice(
        "s", "hello", [("a", "10.0.0.1", READY), ("b", "10.0.0.2", TERMINATING), ("c", "10.0.0.3", {})]
    )
    obj["endpoints"].append({"addresses": ["10.0.0.9"], "conditions": READY})  # no pod: skipped
    a, b, c = slice_endpoints(obj)
    assert (a.pod, a.url, a.ready, a.uid) == ("a", "http://10.0.0.1:8080", True, "u-a")
    assert b.terminating and not b.ready
    assert c.ready  # an unset `ready` means ready


def test_book_merges_slices_of_a_service_and_forgets_deleted_ones() -> None:
    book = EndpointBook()
    assert book.apply("ADDED", endpoint_slice("s1", "hello", [("a", "10.0.0.1", READY)])) == ("ns", "hello")
    book.apply("ADDED", endpoint_slice("s2", "hello", [("b", "10.0.0.2", STARTING), ("a", "10.0.0.1", STARTING)]))
    book.apply("ADDED", endpoint_slice("s3", "other", [("x", "10.0.0.5", READY)]))
    merged = book.endpoints(("ns", "hello"))
    assert sorted(merged) == ["a", "b"] and merged["a"].ready and not merged["b"].ready
    book.apply("DELETED", endpoint_slice("s1", "hello", []))
    assert not book.endpoints(("ns", "hello"))["a"].ready
    assert book.apply("ADDED", {"metadata": {"name": "x", "namespace": "ns"}}) is None  # not a Service's slice


def test_relisting_a_namespace_replaces_its_slices_only() -> None:
    book = EndpointBook()
    book.apply("ADDED", endpoint_slice("s1", "hello", [("a", "10.0.0.1", READY)]))
    book.apply("ADDED", endpoint_slice("s9", "hello", [("z", "10.0.1.1", READY)], namespace="elsewhere"))
    touched = book.replace("ns", [endpoint_slice("s2", "hello", [("b", "10.0.0.2", READY)])])
    assert touched == {("ns", "hello")}
    assert list(book.endpoints(("ns", "hello"))) == ["b"]
    assert list(book.endpoints(("elsewhere", "hello"))) == ["z"]


async def test_waiting_starts_get_new_ready_pods_in_order() -> None:
    loop = asyncio.get_running_loop()
    instances = Instances()
    first: asyncio.Future[Endpoint] = loop.create_future()
    second: asyncio.Future[Endpoint] = loop.create_future()
    instances.wait(first)
    instances.wait(second)
    assert instances.needed() == 2
    observed = instances.observe({"a": endpoint("a", ready=False)}, now=0)
    assert observed.handed == [] and not first.done()
    observed = instances.observe({"a": endpoint("a"), "bb": endpoint("bb")}, now=1)
    assert [(f, e.pod) for f, e in observed.handed] == [(first, "a"), (second, "bb")]
    assert set(instances.assigned) == {"a", "bb"} and instances.needed() == 2 and not instances.free


def test_a_ready_pod_nobody_holds_is_claimed_at_once() -> None:
    instances = Instances()
    instances.observe({"a": endpoint("a"), "bb": endpoint("bb", ready=False)}, now=0)
    claimed = instances.claim()
    assert claimed is not None and claimed.pod == "a"
    assert instances.claim() is None  # bb is still starting


def test_handed_out_pods_that_vanish_or_terminate_are_lost_but_not_ready_ones_are_kept() -> None:
    instances = Instances()
    instances.observe({"a": endpoint("a"), "bb": endpoint("bb"), "ccc": endpoint("ccc")}, now=0)
    for _ in range(3):
        instances.claim()
    observed = instances.observe({"a": endpoint("a", ready=False), "bb": endpoint("bb", False, True)}, now=1)
    assert sorted(e.pod for e in observed.lost) == ["bb", "ccc"]
    assert list(instances.assigned) == ["a"]  # an agent resetting its runtime is briefly not ready


def test_a_released_pod_is_deleting_and_never_handed_out_again() -> None:
    instances = Instances()
    instances.observe({"a": endpoint("a")}, now=0)
    instances.claim()
    assert instances.release("a")
    instances.observe({"a": endpoint("a")}, now=1)  # still ready until its deletion shows
    assert instances.claim() is None
    instances.observe({}, now=2)
    assert instances.deleting == set()


def test_free_pods_expire_after_the_idle_timeout() -> None:
    instances = Instances()
    instances.observe({"a": endpoint("a")}, now=10)
    instances.observe({"a": endpoint("a"), "bb": endpoint("bb")}, now=15)
    assert instances.expired(now=19, idle_s=10) == []
    assert [e.pod for e in instances.expired(now=20, idle_s=10)] == ["a"]
    assert instances.deleting == {"a"} and list(instances.free) == ["bb"]


async def test_a_start_that_gives_up_returns_its_pod() -> None:
    loop = asyncio.get_running_loop()
    instances = Instances()
    future: asyncio.Future[Endpoint] = loop.create_future()
    instances.wait(future)
    instances.observe({"a": endpoint("a")}, now=0)
    assert future.done()
    instances.forget(future)
    assert instances.assigned == {} and list(instances.free) == ["a"]


def test_function_objects_become_the_spec_model() -> None:
    obj = {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": "hello", "namespace": "team", "uid": "x", "generation": 3},
        "spec": {"runtime": "python3.12", "handler": "app.handler", "code": {"inline": {"files": {"app.py": ""}}}},
        "status": {"conditions": []},
    }
    function = function_of(obj)
    assert (function.name, function.metadata.namespace, function.spec.runtime) == ("hello", "team", "python3.12")
    assert lambda_time("2026-11-26T22:10:15Z") == "2026-11-26T22:10:15.000+0000"


def test_invalid_functions_and_a_name_served_twice_are_errors() -> None:
    def obj(name: str, namespace: str, created: str, **spec: Any) -> dict[str, Any]:
        body = {"runtime": "python3.12", "handler": "app.handler", "code": {"inline": {"files": {"a.py": ""}}}}
        return {
            "apiVersion": "lambdalet.dev/v1alpha1",
            "kind": "Function",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
            "spec": body | spec,
        }

    chosen, errors = select_functions(
        [
            obj("hello", "late", "2026-11-26T22:00:05Z"),
            obj("hello", "early", "2026-11-26T22:00:01Z"),
            obj("broken", "early", "2026-11-26T22:00:01Z", memoryMB=1),
        ]
    )
    assert list(chosen) == ["hello"] and chosen["hello"][0].metadata.namespace == "early"
    messages = sorted(str(e) for e in errors)
    assert (
        messages[0].startswith("early/broken: spec.memoryMB") and "already served from namespace early" in messages[1]
    )


def replica_set(name: str, deployment: str, template_hash: str, revision: int) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"pod-template-hash": template_hash},
            "annotations": {"deployment.kubernetes.io/revision": str(revision)},
            "ownerReferences": [{"kind": "Deployment", "name": deployment, "controller": True}],
        }
    }


def test_the_newest_revision_names_the_current_pods() -> None:
    templates = Templates()
    assert templates.prefix(("ns", "hello")) is None
    assert templates.apply("ADDED", replica_set("hello-aaa", "hello", "aaa", 1)) == ("ns", "hello")
    assert templates.prefix(("ns", "hello")) == "hello-aaa-"
    templates.apply("ADDED", replica_set("hello-bbb", "hello", "bbb", 2))
    assert templates.prefix(("ns", "hello")) == "hello-bbb-"
    templates.apply("MODIFIED", replica_set("hello-aaa", "hello", "aaa", 3))  # a rollback
    assert templates.prefix(("ns", "hello")) == "hello-aaa-"
    templates.apply("DELETED", replica_set("hello-aaa", "hello", "aaa", 3))
    assert templates.prefix(("ns", "hello")) == "hello-bbb-"


def test_pods_of_an_older_template_are_never_handed_out() -> None:
    instances = Instances()
    old = Endpoint("hello-aaa-x1", "u1", "10.0.0.1", 8080, True, False)
    new = Endpoint("hello-bbb-y2", "u2", "10.0.0.2", 8080, True, False)
    instances.observe({old.pod: old}, now=0, template="hello-bbb-")
    assert instances.claim() is None
    instances.observe({old.pod: old, new.pod: new}, now=1, template="hello-bbb-")
    claimed = instances.claim()
    assert claimed is not None and claimed.pod == new.pod
