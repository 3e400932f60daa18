"""The local backend: each execution environment is an agent process on loopback (embedded mode).

``start`` prepares the code (``lambdalet.build.prepare_code`` in a worker thread; inline files are written
to the state directory), spawns ``<python> -m lambdalet_agent --port 0 --port-file ...`` in its own
session, waits for the port file and for ``GET /readyz``, and returns the environment. The agent's stdout
(function output and START/END/REPORT lines) goes to the :class:`~lambdalet_gateway.logs.LogStore`.
``stop`` ends the whole process group (the agent and its runtime), SIGTERM then SIGKILL.

CPU: not capped by default (processes share the host's cores); with ``cpu_limits`` each environment runs
in a CPU cgroup with ``memoryMB / 1769`` of a CPU where the OS lets the gateway create one (``cpu``).
Memory is the agent's business (it reports Max Memory Used and enforces the limit where it can).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from lambdalet.build import BuildError, prepare_code
from lambdalet.spec import Function

from . import standby
from .backend import Environment, EnvironmentId, LostCallback, StartError
from .cpu import CpuCgroups
from .logs import LogStore
from .settings import Settings
from .standby import ForkServer

log = logging.getLogger("lambdalet.gateway.local")

#: How long an agent may take to bind its port and finish the function's init.
_START_LIMIT_S = 60.0
_POLL_S = 0.005
#: Environments starting at once, per CPU (each start is mostly CPU: an interpreter and its imports).
_START_SLOTS_PER_CPU = 2
_STOP_GRACE_S = 2.0
#: Environment variables of the gateway that must not leak into an agent's own settings.
_AGENT_SETTINGS_ENV = (
    "LAMBDALET_AGENT_PORT",
    "LAMBDALET_RUNTIME",
    "LAMBDALET_RUNTIME_API_ADDRESS",
    "LAMBDA_TASK_ROOT",
    "_HANDLER",
    "AWS_LAMBDA_FUNCTION_TIMEOUT",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
)


@dataclass(eq=False)
class _Process:
    proc: asyncio.subprocess.Process
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: bool = False
    #: The environment's CPU cgroup (its ``cgroup.procs``), when CPU limits are on.
    cgroup: Path | None = None
    #: Process groups of the agent's children seen when it became ready (its runtime).
    groups: set[int] = field(default_factory=set)


class LocalBackend:
    def __init__(self, settings: Settings, logs: LogStore, on_lost: LostCallback) -> None:
        self._settings = settings
        self._logs = logs
        self._on_lost = on_lost
        self._owned_state_dir = settings.state_dir is None
        self._state_dir = settings.state_dir or Path(tempfile.mkdtemp(prefix="lambdalet-"))
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._ids = itertools.count(1)
        self._environments: dict[EnvironmentId, Environment] = {}
        #: Every agent process from its spawn (or fork) until it is ended: also the starts in progress, which
        #: close() ends too, so a start that finishes after close() leaves no process behind.
        self._processes: set[_Process] = set()
        self._closed = False
        self._session: aiohttp.ClientSession | None = None
        env = {k: v for k, v in os.environ.items() if k not in _AGENT_SETTINGS_ENV}
        env["LAMBDALET_BIND_ADDRESS"] = "127.0.0.1"
        env["AWS_REGION"] = settings.region
        env["PYTHONUNBUFFERED"] = "1"
        self._base_env = env
        self._cpu = CpuCgroups.detect() if settings.cpu_limits else None
        self._start_slots = asyncio.Semaphore(_START_SLOTS_PER_CPU * (os.cpu_count() or 1))
        # Fast start (the default, see standby.py): agents forked from a zygote that imported the agent, with
        # settings.standby_agents of them forked ahead; off (--no-fast-start), every agent is spawned.
        self._zygote: ForkServer | None = None
        if settings.fast_start and standby.supported():
            self._zygote = ForkServer(settings.agent_python, env, settings.standby_agents)
            self._zygote.start_soon()
        elif settings.fast_start:
            log.info("fast start needs Linux (pidfd, SCM_RIGHTS); every agent is spawned")
        if self._cpu is not None:
            log.info("CPU limits (memoryMB/1769 of a CPU per environment): %s", self._cpu.mechanism)

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    async def start(self, function: Function, *, provisioned: bool) -> Environment:
        # At most a few environments start at once: a burst that asks for hundreds would otherwise have them
        # all share the cores and become ready together, late, while the first few ready ones could serve
        # the waiting invocations (any waiting invocation takes the first environment that is ready).
        async with self._start_slots:
            return await self._start(function, provisioned=provisioned)

    async def _start(self, function: Function, *, provisioned: bool) -> Environment:
        if self._closed:
            raise StartError("the gateway is shutting down")
        code_dir = await asyncio.to_thread(self._code_dir, function)
        env_id = EnvironmentId(f"{function.name}-{next(self._ids)}")
        port_file = self._state_dir / "ports" / f"{env_id}.port"
        port_file.parent.mkdir(parents=True, exist_ok=True)
        port_file.unlink(missing_ok=True)
        spec = function.spec
        argv = [
            self._settings.agent_python,
            # -P: the working directory (the function's code) is not on the agent's import path, so a
            # function's file named like a module the agent imports (uuid.py, asyncio.py) does not replace it
            "-P",
            "-m",
            "lambdalet_agent",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--code",
            str(code_dir),
            "--runtime",
            str(spec.runtime),
            "--timeout",
            str(spec.timeoutSeconds),
            "--memory",
            str(spec.memoryMB),
            "--function-name",
            function.name,
            "--initialization-type",
            "provisioned-concurrency" if provisioned else "on-demand",
        ]
        if spec.handler:
            argv += ["--handler", spec.handler]
        if spec.perEnvironmentConcurrency > 1:
            argv += ["--max-concurrency", str(spec.perEnvironmentConcurrency)]
        for key, value in spec.environment.variables.items():
            argv += ["--env", f"{key}={value}"]
        cgroup = await asyncio.to_thread(self._cpu.create, env_id, spec.memoryMB) if self._cpu else None
        forked = self._zygote is not None
        while True:
            proc = await self._zygote.take(argv[4:], str(code_dir), cgroup) if self._zygote and forked else None
            if proc is None:
                forked = False
                proc = await self._spawn(argv, code_dir, cgroup)
            handle = _Process(proc, cgroup=cgroup)
            self._processes.add(handle)
            environment = Environment(id=env_id, function=function.name, url="", provisioned=provisioned, handle=handle)
            handle.readers = [
                asyncio.create_task(self._pump_stdout(environment, proc)),
                asyncio.create_task(self._pump_stderr(environment, proc)),
            ]
            try:
                port = await self._wait_port(proc, port_file)
                break
            except StartError as exc:
                if not forked:
                    await self._terminate(handle)
                    raise
                # a spare that died (killed, or the zygote with it) costs no cold start: spawn the agent
                handle.cgroup = None  # kept for the spawned agent
                await self._terminate(handle)
                log.warning("forked agent for %s failed (%s); spawning it", env_id, exc, extra={"environment": env_id})
                forked = False
            except BaseException:
                await self._terminate(handle)
                raise
        try:
            environment.url = f"http://127.0.0.1:{port}"
            # The agent listens once its runtime is started; it holds an invocation that arrives during init
            # until init ends (and answers it with the init error if init fails), so an on-demand environment
            # serves the invocation that waits for it at once: that invocation's wait overlaps the runtime's
            # start instead of following a /readyz poll. Provisioned environments are reported when warm.
            if provisioned:
                await self._wait_ready(proc, environment.url)
            handle.groups = await asyncio.to_thread(_child_groups, proc.pid)
        except BaseException:
            await self._terminate(handle)
            raise
        self._environments[env_id] = environment
        handle.readers.append(asyncio.create_task(self._watch(environment)))
        log.info(
            "started environment %s (pid %d, %s)",
            env_id,
            proc.pid,
            environment.url,
            extra={"function": function.name, "environment": env_id},
        )
        return environment

    async def _spawn(self, argv: list[str], code_dir: Path, cgroup: Path | None) -> asyncio.subprocess.Process:
        if cgroup is not None:
            # join the CPU cgroup before the agent (and the runtime it starts) runs a single instruction
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup), *argv]
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._base_env,
            cwd=str(code_dir),
            start_new_session=True,
        )

    def _code_dir(self, function: Function) -> Path:
        code = function.spec.code
        if code.path is not None:
            try:
                return prepare_code(function.spec.runtime, Path(code.path)).directory
            except BuildError as exc:
                raise StartError(str(exc), function_error=True, error_type="Runtime.BuildError") from exc
        if code.inline is not None:
            digest = hashlib.sha256()
            for name, content in sorted(code.inline.files.items()):
                digest.update(name.encode() + b"\0" + content.encode() + b"\0")
            target = self._state_dir / "code" / f"{function.name}-{digest.hexdigest()[:16]}"
            if not target.is_dir():
                staging = Path(tempfile.mkdtemp(dir=self._state_dir, prefix="staging-"))
                for name, content in code.inline.files.items():
                    file = staging / name
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_text(content, encoding="utf-8")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    staging.rename(target)
                except OSError:
                    shutil.rmtree(staging, ignore_errors=True)
            try:
                return prepare_code(function.spec.runtime, target).directory
            except BuildError as exc:
                raise StartError(str(exc), function_error=True, error_type="Runtime.BuildError") from exc
        source = "code.image" if code.image else "code.url" if code.url else "code.configMap"
        raise StartError(
            f"{source} is not supported by the local backend; use code.path or code.inline",
            function_error=True,
            error_type="Runtime.UnsupportedCodeSource",
        )

    async def _wait_port(self, proc: asyncio.subprocess.Process, port_file: Path) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_LIMIT_S
        while True:
            port = await asyncio.to_thread(_read_port, port_file)
            if port is not None:
                return port
            if proc.returncode is not None:
                raise StartError(f"the agent exited with status {proc.returncode} before it listened")
            if loop.time() > deadline:
                raise StartError(f"the agent did not listen within {_START_LIMIT_S:g} seconds")
            await asyncio.sleep(_POLL_S)

    async def _wait_ready(self, proc: asyncio.subprocess.Process, url: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_LIMIT_S
        probe = f"{url}/readyz"
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with self._session.get(probe) as resp:
                    if resp.status == 200:
                        return
            if proc.returncode is not None:
                raise StartError(f"the agent exited with status {proc.returncode} during init")
            if loop.time() > deadline:
                raise StartError(f"the environment did not become ready within {_START_LIMIT_S:g} seconds")
            await asyncio.sleep(_POLL_S)

    async def _pump_stdout(self, environment: Environment, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        name = environment.function
        append = self._logs.append
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line longer than the stream limit: take what is there
                line = await proc.stdout.read(1 << 16)
            if not line:
                return
            append(name, line.decode("utf-8", "replace").rstrip("\n"))

    async def _pump_stderr(self, environment: Environment, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            try:
                line = await proc.stderr.readline()
            except ValueError:
                line = await proc.stderr.read(1 << 16)
            if not line:
                return
            log.info(
                "agent %s: %s",
                environment.id,
                line.decode("utf-8", "replace").rstrip(),
                extra={"function": environment.function, "environment": environment.id},
            )

    async def _watch(self, environment: Environment) -> None:
        handle = environment.handle
        assert isinstance(handle, _Process)
        await handle.proc.wait()
        if not handle.stopping:
            log.warning(
                "environment %s exited with status %s",
                environment.id,
                handle.proc.returncode,
                extra={"function": environment.function, "environment": environment.id},
            )
            _kill_groups(handle.groups)
            self._environments.pop(environment.id, None)
            self._processes.discard(handle)
            self._on_lost(environment)

    async def stop(self, environment: Environment) -> None:
        self._environments.pop(environment.id, None)
        handle = environment.handle
        if isinstance(handle, _Process):
            await self._terminate(handle)
            log.info(
                "stopped environment %s",
                environment.id,
                extra={"function": environment.function, "environment": environment.id},
            )

    async def _terminate(self, handle: _Process) -> None:
        handle.stopping = True
        proc = handle.proc
        # The agent runs its runtime in a process group of its own; note them to end whatever outlives it.
        groups = {proc.pid} | handle.groups | await asyncio.to_thread(_child_groups, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        _kill_groups(groups)
        await proc.wait()
        if handle.cgroup is not None and self._cpu is not None:
            await asyncio.to_thread(self._cpu.remove, handle.cgroup)
        for reader in handle.readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        self._processes.discard(handle)

    async def close(self) -> None:
        self._closed = True
        environments = list(self._environments.values())
        await asyncio.gather(*(self.stop(env) for env in environments), return_exceptions=True)
        # starts still in progress: their agents are ended here (the start then fails)
        await asyncio.gather(*(self._terminate(h) for h in list(self._processes)), return_exceptions=True)
        if self._zygote is not None:
            await self._zygote.close()
        if self._session is not None:
            await self._session.close()
        if self._cpu is not None:
            await asyncio.to_thread(self._cpu.close)
        if self._owned_state_dir:
            await asyncio.to_thread(shutil.rmtree, self._state_dir, True)


def _read_port(port_file: Path) -> int | None:
    try:
        return int(port_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _child_groups(pid: int) -> set[int]:
    """Process groups of ``pid``'s children (Linux ``/proc``; empty elsewhere).

    Reads the kernel's list of ``pid``'s children (``/proc/<pid>/task/*/children``: a few files, on the
    cold-start path) and falls back to scanning every process where that list is not available.
    """
    groups: set[int] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return groups
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
        children = [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        children = None
    if children is not None:
        for child in children:
            try:
                fields = (proc / str(child) / "stat").read_text(errors="replace").rsplit(")", 1)[1].split()
            except OSError:
                continue
            groups.add(int(fields[2]))
        return groups
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            groups.add(int(fields[2]))
    return groups


def _kill_groups(groups: set[int]) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
