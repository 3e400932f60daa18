"""The gateway as boto3 and the AWS CLI see it: invoke (sync, Tail, DryRun, ClientContext), function
errors, missing functions, throttling, list/get function, and bad input (non-JSON, oversize)."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError
from gateway_support import EXAMPLES, RunningGateway, aws_cli, running_gateway, write_function

CONTEXT_ECHO = """
def handler(event, context):
    cc = context.client_context
    return {"custom": cc.custom if cc else None, "arn": context.invoked_function_arn}
"""
RAISES = """
def handler(event, context):
    raise ValueError("boom " + str(event.get("n")))
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("boto3")
    manifests = tmp / "manifests"
    manifests.mkdir()
    write_function(manifests, "context-echo", {"app.py": CONTEXT_ECHO})
    write_function(manifests, "raises", {"app.py": RAISES})
    write_function(manifests, "never", {"app.py": RAISES}, reservedConcurrency=0)
    write_function(
        manifests,
        "described",
        {"app.py": RAISES},
        memoryMB=256,
        timeoutSeconds=7,
        environment={"variables": {"COLOR": "blue"}},
        ephemeralStorageMB=1024,
    )
    with running_gateway([EXAMPLES / "hello", manifests], tmp) as gw:
        yield gw


def test_invoke_returns_the_greeting(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="hello", Payload=b'{"name": "boto"}')
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in response
    assert json.loads(response["Payload"].read()) == {"message": "Hello, boto!"}


def test_invoke_by_arn_and_qualifier(gateway: RunningGateway) -> None:
    client = gateway.lambda_client()
    arn = "arn:aws:lambda:us-east-1:000000000000:function:hello"
    response = client.invoke(FunctionName=arn, Qualifier="$LATEST", Payload=b'{"name": "arn"}')
    assert json.loads(response["Payload"].read()) == {"message": "Hello, arn!"}
    with pytest.raises(ClientError) as caught:
        client.invoke(FunctionName="hello", Qualifier="prod", Payload=b"{}")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_tail_returns_the_log(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="hello", LogType="Tail", Payload=b'{"name": "tail"}')
    log = base64.b64decode(response["LogResult"]).decode()
    request_id = response["ResponseMetadata"]["RequestId"]
    assert f"START RequestId: {request_id}" in log
    assert "greeting tail" in log
    assert f"REPORT RequestId: {request_id}" in log


def test_dry_run(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="hello", InvocationType="DryRun", Payload=b"{}")
    assert response["StatusCode"] == 204


def test_client_context_reaches_the_function(gateway: RunningGateway) -> None:
    context = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    response = gateway.lambda_client().invoke(FunctionName="context-echo", ClientContext=context, Payload=b"{}")
    result = json.loads(response["Payload"].read())
    assert result == {"custom": {"k": "v"}, "arn": "arn:aws:lambda:us-east-1:000000000000:function:context-echo"}


def test_function_error(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="raises", Payload=b'{"n": 7}')
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Payload"].read())
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "boom 7"


def test_missing_function(gateway: RunningGateway) -> None:
    client = gateway.lambda_client()
    with pytest.raises(client.exceptions.ResourceNotFoundException) as caught:
        client.invoke(FunctionName="nope", Payload=b"{}")
    assert "function:nope" in caught.value.response["Error"]["Message"]


def test_throttled_function(gateway: RunningGateway) -> None:
    client = gateway.lambda_client()
    with pytest.raises(client.exceptions.TooManyRequestsException) as caught:
        client.invoke(FunctionName="never", Payload=b"{}")
    assert caught.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429


def test_event_invocation_is_accepted(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="hello", InvocationType="Event", Payload=b"{}")
    assert response["StatusCode"] == 202
    assert len(response["ResponseMetadata"]["RequestId"]) == 36


def test_list_functions(gateway: RunningGateway) -> None:
    functions = gateway.lambda_client().list_functions()["Functions"]
    assert sorted(f["FunctionName"] for f in functions) == ["context-echo", "described", "hello", "never", "raises"]


def test_get_function_and_configuration(gateway: RunningGateway) -> None:
    client = gateway.lambda_client()
    config = client.get_function_configuration(FunctionName="described")
    assert config["FunctionName"] == "described"
    assert config["FunctionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:described"
    assert config["Runtime"] == "python3.12"
    assert config["Handler"] == "app.handler"
    assert config["MemorySize"] == 256
    assert config["Timeout"] == 7
    assert config["Environment"] == {"Variables": {"COLOR": "blue"}}
    assert config["EphemeralStorage"] == {"Size": 1024}
    assert config["State"] == "Active"
    assert config["PackageType"] == "Zip"
    assert config["Version"] == "$LATEST"
    assert config["CodeSize"] == len(RAISES.encode())
    assert len(base64.b64decode(config["CodeSha256"])) == 32
    full = client.get_function(FunctionName="never")
    assert full["Configuration"]["FunctionName"] == "never"
    assert full["Concurrency"] == {"ReservedConcurrentExecutions": 0}
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.get_function(FunctionName="nope")


def test_aws_cli_lists_functions(gateway: RunningGateway) -> None:
    aws, env = aws_cli()
    out = subprocess.run(
        [str(aws), "lambda", "list-functions", "--endpoint-url", gateway.url, "--output", "json"],
        capture_output=True,
        env=env,
        check=True,
        timeout=60,
    )
    names = {f["FunctionName"] for f in json.loads(out.stdout)["Functions"]}
    assert "hello" in names


def test_payload_that_is_not_json(gateway: RunningGateway) -> None:
    status, headers, body = gateway.post("/2015-03-31/functions/hello/invocations", b"not json")
    assert status == 400
    assert headers["x-amzn-ErrorType"] == "InvalidRequestContentException"
    assert json.loads(body)["Type"] == "User"
    client = gateway.lambda_client()
    with pytest.raises(client.exceptions.InvalidRequestContentException):
        client.invoke(FunctionName="hello", Payload=b"{oops")


def test_payload_over_six_megabytes(gateway: RunningGateway) -> None:
    limit = 6291456
    status, headers, body = gateway.post("/2015-03-31/functions/hello/invocations", b" " * (limit + 1))
    assert status == 413
    assert headers["x-amzn-ErrorType"] == "RequestTooLargeException"
    assert json.loads(body)["message"] == "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
    exact = b'{"name": "' + b"x" * (limit - 12) + b'"}'
    assert len(exact) == limit
    status, _, body = gateway.post("/2015-03-31/functions/hello/invocations", exact)
    assert status == 200
