"""Memory limit and peak measurement for the runtime's processes.

Three mechanisms, tried in this order by :func:`create_limiter` (the one chosen is logged at startup, with
the reason each better one was not usable):

- :class:`CgroupV2Limiter`: a child cgroup ``lambdalet-<pid>`` under the agent's own cgroup v2 (the
  ``0::/path`` line of ``/proc/self/cgroup``, under the ``cgroup2`` mount that ``/proc/self/mountinfo``
  names) with ``memory.max`` = ``memoryMB``, ``memory.swap.max`` = 0 and ``memory.oom.group`` = 1 (an OOM
  kills the runtime's whole tree at once). It needs the ``memory`` controller in the agent's
  ``cgroup.controllers`` (delegated by the parent) and a writable cgroup. cgroup v2 allows no processes in
  a non-root cgroup that hands a controller to its children, so when the agent's cgroup holds processes
  the agent moves itself into a leaf sibling ``lambdalet-<pid>-agent`` first, then enables ``+memory``
  in ``cgroup.subtree_control``; if the cgroup also holds processes the agent did not start (a shell
  wrapper, other agents, the gateway), moving them would change limits they live under, so the agent
  falls back instead. ``close`` undoes all of it (the parent cgroup can then be removed by its owner).
  Max Memory Used is the larger of ``memory.peak`` (the whole tree; reset per invocation by a write to
  the kept-open file, which the kernel supports from 6.12 on: a per-file-descriptor watermark) and the
  main process's ``VmHWM``; on older kernels (no writable ``memory.peak``) only ``VmHWM`` is per
  invocation, and an ``oom_kill`` counted in ``memory.events`` reports the limit. Pages the runtime
  touched between its spawn and :meth:`attach` stay charged to the agent's cgroup (v2 does not move
  charges), so the limit is loose by that much (the runtime's interpreter start, at most: see below).
- :class:`CgroupV1Limiter`: a child memory cgroup under the agent's own one
  (``/sys/fs/cgroup/memory/<agent's cgroup>/lambdalet-<pid>``) with ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes`` when swap accounting exists) set to ``memoryMB``. Every runtime process
  is moved into it right after it is spawned; the kernel's OOM killer SIGKILLs the tree when it goes over,
  which the agent reports as ``Runtime.ExitError`` (``signal: killed``). Max Memory Used is the larger of
  ``memory.max_usage_in_bytes`` (the whole tree) and the main process's peak RSS (``VmHWM``, which also
  counts shared pages the cgroup is not charged for), both reset at the start of every invocation:
  a few reads and writes on files kept open (~15 us per invocation), no polling.
- :class:`RlimitLimiter` (fallback when no cgroup hierarchy is writable, e.g. an unprivileged
  pod): ``RLIMIT_DATA`` = ``memoryMB`` on the runtime's main process via ``prlimit`` (it caps heap and
  private anonymous mappings, so allocations fail with MemoryError/ENOMEM instead of a kill; thread stacks
  count against it). Max Memory Used is ``VmHWM`` (the kernel's peak RSS) of the runtime's main process,
  reset per invocation through ``/proc/<pid>/clear_refs``.

The runtime is attached on a thread of the environment while its interpreter starts (a cgroup v1 write to
``cgroup.procs`` takes ~15 ms); our Python bootstrap imports the function's code only after the attach
(``lambdalet_agent.environment.MEMORY_GATE_VAR``), and no invocation is handed out before it.

The cgroup file system is reached only through the paths given to the constructors (``create_limiter``
takes ``/proc/self`` and the v1 root as parameters), so the decisions can be tested on a fake tree.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Protocol

MIB = 1024 * 1024
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
PROC_SELF = Path("/proc/self")

log = logging.getLogger("lambdalet.agent")


class MemoryLimiter(Protocol):
    mechanism: str

    def attach(self, pid: int) -> None:
        """Put a freshly spawned runtime process under the limit."""

    def reset_peak(self, pid: int) -> None:
        """Start a new peak measurement (at the start of an invocation)."""

    def peak_bytes(self, pid: int) -> int:
        """Peak memory since the last reset."""

    def kill_all(self) -> None:
        """SIGKILL every process under the limit (processes that left the runtime's process group)."""

    def close(self) -> None: ...


def _own_cgroup_v1_path(proc_cgroup: Path) -> str:
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return "/"


class CgroupUnavailable(Exception):
    """A cgroup mechanism cannot be used here; the message says why (logged when falling back)."""


def _unescape_mount_path(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (``\\040``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def cgroup_v2_dir(proc_self: Path = PROC_SELF) -> Path:
    """The directory of this process's own cgroup v2, from ``proc_self``'s ``cgroup`` and ``mountinfo``."""
    own: str | None = None
    with contextlib.suppress(OSError):
        for line in (proc_self / "cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:]
    if own is None:
        raise CgroupUnavailable("this process is in no cgroup v2 hierarchy (no 0:: line in /proc/self/cgroup)")
    try:
        mountinfo = (proc_self / "mountinfo").read_text()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read mountinfo: {exc}") from exc
    for line in mountinfo.splitlines():
        fields, sep, tail = line.partition(" - ")
        if not sep or not tail.startswith("cgroup2 "):
            continue
        parts = fields.split()
        if len(parts) < 5:
            continue
        root, mount_point = _unescape_mount_path(parts[3]), _unescape_mount_path(parts[4])
        # The mount shows the hierarchy from ``root`` down; the process's path is below it (or it is not ours).
        if own == root or own.startswith(root.rstrip("/") + "/"):
            return Path(mount_point) / own[len(root) :].lstrip("/")
    raise CgroupUnavailable(f"no cgroup2 mount shows this process's cgroup {own}")


def _words(path: Path) -> list[str]:
    return path.read_text().split()


class CgroupV2Limiter:
    mechanism = "cgroup-v2"

    def __init__(self, memory_mb: int, own: Path, *, pid: int | None = None) -> None:
        """``own``: the agent's cgroup v2 directory (:func:`cgroup_v2_dir`). Raises CgroupUnavailable."""
        self.pid = os.getpid() if pid is None else pid
        self.own = own
        self.limit = memory_mb * MIB
        self.path = own / f"lambdalet-{self.pid}"
        self.agent_leaf: Path | None = None  # where the agent moved itself, to be moved back on close
        self._enabled_memory = False
        self._peak = self._events = -1
        try:
            controllers = _words(own / "cgroup.controllers")
        except OSError as exc:
            raise CgroupUnavailable(f"{own} is not a cgroup v2 directory ({exc})") from exc
        if "memory" not in controllers:
            raise CgroupUnavailable(
                f"the memory controller is not delegated to {own} (cgroup.controllers: {' '.join(controllers)})"
            )
        if not os.access(own, os.W_OK):
            raise CgroupUnavailable(f"{own} is not writable by this process")
        try:
            self._make_child()
        except CgroupUnavailable:
            self._undo()
            raise
        except OSError as exc:
            self._undo()
            raise CgroupUnavailable(f"cannot set up a memory cgroup under {own}: {exc}") from exc
        threading.Thread(target=_remove_stale, args=(own,), name="cgroup-cleanup", daemon=True).start()
        self._procs = self.path / "cgroup.procs"
        self._kill = self.path / "cgroup.kill"  # kernel >= 5.14
        self._rss = _PeakRss()
        self.peak_resettable = False
        with contextlib.suppress(OSError):
            self._events = os.open(self.path / "memory.events", os.O_RDONLY | os.O_CLOEXEC)
        self._oom_kills = self._read_oom_kills()
        peak = self.path / "memory.peak"  # kernel >= 5.19
        try:
            # Writable (a per-descriptor reset) from kernel 6.12 on; before, opening it for writing fails.
            self._peak = os.open(peak, os.O_RDWR | os.O_CLOEXEC)
            os.pwrite(self._peak, b"0", 0)
            self.peak_resettable = True
        except OSError:
            if self._peak >= 0:
                os.close(self._peak)
                self._peak = -1

    def _make_child(self) -> None:
        own = self.own
        if "memory" not in _words(own / "cgroup.subtree_control"):
            others = [p for p in _words(own / "cgroup.procs") if p != str(self.pid)]
            is_root = not (own / "cgroup.type").exists()  # the root cgroup may hold processes and children
            if others and not is_root:
                raise CgroupUnavailable(
                    f"{own} also holds {len(others)} other process(es); enabling the memory controller for its "
                    "children would need them moved out of it (cgroup v2: no processes in a non-root cgroup "
                    "that delegates a controller)"
                )
            if not is_root and str(self.pid) in _words(own / "cgroup.procs"):
                leaf = own / f"lambdalet-{self.pid}-agent"
                leaf.mkdir(exist_ok=True)
                self.agent_leaf = leaf
                (leaf / "cgroup.procs").write_text(str(self.pid))
            (own / "cgroup.subtree_control").write_text("+memory")
            self._enabled_memory = True
        self.path.mkdir(exist_ok=True)
        if not (self.path / "memory.max").exists():
            raise CgroupUnavailable(f"the memory controller is not enabled for the children of {own}")
        (self.path / "memory.max").write_text(str(self.limit))
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            if (self.path / name).exists():
                (self.path / name).write_text(value)

    def _undo(self) -> None:
        """Remove the child cgroup and put the agent back where it was (best effort)."""
        for _ in range(100):
            try:
                self.path.rmdir()
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    break  # not removable as a cgroup at all: leave it
                time.sleep(0.01)  # its killed processes are not all reaped yet
            else:
                break
        with contextlib.suppress(OSError):
            if self._enabled_memory:
                (self.own / "cgroup.subtree_control").write_text("-memory")
                self._enabled_memory = False
            if self.agent_leaf is not None:
                (self.own / "cgroup.procs").write_text(str(self.pid))
                self.agent_leaf.rmdir()
                self.agent_leaf = None

    def _read_oom_kills(self) -> int:
        if self._events < 0:
            return 0
        try:
            data = os.pread(self._events, 4096, 0)
            start = data.index(b"oom_kill ") + 9
            return int(data[start : data.index(b"\n", start)])
        except (OSError, ValueError):
            return 0

    def attach(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            self._procs.write_text(str(pid))
        self._rss.watch(pid)

    def reset_peak(self, pid: int) -> None:
        if self.peak_resettable:
            with contextlib.suppress(OSError):
                os.pwrite(self._peak, b"0", 0)
        self._oom_kills = self._read_oom_kills()
        self._rss.reset(pid)

    def peak_bytes(self, pid: int) -> int:
        if self._read_oom_kills() > self._oom_kills:
            return self.limit  # the OOM killer ended it for going over: it used all of it
        charged = 0
        if self.peak_resettable:
            with contextlib.suppress(OSError, ValueError):
                charged = int(os.pread(self._peak, 32, 0))
        return max(charged, self._rss.read(pid))

    def kill_all(self) -> None:
        if self._kill.exists():
            with contextlib.suppress(OSError):
                self._kill.write_text("1")
                return
        _kill_listed(self._procs)

    def close(self) -> None:
        """Remove the cgroup (it empties once its killed processes have been reaped) and undo the setup."""
        self.kill_all()
        self._rss.close()
        for fd in (self._peak, self._events):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._peak = self._events = -1
        self._undo()


class CgroupV1Limiter:
    mechanism = "cgroup-v1"

    def __init__(self, memory_mb: int, root: Path = CGROUP_V1_MEMORY, proc_self: Path = PROC_SELF) -> None:
        base = root / _own_cgroup_v1_path(proc_self / "cgroup").lstrip("/")
        if not (base / "cgroup.procs").exists():
            base = root
        # Best-effort cleanup, off the cold-start path: it checks every sibling cgroup (one per live agent).
        threading.Thread(target=_remove_stale, args=(base,), name="cgroup-cleanup", daemon=True).start()
        self.path = base / f"lambdalet-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        limit = str(memory_mb * MIB)
        (self.path / "memory.limit_in_bytes").write_text(limit)
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            with contextlib.suppress(OSError):
                memsw.write_text(limit)
        with contextlib.suppress(OSError):
            # Charges of a process move with it, so memory touched before attach() is counted too.
            (self.path / "memory.move_charge_at_immigrate").write_text("3")
        self._procs = self.path / "cgroup.procs"
        # Kept open: a reset and a read per invocation cost ~5 us this way, ~110 us opening the file.
        self._max_usage = os.open(self.path / "memory.max_usage_in_bytes", os.O_RDWR | os.O_CLOEXEC)
        self._rss = _PeakRss()

    def attach(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            self._procs.write_text(str(pid))
        self._rss.watch(pid)

    def reset_peak(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(self._max_usage, b"0", 0)
        self._rss.reset(pid)

    def peak_bytes(self, pid: int) -> int:
        try:
            charged = int(os.pread(self._max_usage, 32, 0))
        except (OSError, ValueError):
            charged = 0
        # The cgroup is charged only for pages its processes brought in (shared library pages another
        # process loaded first are not), so the main process's own peak RSS is the floor.
        return max(charged, self._rss.read(pid))

    def kill_all(self) -> None:
        _kill_listed(self._procs)

    def close(self) -> None:
        """Remove the cgroup (it empties once its killed processes have been reaped)."""
        self.kill_all()
        self._rss.close()
        with contextlib.suppress(OSError):
            os.close(self._max_usage)
        for _ in range(100):
            try:
                self.path.rmdir()
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return
                time.sleep(0.01)  # its killed processes are not all reaped yet
            else:
                return


def _kill_listed(procs: Path) -> None:
    """SIGKILL every process a ``cgroup.procs`` file lists."""
    with contextlib.suppress(OSError):
        for text in procs.read_text().split():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(text), signal.SIGKILL)


def _remove_stale(base: Path) -> None:
    """Remove empty cgroups left by agents that were SIGKILLed (``lambdalet-<pid>[-agent]``, their pid dead)."""
    for path in base.glob("lambdalet-*"):
        pid = path.name.removeprefix("lambdalet-").removesuffix("-agent")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                path.rmdir()


class _PeakRss:
    """The kernel's peak RSS (``VmHWM``) of one process, resettable; its /proc files are kept open."""

    def __init__(self) -> None:
        self.pid = 0
        self._status = -1
        self._clear_refs = -1

    def watch(self, pid: int) -> None:
        self.close()
        self.pid = pid
        with contextlib.suppress(OSError):
            self._status = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            self._clear_refs = os.open(f"/proc/{pid}/clear_refs", os.O_WRONLY | os.O_CLOEXEC)

    def reset(self, pid: int) -> None:
        if pid == self.pid and self._clear_refs >= 0:
            with contextlib.suppress(OSError):
                os.pwrite(self._clear_refs, b"5", 0)

    def read(self, pid: int) -> int:
        if pid != self.pid or self._status < 0:
            return 0
        try:
            data = os.pread(self._status, 4096, 0)
            start = data.index(b"VmHWM:") + 6
            return int(data[start : data.index(b"kB", start)]) * 1024
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        for fd in (self._status, self._clear_refs):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._status = self._clear_refs = -1


class RlimitLimiter:
    mechanism = "rlimit"

    def __init__(self, memory_mb: int) -> None:
        self.limit = memory_mb * MIB
        self._rss = _PeakRss()

    def attach(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            resource.prlimit(pid, resource.RLIMIT_DATA, (self.limit, self.limit))
        self._rss.watch(pid)

    def reset_peak(self, pid: int) -> None:
        self._rss.reset(pid)

    def peak_bytes(self, pid: int) -> int:
        return self._rss.read(pid)

    def kill_all(self) -> None:
        """Nothing beyond the process group, which the supervisor kills."""

    def close(self) -> None:
        self._rss.close()


def create_limiter(memory_mb: int, *, proc_self: Path = PROC_SELF, v1_root: Path = CGROUP_V1_MEMORY) -> MemoryLimiter:
    """cgroup v2, else cgroup v1, else the rlimit fallback; why a better one was not used is logged."""
    try:
        return CgroupV2Limiter(memory_mb, cgroup_v2_dir(proc_self))
    except CgroupUnavailable as exc:
        log.info("memory limit: no cgroup v2: %s", exc)
    if v1_root.is_dir() and os.access(v1_root, os.W_OK):
        try:
            return CgroupV1Limiter(memory_mb, v1_root, proc_self)
        except OSError as exc:
            log.info("memory limit: no cgroup v1: %s", exc)
    else:
        log.info("memory limit: no cgroup v1: %s is not a writable directory", v1_root)
    return RlimitLimiter(memory_mb)
