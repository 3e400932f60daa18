"""Deadline arithmetic, Lambda's log lines and error messages, the per-invocation log tail: pure, no I/O.

Formats follow Lambda's classic text log format: ``START RequestId: <id> Version: <v>``,
``END RequestId: <id>``, and the tab-separated ``REPORT`` line that ends with a tab.
"""

from __future__ import annotations

import math
import signal
import time

MIB = 1024 * 1024
TAIL_BYTES = 4096

# exec.ExitError-style names for the signals a runtime typically dies of (what Lambda prints).
_SIGNAL_NAMES = {
    signal.SIGKILL: "killed",
    signal.SIGTERM: "terminated",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGINT: "interrupt",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "floating point exception",
    signal.SIGILL: "illegal instruction",
    signal.SIGHUP: "hangup",
    signal.SIGPIPE: "broken pipe",
    signal.SIGQUIT: "quit",
}


def deadline_ms(start_epoch_ms: int, timeout_s: float) -> int:
    """The absolute deadline (Unix epoch ms) of an invocation that starts at ``start_epoch_ms``."""
    return start_epoch_ms + round(timeout_s * 1000)


def billed_ms(duration_ms: float) -> int:
    """Billed Duration: the duration rounded up to the next whole millisecond (at least 1 ms)."""
    return max(1, math.ceil(duration_ms - 1e-9))


def memory_mb(peak_bytes: int) -> int:
    """Max Memory Used in whole MB, rounded up (a runtime that ran at all used at least 1 MB)."""
    return max(1, math.ceil(peak_bytes / MIB))


def timeout_text(timeout_s: float) -> str:
    return f"Task timed out after {timeout_s:.2f} seconds"


def timeout_error(request_id: str, timeout_s: float) -> str:
    """The ``errorMessage`` of a timed-out invocation (``errorType`` ``Sandbox.Timedout``)."""
    return f"RequestId: {request_id} Error: {timeout_text(timeout_s)}"


def timeout_log_line(request_id: str, timeout_s: float, now_epoch_s: float) -> str:
    """``2020-11-10T05:46:57.874Z <id> Task timed out after 3.00 seconds``."""
    return f"{iso_timestamp(now_epoch_s)} {request_id} {timeout_text(timeout_s)}"


def iso_timestamp(epoch_s: float) -> str:
    millis = int(epoch_s * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{millis:03d}Z"


def termination_text(returncode: int) -> str:
    """Go's ``exec.ExitError`` wording, as Lambda reports it: ``exit status 1`` or ``signal: killed``."""
    if returncode >= 0:
        return f"exit status {returncode}"
    signo = -returncode
    try:
        name = _SIGNAL_NAMES.get(signal.Signals(signo), f"signal {signo}")
    except ValueError:
        name = f"signal {signo}"
    return f"signal: {name}"


def exit_error(request_id: str, returncode: int | None) -> str:
    """The ``errorMessage`` of ``Runtime.ExitError``."""
    if returncode is None:
        return f"RequestId: {request_id} Error: Runtime exited without providing a reason"
    return f"RequestId: {request_id} Error: Runtime exited with error: {termination_text(returncode)}"


def start_line(request_id: str, version: str) -> str:
    return f"START RequestId: {request_id} Version: {version}"


def end_line(request_id: str) -> str:
    return f"END RequestId: {request_id}"


def report_line(
    request_id: str,
    *,
    duration_ms: float,
    memory_size_mb: int,
    max_memory_used_mb: int,
    init_duration_ms: float | None = None,
) -> str:
    """The REPORT line: tab-separated fields, ``Init Duration`` last and only on a cold start."""
    line = (
        f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
        f"Billed Duration: {billed_ms(duration_ms)} ms\tMemory Size: {memory_size_mb} MB\t"
        f"Max Memory Used: {max_memory_used_mb} MB\t"
    )
    if init_duration_ms is not None:
        line += f"Init Duration: {init_duration_ms:.2f} ms\t"
    return line


class LogTail:
    """The last :data:`TAIL_BYTES` bytes of one invocation's log (for ``X-Amz-Log-Type: Tail``)."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, line: bytes) -> None:
        self._chunks.append(line)
        self._size += len(line)
        if self._size > 2 * TAIL_BYTES:
            self._chunks = [self.value()]
            self._size = len(self._chunks[0])

    def value(self) -> bytes:
        data = b"".join(self._chunks)
        return data[-TAIL_BYTES:]
