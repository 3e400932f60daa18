"""The Kubernetes backend against a tiny fake of its API module: Functions from the watch, scale from
zero on a start and the pod handed out when its endpoint is ready, never above reservedConcurrency, a
stop deletes exactly that pod before lowering replicas (never below provisionedConcurrency), pods that
already run are adopted without scaling, and a pod that disappears is reported lost."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from lambdalet_gateway.backend import Environment
from lambdalet_gateway.kube.backend import KubernetesBackend
from lambdalet_gateway.registry import Catalog
from lambdalet_gateway.settings import Settings

from lambdalet.spec import Function

Obj = dict[str, Any]
NS = "team"


class FakeApi:
    """Lists what it was given, streams what the test emits, records the writes in order."""

    def __init__(self, **objects: list[Obj]) -> None:
        self.objects = objects
        self.events: defaultdict[str, asyncio.Queue[Obj]] = defaultdict(asyncio.Queue)
        self.calls: list[tuple[object, ...]] = []
        self.replicas: dict[str, int] = {}
        self.scaled: list[int] = []

    async def list(self, kind: tuple[str, str], namespace: str | None, selector: str = "") -> tuple[list[Obj], str]:
        return list(self.objects.get(kind[1], [])), "1"

    async def watch(
        self, kind: tuple[str, str], namespace: str | None, resource_version: str, selector: str = ""
    ) -> AsyncIterator[Obj]:
        while True:
            yield await self.events[kind[1]].get()

    async def get_scale(self, namespace: str, deployment: str) -> int:
        return self.replicas.get(deployment, 0)

    async def set_scale(self, namespace: str, deployment: str, replicas: int) -> int:
        self.calls.append(("scale", deployment, replicas))
        self.scaled.append(replicas)
        self.replicas[deployment] = replicas
        return replicas

    async def delete_pod(self, namespace: str, name: str, uid: str | None) -> None:
        self.calls.append(("delete", name))

    async def close(self) -> None:
        pass

    def emit(self, plural: str, event_type: str, obj: Obj) -> None:
        self.events[plural].put_nowait({"type": event_type, "object": obj})


def function_object(name: str, **spec: Any) -> Obj:
    body = {"runtime": "python3.12", "handler": "app.handler", "code": {"inline": {"files": {"app.py": ""}}}}
    return {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": name, "namespace": NS, "generation": 1, "creationTimestamp": "2026-11-26T22:00:00Z"},
        "spec": body | spec,
    }


def deployment(name: str, replicas: int) -> Obj:
    return {"metadata": {"name": name, "namespace": NS}, "spec": {"replicas": replicas}}


def endpoint_slice(service: str, *pods: tuple[str, bool]) -> Obj:
    return {
        "metadata": {"name": f"{service}-x", "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {
                "addresses": [f"10.0.0.{index + 1}"],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "uid": f"u-{pod}"},
            }
            for index, (pod, ready) in enumerate(pods)
        ],
    }


class Harness:
    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.lost: list[Environment] = []
        self.catalogs: list[Catalog] = []
        settings = Settings(backend="kubernetes", namespaces=(NS,))
        self.backend = KubernetesBackend(settings, self.lost.append, api=api)
        self.registry = self.backend.registry(self.catalogs.append)

    def function(self, name: str) -> Function:
        return self.catalogs[-1].functions[name].function

    async def settle(self) -> None:
        """Let the watch tasks and spawned scaling calls run (all in-memory: a few loop turns)."""
        for _ in range(20):
            await asyncio.sleep(0)


async def opened(api: FakeApi) -> Harness:
    harness = Harness(api)
    await harness.registry.reload()
    return harness


async def test_functions_come_from_the_watch_and_deleted_ones_go() -> None:
    api = FakeApi(functions=[function_object("hello")])
    harness = await opened(api)
    assert list(harness.catalogs[-1].functions) == ["hello"]
    api.emit("functions", "ADDED", function_object("slow", timeoutSeconds=10))
    await harness.settle()
    assert sorted(harness.catalogs[-1].functions) == ["hello", "slow"]
    api.emit("functions", "DELETED", function_object("hello"))
    await harness.settle()
    assert list(harness.catalogs[-1].functions) == ["slow"]
    await harness.backend.close()


async def test_start_scales_from_zero_and_returns_the_pod_once_its_endpoint_is_ready() -> None:
    api = FakeApi(functions=[function_object("hello")], deployments=[deployment("hello", 0)])
    harness = await opened(api)
    start = asyncio.create_task(harness.backend.start(harness.function("hello"), provisioned=False))
    await harness.settle()
    assert api.calls == [("scale", "hello", 1)]
    api.emit("endpointslices", "ADDED", endpoint_slice("hello", ("hello-a", False)))
    await harness.settle()
    assert not start.done()  # not ready yet
    api.emit("endpointslices", "MODIFIED", endpoint_slice("hello", ("hello-a", True)))
    env = await asyncio.wait_for(start, 5)
    assert env.url == "http://10.0.0.1:8080" and env.function == "hello"

    # Stop: exactly that pod is deleted first, then the replicas go down by one.
    await harness.backend.stop(env)
    assert api.calls == [("scale", "hello", 1), ("delete", "hello-a"), ("scale", "hello", 0)]
    await harness.backend.close()


async def test_replicas_never_exceed_reserved_concurrency() -> None:
    api = FakeApi(functions=[function_object("slow", reservedConcurrency=2)], deployments=[deployment("slow", 0)])
    harness = await opened(api)
    starts = [asyncio.create_task(harness.backend.start(harness.function("slow"), provisioned=False)) for _ in range(3)]
    await harness.settle()
    assert max(api.scaled) == 2
    for start in starts:
        start.cancel()
    await asyncio.gather(*starts, return_exceptions=True)
    await harness.backend.close()


async def test_running_pods_are_adopted_without_scaling() -> None:
    api = FakeApi(
        functions=[function_object("hello", provisionedConcurrency=2)],
        deployments=[deployment("hello", 2)],
        endpointslices=[endpoint_slice("hello", ("hello-a", True), ("hello-b", True))],
    )
    harness = await opened(api)
    function = harness.function("hello")
    first = await asyncio.wait_for(harness.backend.start(function, provisioned=True), 5)
    second = await asyncio.wait_for(harness.backend.start(function, provisioned=True), 5)
    assert {first.url, second.url} == {"http://10.0.0.1:8080", "http://10.0.0.2:8080"}
    assert api.calls == []
    # Never below provisionedConcurrency: the pod is replaced (deleted, replicas kept).
    await harness.backend.stop(first)
    assert api.calls == [("delete", first.id.split("/")[1])]
    await harness.backend.close()


async def test_a_pod_that_disappears_is_reported_lost(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeApi(
        functions=[function_object("hello")],
        deployments=[deployment("hello", 1)],
        endpointslices=[endpoint_slice("hello", ("hello-a", True))],
    )
    harness = await opened(api)
    env = await asyncio.wait_for(harness.backend.start(harness.function("hello"), provisioned=False), 5)
    with caplog.at_level(logging.WARNING, logger="lambdalet.gateway.kube"):
        api.emit("endpointslices", "MODIFIED", endpoint_slice("hello"))
        await harness.settle()
    assert harness.lost == [env]
    [record] = caplog.records
    assert (record.function, record.environment) == ("hello", f"{NS}/hello-a")  # type: ignore[attr-defined]
    await harness.backend.close()


async def test_pods_outlive_a_gateway_that_shuts_down() -> None:
    api = FakeApi(
        functions=[function_object("hello")],
        deployments=[deployment("hello", 1)],
        endpointslices=[endpoint_slice("hello", ("hello-a", True))],
    )
    harness = await opened(api)
    env = await asyncio.wait_for(harness.backend.start(harness.function("hello"), provisioned=False), 5)
    run = asyncio.create_task(harness.registry.run(1.0))
    await harness.settle()
    run.cancel()  # the app cancels the registry first, then stops the environments
    await asyncio.gather(run, return_exceptions=True)
    await harness.backend.stop(env)
    assert api.calls == []
    await harness.backend.close()
