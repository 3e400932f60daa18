"""Redelivery: an environment whose agent refuses the connection (its pod is gone, nothing of the request
was written) is stopped and the invocation goes to another environment; an agent that fails after the
request was sent is never retried (the function may have run)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from lambdalet_gateway.backend import Environment, EnvironmentId
from lambdalet_gateway.dispatcher import Dispatcher
from lambdalet_gateway.errors import ServiceError
from lambdalet_gateway.metrics import Metrics
from lambdalet_gateway.settings import Settings

from lambdalet.spec import Function


def refused_url() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class Backend:
    """Hands out the given URLs in order, one environment each."""

    urls: list[str]
    stopped: list[str] = field(default_factory=list)

    async def start(self, function: Function, *, provisioned: bool) -> Environment:
        url = self.urls.pop(0)
        return Environment(EnvironmentId(url), function.name, url, provisioned)

    async def stop(self, environment: Environment) -> None:
        self.stopped.append(environment.url)

    async def close(self) -> None:
        pass


async def agent(handler: Callable[[web.Request], Awaitable[web.Response]]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/2015-03-31/functions/function/invocations", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def function() -> Function:
    return Function.model_validate(
        {
            "metadata": {"name": "hello"},
            "spec": {"runtime": "python3.12", "handler": "app.handler", "code": {"inline": {"files": {"a.py": ""}}}},
        }
    )


async def test_a_refused_connection_is_delivered_to_another_environment() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    runner, url = await agent(answer)
    dead = refused_url()
    backend = Backend([dead, url])
    dispatcher = Dispatcher(backend, Settings(), Metrics())
    dispatcher.set_functions({"hello": function()})
    try:
        result = await dispatcher.invoke("hello", b"{}", request_id="r1")
        assert result.payload == b'{"ok": true}'
        await dispatcher.close()
        assert backend.stopped[0] == dead
    finally:
        await runner.cleanup()


async def test_a_failure_after_the_request_was_sent_is_not_retried() -> None:
    calls: list[str] = []

    async def crash(request: web.Request) -> web.Response:
        calls.append(request.headers["X-Lambdalet-Request-Id"])
        assert request.transport is not None
        request.transport.close()  # the agent dies mid-invocation
        return web.Response()

    runner, url = await agent(crash)
    backend = Backend([url, refused_url()])
    dispatcher = Dispatcher(backend, Settings(), Metrics())
    dispatcher.set_functions({"hello": function()})
    try:
        with pytest.raises(ServiceError):
            await dispatcher.invoke("hello", b"{}", request_id="r2")
        assert calls == ["r2"]
        await dispatcher.close()
    finally:
        await runner.cleanup()
