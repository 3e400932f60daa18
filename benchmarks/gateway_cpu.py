"""``python -m benchmarks.gateway_cpu``: the gateway's CPU per warm invocation, beside AWS's emulator.

Starts ``lambdalet up`` with the no-op function and ``aws-lambda-rie`` + ``awslambdaric`` (one emulator
per connection, as ``make bench`` does), then for each round, concurrency and target (in a shuffled
order) runs wrk and reads the CPU time (utime + stime from ``/proc/<pid>/stat``) that the gateway
process used during the run (and how much of it was system time), and separately its environments'
(agents and bootstraps). Prints one row per (target, concurrency): throughput (median over rounds), the
gateway's CPU µs per invocation and the environments', and the throughput ratio gateway ÷ emulator
measured in the same run, with the load average before and after (the machine is shared).

``--gateway asyncio uvloop asyncio@HEAD~3 asyncio@DIR`` compares gateways in the same run: under uvloop
(set as the event loop policy by a wrapper around ``lambdalet up``), or the gateway package as it was at
a git revision or as it is in another directory. Suffixes: ``-quiet`` runs ``lambdalet up --quiet`` (no
echo of function logs to its stdout); ``-batchlogs`` is an experiment that reads the environments' output
every 50 ms instead of line by line as it comes (``uvloop-quiet-batchlogs@HEAD``); ``-gcstats`` prints the
garbage collector's collections and CPU time by generation to the gateway's log when it stops.

``--callgrind N`` counts the gateway's user-space instructions per invocation under valgrind's callgrind
instead (see :func:`count_instructions`). ``--profile FILE`` runs the gateway under cProfile on its CPU
clock and writes the stats there when it stops (the CPU figures then include the profiler's). Nothing is
asserted: this is a measuring tool.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import machine, procs, targets, wrk

#: Runs ``lambdalet up`` (argv[3:]), under uvloop when argv[1] is "uvloop" and under cProfile when
#: argv[2] names a file (the stats are written there when the gateway stops).
_WRAPPER = """
import asyncio, cProfile, os, signal, sys, time
_, loop, profile, *argv = sys.argv
if loop.startswith("uvloop"):
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
if "-batchlogs" in loop:
    # an experiment: environments' output read every 50 ms in one piece instead of line by line as it
    # comes (what the per-line wakeups of the log pump cost)
    from lambdalet_gateway.local import LocalBackend
    async def batched(self, environment, proc):
        while data := await proc.stdout.read(1 << 20):
            for line in data.decode("utf-8", "replace").splitlines():
                self._logs.append(environment.function, line)
            await asyncio.sleep(0.05)
    LocalBackend._pump_stdout = batched
if os.environ.pop("BENCH_NO_MANIFEST_POLL", None):
    # callgrind: the gateway runs some 50 times slower, so work on a timer (the manifest poll) would be
    # charged to invocations many times over, and by chance
    from lambdalet_gateway.registry import Registry
    async def no_poll(self, interval):
        await asyncio.Event().wait()
    Registry.run = no_poll
if "-gcstats" in loop:
    # an experiment: how much of the gateway's time goes to the garbage collector, by generation
    import atexit, gc
    gc_time, gc_count, gc_started = [0.0] * 3, [0] * 3, [0.0]
    def on_gc(phase, info):
        if phase == "start":
            gc_started[0] = time.process_time()
        else:
            gc_time[info["generation"]] += time.process_time() - gc_started[0]
            gc_count[info["generation"]] += 1
    gc.callbacks.append(on_gc)
    atexit.register(lambda: print(f"GCSTATS count={gc_count} cpu_s={[round(t, 3) for t in gc_time]}", flush=True))
profiler = cProfile.Profile(time.process_time) if profile else None
def stop(*_):
    raise KeyboardInterrupt
if profiler is not None:
    signal.signal(signal.SIGTERM, stop)
    profiler.enable()
from lambdalet.cli import main
try:
    main(argv)
except KeyboardInterrupt:
    pass
