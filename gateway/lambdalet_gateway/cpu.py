"""CPU in proportion to memory for local environments (opt-in): Lambda's 1,769 MB = one vCPU.

When the gateway may create cgroups (cgroup v1 ``cpu`` hierarchy, or a cgroup v2 subtree with the
``cpu`` controller), each environment gets a cgroup with a CFS quota of ``memoryMB / 1769`` of a CPU per
period; the agent and its runtime run inside it. Otherwise CPU is not capped and ``mechanism`` says so.
All file operations are blocking and tiny: call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

MB_PER_VCPU = 1769
PERIOD_US = 100_000
#: Smallest quota the kernel accepts is 1 ms per period.
MIN_QUOTA_US = 1000

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")


def quota_us(memory_mb: int, period_us: int = PERIOD_US) -> int:
    """CFS quota per period for ``memory_mb`` (128 MB → 7.2 % of a CPU)."""
    return max(MIN_QUOTA_US, period_us * memory_mb // MB_PER_VCPU)


def _own_path(version: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if version == 2 and controllers == "":
                return path
            if version == 1 and "cpu" in controllers.split(","):
                return path
    return "/"


class CpuCgroups:
    """Creates and removes one CPU cgroup per environment under a parent owned by this gateway."""

    def __init__(self, parent: Path | None, version: int) -> None:
        self.parent = parent
        self.version = version

    @property
    def mechanism(self) -> str:
        return f"cgroup-v{self.version}" if self.parent is not None else "none"

    @classmethod
    def detect(cls) -> CpuCgroups:
        name = f"lambdalet-gateway-{os.getpid()}"
        if (_V2 / "cgroup.controllers").exists():
            base = _V2 / _own_path(2).lstrip("/")
            candidate = base / name
            with contextlib.suppress(OSError):
                candidate.mkdir(exist_ok=True)
                if _enable_v2_cpu(candidate):
                    return cls(candidate, 2)
                candidate.rmdir()
        if (_V1 / "cpu.cfs_quota_us").exists():
            base = _V1 / _own_path(1).lstrip("/")
            candidate = base / name
            with contextlib.suppress(OSError):
                candidate.mkdir(exist_ok=True)
                if (candidate / "cpu.cfs_quota_us").exists():
                    return cls(candidate, 1)
        return cls(None, 0)

    def create(self, env_id: str, memory_mb: int) -> Path | None:
        """A cgroup for one environment; returns its ``cgroup.procs`` file to join, or None."""
        if self.parent is None:
            return None
        path = self.parent / env_id
        try:
            path.mkdir(exist_ok=True)
            if self.version == 1:
                (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota_us(memory_mb)))
            else:
                (path / "cpu.max").write_text(f"{quota_us(memory_mb)} {PERIOD_US}")
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return path / "cgroup.procs"

    def remove(self, procs: Path) -> None:
        with contextlib.suppress(OSError):
            procs.parent.rmdir()

    def close(self) -> None:
        if self.parent is not None:
            with contextlib.suppress(OSError):
                self.parent.rmdir()


def _enable_v2_cpu(cgroup: Path) -> bool:
    """cgroup v2: a child cgroup needs ``cpu`` enabled in its parent's ``cgroup.subtree_control``."""
    try:
        (cgroup / "cgroup.subtree_control").write_text("+cpu")
    except OSError:
        return False
    return "cpu" in (cgroup / "cgroup.subtree_control").read_text().split()
