"""A new pod is used as soon as its agent answers ``GET /readyz``, before the kubelet's readiness probe
and the EndpointSlice say it is ready: only a pod that appeared while a start waited for one, once it has
an address and a running agent container; never a pod with a deletionTimestamp, never one that answers
anything but 200, never one adopted or ready once before (those go by the EndpointSlice). Bookkeeping
(pure) and the backend against the fake API with a real HTTP agent on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from lambdalet_gateway.backend import Environment
from lambdalet_gateway.kube import backend as kube_backend
from lambdalet_gateway.kube.backend import KubernetesBackend
from lambdalet_gateway.kube.book import Endpoint, Instances, Pod, PodBook, pod_of
from lambdalet_gateway.registry import Catalog
from lambdalet_gateway.settings import Settings, SettingsError
from test_kube_backend import NS, FakeApi, Harness, deployment, endpoint_slice, function_object, opened

Obj = dict[str, Any]


def pod_object(
    name: str,
    *,
    address: str = "",
    port: int = 8080,
    running: bool = False,
    deleting: bool = False,
    ready: bool = False,
    function: str = "hello",
) -> Obj:
    obj: Obj = {
        "metadata": {"name": name, "namespace": NS, "uid": f"u-{name}", "labels": {"lambdalet.dev/function": function}},
        "spec": {"containers": [{"name": "function", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {
            "phase": "Running" if running else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {
                    "name": "function",
                    "started": running,
                    "state": {"running": {}} if running else {"waiting": {"reason": "ContainerCreating"}},
                }
            ],
        },
    }
    if address:
        obj["status"]["podIP"] = address
    if deleting:
        obj["metadata"]["deletionTimestamp"] = "2026-11-27T01:00:00Z"
    return obj


def pod(name: str, **fields: Any) -> Pod:
    found = pod_of(pod_object(name, **fields))
    assert found is not None
    return found[1]


def pods(*items: Pod) -> dict[str, Pod]:
    return {item.name: item for item in items}


# ---- bookkeeping -----------------------------------------------------------------------------------


def test_pod_objects_name_the_agent_container_its_port_and_whether_it_may_be_used() -> None:
    sidecar = pod_object("img", address="10.0.0.7", running=True)
    sidecar["spec"]["containers"] = [
        {"name": "runtime"},
        {"name": "agent", "ports": [{"name": "http", "containerPort": 8081}]},
    ]
    sidecar["status"]["containerStatuses"] = [
        {"name": "runtime", "started": False, "state": {"waiting": {}}},
        {"name": "agent", "started": True, "state": {"running": {}}},
    ]
    found = pod_of(sidecar)
    assert found is not None
    key, parsed = found
    assert key == (NS, "hello") and parsed.endpoint().url == "http://10.0.0.7:8081"
    assert parsed.running and parsed.reachable and not parsed.ready
    # A container still in its startup probe, a pod being deleted, and a pod that ended are not usable.
    starting = pod_object("s", address="10.0.0.8", running=True)
    starting["status"]["containerStatuses"][0]["started"] = False
    assert not pod("s", address="10.0.0.8").reachable
    assert not pod_of(starting)[1].reachable  # type: ignore[index]
    assert pod("d", address="10.0.0.9", running=True, deleting=True).terminating
    ended = pod_object("e", address="10.0.0.10", running=True)
    ended["status"]["phase"] = "Succeeded"
    assert pod_of(ended)[1].terminating  # type: ignore[index]
    assert pod_of({"metadata": {"name": "gateway", "labels": {}}}) is None


def test_pod_book_folds_events_per_function() -> None:
    book = PodBook()
    assert book.apply("ADDED", pod_object("a")) == (NS, "hello")
    book.apply("ADDED", pod_object("x", function="other"))
    book.apply("MODIFIED", pod_object("a", address="10.0.0.1", running=True))
    assert book.pods((NS, "hello"))["a"].reachable
    book.apply("DELETED", pod_object("a"))
    assert book.pods((NS, "hello")) == {}
    assert book.replace(NS, [pod_object("b")]) == {(NS, "other"), (NS, "hello")}
    assert list(book.pods((NS, "hello"))) == ["b"] and book.pods((NS, "other")) == {}


async def test_a_pod_that_appears_while_a_start_waits_is_handed_over_on_its_agents_answer() -> None:
    loop = asyncio.get_running_loop()
    instances = Instances()
    instances.observe_pods({}, now=0, listed=True)
    first: asyncio.Future[Endpoint] = loop.create_future()
    second: asyncio.Future[Endpoint] = loop.create_future()
    instances.wait(first)
    instances.wait(second)
    instances.observe_pods(pods(pod("a")), now=1)
    assert instances.candidates() == []  # no address, no running container yet
    instances.observe_pods(pods(pod("a", address="10.0.0.1", running=True)), now=2)
    [candidate] = instances.candidates()
    assert candidate.name == "a"
    handed = instances.hand_over("a", "u-a")
    assert handed is not None and handed[0] is first and first.result().url == "http://10.0.0.1:8080"
    assert instances.early == {"a"} and instances.needed() == 2 and instances.candidates() == []
    assert instances.hand_over("a", "u-a") is None  # once only
    # Not in the EndpointSlice yet, or listed there not ready: still alive, not lost.
    assert instances.observe({}, now=3).lost == []
    assert instances.observe({"a": Endpoint("a", "u-a", "10.0.0.1", 8080, False, False)}, now=4).lost == []
    # Ready by its endpoint: an ordinary pod from now on.
    instances.observe({"a": Endpoint("a", "u-a", "10.0.0.1", 8080, True, False)}, now=5)
    assert instances.early == set() and list(instances.assigned) == ["a"] and not second.done()


async def test_adopted_pods_and_pods_nobody_waited_for_go_by_their_endpoint_only() -> None:
    loop = asyncio.get_running_loop()
    instances = Instances()
    instances.observe_pods(pods(pod("adopted", address="10.0.0.1", running=True)), now=0, listed=True)
    instances.observe_pods(
        pods(pod("adopted", address="10.0.0.1", running=True), pod("spare", address="10.0.0.2", running=True)), now=1
    )
    future: asyncio.Future[Endpoint] = loop.create_future()
    instances.wait(future)
    assert instances.candidates() == []
    assert instances.hand_over("adopted", "u-adopted") is None and instances.hand_over("spare", "u-spare") is None


async def test_a_pod_being_deleted_is_never_handed_out() -> None:
    loop = asyncio.get_running_loop()
    instances = Instances()
    instances.observe_pods({}, now=0, listed=True)
    future: asyncio.Future[Endpoint] = loop.create_future()
    instances.wait(future)
    instances.observe_pods(pods(pod("a", address="10.0.0.1", running=True)), now=1)
    assert [p.name for p in instances.candidates()] == ["a"]
    instances.observe_pods(pods(pod("a", address="10.0.0.1", running=True, deleting=True)), now=2)
    assert instances.candidates() == [] and instances.hand_over("a", "u-a") is None
    # Its endpoint may still read ready for a moment: the pod object wins.
    instances.observe({"a": Endpoint("a", "u-a", "10.0.0.1", 8080, True, False)}, now=3)
    assert not future.done() and instances.free == {}


async def test_a_pod_handed_out_early_is_lost_when_deleted_and_a_pod_ready_once_is_not_asked_again() -> None:
    loop = asyncio.get_running_loop()
    instances = Instances()
    instances.observe_pods({}, now=0, listed=True)
    for _ in range(2):
        instances.wait(loop.create_future())
    a = pod("a", address="10.0.0.1", running=True)
    b = pod("b", address="10.0.0.2", running=True)
    instances.observe_pods(pods(a, b), now=1)
    assert instances.hand_over("a", "u-a") is not None
    # b turns Ready, then loses readiness: from then on only its endpoint can make it usable.
    instances.observe_pods(pods(a, pod("b", address="10.0.0.2", running=True, ready=True)), now=2)
    instances.observe_pods(pods(a, b), now=3)
    assert instances.candidates() == [] and instances.hand_over("b", "u-b") is None
    observed = instances.observe_pods(pods(pod("a", address="10.0.0.1", running=True, deleting=True), b), now=4)
    assert [e.pod for e in observed.lost] == ["a"] and instances.early == set()


async def test_without_a_pod_view_the_endpoint_slice_alone_decides() -> None:
    instances = Instances()
    instances.wait(asyncio.get_running_loop().create_future())
    assert instances.candidates() == [] and instances.hand_over("a", "u-a") is None


# ---- the backend, with a real HTTP agent ---------------------------------------------------------


class Agent:
    """``GET /readyz`` answers from a script (the last answer repeats); counts the requests."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.asked = 0
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def readyz(self, request: web.Request) -> web.Response:
        status = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return web.Response(status=status, text="ready" if status == 200 else "initializing")

    async def __aenter__(self) -> Agent:
        app = web.Application()
        app.router.add_get("/readyz", self.readyz)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def agent_factory() -> AsyncIterator[Callable[[list[int]], Any]]:
    started: list[Agent] = []

    async def make(answers: list[int]) -> Agent:
        agent = await Agent(answers).__aenter__()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        await agent.__aexit__()


