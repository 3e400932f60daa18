"""The test cluster as tests see it: a kubeconfig, a kubectl runner, fresh namespaces, and ways to reach
pods. The `cluster` and `namespace` fixtures (tests/cluster/conftest.py) hand these out.

Which cluster:
- default (`LAMBDALET_TEST_CLUSTER` unset or `local`): the local cluster of tests/cluster/tools/cluster.py,
  started (and built, on a fresh machine) if it is not running; it stays up afterwards (`make cluster-down`).
- `LAMBDALET_TEST_CLUSTER=existing`: whatever cluster `KUBECONFIG` names (kind, k3s, a cloud cluster);
  nothing is started. Test images must then be pullable there (see tests/cluster/tools/images/).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_PY = ROOT / "tests" / "cluster" / "tools" / "cluster.py"
LOCAL_STATE = ROOT / ".cluster"
VENV_BIN = ROOT / ".venv" / "bin"
NODE_NAME = "lambdalet-node"
# The test image the node stand-in maps to tests/cluster/tools/images/http_echo.py.
HTTP_ECHO = "lambdalet.test/http-echo:latest"

T = TypeVar("T")


class ClusterUnavailable(Exception):
    """The test cluster could not be started or reached; the message says why."""


@dataclass(frozen=True)
class HttpResult:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    # True for the local cluster: pod IPs are reachable from the test process and pod processes are
    # local (their output is in pods_dir/<namespace>_<pod>/<container>.log).
    local: bool

    @property
    def pods_dir(self) -> Path:
        return LOCAL_STATE / "pods"

    @property
    def kubectl_path(self) -> str:
        local = VENV_BIN / "kubectl"
        return str(local) if local.exists() else "kubectl"

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl against this cluster; raises AssertionError with stderr when check and it fails."""
        result = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get(self, *args: str) -> Any:
        """`kubectl get ... -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifests: str | list[dict[str, Any]], namespace: str) -> None:
        text = manifests if isinstance(manifests, str) else yaml.safe_dump_all(manifests)
        self.kubectl("apply", "-n", namespace, "-f", "-", input=text)

    def create_namespace(self, prefix: str = "t") -> str:
        """A new namespace with a unique name (prefix + random suffix)."""
        clean = re.sub(r"[^a-z0-9-]", "-", prefix.lower()).strip("-")[:40] or "t"
        name = f"{clean}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        return name

    def delete_namespace(self, name: str) -> None:
        """Deletes without waiting: the namespace controller removes its contents, the node stops its pods."""
        self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")

    def server(self) -> tuple[str, str]:
        """(API server URL, CA bundle PEM) of the current context."""
        config = json.loads(self.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
        cluster = config["clusters"][0]["cluster"]
        if "certificate-authority-data" in cluster:
            ca = base64.b64decode(cluster["certificate-authority-data"]).decode()
        else:
            ca = Path(cluster["certificate-authority"]).read_text()
        return str(cluster["server"]), ca

    @contextlib.contextmanager
    def pod_address(self, namespace: str, pod: str, port: int) -> Iterator[tuple[str, int]]:
        """Where the test process reaches a pod's port: the pod IP itself on the local cluster, a
        `kubectl port-forward` on an existing one."""
        if self.local:
            ip = self.get("pod", "-n", namespace, pod)["status"]["podIP"]
            yield ip, port
            return
        process = subprocess.Popen(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", "port-forward", "-n", namespace,
             f"pod/{pod}", f":{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not match:
                raise AssertionError(f"kubectl port-forward: {line}{process.stderr.read() if process.stderr else ''}")
            yield "127.0.0.1", int(match.group(1))
        finally:
            process.terminate()
            process.wait(timeout=10)

    def pod_http(
        self, namespace: str, pod: str, port: int, path: str = "/", *, method: str = "GET", timeout: float = 10
    ) -> HttpResult:
        with self.pod_address(namespace, pod, port) as (host, real_port):
            return http(method, f"http://{host}:{real_port}{path}", timeout=timeout)

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        if self.local:
            path = self.pods_dir / f"{namespace}_{pod}" / f"{container}.log"
            return path.read_text(errors="replace") if path.exists() else ""
        return self.kubectl("logs", "-n", namespace, pod, "-c", container, check=False).stdout


def http(method: str, url: str, timeout: float = 10, headers: Mapping[str, str] | None = None) -> HttpResult:
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResult(response.status, response.read())
    except urllib.error.HTTPError as error:
        return HttpResult(error.code, error.read())


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Polls `check` until it returns something other than None/False; fails naming `what` and the last
    value seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except AssertionError as error:  # e.g. kubectl failing while an object is being created
            value, last = None, error
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last}")
        time.sleep(interval)


def start_cluster(environ: Mapping[str, str]) -> Cluster:
    """The cluster the tests run against, started if it is the local one. Raises ClusterUnavailable."""
    mode = environ.get("LAMBDALET_TEST_CLUSTER", "local")
    if mode == "existing":
        kubeconfig = environ.get("KUBECONFIG", "")
        if not kubeconfig or ":" in kubeconfig or not Path(kubeconfig).is_file():
            raise ClusterUnavailable(
                f"LAMBDALET_TEST_CLUSTER=existing needs KUBECONFIG set to one kubeconfig file (got {kubeconfig!r})"
            )
        cluster = Cluster(Path(kubeconfig), local=False)
    elif mode == "local":
        result = subprocess.run(
            [str(VENV_BIN / "python"), str(CLUSTER_PY), "up"],
            capture_output=True,
            text=True,
            timeout=3600,  # a fresh machine builds Kubernetes first
            check=False,
        )
        if result.returncode != 0:
            raise ClusterUnavailable(f"cluster.py up failed:\n{result.stdout}\n{result.stderr}")
        cluster = Cluster(LOCAL_STATE / "kubeconfig", local=True)
    else:
        raise ClusterUnavailable(f"LAMBDALET_TEST_CLUSTER must be 'local' or 'existing', not {mode!r}")
    ready = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=30)
    if ready.returncode != 0:
        raise ClusterUnavailable(f"the API server at {cluster.kubeconfig} is not ready:\n{ready.stderr}")
    return cluster
