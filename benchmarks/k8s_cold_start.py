"""Cold start through the real control plane: the first invocation of a function at zero replicas.

``python -m benchmarks.k8s_cold_start [--trials 20]`` starts the local test cluster if it is not running
(``tests/cluster/tools/cluster.py up``), installs the chart with ``helm`` into fresh namespaces, applies the
``hello`` example (its code inline, ``idleTimeoutSeconds: 1``) and then, per trial, waits until the function
is at zero replicas with no pod left, sends one Invoke request to the gateway (its pod IP) and splits the
time to the answer along the path, from watch events on the benchmark's own clock:

- scale call: request sent → the Deployment shows ``spec.replicas`` 1 (the gateway's scale-from-zero
  decision, its PATCH of the scale subresource, the watch delivering it);
- pod created: → the ReplicaSet's pod exists (Deployment and ReplicaSet controllers);
- scheduled: → the pod has a node (the scheduler's binding);
- process started: → the node reports the container running (on the local cluster: a process);
- endpoint ready: → the EndpointSlice lists the pod ready (agent and runtime init, readiness probe, the
  EndpointSlice controller);
- invocation: → the client has the answer (the gateway sees the endpoint, forwards, the handler runs).

Each stage includes the delivery of its watch event to this process; the stages add up to the total. The
gateway and this process get the EndpointSlice event at about the same time, so the short invocation
stage is at the resolution of watch delivery (an event that arrives after the answer ends at the answer).
Prints a Markdown table (median and p95 per stage); ``--json PATH`` also writes the samples.
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

from benchmarks import stats

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
CHART = ROOT / "charts" / "lambdalet"
FUNCTION = "hello"
STAGES = ("scale call", "pod created", "scheduled", "process started", "endpoint ready", "invocation")

Obj = dict[str, Any]


@dataclass
class Trial:
    sent: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    pod: str | None = None

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
        return out


class Observer:
    """The function's Deployment, pods and EndpointSlices, by watch; marks the running trial's stages."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.replicas = 0
        self.pods: set[str] = set()
        self.trial: Trial | None = None
        self.changed = asyncio.Event()

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

    def endpoint_slice(self, kind: str, obj: Obj) -> None:
        trial = self.trial
        if trial is None or trial.pod is None or kind == "DELETED":
            return
        for entry in obj.get("endpoints") or []:
            ready = (entry.get("conditions") or {}).get("ready")
            if (entry.get("targetRef") or {}).get("name") == trial.pod and ready:
                trial.mark("endpoint ready")

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


async def trials(kubeconfig: Path, system: str, functions: str, count: int) -> list[dict[str, float]]:
    api = await KubeApi.connect({"KUBECONFIG": str(kubeconfig)})
    observer = Observer(api, functions)
    watches = [
        asyncio.create_task(observer.run(DEPLOYMENTS, "", observer.deployment)),
        asyncio.create_task(observer.run(PODS, f"lambdalet.dev/function={FUNCTION}", observer.pod)),
        asyncio.create_task(
            observer.run(ENDPOINT_SLICES, f"kubernetes.io/service-name={FUNCTION}", observer.endpoint_slice)
        ),
    ]
    url = await wait_for_gateway(kubeconfig, system)
    results: list[dict[str, float]] = []
    try:
        async with aiohttp.ClientSession() as session:
            # The gateway learns of the Function by its watch: the first answer (not timed) says it knows it.
            await observer.until(lambda: observer.replicas == 0 and not observer.pods, 120, "zero replicas")
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.post(url, data=b"{}") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise SystemExit(f"the gateway never served {FUNCTION}")
            index = 0
            while index < count:
                await observer.until(lambda: observer.replicas == 0 and not observer.pods, 120, "zero replicas")
                trial = Trial()
                observer.trial = trial
                trial.sent = time.monotonic()
                try:
                    async with session.post(url, data=b'{"name": "bench"}') as response:
                        body = await response.read()
                except aiohttp.ClientError as exc:
                    # The test cluster's node stand-in restarts its pods when it is itself restarted.
                    print(f"the gateway went away ({exc}); repeating the trial", file=sys.stderr)
                    observer.trial = None
                    url = await wait_for_gateway(kubeconfig, system)
                    continue
                trial.marks["invocation"] = time.monotonic()
                # The gateway may answer before this process's watches deliver the last events.
                await observer.until(complete(trial), 10, "the watch events")
                observer.trial = None
                if response.status != 200 or json.loads(body) != {"message": "Hello, bench!"}:
                    raise SystemExit(f"trial {index}: {response.status} {body[:300]!r}")
                results.append(trial.stages())
                index += 1
                print(f"trial {index}/{count}: {results[-1]['total']:.0f} ms", file=sys.stderr)
    finally:
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await api.close()
    return results


def table(results: list[dict[str, float]]) -> str:
    lines = ["| stage | median (ms) | p95 (ms) |", "|---|---:|---:|"]
    for stage in (*STAGES, "total"):
        values = [r[stage] for r in results]
        label = f"**{stage}**" if stage == "total" else stage
        lines.append(f"| {label} | {stats.percentile(values, 50):.0f} | {stats.percentile(values, 95):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.k8s_cold_start", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the samples here")
    ns = parser.parse_args(argv)
    run(str(VENV_BIN / "python"), str(ROOT / "tests" / "cluster" / "tools" / "cluster.py"), "up", timeout=3600)
    suffix = uuid.uuid4().hex[:6]
    system, functions, release = f"bench-system-{suffix}", f"bench-fn-{suffix}", f"b{suffix}"
    kubectl(KUBECONFIG, "create", "namespace", system)
    kubectl(KUBECONFIG, "create", "namespace", functions)
    try:
        helm = [str(VENV_BIN / "helm"), f"--kubeconfig={KUBECONFIG}"]
        run(*helm, "install", release, str(CHART), "--namespace", system, "--set",
            f"watchNamespaces={{{functions}}}", "--wait", "--timeout", "180s")  # fmt: skip
        kubectl(KUBECONFIG, "apply", "-n", functions, "-f", "-", stdin=yaml.safe_dump(hello_function()))
        results = asyncio.run(trials(KUBECONFIG, system, functions, ns.trials))
    finally:
        subprocess.run([str(VENV_BIN / "helm"), f"--kubeconfig={KUBECONFIG}", "uninstall", release, "-n", system],
                       capture_output=True, timeout=120, check=False)  # fmt: skip
        for namespace in (functions, system):
            subprocess.run([str(VENV_BIN / "kubectl"), f"--kubeconfig={KUBECONFIG}", "delete", "namespace",
                            namespace, "--wait=false"], capture_output=True, timeout=60, check=False)  # fmt: skip
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=1))
    print(f"Cold start through the control plane, {len(results)} trials (python -m benchmarks.k8s_cold_start):\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