async def until(check: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def waiting_for(*names: str) -> tuple[FakeApi, Harness, asyncio.Task[Environment]]:
    """hello at zero replicas, a start waiting for a pod, and the named pods created (no address yet)."""
    api = FakeApi(functions=[function_object("hello")], deployments=[deployment("hello", 0)])
    harness = await opened(api)
    start = asyncio.create_task(harness.backend.start(harness.function("hello"), provisioned=False))
    await harness.settle()
    assert api.calls == [("scale", "hello", 1)]
    for name in names:
        api.emit("pods", "ADDED", pod_object(name))
    await harness.settle()
    return api, harness, start


async def test_a_cold_start_gets_the_new_pod_when_its_agent_answers_before_any_endpoint_is_ready(
    agent_factory: Callable[[list[int]], Any],
) -> None:
    agent = await agent_factory([503, 503, 503, 200])
    api, harness, start = await waiting_for("hello-a")
    api.emit("pods", "MODIFIED", pod_object("hello-a", address="127.0.0.1", port=agent.port, running=True))
    env = await asyncio.wait_for(start, 5)
    assert env.url == f"http://127.0.0.1:{agent.port}" and agent.asked == 4  # the first 200 is used
    # The pod's endpoint turns ready later: nothing changes, and nothing is lost.
    api.emit("endpointslices", "ADDED", endpoint_slice("hello", ("hello-a", True)))
    await harness.settle()
    assert harness.lost == []
    await harness.backend.close()


async def test_a_pod_whose_agent_never_answers_200_is_used_only_when_its_endpoint_is_ready(
    agent_factory: Callable[[list[int]], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_backend, "PROBE_MAX_INTERVAL_S", 0.02)
    agent = await agent_factory([503])
    api, harness, start = await waiting_for("hello-a")
    api.emit("pods", "MODIFIED", pod_object("hello-a", address="127.0.0.1", port=agent.port, running=True))
    await until(lambda: agent.asked >= 5)
    assert not start.done()
    api.emit("endpointslices", "ADDED", endpoint_slice("hello", ("hello-a", True)))  # the kubelet's verdict
    env = await asyncio.wait_for(start, 5)
    assert env.url == "http://10.0.0.1:8080"  # the EndpointSlice's address
    asked = agent.asked
    await asyncio.sleep(0.1)
    assert agent.asked == asked  # no longer asked once handed out
    await harness.backend.close()


async def test_a_pod_being_deleted_is_not_used_even_when_its_agent_answers(
    agent_factory: Callable[[list[int]], Any],
) -> None:
    doomed = await agent_factory([503, 503, 200])
    healthy = await agent_factory([200])
    api, harness, start = await waiting_for("hello-a", "hello-b")
    # hello-a is deleted (by hand, or its node goes) while its agent still initialises.
    api.emit("pods", "MODIFIED", pod_object("hello-a", address="127.0.0.1", port=doomed.port, running=True))
    await until(lambda: doomed.asked >= 1)
    api.emit(
        "pods", "MODIFIED", pod_object("hello-a", address="127.0.0.1", port=doomed.port, running=True, deleting=True)
    )
    await harness.settle()
    asked = doomed.asked
    await asyncio.sleep(0.2)
    assert not start.done() and doomed.asked == asked  # no longer asked, never handed out
    api.emit("pods", "MODIFIED", pod_object("hello-b", address="127.0.0.1", port=healthy.port, running=True))
    env = await asyncio.wait_for(start, 5)
    assert env.url == f"http://127.0.0.1:{healthy.port}"
    await harness.backend.close()


async def test_replicas_are_lowered_only_once_the_pods_in_use_are_ready(
    agent_factory: Callable[[list[int]], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_backend, "LOWER_POLL_S", 0.01)
    agent = await agent_factory([200])
    api = FakeApi(
        functions=[function_object("hello")],
        deployments=[deployment("hello", 1)],
        endpointslices=[endpoint_slice("hello", ("hello-a", True))],
    )
    api.replicas["hello"] = 1
    harness = await opened(api)
    function = harness.function("hello")
    warm = await asyncio.wait_for(harness.backend.start(function, provisioned=False), 5)
    start = asyncio.create_task(harness.backend.start(function, provisioned=False))
    await harness.settle()
    assert api.calls == [("scale", "hello", 2)]
    api.emit("pods", "ADDED", pod_object("hello-b"))
    await harness.settle()
    api.emit("pods", "MODIFIED", pod_object("hello-b", address="127.0.0.1", port=agent.port, running=True))
    early = await asyncio.wait_for(start, 5)
    # The warm pod is retired while hello-b (in use) is not Ready: a lower count now could make the
    # ReplicaSet remove hello-b. The pod is deleted at once, the count waits.
    stop = asyncio.create_task(harness.backend.stop(warm))
    await until(lambda: ("delete", "hello-a") in api.calls)
    await asyncio.sleep(0.1)
    assert not stop.done() and api.calls == [("scale", "hello", 2), ("delete", "hello-a")]
    api.emit("endpointslices", "MODIFIED", endpoint_slice("hello", ("hello-a", True), ("hello-b", True)))
    await asyncio.wait_for(stop, 5)
    assert api.calls == [("scale", "hello", 2), ("delete", "hello-a"), ("scale", "hello", 1)]
    assert early.id == f"{NS}/hello-b"
    await harness.backend.close()


async def test_asking_agents_can_be_turned_off_and_a_bad_value_is_named(
    agent_factory: Callable[[list[int]], Any],
) -> None:
    agent = await agent_factory([200])
    api = FakeApi(functions=[function_object("hello")], deployments=[deployment("hello", 0)])
    settings = Settings.from_env({"LAMBDALET_BACKEND": "kubernetes", "LAMBDALET_KUBE_PROBE_AGENTS": "0"})
    settings = settings.with_overrides(namespaces=(NS,))
    backend = KubernetesBackend(settings, lambda env: None, api=api)
    catalogs: list[Catalog] = []
    await backend.registry(catalogs.append).reload()
    start = asyncio.create_task(backend.start(catalogs[-1].functions["hello"].function, provisioned=False))
    await asyncio.sleep(0.01)
    api.emit("pods", "ADDED", pod_object("hello-a"))
    await asyncio.sleep(0.01)
    api.emit("pods", "MODIFIED", pod_object("hello-a", address="127.0.0.1", port=agent.port, running=True))
    await asyncio.sleep(0.2)
    assert agent.asked == 0 and not start.done()
    api.emit("endpointslices", "ADDED", endpoint_slice("hello", ("hello-a", True)))
    assert (await asyncio.wait_for(start, 5)).url == "http://10.0.0.1:8080"
    await backend.close()
    with pytest.raises(SettingsError, match="LAMBDALET_KUBE_PROBE_AGENTS must be true or false"):
        Settings.from_env({"LAMBDALET_KUBE_PROBE_AGENTS": "maybe"})
