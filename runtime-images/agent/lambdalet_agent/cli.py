"""``lambdalet agent ...`` / ``python -m lambdalet_agent ...``: run one execution environment."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from lambdalet_agent.agent import Agent
from lambdalet_agent.settings import SettingsError, from_args, usage


async def _serve(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signo, stop.set)
    await agent.start()
    s = agent.settings
    logging.getLogger("lambdalet.agent").info(
        "agent listening on %s:%d (Runtime API %s, memory limit via %s, %d invocation(s) at once)",
        s.host,
        agent.port,
        agent.env.runtime_api_address,
        agent.limiter.mechanism,
        s.max_concurrency,
    )
    try:
        await stop.wait()
    finally:
        await agent.stop()


def main(argv: list[str]) -> int:
    """``argv[0]`` is ``"agent"``; the rest are the agent's flags and an optional ``-- COMMAND``."""
    args = argv[1:]
    if args[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    try:
        settings = from_args(args, os.environ)
    except SettingsError as exc:
        print(f"lambdalet agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(_serve(Agent(settings)))
    except OSError as exc:
        print(f"lambdalet agent: {exc}", file=sys.stderr)
        return 1
    return 0
