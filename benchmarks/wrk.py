"""Driving ``wrk`` (the load generator for every warm figure) and parsing what it prints.

Why wrk: a C event loop per thread that costs far less CPU per request than any Python client, so on a
2-core machine the servers, not the client, are what saturates; Debian packages it (``make apt-deps``).
Its Lua hooks (``wrk.lua``) POST the event, pin one connection per thread to one execution environment,
and print a JSON line we parse here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import stats

SCRIPT = Path(__file__).with_name("wrk.lua")
MARKER = "WRKJSON "
INVOKE_PATH = "/2015-03-31/functions/function/invocations"


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed nothing we can parse."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    statuses: dict[int, int] = field(default_factory=dict)
    durations_ms: tuple[float, ...] = ()

    @property
    def ok(self) -> int:
        """Requests answered 2xx."""
        return sum(count for code, count in self.statuses.items() if 200 <= code < 300)

    @property
    def rps(self) -> float:
        """Successful (2xx) responses per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def parse(output: str) -> WrkResult:
    """Parse the ``WRKJSON`` line that ``wrk.lua`` prints at the end of a run."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER) :])
            break
    else:
        raise WrkError(f"no {MARKER.strip()} line in wrk output:\n{output[-2000:]}")
    latency = raw["latency_us"]
    errors = raw["errors"]
    statuses = {int(code): int(count) for code, count in raw["statuses"].items()}
    # "status" counts non-2xx/3xx responses, which statuses already shows; the rest are transport errors
    transport = int(errors["connect"]) + int(errors["read"]) + int(errors["write"]) + int(errors["timeout"])
    non_ok = sum(count for code, count in statuses.items() if not 200 <= code < 300)
    return WrkResult(
        requests=int(raw["requests"]),
        seconds=int(raw["duration_us"]) / 1e6,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        p999_ms=latency["p999"] / 1000,
        mean_ms=latency["mean"] / 1000,
        max_ms=latency["max"] / 1000,
        errors=transport + non_ok,
        statuses=statuses,
        durations_ms=tuple(float(v) for v in raw["duration_ms"]),
    )


def command(
    addresses: list[tuple[str, int]], concurrency: int, seconds: float, path: str = INVOKE_PATH, timeout_s: float = 5.0
) -> list[str]:
    """The wrk argv: one thread per connection so each connection can be pinned to its own address."""
    binary = shutil.which("wrk")
    if binary is None:
        raise WrkError("wrk is not installed (make apt-deps installs it from Debian)")
    host, port = addresses[0]
    return [
        binary,
        f"--threads={concurrency}",
        f"--connections={concurrency}",
        f"--duration={max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        f"--script={SCRIPT}",
        f"http://{host}:{port}{path}",
    ]


def run(addresses: list[tuple[str, int]], concurrency: int, seconds: float, path: str = INVOKE_PATH) -> WrkResult:
    """Run wrk for ``seconds`` at ``concurrency`` against ``addresses`` (thread i → address i mod n)."""
    env = dict(os.environ, BENCH_ADDRS=",".join(f"{h}:{p}" for h, p in addresses))
    argv = command(addresses, concurrency, seconds, path)
    proc = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return parse(proc.stdout)


def duration_summary(result: WrkResult) -> stats.Summary | None:
    """Percentiles of the bootstrap's own time (X-Lambdalet-Duration-Ms), when the target reports it."""
    return stats.summarize(result.durations_ms) if result.durations_ms else None
