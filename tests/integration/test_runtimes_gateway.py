"""The runtime conformance cases through the gateway (``lambdalet up``'s local backend) with boto3 as the
caller: every runtime id's conformance function declared in a manifest (Go and Java built by the gateway
from source), invoked like Lambda. Success and warm reuse, raised error, timeout and crash with reset, init
error, context fields, 6 MB payloads and unicode give the same results as through the agent alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from gateway_support import RunningGateway, running_gateway
from runtimes_support import FLAVORS, Flavor, java_ric

pytestmark = pytest.mark.slow

# AWS's clients as bootstraps need a command line, which a manifest does not have: ours only here.
OURS = [flavor for flavor in FLAVORS if flavor.peer is None]
UNICODE = 'héllo wörld ✓ 日本語 🎉 "quoted" \\ \n'
SIX_MB = 6 * 1024 * 1024 - 64


def _name(flavor: Flavor, suffix: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"rt-{flavor.id}-{suffix}".lower())


def _manifest(directory: Path, name: str, flavor: Flavor, handler: str, **spec: Any) -> Path:
    document = {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": name},
        "spec": {"runtime": flavor.runtime, "handler": handler, "code": {"path": str(flavor.source)}, **spec},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    java_ric()  # AWS's Java runtime client (the java17/java21 bootstrap), fetched once into the cache
    tmp = tmp_path_factory.mktemp("runtimes-gateway")
    manifests = []
    for flavor in OURS:
        # A generous timeout for the main function (a cold JVM echoing 6 MB on a loaded machine is slow);
        # a short one for the timeout case.
        main = _manifest(tmp, _name(flavor, "main"), flavor, flavor.handler, timeoutSeconds=20, memoryMB=384)
        manifests.append(main)
        manifests.append(_manifest(tmp, _name(flavor, "short"), flavor, flavor.handler, timeoutSeconds=2))
        variables = {"variables": dict(flavor.init.env)} if flavor.init.env else None
        extra: dict[str, Any] = {"environment": variables} if variables else {}
        manifests.append(_manifest(tmp, _name(flavor, "init"), flavor, flavor.init.handler, **extra))
    with running_gateway(manifests, tmp) as running:
        yield running


@pytest.fixture(params=OURS, ids=[flavor.id for flavor in OURS])
def flavor(request: pytest.FixtureRequest) -> Flavor:
    param: Flavor = request.param
    return param


def _invoke(gateway: RunningGateway, name: str, event: Any) -> tuple[dict[str, Any], Any]:
    client = gateway.lambda_client()
    result: dict[str, Any] = client.invoke(FunctionName=name, Payload=json.dumps(event, ensure_ascii=False).encode())
    assert result["StatusCode"] == 200
    return result, json.loads(result["Payload"].read())


def test_success_and_warm_reuse(gateway: RunningGateway, flavor: Flavor) -> None:
    name = _name(flavor, "main")
    result, body = _invoke(gateway, name, {"action": "echo", "payload": {"name": "Ada", "n": [1, 2.5, True, None]}})
    assert "FunctionError" not in result, body
    assert body == {"echo": {"name": "Ada", "n": [1, 2.5, True, None]}}
    first = _invoke(gateway, name, {"action": "count"})[1]["count"]
    assert _invoke(gateway, name, {"action": "count"})[1]["count"] == first + 1


def test_raised_error(gateway: RunningGateway, flavor: Flavor) -> None:
    result, body = _invoke(gateway, _name(flavor, "main"), {"action": "error", "message": "boom ✗ 日本"})
    assert result["FunctionError"] == "Unhandled"
    assert body["errorType"] == flavor.error_type
    assert body["errorMessage"] == "boom ✗ 日本"


def test_timeout_and_crash_reset(gateway: RunningGateway, flavor: Flavor) -> None:
    name = _name(flavor, "short")
    result, body = _invoke(gateway, name, {"action": "sleep", "seconds": 30})
    assert result["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Sandbox.Timedout"
    assert body["errorMessage"].endswith("Task timed out after 2.00 seconds")
    assert _invoke(gateway, name, {"action": "count"})[1] == {"count": 1}
    result, body = _invoke(gateway, name, {"action": "crash"})
    assert result["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.ExitError"
    assert "exit status 3" in body["errorMessage"]
    assert _invoke(gateway, name, {"action": "count"})[1] == {"count": 1}


def test_init_error(gateway: RunningGateway, flavor: Flavor) -> None:
    result, body = _invoke(gateway, _name(flavor, "init"), {"action": "count"})
    assert result["FunctionError"] == "Unhandled"
    assert body["errorType"] == flavor.init.error_type, body
    assert flavor.init.message in body["errorMessage"]


def test_context_fields(gateway: RunningGateway, flavor: Flavor) -> None:
    name = _name(flavor, "main")
    result, context = _invoke(gateway, name, {"action": "context"})
    assert "FunctionError" not in result, context
    assert context["requestId"] == result["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    assert 0 < context["remainingMs"] <= 20000
    assert context["functionName"] == name
    assert context["memoryMB"] == 384
    assert context["invokedFunctionArn"].endswith(f":function:{name}")


def test_six_megabytes_and_unicode(gateway: RunningGateway, flavor: Flavor) -> None:
    name = _name(flavor, "main")
    payload = "y" * (SIX_MB - len('{"action": "echo", "payload": ""}'))
    result, body = _invoke(gateway, name, {"action": "echo", "payload": payload})
    assert "FunctionError" not in result, str(body)[:500]
    assert body == {"echo": payload}
    result, body = _invoke(gateway, name, {"action": "echo", "payload": {UNICODE: [UNICODE, "ß", "🙂"]}})
    assert body == {"echo": {UNICODE: [UNICODE, "ß", "🙂"]}}
