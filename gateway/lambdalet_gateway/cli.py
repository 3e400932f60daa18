"""``lambdalet up | invoke | ls | logs``: run the embedded platform, and talk to a running one.

``up`` serves the gateway with the local backend until interrupted; the other commands are HTTP clients
of a running gateway (``--endpoint``, default ``$LAMBDALET_ENDPOINT`` or ``http://127.0.0.1:8080``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from aiohttp import web

from .app import REGISTRY, create_app, event_loop_factory
from .settings import Settings, SettingsError

DEFAULT_ENDPOINT = "http://127.0.0.1:8080"


async def serve(settings: Settings, *, announce: bool = True) -> None:
    """Run the gateway until SIGINT/SIGTERM."""
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    try:
        await site.start()
        if announce:
            registry_functions = sorted(app[REGISTRY].catalog.functions)
            print(f"lambdalet: serving {len(registry_functions)} function(s) on http://{settings.host}:{settings.port}")
            for name in registry_functions:
                print(f"  {name}: POST http://{settings.host}:{settings.port}/2015-03-31/functions/{name}/invocations")
            sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signo, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _up(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lambdalet up", description="Run the embedded platform.")
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="manifest files or directories (default: examples/)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1; env LAMBDALET_BIND_ADDRESS)")
    parser.add_argument("--port", type=int, help="port (default 8080; env LAMBDALET_GATEWAY_PORT)")
    parser.add_argument("--concurrency-limit", type=int, help="platform-wide concurrent executions (default 1000)")
    parser.add_argument("--quiet", action="store_true", help="do not echo function logs to this terminal")
    parser.add_argument(
        "--cpu-limits", action="store_true", help="cap each environment at memoryMB/1769 of a CPU (cgroups)"
    )
    parser.add_argument(
        "--no-fast-start",
        action="store_true",
        help="spawn every agent instead of forking it from a zygote (env LAMBDALET_FAST_START=0)",
    )
    ns = parser.parse_args(args)
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"lambdalet up: {exc}", file=sys.stderr)
        return 2
    if ns.concurrency_limit is not None and ns.concurrency_limit < 1:
        print("lambdalet up: --concurrency-limit must be at least 1", file=sys.stderr)
        return 2
    dirs = tuple(Path(d) for d in ns.dirs) or settings.manifests or (Path("examples"),)
    missing = [str(d) for d in dirs if not d.exists()]
    if missing:
        print(f"lambdalet up: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    settings = settings.with_overrides(
        host=ns.host,
        port=ns.port,
        concurrency_limit=ns.concurrency_limit,
        manifests=dirs,
        echo_logs=not ns.quiet,
        cpu_limits=True if ns.cpu_limits else None,
        fast_start=False if ns.no_fast_start else None,
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            runner.run(serve(settings))
    except (OSError, SettingsError) as exc:
        print(f"lambdalet up: {exc}", file=sys.stderr)
        return 1
    return 0


def _endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("LAMBDALET_ENDPOINT", DEFAULT_ENDPOINT),
        help=f"gateway URL (default $LAMBDALET_ENDPOINT or {DEFAULT_ENDPOINT})",
    )


def _request(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=960) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def _invoke(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lambdalet invoke", description="Invoke a function synchronously.")
    parser.add_argument("name")
    parser.add_argument("--payload", default="{}", help="JSON, or @FILE to read it from a file")
    parser.add_argument("--log-tail", action="store_true", help="also print the last 4 KB of the log")
    parser.add_argument("--async", dest="event", action="store_true", help="asynchronous: print the request id")
    _endpoint(parser)
    ns = parser.parse_args(args)
    payload = Path(ns.payload[1:]).read_bytes() if ns.payload.startswith("@") else ns.payload.encode()
    headers = {"Content-Type": "application/json"}
    if ns.event:
        headers["X-Amz-Invocation-Type"] = "Event"
    if ns.log_tail:
        headers["X-Amz-Log-Type"] = "Tail"
    url = f"{ns.endpoint.rstrip('/')}/2015-03-31/functions/{urllib.parse.quote(ns.name, safe='')}/invocations"
    try:
        status, response_headers, body = _request(url, payload, headers)
    except OSError as exc:
        print(f"lambdalet invoke: cannot reach {ns.endpoint}: {exc}", file=sys.stderr)
        return 1
    lower = {k.lower(): v for k, v in response_headers.items()}
    if ns.event and status == 202:
        print(lower.get("x-amzn-requestid", ""))
        return 0
    if ns.log_tail and "x-amz-log-result" in lower:
        sys.stderr.write(base64.b64decode(lower["x-amz-log-result"]).decode("utf-8", "replace"))
    sys.stdout.write(body.decode("utf-8", "replace") + "\n")
    if status != 200:
        print(f"lambdalet invoke: {status} {lower.get('x-amzn-errortype', '')}", file=sys.stderr)
        return 1
    return 1 if "x-amz-function-error" in lower else 0


def _ls(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lambdalet ls", description="List the functions a gateway serves.")
    _endpoint(parser)
    ns = parser.parse_args(args)
    try:
        status, _, body = _request(f"{ns.endpoint.rstrip('/')}/lambdalet/v1/status")
    except OSError as exc:
        print(f"lambdalet ls: cannot reach {ns.endpoint}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"lambdalet ls: {status} {body.decode(errors='replace')}", file=sys.stderr)
        return 1
    data = json.loads(body)
    row = "{:<24} {:<16} {:>7} {:>8} {:>9} {:>5} {:>5} {:>9}"
    print(row.format("NAME", "RUNTIME", "MEMORY", "TIMEOUT", "RESERVED", "IDLE", "BUSY", "STARTING"))
    for fn in data["functions"]:
        envs = fn["environments"]
        reserved = "-" if fn["reservedConcurrency"] is None else str(fn["reservedConcurrency"])
        print(
            row.format(
                fn["name"],
                fn["runtime"] or "image",
                f"{fn['memoryMB']}MB",
                f"{fn['timeoutSeconds']}s",
                reserved,
                envs["idle"],
                envs["busy"],
                envs["starting"],
            )
        )
    for error in data["errors"]:
        print(f"invalid: {error['file']}: {error['field']}: {error['reason']}", file=sys.stderr)
    return 0


def _logs(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lambdalet logs", description="Show a function's log lines.")
    parser.add_argument("name")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    _endpoint(parser)
    ns = parser.parse_args(args)
    url = f"{ns.endpoint.rstrip('/')}/lambdalet/v1/functions/{urllib.parse.quote(ns.name, safe='')}/logs"
    if ns.follow:
        url += "?follow=1"
    try:
        with urllib.request.urlopen(url, timeout=None if ns.follow else 30) as response:
            for line in response:
                sys.stdout.write(line.decode("utf-8", "replace"))
                sys.stdout.flush()
    except urllib.error.HTTPError as exc:
        print(f"lambdalet logs: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lambdalet logs: cannot reach {ns.endpoint}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


COMMANDS = {"up": _up, "invoke": _invoke, "ls": _ls, "logs": _logs}


def main(argv: list[str]) -> int:
    """``argv[0]`` is the subcommand (``up``, ``invoke``, ``ls``, ``logs``)."""
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: lambdalet {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
