"""The node stand-in: plays the kubelet's part for one Node of the local test cluster, running each pod's
containers as local processes. Test infrastructure only; on a real cluster the kubelet does all of this.

What it does:
- registers the Node (Ready, capacity from this machine) and renews its Lease in kube-node-lease;
- watches the pods bound to it (list + watch, reconnects, relists on 410 Gone);
- gives each pod its own address, 10.244.x.y added as a /32 on the loopback interface (127.0.0.0/8 would
  be simpler, but the API server refuses loopback addresses in EndpointSlices); every container gets
  LAMBDALET_BIND_ADDRESS=<pod IP>;
- materialises volumes as directories (emptyDir, configMap, secret, downwardAPI, projected with a real
  ServiceAccount token from the TokenRequest API, hostPath) and runs each container in its own mount and
  UTS namespace (`unshare`), with the volumes bind-mounted at their mountPaths, so in-cluster clients find
  /var/run/secrets/kubernetes.io/serviceaccount where they expect it and the hostname is the pod's;
- maps images to local commands through IMAGES; an unknown image leaves the container waiting with
  reason ErrImagePull;
- runs readiness, liveness and startup probes (httpGet, tcpSocket, exec), restarts per restartPolicy with
  back-off, and reports phase, IPs, conditions and container states on pods/status;
- on deletion: a container's preStop `sleep` hook (the only lifecycle hook emulated) keeps it running, and
  probed, for that long within the grace period; then SIGTERM to each container's process group, SIGKILL
  after the rest of the grace period, then removes the pod object (grace 0).

Container output goes to <state>/pods/<namespace>_<pod>/<container>.log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import decimal
import functools
import ipaddress
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import yaml

Json = dict[str, Any]

ROOT = Path(__file__).resolve().parents[3]
TOOLS = Path(__file__).resolve().parent
VENV_BIN = ROOT / ".venv" / "bin"
KUBELET_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
POD_NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
LOOPBACK_POOL = ipaddress.IPv4Network("127.10.0.0/16")
ADDRESS_LABEL = "lo:lambdalet"
HOST_IP = "127.0.0.1"
LEASE_SECONDS = 40
BACKOFF_MAX = 30.0

log = logging.getLogger("lambdalet.node")


# ---------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Image:
    """What a container image means here: its ENTRYPOINT, CMD, environment and working directory."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    # (path in this checkout, path in the image): bind-mounted read-only into the container.
    files: tuple[tuple[Path, str], ...] = ()


IMAGE_PATH = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIMES = (
    "python3.11", "python3.12", "python3.13", "nodejs20.x", "nodejs22.x", "java17", "java21",
    "ruby3.2", "ruby3.3", "ruby3.4", "provided.al2023", "provided.al2",
)  # fmt: skip
_RUNTIMES_IN_IMAGE = "/opt/lambdalet/runtime-images"
_AGENT_ENV = (
    ("LAMBDALET_BIND_ADDRESS", "0.0.0.0"),
    ("LAMBDALET_AGENT_PORT", "8080"),
    ("LAMBDALET_RUNTIMES_DIR", _RUNTIMES_IN_IMAGE),
    ("PYTHONUNBUFFERED", "1"),
)
_AGENT_FILES = ((ROOT / "runtime-images", _RUNTIMES_IN_IMAGE),)
_PY_ENV = (("PYTHONUNBUFFERED", "1"),)

# The one table from image repository (tag and digest ignored: the local checkout is the image) to what
# runs. Entrypoints agree with the Dockerfiles (see the shared contract).
IMAGES: dict[str, Image] = {
    "ghcr.io/lambdalet/agent": Image(("lambdalet", "agent"), env=_AGENT_ENV, files=_AGENT_FILES),
    **{
        f"ghcr.io/lambdalet/{runtime}": Image(
            ("lambdalet", "agent"), env=(*_AGENT_ENV, ("LAMBDALET_RUNTIME", runtime)), files=_AGENT_FILES
        )
        for runtime in RUNTIMES
    },
    "ghcr.io/lambdalet/gateway": Image(("python", "-m", "lambdalet_gateway"), env=_PY_ENV),
    "ghcr.io/lambdalet/operator": Image(
        ("kopf", "run", "--standalone", "-m", "lambdalet_operator.handlers"), env=_PY_ENV
    ),
    # Test images for the cluster tests (tests/cluster/tools/images/, with a Dockerfile for real clusters).
    "lambdalet.test/http-echo": Image(("python", str(TOOLS / "images" / "http_echo.py")), env=_PY_ENV),
    # As AWS's Python base image with AWS_LAMBDA_RUNTIME_API set: its Runtime Interface Client, CMD = handler.
    "lambdalet.test/python-ric": Image(
        ("python", "-m", "awslambdaric"),
        cmd=("app.handler",),
        env=(*_PY_ENV, ("LAMBDA_TASK_ROOT", "/var/task")),
        workdir="/var/task",
        files=((TOOLS / "images" / "python-ric", "/var/task"),),
    ),
    # The chart's NATS JetStream broker (nats.enabled): Debian's nats-server (`make apt-deps`); the official
    # image's entrypoint runs nats-server with the container's args.
    **{name: Image(("nats-server",)) for name in ("nats", "docker.io/library/nats")},
}


def image_repository(reference: str) -> str:
    """`ghcr.io/lambdalet/agent:0.1.0@sha256:...` -> `ghcr.io/lambdalet/agent`."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return name


def resolve_image(reference: str) -> Image | None:
    return IMAGES.get(image_repository(reference))


# ---------------------------------------------------------------------------------------------- helpers


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_SUFFIXES: dict[str, decimal.Decimal | int] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": decimal.Decimal("1e-9"), "u": decimal.Decimal("1e-6"), "m": decimal.Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip


def parse_quantity(text: str) -> decimal.Decimal:
    """A Kubernetes resource quantity ("500m", "128Mi", "1e3") as a number."""
    match = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+|[a-zA-Z]*)", text.strip())
    if not match:
        raise ValueError(f"not a quantity: {text!r}")
    number, suffix = match.groups()
    if suffix[:1] in ("e", "E"):
        return decimal.Decimal(number + suffix)
    if suffix and suffix not in _SUFFIXES:
        raise ValueError(f"unknown quantity suffix in {text!r}")
    return decimal.Decimal(number) * decimal.Decimal(_SUFFIXES.get(suffix, 1))


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, `$$` is a literal `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


class ConfigError(Exception):
    """A pod's configuration cannot be resolved yet (missing ConfigMap, Secret, key, ...)."""


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


# ---------------------------------------------------------------------------------------------- API


