"""Measure every runtime through the agent: cold start (the agent's Init Duration, and the caller's time
from starting an environment to its first answer) and warm invocation latency (caller round trip over
loopback HTTP, and the agent's Duration). Prints a Markdown table.

    .venv/bin/python tests/integration/tools/measure_runtimes.py [--cold 5] [--warm 300] [--only ID ...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtimes_support import FLAVORS, Flavor, Toolchains, running


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(toolchains: Toolchains, flavor: Flavor, cold: int, warm: int) -> str:
    toolchains.code(flavor)
    toolchains.command(flavor, flavor.handler)
    inits: list[float] = []
    firsts: list[float] = []
    for _ in range(cold):
        started = time.perf_counter()
        async with running(toolchains, flavor) as env:
            first = await env.invoke({"action": "count"})
            firsts.append((time.perf_counter() - started) * 1000)
            inits.append(float(first.headers["X-Lambdalet-Init-Duration-Ms"]))
    round_trips: list[float] = []
    durations: list[float] = []
    async with running(toolchains, flavor) as env:
        for _ in range(20):
            await env.invoke({"action": "count"})
        for _ in range(warm):
            started = time.perf_counter()
            invoked = await env.invoke({"action": "count"})
            round_trips.append((time.perf_counter() - started) * 1000)
            durations.append(float(invoked.headers["X-Lambdalet-Duration-Ms"]))
    return (
        f"| {flavor.id} | {statistics.median(inits):.0f} | {statistics.median(firsts):.0f} "
        f"| {statistics.median(round_trips):.2f} | {_quantile(round_trips, 0.99):.2f} "
        f"| {statistics.median(durations):.2f} |"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", type=int, default=5, help="cold starts per runtime (median reported)")
    parser.add_argument("--warm", type=int, default=300, help="warm invocations per runtime")
    parser.add_argument("--only", nargs="*", default=None, help="runtime flavor ids (default: all)")
    args = parser.parse_args()
    toolchains = Toolchains()
    print(
        "| runtime | init duration ms (median) | start to first answer ms "
        "| warm round trip ms p50 | p99 | agent Duration ms p50 |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for flavor in FLAVORS:
        if args.only is None or flavor.id in args.only:
            print(await measure(toolchains, flavor, args.cold, args.warm), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
