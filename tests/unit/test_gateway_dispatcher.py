"""The dispatcher: admission (reserved and platform limits), the bounded wait queue, one invocation per
environment, reuse, start failures — with a five-line fake backend and an in-process fake agent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from gateway_loop_support import no_blocking
from lambdalet_gateway.backend import Environment, EnvironmentId, StartError
from lambdalet_gateway.dispatcher import Dispatcher
from lambdalet_gateway.errors import (
    ACCOUNT_LIMIT,
    RATE_LIMIT,
    RESERVED_LIMIT,
    ResourceNotFound,
    ResourceNotReady,
    Throttled,
)
from lambdalet_gateway.metrics import Metrics
from lambdalet_gateway.settings import Settings

from lambdalet.spec import Function

pytestmark = pytest.mark.usefixtures(no_blocking.__name__)


def function(name: str = "fn", **spec: Any) -> Function:
    return Function.model_validate(
        {
            "apiVersion": "lambdalet.dev/v1alpha1",
            "kind": "Function",
            "metadata": {"name": name},
            "spec": {"runtime": "python3.12", "handler": "app.handler", "code": {"inline": {"files": {"app.py": ""}}}}
            | spec,
        }
    )


@dataclass
class FakeAgent:
    """Answers invocations; holds them until ``release`` is set; records per-environment overlap."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    running: dict[str, int] = field(default_factory=dict)
    max_running: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    async def serve(self, env: str) -> web.AppRunner:
        """One agent server per environment, on an ephemeral loopback port."""

        async def handle(request: web.Request) -> web.Response:
            return await self.handle(env, request)

        app = web.Application()
        app.router.add_post("/2015-03-31/functions/function/invocations", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    async def handle(self, env: str, request: web.Request) -> web.Response:
        self.calls += 1
        self.running[env] = self.running.get(env, 0) + 1
        self.max_running[env] = max(self.max_running.get(env, 0), self.running[env])
        try:
            await self.release.wait()
        finally:
            self.running[env] -= 1
        event = await request.json()
        return web.json_response({"env": env, "event": event, "rid": request.headers["X-Lambdalet-Request-Id"]})


@dataclass
class FakeBackend:
    agent: FakeAgent
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    fail: StartError | None = None
    started: list[Environment] = field(default_factory=list)
    stopped: list[Environment] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)
    count: int = 0

    async def start(self, function: Function, *, provisioned: bool) -> Environment:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        env_id = EnvironmentId(f"{function.name}-{self.count}")
        self.count += 1
        runner = await self.agent.serve(env_id)
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        env = Environment(env_id, function.name, f"http://{host}:{port}", provisioned)
        self.started.append(env)
        return env

    async def stop(self, environment: Environment) -> None:
        self.stopped.append(environment)

    async def close(self) -> None:
        pass


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
async def backend(agent: FakeAgent) -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(agent)
    fake.gate.set()
    yield fake
    agent.release.set()
    for runner in fake.runners:
        await runner.cleanup()


class Closer:
    async def close(self) -> None:
        pass


async def make(backend: FakeBackend, *functions: Function, **settings: Any) -> tuple[Dispatcher, Closer]:
    dispatcher = Dispatcher(backend, Settings(**settings), Metrics())
    dispatcher.set_functions({f.name: f for f in functions})
    return dispatcher, Closer()


async def until(predicate: Any) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_scale_from_zero_then_reuse(agent: FakeAgent, backend: FakeBackend) -> None:
    agent.release.set()
    dispatcher, session = await make(backend, function())
    try:
        first = await dispatcher.invoke("fn", b'{"n": 1}', request_id="r1")
        second = await dispatcher.invoke("fn", b'{"n": 2}', request_id="r2")
        assert json.loads(first.payload) == {"env": "fn-0", "event": {"n": 1}, "rid": "r1"}
        assert json.loads(second.payload)["env"] == "fn-0"
        assert len(backend.started) == 1
    finally:
        await dispatcher.close()
        await session.close()


async def test_one_invocation_per_environment(agent: FakeAgent, backend: FakeBackend) -> None:
    dispatcher, session = await make(backend, function())
    try:
        calls = [asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id=f"r{i}")) for i in range(4)]
        await until(lambda: agent.calls == 4)
        agent.release.set()
        results = await asyncio.gather(*calls)
        assert len({json.loads(r.payload)["env"] for r in results}) == 4
        assert set(agent.max_running.values()) == {1}
    finally:
        await dispatcher.close()
        await session.close()


async def test_reserved_concurrency_caps_and_throttles(agent: FakeAgent, backend: FakeBackend) -> None:
    dispatcher, session = await make(backend, function(reservedConcurrency=2))
    try:
        held = [asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id=f"r{i}")) for i in range(2)]
        await until(lambda: agent.calls == 2)
        with pytest.raises(Throttled) as caught:
            await dispatcher.invoke("fn", b"{}", request_id="r3")
        assert caught.value.reason == RESERVED_LIMIT
        assert caught.value.request_id == "r3"
        agent.release.set()
        await asyncio.gather(*held)
        await dispatcher.invoke("fn", b"{}", request_id="r4")
    finally:
        await dispatcher.close()
        await session.close()


