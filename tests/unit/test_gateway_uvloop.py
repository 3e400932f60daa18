"""The gateway on uvloop: the choice of event loop, and the agent client's protocol on uvloop's transports
(which are not subclasses of asyncio's), run with ``uvloop.run`` rather than pytest-asyncio's loop."""

from __future__ import annotations

import builtins
from typing import Any

import pytest
import uvloop
from gateway_stream_support import DIE, END, STREAM_HEAD, StreamingAgent, chunk, trailers
from lambdalet_gateway.agent_client import AgentConnection, AgentConnectionError
from lambdalet_gateway.app import event_loop_factory
from lambdalet_gateway.settings import SettingsError


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def _kind(factory: Any) -> str:
    loop = factory()
    try:
        return "uvloop" if isinstance(loop, uvloop.Loop) else type(loop).__module__.split(".")[0]
    finally:
        loop.close()


def test_auto_and_uvloop_choose_uvloop_where_installed() -> None:
    assert _kind(event_loop_factory()) == "uvloop"
    assert _kind(event_loop_factory("auto")) == "uvloop"
    assert _kind(event_loop_factory("uvloop")) == "uvloop"


def test_asyncio_opts_out() -> None:
    assert _kind(event_loop_factory("asyncio")) == "asyncio"


def test_an_unknown_choice_is_an_error_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"unknown event loop 'tokio' \(LAMBDALET_EVENT_LOOP\); known: auto"):
        event_loop_factory("tokio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert _kind(event_loop_factory("auto")) == "asyncio"
    with pytest.raises(SettingsError, match=r"uvloop \(LAMBDALET_EVENT_LOOP=uvloop\) is not installed"):
        event_loop_factory("uvloop")


def test_keep_alive_and_a_streamed_body_on_uvloop() -> None:
    async def scenario() -> None:
        agent = StreamingAgent()
        connection = AgentConnection("127.0.0.1", await agent.listen())
        try:
            for i in range(3):
                agent.send(_ok(b'{"n": %d}' % i), END)
                response = await connection.post(b"/", {"X-Lambdalet-Request-Id": f"r{i}"}, b"{}")
                assert (response.status, response.body) == (200, b'{"n": %d}' % i)
            agent.send(STREAM_HEAD, chunk(b"first"))
            response = await connection.post(b"/", {}, b"{}")
            assert response.stream is not None
            assert await response.stream.read() == b"first"
            agent.send(chunk(b"second"), trailers(X_Lambdalet_Duration_Ms="2"), END)
            assert await response.stream.read() == b"second"
            assert await response.stream.read() is None
            assert response.stream.trailers == {"x-lambdalet-duration-ms": "2"}
            assert agent.connections == 1
            assert b"\r\nX-Lambdalet-Request-Id: r2\r\n" in agent.requests[2]
        finally:
            connection.close()
            await agent.close()

    uvloop.run(scenario())


def test_an_agent_that_dies_mid_request_is_an_error_on_uvloop() -> None:
    async def scenario() -> None:
        agent = StreamingAgent()
        connection = AgentConnection("127.0.0.1", await agent.listen())
        try:
            agent.send(DIE)
            with pytest.raises(AgentConnectionError):
                await connection.post(b"/", {}, b"{}")
            assert not connection.open
            assert len(agent.requests) == 1
        finally:
            connection.close()
            await agent.close()

    uvloop.run(scenario())
