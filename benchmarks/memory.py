"""Memory: the gateway with many functions registered, and one idle execution environment.

RSS is what ``ps`` shows; PSS divides shared pages (the interpreter, shared libraries) among the processes
that map them, so it is the fairer per-environment cost when many environments run on one node.
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path
from typing import Any

from benchmarks import procs, stats, targets

MIB = 1024 * 1024


def _registered(address: targets.Address, name: str) -> bool:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", f"/2015-03-31/functions/{name}")
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def gateway_rss(workdir: Path, functions: int) -> dict[str, Any]:
    """RSS/PSS of the gateway process alone once ``functions`` functions are registered (none invoked)."""
    names = [f"fn-{i:04d}" for i in range(functions)]
    gateway = targets.start_gateway(workdir, [targets.manifest(n) for n in names], tag=f"memory-{functions}")
    try:
        address = gateway.addresses[0]
        deadline = time.monotonic() + 120
        while not _registered(address, names[-1]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway did not register {functions} functions in 120 s")
            time.sleep(0.05)
        time.sleep(0.5)
        pid = gateway.processes[0].pid
        return {
            "functions": functions,
            "rss_mb": round(procs.rss_bytes(pid) / MIB, 1),
            "pss_mb": round(procs.pss_bytes(pid) / MIB, 1),
        }
    finally:
        gateway.stop()


def environment_memory(target: targets.Target) -> dict[str, Any]:
    """Median RSS/PSS of one idle environment (its whole process tree) over a target's environments."""
    trees = [procs.tree_memory(proc.pid) for proc in target.processes]
    return {
        "environments": len(trees),
        "processes_each": trees[0]["processes"] if trees else 0,
        "rss_mb": round(stats.median([t["rss_bytes"] for t in trees]) / MIB, 1),
        "pss_mb": round(stats.median([t["pss_bytes"] for t in trees]) / MIB, 1),
    }


def process_memory(target: targets.Target) -> dict[str, Any]:
    pid = target.processes[0].pid
    return {"rss_mb": round(procs.rss_bytes(pid) / MIB, 1), "pss_mb": round(procs.pss_bytes(pid) / MIB, 1)}
