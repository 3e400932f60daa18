"""The Runtime API over real HTTP, with the test playing the runtime (the agent's child process is an
idle stand-in): the reference's vectors RT-1 to RT-9, plus a second concurrent /next."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from agent_support import RunningAgent, running_agent

IDLE = (sys.executable, "-c", "import time; time.sleep(600)")
STATE_ERROR = "State transition from {} to {} failed for runtime. Error: State transition is not allowed"


@pytest.fixture
async def agent() -> AsyncIterator[RunningAgent]:
    async with running_agent("app.handler", command=IDLE, runtime=None, timeout_s=5) as running:
        yield running


def api(agent: RunningAgent, path: str) -> str:
    return f"http://{agent.agent.env.runtime_api_address}/2018-06-01/runtime{path}"


async def next_event(agent: RunningAgent) -> tuple[dict[str, str], bytes]:
    async with agent.session.get(api(agent, "/invocation/next")) as response:
        assert response.status == 200
        return dict(response.headers), await response.read()


async def post(
    agent: RunningAgent, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    data: bytes | io.BytesIO = io.BytesIO(body) if len(body) > 1024 * 1024 else body
    async with agent.session.post(api(agent, path), data=data, headers=headers or {}) as response:
        return response.status, await response.json(content_type=None)


async def test_next_delivers_the_event_with_lambda_headers_and_response_reaches_the_caller(agent: RunningAgent) -> None:
    trace = "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1"
    context = base64.b64encode(b'{"custom":{"a":1}}').decode()
    caller = asyncio.ensure_future(
        agent.invoke({"key1": "value1"}, headers={"X-Amzn-Trace-Id": trace, "X-Amz-Client-Context": context})
    )
    before = int(time.time() * 1000)
    headers, body = await next_event(agent)
    assert body == b'{"key1": "value1"}'
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    assert headers["Content-Type"] == "application/json"
    assert before + 4800 <= int(headers["Lambda-Runtime-Deadline-Ms"]) <= before + 5200
    assert headers["Lambda-Runtime-Invoked-Function-Arn"] == "arn:aws:lambda:us-east-1:012345678912:function:function"
    assert headers["Lambda-Runtime-Trace-Id"] == trace
    assert headers["Lambda-Runtime-Client-Context"] == '{"custom":{"a":1}}'
    assert "Lambda-Runtime-Cognito-Identity" not in headers  # empty headers are omitted
    status, reply = await post(
        agent, f"/invocation/{request_id}/response", b"<p>hello</p>", {"Content-Type": "text/html"}
    )
    assert (status, reply) == (202, {"status": "OK"})
    result = await caller
    assert result.status == 200
    assert result.body == b"<p>hello</p>"
    assert result.headers["Content-Type"] == "text/html"
    assert result.headers["x-amzn-RequestId"] == request_id
    # RT-3: a second response, or an error after it, is an invalid transition.
    status, reply = await post(agent, f"/invocation/{request_id}/response", b"{}")
    assert (status, reply) == (
        403,
        {
            "errorMessage": STATE_ERROR.format("RuntimeResponseSentState", "InvocationResponse"),
            "errorType": "InvalidStateTransition",
        },
    )
    status, reply = await post(agent, f"/invocation/{request_id}/error", b"{}")
    assert status == 403
    assert reply["errorType"] == "InvalidStateTransition"


async def test_unknown_request_id_is_400(agent: RunningAgent) -> None:
    caller = asyncio.ensure_future(agent.invoke({}))
    headers, _ = await next_event(agent)
    status, reply = await post(agent, "/invocation/not-the-current-id/response", b"{}")
    assert (status, reply) == (400, {"errorMessage": "Invalid request ID", "errorType": "InvalidRequestID"})
    await post(agent, f"/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response", b"1")
    assert (await caller).body == b"1"


async def test_response_without_invocation_is_403(agent: RunningAgent) -> None:
    status, reply = await post(agent, "/invocation/some-id/response", b"{}")
    assert (status, reply) == (
        403,
        {"errorMessage": STATE_ERROR.format("Started", "InvocationResponse"), "errorType": "InvalidStateTransition"},
    )


async def test_oversize_response_is_413_and_the_caller_gets_response_size_too_large(agent: RunningAgent) -> None:
    caller = asyncio.ensure_future(agent.invoke({}))
    headers, _ = await next_event(agent)
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    status, reply = await post(agent, f"/invocation/{request_id}/response", b"x" * 6291557)
    assert (status, reply) == (
        413,
        {
            "errorMessage": "Exceeded maximum allowed payload size (6291556 bytes).",
            "errorType": "RequestEntityTooLarge",
        },
    )
    result = await caller
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.json()["errorType"] == "Function.ResponseSizeTooLarge"


async def test_invocation_error_reaches_the_caller_as_unhandled(agent: RunningAgent) -> None:
    caller = asyncio.ensure_future(agent.invoke({}))
    headers, _ = await next_event(agent)
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    error = b'{"errorMessage":"Error parsing event data.","errorType":"InvalidEventDataException","stackTrace":[]}'
    status, reply = await post(
        agent,
        f"/invocation/{request_id}/error",
        error,
        {
            "Content-Type": "application/vnd.aws.lambda.error+json",
            "Lambda-Runtime-Function-Error-Type": "Runtime.UnknownReason",
        },
    )
    assert (status, reply) == (202, {"status": "OK"})
    result = await caller
    assert result.status == 200
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.body == error


async def test_init_error_is_the_first_invocations_answer_and_refused_after_init(agent: RunningAgent) -> None:
    error = b'{"errorMessage":"Handler \'app.nope\' missing","errorType":"Runtime.NoSuchHandler","stackTrace":[]}'
    status, reply = await post(
        agent, "/init/error", error, {"Lambda-Runtime-Function-Error-Type": "Runtime.NoSuchHandler"}
    )
    assert (status, reply) == (202, {"status": "OK"})
    async with agent.session.get(agent.url + "/readyz") as ready:
        assert ready.status == 200  # init is over (it failed); the error is reported to the next invocation
    status, reply = await post(agent, "/init/error", error)
    assert status == 403
    assert reply["errorMessage"] == STATE_ERROR.format("InitError", "InitError")
    result = await agent.invoke({})
    assert result.status == 200
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.body == error
    assert result.headers["X-Lambdalet-Reset"] == "1"


async def test_init_error_after_init_is_403(agent: RunningAgent) -> None:
    caller = asyncio.ensure_future(agent.invoke({}))
    headers, _ = await next_event(agent)
    status, reply = await post(agent, "/init/error", b"{}")
    assert (status, reply["errorMessage"]) == (403, STATE_ERROR.format("Running", "InitError"))
    await post(agent, f"/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response", b"{}")
    await caller


async def test_a_second_concurrent_next_is_403(agent: RunningAgent) -> None:
    first = asyncio.ensure_future(agent.session.get(api(agent, "/invocation/next")))
    async with agent.session.get(agent.url + "/readyz") as ready:
        while ready.status != 200:
            await asyncio.sleep(0.01)
            async with agent.session.get(agent.url + "/readyz") as again:
                if again.status == 200:
                    break
    async with agent.session.get(api(agent, "/invocation/next")) as second:
        assert second.status == 403
        assert (await second.json())["errorMessage"] == STATE_ERROR.format("Ready", "Ready")
    caller = asyncio.ensure_future(agent.invoke({"n": 1}))
    response = await first
    request_id = response.headers["Lambda-Runtime-Aws-Request-Id"]
    response.release()
    await post(agent, f"/invocation/{request_id}/response", b"{}")
    assert (await caller).status == 200


async def test_bad_response_mode_is_400_and_the_caller_gets_an_error(agent: RunningAgent) -> None:
    caller = asyncio.ensure_future(agent.invoke({}))
    headers, _ = await next_event(agent)
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    status, reply = await post(
        agent, f"/invocation/{request_id}/response", b"{}", {"Lambda-Runtime-Function-Response-Mode": "chunky"}
    )
    assert (status, reply) == (
        400,
        {"errorMessage": "Invalid function response mode", "errorType": "InvalidFunctionResponseMode"},
    )
    result = await caller
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.json()["errorType"] == "Runtime.InvalidResponseModeHeader"


async def test_streaming_response_is_relayed_chunk_by_chunk(agent: RunningAgent) -> None:
    url = agent.url + "/2015-03-31/functions/function/invocations"
    async with aiohttp.ClientSession() as caller_session:
        caller = asyncio.ensure_future(caller_session.post(url, data=b"{}"))
        headers, _ = await next_event(agent)
        request_id = headers["Lambda-Runtime-Aws-Request-Id"]
        second_chunk = asyncio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"chunk1 "
            await second_chunk.wait()
            yield b"chunk2"

        runtime_post = asyncio.ensure_future(
            agent.session.post(
                api(agent, f"/invocation/{request_id}/response"),
                data=chunks(),
                headers={"Lambda-Runtime-Function-Response-Mode": "streaming", "Content-Type": "text/plain"},
            )
        )
        response = await caller
        assert response.headers["Content-Type"] == "text/plain"
        assert response.headers["Transfer-Encoding"] == "chunked"
        first = await response.content.readexactly(7)
        assert first == b"chunk1 "  # arrived before the runtime finished its response
        second_chunk.set()
        rest = await response.read()
        assert rest == b"chunk2"
        posted = await runtime_post
        assert posted.status == 202
        posted.release()
        response.release()
    logs = agent.logs()
    assert f"REPORT RequestId: {request_id}" in logs


async def test_error_body_without_json_gets_the_header_type(agent: RunningAgent) -> None:
    caller = asyncio.ensure_future(agent.invoke({}))
    headers, _ = await next_event(agent)
    request_id = headers["Lambda-Runtime-Aws-Request-Id"]
    await post(agent, f"/invocation/{request_id}/error", b"", {"Lambda-Runtime-Function-Error-Type": "Runtime.Custom"})
    result = await caller
    assert json.loads(result.body) == {"errorType": "Runtime.Custom", "errorMessage": ""}


async def test_timeout_during_a_stream_ends_the_callers_stream_and_resets(agent: RunningAgent) -> None:
    url = agent.url + "/2015-03-31/functions/function/invocations"
    async with aiohttp.ClientSession() as caller_session:
        caller = asyncio.ensure_future(caller_session.post(url, data=b"{}"))
        headers, _ = await next_event(agent)
        request_id = headers["Lambda-Runtime-Aws-Request-Id"]
        never = asyncio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"partial"
            await never.wait()  # the function hangs mid-stream
            yield b"never sent"

        runtime_post = asyncio.ensure_future(
            agent.session.post(
                api(agent, f"/invocation/{request_id}/response"),
                data=chunks(),
                headers={"Lambda-Runtime-Function-Response-Mode": "streaming"},
            )
        )
        response = await caller
        body = await response.read()  # ends at the deadline (5 s)
        response.release()
        runtime_post.cancel()
    assert body == b"partial"
    assert f"{request_id} Task timed out after 5.00 seconds" in agent.logs()
    assert 'lambdalet_agent_resets_total{reason="timeout"} 1.0' in agent.agent.env.metrics.render().decode()


async def test_a_runtime_that_never_comes_back_to_next_times_the_next_invocation_out() -> None:
    async with running_agent("app.handler", command=IDLE, runtime=None, timeout_s=1) as agent:
        first = asyncio.ensure_future(agent.invoke({}))
        headers, _ = await next_event(agent)
        await post(agent, f"/invocation/{headers['Lambda-Runtime-Aws-Request-Id']}/response", b"1")
        assert (await first).body == b"1"
        # The runtime hangs instead of calling /next: the next invocation is cut at its deadline.
        second = await agent.invoke({})
        logs = agent.logs()
    request_id = second.headers["x-amzn-RequestId"]
    assert second.json()["errorType"] == "Sandbox.Timedout"
    assert second.headers["X-Lambdalet-Reset"] == "1"
    assert f"START RequestId: {request_id}" in logs
    assert f"{request_id} Task timed out after 1.00 seconds" in logs
