"""Starts and stops the local Kubernetes test cluster: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler (Go-built, see build-k8s.sh) and the node stand-in (node.py), all on 127.0.0.1.

    cluster.py up      idempotent: starts what is not running, waits until every component is healthy
    cluster.py down    stops every process it started, pod processes included (state is kept)
    cluster.py reset   down, then delete all state (certificates, etcd data, logs)
    cluster.py status  one line per component

State lives in <repo>/.cluster/ (gitignored): pki/, etcd/, logs/<component>.log, pids/<component>.json,
pods/<namespace>_<pod>/ (the node stand-in's pod directories) and the admin kubeconfig `kubeconfig`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
STATE = Path(os.environ.get("LAMBDALET_CLUSTER_DIR", ROOT / ".cluster"))
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
CACHE = Path(os.environ.get("LAMBDALET_CACHE", Path.home() / ".cache" / "lambdalet"))
BIN = CACHE / "k8s" / K8S_VERSION / "bin"
PYTHON = ROOT / ".venv" / "bin" / "python"
NODE_NAME = "lambdalet-node"
SERVICE_CIDR = "10.0.0.0/24"
# Independent of the port, so tokens stay valid when the cluster restarts on other ports.
ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node")
POD_ADDRESS_LABEL = "lo:lambdalet"  # node.py adds each pod's address to lo with this label
PORT_NAMES = ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ClusterError(Exception):
    """The cluster could not be built, started or stopped; the message says which component and why."""


@dataclass(frozen=True)
class Paths:
    state: Path

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pids(self) -> Path:
        return self.state / "pids"

    @property
    def pods(self) -> Path:
        return self.state / "pods"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def ports(self) -> Path:
        return self.state / "ports.json"

    def component_kubeconfig(self, user: str) -> Path:
        return self.pki / f"{user}.kubeconfig"


# ---------------------------------------------------------------------------------------------- processes


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def recorded_pid(pid_file: Path) -> int | None:
    """The pid recorded in pid_file if that very process (same start time) is still alive."""
    try:
        record = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return None
    pid = int(record["pid"])
    if _start_time(pid) != record["start"]:
        return None
    return pid


def write_pid(pid_file: Path, pid: int) -> None:
    start = _start_time(pid)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    partial = pid_file.with_suffix(".partial")
    partial.write_text(json.dumps({"pid": pid, "start": start}))
    partial.replace(pid_file)


def stop_group(pid_file: Path, grace: float) -> bool:
    """SIGTERM the process group led by the recorded pid, SIGKILL after `grace` seconds. True if one ran."""
    pid = recorded_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _start_time(pid) is not None:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    while _start_time(pid) is not None:
        time.sleep(0.02)
    pid_file.unlink(missing_ok=True)
    return True


def spawn(paths: Paths, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Starts a detached component in its own session (process group); output appended to logs/<name>.log."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    with (paths.logs / f"{name}.log").open("ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=paths.state,
            env=env,
        )
    write_pid(paths.pids / f"{name}.json", proc.pid)
    return proc.pid


def _log_tail(paths: Paths, name: str, lines: int = 25) -> str:
    try:
        text = (paths.logs / f"{name}.log").read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(paths: Paths, name: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pid_file = paths.pids / f"{name}.json"
    while True:
        if check():
            return
        if recorded_pid(pid_file) is None:
            raise ClusterError(f"{name} exited while starting; last log lines:\n{_log_tail(paths, name)}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{name} not healthy after {timeout:.0f} s; last log lines:\n{_log_tail(paths, name)}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- ports


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def choose_ports(paths: Paths, running: set[str]) -> dict[str, int]:
    """Ports from the last run when still free (or held by our own running component), new ones otherwise."""
    try:
        ports: dict[str, int] = json.loads(paths.ports.read_text())
    except (OSError, ValueError):
        ports = {}
    owner = {"etcd-peer": "etcd"}
    for name in PORT_NAMES:
        port = ports.get(name)
        if port is not None and (owner.get(name, name) in running or _port_free(port)):
            continue
        ports[name] = _free_port()
    paths.ports.write_text(json.dumps(ports, indent=1))
    return ports


# ---------------------------------------------------------------------------------------------- pki


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _client_cert(pki: Path, name: str, subject: str) -> None:
    if (pki / f"{name}.crt").exists():
        return
    ext = pki / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "3650", "-extfile", ext.name, "-out", f"{name}.crt", cwd=pki,
    )  # fmt: skip


def make_pki(paths: Paths) -> None:
    """CA, API server serving certificate, client certificates, ServiceAccount signing key (once)."""
    pki = paths.pki
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
        _openssl(
            "req", "-x509", "-new", "-key", "ca.key", "-days", "3650", "-subj", "/CN=lambdalet-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca.crt", cwd=pki,
        )  # fmt: skip
    if not (pki / "apiserver.crt").exists():
        sans = ",".join(
            [
                "IP:127.0.0.1",
                "IP:10.0.0.1",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ]
        )
        (pki / "apiserver.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n"
        )
        _openssl("genrsa", "-out", "apiserver.key", "2048", cwd=pki)
        _openssl(
            "req", "-new", "-key", "apiserver.key", "-subj", "/CN=kube-apiserver", "-out", "apiserver.csr", cwd=pki
        )
        _openssl(
            "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "3650", "-extfile", "apiserver.ext", "-out", "apiserver.crt", cwd=pki,
        )  # fmt: skip
    _client_cert(pki, "admin", "/O=system:masters/CN=lambdalet-admin")
    _client_cert(pki, "kube-controller-manager", "/CN=system:kube-controller-manager")
    _client_cert(pki, "kube-scheduler", "/CN=system:kube-scheduler")
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(target: Path, pki: Path, user: str, server: str) -> None:
    """A kubeconfig with the certificates embedded, so it can be copied anywhere."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "lambdalet-test",
                "cluster": {"server": server, "certificate-authority-data": _b64(pki / "ca.crt")},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(pki / f"{user}.crt"),
                    "client-key-data": _b64(pki / f"{user}.key"),
                },
            }
        ],
        "contexts": [{"name": "lambdalet-test", "context": {"cluster": "lambdalet-test", "user": user}}],
        "current-context": "lambdalet-test",
    }
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(config, indent=1))  # JSON is YAML: kubectl and every client read it
    partial.chmod(0o600)
    partial.replace(target)


