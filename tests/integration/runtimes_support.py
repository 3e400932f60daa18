"""Helpers shared by the runtime conformance tests: the runtimes under test (ours and AWS's own runtime
interface clients as peers), their conformance functions and expected Lambda error shapes, and an agent
running one of them over real HTTP.

Every runtime has a conformance function with the same actions (``echo``, ``count``, ``error``, ``sleep``,
``crash``, ``big``, ``context``) in ``functions/<lang>/``; Go and Java code is built by
``lambdalet.build.prepare_code`` exactly as ``lambdalet up`` builds it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lambdalet_agent.agent import Agent
from lambdalet_agent.settings import from_args
from multidict import CIMultiDictProxy

from lambdalet.build import prepare_code

REPO = Path(__file__).resolve().parents[2]
FUNCTIONS = Path(__file__).resolve().parent / "functions"
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
FUNCTION_NAME = "conformance-fn"


@dataclass(frozen=True, slots=True)
class InitFailure:
    """How a runtime's conformance function is made to fail its init, and what the caller then sees."""

    handler: str
    error_type: str
    message: str  # a substring of errorMessage
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Flavor:
    """One runtime under test: a runtime id with our bootstrap, or with AWS's client (``peer``)."""

    id: str
    runtime: str
    source: Path
    handler: str
    error_type: str  # errorType of ConformanceError raised by the handler, as this language's Lambda names it
    init: InitFailure
    peer: str | None = None  # AWS's runtime client replacing our bootstrap: "node-ric" | "python-ric"
    build: bool = False  # Go and Java: built by lambdalet.build before running


NODE = FUNCTIONS / "nodejs"
PYTHON = FUNCTIONS / "python_conformance"
RUBY = FUNCTIONS / "ruby"
JAVA = FUNCTIONS / "java"
GO = FUNCTIONS / "go"

_NODE_INIT = InitFailure("init_throws.handler", "ConformanceError", "init failed")
_PYTHON_INIT = InitFailure("init_raises.handler", "ConformanceError", "init failed")
_RUBY_INIT = InitFailure("init_raises.handler", "Init<ConformanceError>", "init failed")
_JAVA_INIT = InitFailure(
    "example.InitFails::handleRequest", "java.lang.ExceptionInInitializerError", "Error loading class example.InitFails"
)
_GO_INIT = InitFailure("bootstrap", "Runtime.ExitError", "exit status 4", {"CONFORMANCE_INIT_FAIL": "1"})

#: Every runtime id with our runtime (Java's is AWS's own client), plus AWS's clients as peers.
FLAVORS: tuple[Flavor, ...] = (
    Flavor("python3.12", "python3.12", PYTHON, "conformance.handler", "ConformanceError", _PYTHON_INIT),
    Flavor(
        "python3.12-aws-ric",
        "python3.12",
        PYTHON,
        "conformance.handler",
        "ConformanceError",
        _PYTHON_INIT,
        "python-ric",
    ),
    Flavor("nodejs20.x", "nodejs20.x", NODE, "conformance.handler", "ConformanceError", _NODE_INIT),
    Flavor("nodejs22.x", "nodejs22.x", NODE, "conformance.handler", "ConformanceError", _NODE_INIT),
    Flavor("nodejs20.x-aws-ric", "nodejs20.x", NODE, "conformance.handler", "ConformanceError", _NODE_INIT, "node-ric"),
    Flavor(
        "java17",
        "java17",
        JAVA,
        "example.Conformance::handleRequest",
        "example.ConformanceError",
        _JAVA_INIT,
        build=True,
    ),
    Flavor(
        "java21",
        "java21",
        JAVA,
        "example.Conformance::handleRequest",
        "example.ConformanceError",
        _JAVA_INIT,
        build=True,
    ),
    Flavor("ruby3.2", "ruby3.2", RUBY, "conformance.handler", "Function<ConformanceError>", _RUBY_INIT),
    Flavor("ruby3.3", "ruby3.3", RUBY, "conformance.handler", "Function<ConformanceError>", _RUBY_INIT),
    Flavor("ruby3.4", "ruby3.4", RUBY, "conformance.handler", "Function<ConformanceError>", _RUBY_INIT),
    Flavor("provided.al2023-go", "provided.al2023", GO, "bootstrap", "ConformanceError", _GO_INIT, build=True),
    Flavor("provided.al2-go", "provided.al2", GO, "bootstrap", "ConformanceError", _GO_INIT, build=True),
)
FLAVOR_IDS = [flavor.id for flavor in FLAVORS]
#: The first use of AWS's Node.js client builds its native addon from source (about two minutes on two
#: cores): tests that may be first get this much time instead of the default.
PEER_BUILD_TIMEOUT = pytest.mark.timeout(600)


