"""Cold start through the real control plane: the first invocation of a function at zero replicas.

``python -m benchmarks.k8s_cold_start [--trials 20]`` starts the local test cluster if it is not running
(``tests/cluster/tools/cluster.py up``), installs the chart with ``helm`` twice into fresh namespaces — one
gateway as installed (it asks a new pod's agent ``GET /readyz`` itself) and one with
``LAMBDALET_KUBE_PROBE_AGENTS=0`` (it waits for the kubelet's readiness probe and the EndpointSlice, the
path before) — applies the ``hello`` example (its code inline, ``idleTimeoutSeconds: 1``) under each and
then runs the trials through the two gateways in turn (who goes first alternates; no pod of either
function is left when a trial starts), so both see about the same load. Per trial it waits
until the function is at zero replicas with no pod left, sends one Invoke request to the gateway (its pod
IP) and splits the time to the answer along the path, from watch events on the benchmark's own clock:

- scale call: request sent → the Deployment shows ``spec.replicas`` 1 (the gateway's scale-from-zero
  decision, its PATCH of the scale subresource, the watch delivering it);
- pod created: → the ReplicaSet's pod exists (Deployment and ReplicaSet controllers);
- scheduled: → the pod has a node (the scheduler's binding);
- process started: → the node reports the container running (on the local cluster: a process);
- agent ready: → the pod's agent answers ``GET /readyz`` 200 (agent and runtime init), as this process
  sees it asking every 10 ms from the moment the pod runs with an address;
- invocation: → the client has the answer (the gateway learns the pod is ready — from its agent, or from
  the readiness probe and the EndpointSlice — forwards, the handler runs).

Each stage includes the delivery of its watch event to this process; the stages add up to the total (an
event that arrives after the answer ends at the answer). The benchmark also records when the
EndpointSlice listed the pod ready and reports in how many trials that came after the answer, and how
much later. Prints a Markdown table (median and p95 per stage and gateway) and the ratio of the median
totals; ``--json PATH`` also writes the samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from lambdalet_gateway.kube.api import DEPLOYMENTS, ENDPOINT_SLICES, PODS, KubeApi, KubeError
from lambdalet_gateway.kube.backend import PROBE_AGENTS_VARIABLE

from benchmarks import stats

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
CHART = ROOT / "charts" / "lambdalet"
FUNCTION = "hello"
STAGES = ("scale call", "pod created", "scheduled", "process started", "agent ready", "invocation")
#: Not a stage of the path: when the EndpointSlice listed the pod ready (the kubelet's readiness probe).
ENDPOINT_READY = "endpoint ready"
AGENT_POLL_S = 0.01

Obj = dict[str, Any]


@dataclass
class Trial:
    sent: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    pod: str | None = None
    asking: bool = False  # this process asks the pod's agent for readiness

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.monotonic())

    def stages(self) -> dict[str, float]:
        """Milliseconds per stage; a stage seen before the previous one counts as zero, and an event
        delivered after the answer as ending with the answer."""
        out: dict[str, float] = {}
        previous = self.sent
        end = self.marks["invocation"]
        for stage in STAGES:
            at = min(max(self.marks[stage], previous), end)
            out[stage] = (at - previous) * 1000
            previous = at
        out["total"] = (previous - self.sent) * 1000
        if ENDPOINT_READY in self.marks:
            # Positive: the EndpointSlice listed the pod ready this long after the client had the answer.
            out["endpoint ready after the answer"] = (self.marks[ENDPOINT_READY] - end) * 1000
        return out


class Observer:
    """The function's Deployment, pods and EndpointSlices, by watch; marks the running trial's stages."""

    def __init__(self, api: KubeApi, namespace: str, session: aiohttp.ClientSession) -> None:
        self.api = api
        self.namespace = namespace
        self.session = session
        self.replicas = 0
        self.pods: set[str] = set()
        self.trial: Trial | None = None
        self.changed = asyncio.Event()
        self.polls: set[asyncio.Task[None]] = set()

    async def run(self, kind: tuple[str, str], selector: str, handle: Callable[[str, Obj], None]) -> None:
        items, version = await self.api.list(kind, self.namespace, selector)
        for item in items:
            handle("ADDED", item)
        while True:
            try:
                async for event in self.api.watch(kind, self.namespace, version, selector):
                    obj = event.get("object") or {}
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if event.get("type") != "BOOKMARK":
                        handle(str(event.get("type")), obj)
                        self.changed.set()
            except KubeError:
                items, version = await self.api.list(kind, self.namespace, selector)
                for item in items:
                    handle("ADDED", item)

    def idle(self) -> bool:
        """The function is at zero replicas with no pod left."""
        return self.replicas == 0 and not self.pods

    def deployment(self, kind: str, obj: Obj) -> None:
        if obj["metadata"]["name"] != FUNCTION:
            return
        self.replicas = 0 if kind == "DELETED" else int(obj["spec"].get("replicas") or 0)
        if self.trial is not None and self.replicas >= 1:
            self.trial.mark("scale call")

    def pod(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.pods.discard(name)
            return
        self.pods.add(name)
        trial = self.trial
        if trial is None or obj["metadata"].get("deletionTimestamp"):
            return
        if trial.pod is None:
            trial.pod = name
        if name != trial.pod:
            return
        trial.mark("pod created")
        if obj["spec"].get("nodeName"):
            trial.mark("scheduled")
        statuses = (obj.get("status") or {}).get("containerStatuses") or []
        if any("running" in (s.get("state") or {}) for s in statuses):
            trial.mark("process started")
            address = (obj.get("status") or {}).get("podIP")
            if address and not trial.asking:
                trial.asking = True
                poll = asyncio.create_task(self.agent_ready(trial, f"http://{address}:8080/readyz"))
                self.polls.add(poll)
                poll.add_done_callback(self.polls.discard)

    async def agent_ready(self, trial: Trial, url: str) -> None:
        """Ask the trial pod's agent until it answers 200 (the gateway asks it the same way)."""
        timeout = aiohttp.ClientTimeout(total=1)
        while self.trial is trial and "agent ready" not in trial.marks:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(url, timeout=timeout) as response:
                    if response.status == 200:
                        trial.mark("agent ready")
                        self.changed.set()
                        return
            await asyncio.sleep(AGENT_POLL_S)

    def endpoint_slice(self, kind: str, obj: Obj) -> None:
        trial = self.trial
        if trial is None or trial.pod is None or kind == "DELETED":
            return
        for entry in obj.get("endpoints") or []:
            ready = (entry.get("conditions") or {}).get("ready")
            if (entry.get("targetRef") or {}).get("name") == trial.pod and ready:
                trial.mark(ENDPOINT_READY)

    async def until(self, check: Callable[[], bool], limit_s: float, what: str) -> None:
        deadline = time.monotonic() + limit_s
        while not check():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit(f"timed out after {limit_s:.0f} s waiting for {what}")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue


def run(*argv: str, timeout: float = 300) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(VENV_BIN / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def hello_function() -> Obj:
    document: Obj = yaml.safe_load((ROOT / "examples" / "hello" / "function.yaml").read_text())
    document["spec"]["code"] = {"inline": {"files": {"app.py": (ROOT / "examples" / "hello" / "app.py").read_text()}}}
    document["spec"]["idleTimeoutSeconds"] = 1
    return document


def complete(trial: Trial) -> Callable[[], bool]:
    return lambda: all(stage in trial.marks for stage in STAGES)


def endpoint_seen(trial: Trial) -> Callable[[], bool]:
    return lambda: ENDPOINT_READY in trial.marks


async def wait_for_gateway(kubeconfig: Path, namespace: str) -> str:
    """The Invoke URL of the ready gateway pod (its pod IP and the Service's port)."""
    selector = "app.kubernetes.io/component=gateway"
    service = json.loads(kubectl(kubeconfig, "get", "svc", "-n", namespace, "-l", selector, "-o", "json"))["items"][0]
    for _ in range(600):
        pods = json.loads(kubectl(kubeconfig, "get", "pods", "-n", namespace, "-l", selector, "-o", "json"))["items"]
        for pod in pods:
            statuses = pod["status"].get("containerStatuses") or []
            if statuses and all(s["ready"] for s in statuses):
                base = f"http://{pod['status']['podIP']}:{service['spec']['ports'][0]['port']}"
                return f"{base}/2015-03-31/functions/{FUNCTION}/invocations"
        await asyncio.sleep(0.5)
    raise SystemExit("the gateway pod never became ready")


@dataclass
class Gateway:
    """One installed release: its gateway either asks new pods' agents (the default) or waits for the
    EndpointSlice (``LAMBDALET_KUBE_PROBE_AGENTS=0``), each serving its own ``hello``."""

    label: str
    probe_agents: bool
    suffix: str
    url: str = ""
    observer: Observer | None = None

    @property
    def system(self) -> str:
        return f"bench-system-{self.suffix}"

    @property
    def functions(self) -> str:
        return f"bench-fn-{self.suffix}"

    @property
    def release(self) -> str:
        return f"b{self.suffix}"


async def warm_up(session: aiohttp.ClientSession, gateway: Gateway) -> None:
    """The gateway learns of the Function by its watch: the first answer (not timed) says it knows it."""
    observer = gateway.observer
    assert observer is not None
    await observer.until(observer.idle, 120, "zero replicas")
    for _ in range(600):
        with contextlib.suppress(aiohttp.ClientError):
            async with session.post(gateway.url, data=b"{}") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise SystemExit(f"the gateway {gateway.label!r} never served {FUNCTION}")


async def one_trial(kubeconfig: Path, session: aiohttp.ClientSession, gateway: Gateway) -> dict[str, float] | None:
    """One cold invocation from zero replicas, split in stages (None: the gateway went away; repeat)."""
    observer = gateway.observer
    assert observer is not None
    await observer.until(observer.idle, 120, "zero replicas")
    trial = Trial()
    observer.trial = trial
    trial.sent = time.monotonic()
    try:
        async with session.post(gateway.url, data=b'{"name": "bench"}') as response:
            body = await response.read()
    except aiohttp.ClientError as exc:
        # The test cluster's node stand-in restarts its pods when it is itself restarted.
        print(f"the gateway went away ({exc}); repeating the trial", file=sys.stderr)
        observer.trial = None
        gateway.url = await wait_for_gateway(kubeconfig, gateway.system)
        return None
    trial.marks["invocation"] = time.monotonic()
    # The gateway may answer before this process's watches deliver the last events.
    await observer.until(complete(trial), 10, "the watch events")
    with contextlib.suppress(SystemExit):  # the kubelet's verdict, for the record
        await observer.until(endpoint_seen(trial), 5, "the endpoint")
    observer.trial = None
    if response.status != 200 or json.loads(body) != {"message": "Hello, bench!"}:
        raise SystemExit(f"{gateway.label}: {response.status} {body[:300]!r}")
    return trial.stages()


async def trials(kubeconfig: Path, gateways: list[Gateway], count: int) -> dict[str, list[dict[str, float]]]:
    """``count`` trials through each gateway, interleaved (each round runs under about the same load)."""
    api = await KubeApi.connect({"KUBECONFIG": str(kubeconfig)})
    probes = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    watches: list[asyncio.Task[None]] = []
    for gateway in gateways:
        observer = gateway.observer = Observer(api, gateway.functions, probes)
        watches += [
            asyncio.create_task(observer.run(DEPLOYMENTS, "", observer.deployment)),
            asyncio.create_task(observer.run(PODS, f"lambdalet.dev/function={FUNCTION}", observer.pod)),
            asyncio.create_task(
                observer.run(ENDPOINT_SLICES, f"kubernetes.io/service-name={FUNCTION}", observer.endpoint_slice)
            ),
        ]
        gateway.url = await wait_for_gateway(kubeconfig, gateway.system)
    results: dict[str, list[dict[str, float]]] = {gateway.label: [] for gateway in gateways}
    polls = [gateway.observer.polls for gateway in gateways if gateway.observer is not None]
    try:
        async with aiohttp.ClientSession() as session:
            for gateway in gateways:
                await warm_up(session, gateway)
            for index in range(count):
                # Alternate who goes first; each trial starts with no pod of either function left.
                for gateway in gateways if index % 2 == 0 else gateways[::-1]:
                    for other in gateways:
                        assert other.observer is not None
                        await other.observer.until(other.observer.idle, 120, "zero replicas")
                    while (sample := await one_trial(kubeconfig, session, gateway)) is None:
                        pass
                    results[gateway.label].append(sample)
                    print(f"trial {index + 1}/{count}, {gateway.label}: {sample['total']:.0f} ms", file=sys.stderr)
    finally:
        pending = [*watches, *(task for tasks in polls for task in tasks)]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await probes.close()
        await api.close()
    return results


def table(results: dict[str, list[dict[str, float]]]) -> str:
    labels = list(results)
    header = "| stage | " + " | ".join(f"{label}: median (ms) | p95 (ms)" for label in labels) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(labels)]
    for stage in (*STAGES, "total"):
        cells = []
        for label in labels:
            values = [r[stage] for r in results[label]]
            cells.append(f"{stats.percentile(values, 50):.0f} | {stats.percentile(values, 95):.0f}")
        name = f"**{stage}**" if stage == "total" else stage
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for label in labels:
        later = [r["endpoint ready after the answer"] for r in results[label] if "endpoint ready after the answer" in r]
        if later:
            before = sum(1 for value in later if value > 0)
            lines.append(
                f"- {label}: the EndpointSlice listed the pod ready after the client had the answer in {before} "
                f"of {len(later)} trials (median {stats.percentile(later, 50):.0f} ms after it)."
            )
    if len(labels) == 2:
        first, second = (stats.percentile([r["total"] for r in results[label]], 50) for label in labels)
        lines.append(
            f"- Median total, {labels[0]} / {labels[1]}: {first:.0f} / {second:.0f} ms = {first / second:.2f} x."
        )
    return "\n".join(lines)


