"""One conformance suite over every runtime, through the agent: success, raised error (type and message),
timeout and reset, crash and reset, init error, context fields, 6 MB payloads, unicode and the function's
output in the invocation log give the same caller-visible results on Python, Node.js, Java, Ruby and Go
(``provided``) — with our bootstraps and with
AWS's own runtime interface clients (npm ``aws-lambda-ric``, ``awslambdaric``, the Java client,
``aws-lambda-go``) as peers. Error types are each language's Lambda naming, as AWS's clients produce them.
"""

from __future__ import annotations

import base64

import pytest
from runtimes_support import FUNCTION_NAME, Flavor, Toolchains, flavor_params, running

pytestmark = pytest.mark.slow

UNICODE = 'héllo wörld ✓ 日本語 🎉 \u0000 "quoted" \\ \n'
# Lambda's synchronous request limit is 6,291,456 bytes; stay just under it with the JSON envelope.
SIX_MB = 6 * 1024 * 1024 - 64
RESPONSE_LIMIT = 6 * 1024 * 1024 + 100


@pytest.fixture(scope="session")
def toolchains() -> Toolchains:
    return Toolchains()


@pytest.fixture(params=flavor_params())
def flavor(request: pytest.FixtureRequest) -> Flavor:
    param: Flavor = request.param
    return param


async def test_success_and_warm_reuse(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor) as env:
        first = await env.invoke({"action": "echo", "payload": {"name": "Ada", "n": [1, 2.5, True, None]}})
        assert first.status == 200, env.logs()
        assert first.function_error is None
        assert first.json() == {"echo": {"name": "Ada", "n": [1, 2.5, True, None]}}
        assert "X-Lambdalet-Init-Duration-Ms" in first.headers
        counts = [(await env.invoke({"action": "count"})).json()["count"] for _ in range(3)]
        assert counts == [2, 3, 4], "a warm environment keeps its state between invocations"


async def test_raised_error_type_and_message(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor) as env:
        failed = await env.invoke({"action": "error", "message": "boom ✗ 日本"})
        assert failed.status == 200
        assert failed.function_error == "Unhandled"
        body = failed.json()
        assert body["errorType"] == flavor.error_type
        assert body["errorMessage"] == "boom ✗ 日本"
        after = await env.invoke({"action": "count"})
        assert after.json() == {"count": 2}, "a handled error keeps the environment"


async def test_timeout_resets_the_environment(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor, timeout=2) as env:
        assert (await env.invoke({"action": "count"})).json() == {"count": 1}
        timed_out = await env.invoke({"action": "sleep", "seconds": 30})
        assert timed_out.function_error == "Unhandled"
        body = timed_out.json()
        assert body["errorType"] == "Sandbox.Timedout"
        assert body["errorMessage"].endswith("Task timed out after 2.00 seconds")
        assert timed_out.headers.get("X-Lambdalet-Reset") == "1"
        fresh = await env.invoke({"action": "count"})
        assert fresh.json() == {"count": 1}, "the next invocation runs in a new environment"
        assert "X-Lambdalet-Init-Duration-Ms" in fresh.headers


async def test_crash_resets_the_environment(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor) as env:
        assert (await env.invoke({"action": "count"})).json() == {"count": 1}
        crashed = await env.invoke({"action": "crash"})
        assert crashed.function_error == "Unhandled"
        body = crashed.json()
        assert body["errorType"] == "Runtime.ExitError"
        assert "exit status 3" in body["errorMessage"]
        assert crashed.headers.get("X-Lambdalet-Reset") == "1"
        assert (await env.invoke({"action": "count"})).json() == {"count": 1}


async def test_init_error(toolchains: Toolchains, flavor: Flavor) -> None:
    init = flavor.init
    async with running(toolchains, flavor, handler=init.handler, env=init.env) as env:
        for _ in range(2):  # the environment is initialised again for the next invocation, and fails again
            failed = await env.invoke({"action": "count"})
            assert failed.status == 200
            assert failed.function_error == "Unhandled"
            body = failed.json()
            assert body["errorType"] == init.error_type, body
            assert init.message in body["errorMessage"]


async def test_context_fields(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor, timeout=7, memory=384) as env:
        invoked = await env.invoke({"action": "context"})
        assert invoked.function_error is None, invoked.body
        context = invoked.json()
        assert context["requestId"] == invoked.headers["x-amzn-RequestId"]
        assert 0 < context["remainingMs"] <= 7000
        assert context["functionName"] == FUNCTION_NAME
        assert context["functionVersion"] == "$LATEST"
        assert context["memoryMB"] == 384
        assert context["invokedFunctionArn"].endswith(f":function:{FUNCTION_NAME}")
        assert context["logGroupName"] == f"/aws/lambda/{FUNCTION_NAME}"
        assert context["logStreamName"]
        given = await env.invoke({"action": "context"}, headers={"X-Lambdalet-Request-Id": "given-id-1"})
        assert given.json()["requestId"] == "given-id-1"


async def test_six_megabyte_payloads(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor) as env:
        payload = "y" * (SIX_MB - len('{"action": "echo", "payload": ""}'))
        echoed = await env.invoke({"action": "echo", "payload": payload})
        assert echoed.function_error is None, echoed.body[:500]
        assert echoed.json() == {"echo": payload}
        too_big = await env.invoke({"action": "big", "size": RESPONSE_LIMIT})
        assert too_big.function_error == "Unhandled"
        assert too_big.json()["errorType"] == "Function.ResponseSizeTooLarge"


async def test_unicode_round_trip(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor) as env:
        echoed = await env.invoke({"action": "echo", "payload": {UNICODE: [UNICODE, "ß", "🙂"]}})
        assert echoed.function_error is None, echoed.body
        assert echoed.json() == {"echo": {UNICODE: [UNICODE, "ß", "🙂"]}}


async def test_function_output_is_in_the_invocation_log(toolchains: Toolchains, flavor: Flavor) -> None:
    async with running(toolchains, flavor) as env:
        invoked = await env.invoke({"action": "log", "message": "✓ written"}, headers={"X-Amz-Log-Type": "Tail"})
        assert invoked.json() == {"logged": True}
        tail = base64.b64decode(invoked.headers["X-Amz-Log-Result"]).decode()
        assert "conformance log ✓ written" in tail
        request_id = invoked.headers["x-amzn-RequestId"]
        assert f"START RequestId: {request_id}" in tail
        assert f"REPORT RequestId: {request_id}" in tail
