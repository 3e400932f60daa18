"""``python -m lambdalet_gateway``: the gateway process (the container entrypoint).

Flags override the environment (``Settings.from_env``): ``--host``, ``--port``, ``--backend``,
``--concurrency-limit`` and manifest paths.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .app import event_loop_factory
from .cli import serve
from .settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambdalet_gateway", description="Run the lambdalet gateway.")
    parser.add_argument("manifests", nargs="*", metavar="PATH", help="Function manifests (env LAMBDALET_MANIFESTS)")
    parser.add_argument("--host", help="bind address (env LAMBDALET_BIND_ADDRESS, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env LAMBDALET_GATEWAY_PORT, default 8080)")
    parser.add_argument("--backend", help="local or kubernetes (env LAMBDALET_BACKEND)")
    parser.add_argument("--concurrency-limit", type=int, help="env LAMBDALET_CONCURRENCY_LIMIT, default 1000")
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env(os.environ).with_overrides(
            host=ns.host,
            port=ns.port,
            backend=ns.backend,
            concurrency_limit=ns.concurrency_limit,
            manifests=tuple(Path(p) for p in ns.manifests) or None,
        )
    except SettingsError as exc:
        print(f"lambdalet gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            runner.run(serve(settings, announce=False))
    except (OSError, SettingsError) as exc:
        print(f"lambdalet gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
