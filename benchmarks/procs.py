"""Process plumbing for the scenarios: spawning by real interpreter path, waiting for ports, memory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

# The venv's interpreter path (a symlink to the real binary, never a version-manager shim script).
PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never the same one twice in this process."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_port_file(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> int:
    """Poll (every 0.5 ms) until ``path`` holds a port number; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text().strip())
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no port in {path} after {timeout} s")
        time.sleep(0.0005)


def wait_connectable(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """Poll (every 0.5 ms) until a TCP connection to ``host:port`` succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not accepting after {timeout} s") from None
            time.sleep(0.0005)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so stopping it takes its children along)."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log is not None and not isinstance(out, int):
            out.close()


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace)


def kill_now(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group (cold-start trials: the environment is thrown away)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def kill_pids(pids: list[int]) -> None:
    """SIGKILL these processes and the process groups they lead (leftovers of a stopped target)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (every thread's: a Go program forks from any thread)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree(pid: int) -> Iterator[int]:
    """``pid`` and all its descendants."""
    yield pid
    for child in children(pid):
        yield from tree(child)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * PAGE


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages divided among sharers) of one process (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS summed over a process tree, with the number of processes."""
    pids = list(tree(pid))
    return {
        "processes": len(pids),
        "rss_bytes": sum(rss_bytes(p) for p in pids),
        "pss_bytes": sum(pss_bytes(p) for p in pids),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    # fields after the command: state is [0]; utime is field 14 overall -> index 11 here, stime index 12
    return (int(fields[11]) + int(fields[12])) / ticks