class Api:
    """The one place that talks to the API server (aiohttp, client certificate from a kubeconfig)."""

    def __init__(self, server: str, context: ssl.SSLContext) -> None:
        self.server = server.rstrip("/")
        self._context = context
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: Path, scratch: Path) -> Api:
        config = yaml.safe_load(path.read_text())
        context_name = config["current-context"]
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])

        def material(entry: Json, key: str) -> str:
            if f"{key}-data" in entry:
                target = scratch / key
                target.write_bytes(base64.b64decode(entry[f"{key}-data"]))
                return str(target)
            return str(entry[key])

        context = ssl.create_default_context(cafile=material(cluster, "certificate-authority"))
        context.load_cert_chain(material(user, "client-certificate"), material(user, "client-key"))
        return cls(cluster["server"], context)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._context, limit=50))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Json | None = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Json:
        data = None if body is None else json.dumps(body)
        async with self.session.request(
            method,
            self.server + path,
            data=data,
            params=params,
            headers={"Content-Type": content_type, "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise ApiError(response.status, text)
            result: Json = json.loads(text) if text else {}
            return result

    async def get(self, path: str, params: dict[str, str] | None = None) -> Json:
        return await self.request("GET", path, params=params)

    async def get_optional(self, path: str) -> Json | None:
        try:
            return await self.get(path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def merge_patch(self, path: str, body: Json) -> Json:
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def watch(self, path: str, params: dict[str, str]) -> AsyncIterator[Json]:
        query = {**params, "watch": "true"}
        async with self.session.get(
            self.server + path,
            params=query,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        ) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text())
            # One JSON event per line; read in chunks so no line-length limit applies to large objects.
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        event: Json = json.loads(line)
                        yield event


async def follow(
    api: Api,
    path: str,
    selector: dict[str, str],
    on_list: Callable[[list[Json]], None],
    on_event: Callable[[str, Json], None],
    *,
    retry_delay: float = 1.0,
) -> NoReturn:
    """List, then watch from the list's resourceVersion, forever: reconnects from the last version seen
    (bookmarks keep it fresh) and lists again when the version has expired (410 Gone)."""
    version: str | None = None
    while True:
        try:
            if version is None:
                listing = await api.get(path, selector)
                version = str(listing["metadata"]["resourceVersion"])
                on_list(listing["items"])
            params = {**selector, "resourceVersion": version, "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
            async for event in api.watch(path, params):
                obj = event["object"]
                if event["type"] == "ERROR":
                    raise ApiError(int(obj.get("code", 500)), json.dumps(obj))
                version = str(obj["metadata"]["resourceVersion"])
                if event["type"] != "BOOKMARK":
                    on_event(event["type"], obj)
        except ApiError as error:
            if error.status == 410:
                log.info("watch of %s expired (410 Gone); listing again", path)
                version = None
                continue
            log.warning("watch of %s: %s; reconnecting", path, error)
            await asyncio.sleep(retry_delay)
        except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as error:
            log.warning("watch of %s: %s; reconnecting", path, error)
            await asyncio.sleep(retry_delay)


# ---------------------------------------------------------------------------------------------- addresses


def run_ip(*args: str) -> subprocess.CompletedProcess[str]:
    """`ip ...` (iproute2); a missing `ip` is reported like a failed command."""
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        return subprocess.CompletedProcess(["ip", *args], 127, "", str(error))


class Addresses:
    """Pod IPs: /32 addresses in 10.244.0.0/16 on the loopback interface, or 127.10.x.y as a fallback
    when addresses cannot be added (EndpointSlices then omit the pods)."""

    def __init__(self) -> None:
        self.in_use: set[str] = set()
        self.pool = POD_NETWORK if self._can_add_addresses() else LOOPBACK_POOL
        if self.pool == LOOPBACK_POOL:
            log.warning("cannot add addresses to lo; pods get 127.10.x.y, which EndpointSlices refuse")

    def _can_add_addresses(self) -> bool:
        probe = str(POD_NETWORK.broadcast_address - 1)
        if run_ip("-4", "addr", "replace", f"{probe}/32", "dev", "lo", "label", ADDRESS_LABEL).returncode:
            return False
        run_ip("-4", "addr", "del", f"{probe}/32", "dev", "lo")
        return True

    def remove_all(self) -> None:
        """Removes every address a previous run left on lo."""
        listing = run_ip("-4", "-o", "addr", "show", "dev", "lo", "label", ADDRESS_LABEL).stdout
        for match in re.finditer(r"inet (\S+)", listing):
            run_ip("-4", "addr", "del", match.group(1), "dev", "lo")

    def allocate(self, wanted: str | None) -> str:
        candidate = None
        if wanted and wanted not in self.in_use:
            with contextlib.suppress(ValueError):
                if ipaddress.IPv4Address(wanted) in self.pool:
                    candidate = wanted
        if candidate is None:
            for host in self.pool.hosts():
                text = str(host)
                if host.packed[3] not in (0, 255) and text not in self.in_use:
                    candidate = text
                    break
            else:
                raise RuntimeError("pod address pool exhausted")
        self.in_use.add(candidate)
        if self.pool == POD_NETWORK:
            result = run_ip("-4", "addr", "replace", f"{candidate}/32", "dev", "lo", "label", ADDRESS_LABEL)
            if result.returncode:
                self.in_use.discard(candidate)
                raise RuntimeError(f"ip addr add {candidate}: {result.stderr.strip()}")
        return candidate

    def release(self, address: str) -> None:
        if address in self.in_use:
            self.in_use.discard(address)
            if self.pool == POD_NETWORK:
                run_ip("-4", "addr", "del", f"{address}/32", "dev", "lo")


# ---------------------------------------------------------------------------------------------- services


class ServiceProxy:
    """A userspace kube-proxy and a hosts-file DNS for the pods. Each Service's ClusterIP is added to lo;
    each TCP port accepts connections and forwards them, round-robin, to the Service's ready endpoints from
    its EndpointSlices (default/kubernetes goes to the API server). <state>/dns/<namespace>.hosts names
    every Service as cluster DNS would (name.ns.svc.cluster.local, name.ns.svc, name.ns, and the short name
    inside its own namespace); pods of that namespace see it as /etc/hosts."""

    def __init__(self, api: Api, state_dir: Path, api_port: int) -> None:
        self.api = api
        self.dns_dir = state_dir / "dns"
        self.api_port = api_port
        self.services: dict[tuple[str, str], Json] = {}
        self.slices: dict[tuple[str, str], Json] = {}
        self.targets: dict[tuple[str, int], tuple[str, str, Json]] = {}
        self.listeners: dict[tuple[str, int], asyncio.Server] = {}
        self.addresses: set[str] = set()
        self.namespaces: set[str] = set()
        self.turns: dict[tuple[str, int], int] = {}
        self._dirty = asyncio.Event()

    @staticmethod
    def _key(obj: Json) -> tuple[str, str]:
        return str(obj["metadata"]["namespace"]), str(obj["metadata"]["name"])

    def _replace(self, store: dict[tuple[str, str], Json], items: list[Json]) -> None:
        store.clear()
        store.update({self._key(item): item for item in items})
        self._dirty.set()

    def _event(self, store: dict[tuple[str, str], Json], kind: str, obj: Json) -> None:
        if kind == "DELETED":
            store.pop(self._key(obj), None)
        else:
            store[self._key(obj)] = obj
        self._dirty.set()

    async def run(self) -> None:
        services = self.services
        slices = self.slices
        await asyncio.gather(
            follow(
                self.api,
                "/api/v1/services",
                {},
                lambda items: self._replace(services, items),
                lambda kind, obj: self._event(services, kind, obj),
            ),
            follow(
                self.api,
                "/apis/discovery.k8s.io/v1/endpointslices",
                {},
                lambda items: self._replace(slices, items),
                lambda kind, obj: self._event(slices, kind, obj),
            ),
            self._reconcile_loop(),
        )

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._reconcile()
            except Exception:  # never take the node down; try again on the next change
                log.exception("service proxy")
                await asyncio.sleep(1)
                self._dirty.set()

    async def _reconcile(self) -> None:
        desired: dict[tuple[str, int], tuple[str, str, Json]] = {}
        for (namespace, name), service in self.services.items():
            ip = (service.get("spec") or {}).get("clusterIP")
            if not ip or ip == "None":
                continue
            for port in service["spec"].get("ports") or []:
                if port.get("protocol", "TCP") == "TCP":
                    desired[(ip, int(port["port"]))] = (namespace, name, port)
        self.targets = desired
        for key in [k for k in self.listeners if k not in desired]:
            self.listeners.pop(key).close()
        wanted_ips = {ip for ip, _ in desired}
        for ip in self.addresses - wanted_ips:
            run_ip("-4", "addr", "del", f"{ip}/32", "dev", "lo")
            self.addresses.discard(ip)
        for key in desired:
            if key in self.listeners:
                continue
            ip, port = key
            if ip not in self.addresses:
                added = run_ip("-4", "addr", "replace", f"{ip}/32", "dev", "lo", "label", ADDRESS_LABEL)
                if added.returncode:
                    log.warning("service address %s: %s", ip, added.stderr.strip())
                    continue
                self.addresses.add(ip)
            try:
                self.listeners[key] = await asyncio.start_server(functools.partial(self._connection, key), ip, port)
            except OSError as error:
                log.warning("service %s:%d: %s", ip, port, error)
        self.write_hosts()

    def endpoints(self, namespace: str, name: str, service_port: Json) -> list[tuple[str, int]]:
        if (namespace, name) == ("default", "kubernetes"):
            return [(HOST_IP, self.api_port)]
        found = []
        for (slice_namespace, _), item in self.slices.items():
            labels = item["metadata"].get("labels") or {}
            if slice_namespace != namespace or labels.get("kubernetes.io/service-name") != name:
                continue
            if item.get("addressType") != "IPv4":
                continue
            ports = [
                p["port"] for p in item.get("ports") or [] if (p.get("name") or "") == (service_port.get("name") or "")
            ]
            if not ports or ports[0] is None:
                continue
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                found += [(address, int(ports[0])) for address in endpoint["addresses"]]
        return sorted(found)

    async def _connection(
        self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        target = self.targets.get(key)
        endpoints = self.endpoints(*target) if target else []
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        if endpoints:
            turn = self.turns.get(key, 0)
            self.turns[key] = turn + 1
            start = turn % len(endpoints)
            for host, port in endpoints[start:] + endpoints[:start]:
                try:
                    upstream = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                    break
                except (OSError, TimeoutError):
                    continue
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for stream in (writer, up_writer):
                stream.close()

    def hosts_file(self, namespace: str) -> Path:
        """The /etc/hosts for pods of `namespace` (created now, rewritten in place as Services change)."""
        self.namespaces.add(namespace)
        path = self.dns_dir / f"{namespace}.hosts"
        if not path.exists():
            self.write_hosts()
        return path

    def write_hosts(self) -> None:
        self.dns_dir.mkdir(parents=True, exist_ok=True)
        lines: list[tuple[str, str, str]] = []
        for (namespace, name), service in sorted(self.services.items()):
            ip = (service.get("spec") or {}).get("clusterIP")
            if ip == "None":  # headless: the first ready endpoint
                ready = [a for a, _ in self.endpoints(namespace, name, {"name": ""})]
                ip = ready[0] if ready else None
            if ip:
                lines.append((ip, namespace, name))
        for namespace in self.namespaces | {ns for ns, _ in self.services}:
            text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            for ip, service_namespace, name in lines:
                short = f"{name}.{service_namespace}"
                names = f"{short}.svc.cluster.local {short}.svc {short}"
                text += f"{ip}\t{names}{' ' + name if service_namespace == namespace else ''}\n"
            path = self.dns_dir / f"{namespace}.hosts"
            if path.exists() and path.read_text() == text:
                continue
            # In place: pods bind-mount this very file (inode), so it must not be replaced.
            with path.open("r+" if path.exists() else "w") as handle:
                handle.write(text)
                handle.truncate()

    def close(self) -> None:
        for server in self.listeners.values():
            server.close()
        self.listeners.clear()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while chunk := await source.read(65536):
        sink.write(chunk)
        await sink.drain()
    if sink.can_write_eof():
        sink.write_eof()


# ---------------------------------------------------------------------------------------------- processes


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def write_pid(pid_file: Path, pid: int) -> None:
    partial = pid_file.with_name(pid_file.name + ".partial")
    partial.write_text(json.dumps({"pid": pid, "start": _start_time(pid)}))
    partial.replace(pid_file)


def kill_recorded(pid_file: Path) -> None:
    """SIGKILLs the process group recorded by an earlier run, if that very process still lives."""
    try:
        record = json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return
    pid = int(record["pid"])
    if _start_time(pid) == record["start"]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


NAMESPACES_WORK = (
    subprocess.run(
        ["unshare", "--mount", "--uts", "--propagation", "private", "true"], capture_output=True, check=False
    ).returncode
    == 0
)


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


#: Where a container's namespace sees the host's whole tree while its volumes are being mounted.
STAGE_DIR = "/run/lambdalet-node"


def _covered(path: str, targets: list[str]) -> bool:
    return any(path == t.rstrip("/") or path.startswith(t.rstrip("/") + "/") for t in targets)


def launch_argv(command: list[str], mounts: list[Mount], workdir: str, hostname: str) -> list[str]:
    """argv that runs `command` in a new mount+UTS namespace with the volumes bind-mounted at their paths.
    Without namespaces (fallback) the command runs as is, with paths rewritten by the caller.

    A volume may be mounted over a directory that holds other volumes' sources or this checkout (a /tmp
    emptyDir when the checkout or the cluster state lives under /tmp): so the host's tree is first bound
    at a staging path (in this namespace only), every source is taken from there, and the checkout (the
    container's interpreter and runtime files) is bound back where a volume covers it."""
    if not NAMESPACES_WORK:
        return command
    stage = f"{STAGE_DIR}/$$"
    lines = [
        "set -e",
        f"/usr/bin/hostname {shlex.quote(hostname)}",
        f"/usr/bin/mkdir -p {stage}",
        f"/usr/bin/mount --rbind / {stage}",
    ]
    for mount in sorted(mounts, key=lambda m: m.target.count("/")):
        target = shlex.quote(mount.target)
        if mount.source.is_dir():
            lines.append(f"/usr/bin/mkdir -p {target}")
        else:
            lines.append(f"/usr/bin/mkdir -p $(/usr/bin/dirname {target}); [ -e {target} ] || : > {target}")
        lines.append(f"/usr/bin/mount --bind {stage}{shlex.quote(str(mount.source))} {target}")
        if mount.read_only:
            lines.append(f"/usr/bin/mount -o remount,bind,ro {target}")
    if _covered(str(ROOT), [m.target for m in mounts]):
        root = shlex.quote(str(ROOT))
        lines.append(f"/usr/bin/mkdir -p {root} && /usr/bin/mount --rbind {stage}{root} {root}")
    lines.append(f"/usr/bin/umount -l {stage} && /usr/bin/rmdir {stage} 2>/dev/null || true")
    lines.append(f"/usr/bin/mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)}")
    lines.append('exec "$@"')
    return [
        "/usr/bin/unshare", "--mount", "--uts", "--propagation", "private", "--",
        "/bin/sh", "-c", "\n".join(lines), "sh", *command,
    ]  # fmt: skip


def rewrite_path(value: str, mounts: list[Mount]) -> str:
    """Fallback without mount namespaces: a value beginning with a mountPath points at the directory."""
    for mount in sorted(mounts, key=lambda m: len(m.target), reverse=True):
        target = mount.target.rstrip("/")
        if value == target or value.startswith(target + "/"):
            return str(mount.source) + value[len(target) :]
    return value


# ---------------------------------------------------------------------------------------------- containers


@dataclass
class ProbeState:
    successes: int = 0
    failures: int = 0


@dataclass
class ContainerRunner:
    """One container of a pod: its process across restarts, its probes and its reported state."""

    pod: PodRunner
    spec: Json
    init: bool = False
    restart_count: int = 0
    state: Json = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Json = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    process: asyncio.subprocess.Process | None = None
    container_id: str = ""
    exit_code: int | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    liveness_failed: asyncio.Event = field(default_factory=asyncio.Event)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def log_path(self) -> Path:
        return self.pod.dir / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.pod.dir / f"{self.name}.pid.json"

    def status(self) -> Json:
        image = str(self.spec.get("image", ""))
        status: Json = {
            "name": self.name,
            "image": image,
            "imageID": f"lambdalet-local://{image_repository(image)}",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
        }
        if self.last_state:
            status["lastState"] = self.last_state
        if self.container_id:
            status["containerID"] = self.container_id
        return status

    def set_waiting(self, reason: str, message: str = "") -> None:
        waiting: Json = {"reason": reason}
        if message:
            waiting["message"] = message
        self.state = {"waiting": waiting}
        self.ready = False
        self.started = False
        self.pod.changed()

    async def run(self) -> int | None:
        """Runs the container until the pod stops or restartPolicy says not to restart. Returns the exit code
        of the last run (None if it never ran)."""
        policy = self.pod.spec.get("restartPolicy", "Always")
        if self.init:  # init containers run to completion; retried on failure unless the pod says Never
            policy = "Never" if policy == "Never" else "OnFailure"
        backoff = 1.0
        while not self.pod.stopping:
            image = resolve_image(str(self.spec.get("image", "")))
            if image is None:
                known = ", ".join(sorted(IMAGES))
                self.set_waiting(
                    "ErrImagePull",
                    f"lambdalet-node runs images from a table of local commands and has no entry for "
                    f"{self.spec.get('image')!r} (known repositories: {known})",
                )
                await self.pod.wait_stopping(limit=None)
                return None
            try:
                argv, env, workdir = await self.pod.container_command(self.spec, image)
            except (ConfigError, ApiError, aiohttp.ClientError, TimeoutError) as error:
                self.set_waiting("CreateContainerConfigError", str(error))
                await self.pod.wait_stopping(limit=2)
                continue
            started_at = time.monotonic()
            exit_code = await self._run_once(argv, env, workdir)
            ran_for = time.monotonic() - started_at
            self.exit_code = exit_code
            if self.pod.stopping or exit_code is None:
                return exit_code
            restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
            if not restart:
                return exit_code
            if ran_for > 60:
                backoff = 1.0
            self.last_state = self.state
            self.set_waiting("CrashLoopBackOff", f"back-off {backoff:.0f}s restarting failed container={self.name}")
            await self.pod.wait_stopping(limit=backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            self.restart_count += 1
        return self.exit_code

    async def _run_once(self, argv: list[str], env: dict[str, str], workdir: str) -> int | None:
        self.env = env
        self.liveness_failed.clear()
        if self.pod.stopping:
            return None
        with self.log_path.open("ab") as log_file:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd="/" if NAMESPACES_WORK else workdir,
                    start_new_session=True,
                )
            except OSError as error:
                self.state = {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": str(error),
                        "finishedAt": now_rfc3339(),
                    }
                }
                self.pod.changed()
                return 128
        self.process = process
        self.container_id = f"lambdalet://{self.pod.namespace}/{self.pod.name}/{self.name}/{process.pid}"
        write_pid(self.pid_path, process.pid)
        started_at = now_rfc3339()
        self.state = {"running": {"startedAt": started_at}}
        self.started = "startupProbe" not in self.spec
        self.ready = self.started and "readinessProbe" not in self.spec and not self.init
        self.pod.changed()
        log.info("started %s/%s[%s] pid %d: %s", self.pod.namespace, self.pod.name, self.name, process.pid, argv)
        probes = [] if self.init else self._probe_tasks(process.pid)
        waiter = asyncio.create_task(process.wait())
        stop = asyncio.create_task(self.stop_requested.wait())
        liveness = asyncio.create_task(self.liveness_failed.wait())
        reason = "Completed"
        try:
            await asyncio.wait({waiter, stop, liveness}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                grace = self.pod.grace_seconds() if stop.done() else self.spec_grace()
                if liveness.done():
                    reason = "Error"
                grace -= await self._pre_stop(waiter, grace)
                await self._terminate(process, grace)
            await waiter
        finally:
            for task in (*probes, stop, liveness):
                task.cancel()
            await asyncio.gather(*probes, stop, liveness, return_exceptions=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever the main process left behind
            self.pid_path.unlink(missing_ok=True)
        code = process.returncode if process.returncode is not None else -1
        exit_code = 128 - code if code < 0 else code
        terminated: Json = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 and reason == "Completed" else "Error",
            "startedAt": started_at,
            "finishedAt": now_rfc3339(),
            "containerID": self.container_id,
        }
        if code < 0:
            terminated["signal"] = -code
        self.state = {"terminated": terminated}
        self.ready = False
        self.process = None
        self.pod.changed()
        log.info("%s/%s[%s] exited with %d", self.pod.namespace, self.pod.name, self.name, exit_code)
        return exit_code

    async def stop(self) -> None:
        """Stops the container's process (if any) within the pod's grace period."""
        self.stop_requested.set()
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), self.pod.grace_seconds() + 5)

    def spec_grace(self) -> float:
        return float(self.pod.spec.get("terminationGracePeriodSeconds", 30))

    async def _pre_stop(self, waiter: asyncio.Task[int], grace: float) -> float:
        """The preStop hook's `sleep` action, as the kubelet runs it before SIGTERM, within the grace period
        (the container keeps running and being probed meanwhile). Returns the seconds it took."""
        sleep = ((self.spec.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
        seconds = min(float(sleep.get("seconds") or 0), grace)
        if seconds <= 0:
            return 0.0
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), seconds)
        return time.monotonic() - started

    @staticmethod
    async def _terminate(process: asyncio.subprocess.Process, grace: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout=max(grace, 0.0))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def _probe_tasks(self, pid: int) -> list[asyncio.Task[None]]:
        tasks = []
        startup = self.spec.get("startupProbe")
        gate = asyncio.Event()
        if startup:
            tasks.append(asyncio.create_task(self._probe_loop("startup", startup, pid, None, gate)))
        else:
            gate.set()
        if self.spec.get("readinessProbe"):
            tasks.append(asyncio.create_task(self._probe_loop("readiness", self.spec["readinessProbe"], pid, gate)))
        if self.spec.get("livenessProbe"):
            tasks.append(asyncio.create_task(self._probe_loop("liveness", self.spec["livenessProbe"], pid, gate)))
        return tasks

    async def _probe_loop(
        self,
        kind: str,
        probe: Json,
        pid: int,
        after: asyncio.Event | None,
        done: asyncio.Event | None = None,
    ) -> None:
        if after is not None:
            await after.wait()
        period = float(probe.get("periodSeconds", 10))
        delay = float(probe.get("initialDelaySeconds", 0))
        # The kubelet's first effective probe comes on a ticker, about one period after the start; probing
        # liveness at once would kill every server that has not bound its port yet. Readiness and startup
        # may be probed at once: a failure only delays readiness.
        await asyncio.sleep(delay + period if kind == "liveness" else delay)
        success_threshold = int(probe.get("successThreshold", 1))
        failure_threshold = int(probe.get("failureThreshold", 3))
        counts = ProbeState()
        while True:
            ok, detail = await self._probe_once(probe, pid)
            if ok:
                counts.successes += 1
                counts.failures = 0
            else:
                counts.failures += 1
                counts.successes = 0
                if counts.failures == failure_threshold:  # logged once per run of failures
                    log.info(
                        "%s probe failed %d times for %s/%s[%s]: %s",
                        kind, failure_threshold, self.pod.namespace, self.pod.name, self.name, detail,
                    )  # fmt: skip
            if kind == "readiness":
                if ok and counts.successes >= success_threshold and not self.ready:
                    self.ready = True
                    self.pod.changed()
                elif not ok and counts.failures >= failure_threshold and self.ready:
                    self.ready = False
                    self.pod.changed()
            elif kind == "liveness" and not ok and counts.failures >= failure_threshold:
                self.liveness_failed.set()
                return
            elif kind == "startup":
                if ok:
                    self.started = True
                    self.ready = "readinessProbe" not in self.spec
                    self.pod.changed()
                    if done is not None:
                        done.set()
                    return
                if counts.failures >= failure_threshold:
                    self.liveness_failed.set()
                    return
            await asyncio.sleep(period)

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for spec in self.spec.get("ports", []):
            if spec.get("name") == port:
                return int(spec["containerPort"])
        raise ConfigError(f"no container port named {port!r}")

    async def _probe_once(self, probe: Json, pid: int) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                scheme = str(get.get("scheme", "HTTP")).lower()
                host = get.get("host") or self.pod.ip
                path = get.get("path", "/")
                url = f"{scheme}://{host}:{self._port(get['port'])}{path if path.startswith('/') else '/' + path}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                headers.setdefault("User-Agent", f"kube-probe/{KUBELET_VERSION.lstrip('v')}")
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(
                        url,
                        headers=headers,
                        ssl=False,
                        allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=timeout),
                    ) as response,
                ):
                    return 200 <= response.status < 400, f"HTTP {response.status} from {url}"
            if "tcpSocket" in probe:
                sock = probe["tcpSocket"]
                host = sock.get("host") or self.pod.ip
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, self._port(sock["port"])), timeout)
                writer.close()
                return True, ""
            if "exec" in probe:
                command = [str(c) for c in probe["exec"].get("command", [])]
                if NAMESPACES_WORK:
                    command = ["/usr/bin/nsenter", f"--target={pid}", "--mount", "--uts", "--", *command]
                process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
                try:
                    output, _ = await asyncio.wait_for(process.communicate(), timeout)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
                    return False, "exec probe timed out"
                return process.returncode == 0, output.decode(errors="replace")[-300:]
            return False, f"unsupported probe handler in {sorted(probe)}"
        except (OSError, TimeoutError, aiohttp.ClientError, ConfigError) as error:
            return False, f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------- pods