def flavor_params() -> list[Any]:
    """``FLAVORS`` as pytest parameters, with room for building AWS's Node.js client where it is used."""
    return [
        pytest.param(flavor, id=flavor.id, marks=[PEER_BUILD_TIMEOUT] if flavor.peer == "node-ric" else [])
        for flavor in FLAVORS
    ]


def node_ric() -> str:
    """AWS's Node.js runtime interface client, installed (once, cached outside the repo) by a script."""
    script = REPO / "tests" / "integration" / "tools" / "install-aws-lambda-ric.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"installing aws-lambda-ric failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def java_ric() -> str:
    """AWS's Java runtime interface client (the java17/java21 bootstrap), fetched once into a cache."""
    script = REPO / "runtime-images" / "java" / "fetch-ric.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fetching the Java runtime interface client failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


class Toolchains:
    """Built code and AWS's clients, prepared once per test session."""

    def __init__(self) -> None:
        self._code: dict[Path, Path] = {}
        self._node_ric: str | None = None
        self._java_ric: str | None = None

    def code(self, flavor: Flavor) -> Path:
        if flavor.runtime in ("java17", "java21") and self._java_ric is None:
            self._java_ric = java_ric()
        if not flavor.build:
            return flavor.source
        if flavor.source not in self._code:
            self._code[flavor.source] = prepare_code(flavor.runtime, flavor.source).directory
        return self._code[flavor.source]

    def command(self, flavor: Flavor, handler: str) -> list[str]:
        """The bootstrap command replacing ours, for AWS's clients; empty for our own runtime."""
        if flavor.peer == "node-ric":
            if self._node_ric is None:
                self._node_ric = node_ric()
            return [self._node_ric, handler]
        if flavor.peer == "python-ric":
            return [sys.executable, "-m", "awslambdaric", handler]
        return []


@dataclass
class Invoked:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def function_error(self) -> str | None:
        return self.headers.get("X-Amz-Function-Error")


class Environment:
    """One agent running one runtime; invoke it like Lambda's Invoke API."""

    def __init__(self, agent: Agent, out: io.BytesIO, session: aiohttp.ClientSession) -> None:
        self.agent = agent
        self.out = out
        self.session = session
        self.url = f"http://127.0.0.1:{agent.port}{INVOKE_PATH}"

    async def invoke(self, payload: Any, *, headers: Mapping[str, str] | None = None) -> Invoked:
        # A file-like body: aiohttp streams it instead of writing megabytes from the event loop at once.
        data = io.BytesIO(json.dumps(payload, ensure_ascii=False).encode())
        async with self.session.post(self.url, data=data, headers=dict(headers or {})) as response:
            return Invoked(response.status, response.headers, await response.read())

    def logs(self) -> str:
        return self.out.getvalue().decode(errors="replace")


@contextlib.asynccontextmanager
async def running(
    toolchains: Toolchains,
    flavor: Flavor,
    *,
    handler: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 (the function's Lambda timeout, not a wait)
    memory: int = 256,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Environment]:
    """An agent (in this event loop; the runtime is a real child process) running ``flavor``'s code."""
    handler = handler or flavor.handler
    code = toolchains.code(flavor)
    argv = [
        "--code",
        str(code),
        "--handler",
        handler,
        "--runtime",
        flavor.runtime,
        "--port",
        "0",
        "--timeout",
        str(timeout),
        "--memory",
        str(memory),
        "--function-name",
        FUNCTION_NAME,
    ]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    command: Sequence[str] = toolchains.command(flavor, handler)
    if command:
        argv += ["--", *command]
    out = io.BytesIO()
    agent = Agent(from_args(argv, {}), environ=os.environ, out=out)
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Environment(agent, out, session)
    finally:
        await agent.stop()


def flavor_by_id(flavor_id: str) -> Flavor:
    return next(flavor for flavor in FLAVORS if flavor.id == flavor_id)