# ---------------------------------------------------------------------------------------------- health


def _https_ok(url: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def admin_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return context


def _insecure_context() -> ssl.SSLContext:
    # The controller manager's and scheduler's serving certificates are self-signed on start; /healthz
    # is all we read from them.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _node_ready(api: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/api/v1/nodes/{NODE_NAME}", context=context, timeout=2) as response:
            node = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    for condition in node.get("status", {}).get("conditions", []):
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


# ---------------------------------------------------------------------------------------------- up / down


def ensure_binaries() -> None:
    needed = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    if all(os.access(BIN / b, os.X_OK) for b in needed):
        return
    print(f"building Kubernetes {K8S_VERSION} into {BIN} (first run only)", flush=True)
    result = subprocess.run(["bash", str(ROOT / "tests" / "cluster" / "tools" / "build-k8s.sh")], check=False)
    if result.returncode != 0:
        raise ClusterError(f"build-k8s.sh failed with exit status {result.returncode}")


def up(paths: Paths) -> None:
    started = time.monotonic()
    ensure_binaries()
    for folder in (paths.state, paths.logs, paths.pids, paths.pods):
        folder.mkdir(parents=True, exist_ok=True)
    make_pki(paths)
    running = {c for c in COMPONENTS if recorded_pid(paths.pids / f"{c}.json") is not None}
    ports = choose_ports(paths, running)
    pki = paths.pki
    api = f"https://127.0.0.1:{ports['kube-apiserver']}"
    write_kubeconfig(paths.kubeconfig, pki, "admin", api)
    for user in ("kube-controller-manager", "kube-scheduler"):
        write_kubeconfig(paths.component_kubeconfig(user), pki, user, api)
    admin = admin_context(pki)
    insecure = _insecure_context()

    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    if "etcd" not in running:
        spawn(
            paths,
            "etcd",
            [
                str(BIN / "etcd"),
                "--name=lambdalet",
                f"--data-dir={paths.state / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-cluster=lambdalet=http://127.0.0.1:{ports['etcd-peer']}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
    wait_until(paths, "etcd", lambda: _https_ok(f"{etcd_url}/readyz", admin), 30)

    if "kube-apiserver" not in running:
        spawn(
            paths,
            "kube-apiserver",
            [
                str(BIN / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['kube-apiserver']}",
                f"--cert-dir={pki / 'apiserver-generated'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
    wait_until(paths, "kube-apiserver", lambda: _https_ok(f"{api}/readyz", admin), 90)

    if "kube-controller-manager" not in running:
        kcm_kubeconfig = str(paths.component_kubeconfig("kube-controller-manager"))
        spawn(
            paths,
            "kube-controller-manager",
            [
                str(BIN / "kube-controller-manager"),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-controller-manager']}",
                f"--cert-dir={pki / 'kcm-generated'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--controllers=*",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                "--profiling=false",
                "--v=1",
            ],
        )
    if "kube-scheduler" not in running:
        sched_kubeconfig = str(paths.component_kubeconfig("kube-scheduler"))
        spawn(
            paths,
            "kube-scheduler",
            [
                str(BIN / "kube-scheduler"),
                f"--kubeconfig={sched_kubeconfig}",
                f"--authentication-kubeconfig={sched_kubeconfig}",
                f"--authorization-kubeconfig={sched_kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-scheduler']}",
                f"--cert-dir={pki / 'scheduler-generated'}",
                "--profiling=false",
                "--v=1",
            ],
        )
    if "node" not in running:
        spawn(
            paths,
            "node",
            [
                str(PYTHON),
                str(Path(__file__).with_name("node.py")),
                f"--kubeconfig={paths.kubeconfig}",
                f"--state-dir={paths.state}",
                f"--node-name={NODE_NAME}",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    kcm = f"https://127.0.0.1:{ports['kube-controller-manager']}/healthz"
    wait_until(paths, "kube-controller-manager", lambda: _https_ok(kcm, insecure), 60)
    sched = f"https://127.0.0.1:{ports['kube-scheduler']}/healthz"
    wait_until(paths, "kube-scheduler", lambda: _https_ok(sched, insecure), 60)
    wait_until(paths, "node", lambda: _node_ready(api, admin), 60)
    print(
        f"cluster up in {time.monotonic() - started:.1f} s: {api} (kubectl --kubeconfig {paths.kubeconfig})",
        flush=True,
    )


def stop_pod_processes(paths: Paths) -> int:
    """Kills the process groups of pod containers the node stand-in recorded (stragglers after a crash)."""
    stopped = 0
    for pid_file in paths.pods.glob("*/*.pid.json"):
        if stop_group(pid_file, grace=2):
            stopped += 1
    return stopped


def remove_pod_addresses() -> int:
    """Removes the pod addresses the node stand-in added to lo (label lo:lambdalet) and left behind."""
    if shutil.which("ip") is None:
        return 0
    listing = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", "lo", "label", POD_ADDRESS_LABEL],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    addresses = [line.split()[3] for line in listing.splitlines() if len(line.split()) > 3]
    for address in addresses:
        subprocess.run(["ip", "-4", "addr", "del", address, "dev", "lo"], capture_output=True, check=False)
    return len(addresses)


def down(paths: Paths) -> None:
    stopped = []
    # The node first: it stops its pods' processes on SIGTERM (15 s grace before it is killed).
    for name, grace in (
        ("node", 15.0),
        ("kube-scheduler", 10.0),
        ("kube-controller-manager", 10.0),
        ("kube-apiserver", 15.0),
        ("etcd", 10.0),
    ):
        if stop_group(paths.pids / f"{name}.json", grace):
            stopped.append(name)
    stragglers = stop_pod_processes(paths)
    addresses = remove_pod_addresses()
    print(
        f"stopped: {', '.join(stopped) or 'nothing was running'}; "
        f"leftover pod process groups killed: {stragglers}, pod addresses removed: {addresses}"
    )


def status(paths: Paths) -> int:
    down_count = 0
    for name in COMPONENTS:
        pid = recorded_pid(paths.pids / f"{name}.json")
        print(f"{name:24} {'running, pid ' + str(pid) if pid else 'stopped'}")
        down_count += pid is None
    return 1 if down_count else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "reset", "status"])
    args = parser.parse_args(argv)
    paths = Paths(STATE)
    paths.state.mkdir(parents=True, exist_ok=True)
    # Several test sessions may bring the cluster up at once: one at a time.
    with (paths.state / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return run(args.command, paths)


def run(command: str, paths: Paths) -> int:
    try:
        if command == "up":
            up(paths)
        elif command == "down":
            down(paths)
        elif command == "reset":
            down(paths)
            shutil.rmtree(paths.state, ignore_errors=True)
            print(f"removed {paths.state}")
        else:
            return status(paths)
    except ClusterError as error:
        print(f"cluster {command} failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
