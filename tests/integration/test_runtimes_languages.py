"""What each language's runtime supports beyond the shared conformance cases, through the agent.

Node.js: every handler form (CommonJS, ``.mjs``, ``"type": "module"``, callback with and without waiting
for the event loop, ``context.succeed``, sync handlers, errors from timers and unhandled rejections,
response streaming with ``awslambda.streamifyResponse`` and ``HttpResponseStream``) and
every init error type, each run with our bootstrap and with AWS's ``aws-lambda-ric``, which must agree.
Ruby: class handlers, the exit after a NoMethodError, init error types. Java: RequestStreamHandler and a
missing class. ``provided``: a shell-script bootstrap runs as is; a missing or non-executable bootstrap is
``Runtime.InvalidEntrypoint``. Client context and Cognito identity reach the handler's context.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from runtimes_support import FUNCTIONS, PEER_BUILD_TIMEOUT, Invoked, Toolchains, flavor_by_id, running

pytestmark = pytest.mark.slow

NODE_OURS = flavor_by_id("nodejs20.x")
NODE_AWS = flavor_by_id("nodejs20.x-aws-ric")
CLIENT_CONTEXT = {"client": {"installation_id": "install-1"}, "custom": {"tenant": "blue ✓"}, "env": {"locale": "fr"}}
IDENTITY = {"cognitoIdentityId": "us-east-1:abc", "cognitoIdentityPoolId": "us-east-1:pool"}
CALLER_HEADERS = {
    "X-Amz-Client-Context": base64.b64encode(json.dumps(CLIENT_CONTEXT).encode()).decode(),
    "X-Lambdalet-Cognito-Identity": json.dumps(IDENTITY),
    "X-Amzn-Trace-Id": "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1",
}


@pytest.fixture(scope="module")
def toolchains() -> Toolchains:
    return Toolchains()


def _visible(invoked: Invoked) -> tuple[int, str | None, Any]:
    """What a caller compares: status, function error, and the body without stack traces (their frames
    name each bootstrap's own files) and with only the first line of error messages (likewise)."""
    body = invoked.json()
    if isinstance(body, dict) and "errorType" in body:
        body = {"errorType": body["errorType"], "errorMessage": body["errorMessage"].splitlines()[0]}
    return invoked.status, invoked.function_error, body


NODE_CASES: list[tuple[str, Any]] = [
    ("conformance.handler", {"echo": "ok"}),
    ("esm.handler", {"module": "esm", "name": "Ada"}),
    ("typemodule/app.handler", {"module": "type-module", "name": "Ada"}),
    ("callback.waits", ["callback", "timer"]),
    ("callback.noWait", []),
    ("callback.succeed", {"via": "context.succeed"}),
    ("callback.sync", None),
    ("callback.neverSettles", None),
    ("callback.fails", {"errorType": "TypeError", "errorMessage": "callback failure"}),
    ("callback.uncaught", {"errorType": "RangeError", "errorMessage": "thrown from a timer"}),
    (
        "callback.rejects",
        {"errorType": "Runtime.UnhandledPromiseRejection", "errorMessage": "Error: nobody handles this"},
    ),
    (
        "syntax_error.handler",
        {"errorType": "Runtime.UserCodeSyntaxError", "errorMessage": "SyntaxError: Unexpected token ';'"},
    ),
    (
        "missing_dep.handler",
        {
            "errorType": "Runtime.ImportModuleError",
            "errorMessage": "Error: Cannot find module 'no-such-package-lambdalet'",
        },
    ),
    (
        "nofile.handler",
        {"errorType": "Runtime.ImportModuleError", "errorMessage": "Error: Cannot find module 'nofile'"},
    ),
    (
        "conformance.nope",
        {"errorType": "Runtime.HandlerNotFound", "errorMessage": "conformance.nope is undefined or not exported"},
    ),
    ("conformance", {"errorType": "Runtime.MalformedHandlerName", "errorMessage": "Bad handler"}),
]


@PEER_BUILD_TIMEOUT
@pytest.mark.parametrize(("handler", "expected"), NODE_CASES, ids=[case[0] for case in NODE_CASES])
async def test_nodejs_handler_forms_match_aws(toolchains: Toolchains, handler: str, expected: Any) -> None:
    event = {"action": "echo", "payload": "ok", "name": "Ada"}
    seen = []
    for flavor in (NODE_OURS, NODE_AWS):
        async with running(toolchains, flavor, handler=handler) as env:
            seen.append(_visible(await env.invoke(event)))
    ours, aws = seen
    assert ours == aws, f"our bootstrap {ours} != AWS's aws-lambda-ric {aws}"
    status, function_error, body = ours
    assert status == 200
    assert body == expected
    assert function_error == ("Unhandled" if isinstance(expected, dict) and "errorType" in expected else None)


STREAMING_CASES: list[tuple[str, str, bytes]] = [
    ("streaming.chunks", "text/plain", "chunk 0 ✓\nchunk 1 ✓\nchunk 2 ✓\n".encode()),
    (
        "streaming.http",
        "application/vnd.awslambda.http-integration-response",
        b'{"statusCode":201,"headers":{"x-custom":"yes"}}' + b"\0" * 8 + b"hello Ada",
    ),
    ("streaming.failsMidStream", "application/octet-stream", b"partial"),
    ("streaming.failsBeforeWriting", "application/octet-stream", b""),
    ("streaming.neverEnds", "application/octet-stream", b"started"),
]


@PEER_BUILD_TIMEOUT
@pytest.mark.parametrize(
    ("handler", "content_type", "expected"), STREAMING_CASES, ids=[case[0] for case in STREAMING_CASES]
)
async def test_nodejs_response_streaming_matches_aws(
    toolchains: Toolchains, handler: str, content_type: str, expected: bytes
) -> None:
    seen = []
    for flavor in (NODE_OURS, NODE_AWS):
        async with running(toolchains, flavor, handler=handler) as env:
            for _ in range(2):  # the environment serves the next invocation after a streamed one
                invoked = await env.invoke({"count": 3, "name": "Ada"})
                seen.append((invoked.status, invoked.headers.get("Content-Type"), invoked.body))
    assert seen[:2] == seen[2:], "our bootstrap and AWS's aws-lambda-ric stream the same"
    assert seen[0] == (200, content_type, expected)


async def test_nodejs_callback_without_waiting_answers_before_timers(toolchains: Toolchains) -> None:
    # The handler leaves a 30 s timer pending: waiting for the event loop would run into the 5 s timeout.
    async with running(toolchains, NODE_OURS, handler="callback.noWait", timeout=5) as env:
        for _ in range(2):
            invoked = await env.invoke({})
            assert invoked.function_error is None, invoked.body
            assert invoked.json() == []


@PEER_BUILD_TIMEOUT
@pytest.mark.parametrize("flavor_id", ["nodejs20.x", "nodejs20.x-aws-ric", "ruby3.3"])
async def test_client_context_identity_and_trace(toolchains: Toolchains, flavor_id: str) -> None:
    flavor = flavor_by_id(flavor_id)
    handler = "callback.identity" if flavor.runtime.startswith("nodejs") else "conformance.identity"
    async with running(toolchains, flavor, handler=handler) as env:
        body = (await env.invoke({}, headers=CALLER_HEADERS)).json()
        assert body["clientContext"] == CLIENT_CONTEXT
        assert body["identity"] == IDENTITY
        assert body["trace"] == CALLER_HEADERS["X-Amzn-Trace-Id"]


RUBY = flavor_by_id("ruby3.3")


async def test_ruby_class_handler(toolchains: Toolchains) -> None:
    async with running(toolchains, RUBY, handler="conformance.Greeter::Polite.greet") as env:
        assert (await env.invoke({"name": "Ada"})).json() == {"greeting": "Good day, Ada"}


async def test_ruby_missing_method_fails_and_exits(toolchains: Toolchains) -> None:
    async with running(toolchains, RUBY, handler="conformance.nope") as env:
        for _ in range(2):
            failed = await env.invoke({})
            assert failed.function_error == "Unhandled"
            body = failed.json()
            assert body["errorType"] == "Function<NoMethodError>"
            assert body["errorMessage"].startswith("undefined method `nope'")


@pytest.mark.parametrize(
    ("handler", "error_type", "message"),
    [
        ("syntax_error.handler", "Init<SyntaxError>", "syntax error"),
        ("missing.handler", "Init<LoadError>", "cannot load such file -- missing"),
        ("bad", "Init<ArgumentError>", "Invalid handler"),
    ],
)
async def test_ruby_init_errors(toolchains: Toolchains, handler: str, error_type: str, message: str) -> None:
    async with running(toolchains, RUBY, handler=handler) as env:
        failed = await env.invoke({})
        assert failed.function_error == "Unhandled"
        assert failed.json()["errorType"] == error_type
        assert message in failed.json()["errorMessage"]


JAVA = flavor_by_id("java17")


async def test_java_stream_handler(toolchains: Toolchains) -> None:
    async with running(toolchains, JAVA, handler="example.Streams::handleRequest") as env:
        assert (await env.invoke({"name": "Ada ✓"})).json() == {"stream": {"name": "Ada ✓"}}


async def test_java_missing_class(toolchains: Toolchains) -> None:
    async with running(toolchains, JAVA, handler="example.Nope::handleRequest") as env:
        failed = await env.invoke({})
        assert failed.function_error == "Unhandled"
        assert failed.json()["errorType"] == "java.lang.ClassNotFoundException"
        assert failed.json()["errorMessage"] == "Class not found: example.Nope"


PROVIDED = flavor_by_id("provided.al2023-go")


async def test_provided_shell_bootstrap_runs_as_is(toolchains: Toolchains) -> None:
    shell = replace(PROVIDED, source=FUNCTIONS / "provided_shell", build=False)
    async with running(toolchains, shell, handler="function.handler") as env:
        invoked = await env.invoke({"name": "Ada"})
        assert invoked.function_error is None, invoked.body
        assert invoked.json() == {"handler": "function.handler", "event": {"name": "Ada"}}


@pytest.mark.parametrize("case", ["missing", "not-executable"])
async def test_provided_without_a_valid_bootstrap(toolchains: Toolchains, tmp_path: Path, case: str) -> None:
    code = FUNCTIONS / "provided_noexec" if case == "not-executable" else tmp_path
    broken = replace(PROVIDED, source=code, build=False)
    async with running(toolchains, broken, handler="bootstrap") as env:
        failed = await env.invoke({})
        assert failed.function_error == "Unhandled"
        assert failed.json()["errorType"] == "Runtime.InvalidEntrypoint"
