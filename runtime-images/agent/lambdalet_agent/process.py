"""Process supervision: start the bootstrap in its own process group, pump its output line by line,
report its exit, and kill the whole group on a reset."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence

LineSink = Callable[[bytes], None]
MAX_LINE = 256 * 1024  # a line longer than this is emitted in pieces


class _Pump(asyncio.SubprocessProtocol):
    """Splits the runtime's stdout and stderr into lines as they arrive (no extra task per stream)."""

    def __init__(self, sink: LineSink, on_exit: Callable[[int | None], None]) -> None:
        self._sink = sink
        self._on_exit = on_exit
        self._partial: dict[int, bytes] = {1: b"", 2: b""}
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not a subclass)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buffered = self._partial[fd] + data
        start = 0
        while True:
            end = buffered.find(b"\n", start)
            if end < 0:
                break
            self._sink(buffered[start : end + 1])
            start = end + 1
        rest = buffered[start:]
        while len(rest) > MAX_LINE:
            self._sink(rest[:MAX_LINE] + b"\n")
            rest = rest[MAX_LINE:]
        self._partial[fd] = rest

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.flush(fd)

    def flush(self, fd: int) -> None:
        rest = self._partial.get(fd, b"")
        if rest:
            self._partial[fd] = b""
            self._sink(rest + b"\n")

    def process_exited(self) -> None:
        self.flush(1)
        self.flush(2)
        self._on_exit(self.transport.get_returncode() if self.transport is not None else None)


class RuntimeProcess:
    """One bootstrap process (and its process group)."""

    def __init__(self, transport: asyncio.SubprocessTransport, exited: asyncio.Future[int | None]) -> None:
        self._transport = transport
        self.pid: int = transport.get_pid()
        self.exited = exited

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        sink: LineSink,
        on_exit: Callable[[int | None], None],
        pass_fds: Sequence[int] = (),
    ) -> RuntimeProcess:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int | None] = loop.create_future()

        def exit_handler(code: int | None) -> None:
            if not exited.done():
                exited.set_result(code)
            on_exit(code)

        transport, _ = await loop.subprocess_exec(
            lambda: _Pump(sink, exit_handler),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
        return cls(transport, exited)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def kill(self) -> None:
        """SIGKILL the whole process group (the runtime and anything it started).

        The runtime leads its own session, so its pid is the group id. (Not ``transport.kill()``: Popen
        polls before signalling and would reap the child behind the child watcher's back.)"""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def wait(self, limit_s: float) -> None:
        """Wait (at most ``limit_s``) for the process to exit."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), limit_s)

    def close(self) -> None:
        self._transport.close()