async def test_reserved_zero_throttles_everything(backend: FakeBackend) -> None:
    dispatcher, session = await make(backend, function(reservedConcurrency=0))
    try:
        with pytest.raises(Throttled) as caught:
            await dispatcher.invoke("fn", b"{}", request_id="r")
        assert caught.value.reason == RESERVED_LIMIT
        assert backend.started == []
    finally:
        await dispatcher.close()
        await session.close()


async def test_platform_limit_applies_to_unreserved_functions(agent: FakeAgent, backend: FakeBackend) -> None:
    dispatcher, session = await make(backend, function("a"), function("b"), concurrency_limit=2)
    try:
        held = [
            asyncio.create_task(dispatcher.invoke("a", b"{}", request_id="1")),
            asyncio.create_task(dispatcher.invoke("b", b"{}", request_id="2")),
        ]
        await until(lambda: agent.calls == 2)
        with pytest.raises(Throttled) as caught:
            await dispatcher.invoke("a", b"{}", request_id="3")
        assert caught.value.reason == ACCOUNT_LIMIT
        agent.release.set()
        await asyncio.gather(*held)
    finally:
        await dispatcher.close()
        await session.close()


async def test_reservations_are_carved_out_of_the_platform_limit(agent: FakeAgent, backend: FakeBackend) -> None:
    dispatcher, session = await make(backend, function("r", reservedConcurrency=2), function("u"), concurrency_limit=3)
    try:
        held = [asyncio.create_task(dispatcher.invoke("u", b"{}", request_id="1"))]
        await until(lambda: agent.calls == 1)
        with pytest.raises(Throttled) as caught:
            await dispatcher.invoke("u", b"{}", request_id="2")
        assert caught.value.reason == ACCOUNT_LIMIT
        held += [asyncio.create_task(dispatcher.invoke("r", b"{}", request_id=f"r{i}")) for i in range(2)]
        await until(lambda: agent.calls == 3)
        agent.release.set()
        await asyncio.gather(*held)
    finally:
        await dispatcher.close()
        await session.close()


async def test_wait_queue_is_bounded_by_size(agent: FakeAgent, backend: FakeBackend) -> None:
    backend.gate.clear()
    agent.release.set()
    dispatcher, session = await make(backend, function(), queue_size=2)
    try:
        waiting = [asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id=f"r{i}")) for i in range(2)]
        await until(lambda: dispatcher.snapshots()[0].waiting == 2)
        with pytest.raises(Throttled) as caught:
            await dispatcher.invoke("fn", b"{}", request_id="r3")
        assert caught.value.reason == RATE_LIMIT
        backend.gate.set()
        await asyncio.gather(*waiting)
    finally:
        await dispatcher.close()
        await session.close()


async def test_wait_queue_is_bounded_by_time(backend: FakeBackend) -> None:
    backend.gate.clear()
    dispatcher, session = await make(backend, function(), queue_timeout_s=0.05)
    try:
        with pytest.raises(ResourceNotReady):
            await dispatcher.invoke("fn", b"{}", request_id="r")
        assert dispatcher.snapshots()[0].waiting == 0
        assert dispatcher.snapshots()[0].in_flight == 0
    finally:
        backend.gate.set()
        await dispatcher.close()
        await session.close()


async def test_code_that_cannot_start_is_a_function_error(backend: FakeBackend) -> None:
    backend.fail = StartError("no compiler", function_error=True, error_type="Runtime.BuildError")
    dispatcher, session = await make(backend, function())
    try:
        result = await dispatcher.invoke("fn", b"{}", request_id="r")
        assert result.function_error == "Unhandled"
        assert json.loads(result.payload) == {
            "errorMessage": "no compiler",
            "errorType": "Runtime.BuildError",
            "stackTrace": [],
        }
    finally:
        await dispatcher.close()
        await session.close()


async def test_unknown_and_removed_functions_are_not_found(agent: FakeAgent, backend: FakeBackend) -> None:
    agent.release.set()
    dispatcher, session = await make(backend, function())
    try:
        with pytest.raises(ResourceNotFound):
            await dispatcher.invoke("other", b"{}", request_id="r")
        await dispatcher.invoke("fn", b"{}", request_id="r")
        dispatcher.set_functions({})
        with pytest.raises(ResourceNotFound):
            await dispatcher.invoke("fn", b"{}", request_id="r")
        await until(lambda: len(backend.stopped) == 1)
    finally:
        await dispatcher.close()
        await session.close()


async def test_a_changed_function_gets_new_environments(agent: FakeAgent, backend: FakeBackend) -> None:
    agent.release.set()
    dispatcher, session = await make(backend, function())
    try:
        await dispatcher.invoke("fn", b"{}", request_id="r")
        dispatcher.set_functions({"fn": function(memoryMB=256)})
        result = await dispatcher.invoke("fn", b"{}", request_id="r")
        assert json.loads(result.payload)["env"] == "fn-1"
        await until(lambda: [e.id for e in backend.stopped] == ["fn-0"])
    finally:
        await dispatcher.close()
        await session.close()


async def test_provisioned_environments_start_without_invocations(backend: FakeBackend) -> None:
    dispatcher, session = await make(backend, function(provisionedConcurrency=2))
    try:
        await until(lambda: dispatcher.snapshots()[0].idle == 2)
        assert all(env.provisioned for env in backend.started)
    finally:
        await dispatcher.close()
        await session.close()
