"""Memory limit and peak measurement for the runtime's processes.

Two mechanisms, chosen once at startup by :func:`create_limiter`:

- :class:`CgroupV1Limiter` (preferred): a child memory cgroup under the agent's own one
  (``/sys/fs/cgroup/memory/<agent's cgroup>/lambdalet-<pid>``) with ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes`` when swap accounting exists) set to ``memoryMB``. Every runtime process
  is moved into it right after it is spawned; the kernel's OOM killer SIGKILLs the tree when it goes over,
  which the agent reports as ``Runtime.ExitError`` (``signal: killed``). Max Memory Used is the larger of
  ``memory.max_usage_in_bytes`` (the whole tree) and the main process's peak RSS (``VmHWM``, which also
  counts shared pages the cgroup is not charged for), both reset at the start of every invocation:
  a few reads and writes on files kept open (~15 us per invocation), no polling.
- :class:`RlimitLimiter` (fallback when the cgroup hierarchy is not writable, e.g. an unprivileged
  pod): ``RLIMIT_DATA`` = ``memoryMB`` on the runtime's main process via ``prlimit`` (it caps heap and
  private anonymous mappings, so allocations fail with MemoryError/ENOMEM instead of a kill; thread stacks
  count against it). Max Memory Used is ``VmHWM`` (the kernel's peak RSS) of the runtime's main process,
  reset per invocation through ``/proc/<pid>/clear_refs``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Protocol

MIB = 1024 * 1024
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


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


def _own_cgroup_v1_path() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return path
    return "/"


class CgroupV1Limiter:
    mechanism = "cgroup-v1"

    def __init__(self, memory_mb: int, root: Path = CGROUP_V1_MEMORY) -> None:
        base = root / _own_cgroup_v1_path().lstrip("/")
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
        with contextlib.suppress(OSError):
            for text in self._procs.read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(text), signal.SIGKILL)

    def close(self) -> None:
        """Remove the cgroup (it empties once its killed processes have been reaped)."""
        self.kill_all()
        self._rss.close()
        with contextlib.suppress(OSError):
            os.close(self._max_usage)
        for _ in range(100):
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
            else:
                return


def _remove_stale(base: Path) -> None:
    """Remove empty cgroups left by agents that were SIGKILLed (named after their dead pid)."""
    for path in base.glob("lambdalet-*"):
        pid = path.name.removeprefix("lambdalet-")
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


def create_limiter(memory_mb: int) -> MemoryLimiter:
    """A cgroup when this process may create one, else the rlimit fallback."""
    if CGROUP_V1_MEMORY.is_dir() and os.access(CGROUP_V1_MEMORY, os.W_OK):
        try:
            return CgroupV1Limiter(memory_mb)
        except OSError:
            pass
    return RlimitLimiter(memory_mb)
