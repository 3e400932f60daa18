"""The dispatcher: admission (reserved and platform limits), the bounded wait queue, one invocation per
environment, reuse, start failures — with a five-line fake backend and an in-process fake agent; streamed
responses passed on as they arrive, holding their environment and concurrency until they end, buffered
by ``invoke`` up to the response limit, drained when abandoned."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from gateway_loop_support import no_blocking
from gateway_stream_support import DIE, END, STREAM_HEAD, StreamingAgent, chunk, trailers
from lambdalet_gateway import dispatcher as dispatcher_module
from lambdalet_gateway.backend import Environment, EnvironmentId, StartError
from lambdalet_gateway.dispatcher import Dispatcher, StreamedResult
from lambdalet_gateway.errors import (
    ACCOUNT_LIMIT,
    RATE_LIMIT,
    RESERVED_LIMIT,
    ResourceNotFound,
    ResourceNotReady,
    ServiceError,
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
    #: The connections each environment was sent invocations on.
    connections: dict[str, set[int]] = field(default_factory=dict)
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
        self.connections.setdefault(env, set()).add(id(request.transport))
        if request.headers["X-Lambdalet-Request-Id"].startswith("broken"):
            return web.Response(status=500, text="the agent broke")
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


# reserved concurrency counts invocations, not environments (four of them share one with N = 4)
@pytest.mark.parametrize(("reserved", "per_environment", "environments"), [(2, 1, 2), (4, 4, 1)])
async def test_reserved_concurrency_caps_and_throttles(
    agent: FakeAgent, backend: FakeBackend, reserved: int, per_environment: int, environments: int
) -> None:
    dispatcher, session = await make(
        backend, function(reservedConcurrency=reserved, perEnvironmentConcurrency=per_environment)
    )
    try:
        held = [asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id=f"r{i}")) for i in range(reserved)]
        await until(lambda: agent.calls == reserved)
        with pytest.raises(Throttled) as caught:
            await dispatcher.invoke("fn", b"{}", request_id="r3")
        assert caught.value.reason == RESERVED_LIMIT
        assert caught.value.request_id == "r3"
        assert len(backend.started) == environments
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


# ---- streamed responses -----------------------------------------------------------------------------


@dataclass
class StreamBackend:
    """Environments that are fake agents answering in the streamed-response format (``agent.pieces``)."""

    agent: StreamingAgent = field(default_factory=StreamingAgent)
    stopped: list[Environment] = field(default_factory=list)

    async def start(self, function: Function, *, provisioned: bool) -> Environment:
        port = await self.agent.listen()
        env_id = EnvironmentId(f"{function.name}-{len(self.agent.servers)}")
        return Environment(env_id, function.name, f"http://127.0.0.1:{port}", provisioned)

    async def stop(self, environment: Environment) -> None:
        self.stopped.append(environment)

    async def close(self) -> None:
        pass


@pytest.fixture
async def streams() -> AsyncIterator[StreamBackend]:
    backend = StreamBackend()
    yield backend
    await backend.agent.close()


async def stream_dispatcher(backend: StreamBackend, *functions: Function) -> Dispatcher:
    dispatcher = Dispatcher(backend, Settings(), Metrics())
    dispatcher.set_functions({f.name: f for f in functions})
    return dispatcher


async def test_a_stream_is_passed_on_as_it_arrives_and_holds_its_environment(streams: StreamBackend) -> None:
    dispatcher = await stream_dispatcher(streams, function())
    try:
        streams.agent.send(STREAM_HEAD + chunk(b"one "))
        result = await dispatcher.invoke_stream("fn", b"{}", request_id="r1")
        assert isinstance(result, StreamedResult)
        assert result.content_type == "text/plain"
        assert await anext(result) == b"one "
        assert dispatcher.snapshots()[0].busy == 1
        streams.agent.send(chunk(b"two"))
        assert await anext(result) == b"two"
        streams.agent.send(trailers(X_Lambdalet_Duration_Ms="7.5", X_Amz_Log_Result="bG9n"))
        streams.agent.send(END)
        assert [piece async for piece in result] == []
        result.close()
        assert result.function_error is None
        assert result.duration_ms == 7.5
        assert result.log_result == "bG9n"
        snapshot = dispatcher.snapshots()[0]
        assert (snapshot.busy, snapshot.idle, snapshot.in_flight) == (0, 1, 0)
    finally:
        await dispatcher.close()


async def test_an_error_after_the_first_bytes_is_a_function_error(streams: StreamBackend) -> None:
    error = {"errorType": "Error", "errorMessage": "midway", "trace": []}
    encoded = base64.b64encode(json.dumps(error).encode()).decode()
    dispatcher = await stream_dispatcher(streams, function())
    try:
        streams.agent.send(
            STREAM_HEAD
            + chunk(b"partial")
            + trailers(Lambda_Runtime_Function_Error_Type="Error", Lambda_Runtime_Function_Error_Body=encoded)
        )
        streams.agent.send(END)
        result = await dispatcher.invoke_stream("fn", b"{}", request_id="r1")
        assert isinstance(result, StreamedResult)
        assert [piece async for piece in result] == [b"partial"]
        assert result.function_error == "Unhandled"
        assert result.error is not None and json.loads(result.error) == error
        # the same through invoke (Lambda's Invoke of a streaming function): a function error
        streams.agent.send(
            STREAM_HEAD + chunk(b"partial") + trailers(Lambda_Runtime_Function_Error_Type="Sandbox.Timedout")
        )
        streams.agent.send(END)
        buffered = await dispatcher.invoke("fn", b"{}", request_id="r2")
        assert buffered.function_error == "Unhandled"
        assert json.loads(buffered.payload) == {"errorType": "Sandbox.Timedout", "errorMessage": "Sandbox.Timedout"}
    finally:
        await dispatcher.close()


async def test_invoke_buffers_a_stream_up_to_the_response_limit(
    streams: StreamBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = await stream_dispatcher(streams, function())
    try:
        streams.agent.send(STREAM_HEAD + chunk(b"ab") + chunk(b"cd") + trailers())
        streams.agent.send(END)
        result = await dispatcher.invoke("fn", b"{}", request_id="r1")
        assert (result.payload, result.content_type, result.function_error) == (b"abcd", "text/plain", None)
        monkeypatch.setattr(dispatcher_module, "MAX_BUFFERED_RESPONSE", 3)
        streams.agent.send(STREAM_HEAD + chunk(b"ab") + chunk(b"cd"))
        oversized = await dispatcher.invoke("fn", b"{}", request_id="r2")
        assert oversized.function_error == "Unhandled"
        assert json.loads(oversized.payload)["errorType"] == "Function.ResponseSizeTooLarge"
        # the rest of the stream is drained; the environment is free once the function ends
        assert dispatcher.snapshots()[0].busy == 1
        streams.agent.send(chunk(b"ef") + trailers())
        streams.agent.send(END)
        await until(lambda: dispatcher.snapshots()[0].idle == 1)
        assert dispatcher.snapshots()[0].in_flight == 0
    finally:
        await dispatcher.close()


async def test_an_open_stream_counts_against_concurrency_until_it_ends(streams: StreamBackend) -> None:
    dispatcher = await stream_dispatcher(streams, function(reservedConcurrency=1))
    try:
        streams.agent.send(STREAM_HEAD + chunk(b"x"))
        result = await dispatcher.invoke_stream("fn", b"{}", request_id="r1")
        assert isinstance(result, StreamedResult)
        with pytest.raises(Throttled):
            await dispatcher.invoke_stream("fn", b"{}", request_id="r2")
        result.close()  # the caller went away: the stream is drained in the background
        with pytest.raises(Throttled):
            await dispatcher.invoke_stream("fn", b"{}", request_id="r3")
        streams.agent.send(trailers())
        streams.agent.send(END)
        await until(lambda: dispatcher.snapshots()[0].in_flight == 0)
        streams.agent.send(STREAM_HEAD + chunk(b"y") + trailers())
        streams.agent.send(END)
        assert (await dispatcher.invoke("fn", b"{}", request_id="r4")).payload == b"y"
        assert len(streams.agent.requests) == 2
    finally:
        await dispatcher.close()


async def test_an_environment_that_dies_mid_stream_is_a_failure_and_is_replaced(streams: StreamBackend) -> None:
    dispatcher = await stream_dispatcher(streams, function())
    try:
        streams.agent.send(STREAM_HEAD + chunk(b"x"))
        streams.agent.send(DIE)
        result = await dispatcher.invoke_stream("fn", b"{}", request_id="r1")
        assert isinstance(result, StreamedResult)
        assert [piece async for piece in result] == [b"x"]
        assert result.failure is not None and "mid-stream" in result.failure
        await until(lambda: len(streams.stopped) == 1)
        assert dispatcher.snapshots()[0].in_flight == 0
        streams.agent.send(STREAM_HEAD + chunk(b"y"))
        streams.agent.send(DIE)
        with pytest.raises(ServiceError):
            await dispatcher.invoke("fn", b"{}", request_id="r2")
    finally:
        await dispatcher.close()


async def test_an_environment_takes_per_environment_concurrency_invocations_before_another_starts(
    agent: FakeAgent, backend: FakeBackend
) -> None:
    dispatcher, session = await make(backend, function(perEnvironmentConcurrency=4))
    try:
        first = [asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id=f"r{i}")) for i in range(4)]
        await until(lambda: agent.calls == 4)
        assert [env.id for env in backend.started] == ["fn-0"]
        assert agent.max_running == {"fn-0": 4}
        [snapshot] = dispatcher.snapshots()
        assert (snapshot.busy, snapshot.idle, snapshot.in_flight) == (1, 0, 4)
        fifth = asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id="r4"))
        await until(lambda: agent.calls == 5)
        assert [env.id for env in backend.started] == ["fn-0", "fn-1"]
        agent.release.set()
        results = await asyncio.gather(*first, fifth)
        assert [json.loads(r.payload)["env"] for r in results] == ["fn-0"] * 4 + ["fn-1"]
        [snapshot] = dispatcher.snapshots()
        assert (snapshot.busy, snapshot.idle, snapshot.in_flight) == (0, 2, 0)
    finally:
        await dispatcher.close()
        await session.close()


async def test_waiting_invocations_start_one_environment_for_every_n(agent: FakeAgent, backend: FakeBackend) -> None:
    backend.gate.clear()
    dispatcher, session = await make(backend, function(perEnvironmentConcurrency=3))
    try:
        calls = [asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id=f"r{i}")) for i in range(7)]
        await until(lambda: dispatcher.snapshots()[0].waiting == 7)
        assert dispatcher.snapshots()[0].starting == 3
        backend.gate.set()
        await until(lambda: agent.calls == 7)
        assert sorted(agent.max_running.values()) == [1, 3, 3]
        agent.release.set()
        await asyncio.gather(*calls)
        assert len(backend.started) == 3
    finally:
        await dispatcher.close()
        await session.close()


async def test_a_freed_slot_goes_to_a_waiter_and_the_environment_idles_only_when_empty(
    agent: FakeAgent, backend: FakeBackend
) -> None:
    dispatcher, session = await make(backend, function(reservedConcurrency=3, perEnvironmentConcurrency=2))
    try:
        # cap 3 invocations at 2 per environment: at most 2 environments
        calls = [asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id=f"r{i}")) for i in range(3)]
        await until(lambda: agent.calls == 3)
        assert len(backend.started) == 2
        agent.release.set()
        await asyncio.gather(*calls)
        agent.release.clear()
        one = asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id="again"))
        await until(lambda: agent.calls == 4)
        [snapshot] = dispatcher.snapshots()
        assert (snapshot.busy, snapshot.idle, snapshot.in_flight) == (1, 1, 1)
        agent.release.set()
        await one
        assert len(backend.started) == 2 and backend.stopped == []
    finally:
        await dispatcher.close()
        await session.close()


async def test_an_environment_with_n_slots_keeps_n_connections(agent: FakeAgent, backend: FakeBackend) -> None:
    agent.release.set()
    dispatcher, session = await make(backend, function(perEnvironmentConcurrency=2))
    try:
        for round_ in range(3):
            await asyncio.gather(*(dispatcher.invoke("fn", b"{}", request_id=f"r{round_}{i}") for i in range(2)))
        await dispatcher.invoke("fn", b"{}", request_id="alone")
        assert len(backend.started) == 1
        assert len(agent.connections["fn-0"]) == 2
    finally:
        await dispatcher.close()
        await session.close()


async def test_an_environment_failing_under_one_invocation_is_stopped_once(
    agent: FakeAgent, backend: FakeBackend
) -> None:
    dispatcher, session = await make(backend, function(perEnvironmentConcurrency=2))
    try:
        held = asyncio.create_task(dispatcher.invoke("fn", b"{}", request_id="held"))
        await until(lambda: agent.calls == 1)
        with pytest.raises(ServiceError, match="answered 500"):
            await dispatcher.invoke("fn", b"{}", request_id="broken")
        await until(lambda: len(backend.stopped) == 1)
        agent.release.set()
        assert json.loads((await held).payload)["env"] == "fn-0"
        after = await dispatcher.invoke("fn", b"{}", request_id="after")
        assert json.loads(after.payload)["env"] == "fn-1"
        assert [env.id for env in backend.stopped] == ["fn-0"]
        [snapshot] = dispatcher.snapshots()
        assert (snapshot.busy, snapshot.idle, snapshot.in_flight) == (0, 1, 0)
    finally:
        await dispatcher.close()
        await session.close()
