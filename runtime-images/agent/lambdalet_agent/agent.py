"""Wiring: settings -> memory limiter, environment, the two HTTP servers; start and stop them together."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from lambdalet_agent import runtimes
from lambdalet_agent.environment import Environment
from lambdalet_agent.external import ObservingLimiter
from lambdalet_agent.httpserver import Server
from lambdalet_agent.memory import MemoryLimiter, create_limiter
from lambdalet_agent.metrics import Metrics
from lambdalet_agent.server import invoke_handlers, runtime_handlers
from lambdalet_agent.settings import Settings

SHUTDOWN_TIMEOUT_S = 2.0
RUNTIME_API_SHUTDOWN_TIMEOUT_S = 0.5


def _write_atomically(path: str, text: str) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    Path(tmp).replace(target)


class Agent:
    """One execution environment with its servers. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        environ: Mapping[str, str] | None = None,
        out: BinaryIO | None = None,
        limiter: MemoryLimiter | None = None,
    ) -> None:
        self.settings = settings
        environ = dict(os.environ if environ is None else environ)
        base_env = {k: v for k, v in environ.items() if not k.startswith("LAMBDALET_")}

        def command() -> list[str]:
            if settings.command:
                return runtimes.command_line(settings.command, settings.code_dir)
            assert settings.runtime is not None
            return runtimes.resolve(settings.runtime, settings.code_dir, environ)

        if limiter is None:
            limiter = ObservingLimiter() if settings.external_runtime else create_limiter(settings.memory_mb)
        self.limiter = limiter
        self.env = Environment(
            settings,
            command,
            limiter=self.limiter,
            metrics=Metrics(),
            out=out if out is not None else sys.stdout.buffer,
            base_env=base_env,
        )
        self._runtime_server = Server(runtime_handlers(self.env))
        self._invoke_server = Server(invoke_handlers(self.env))
        self.port = 0
        self.runtime_api_port = 0

    async def start(self) -> None:
        s = self.settings
        await self._runtime_server.start(s.runtime_api_host, s.runtime_api_port, backlog=64)
        self.runtime_api_port = self._runtime_server.port
        self.env.runtime_api_address = f"{s.runtime_api_host}:{self.runtime_api_port}"
        await self._invoke_server.start(s.host, s.port, backlog=1024, reuse_address=True)
        self.port = self._invoke_server.port
        await self.env.start()
        if s.port_file:
            _write_atomically(s.port_file, f"{self.port}\n")

    async def stop(self) -> None:
        await self._invoke_server.close(SHUTDOWN_TIMEOUT_S)
        await self.env.close()
        await self._runtime_server.close(RUNTIME_API_SHUTDOWN_TIMEOUT_S)
