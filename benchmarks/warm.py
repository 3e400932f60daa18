"""Warm invocations: every target at every concurrency, interleaved in shuffled rounds.

Each (round, concurrency) visits the targets in a fresh random order, so slow drifts in the machine's load
(other builds, other engineers' tests) spread over all targets instead of biasing one. Per target and
concurrency we keep the median over rounds of throughput, p50 and p99, and pool the bootstrap's own time
(X-Lambdalet-Duration-Ms) from every request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import stats, wrk
from benchmarks.targets import Target

Log = Callable[[str], None]


def aggregate(name: str, label: str, concurrency: int, runs: Sequence[wrk.WrkResult]) -> dict[str, Any]:
    """One row of the warm table from a target's runs at one concurrency (pure)."""
    durations = [d for run in runs for d in run.durations_ms]
    statuses: dict[str, int] = {}
    for run in runs:
        for code, count in run.statuses.items():
            statuses[str(code)] = statuses.get(str(code), 0) + count
    row: dict[str, Any] = {
        "target": name,
        "label": label,
        "concurrency": concurrency,
        "rounds": len(runs),
        "rps": round(stats.median([r.rps for r in runs]), 1),
        "p50_ms": round(stats.median([r.p50_ms for r in runs]), 3),
        "p99_ms": round(stats.median([r.p99_ms for r in runs]), 3),
        "p999_ms": round(stats.median([r.p999_ms for r in runs]), 3),
        "requests": sum(r.requests for r in runs),
        "errors": sum(r.errors for r in runs),
        "statuses": statuses,
        "per_round": [{"rps": round(r.rps, 1), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms} for r in runs],
    }
    if durations:
        summary = stats.summarize(durations)
        row["bootstrap_ms"] = {
            "n": summary["n"],
            "p50": round(summary["p50"], 4),
            "p99": round(summary["p99"], 4),
            "mean": round(summary["mean"], 4),
        }
    return row


def run(
    targets: Sequence[Target],
    concurrencies: Sequence[int],
    rounds: int,
    seconds: float,
    *,
    log: Log,
    seed: int = 9,
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    results: dict[tuple[str, int], list[wrk.WrkResult]] = {}
    for round_ in range(rounds):
        for concurrency in concurrencies:
            order = list(targets)
            rng.shuffle(order)
            for target in order:
                result = wrk.run(target.addresses_for(concurrency), concurrency, seconds, target.path)
                results.setdefault((target.name, concurrency), []).append(result)
                log(
                    f"warm r{round_ + 1} c={concurrency:<3} {target.name:<14} {result.rps:9.0f} req/s "
                    f"p50 {result.p50_ms:7.3f} ms p99 {result.p99_ms:8.3f} ms errors {result.errors}"
                )
    rows = []
    for concurrency in concurrencies:
        for target in targets:
            rows.append(aggregate(target.name, target.label, concurrency, results[(target.name, concurrency)]))
    return rows