class PodRunner:
    """One pod: address, volumes, containers, status reports, and the teardown on deletion."""

    def __init__(self, node: Node, pod: Json) -> None:
        self.node = node
        self.pod = pod
        self.uid: str = pod["metadata"]["uid"]
        self.ip = ""
        self.volumes: dict[str, Path] = {}
        self.tokens: list[tuple[Path, Json, float]] = []
        self.init_containers = [ContainerRunner(self, c, init=True) for c in self.spec.get("initContainers", [])]
        self.containers = [ContainerRunner(self, c) for c in self.spec.get("containers", [])]
        self.initialized = not self.init_containers
        self.sandbox_ready = False
        self.stopping = False
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._last_status: Json | None = None
        self._transitions: dict[str, tuple[str, str]] = {}
        self.start_time = (pod.get("status") or {}).get("startTime") or now_rfc3339()
        self.dir = node.state_dir / "pods" / f"{self.namespace}_{self.name}"
        self.task = asyncio.create_task(self.run(), name=f"pod {self.namespace}/{self.name}")

    @property
    def spec(self) -> Json:
        spec: Json = self.pod["spec"]
        return spec

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    def update(self, pod: Json) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.begin_stop()

    def begin_stop(self, grace: float | None = None) -> None:
        """Stops the pod: every container gets SIGTERM, then SIGKILL after the grace period."""
        if grace is not None:
            self.pod["metadata"]["deletionGracePeriodSeconds"] = grace
        if self.stopping:
            return
        self.stopping = True
        self._stop.set()
        for container in (*self.init_containers, *self.containers):
            container.stop_requested.set()

    def changed(self) -> None:
        self._dirty.set()

    def grace_seconds(self) -> float:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.spec.get("terminationGracePeriodSeconds", 30)
        return float(grace)

    async def wait_stopping(self, limit: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), limit)

    def force_stop(self) -> None:
        """The pod object is gone (deleted with grace 0 elsewhere): stop now."""
        self.begin_stop(grace=0)

    # --- lifecycle

    async def run(self) -> None:
        writer = asyncio.create_task(self._status_writer())
        try:
            await self._run()
        except Exception:
            # A bug or an unexpected error: leave nothing running; the next event for this pod starts over.
            log.exception("pod %s/%s failed; its processes are killed", self.namespace, self.name)
            for container in (*self.init_containers, *self.containers):
                if container.process is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(container.process.pid, signal.SIGKILL)
            if self.ip and self.ip != HOST_IP:
                self.node.addresses.release(self.ip)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.spec.get("hostNetwork"):
            self.ip = HOST_IP
        else:
            self.ip = self.node.addresses.allocate((self.pod.get("status") or {}).get("podIP"))
        self.changed()
        while not self.stopping:
            try:
                await self._materialise_volumes()
                break
            except (ConfigError, ApiError, aiohttp.ClientError, TimeoutError) as error:
                for container in self.containers:
                    container.set_waiting("ContainerCreating", str(error))
                await self.wait_stopping(limit=2)
        if not self.stopping:
            self.sandbox_ready = True
            self.changed()
        refresher = asyncio.create_task(self._refresh_tokens())
        try:
            for container in self.init_containers:
                if self.stopping:
                    break
                code = await container.run()
                if code != 0:
                    if not self.stopping:
                        await self.wait_stopping(limit=None)  # pod Failed (restartPolicy Never)
                    break
            else:
                self.initialized = True
                self.changed()
                if not self.stopping:
                    await asyncio.gather(*(c.run() for c in self.containers))
                    if not self.stopping:
                        self.changed()
                        await self.wait_stopping(limit=None)  # completed pods stay until deleted
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await self._teardown()

    async def _teardown(self) -> None:
        await asyncio.gather(*(c.stop() for c in (*self.init_containers, *self.containers)))
        self.changed()
        with contextlib.suppress(Exception):
            await self._publish_status()
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        if self.ip and self.ip != HOST_IP:
            self.node.addresses.release(self.ip)
        if self.node.deleting_enabled:
            try:
                await self.node.api.request(
                    "DELETE",
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                    {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
                )
            except ApiError as error:
                if error.status not in (404, 409):
                    log.warning("deleting pod %s/%s: %s", self.namespace, self.name, error)
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("deleting pod %s/%s: %s", self.namespace, self.name, error)
        log.info("pod %s/%s stopped", self.namespace, self.name)

    # --- volumes

    async def _object(self, kind: str, name: str, optional: bool) -> Json | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        found = await self.node.api.get_optional(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
        if found is None and not optional:
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        return found

    @staticmethod
    def _data(kind: str, obj: Json | None) -> dict[str, bytes]:
        if obj is None:
            return {}
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    @staticmethod
    def _write(target: Path, content: bytes, mode: int) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(content)
        partial.chmod(mode)
        partial.replace(target)

    def _write_items(
        self, folder: Path, data: dict[str, bytes], items: list[Json] | None, mode: int, what: str
    ) -> None:
        if items:
            for item in items:
                if item["key"] not in data:
                    raise ConfigError(f"{what}: key {item['key']!r} not found")
                self._write(folder / item["path"], data[item["key"]], int(item.get("mode", mode)))
        else:
            for key, value in data.items():
                self._write(folder / key, value, mode)

    async def _source_files(self, folder: Path, kind: str, ref: Json, mode: int) -> None:
        name = ref.get("name") or ref.get("secretName") or ""
        obj = await self._object(kind, name, bool(ref.get("optional")))
        self._write_items(folder, self._data(kind, obj), ref.get("items"), mode, f"{kind.lower()} {name!r}")

    def _downward_files(self, folder: Path, items: list[Json], mode: int) -> None:
        for item in items:
            if "fieldRef" in item:
                value = self.field_value(item["fieldRef"]["fieldPath"])
            else:
                value = self.resource_value(item["resourceFieldRef"])
            self._write(folder / item["path"], value.encode(), int(item.get("mode", mode)))

    async def _token(self, target: Path, source: Json, mode: int) -> None:
        expiration = int(source.get("expirationSeconds", 3600))
        request: Json = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": expiration,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
            },
        }
        if source.get("audience"):
            request["spec"]["audiences"] = [source["audience"]]
        account = self.spec.get("serviceAccountName") or "default"
        try:
            response = await self.node.api.request(
                "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", request
            )
        except ApiError as error:
            raise ConfigError(f"token for serviceaccount {account!r}: {error}") from error
        self._write(target, response["status"]["token"].encode(), mode)
        self.tokens = [t for t in self.tokens if t[0] != target]
        self.tokens.append((target, source, time.monotonic() + 0.8 * expiration))

    async def _refresh_tokens(self) -> None:
        while True:
            await asyncio.sleep(30)
            for target, source, due in list(self.tokens):
                if time.monotonic() >= due:
                    try:
                        await self._token(target, source, target.stat().st_mode & 0o777)
                    except (ConfigError, OSError) as error:
                        log.warning("refreshing token %s: %s", target, error)

    async def _materialise_volumes(self) -> None:
        root = self.dir / "volumes"
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            folder = root / name
            if "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    _make_dirs(path)
                self.volumes[name] = path
                continue
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            if "emptyDir" in volume:
                folder.chmod(0o777)
            elif "configMap" in volume:
                ref = volume["configMap"]
                await self._source_files(folder, "ConfigMap", ref, int(ref.get("defaultMode", 0o644)))
            elif "secret" in volume:
                ref = volume["secret"]
                await self._source_files(folder, "Secret", ref, int(ref.get("defaultMode", 0o644)))
            elif "downwardAPI" in volume:
                ref = volume["downwardAPI"]
                self._downward_files(folder, ref.get("items", []), int(ref.get("defaultMode", 0o644)))
            elif "projected" in volume:
                projected = volume["projected"]
                mode = int(projected.get("defaultMode", 0o644))
                for source in projected.get("sources", []):
                    if "configMap" in source:
                        await self._source_files(folder, "ConfigMap", source["configMap"], mode)
                    elif "secret" in source:
                        await self._source_files(folder, "Secret", source["secret"], mode)
                    elif "downwardAPI" in source:
                        self._downward_files(folder, source["downwardAPI"].get("items", []), mode)
                    elif "serviceAccountToken" in source:
                        sat = source["serviceAccountToken"]
                        await self._token(folder / sat["path"], sat, mode)
                    else:
                        raise ConfigError(f"volume {name!r}: projected source {sorted(source)} is not supported")
            else:
                kinds = sorted(set(volume) - {"name"})
                raise ConfigError(f"volume {name!r}: type {kinds} is not supported by the lambdalet node stand-in")
            self.volumes[name] = folder

    # --- environment and command

    def field_value(self, path: str) -> str:
        meta = self.pod["metadata"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            values = meta.get(path.split(".")[1]) or {}
            return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": self.spec.get("nodeName", ""),
            "spec.serviceAccountName": self.spec.get("serviceAccountName", ""),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": HOST_IP,
            "status.hostIPs": HOST_IP,
        }
        if path not in simple:
            raise ConfigError(f"fieldRef {path!r} is not supported")
        return str(simple[path])

    def resource_value(self, ref: Json) -> str:
        resource = str(ref["resource"])
        container = next(
            (c for c in self.spec.get("containers", []) if c["name"] == ref.get("containerName")),
            self.spec["containers"][0],
        )
        kind, _, name = resource.partition(".")
        resources = container.get("resources") or {}
        text = (resources.get(kind) or {}).get(name)
        if text is None and kind == "requests":
            text = (resources.get("limits") or {}).get(name)
        value = parse_quantity(text) if text is not None else self.node.allocatable(name)
        divisor = parse_quantity(str(ref.get("divisor", "1")))
        if divisor == 0:
            divisor = decimal.Decimal(1)
        return str(math.ceil(value / divisor))

    async def _env_value(self, entry: Json, env: dict[str, str]) -> str | None:
        if "value" in entry:
            return expand(str(entry["value"]), env)
        source = entry.get("valueFrom") or {}
        if "fieldRef" in source:
            return self.field_value(source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return self.resource_value(source["resourceFieldRef"])
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key in source:
                ref = source[key]
                optional = bool(ref.get("optional"))
                data = self._data(kind, await self._object(kind, ref["name"], optional))
                if ref["key"] not in data:
                    if optional:
                        return None
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}")
                return data[ref["key"]].decode(errors="replace")
        return ""

    async def container_command(self, spec: Json, image: Image) -> tuple[list[str], dict[str, str], str]:
        mounts = [
            Mount(
                self.volumes[m["name"]] / m["subPath"] if m.get("subPath") else self.volumes[m["name"]],
                m["mountPath"],
                bool(m.get("readOnly")) or self._read_only_volume(m["name"]),
            )
            for m in spec.get("volumeMounts", [])
            if m["name"] in self.volumes
        ]
        mounts = [*(Mount(source, target, True) for source, target in image.files), *mounts]
        if NAMESPACES_WORK and not self.spec.get("hostNetwork") and self.node.addresses.pool == POD_NETWORK:
            mounts.append(Mount(self.node.services.hosts_file(self.namespace), "/etc/hosts", True))
        port = self.node.api_port
        env: dict[str, str] = {
            "PATH": IMAGE_PATH,
            "HOSTNAME": self.hostname,
            "HOME": "/root",
            **dict(image.env),
            "KUBERNETES_SERVICE_HOST": HOST_IP,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": f"tcp://{HOST_IP}:{port}",
        }
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    ref = source[key]
                    data = self._data(kind, await self._object(kind, ref["name"], bool(ref.get("optional"))))
                    for name, raw in data.items():
                        env[prefix + name] = raw.decode(errors="replace")
        for entry in spec.get("env", []):
            value = await self._env_value(entry, env)
            if value is not None:
                env[entry["name"]] = value
        env["LAMBDALET_BIND_ADDRESS"] = self.ip
        command = [expand(str(c), env) for c in spec["command"]] if spec.get("command") else list(image.entrypoint)
        if spec.get("args"):
            args = [expand(str(a), env) for a in spec["args"]]
        elif spec.get("command"):
            args = []
        else:
            args = list(image.cmd)
        argv = [*command, *args]
        workdir = str(spec.get("workingDir") or image.workdir)
        if not NAMESPACES_WORK:
            argv = [rewrite_path(a, mounts) for a in argv]
            env = {k: rewrite_path(v, mounts) for k, v in env.items()}
            workdir = rewrite_path(workdir, mounts)
            _make_dirs(Path(workdir))
        return launch_argv(argv, mounts, workdir, self.hostname), env, workdir

    def _read_only_volume(self, name: str) -> bool:
        volume: Json = next((v for v in self.spec.get("volumes", []) if v["name"] == name), {})
        return any(k in volume for k in ("configMap", "secret", "projected", "downwardAPI"))

    @property
    def hostname(self) -> str:
        return str(self.spec.get("hostname") or self.name)[:63]

    # --- status

    def _phase(self) -> str:
        policy = self.spec.get("restartPolicy", "Always")
        failed_init = any(
            "terminated" in c.state and c.state["terminated"]["exitCode"] != 0 for c in self.init_containers
        )
        if failed_init and policy == "Never":
            return "Failed"
        if not self.initialized:
            return "Pending"
        states = [c.state for c in self.containers]
        if any(c.restart_count == 0 and "waiting" in c.state and not c.last_state for c in self.containers):
            return "Pending"
        if any("running" in s for s in states):
            return "Running"
        if all("terminated" in s for s in states):
            codes = [s["terminated"]["exitCode"] for s in states]
            if all(code == 0 for code in codes) and policy != "Always":
                return "Succeeded"
            if policy == "Never":
                return "Failed"
        return "Running"

    def _condition(self, kind: str, ok: bool, reason: str = "") -> Json:
        status = "True" if ok else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != status:
            self._transitions[kind] = (status, now_rfc3339())
        condition: Json = {"type": kind, "status": status, "lastTransitionTime": self._transitions[kind][1]}
        if reason and not ok:
            condition["reason"] = reason
        return condition

    def compute_status(self) -> Json:
        containers_ready = all(c.ready for c in self.containers)
        conditions = [
            c for c in (self.pod.get("status") or {}).get("conditions", []) if c.get("type") == "PodScheduled"
        ]
        gates_ok = all(
            any(
                c.get("type") == gate["conditionType"] and c.get("status") == "True"
                for c in (self.pod.get("status") or {}).get("conditions", [])
            )
            for gate in self.spec.get("readinessGates", [])
        )
        gate_conditions = [
            c
            for c in (self.pod.get("status") or {}).get("conditions", [])
            if c.get("type") in {g["conditionType"] for g in self.spec.get("readinessGates", [])}
        ]
        conditions += [
            self._condition("PodReadyToStartContainers", self.sandbox_ready),
            self._condition("Initialized", self.initialized, "ContainersNotInitialized"),
            self._condition("ContainersReady", containers_ready, "ContainersNotReady"),
            self._condition("Ready", containers_ready and gates_ok, "ContainersNotReady"),
            *gate_conditions,
        ]
        status: Json = {
            "phase": self._phase(),
            "conditions": conditions,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        return status

    async def _publish_status(self) -> None:
        status = self.compute_status()
        if status == self._last_status:
            return
        await self.node.api.merge_patch(
            f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
            {"metadata": {"uid": self.uid}, "status": status},
        )
        self._last_status = status

    async def _status_writer(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._publish_status()
            except ApiError as error:
                if error.status in (404, 409, 422):
                    return  # the pod is gone or was replaced
                log.warning("status of %s/%s: %s", self.namespace, self.name, error)
                self._dirty.set()
                await asyncio.sleep(1)
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("status of %s/%s: %s", self.namespace, self.name, error)
                self._dirty.set()
                await asyncio.sleep(1)


# ---------------------------------------------------------------------------------------------- node


class Node:
    def __init__(self, api: Api, name: str, state_dir: Path) -> None:
        self.api = api
        self.name = name
        self.state_dir = state_dir
        self.addresses = Addresses()
        self.pods: dict[str, PodRunner] = {}
        self.api_port = int(api.server.rsplit(":", 1)[1])
        self.deleting_enabled = True
        self.services = ServiceProxy(api, state_dir, self.api_port)
        self._background: set[asyncio.Task[None]] = set()
        self._capacity = self._machine_capacity()

    @staticmethod
    def _machine_capacity() -> dict[str, str]:
        meminfo = Path("/proc/meminfo").read_text()
        memory_kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1))  # type: ignore[union-attr]
        disk = shutil.disk_usage("/")
        return {
            "cpu": str(os.cpu_count() or 1),
            "memory": f"{memory_kib}Ki",
            "ephemeral-storage": f"{disk.total // 1024}Ki",
            "pods": "110",
        }

    def allocatable(self, resource: str) -> decimal.Decimal:
        return parse_quantity(self._capacity.get(resource, "0"))

    def _node_status(self) -> Json:
        now = now_rfc3339()

        def condition(kind: str, status: str, reason: str, message: str) -> Json:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._started,
            }

        uname = platform.uname()
        return {
            "capacity": self._capacity,
            "allocatable": self._capacity,
            "conditions": [
                condition(
                    "MemoryPressure", "False", "KubeletHasSufficientMemory", "lambdalet-node does not track memory"
                ),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "lambdalet-node does not track disk"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "lambdalet-node does not track PIDs"),
                condition("Ready", "True", "KubeletReady", "lambdalet-node runs pods as local processes"),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": _read("/etc/machine-id"),
                "systemUUID": _read("/etc/machine-id"),
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": uname.release,
                "osImage": _os_image(),
                "containerRuntimeVersion": "lambdalet-local://0.1.0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(uname.machine, uname.machine),
            },
        }

    async def register(self) -> None:
        self._started = now_rfc3339()
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "lambdalet-local",
        }
        try:
            await self.api.request(
                "POST",
                "/api/v1/nodes",
                {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": labels}},
            )
        except ApiError as error:
            if error.status != 409:
                raise
        await self.api.merge_patch(f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()})
        log.info("node %s registered and Ready", self.name)

    async def heartbeat(self) -> None:
        node = await self.api.get(f"/api/v1/nodes/{self.name}")
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        owner = [{"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}]
        last_status = time.monotonic()
        while True:
            try:
                spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()}
                try:
                    await self.api.merge_patch(lease_path, {"spec": spec})
                except ApiError as error:
                    if error.status != 404:
                        raise
                    await self.api.request(
                        "POST",
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        {"metadata": {"name": self.name, "ownerReferences": owner}, "spec": spec},
                    )
                if time.monotonic() - last_status > 60:
                    await self.api.merge_patch(f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()})
                    last_status = time.monotonic()
            except (ApiError, aiohttp.ClientError, TimeoutError) as error:
                log.warning("heartbeat: %s", error)
            await asyncio.sleep(10)

    # --- pods

    def _handle(self, kind: str, pod: Json) -> None:
        uid = pod["metadata"]["uid"]
        runner = self.pods.get(uid)
        if kind == "DELETED":
            if runner is not None:
                runner.force_stop()
            return
        if runner is not None:
            runner.update(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if pod["metadata"].get("deletionTimestamp"):
            task = asyncio.create_task(self._delete_unstarted(pod))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        if phase in ("Succeeded", "Failed"):
            return
        runner = PodRunner(self, pod)
        self.pods[uid] = runner
        runner.task.add_done_callback(lambda _: self.pods.pop(uid, None))

    async def _delete_unstarted(self, pod: Json) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):
            await self.api.request(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )

    def _relisted(self, pods: list[Json]) -> None:
        listed = {p["metadata"]["uid"] for p in pods}
        for uid, runner in list(self.pods.items()):
            if uid not in listed:
                runner.force_stop()
        for pod in pods:
            self._handle("MODIFIED", pod)

    async def watch_pods(self) -> None:
        selector = {"fieldSelector": f"spec.nodeName={self.name}"}
        await follow(self.api, "/api/v1/pods", selector, self._relisted, self._handle)

    async def shutdown(self) -> None:
        """On SIGTERM: stop every pod's processes (not the pod objects; a restarted node runs them again)."""
        self.deleting_enabled = False
        runners = list(self.pods.values())
        for runner in runners:
            runner.begin_stop(grace=5)
        await asyncio.gather(*(r.task for r in runners), return_exceptions=True)


def _make_dirs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _os_image() -> str:
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)', _read("/etc/os-release"), re.MULTILINE)
    return match.group(1) if match else platform.system()


def sweep_stale(state_dir: Path) -> None:
    """Kills pod processes a previous, crashed run left behind."""
    for pid_file in (state_dir / "pods").glob("*/*.pid.json"):
        kill_recorded(pid_file)


async def amain(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir)
    sweep_stale(state_dir)
    scratch = Path(tempfile.mkdtemp(prefix="lambdalet-node-"))
    try:
        api = Api.from_kubeconfig(Path(args.kubeconfig), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    node = Node(api, args.node_name, state_dir)
    node.addresses.remove_all()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await node.register()
        tasks = [asyncio.create_task(node.heartbeat()), asyncio.create_task(node.watch_pods())]
        if node.addresses.pool == POD_NETWORK:
            tasks.append(asyncio.create_task(node.services.run()))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                task.result()  # a crashed loop: raise its error
            task.cancel()
        log.info("stopping: terminating pod processes")
        await node.shutdown()
        node.services.close()
        node.addresses.remove_all()
    finally:
        await api.close()


def main() -> NoReturn:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--node-name", default="lambdalet-node")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(amain(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
