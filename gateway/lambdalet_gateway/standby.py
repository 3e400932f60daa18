"""Fast starts for the local backend: agents forked from a zygote that already imported the agent.

Starting an agent from scratch costs about 0.3 s on a 2-core machine, almost all of it the interpreter's
start and the agent's imports. The fork server (the *zygote*) is one platform process that has done those
imports once; every environment's agent is forked from it, so a cold start no longer pays them and the
forked agents share the imported code's memory pages. The zygote also keeps ``spares`` agents forked ahead
(each a process waiting for the one order that tells it which environment to be), handed to the next cold
starts and replaced in the background a little later, so the replacement does not compete with the cold
start it serves. While it waits, a spare copies the memory pages it shares with the zygote
(``MADV_POPULATE_WRITE`` on the pages present), which the agent's start would otherwise copy one page fault
at a time: about 3-5 ms less per cold start on a 2-core machine, for an environment as large in memory as
a spawned one (an agent forked on demand in a burst keeps sharing its pages).

An order carries the agent's command-line flags, its working directory and, when CPU limits are on, the
cgroup to join first. A forked agent then runs exactly the code of ``python -m lambdalet_agent FLAGS``:
every agent of a backend gets the same base environment (the function's own variables travel as ``--env``
flags), it runs in a session (process group) of its own, its stdout and stderr are pipes read by the
gateway, its stdin is ``/dev/null``. What it does not inherit from the zygote: the zygote's sockets and
pipes (closed after the fork), its signal handlers (reset), the command line (rewritten to the agent's).

The zygote and its spares are platform processes, not execution environments: they hold no function's code
or settings, and a function with zero environments has no process. If the zygote dies, the agents it forked
keep running (the gateway watches each through a pidfd, not through the zygote), its spares exit (their
order pipe closes), the next cold start falls back to a plain spawn and the zygote is started again in the
background.

Linux only (``pidfd_open``, ``SOCK_SEQPACKET``, ``SCM_RIGHTS``); elsewhere the backend spawns every agent.
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
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("lambdalet.gateway.standby")

#: Forked agents whose exit status the gateway could not learn (their zygote died before reporting it).
UNKNOWN_STATUS = 255
#: A spare handed out is replaced this long after (the cold start it serves goes first).
REFILL_DELAY_S = 0.1
#: A zygote that dies is started again after this long, doubled (up to the maximum) each time one dies
#: before it said it was ready, so a zygote that cannot start (a broken interpreter) does not spin.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0
#: A ready zygote forks within milliseconds: one that does not answer in this long is stuck, and is killed
#: (and started again) while the cold start spawns its agent. Before it is ready (importing) it gets longer.
REPLY_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0
#: The first line of the zygote's program: how tests and tools tell the zygote and its spares apart.
ZYGOTE_MARK = "# lambdalet agent zygote"

#: The zygote (see the module docstring). argv: control socket fd, spares to keep, refill delay (s).
ZYGOTE_PROGRAM = (
    ZYGOTE_MARK
    + """
import ctypes, gc, json, os, select, selectors, signal, socket, sys, time, traceback
from lambdalet_agent import cli

# what is imported now stays shared with every forked agent: keep the collector from touching (copying) it
gc.freeze()


def show_argv(argv):
    # Rewrite this process's command line in place (/proc/self/mem over the argv area), so ps and anything
    # reading /proc/<pid>/cmdline see the agent it became, not the zygote.
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


PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_POPULATE_WRITE = 23  # Linux 5.14+; elsewhere madvise fails and nothing is copied ahead
madvise = ctypes.CDLL(None, use_errno=True).madvise
madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def unshare(order_r):
    # Copy now, while this spare waits, the memory pages it still shares with the zygote (copy-on-write):
    # the cold start it serves then writes its objects without a page fault and a copy for each page. Only
    # pages present in the private writable mappings (the heap, Python's arenas) are touched, so no memory
    # is added beyond the copies; their content is unchanged (MADV_POPULATE_WRITE simulates a write fault).
    # An order that arrives meanwhile stops it: the rest is copied on demand, as without it.
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            regions = []
            for line in maps:
                fields = line.split()
                anonymous = len(fields) < 6 or fields[5] == "[heap]"
                if anonymous and fields[1].startswith("rw") and fields[1].endswith("p"):
                    regions.append([int(x, 16) for x in fields[0].split("-")])
            for lo, hi in regions:
                if select.select([order_r], [], [], 0)[0]:
                    return
                pagemap.seek(lo // PAGE * 8)
                entries = memoryview(pagemap.read((hi - lo) // PAGE * 8)).cast("Q")
                start = None
                for index in range(len(entries) + 1):
                    present = index < len(entries) and entries[index] >> 63
                    if present and start is None:
                        start = index
                    elif not present and start is not None:
                        madvise(lo + start * PAGE, (index - start) * PAGE, MADV_POPULATE_WRITE)
                        start = None
    except (OSError, ValueError):
        pass


control = socket.socket(fileno=int(sys.argv[1]))
keep = int(sys.argv[2])
refill_delay = float(sys.argv[3])
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
signal.set_wakeup_fd(wake_w)
signal.signal(signal.SIGCHLD, lambda signo, frame: None)
selector = selectors.DefaultSelector()
selector.register(control, selectors.EVENT_READ)
selector.register(wake_r, selectors.EVENT_READ)
spares = []  # [pid, order_w, out_r, err_r], oldest first
refill_at = 0.0


def spare(order_r, out_w, err_w, ahead):
    # A forked agent: wait for the order, then become that agent. Never returns.
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (null, out_w, err_w):
            os.close(fd)
        if ahead:
            unshare(order_r)
        data = b""
        while chunk := os.read(order_r, 1 << 16):
            data += chunk
        os.close(order_r)
        if not data:  # the zygote is gone or discarded this spare
            code = 0
            return
        order = json.loads(data)
        show_argv([sys.executable, "-P", "-m", "lambdalet_agent", *order["argv"]])
        if order.get("cgroup"):
            with open(order["cgroup"], "w") as procs:
                procs.write(str(os.getpid()))
        os.chdir(order["cwd"])
        code = cli.main(["agent", *order["argv"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code or 0)


def fork_spare(ahead):
    order_r, order_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        selector.close()
        control.close()
        for fd in [wake_r, wake_w, order_w, out_r, err_r, *(fd for s in spares for fd in s[1:])]:
            os.close(fd)
        spare(order_r, out_w, err_w, ahead)
    for fd in (order_r, out_w, err_w):
        os.close(fd)
    entry = [pid, order_w, out_r, err_r]
    spares.append(entry)
    return entry


def close_spare(entry):
    for fd in entry[1:]:
        os.close(fd)


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for entry in spares:
            if entry[0] == pid:  # a spare that died before its order: replace it later
                spares.remove(entry)
                close_spare(entry)
                break
        else:
            control.send(b"exit %d %d" % (pid, os.waitstatus_to_exitcode(status)))


def serve(order):
    while True:
        entry = spares[0] if spares else fork_spare(False)  # a burst: no time to copy pages ahead
        spares.remove(entry)
        if not os.waitpid(entry[0], os.WNOHANG)[0]:
            break
        close_spare(entry)  # it died (reaped now, its exit is nobody's business): take the next
    # The gateway learns the agent's pid before the agent exists: if this zygote dies now, the spare reads
    # end-of-file and exits, and the gateway sees that exit (and spawns the agent instead).
    socket.send_fds(control, [b"spawn %d %d" % (order["id"], entry[0])], entry[2:])
    try:
        view = memoryview(json.dumps(order).encode())
        while view:
            view = view[os.write(entry[1], view) :]
    except OSError:
        pass  # it died meanwhile: its exit is reported, as any agent's
    close_spare(entry)


def shutdown():
    for entry in spares:
        close_spare(entry)  # each spare reads end-of-file and exits
    for entry in spares:
        try:
            os.waitpid(entry[0], 0)
        except ChildProcessError:
            pass
    sys.exit(0)


control.send(b"ready 0 0")
while True:
    if len(spares) < keep and time.monotonic() >= refill_at:
        fork_spare(True)
        continue
    timeout = max(0.0, refill_at - time.monotonic()) if len(spares) < keep else None
    for key, _ in selector.select(timeout):
        if key.fileobj is control:
            data = control.recv(1 << 20)
            if not data:
                shutdown()
            serve(json.loads(data))
            refill_at = time.monotonic() + refill_delay
        else:
            os.read(wake_r, 4096)
            reap()
"""
)


def supported() -> bool:
    """Whether this platform has what the zygote needs (Linux)."""
    return sys.platform == "linux" and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


class ForkedAgent(asyncio.subprocess.Process):
    """An agent forked by the zygote, with the interface of a process the backend started itself.

    Its exit is seen through a pidfd (so it does not depend on the zygote); its exit status comes from the
    zygote, its parent, when the zygote is there to report it. Its stdout and stderr are pipes the zygote
    created and handed over.
    """

    def __init__(self, pid: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader) -> None:
        # deliberately not calling Process.__init__: there is no subprocess transport
        self.pid = pid
        self.stdin = None
        self.stdout = stdout
        self.stderr = stderr
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = self._loop.create_future()
        #: The process is gone (its pidfd said so); the zygote's report of its status may still come.
        self.gone = False
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # already exited and reaped: the zygote's report says how
            self.gone = True
            return
        self._loop.add_reader(self._pidfd, self._on_gone)

    def _on_gone(self) -> None:
        self._close_pidfd()
        self.gone = True
        if self.orphaned:
            self.exited(UNKNOWN_STATUS)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    #: Set when the zygote died: nobody will report this agent's status.
    orphaned = False

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def exited(self, code: int) -> None:
        self._close_pidfd()
        if not self._exit.done():
            self._exit.set_result(code)

    def orphan(self) -> None:
        self.orphaned = True
        if self.gone:
            self.exited(UNKNOWN_STATUS)

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
    """The gateway's side of the zygote: starts it (again, after it died), sends orders, tracks the agents.

    The zygote is the agents' parent: it reaps them and reports each exit status over a ``SOCK_SEQPACKET``
    socket, which also carries the orders and, with each new agent, the read ends of its stdout and stderr
    pipes (``SCM_RIGHTS``).
    """

    def __init__(self, python: str, env: Mapping[str, str], spares: int) -> None:
        self._python = python
        self._env = dict(env)
        self._spares = spares
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, list[int]]]] = {}
        self._children: dict[int, ForkedAgent] = {}
        self._early_exits: dict[int, int] = {}
        self._starting: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[bool]] = set()
        self._next_start = 0.0
        self._started_at = 0.0
        #: The zygote that said it was ready (its socket): one that dies before that doubles the backoff.
        self._ready: socket.socket | None = None
        self._backoff = RESTART_BACKOFF_S
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._sock is not None

    @property
    def pid(self) -> int | None:
        """The zygote's process id while it runs."""
        return self._proc.pid if self.alive and self._proc is not None else None

    def start_soon(self) -> None:
        """Start the zygote in the background when an event loop runs (else at the first take)."""
        if self._closed or self.alive:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._ensure())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ensure(self) -> bool:
        if self.alive:
            return True
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.alive:
                return True
            if self._closed:
                return False
            loop = asyncio.get_running_loop()
            if loop.time() < self._next_start:  # it died young: try again a little later
                if self._retry is None:
                    self._retry = loop.call_at(self._next_start, self._retry_start)
                return False
            self._started_at = loop.time()
            self._next_start = self._started_at + self._backoff
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc = await asyncio.create_subprocess_exec(
                    self._python,
                    "-P",  # no working directory on the import path: after a fork it is the function's code
                    "-c",
                    ZYGOTE_PROGRAM,
                    str(theirs.fileno()),
                    str(self._spares),
                    str(REFILL_DELAY_S),
                    stdin=asyncio.subprocess.DEVNULL,
                    env=self._env,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
            except OSError as exc:
                log.warning("could not start the agent zygote: %s", exc)
                ours.close()
                return False
            finally:
                theirs.close()
            ours.setblocking(False)
            self._proc = proc
            self._sock = ours
            loop.add_reader(ours.fileno(), self._on_message, ours)
            log.info("agent zygote started (pid %d, %d spare agent(s))", proc.pid, self._spares)
            return True

    def _on_message(self, sock: socket.socket) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(sock, 256, 2)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lost(sock)
                return
            kind, first, second = data.split()
            if kind == b"ready":
                self._ready = sock
            elif kind == b"spawn":
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

    def _retry_start(self) -> None:
        self._retry = None
        self.start_soon()

    def _lost(self, sock: socket.socket) -> None:
        """The zygote is gone: its agents keep running (watched by pidfd); the next take starts a new one."""
        loop = asyncio.get_running_loop()
        self._backoff = RESTART_BACKOFF_S if self._ready is sock else min(self._backoff * 2, RESTART_BACKOFF_MAX_S)
        self._next_start = max(self._next_start, self._started_at + self._backoff)
        loop.remove_reader(sock.fileno())
        sock.close()
        if self._sock is sock:
            self._sock = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the agent zygote exited"))
        self._pending.clear()
        for child in self._children.values():
            child.orphan()
        self._children.clear()
        self._early_exits.clear()
        if not self._closed:
            log.warning("the agent zygote exited; agents it forked keep running, it is started again")
            self.start_soon()

    async def take(
        self, argv: Sequence[str], cwd: str, cgroup: Path | None = None
    ) -> asyncio.subprocess.Process | None:
        """A new agent ``python -m lambdalet_agent *argv`` in ``cwd``, forked; None if the zygote is down
        (it is then started again in the background: this cold start spawns its agent, the next forks)."""
        if not self.alive:
            self.start_soon()
            return None
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        order_id = next(self._ids)
        future: asyncio.Future[tuple[int, list[int]]] = loop.create_future()
        self._pending[order_id] = future
        order = {"id": order_id, "argv": list(argv), "cwd": cwd, "cgroup": str(cgroup) if cgroup else None}
        limit = REPLY_TIMEOUT_S if self._ready is sock else START_TIMEOUT_S
        try:
            await loop.sock_sendall(sock, json.dumps(order).encode())
            pid, fds = await asyncio.wait_for(future, limit)
        except TimeoutError:
            self._pending.pop(order_id, None)
            log.warning("the agent zygote did not answer within %g s; it is restarted, this agent spawned", limit)
            if self._proc is not None and self._sock is sock:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()  # its socket's end-of-file starts another
            return None
        except OSError as exc:
            self._pending.pop(order_id, None)
            log.warning("the agent zygote did not fork an agent (%s); spawning it instead", exc)
            return None
        readers = [await _pipe_reader(loop, fd) for fd in fds]
        child = ForkedAgent(pid, readers[0], readers[1])
        if pid in self._early_exits:
            child.exited(self._early_exits.pop(pid))
        elif sock is self._sock:
            self._children[pid] = child
        else:  # the zygote died meanwhile
            child.orphan()
        return child

    async def close(self) -> None:
        """Stop the zygote (it ends its spares first). Agents it forked are the backend's to stop."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        if self._sock is not None:
            self._lost(self._sock)
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 2.0)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def _pipe_reader(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(loop=loop)

    def protocol() -> asyncio.StreamReaderProtocol:
        return _PipeProtocol(reader)

    await loop.connect_read_pipe(protocol, os.fdopen(fd, "rb", 0))
    return reader


class _PipeProtocol(asyncio.StreamReaderProtocol):
    def eof_received(self) -> bool:
        super().eof_received()
        return False  # close at EOF: a pipe has no write half (uvloop keeps the transport open otherwise)
