"""The whole gateway on uvloop (its default event loop where installed) with real environments: boto3's
Invoke (result, function error, log tail), InvokeWithResponseStream of a Node.js streaming function, an
HTTP route, a crashed environment replaced, and no agent left once it stops.

Agents are forked by the zygote (fast start, the default): their stdout pipes must close at EOF under
uvloop too (``standby._PipeProtocol``), or every stopped environment would leave a descriptor behind."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import uvloop
from gateway_support import EXAMPLES, RunningGateway, process_tree, running_gateway, wait_for, write_function
from lambdalet_gateway.app import event_loop_factory

RAISES = """
def handler(event, context):
    raise ValueError("boom " + str(event.get("n")))
"""
CRASHES = """
import os
def handler(event, context):
    if event.get("crash"):
        os._exit(3)
    return {"pid": os.getpid()}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    tmp = tmp_path_factory.mktemp("uvloop")
    manifests = tmp / "manifests"
    manifests.mkdir()
    write_function(manifests, "raises", {"app.py": RAISES})
    write_function(manifests, "crashes", {"app.py": CRASHES})
    examples = [EXAMPLES / "hello", EXAMPLES / "http-echo", EXAMPLES / "stream-node"]
    uv = event_loop_factory("uvloop")
    with running_gateway([*examples, manifests], tmp, loop_factory=uv) as gw:
        assert isinstance(gw.loop, uvloop.Loop)
        yield gw


def test_invoke_result_and_log_tail(gateway: RunningGateway) -> None:
    client = gateway.lambda_client()
    for name in ("uv", "loop"):
        response = client.invoke(FunctionName="hello", LogType="Tail", Payload=json.dumps({"name": name}).encode())
        assert json.loads(response["Payload"].read()) == {"message": f"Hello, {name}!"}
        assert (
            f"START RequestId: {response['ResponseMetadata']['RequestId']}"
            in base64.b64decode(response["LogResult"]).decode()
        )


def test_function_error(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke(FunctionName="raises", Payload=b'{"n": 7}')
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Payload"].read())
    assert (error["errorType"], error["errorMessage"]) == ("ValueError", "boom 7")


def test_response_stream(gateway: RunningGateway) -> None:
    response = gateway.lambda_client().invoke_with_response_stream(FunctionName="stream-node", Payload=b'{"chunks": 3}')
    events = list(response["EventStream"])
    chunks = [e["PayloadChunk"]["Payload"] for e in events if "PayloadChunk" in e]
    assert b"".join(chunks) == b"chunk 1 of 3\nchunk 2 of 3\nchunk 3 of 3\n"
    assert events[-1] == {"InvokeComplete": {}}


def test_http_route(gateway: RunningGateway) -> None:
    status, _, body = gateway.get("/fn/http-echo/some/path?q=1")
    assert status == 200
    event = json.loads(body)["event"]
    assert event["rawPath"] == "/some/path"
    assert event["rawQueryString"] == "q=1"


def test_a_crashed_environment_is_replaced(gateway: RunningGateway) -> None:
    client = gateway.lambda_client()
    first = json.loads(client.invoke(FunctionName="crashes", Payload=b"{}")["Payload"].read())["pid"]
    crashed = client.invoke(FunctionName="crashes", Payload=b'{"crash": true}')
    assert crashed["FunctionError"] == "Unhandled"
    assert json.loads(crashed["Payload"].read())["errorType"] == "Runtime.ExitError"
    second = json.loads(client.invoke(FunctionName="crashes", Payload=b"{}")["Payload"].read())["pid"]
    assert second != first


def test_no_agent_is_left_after_stopping(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("uvloop-stop")
    uv = event_loop_factory("uvloop")
    with running_gateway([EXAMPLES / "hello"], tmp, loop_factory=uv) as gw:
        assert gw.invoke("hello", {"name": "x"})[0] == 200
        agents = gw.agent_pids("hello")
        assert agents
        tree = process_tree(agents)
    wait_for(lambda: not process_tree(tree), timeout=10, what="the environments to exit")
