"""Helpers shared by the async integration tests: a local nats-server process with JetStream (started,
SIGKILLed and restarted on the same store), ``lambdalet up`` as a real process (SIGKILLed with everything it
started, and restarted on the same queue file), functions that record each run from the function side,
free ports, and waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class NatsServer:
    """A ``nats-server -js`` on loopback with its store in a test directory."""

    def __init__(self, store: Path) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(binary).exists():
            pytest.fail("nats-server is not installed: run `make apt-deps` (Debian package nats-server)")
        self.binary = binary
        self.store = store
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = store / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


@contextmanager
def nats_server(store: Path) -> Iterator[NatsServer]:
    server = NatsServer(store)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0, every: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached within {within} s")
        await asyncio.sleep(every)


# ------------------------------------------------------------------------------------------ the gateway

REPO = Path(__file__).resolve().parents[2]
LAMBDALET = str(Path(sys.executable).with_name("lambdalet"))

#: A Python function that proves each run from the function side: it appends its request id to
#: $RUNS_FILE (one O_APPEND write per run), then fails when the event asks it to.
RECORDING_FUNCTION = """\
import json
import os
import time


def handler(event, context):
    with open(os.environ["RUNS_FILE"], "a") as runs:
        runs.write(context.aws_request_id + "\\n")
    if isinstance(event, dict):
        if event.get("sleep"):
            time.sleep(event["sleep"])
        if event.get("fail"):
            raise RuntimeError("asked to fail")
    return {"echo": event}
"""

#: A destination function: appends each record it receives to $RECORDS_FILE, one JSON per line.
AUDIT_FUNCTION = """\
import json
import os


def handler(event, context):
    with open(os.environ["RECORDS_FILE"], "a") as records:
        records.write(json.dumps({"requestId": context.aws_request_id, "record": event}) + "\\n")
    return None
"""


def write_function(directory: Path, name: str, code: str, **spec: Any) -> Path:
    """A Function manifest with inline Python code."""
    manifest = {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": name},
        "spec": {"runtime": "python3.12", "handler": "app.handler", "code": {"inline": {"files": {"app.py": code}}}}
        | spec,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _descendants(roots: set[int]) -> set[int]:
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _mentioning(text: str) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


class GatewayProcess:
    """``lambdalet up`` as a real process with the SQLite queue at ``queue_path``; SIGKILL and restart."""

    def __init__(self, workdir: Path, manifests: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.manifests = manifests
        self.state_dir = workdir / "state"
        self.queue_path = workdir / "async.sqlite3"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "LAMBDALET_STATE_DIR": str(self.state_dir),
            "LAMBDALET_ASYNC_SQLITE_PATH": str(self.queue_path),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "gateway.log"
        self.starts = 0

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [LAMBDALET, "up", str(self.manifests), "--port", str(self.port), "--quiet"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"lambdalet up exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"lambdalet up not ready: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the gateway and every process it started (agents, runtimes): nothing is shut down cleanly."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
        # its agents name the state directory in their command lines; their runtimes are their children
        for pid in _descendants(_mentioning(str(self.state_dir))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text: str = response.read().decode()
            return text


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            sample, _, value = line.rpartition(" ")
            found = sample[len(name) :].strip("{}")
            if ",".join(sorted(found.split(","))) == wanted or (not wanted and not found):
                return float(value)
    return 0.0


@contextmanager
def gateway_process(workdir: Path, manifests: Path, env: dict[str, str]) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(workdir, manifests, env)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()
