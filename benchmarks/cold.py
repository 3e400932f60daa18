"""Cold starts: the first invocation of an environment that did not exist, repeated over fresh processes.

A trial spawns the environment (our agent, or AWS's emulator), waits until it accepts connections, sends
one invocation on a new connection and waits for the answer; the no-op function appends the times its
module import began and ended (``BENCH_MARKS``). The trial is split along its critical path:

- spawn: process start until the environment accepts connections;
- runtime init: until the handler's module begins importing (interpreter, runtime client, Runtime API);
- handler import: the module's own import;
- first response: until the client has the answer.

A phase that overlapped the previous one counts only for its part after it, so phases add up to the total.
Through the gateway (``lambdalet up``) a trial is the first invocation of a function with zero environments;
spawn and runtime init are then one phase (the gateway starts the environment). The gateway runs in each
configuration of ``GATEWAY_CONFIGS`` (the default: agents forked from the zygote, a spare forked ahead; fast
start off; no spare), one trial of each in turn.

``python -m benchmarks.cold [--quick] [--trials N]`` runs only this scenario: the emulator, the agent and
every gateway configuration, interleaved trial by trial in the same run, with the load average before and
after (``make bench`` runs it as part of the whole).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import machine, procs, stats, targets

Log = Callable[[str], None]
PHASES = ("spawn", "runtime_init", "handler_import", "first_response")


def phases(t0: int, listening: int | None, import_start: int, import_end: int, response: int) -> dict[str, float]:
    """Critical-path phases in ms from nanosecond milestones (pure); ``listening`` None merges spawn into init."""
    m1 = t0 if listening is None else max(t0, listening)
    m2 = max(m1, import_start)
    m3 = max(m2, import_end)
    m4 = max(m3, response)
    out = {
        "spawn": (m1 - t0) / 1e6,
        "runtime_init": (m2 - m1) / 1e6,
        "handler_import": (m3 - m2) / 1e6,
        "first_response": (m4 - m3) / 1e6,
        "total": (response - t0) / 1e6,
    }
    if listening is None:
        out["spawn_and_runtime_init"] = out.pop("spawn") + out.pop("runtime_init")
    return out


def read_marks(path: Path) -> tuple[int, int]:
    """The (import start, import end) the function module appended to its marks file."""
    for line in path.read_text().splitlines():
        kind, start, end = line.split()
        if kind == "import":
            return int(start), int(end)
    raise ValueError(f"no import mark in {path}")


def post(address: targets.Address, path: str = "/2015-03-31/functions/function/invocations") -> dict[str, str]:
    """One invocation on a new connection; returns the response headers (lower-case names) plus ``status``."""
    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        conn.request("POST", path, body=targets.EVENT, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        headers["status"] = str(response.status)
        return headers
    finally:
        conn.close()


def agent_trial(workdir: Path, index: int) -> dict[str, float]:
    marks = workdir / f"cold-agent-{index}.marks"
    port_file = workdir / f"cold-agent-{index}.port"
    argv = targets.agent_argv(port_file, {"BENCH_MARKS": str(marks)})
    t0 = time.time_ns()
    proc = procs.spawn(argv, cwd=targets.FUNCTION_DIR, log=workdir / f"cold-agent-{index}.log")
    try:
        port = procs.wait_port_file(port_file, proc)
        listening = time.time_ns()
        headers = post(("127.0.0.1", port))
        done = time.time_ns()
    finally:
        procs.kill_now(proc)
    if headers["status"] != "200":
        raise RuntimeError(f"cold agent trial answered {headers['status']}")
    start, end = read_marks(marks)
    out = phases(t0, listening, start, end, done)
    if "x-lambdalet-init-duration-ms" in headers:
        out["reported_init_ms"] = float(headers["x-lambdalet-init-duration-ms"])
    return out


def rie_trial(workdir: Path, index: int, binary: Path) -> dict[str, float]:
    marks = workdir / f"cold-rie-{index}.marks"
    port, api_port = procs.free_port(), procs.free_port()
    env = targets.rie_env({"BENCH_MARKS": str(marks)})
    t0 = time.time_ns()
    proc = procs.spawn(targets.rie_argv(binary, port, api_port), env=env, cwd=targets.FUNCTION_DIR)
    try:
        procs.wait_connectable("127.0.0.1", port, proc)
        listening = time.time_ns()
        headers = post(("127.0.0.1", port))
        done = time.time_ns()
    finally:
        procs.kill_now(proc)
    if headers["status"] != "200":
        raise RuntimeError(f"cold emulator trial answered {headers['status']}")
    start, end = read_marks(marks)
    return phases(t0, listening, start, end, done)


def summarize_trials(trials: Sequence[dict[str, float]]) -> dict[str, Any]:
    """p50/p99 (and n) of every phase over the trials (pure)."""
    keys = sorted({k for trial in trials for k in trial})
    out: dict[str, Any] = {"trials": len(trials)}
    for key in keys:
        values = [trial[key] for trial in trials if key in trial]
        summary = stats.summarize(values)
        out[key] = {"p50": round(summary["p50"], 2), "p99": round(summary["p99"], 2), "mean": round(summary["mean"], 2)}
    return out


def run(workdir: Path, trials: int, binary: Path, log: Log) -> dict[str, Any]:
    """Agent and emulator trials, alternating, so both see the same machine."""
    agent: list[dict[str, float]] = []
    rie: list[dict[str, float]] = []
    for i in range(trials):
        agent.append(agent_trial(workdir, i))
        rie.append(rie_trial(workdir, i, binary))
    a, r = summarize_trials(agent), summarize_trials(rie)
    log(f"cold agent    p50 {a['total']['p50']:7.1f} ms p99 {a['total']['p99']:7.1f} ms ({trials} trials)")
    log(f"cold emulator p50 {r['total']['p50']:7.1f} ms p99 {r['total']['p99']:7.1f} ms ({trials} trials)")
    return {"agent": a, "rie": r}


def gateway_trials(address: targets.Address, names: Sequence[str], marks: Sequence[Path]) -> list[dict[str, float]]:
    """First invocation of each function (zero environments) through a running gateway."""
    out = []
    for name, mark in zip(names, marks, strict=True):
        t0 = time.time_ns()
        headers = post(address, f"/2015-03-31/functions/{name}/invocations")
        done = time.time_ns()
        if headers["status"] != "200":
            raise RuntimeError(f"cold gateway trial {name} answered {headers['status']}")
        start, end = read_marks(mark)
        trial = phases(t0, None, start, end, done)
        if "x-lambdalet-init-duration-ms" in headers:
            trial["reported_init_ms"] = float(headers["x-lambdalet-init-duration-ms"])
        out.append(trial)
    return out


#: The gateway's configurations compared (extra environment of ``lambdalet up``); "gateway" is the default.
GATEWAY_CONFIGS: dict[str, dict[str, str]] = {
    "gateway": {},
    "gateway_no_fast_start": {"LAMBDALET_FAST_START": "0"},
    "gateway_no_spare": {"LAMBDALET_STANDBY_AGENTS": "0"},
}
#: Between two trials of one gateway: a spare handed out is replaced 0.1 s later (standby.REFILL_DELAY_S).
SETTLE_S = 0.25


def gateway_run(
    workdir: Path,
    names: Sequence[str],
    configs: dict[str, dict[str, str]],
    log: Log,
    *,
    started: dict[str, tuple[targets.Target, list[Path]]] | None = None,
    others: dict[str, Callable[[int], dict[str, float]]] | None = None,
) -> dict[str, Any]:
    """First invocations of ``names`` through one gateway per configuration, a trial of each in turn.

    ``started`` holds gateways already running (with the marks files of their functions); the others are
    started here, with one function per name, and stopped at the end. ``others`` are trials of other
    targets (index -> phases) run in the same rounds, so every target sees the same machine.
    """
    gateways = dict(started or {})
    own = []
    try:
        for key, env in configs.items():
            if key in gateways:
                continue
            marks = [workdir / f"cold-{key}-{i:02d}.marks" for i in range(len(names))]
            docs = [targets.manifest(n, env={"BENCH_MARKS": str(m)}) for n, m in zip(names, marks, strict=True)]
            gateways[key] = (targets.start_gateway(workdir, docs, tag=key, extra_env=env), marks)
            own.append(gateways[key][0])
        time.sleep(2)  # the zygotes' imports
        trials: dict[str, list[dict[str, float]]] = {key: [] for key in [*(others or {}), *gateways]}
        for i, name in enumerate(names):
            for key, trial in (others or {}).items():
                trials[key].append(trial(i))
            for key, (target, marks) in gateways.items():
                trials[key] += gateway_trials(target.addresses[0], [name], [marks[i]])
                time.sleep(SETTLE_S)
    finally:
        for target in own:
            target.stop()
    out = {key: summarize_trials(values) for key, values in trials.items()}
    for key, value in out.items():
        log(f"cold {key:<22} p50 {value['total']['p50']:7.1f} ms p99 {value['total']['p99']:7.1f} ms")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 trials of each (default 30)")
    parser.add_argument("--trials", type=int, help="trials of each")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    trials = args.trials or (12 if args.quick else 30)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    workdir = targets.workdir()
    load_before = machine.loadavg()
    try:
        binary = targets.rie_binary()
        names = [f"cold-{i:02d}" for i in range(trials)]
        others: dict[str, Callable[[int], dict[str, float]]] = {
            "rie": lambda i: rie_trial(workdir, i, binary),
            "agent": lambda i: agent_trial(workdir, i),
        }
        results: dict[str, Any] = gateway_run(workdir, names, GATEWAY_CONFIGS, log, others=others)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["meta"] = {
        "command": "python -m benchmarks.cold" + (" --quick" if args.quick else ""),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine.describe(),
        "commit": machine.git_commit(procs.REPO),
        "loadavg_before": load_before,
        "loadavg_after": machine.loadavg(),
    }
    rie = results["rie"]["total"]["p50"]
    for key in ("rie", "agent", *GATEWAY_CONFIGS):
        data = results[key]
        p50 = data["total"]["p50"]
        shown = [phase for phase in (*PHASES, "spawn_and_runtime_init") if phase in data]
        split = ", ".join(f"{phase} {data[phase]['p50']:.1f}" for phase in shown)
        print(f"{key:<22} p50 {p50:7.1f} ms {p50 / rie:5.2f}x the emulator, p99 {data['total']['p99']:.1f} ({split})")
    print(f"load average before/after: {load_before} / {results['meta']['loadavg_after']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
