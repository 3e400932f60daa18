"""``python -m benchmarks [--quick]``: run every scenario, write results, the chart and the README tables."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambdalet_gateway.standby import ZYGOTE_MARK

from benchmarks import chart, cold, machine, memory, procs, report, scale, summary, targets, warm, wrk

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Plan:
    concurrencies: tuple[int, ...]
    rounds: int
    seconds: float
    cold_trials: int
    gateway_cold_trials: int
    burst: int
    throttle_cap: int
    throttle_seconds: float
    memory_functions: int


FULL = Plan((1, 8, 64), rounds=3, seconds=4, cold_trials=40, gateway_cold_trials=30, burst=200,
            throttle_cap=4, throttle_seconds=5, memory_functions=1000)  # fmt: skip
# A smoke run: the same scenarios, smaller (no concurrency 64, fewer trials, a burst of 20).
QUICK = Plan((1, 8), rounds=1, seconds=2, cold_trials=12, gateway_cold_trials=12, burst=20,
             throttle_cap=4, throttle_seconds=2, memory_functions=1000)  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Run:
    """Collects results section by section; a failing section is recorded, the others still run."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"section {name} failed: {exc}")
            traceback.print_exc()
        finally:
            log(f"section {name}: {time.monotonic() - started:.1f} s")


def gateway_documents(plan: Plan, workdir: Path) -> tuple[list[str], list[str], list[Path]]:
    docs = [targets.manifest("noop")]
    names = [f"cold-{i:02d}" for i in range(plan.gateway_cold_trials)]
    marks = [workdir / f"cold-gateway-{i:02d}.marks" for i in range(plan.gateway_cold_trials)]
    docs += [targets.manifest(n, env={"BENCH_MARKS": str(m)}) for n, m in zip(names, marks, strict=True)]
    return docs, names, marks


NO_FAST_START = cold.GATEWAY_CONFIGS["gateway_no_fast_start"]


def gateway_environments(gateway_pid: int) -> list[int]:
    """The agents of a running gateway: its children, or with fast start (the default) the zygote's children
    that run a runtime (its spare has none yet)."""
    out = []
    for child in procs.children(gateway_pid):
        try:
            zygote = ZYGOTE_MARK.encode() in Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        out += [agent for agent in procs.children(child) if procs.children(agent)] if zygote else [child]
    return out


