"""Pre-started agent processes for the local backend: cold starts without the interpreter's own start.

An agent process spends most of its start (about 0.3 s on a 2-core machine) starting Python and importing
aiohttp. A standby is an agent process started ahead of need, with those imports done, that waits on its
stdin for the one line telling it which environment to be: its command-line flags, its working directory
and, when CPU limits are on, the cgroup to join first. From then on it is exactly the agent that
``python -m lambdalet_agent FLAGS`` would have been (same code path, same environment variables: every
agent of a backend gets the same base environment, the function's own variables travel as ``--env``
flags). The backend takes one standby per environment it starts and starts a replacement in the
background, a little later, so the replacement's imports do not compete with the cold start it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("lambdalet.gateway.standby")

#: Both programs below rename themselves to the agent they become.
_SHOW_ARGV = """\
def _show_argv(argv):
    # Rewrite this process's command line in place (/proc/self/mem over the argv area), so ps and anything
    # reading /proc/<pid>/cmdline see the agent it became, not the program that started it.
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
        text = b"\\0".join(a.encode() for a in argv)[: end - start - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(text + b"\\0" * (end - start - len(text)))
    except (OSError, ValueError, IndexError):
        pass
"""

#: What a standby runs: import the agent, wait for its orders, become that agent.
STANDBY_PROGRAM = (
    """\
import json, os, sys
from lambdalet_agent import cli
"""
    + _SHOW_ARGV
    + """\
line = sys.stdin.readline()
if not line:
    sys.exit(0)
order = json.loads(line)
_show_argv([sys.executable, "-m", "lambdalet_agent", *order["argv"]])
if order.get("cgroup"):
    with open(order["cgroup"], "w") as procs:
        procs.write(str(os.getpid()))
os.chdir(order["cwd"])
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
sys.exit(cli.main(["agent", *order["argv"]]))
"""
)

#: Start a replacement this long after a standby is taken (the cold start it serves goes first).
REFILL_DELAY_S = 0.15


class StandbyPool:
    """Keeps ``size`` standby agent processes ready; ``take`` hands one over with its orders."""

    def __init__(self, python: str, env: Mapping[str, str], size: int) -> None:
        self._python = python
        self._env = dict(env)
        self._size = size
        self._ready: list[asyncio.subprocess.Process] = []
        self._starting = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def fill_soon(self, delay: float = 0.0) -> None:
        """Start standbys up to the pool's size (in the background)."""
        if self._closed or len(self._ready) + self._starting >= self._size:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop yet: the first take() fills the pool
            return
        missing = self._size - len(self._ready) - self._starting
        self._starting += missing
        for _ in range(missing):
            task = loop.create_task(self._start_one(delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_one(self, delay: float) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)
            if self._closed:
                return
            proc = await asyncio.create_subprocess_exec(
                self._python,
                "-c",
                STANDBY_PROGRAM,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("could not start a standby agent: %s", exc)
            return
        finally:
            self._starting -= 1
        if self._closed:
            await _discard(proc)
            return
        self._ready.append(proc)

    async def take(
        self, argv: Sequence[str], cwd: str, cgroup: Path | None = None
    ) -> asyncio.subprocess.Process | None:
        """A standby turned into the agent ``python -m lambdalet_agent *argv`` in ``cwd``; None if none is ready."""
        while self._ready:
            proc = self._ready.pop()
            if proc.returncode is not None or proc.stdin is None:
                continue
            order = {"argv": list(argv), "cwd": cwd, "cgroup": str(cgroup) if cgroup else None}
            try:
                proc.stdin.write(json.dumps(order).encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()
            except (ConnectionError, RuntimeError):
                await _discard(proc)
                continue
            self.fill_soon(REFILL_DELAY_S)
            return proc
        self.fill_soon(REFILL_DELAY_S)
        return None

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        ready, self._ready = self._ready, []
        await asyncio.gather(*(_discard(proc) for proc in ready), return_exceptions=True)


async def _pipe_reader(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(loop=loop)

    def protocol() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(reader)

    await loop.connect_read_pipe(protocol, os.fdopen(fd, "rb", 0))
    return reader


async def _discard(proc: asyncio.subprocess.Process) -> None:
    """End an unused standby (closing its stdin makes it exit; kill it if it does not)."""
    if proc.stdin is not None:
        proc.stdin.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 2.0)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


#: The fork server: import the agent once, then fork one agent per order (see :class:`ForkServer`).
FORK_SERVER_PROGRAM = (
    """\
import gc, json, os, selectors, signal, socket, sys, traceback
from lambdalet_agent import cli
# what is imported now stays shared with every forked agent: keep the collector from touching (copying) it
gc.freeze()
"""
    + _SHOW_ARGV
    + """
control = socket.socket(fileno=int(sys.argv[1]))
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda signo, frame: None)
selector = selectors.DefaultSelector()
selector.register(control, selectors.EVENT_READ)
selector.register(wake_r, selectors.EVENT_READ)

def child(order, out_w, err_w):
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        _show_argv([sys.executable, "-m", "lambdalet_agent", *order["argv"]])
        if order.get("cgroup"):
            with open(order["cgroup"], "w") as procs:
                procs.write(str(os.getpid()))
        os.chdir(order["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (null, out_w, err_w):
            os.close(fd)
        code = cli.main(["agent", *order["argv"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code or 0)

while True:
    for key, _ in selector.select():
        if key.fileobj is control:
            data = control.recv(1 << 20)
            if not data:
                sys.exit(0)
            order = json.loads(data)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                selector.close()
                control.close()
                for fd in (wake_r, wake_w, out_r, err_r):
                    os.close(fd)
                child(order, out_w, err_w)
            os.close(out_w)
            os.close(err_w)
            socket.send_fds(control, [b"spawn %d %d" % (order["id"], pid)], [out_r, err_r])
            os.close(out_r)
            os.close(err_r)
        else:
            os.read(wake_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                control.send(b"exit %d %d" % (pid, os.waitstatus_to_exitcode(status)))
"""
)


class ForkedAgent(asyncio.subprocess.Process):
    """An agent forked by the fork server, with the interface of a process the backend started itself.

    Its exit status comes from the fork server (its parent); its stdout and stderr are pipes the fork
    server created and handed over.
    """

    def __init__(self, pid: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
        # deliberately not calling Process.__init__: there is no subprocess transport
        self.pid = pid
        self.stdin = None
        self.stdout = stdout
        self.stderr = stderr
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def exited(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    def send_signal(self, signo: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signo)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """One process that has imported the agent and forks a new agent per environment (``fork`` costs a few
    milliseconds where starting Python and importing aiohttp costs ~0.3 s of CPU), so bursts of cold starts
    scale with the cores, and forked agents share their imported code's pages.

    The fork server is the agents' parent: it reaps them and reports each exit status over a
    ``SOCK_SEQPACKET`` socket, which also carries the orders and, with each new agent, the read ends of
    its stdout and stderr pipes (``SCM_RIGHTS``).
    """

    def __init__(self, python: str, env: Mapping[str, str]) -> None:
        self._python = python
        self._env = dict(env)
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, list[int]]]] = {}
        self._children: dict[int, ForkedAgent] = {}
        self._early_exits: dict[int, int] = {}
        self._starting: asyncio.Lock | None = None
        self._task: asyncio.Task[bool] | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._sock is not None

    def start_soon(self) -> None:
        """Start the fork server in the background when an event loop runs (else at the first take)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._ensure())
        self._task = task

    async def _ensure(self) -> bool:
        if self.alive:
            return True
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.alive:
                return True
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    self._python,
                    "-c",
                    FORK_SERVER_PROGRAM,
                    str(theirs.fileno()),
                    stdin=asyncio.subprocess.DEVNULL,
                    env=self._env,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
            except OSError as exc:
                log.warning("could not start the agent fork server: %s", exc)
                ours.close()
                return False
            finally:
                theirs.close()
            ours.setblocking(False)
            self._sock = ours
            asyncio.get_running_loop().add_reader(ours.fileno(), self._on_message)
            return True

    def _on_message(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, 256, 2)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lost()
                return
            kind, first, second = data.split()
            if kind == b"spawn":
                future = self._pending.pop(int(first), None)
                if future is not None and not future.done():
                    future.set_result((int(second), fds))
                else:
                    for fd in fds:
                        os.close(fd)
            elif kind == b"exit":
                pid, code = int(first), int(second)
                child = self._children.pop(pid, None)
                if child is not None:
                    child.exited(code)
                else:
                    self._early_exits[pid] = code

    def _lost(self) -> None:
        """The fork server is gone: its agents are orphans whose exit nobody reports; end them."""
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the agent fork server exited"))
        self._pending.clear()
        for pid, child in list(self._children.items()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            child.exited(-signal.SIGKILL)
        self._children.clear()

    async def take(
        self, argv: Sequence[str], cwd: str, cgroup: Path | None = None
    ) -> asyncio.subprocess.Process | None:
        """A new agent ``python -m lambdalet_agent *argv`` in ``cwd``, forked; None if the server is down."""
        if not await self._ensure():
            return None
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        order_id = next(self._ids)
        future: asyncio.Future[tuple[int, list[int]]] = loop.create_future()
        self._pending[order_id] = future
        order = {"id": order_id, "argv": list(argv), "cwd": cwd, "cgroup": str(cgroup) if cgroup else None}
        try:
            await loop.sock_sendall(self._sock, json.dumps(order).encode())
            pid, fds = await asyncio.wait_for(future, 30)
        except (OSError, TimeoutError) as exc:
            self._pending.pop(order_id, None)
            log.warning("the agent fork server did not fork: %s", exc)
            return None
        readers = [await _pipe_reader(loop, fd) for fd in fds]
        child = ForkedAgent(pid, readers[0], readers[1])
        if pid in self._early_exits:
            child.exited(self._early_exits.pop(pid))
        else:
            self._children[pid] = child
        return child

    async def close(self) -> None:
        """Stop the fork server; agents it forked that still run are killed (nobody could reap them)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self._sock is not None:
            self._lost()
        if self._proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._proc.wait(), 2.0)
            if self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