def install(gateway: Gateway) -> None:
    for namespace in (gateway.system, gateway.functions):
        kubectl(KUBECONFIG, "create", "namespace", namespace)
    helm = [str(VENV_BIN / "helm"), f"--kubeconfig={KUBECONFIG}"]
    extra = [] if gateway.probe_agents else [
        "--set-json", f'gateway.extraEnv=[{{"name": "{PROBE_AGENTS_VARIABLE}", "value": "0"}}]'
    ]  # fmt: skip
    run(*helm, "install", gateway.release, str(CHART), "--namespace", gateway.system, "--set",
        f"watchNamespaces={{{gateway.functions}}}", *extra, "--wait", "--timeout", "180s")  # fmt: skip
    kubectl(KUBECONFIG, "apply", "-n", gateway.functions, "-f", "-", stdin=yaml.safe_dump(hello_function()))


def uninstall(gateway: Gateway) -> None:
    subprocess.run([str(VENV_BIN / "helm"), f"--kubeconfig={KUBECONFIG}", "uninstall", gateway.release,
                    "-n", gateway.system], capture_output=True, timeout=120, check=False)  # fmt: skip
    for namespace in (gateway.functions, gateway.system):
        subprocess.run([str(VENV_BIN / "kubectl"), f"--kubeconfig={KUBECONFIG}", "delete", "namespace",
                        namespace, "--wait=false"], capture_output=True, timeout=60, check=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.k8s_cold_start", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials through each of the two gateways")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    ns = parser.parse_args(argv)
    run(str(VENV_BIN / "python"), str(ROOT / "tests" / "cluster" / "tools" / "cluster.py"), "up", timeout=3600)
    gateways = [
        Gateway("agent asked", True, uuid.uuid4().hex[:6]),
        Gateway("EndpointSlice only", False, uuid.uuid4().hex[:6]),
    ]
    try:
        for gateway in gateways:
            install(gateway)
        results = asyncio.run(trials(KUBECONFIG, gateways, ns.trials))
    finally:
        for gateway in gateways:
            uninstall(gateway)
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))
    print(f"Cold start through the control plane, {ns.trials} interleaved trials through each gateway "
          "(python -m benchmarks.k8s_cold_start):\n")  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