def gateway_scale(
    plan: Plan, workdir: Path, suffix: str = "", extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Throttling and the burst from zero, on a fresh gateway (``extra_env`` selects a configuration)."""
    running = workdir / f"capped{suffix}.running"
    capped = targets.manifest(
        "capped", env={"BENCH_RUNNING": str(running), "BENCH_SLEEP_S": "0.02"}, reserved=plan.throttle_cap
    )
    docs = [targets.manifest("burst"), capped]
    # the whole burst may wait for environments (the default lets 100 wait and throttles the rest with 429)
    env = {**(extra_env or {}), "LAMBDALET_QUEUE_SIZE": str(plan.burst), "LAMBDALET_QUEUE_TIMEOUT_SECONDS": "120"}
    gateway = targets.start_gateway(workdir, docs, tag=f"gateway-scale{suffix}", extra_env=env)
    out: dict[str, Any] = {}
    try:
        throttle = scale.throttle(gateway.addresses[0], "capped", plan.throttle_cap, running, plan.throttle_seconds)
        out[f"throttle{suffix}"] = throttle
        log(f"throttle{suffix} {throttle}")
        needed_mb = plan.burst * 45  # an agent and its bootstrap, PSS
        if machine.mem_available_mb() < needed_mb * 1.3:
            raise RuntimeError(f"not enough free memory for {plan.burst} environments ({needed_mb} MB)")
        burst = scale.gateway_burst(gateway.addresses[0], "burst", plan.burst)
        burst["environments"] = targets.gateway_environments(gateway.addresses[0], "burst")
        out[f"gateway_burst{suffix}"] = burst
        log(f"burst gateway{suffix} {burst}")
    finally:
        gateway.stop()
    return out


def account_throttle(plan: Plan, workdir: Path) -> dict[str, Any]:
    """The platform-wide cap (LAMBDALET_CONCURRENCY_LIMIT) against a function without a cap of its own."""
    running = workdir / "uncapped.running"
    doc = targets.manifest("uncapped", env={"BENCH_RUNNING": str(running), "BENCH_SLEEP_S": "0.02"})
    limit = {"LAMBDALET_CONCURRENCY_LIMIT": str(plan.throttle_cap)}
    gateway = targets.start_gateway(workdir, [doc], tag="gateway-account", extra_env=limit)
    try:
        out = scale.throttle(gateway.addresses[0], "uncapped", plan.throttle_cap, running, plan.throttle_seconds)
    finally:
        gateway.stop()
    log(f"throttle (account limit) {out}")
    return out


def run(plan: Plan, quick: bool) -> tuple[dict[str, Any], dict[str, str]]:
    workdir = targets.workdir()
    started = time.time()
    cpu_before = machine.cpu_snapshot()
    load_before = machine.loadavg()
    r = Run()
    res = r.results
    res["meta"] = {
        "command": (
            "make bench QUICK=1 (python -m benchmarks --quick)" if quick else "make bench (python -m benchmarks)"
        ),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine.describe(),
        "versions": machine.versions(),
        "commit": machine.git_commit(procs.REPO),
        "plan": plan.__dict__,
        "load_generator": "wrk (Debian), one thread per connection, Lua script benchmarks/wrk.lua",
        "workdir": str(workdir),
    }
    binary = targets.rie_binary()
    res["meta"]["rie"] = binary.parent.name
    max_c = max(plan.concurrencies)
    started_targets: list[targets.Target] = []
    gateway: targets.Target | None = None
    try:
        with r.section("start"):
            for kind in ("aiohttp", "raw"):
                started_targets.append(targets.start_floor(kind, workdir))
            started_targets.append(targets.start_rie(max_c, binary))
            started_targets.append(targets.start_agents(max_c, workdir))
            for target in started_targets:
                target.warm_up()
        docs, cold_names, cold_marks = gateway_documents(plan, workdir)
        with r.section("gateway start"):
            gateway = targets.start_gateway(workdir, docs)
            gateway.warm_up()
            # bring up as many environments as the highest concurrency will use, outside the measurement
            wrk.run(gateway.addresses, max_c, 3 if quick else 5, gateway.path)
            targets.wait_gateway_environments(gateway.addresses[0], "noop", max_c)
            started_targets.insert(0, gateway)
        log(f"targets: {', '.join(t.name for t in started_targets)}")
        time.sleep(2)  # let the machine settle after starting hundreds of processes

        with r.section("warm"):
            res["warm"] = warm.run(started_targets, plan.concurrencies, plan.rounds, plan.seconds, log=log)

        with r.section("memory (environments)"):
            mem = res.setdefault("memory", {})
            by_name = {t.name: t for t in started_targets}
            if "agent" in by_name:
                mem["agent_env"] = memory.environment_memory(by_name["agent"])
            if "rie" in by_name:
                mem["rie_env"] = memory.environment_memory(by_name["rie"])
            if "floor_aiohttp" in by_name:
                mem["floor_aiohttp"] = memory.process_memory(by_name["floor_aiohttp"])
            if gateway is not None:
                envs = [procs.tree_memory(agent) for agent in gateway_environments(gateway.processes[0].pid)]
                if envs:
                    mem["gateway_env"] = {
                        "environments": len(envs),
                        "rss_mb": round(sum(e["rss_bytes"] for e in envs) / len(envs) / memory.MIB, 1),
                        "pss_mb": round(sum(e["pss_bytes"] for e in envs) / len(envs) / memory.MIB, 1),
                    }

        for target in list(started_targets):
            if target is not gateway:
                target.stop()
                started_targets.remove(target)

        with r.section("cold"):
            res["cold"] = cold.run(workdir, plan.cold_trials, binary, log)
        if gateway is not None:
            with r.section("cold (gateway)"):
                res.setdefault("cold", {}).update(gateway_cold(gateway, workdir, cold_names, cold_marks, binary))
            gateway.stop()
            started_targets.remove(gateway)
        with r.section("scale (gateway)"):
            res.setdefault("scale", {}).update(gateway_scale(plan, workdir))
        with r.section("scale (gateway, no fast start)"):
            res.setdefault("scale", {}).update(gateway_scale(plan, workdir, "_no_fast_start", NO_FAST_START))
        with r.section("throttle (account limit)"):
            res.setdefault("scale", {})["throttle_account"] = account_throttle(plan, workdir)
        with r.section("burst (emulator)"):
            needed_mb = plan.burst * 30  # an emulator and awslambdaric, RSS
            if machine.mem_available_mb() < needed_mb * 1.3:
                raise RuntimeError(f"not enough free memory for {plan.burst} emulator processes")
            res.setdefault("scale", {})["rie_burst"] = scale.rie_burst(binary, plan.burst)
            log(f"burst emulator {res['scale']['rie_burst']}")

        with r.section("memory (gateway)"):
            mem = res.setdefault("memory", {})
            one = memory.gateway_rss(workdir, 1)
            many = memory.gateway_rss(workdir, plan.memory_functions)
            mem["gateway_1"] = one
            mem[f"gateway_{plan.memory_functions}"] = many
            mem["gateway_kb_per_function"] = round(
                (many["rss_mb"] - one["rss_mb"]) * 1024 / (plan.memory_functions - 1), 2
            )
            log(f"memory {mem}")

        async_bench = _optional_async_bench()
        if async_bench is not None:
            with r.section("async"):
                res["async"] = async_bench(quick)
    finally:
        for target in started_targets:
            target.stop()
    cpu_after = machine.cpu_snapshot()
    res["meta"]["duration_s"] = round(time.time() - started)
    res["meta"]["loadavg_before"] = load_before
    res["meta"]["loadavg_after"] = machine.loadavg()
    res["meta"]["other_processes_cpu"] = machine.others(cpu_before, cpu_after)
    res["meta"]["load_note"] = (
        f"Load average before/after: {load_before} / {res['meta']['loadavg_after']}; "
        f"busiest other processes during the run: {', '.join(res['meta']['other_processes_cpu']) or 'none'}."
    )
    if r.errors:
        res["errors"] = r.errors
    res["summary"] = summary.build(res)
    shutil.rmtree(workdir, ignore_errors=True)
    return res, r.errors


def gateway_cold(
    gateway: targets.Target, workdir: Path, names: list[str], marks: list[Path], binary: Path
) -> dict[str, Any]:
    """First invocations through the default gateway and through one per other configuration of
    ``cold.GATEWAY_CONFIGS`` (fast start off, no spare), with an emulator trial (``rie_gateway_rounds``)
    in every round, so the gateway's cold starts are compared with the emulator's on the same machine."""
    others = {"rie_gateway_rounds": lambda i: cold.rie_trial(workdir, 1000 + i, binary)}
    started = {"gateway": (gateway, marks)}
    return cold.gateway_run(workdir, names, cold.GATEWAY_CONFIGS, log, started=started, others=others)


def _optional_async_bench() -> Callable[[bool], dict[str, Any]] | None:
    """The async engineer's ``benchmarks/async_bench.py`` ``run(quick) -> dict``, when it exists."""
    try:
        module = importlib.import_module("benchmarks.async_bench")
    except ModuleNotFoundError:
        return None
    func = getattr(module, "run", None)
    return func if callable(func) else None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (under 2 minutes)")
    parser.add_argument("--out", type=Path, help="results file (default results/latest.json, quick.json)")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or RESULTS / ("quick.json" if args.quick else "latest.json")
    results, errors = run(plan, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    png = out.with_suffix(".png")
    chart.draw(results, png)
    log(f"wrote {out} and {png}")
    if not args.quick and not args.no_readme:
        report.update_readme(HERE / "README.md", results)
        log("updated benchmarks/README.md")
    print(report.render(results))
    print(report.headline(results))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
