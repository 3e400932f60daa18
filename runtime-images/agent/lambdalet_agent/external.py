"""External runtime mode: the runtime is not the agent's child but another container of the same pod
(``code.image`` functions: the user's image runs its own entrypoint, a Runtime API client such as AWS's
``awslambdaric``, pointed at the agent through ``AWS_LAMBDA_RUNTIME_API``).

How the agent finds, watches and resets a process it did not start (the pod has
``shareProcessNamespace: true``, so the runtime container's processes are in the agent's ``/proc``):

- **Finding it.** On the runtime's first ``GET /next`` the agent knows both ends of that TCP connection.
  The connection's other end appears in ``/proc/net/tcp`` (or ``tcp6``) with the runtime's address as local
  and the agent's as remote, which gives the socket's inode; the process holding ``socket:[inode]`` among
  its ``/proc/<pid>/fd`` links is the runtime. Reading another process's ``fd`` links needs the same uid
  and no capabilities the agent lacks: both containers run as the same non-root user with all capabilities
  dropped (the operator's security context).
- **What a reset kills.** The runtime's *session*: a container's main process leads its own session (runc
  calls ``setsid`` for it; the test cluster's node stand-in starts every container with
  ``start_new_session``), and everything it forks stays in it unless it calls ``setsid`` itself. Every
  process whose session id equals the runtime's gets SIGKILL, except, defensively, the agent, its own
  ancestors (which include the pod's ``pause`` process, pid 1, on a real cluster) and pid 1. Nothing is
  killed when the runtime's session is the agent's own or 0. This is narrower than "every process that is
  not the agent's": on the test cluster, where pods do not get a PID namespace of their own, that rule
  would kill the whole machine, and on a real cluster it would also kill other sidecars. Then the kubelet
  restarts the container (``restartPolicy: Always``) and the agent waits for the new runtime's first
  ``/next``; on a real cluster the container runtime also removes whatever is left in the container's
  cgroup when its main process dies.
- **Watching it.** A ``pidfd`` (Linux 5.3+) on the runtime's process becomes readable when it exits; an
  exit is reported like a crash (``Runtime.ExitError``) on the invocation running then, or on the next
  one when the runtime died while idle. Without pidfd the process is polled once a second.
- **Memory.** The agent cannot put another container's processes under its limit: the runtime
  container's own ``resources.limits.memory`` is the limit. Max Memory Used is the runtime's peak RSS
  (``VmHWM``), reset per invocation as in the rlimit fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lambdalet_agent.memory import _PeakRss

log = logging.getLogger("lambdalet.agent")

POLL_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int


def _proc_address(text: str) -> Endpoint:
    """``0100007F:2329`` (the kernel's /proc/net/tcp{,6} notation: host byte order words) -> Endpoint."""
    raw, _, port = text.partition(":")
    data = bytes.fromhex(raw)
    # Each 32-bit word is written in host (little-endian on every platform we run on) byte order.
    ordered = b"".join(data[i : i + 4][::-1] for i in range(0, len(data), 4))
    address = ipaddress.ip_address(ordered)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return Endpoint(str(address), int(port, 16))


def _normalise(endpoint: Endpoint) -> Endpoint:
    address = ipaddress.ip_address(endpoint.host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return Endpoint(str(address), endpoint.port)


def socket_inode(tables: Iterable[str], local: Endpoint, remote: Endpoint) -> int | None:
    """The inode of the socket whose local end is ``local`` and remote end is ``remote``, from the text of
    ``/proc/net/tcp`` and ``/proc/net/tcp6``."""
    local, remote = _normalise(local), _normalise(remote)
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10:
                continue
            with contextlib.suppress(ValueError):
                if _proc_address(fields[1]) == local and _proc_address(fields[2]) == remote:
                    inode = int(fields[9])
                    if inode:
                        return inode
    return None


def socket_owners(inode: int, proc: str = "/proc") -> list[int]:
    """Every process holding ``socket:[inode]`` open (those whose fds are readable to us)."""
    wanted = f"socket:[{inode}]"
    owners: list[int] = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            fds = list(Path(entry.path, "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if str(fd.readlink()) == wanted:
                    owners.append(int(entry.name))
                    break
            except OSError:
                continue
    return owners


def find_peer_process(runtime_end: Endpoint, agent_end: Endpoint, proc: str = "/proc") -> int | None:
    """The pid of the process on the other end of one of the agent's Runtime API connections."""
    tables: list[str] = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            tables.append(Path(proc, "net", name).read_text())
    inode = socket_inode(tables, runtime_end, agent_end)
    if inode is None:
        return None
    own = os.getpid()
    owners = [pid for pid in socket_owners(inode, proc) if pid != own]
    return min(owners) if owners else None  # forked children share the socket; the parent has the lower pid


def ancestors(pid: int, parent_of: Callable[[int], int | None]) -> set[int]:
    """``pid``'s ancestors (not ``pid`` itself)."""
    seen: set[int] = set()
    current = parent_of(pid)
    while current is not None and current > 0 and current not in seen:
        seen.add(current)
        current = parent_of(current)
    return seen


def victims(sessions: dict[int, int], runtime_session: int, own_pid: int, protected: set[int]) -> list[int]:
    """The processes a reset kills: those in ``runtime_session`` (``sessions``: pid -> session id), never
    the agent, ``protected`` (its ancestors) or pid 1, and none when the session is the agent's own or 0."""
    if runtime_session <= 0 or sessions.get(own_pid) == runtime_session:
        return []
    return sorted(
        pid
        for pid, sid in sessions.items()
        if sid == runtime_session and pid not in (own_pid, 1) and pid not in protected
    )


def _stat_fields(pid: int, proc: str) -> list[str] | None:
    try:
        text = Path(proc, str(pid), "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def _parent(pid: int, proc: str = "/proc") -> int | None:
    fields = _stat_fields(pid, proc)
    return int(fields[1]) if fields else None


def process_sessions(proc: str = "/proc") -> dict[int, int]:
    """pid -> session id of every visible process."""
    sessions: dict[int, int] = {}
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name), proc)
            if fields is not None:
                sessions[int(entry.name)] = int(fields[3])
    return sessions


def kill_session(runtime_session: int, proc: str = "/proc") -> list[int]:
    """SIGKILL the runtime's session (see the module docstring); returns the pids signalled."""
    own = os.getpid()
    targets = victims(process_sessions(proc), runtime_session, own, ancestors(own, lambda p: _parent(p, proc)))
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return targets


class ExternalRuntime:
    """A runtime process the agent did not start, found through its Runtime API connection.

    Same surface as :class:`~lambdalet_agent.process.RuntimeProcess`: ``pid``, ``exited``, ``running``,
    ``kill()``, ``wait()``, ``close()``."""

    def __init__(self, pid: int, session: int, on_exit: Callable[[int | None], None]) -> None:
        self.pid = pid
        self.session = session
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self._on_exit = on_exit
        self._pidfd = -1
        self._poller: asyncio.TimerHandle | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
            loop.add_reader(self._pidfd, self._gone)
        except (OSError, AttributeError, NotImplementedError):
            self._pidfd = -1
            self._poller = loop.call_later(POLL_INTERVAL_S, self._poll)

    @classmethod
    def adopt(cls, pid: int, on_exit: Callable[[int | None], None]) -> ExternalRuntime | None:
        try:
            session = os.getsid(pid)
        except OSError:
            return None
        return cls(pid, session, on_exit)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def _alive(self) -> bool:
        fields = _stat_fields(self.pid, "/proc")
        return fields is not None and fields[0] != "Z"

    def _poll(self) -> None:
        self._poller = None
        if self._alive():
            self._poller = asyncio.get_running_loop().call_later(POLL_INTERVAL_S, self._poll)
        else:
            self._gone()

    def _gone(self) -> None:
        self._stop_watching()
        if not self.exited.done():
            self.exited.set_result(None)  # not our child: its exit status is not ours to read
            self._on_exit(None)

    def _stop_watching(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = -1
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None

    def kill(self) -> None:
        killed = kill_session(self.session)
        log.info("reset: killed the runtime's session %d (pids %s)", self.session, killed)

    async def wait(self, limit_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), limit_s)

    def close(self) -> None:
        self._stop_watching()


class ObservingLimiter:
    """Memory for an external runtime: no limit of the agent's own (the runtime container's limit applies),
    Max Memory Used from the runtime's peak RSS."""

    mechanism = "the runtime container's own limit (external runtime)"

    def __init__(self) -> None:
        self._rss = _PeakRss()

    def attach(self, pid: int) -> None:
        self._rss.watch(pid)

    def reset_peak(self, pid: int) -> None:
        self._rss.reset(pid)

    def peak_bytes(self, pid: int) -> int:
        return self._rss.read(pid)

    def kill_all(self) -> None:
        """Nothing: the reset kills the runtime's session."""

    def close(self) -> None:
        self._rss.close()
