"""What the run ran on and what else was running (for the results' ``meta``)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any


def describe() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem_total_gb():.0f} GB RAM, Linux {platform.release()}"


def mem_total_gb() -> float:
    return _meminfo("MemTotal") / 1024 / 1024


def mem_available_mb() -> float:
    return _meminfo("MemAvailable") / 1024


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process: pid -> (command, seconds)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def others(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], top: int = 8) -> list[str]:
    """The processes (alive at both snapshots) that used the most CPU in between, by command name."""
    by_name: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        if pid in before and before[pid][0] == name:
            by_name[name] = by_name.get(name, 0.0) + seconds - before[pid][1]
    ranked = sorted(by_name.items(), key=lambda item: item[1], reverse=True)[:top]
    return [f"{name}: {seconds:.0f} CPU-s" for name, seconds in ranked if seconds >= 1]


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    wrk = shutil.which("wrk")
    if wrk:
        proc = subprocess.run([wrk, "-v"], check=False, capture_output=True, text=True)
        out["wrk"] = (proc.stdout or proc.stderr).splitlines()[0] if (proc.stdout or proc.stderr) else "?"
    try:
        import awslambdaric  # noqa: PLC0415  (only for its version)

        out["awslambdaric"] = getattr(awslambdaric, "__version__", "?")
    except ImportError:
        pass
    return out


def git_commit(repo: Path) -> str:
    proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], check=False, capture_output=True)
    return proc.stdout.decode().strip()
