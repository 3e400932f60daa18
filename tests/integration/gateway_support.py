"""Shared helpers for the gateway's integration tests: a gateway with the local backend running in a
background thread (so synchronous clients — boto3, the AWS CLI, urllib — can call it), Function manifests
written to a temporary directory, and process inspection through /proc."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import yaml
from aiohttp import web
from botocore.config import Config
from lambdalet_gateway.app import create_app
from lambdalet_gateway.settings import Settings

T = TypeVar("T")
#: (status, headers, body)
Reply = tuple[int, dict[str, str], bytes]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LAMBDALET = str(Path(sys.executable).parent / "lambdalet")


def write_function(directory: Path, name: str, files: Mapping[str, str], **spec: Any) -> Path:
    """Write a Function manifest with inline code; return its path."""
    manifest = {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": name},
        "spec": {"runtime": "python3.12", "handler": "app.handler", "code": {"inline": {"files": dict(files)}}} | spec,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


@dataclass
class RunningGateway:
    url: str
    app: web.Application
    loop: asyncio.AbstractEventLoop
    state_dir: Path

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def lambda_client(self, **config: Any) -> Any:
        return boto3.client(
            "lambda",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=Config(retries={"max_attempts": 0}, read_timeout=120, **config),
        )

    def post(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, data=body, headers=dict(headers or {}), method="POST")
        return _send(request)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        return _send(urllib.request.Request(self.url + path, headers=dict(headers or {})))

    def invoke(self, name: str, event: object = None) -> Reply:
        return self.post(f"/2015-03-31/functions/{name}/invocations", json.dumps(event or {}).encode())

    def status(self) -> dict[str, Any]:
        code, _, body = self.get("/lambdalet/v1/status")
        assert code == 200
        result: dict[str, Any] = json.loads(body)
        return result

    def environments(self, name: str) -> dict[str, int]:
        for function in self.status()["functions"]:
            if function["name"] == name:
                envs: dict[str, int] = function["environments"]
                return envs
        raise KeyError(name)

    def agent_pids(self, function: str | None = None) -> set[int]:
        """Agent processes of this gateway (their command line names its state directory)."""
        return agent_pids(self.state_dir, function)


def agent_pids(state_dir: Path, function: str | None = None) -> set[int]:
    """Agent processes of the gateway whose state directory is ``state_dir`` (their command line names it)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        ours = any(str(state_dir) in a for a in text) and "lambdalet_agent" in text
        if ours and (function is None or function in text):
            found.add(int(proc.name))
    return found


def processes_in(directory: Path) -> set[int]:
    """Live processes whose working directory is under ``directory`` (environments run in their code dir)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = (proc / "cwd").readlink()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and cwd.is_relative_to(directory):
            found.add(int(proc.name))
    return found


def process_tree(roots: set[int]) -> set[int]:
    """``roots`` and all their live descendants (zombies excluded)."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(proc.name)] = int(fields[1])
    found = {pid for pid in roots if pid in parents}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _send(request: urllib.request.Request) -> Reply:
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ready(url: str) -> bool:
    """The gateway at ``url`` answers ``/readyz`` with 200."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def lambdalet_up(directory: Path) -> Iterator[str]:
    """``lambdalet up DIRECTORY`` as a user runs it; its endpoint once ready. Stopped with SIGINT, it must
    exit 0 and leave no process behind."""
    port = free_port()
    proc = subprocess.Popen(
        [LAMBDALET, "up", str(directory), "--port", str(port), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(url), timeout=60, what="lambdalet up")
        yield url
    finally:
        tree = process_tree({proc.pid})
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, output
        assert not process_tree(tree), "processes left after lambdalet up stopped"


@contextmanager
def running_gateway(
    manifests: list[Path],
    tmp: Path,
    *,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    **settings: Any,
) -> Iterator[RunningGateway]:
    """A gateway on an ephemeral loopback port with the local backend, stopped (with its agents) on exit;
    its event loop from ``loop_factory`` (asyncio's own unless told)."""
    state_dir = tmp / "state"
    values: dict[str, Any] = {
        "port": 0,
        "manifests": tuple(manifests),
        "state_dir": state_dir,
        "scale_interval_s": 0.1,
        "reload_interval_s": 0.2,
    }
    values.update(settings)
    config = Settings(**values)
    loop = loop_factory()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        app = create_app(config)
        runner = web.AppRunner(app, shutdown_timeout=5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        holder["gateway"] = RunningGateway(f"http://{host}:{port}", app, loop, state_dir)
        holder["stop"] = asyncio.Event()
        started.set()
        await holder["stop"].wait()
        await runner.cleanup()

    def thread_main() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            holder["error"] = exc
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=thread_main, name="gateway", daemon=True)
    thread.start()
    started.wait(60)
    if "error" in holder:
        raise holder["error"]
    try:
        yield holder["gateway"]
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(60)


def aws_cli() -> tuple[Path, dict[str, str]]:
    """The AWS CLI installed in this venv and an environment for it that needs no AWS account (the gateway
    does not check credentials) and prints without a pager."""
    env = os.environ | {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_PAGER": "",
    }
    return Path(sys.executable).parent / "aws", env
