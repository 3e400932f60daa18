"""Asynchronous invocation: accepted events per second and delivery latency, on ``lambdalet up``.

``run(quick) -> dict`` (called by ``python -m benchmarks``; also ``python -m benchmarks.async_bench``):

- **accept**: N events (``X-Amz-Invocation-Type: Event``, to one no-op function with ``reservedConcurrency``
  4) sent by C concurrent aiohttp clients to a fresh ``lambdalet up`` with the SQLite queue (WAL, fsync on
  every commit); accepted/s = N / (last 202 - first send). Deliveries run at the same time, as they would.
- **floor**: serial SQLite commits per second with ``synchronous=FULL`` on the same disk, in the same run
  (one fsync per event: what accepting would cost without group commit).
- **delivery latency**: from sending an event to its function starting (the function writes its request id
  and ``time.time()``), median and p99: over the N-event burst (mostly time spent waiting behind the burst;
  also the time to drain it), and over events sent one at a time at 20/s (the queue's own latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.stats import percentile

RESERVED = 4
FUNCTION = """\
import os
import time


def handler(event, context):
    with open(os.environ["BENCH_RUNS"], "a") as runs:
        runs.write(f"{context.aws_request_id} {time.time()}\\n")
    return None
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _manifest(runs: Path) -> str:
    return json.dumps(
        {
            "apiVersion": "lambdalet.dev/v1alpha1",
            "kind": "Function",
            "metadata": {"name": "sink"},
            "spec": {
                "runtime": "python3.12",
                "handler": "app.handler",
                "code": {"inline": {"files": {"app.py": FUNCTION}}},
                "environment": {"variables": {"BENCH_RUNS": str(runs)}},
                # four environments: on two shared cores, unbounded async concurrency measures process
                # start-up storms rather than the queue
                "reservedConcurrency": RESERVED,
            },
        }
    )


def fsync_floor(directory: Path, commits: int) -> float:
    """Serial one-row commits per second with WAL and synchronous=FULL (each commit fsyncs)."""
    conn = sqlite3.connect(directory / "floor.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    started = time.perf_counter()
    for _ in range(commits):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (body) VALUES (?)", (b"{}",))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return commits / elapsed


def _start_gateway(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    manifests = workdir / "functions"
    manifests.mkdir()
    (manifests / "sink.yaml").write_text(_manifest(workdir / "runs.txt"))
    env = {
        **os.environ,
        "LAMBDALET_STATE_DIR": str(workdir / "state"),
        "LAMBDALET_ASYNC_SQLITE_PATH": str(workdir / "async.sqlite3"),
    }
    with (workdir / "gateway.log").open("ab") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("lambdalet")), "up", str(manifests), "--port", str(port), "--quiet"],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lambdalet up exited: {(workdir / 'gateway.log').read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response,
        ):
            if response.status == 200:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("lambdalet up did not become ready")


async def _send(url: str, events: int, concurrency: int) -> tuple[dict[str, float], float, float]:
    sent_at: dict[str, float] = {}
    next_index = 0
    first = time.time()
    last = first

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal next_index, last
        while next_index < events:
            index = next_index
            next_index += 1
            started = time.time()
            async with session.post(
                url, data=io.BytesIO(json.dumps({"i": index}).encode()), headers={"X-Amz-Invocation-Type": "Event"}
            ) as response:
                if response.status != 202:
                    raise RuntimeError(f"event {index}: {response.status} {await response.text()}")
                sent_at[response.headers["x-amzn-RequestId"]] = started
            last = max(last, time.time())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        # one synchronous call first, so the function's first environment is warm
        async with session.post(url, data=b"{}") as response:
            await response.read()
        first = time.time()
        await asyncio.gather(*(sender(session) for _ in range(concurrency)))
    return sent_at, first, last


async def _paced(url: str, events: int, rate: float) -> dict[str, float]:
    """Events one at a time at ``rate`` per second, below what the function drains: the queue's own latency."""
    sent_at: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for index in range(events):
            started = time.time()
            async with session.post(
                url, data=io.BytesIO(json.dumps({"p": index}).encode()), headers={"X-Amz-Invocation-Type": "Event"}
            ) as response:
                if response.status != 202:
                    raise RuntimeError(f"paced event {index}: {response.status}")
                sent_at[response.headers["x-amzn-RequestId"]] = started
            await asyncio.sleep(max(0.0, started + 1 / rate - time.time()))
    return sent_at


def _runs(path: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            request_id, _, at = line.partition(" ")
            found.setdefault(request_id, float(at))
    return found


def run(quick: bool) -> dict[str, Any]:
    events = 500 if quick else 3000
    concurrency = 16
    with tempfile.TemporaryDirectory(prefix="lambdalet-async-bench-") as tmp:
        workdir = Path(tmp)
        floor = fsync_floor(workdir, 200 if quick else 1000)
        port = _free_port()
        proc = _start_gateway(workdir, port)
        try:
            url = f"http://127.0.0.1:{port}/2015-03-31/functions/sink/invocations"
            sent_at, first, last = asyncio.run(_send(url, events, concurrency))
            deadline = time.time() + 300
            runs = _runs(workdir / "runs.txt")
            while not all(r in runs for r in sent_at) and time.time() < deadline:
                time.sleep(0.2)
                runs = _runs(workdir / "runs.txt")
            paced_at = asyncio.run(_paced(url, 30 if quick else 100, 20.0))
            while not all(r in runs for r in paced_at) and time.time() < deadline:
                time.sleep(0.2)
                runs = _runs(workdir / "runs.txt")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    delivered = [runs[r] - sent_at[r] for r in sent_at if r in runs]
    paced = [runs[r] - paced_at[r] for r in paced_at if r in runs]
    accepted_per_s = events / max(last - first, 1e-9)
    return {
        "events": events,
        "concurrency": concurrency,
        "accepted_per_s": round(accepted_per_s, 1),
        "sqlite_fsync_floor_commits_per_s": round(floor, 1),
        "accepted_vs_fsync_floor": round(accepted_per_s / floor, 2),
        "delivered": len(delivered),
        "delivery_latency_ms": {
            "p50": round(percentile(delivered, 50) * 1000, 1) if delivered else None,
            "p99": round(percentile(delivered, 99) * 1000, 1) if delivered else None,
        },
        "drain_s": round(max((runs[r] for r in sent_at if r in runs), default=first) - first, 2),
        "paced_events": len(paced_at),
        "paced_rate_per_s": 20.0,
        "paced_delivery_latency_ms": {
            "p50": round(percentile(paced, 50) * 1000, 1) if paced else None,
            "p99": round(percentile(paced, 99) * 1000, 1) if paced else None,
        },
        "reserved_concurrency": RESERVED,
        "note": "SQLite queue (embedded); one function, reservedConcurrency 4; deliveries overlap acceptance",
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
