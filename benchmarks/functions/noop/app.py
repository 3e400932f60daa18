"""The benchmark function: a no-op Python handler.

When ``BENCH_MARKS`` names a file, the module appends its import start and end times (``time.time_ns()``,
comparable across processes) to it, so a cold start can be split into spawn, runtime init, handler import
and first response. When ``BENCH_RUNNING`` names a file, each invocation appends its own start and end
times, so the harness can count, from the function's side, how many invocations ran at once.
"""

import os
import time

_IMPORT_START = time.time_ns()
_MARKS = os.environ.get("BENCH_MARKS")
_RUNNING = os.environ.get("BENCH_RUNNING")
_SLEEP = float(os.environ.get("BENCH_SLEEP_S", "0"))


def handler(event: object, context: object) -> None:
    if _RUNNING is None:
        return
    start = time.time_ns()
    if _SLEEP:
        time.sleep(_SLEEP)
    end = time.time_ns()
    fd = os.open(_RUNNING, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%d %d\n" % (start, end))
    finally:
        os.close(fd)


if _MARKS is not None:
    _fd = os.open(_MARKS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_fd, b"import %d %d\n" % (_IMPORT_START, time.time_ns()))
    os.close(_fd)
