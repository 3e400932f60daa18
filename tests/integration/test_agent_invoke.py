"""The agent with our Python bootstrap as a real process: success, function errors, context, logs and
log tail, headers, concurrency, payload limits, init errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from agent_support import BOOTSTRAP, PYTHON_FUNCTIONS, running_agent, until


async def test_success_returns_the_handler_result_with_lambda_headers() -> None:
    async with running_agent("app.echo") as agent:
        first = await agent.invoke({"a": 1, "b": [1, 2]})
        second = await agent.invoke({"n": 2})
    assert first.status == 200
    assert first.json() == {"a": 1, "b": [1, 2]}
    assert first.body == b'{"a": 1, "b": [1, 2]}'  # AWS's Python runtime separators
    assert "X-Amz-Function-Error" not in first.headers
    assert first.headers["X-Amz-Executed-Version"] == "$LATEST"
    assert re.fullmatch(r"[0-9a-f-]{36}", first.headers["x-amzn-RequestId"])
    assert float(first.headers["X-Lambdalet-Init-Duration-Ms"]) > 0
    assert "X-Lambdalet-Init-Duration-Ms" not in second.headers  # warm
    assert int(second.headers["X-Lambdalet-Billed-Duration-Ms"]) >= float(second.headers["X-Lambdalet-Duration-Ms"])
    assert second.json() == {"n": 2}


async def test_raised_error_is_an_unhandled_function_error_without_bootstrap_frames() -> None:
    async with running_agent("app.raise_error") as agent:
        result = await agent.invoke({"message": "it broke"})
        after = await agent.invoke({"message": "again"})
    assert result.status == 200
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    error = result.json()
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "it broke"
    assert error["requestId"] == result.headers["x-amzn-RequestId"]
    assert error["stackTrace"], error
    assert "app.py" in error["stackTrace"][0]
    assert not any("bootstrap.py" in frame for frame in error["stackTrace"])
    # A function error does not reset the environment.
    assert "X-Lambdalet-Reset" not in result.headers
    assert after.json()["errorMessage"] == "again"
    assert "X-Lambdalet-Init-Duration-Ms" not in after.headers


async def test_context_object_and_trace_id() -> None:
    client_context = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    headers = {
        "X-Amz-Client-Context": client_context,
        "X-Amzn-Trace-Id": "Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1",
        "X-Lambdalet-Request-Id": "11111111-2222-3333-4444-555555555555",
        "X-Lambdalet-Invoked-Function-Arn": "arn:aws:lambda:eu-west-1:123456789012:function:ctx:prod",
        "X-Lambdalet-Cognito-Identity": json.dumps({"cognitoIdentityId": "id-1", "cognitoIdentityPoolId": "pool-1"}),
    }
    async with running_agent("app.context", timeout_s=5, memory=256) as agent:
        result = await agent.invoke({}, headers=headers)
    ctx = result.json()
    assert result.headers["x-amzn-RequestId"] == "11111111-2222-3333-4444-555555555555"
    assert ctx["aws_request_id"] == "11111111-2222-3333-4444-555555555555"
    assert ctx["function_name"] == "function"
    assert ctx["function_version"] == "$LATEST"
    assert ctx["invoked_function_arn"] == "arn:aws:lambda:eu-west-1:123456789012:function:ctx:prod"
    assert ctx["memory_limit_in_mb"] == "256"
    assert ctx["log_group_name"] == "/aws/lambda/function"
    assert ctx["log_stream_name_set"] is True
    assert 2500 < ctx["remaining_ms"] <= 5000
    assert ctx["identity"] == {"cognito_identity_id": "id-1", "cognito_identity_pool_id": "pool-1"}
    assert ctx["client_context_custom"] == {"k": "v"}
    assert ctx["trace_id"] == headers["X-Amzn-Trace-Id"]


async def test_a_pretty_printed_client_context_reaches_the_handler() -> None:
    # The decoded context travels to the runtime in a header: its line breaks must not break the request.
    pretty = base64.b64encode(json.dumps({"custom": {"k": "v ✓"}}, indent=2).encode()).decode()
    not_json = base64.b64encode(b"{\nnot json").decode()
    async with running_agent("app.context") as agent:
        result = await agent.invoke({}, headers={"X-Amz-Client-Context": pretty})
        refused = await agent.invoke({}, headers={"X-Amz-Client-Context": not_json})
    assert result.json()["client_context_custom"] == {"k": "v ✓"}
    assert refused.status == 400
    assert refused.json()["message"] == "Client context must be a valid Base64-encoded JSON object."


async def test_default_invoked_arn_and_lambda_environment() -> None:
    names = [
        "_HANDLER",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "LAMBDA_TASK_ROOT",
        "AWS_REGION",
        "TZ",
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_EXECUTION_ENV",
        "USER_VAR",
    ]
    async with running_agent(
        "app.env", memory=200, args=["--env", "USER_VAR=hello", "--function-name", "fn1"]
    ) as agent:
        result = await agent.invoke({"names": names})
    env = result.json()
    code = str(PYTHON_FUNCTIONS)
    assert env == {
        "_HANDLER": "app.env",
        "AWS_LAMBDA_FUNCTION_NAME": "fn1",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "200",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/fn1",
        "LAMBDA_TASK_ROOT": code,
        "AWS_REGION": "us-east-1",
        "TZ": ":UTC",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
        "USER_VAR": "hello",
        "cwd": code,
    }


async def test_unicode_result_is_utf8_json() -> None:
    async with running_agent("app.unicode") as agent:
        result = await agent.invoke({})
    assert result.json() == {"text": "héllo wörld ✓ 日本"}
    assert "héllo".encode() in result.body  # python3.12+: not \\u-escaped, as AWS's runtime


async def test_marshal_error_is_per_invocation() -> None:
    async with running_agent("app.not_serializable") as agent:
        result = await agent.invoke({})
    assert result.headers["X-Amz-Function-Error"] == "Unhandled"
    assert result.json()["errorType"] == "Runtime.MarshalError"
    assert result.json()["errorMessage"].startswith("Unable to marshal response: ")
    assert "X-Lambdalet-Reset" not in result.headers


async def test_logs_are_framed_per_invocation_and_tail_is_returned() -> None:
    async with running_agent("app.log") as agent:
        result = await agent.invoke({}, headers={"X-Amz-Log-Type": "Tail"})
        plain = await agent.invoke({})
        logs = agent.logs()
    request_id = result.headers["x-amzn-RequestId"]
    tail = base64.b64decode(result.headers["X-Amz-Log-Result"]).decode()
    lines = tail.splitlines()
    assert lines[0] == f"START RequestId: {request_id} Version: $LATEST"
    assert f"stdout line for {request_id}" in lines
    assert f"stderr line for {request_id}" in lines
    assert lines[-2] == f"END RequestId: {request_id}"
    assert re.fullmatch(
        rf"REPORT RequestId: {request_id}\tDuration: \d+\.\d\d ms\tBilled Duration: \d+ ms\t"
        r"Memory Size: 128 MB\tMax Memory Used: \d+ MB\tInit Duration: \d+\.\d\d ms\t",
        lines[-1],
    )
    assert "X-Amz-Log-Result" not in plain.headers
    # The agent's stdout carries the same framing, in order, for both invocations.
    plain_id = plain.headers["x-amzn-RequestId"]
    order = [
        f"START RequestId: {request_id}",
        f"stdout line for {request_id}",
        f"END RequestId: {request_id}",
        f"REPORT RequestId: {request_id}",
        f"START RequestId: {plain_id}",
        f"stdout line for {plain_id}",
        f"END RequestId: {plain_id}",
        f"REPORT RequestId: {plain_id}",
    ]
    positions = [logs.index(marker) for marker in order]
    assert positions == sorted(positions)


async def test_tail_keeps_the_last_4kb() -> None:
    async with running_agent("app.echo") as agent:
        await agent.invoke({})
        result = await agent.invoke({"x": "y"}, headers={"X-Amz-Log-Type": "Tail"})
    tail = base64.b64decode(result.headers["X-Amz-Log-Result"])
    assert len(tail) <= 4096
    assert tail.decode().startswith("START RequestId:")


async def test_a_second_concurrent_request_gets_a_clear_busy_error() -> None:
    async with running_agent("app.sleep", timeout_s=5) as agent:
        await agent.wait_ready()
        slow = asyncio.ensure_future(agent.invoke({"seconds": 2}))
        await until(lambda: agent.agent.env.running is not None)
        busy = await agent.invoke({"seconds": 0})
        done = await slow
        after = await agent.invoke({"seconds": 0})
    assert busy.status == 429
    assert busy.headers["x-amzn-ErrorType"] == "TooManyRequestsException"
    assert busy.json()["errorType"] == "Environment.Busy"
    assert done.status == 200
    assert done.json() == {"slept": 2}
    assert after.json() == {"slept": 0}


async def test_request_payload_over_6mb_is_rejected_in_lambdas_format() -> None:
    async with running_agent("app.echo", timeout_s=30) as agent:  # 6 MB through JSON on a busy machine
        too_big = await agent.invoke(raw=b'"' + b"x" * (6 * 1024 * 1024 - 1) + b'"')
        just_fits = await agent.invoke(raw=b'"' + b"x" * (6 * 1024 * 1024 - 2) + b'"')
    assert too_big.status == 413
    assert too_big.headers["x-amzn-ErrorType"] == "RequestTooLargeException"
    assert too_big.json() == {
        "Type": "User",
        "message": "Request must be smaller than 6291456 bytes for the InvokeFunction operation",
    }
    assert just_fits.status == 200
    assert len(just_fits.body) == 6 * 1024 * 1024


async def test_response_over_6mb_is_function_response_size_too_large() -> None:
    async with running_agent("app.big_response", timeout_s=30) as agent:
        too_big = await agent.invoke({"bytes": 6 * 1024 * 1024 + 100 - 1})  # + 2 quotes = 6,291,557
        fits = await agent.invoke({"bytes": 6 * 1024 * 1024 + 100 - 2})  # exactly 6,291,556
    assert too_big.status == 200
    assert too_big.headers["X-Amz-Function-Error"] == "Unhandled"
    assert too_big.json() == {
        "errorType": "Function.ResponseSizeTooLarge",
        "errorMessage": "Response payload size exceeded maximum allowed payload size (6291556 bytes).",
    }
    assert fits.status == 200
    assert "X-Amz-Function-Error" not in fits.headers
    assert len(fits.body) == 6291556


async def test_metrics_count_invocations_and_errors() -> None:
    async with running_agent("app.raise_error") as agent:
        await agent.invoke({})
        async with agent.session.get(agent.url + "/metrics") as response:
            text = await response.text()
        async with agent.session.get(agent.url + "/healthz") as health:
            assert health.status == 200
    assert 'lambdalet_agent_invocations_total{outcome="error"} 1.0' in text
    assert 'lambdalet_agent_errors_total{error_type="ValueError"} 1.0' in text
    assert "lambdalet_agent_init_duration_seconds_count 1.0" in text


def _interpreters() -> list[str]:
    """Real interpreters for python3.11-3.13 found on PATH or under pyenv (the runtime images' versions)."""
    found = {sys.executable}
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for version in ("3.11", "3.12", "3.13"):
        candidates = [shutil.which(f"python{version}"), *map(str, pyenv.glob(f"{version}.*/bin/python{version}"))]
        for program in filter(None, candidates):
            result = subprocess.run(
                [program, "-c", "import sys; print(sys.executable)"], check=False, capture_output=True, text=True
            )
            if result.returncode == 0:
                found.add(str(Path(result.stdout.strip()).resolve()))
    return sorted(found)


async def test_bootstrap_runs_on_every_available_python_version() -> None:
    interpreters = await asyncio.to_thread(_interpreters)
    for python in interpreters:
        command = (python, str(BOOTSTRAP))
        async with running_agent("app.echo", command=command, runtime="python3.12") as agent:
            result = await agent.invoke({"python": python})
            error = await agent.invoke(raw=b"not json")
        assert result.json() == {"python": python}, python
        assert error.json()["errorType"] == "Runtime.UnmarshalError", python


async def test_provisioned_concurrency_reports_no_init_duration_on_the_first_invoke() -> None:
    async with running_agent("app.ok", args=["--initialization-type", "provisioned-concurrency"]) as agent:
        first = await agent.invoke({})
        env = agent.agent.env.runtime_environment()
    assert first.json() == {"ok": True}
    assert "X-Lambdalet-Init-Duration-Ms" not in first.headers
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency"


async def test_a_caller_that_goes_away_does_not_break_the_environment() -> None:
    async with running_agent("app.sleep", timeout_s=5) as agent:
        await agent.wait_ready()
        gone = asyncio.ensure_future(agent.invoke({"seconds": 0.5}))
        await until(lambda: agent.agent.env.running is not None)
        gone.cancel()  # the client disconnects mid-invocation
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        running = agent.agent.env.current
        assert running is not None  # the invocation still runs to its end
        await running.finished
        after = await agent.invoke({"seconds": 0})
        logs = agent.logs()
    assert after.json() == {"slept": 0}
    assert logs.count("END RequestId: ") == 2