finally:
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
"""


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _tree_cpu(pid: int) -> tuple[float, float, float]:
    """User and system CPU seconds of ``pid`` itself, and all CPU seconds of its descendants."""
    user, system = _cpu(pid)
    rest = sum(sum(_cpu(p)) for p in list(procs.tree(pid))[1:])
    return user, system, rest


def _variant_code(variant: str, workdir: Path) -> tuple[str, str, dict[str, str]]:
    """``LOOP``, ``LOOP@REV`` or ``LOOP@DIR`` -> (name, loop, extra environment). ``@REV`` runs the
    gateway package (only it: the agent and the ``lambdalet`` package stay this tree's) as it was at git
    revision REV, extracted with ``git archive`` and put first on ``PYTHONPATH``; ``@DIR`` the package
    in ``DIR/gateway/lambdalet_gateway`` (a candidate change, say)."""
    loop, _, rev = variant.partition("@")
    base, *options = loop.split("-")
    if base not in {"asyncio", "uvloop"} or not set(options) <= {"quiet", "batchlogs", "gcstats"}:
        raise SystemExit(f"unknown gateway {loop!r} in {variant!r} (asyncio or uvloop; -quiet -batchlogs -gcstats)")
    if not rev:
        return f"gw-{loop}", loop, {}
    if Path(rev).is_dir():
        return f"gw-{loop}@{Path(rev).name}", loop, {"PYTHONPATH": str(Path(rev).resolve() / "gateway")}
    tree = workdir / f"rev-{rev}"
    if not tree.exists():
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(procs.REPO), "archive", rev, "gateway/lambdalet_gateway"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return f"gw-{loop}@{rev}", loop, {"PYTHONPATH": str(tree / "gateway")}


def start_gateway(workdir: Path, variant: str, profile: Path | None) -> targets.Target:
    """``lambdalet up`` with the no-op function, as ``targets.start_gateway`` starts it, in the wrapper."""
    name, loop, extra = _variant_code(variant, workdir)
    tag = name.replace("@", "-")
    manifests = workdir / f"{tag}-manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "functions.yaml").write_text(targets.manifest("noop") + "\n")
    port = procs.free_port()
    env = dict(os.environ, LAMBDALET_GATEWAY_PORT=str(port), LAMBDALET_STATE_DIR=str(workdir / f"{tag}-state"))
    env.update(extra)
    quiet = ["--quiet"] if "-quiet" in loop else []
    argv = [procs.PYTHON, "-c", _WRAPPER, loop, str(profile or ""), "up", *quiet, str(manifests)]
    proc = procs.spawn(argv, env=env, cwd=workdir, log=workdir / f"{tag}.log")
    procs.wait_connectable("127.0.0.1", port, proc, timeout=60)
    return targets.Target(
        name,
        "(a) gateway",
        [("127.0.0.1", port)],
        pinned=False,
        path="/2015-03-31/functions/noop/invocations",
        processes=[proc],
    )


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workdir = targets.workdir()
    max_c = max(args.concurrency)
    load_before = machine.loadavg()
    started: list[targets.Target] = []
    gateways: list[targets.Target] = []
    try:
        for variant in args.gateway:
            gateway = start_gateway(workdir, variant, args.profile)
            started.append(gateway)
            gateways.append(gateway)
            gateway.warm_up()
            wrk.run(gateway.addresses, max_c, 2, gateway.path)
            targets.wait_gateway_environments(gateway.addresses[0], "noop", max_c)
        if not args.no_rie:
            rie = targets.start_rie(max_c, targets.rie_binary())
            started.append(rie)
            rie.warm_up()
        time.sleep(1)
        rng = random.Random(9)
        rows: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for concurrency in args.concurrency:
                order = list(started)
                rng.shuffle(order)
                for target in order:
                    pid = target.processes[0].pid
                    before = _tree_cpu(pid) if target in gateways else (0.0, 0.0, 0.0)
                    result = wrk.run(target.addresses_for(concurrency), concurrency, args.seconds, target.path)
                    after = _tree_cpu(pid) if target in gateways else (0.0, 0.0, 0.0)
                    ok = max(result.ok, 1)
                    rows.setdefault((target.name, concurrency), []).append(
                        {
                            "rps": result.rps,
                            "p50_ms": result.p50_ms,
                            "gateway_us": (after[0] + after[1] - before[0] - before[1]) / ok * 1e6,
                            "gateway_sys_us": (after[1] - before[1]) / ok * 1e6,
                            "environments_us": (after[2] - before[2]) / ok * 1e6,
                            "errors": result.errors,
                        }
                    )
    finally:
        for target in started:
            target.stop()
        notes = [
            f"{log.stem}: {line}"
            for log in sorted(workdir.glob("gw-*.log"))
            for line in log.read_text(errors="replace").splitlines()
            if line.startswith("GCSTATS")
        ]
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {"loadavg_before": load_before, "loadavg_after": machine.loadavg(), "notes": notes}
    table = []
    for (name, concurrency), runs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row: dict[str, Any] = {"target": name, "concurrency": concurrency, "rounds": len(runs)}
        for key in ("rps", "p50_ms", "gateway_us", "gateway_sys_us", "environments_us"):
            row[key] = round(statistics.median(r[key] for r in runs), 1 if key != "p50_ms" else 3)
        row["errors"] = sum(int(r["errors"]) for r in runs)
        table.append(row)
    for row in table:
        if row["target"].startswith("gw-"):
            peer = next((r for r in table if r["target"] == "rie" and r["concurrency"] == row["concurrency"]), None)
            if peer is not None and peer["rps"]:
                row["x_emulator"] = round(row["rps"] / peer["rps"], 3)
    out["rows"] = table
    return out


def count_instructions(workdir: Path, variant: str, invocations: int, run: int = 0) -> int:
    """User-space instructions the gateway process executes per warm invocation, counted by callgrind
    (valgrind) over ``invocations`` sequential invocations on one keep-alive connection after a warm-up.
    Unlike CPU time this hardly moves with the machine's load, so it resolves changes of 1 to 2 %. The
    gateway runs with ``--quiet``, spawned agents (valgrind has no ``pidfd_open``, which fast start
    needs), no periodic scaling and no manifest poll; its environments run natively."""
    name, loop, extra = _variant_code(variant, workdir)
    tag = name.replace("@", "-") + f"-callgrind-{run}"
    manifests = workdir / f"{tag}-manifests"
    manifests.mkdir()
    (manifests / "functions.yaml").write_text(targets.manifest("noop") + "\n")
    port = procs.free_port()
    env = dict(
        os.environ,
        LAMBDALET_GATEWAY_PORT=str(port),
        LAMBDALET_STATE_DIR=str(workdir / f"{tag}-state"),
        LAMBDALET_FAST_START="0",
        LAMBDALET_SCALE_INTERVAL_SECONDS="3600",
        BENCH_NO_MANIFEST_POLL="1",
        **extra,
    )
    out = workdir / f"{tag}.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    argv = [*valgrind, procs.PYTHON, "-c", _WRAPPER, loop, "", "up", "--quiet", str(manifests)]
    proc = procs.spawn(argv, env=env, cwd=workdir, log=workdir / f"{tag}.log")
    try:
        procs.wait_connectable("127.0.0.1", port, proc, timeout=300)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        path = "/2015-03-31/functions/noop/invocations"

        def invoke() -> None:
            conn.request("POST", path, body=targets.EVENT, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{name}: an invocation under callgrind answered {response.status}")

        for _ in range(20):
            invoke()
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(proc.pid)], check=True, capture_output=True)
        for _ in range(invocations):
            invoke()
        subprocess.run([*control, "-i", "off", str(proc.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
        conn.close()
    finally:
        procs.stop(proc, grace=20)
        procs.kill_pids(list(procs.tree(proc.pid))[1:])
    totals = [
        int(line.split()[1])
        for dump in workdir.glob(f"{tag}.out.*")  # the dump taken while instrumented (the exit's has none)
        for line in dump.read_text().splitlines()
        if line.startswith("totals:")
    ]
    if totals:
        return max(totals) // invocations
    raise RuntimeError(f"{name}: callgrind wrote no totals (see {workdir / f'{tag}.log'})")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_cpu", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--gateway",
        nargs="+",
        default=["asyncio"],
        metavar="LOOP[@REV]",
        help="gateways to compare in the same run: event loop asyncio or uvloop, optionally the gateway "
        "package at a git revision (default: asyncio, this tree)",
    )
    parser.add_argument("--no-rie", action="store_true", help="measure the gateway only")
    parser.add_argument(
        "--callgrind",
        type=int,
        metavar="N",
        help="instead: count the gateway's instructions per invocation under callgrind over N invocations "
        "(c=1), each gateway --rounds times, alternating",
    )
    parser.add_argument("--profile", type=Path, help="run the gateway under cProfile, stats to this file")
    args = parser.parse_args()
    if args.callgrind:
        workdir = targets.workdir()
        counts: dict[str, list[int]] = {}
        for run in range(args.rounds):
            for variant in args.gateway:
                counts.setdefault(variant, []).append(count_instructions(workdir, variant, args.callgrind, run))
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"load average {machine.loadavg()}")
        for variant, values in counts.items():
            print(f"{variant:<40} {statistics.median(values):10,.0f} instructions/invocation (runs: {values})")
        return 0
    result = measure(args)
    print(json.dumps(result, indent=1))
    print(f"load average {result['loadavg_before']} -> {result['loadavg_after']}")
    for note in result["notes"]:
        print(note)
    for row in result["rows"]:
        line = f"{row['target']:<22} c={row['concurrency']:<2} {row['rps']:8.0f} req/s p50 {row['p50_ms']:6.3f} ms"
        if row["target"].startswith("gw-"):
            line += (
                f"  gateway {row['gateway_us']:5.0f} µs/inv ({row['gateway_sys_us']:3.0f} sys)"
                f"  envs {row['environments_us']:6.0f} µs/inv"
                f"  x emulator {row.get('x_emulator', float('nan')):.2f}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
