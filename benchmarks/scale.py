"""Scale-out and throttling through the gateway, from the client's and from the function's side.

- Burst: 200 invocations sent at once to a function with zero environments; the figure is the time until
  the last one is answered. The peer is AWS's emulator, which has no scheduler: 200 emulator processes
  started at once, each invoked once as soon as it accepts connections (the best a client can do with it).
- Throttling: a function with ``reservedConcurrency`` = cap driven by 2 x cap concurrent clients; each
  invocation appends its start and end time (``BENCH_RUNNING``), and we count, from those, how many
  invocations ran while cap others were already running (must be 0).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import procs, stats, targets


def read_intervals(path: Path) -> list[tuple[int, int]]:
    """The ``start end`` lines (ns) the function appended, one per invocation."""
    out = []
    for line in path.read_text().splitlines():
        start, end = line.split()
        out.append((int(start), int(end)))
    return out


async def _burst(address: targets.Address, path: str, count: int) -> tuple[float, list[float], Counter[int]]:
    url = f"http://{address[0]}:{address[1]}{path}"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.monotonic()

        async def one() -> tuple[int, float]:
            async with session.post(url, data=targets.EVENT, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                return resp.status, time.monotonic() - t0

        results = await asyncio.gather(*(one() for _ in range(count)))
    statuses = Counter(status for status, _ in results)
    times = [elapsed * 1000 for _, elapsed in results]
    return max(times), times, statuses


def gateway_burst(address: targets.Address, function: str, count: int) -> dict[str, Any]:
    total_ms, times, statuses = asyncio.run(_burst(address, f"/2015-03-31/functions/{function}/invocations", count))
    return {
        "invocations": count,
        "total_ms": round(total_ms, 1),
        "p50_ms": round(stats.percentile(times, 50), 1),
        "p99_ms": round(stats.percentile(times, 99), 1),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


async def _rie_burst(binary: Path, count: int) -> tuple[float, list[float], Counter[int]]:
    env = targets.rie_env()
    ports = [(procs.free_port(), procs.free_port()) for _ in range(count)]
    t0 = time.monotonic()
    processes = [
        procs.spawn(targets.rie_argv(binary, port, api_port), env=env, cwd=targets.FUNCTION_DIR)
        for port, api_port in ports
    ]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one(index: int) -> tuple[int, float]:
                while True:
                    port = ports[index][0]
                    url = f"http://127.0.0.1:{port}{targets.INVOKE_PATH}"
                    try:
                        async with session.post(url, data=targets.EVENT) as resp:
                            await resp.read()
                            return resp.status, time.monotonic() - t0
                    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError):
                        # not listening yet, or accepted while still starting: try again
                        if time.monotonic() - t0 > 120:
                            raise
                        if processes[index].poll() is not None:
                            # it exited (its port was taken by another process meanwhile): start another
                            ports[index] = (procs.free_port(), procs.free_port())
                            processes[index] = procs.spawn(
                                targets.rie_argv(binary, *ports[index]), env=env, cwd=targets.FUNCTION_DIR
                            )
                        await asyncio.sleep(0.001)

            results = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for proc in processes:
            procs.kill_now(proc)
    statuses = Counter(status for status, _ in results)
    times = [elapsed * 1000 for _, elapsed in results]
    return max(times), times, statuses


def rie_burst(binary: Path, count: int) -> dict[str, Any]:
    total_ms, times, statuses = asyncio.run(_rie_burst(binary, count))
    return {
        "invocations": count,
        "total_ms": round(total_ms, 1),
        "p50_ms": round(stats.percentile(times, 50), 1),
        "p99_ms": round(stats.percentile(times, 99), 1),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


async def _drive(address: targets.Address, path: str, clients: int, seconds: float) -> Counter[int]:
    url = f"http://{address[0]}:{address[1]}{path}"
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                async with session.post(url, data=targets.EVENT) as resp:
                    await resp.read()
                    statuses[resp.status] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


def throttle(address: targets.Address, function: str, cap: int, running_file: Path, seconds: float) -> dict[str, Any]:
    """2 x cap clients against a function capped at ``cap``; counts from the function's own marks."""
    clients = 2 * cap
    path = f"/2015-03-31/functions/{function}/invocations"
    # bring the function to its cap first, so the overload meets warm environments
    deadline = time.monotonic() + 120
    while sum(targets.gateway_environments(address, function).values()) < cap and time.monotonic() < deadline:
        asyncio.run(_drive(address, path, cap, 0.5))
    targets.wait_gateway_environments(address, function, cap)
    running_file.write_text("")
    statuses = asyncio.run(_drive(address, path, clients, seconds))
    intervals = read_intervals(running_file)
    return {
        "cap": cap,
        "clients": clients,
        "seconds": seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
        "invocations_run": len(intervals),
        "max_running": stats.max_overlap(intervals),
        "invocations_above_cap": stats.starts_above(intervals, cap),
    }
