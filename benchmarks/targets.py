"""The systems under test, each started as real processes on loopback.

A target exposes the invoke path at one or more addresses. Targets whose execution environments take one
invocation at a time (our agent, AWS's emulator: Lambda's model) start one environment per connection the
load generator will open, and wrk pins connection i to environment i; the gateway and the floors take any
number of connections at one address.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procs

FUNCTION_DIR = Path(__file__).resolve().parent / "functions" / "noop"
HANDLER = "app.handler"
EVENT = b'{"bench": true, "payload": "0123456789abcdef"}'
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
Address = tuple[str, int]


def rie_binary() -> Path:
    """Build (once, cached) and locate AWS's runtime interface emulator."""
    script = Path(__file__).resolve().parent / "tools" / "build-rie.sh"
    out = subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def invoke(address: Address, path: str = INVOKE_PATH, timeout: float = 60.0) -> int:
    """One blocking invocation on a fresh connection; returns the HTTP status."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request("POST", path, body=EVENT, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@dataclass
class Target:
    """A started system under test."""

    name: str
    label: str
    #: One address per environment (pinned targets) or a single shared address.
    addresses: list[Address]
    pinned: bool
    path: str = INVOKE_PATH
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def addresses_for(self, concurrency: int) -> list[Address]:
        if not self.pinned:
            return self.addresses[:1]
        if concurrency > len(self.addresses):
            raise ValueError(f"{self.name}: {concurrency} connections but {len(self.addresses)} environments")
        return self.addresses[:concurrency]

    def warm_up(self, rounds: int = 3) -> None:
        for address in self.addresses:
            for _ in range(rounds):
                status = invoke(address, self.path)
                if status != 200:
                    raise RuntimeError(f"{self.name}: warm-up invocation on {address} answered {status}")

    def stop(self) -> None:
        """Stop every process and whatever it started (environments lead sessions of their own)."""
        for proc in self.processes:
            descendants = list(procs.tree(proc.pid))[1:]
            procs.stop(proc, grace=10)
            procs.kill_pids(descendants)


def start_floor(kind: str, workdir: Path) -> Target:
    port_file = workdir / f"floor-{kind}.port"
    proc = procs.spawn([procs.PYTHON, "-m", "benchmarks.floors", kind, "--port-file", str(port_file)], cwd=procs.REPO)
    port = procs.wait_port_file(port_file, proc)
    label = {"aiohttp": "floor: minimal aiohttp", "raw": "floor: raw asyncio"}[kind]
    return Target(f"floor_{kind}", label, [("127.0.0.1", port)], pinned=False, processes=[proc])


def rie_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "_HANDLER", "LAMBDA"))}
    env.update(
        LAMBDA_TASK_ROOT=str(FUNCTION_DIR),
        AWS_LAMBDA_FUNCTION_TIMEOUT="3",
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE="128",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra or {})
    return env


def rie_argv(binary: Path, port: int, api_port: int) -> list[str]:
    """aws-lambda-rie wrapping awslambdaric, the way AWS's Python base image does for a local test."""
    return [
        str(binary),
        "--log-level",
        "error",
        "--runtime-interface-emulator-address",
        f"127.0.0.1:{port}",
        "--runtime-api-address",
        f"127.0.0.1:{api_port}",
        procs.PYTHON,
        "-m",
        "awslambdaric",
        HANDLER,
    ]


def start_rie(count: int, binary: Path) -> Target:
    processes: list[subprocess.Popen[bytes]] = []
    addresses: list[Address] = []
    for _ in range(count):
        port, api_port = procs.free_port(), procs.free_port()
        proc = procs.spawn(rie_argv(binary, port, api_port), env=rie_env(), cwd=FUNCTION_DIR)
        processes.append(proc)
        addresses.append(("127.0.0.1", port))
    for proc, (host, port) in zip(processes, addresses, strict=True):
        procs.wait_connectable(host, port, proc)
    return Target("rie", "(c) emulator → awslambdaric", addresses, pinned=True, processes=processes)


def agent_argv(port_file: Path, env: dict[str, str] | None = None) -> list[str]:
    argv = [
        procs.PYTHON,
        "-m",
        "lambdalet_agent",
        "--code",
        str(FUNCTION_DIR),
        "--handler",
        HANDLER,
        "--runtime",
        "python3.11",
        "--port",
        "0",
        "--port-file",
        str(port_file),
    ]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    return argv


def start_agents(count: int, workdir: Path) -> Target:
    processes: list[subprocess.Popen[bytes]] = []
    files: list[Path] = []
    for i in range(count):
        port_file = workdir / f"agent-{i}.port"
        processes.append(procs.spawn(agent_argv(port_file), cwd=FUNCTION_DIR))
        files.append(port_file)
    addresses = [("127.0.0.1", procs.wait_port_file(f, p)) for f, p in zip(files, processes, strict=True)]
    return Target("agent", "(b) agent → our bootstrap", addresses, pinned=True, processes=processes)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lambdalet-bench-"))


def manifest(name: str, *, env: dict[str, str] | None = None, reserved: int | None = None) -> str:
    """One Function document running the no-op benchmark function (JSON is YAML)."""
    spec: dict[str, object] = {
        "runtime": "python3.11",
        "handler": HANDLER,
        "code": {"path": str(FUNCTION_DIR)},
        "memoryMB": 128,
        "timeoutSeconds": 30,
    }
    if env:
        spec["environment"] = {"variables": env}
    if reserved is not None:
        spec["reservedConcurrency"] = reserved
    doc = {"apiVersion": "lambdalet.dev/v1alpha1", "kind": "Function", "metadata": {"name": name}, "spec": spec}
    return json.dumps(doc)


def gateway_environments(address: Address, function: str) -> dict[str, int]:
    """A function's environments as the gateway's status endpoint reports them (idle, busy, starting)."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", "/lambdalet/v1/status")
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    for entry in data.get("functions", []):
        if entry["name"] == function:
            return {k: int(v) for k, v in entry["environments"].items()}
    return {}


def wait_gateway_environments(address: Address, function: str, count: int, timeout: float = 120.0) -> None:
    """Wait until ``count`` environments of ``function`` are up and none is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        envs = gateway_environments(address, function)
        if envs.get("starting", 0) == 0 and envs.get("idle", 0) + envs.get("busy", 0) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway has {envs} environments of {function}, wanted {count}")
        time.sleep(0.1)


def start_gateway(
    workdir: Path, documents: list[str], tag: str = "gateway", extra_env: dict[str, str] | None = None
) -> Target:
    """``lambdalet up`` (embedded mode: gateway + local backend) on a free port with these Functions."""
    manifests = workdir / f"{tag}-manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "functions.yaml").write_text("\n---\n".join(documents) + "\n")
    port = procs.free_port()
    env = dict(
        os.environ,
        LAMBDALET_GATEWAY_PORT=str(port),
        LAMBDALET_STATE_DIR=str(workdir / f"{tag}-state"),
    )
    env.update(extra_env or {})
    proc = procs.spawn(
        [procs.PYTHON, "-m", "lambdalet.cli", "up", str(manifests)],
        env=env,
        cwd=workdir,
        log=workdir / f"{tag}.log",
    )
    procs.wait_connectable("127.0.0.1", port, proc, timeout=60)
    return Target(
        "gateway",
        "(a) gateway → agent → our bootstrap",
        [("127.0.0.1", port)],
        pinned=False,
        path="/2015-03-31/functions/noop/invocations",
        processes=[proc],
    )
