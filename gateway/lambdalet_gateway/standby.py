"""Pre-started agent processes for the local backend: cold starts without the interpreter's own start.

An agent process spends most of its start (about 0.3 s on a 2-core machine) starting Python and importing
aiohttp. A standby is an agent process started ahead of need, with those imports done, that waits on its
stdin for the one line telling it which environment to be: its command-line flags, its working directory
and, when CPU limits are on, the cgroup to join first. From then on it is exactly the agent that
``python -m lambdalet_agent FLAGS`` would have been (same code path, same environment variables: every
agent of a backend gets the same base environment, the function's own variables travel as ``--env``
flags). The backend takes one standby per environment it starts and starts a replacement in the
background, a little later, so the replacement's imports do not compete with the cold start it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("lambdalet.gateway.standby")

#: What a standby runs: import the agent, wait for its orders, become that agent.
STANDBY_PROGRAM = """\
import json, os, sys
from lambdalet_agent import cli
line = sys.stdin.readline()
if not line:
    sys.exit(0)
order = json.loads(line)
if order.get("cgroup"):
    with open(order["cgroup"], "w") as procs:
        procs.write(str(os.getpid()))
os.chdir(order["cwd"])
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
sys.exit(cli.main(["agent", *order["argv"]]))
"""

#: Start a replacement this long after a standby is taken (the cold start it serves goes first).
REFILL_DELAY_S = 0.15


class StandbyPool:
    """Keeps ``size`` standby agent processes ready; ``take`` hands one over with its orders."""

    def __init__(self, python: str, env: Mapping[str, str], size: int) -> None:
        self._python = python
        self._env = dict(env)
        self._size = size
        self._ready: list[asyncio.subprocess.Process] = []
        self._starting = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def fill_soon(self, delay: float = 0.0) -> None:
        """Start standbys up to the pool's size (in the background)."""
        if self._closed or len(self._ready) + self._starting >= self._size:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop yet: the first take() fills the pool
            return
        missing = self._size - len(self._ready) - self._starting
        self._starting += missing
        for _ in range(missing):
            task = loop.create_task(self._start_one(delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_one(self, delay: float) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)
            if self._closed:
                return
            proc = await asyncio.create_subprocess_exec(
                self._python,
                "-c",
                STANDBY_PROGRAM,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("could not start a standby agent: %s", exc)
            return
        finally:
            self._starting -= 1
        if self._closed:
            await _discard(proc)
            return
        self._ready.append(proc)

    async def take(
        self, argv: Sequence[str], cwd: str, cgroup: Path | None = None
    ) -> asyncio.subprocess.Process | None:
        """A standby turned into the agent ``python -m lambdalet_agent *argv`` in ``cwd``; None if none is ready."""
        while self._ready:
            proc = self._ready.pop()
            if proc.returncode is not None or proc.stdin is None:
                continue
            order = {"argv": list(argv), "cwd": cwd, "cgroup": str(cgroup) if cgroup else None}
            try:
                proc.stdin.write(json.dumps(order).encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()
            except (ConnectionError, RuntimeError):
                await _discard(proc)
                continue
            self.fill_soon(REFILL_DELAY_S)
            return proc
        self.fill_soon(REFILL_DELAY_S)
        return None

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        ready, self._ready = self._ready, []
        await asyncio.gather(*(_discard(proc) for proc in ready), return_exceptions=True)


async def _discard(proc: asyncio.subprocess.Process) -> None:
    """End an unused standby (closing its stdin makes it exit; kill it if it does not)."""
    if proc.stdin is not None:
        proc.stdin.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 2.0)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
