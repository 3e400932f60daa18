"""The runtime examples as ``lambdalet up`` serves them: ``examples/hello-node``, ``hello-java`` (built with
Maven), ``hello-ruby`` and ``hello-go`` (built with Go, on aws-lambda-go) greet ``event["name"]`` like
``examples/hello``; a compiled function whose toolchain is missing answers every invocation with the
reason instead of failing the platform."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from gateway_support import EXAMPLES, running_gateway
from runtimes_support import java_ric

pytestmark = pytest.mark.slow

RUNTIME_EXAMPLES = ["hello", "hello-node", "hello-java", "hello-ruby", "hello-go"]


# On a fresh machine the first hello-java build downloads Maven's plugins: more than the default 120 s allows.
@pytest.mark.timeout(600)
def test_examples_greet_on_every_runtime(tmp_path: Path) -> None:
    java_ric()
    manifests = [EXAMPLES / name / "function.yaml" for name in RUNTIME_EXAMPLES]
    with running_gateway(manifests, tmp_path) as gateway:
        for name in RUNTIME_EXAMPLES:
            status, headers, body = gateway.invoke(name, {"name": "Ada"})
            assert status == 200, (name, body)
            assert "X-Amz-Function-Error" not in headers, (name, body)
            assert json.loads(body) == {"message": "Hello, Ada!"}, name
            _, _, default = gateway.invoke(name, {})
            assert json.loads(default) == {"message": "Hello, world!"}, name


def test_missing_toolchain_is_the_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "hello-go"
    shutil.copytree(EXAMPLES / "hello-go", code)
    # Content no cache has seen, so a build is needed; then a PATH without Go.
    (code / "main.go").write_text((code / "main.go").read_text() + f"\n// {uuid.uuid4()}\n")
    without_go = [part for part in os.environ["PATH"].split(os.pathsep) if not (Path(part) / "go").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(without_go))
    manifest = yaml.safe_load((code / "function.yaml").read_text())
    manifest["spec"]["code"]["path"] = str(code)
    path = tmp_path / "function.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with running_gateway([path], tmp_path) as gateway:
        for _ in range(2):
            status, headers, body = gateway.invoke("hello-go", {"name": "Ada"})
            assert status == 200
            assert headers.get("X-Amz-Function-Error") == "Unhandled"
            error = json.loads(body)
            assert error["errorType"] == "Runtime.BuildError"
            assert "needs `go` on PATH" in error["errorMessage"]
