"""Pure bookkeeping for the Kubernetes backend: no I/O, no clock (time is passed in), no tasks.

:class:`EndpointBook` folds EndpointSlice events into the ready pods of each Service (a Service's
endpoints may be spread over several slices; a pod may briefly appear in two). :class:`PodBook` folds the
function pods themselves (address, agent container running, deletionTimestamp, Ready condition).
:class:`Instances` is one function's view of its pods: which are handed out as environments, which
starts wait for a pod, which ready pods nobody holds yet (adopted at gateway start, or left over), which
are being deleted, and which new pods may be used as soon as their agent answers (before the kubelet's
readiness probe and the EndpointSlice say so: see :meth:`Instances.candidates`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from lambdalet.spec import Function, SpecError, parse_function

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: Label the operator puts on every child of a Function (and every function pod).
FUNCTION_LABEL = "lambdalet.dev/function"
DEFAULT_PORT = 8080
PORT_NAME = "http"

ServiceKey = tuple[str, str]  # (namespace, Service name)


T = TypeVar("T")


class _Folded(Generic[T]):
    """Objects of one kind folded by key (namespace, Service or function) and name; a fresh list of a
    namespace replaces what that namespace held."""

    def __init__(self) -> None:
        self._by_key: dict[ServiceKey, dict[str, T]] = {}

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> ServiceKey | None:
        """Fold in one watch event; return the key it touched (None: not an object of interest)."""
        raise NotImplementedError

    def replace(self, namespace: str | None, items: Iterable[Mapping[str, Any]]) -> set[ServiceKey]:
        """A fresh list of one namespace's objects (``None``: all): return every key that may differ."""
        touched = {key for key in self._by_key if namespace is None or key[0] == namespace}
        for key in touched:
            del self._by_key[key]
        for obj in items:
            added = self.apply("ADDED", obj)
            if added is not None:
                touched.add(added)
        return touched


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One pod behind a function's Service, as an EndpointSlice lists it."""

    pod: str
    uid: str
    address: str
    port: int
    ready: bool
    terminating: bool

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def slice_endpoints(obj: Mapping[str, Any]) -> tuple[Endpoint, ...]:
    """The pod endpoints of one EndpointSlice (entries without a pod or an address are skipped)."""
    port = DEFAULT_PORT
    for entry in obj.get("ports") or []:
        if entry.get("name") == PORT_NAME and entry.get("port"):
            port = int(entry["port"])
    found: list[Endpoint] = []
    for entry in obj.get("endpoints") or []:
        ref = entry.get("targetRef") or {}
        addresses = entry.get("addresses") or []
        if ref.get("kind") != "Pod" or not ref.get("name") or not addresses:
            continue
        conditions = entry.get("conditions") or {}
        terminating = bool(conditions.get("terminating"))
        # `ready` unset means ready (the API's convention), but never for a terminating endpoint.
        ready = conditions.get("ready") is not False and not terminating
        found.append(Endpoint(ref["name"], str(ref.get("uid") or ""), addresses[0], port, ready, terminating))
    return tuple(found)


class EndpointBook(_Folded[tuple[Endpoint, ...]]):
    """Every watched EndpointSlice, folded into endpoints per Service."""

    @staticmethod
    def key(obj: Mapping[str, Any]) -> ServiceKey | None:
        meta = obj.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            return None
        return str(meta.get("namespace") or ""), str(service)

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> ServiceKey | None:
        """Fold in one watch event; return the Service whose endpoints it touched."""
        key = self.key(obj)
        if key is None:
            return None
        name = str((obj.get("metadata") or {}).get("name") or "")
        slices = self._by_key.setdefault(key, {})
        if event_type == "DELETED":
            slices.pop(name, None)
            if not slices:
                del self._by_key[key]
        else:
            slices[name] = slice_endpoints(obj)
        return key

    def endpoints(self, key: ServiceKey) -> dict[str, Endpoint]:
        """Pod name → endpoint; when two slices list a pod, the ready entry wins."""
        merged: dict[str, Endpoint] = {}
        for endpoints in self._by_key.get(key, {}).values():
            for endpoint in endpoints:
                known = merged.get(endpoint.pod)
                if known is None or (endpoint.ready and not known.ready):
                    merged[endpoint.pod] = endpoint
        return merged


@dataclass(frozen=True, slots=True)
class Pod:
    """One function pod as its object says: enough to reach its agent before the pod is Ready."""

    name: str
    uid: str
    #: ``status.podIP`` ("" until the pod has one).
    address: str
    #: The agent's port: the container port named ``http`` (the Service's target).
    port: int
    #: The agent's container is running (and past its startup probe, if it has one).
    running: bool
    #: ``deletionTimestamp`` is set, or the pod has ended (Succeeded/Failed): never to be used.
    terminating: bool
    #: The pod's ``Ready`` condition (the kubelet's readiness probe).
    ready: bool

    @property
    def reachable(self) -> bool:
        return bool(self.address) and self.running and not self.terminating

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.uid, self.address, self.port, False, False)


def pod_of(obj: Mapping[str, Any]) -> tuple[ServiceKey, Pod] | None:
    """A pod object → (its function's key, :class:`Pod`); None for a pod without the function label."""
    meta = obj.get("metadata") or {}
    function = (meta.get("labels") or {}).get(FUNCTION_LABEL)
    if not function:
        return None
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    containers = spec.get("containers") or []
    container, port = (containers[0].get("name") if containers else None), DEFAULT_PORT
    for candidate in containers:
        ports = [p for p in candidate.get("ports") or [] if p.get("name") == PORT_NAME and p.get("containerPort")]
        if ports:
            container, port = candidate.get("name"), int(ports[0]["containerPort"])
            break
    running = False
    for entry in status.get("containerStatuses") or []:
        if entry.get("name") == container:
            # `started` is false until a startup probe passes; unset (older servers) counts as started.
            running = "running" in (entry.get("state") or {}) and entry.get("started") is not False
    ended = status.get("phase") in ("Succeeded", "Failed")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    pod = Pod(
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        address=str(status.get("podIP") or ""),
        port=port,
        running=running,
        terminating=bool(meta.get("deletionTimestamp")) or ended,
        ready=ready,
    )
    return (str(meta.get("namespace") or ""), str(function)), pod


class PodBook(_Folded[Pod]):
    """Every watched function pod, by function (namespace, ``lambdalet.dev/function`` label)."""

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> ServiceKey | None:
        found = pod_of(obj)
        if found is None:
            return None
        key, pod = found
        pods = self._by_key.setdefault(key, {})
        if event_type == "DELETED":
            pods.pop(pod.name, None)
        else:
            pods[pod.name] = pod
        if not pods:
            del self._by_key[key]
        return key

    def pods(self, key: ServiceKey) -> dict[str, Pod]:
        return dict(self._by_key.get(key, {}))


REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
TEMPLATE_HASH_LABEL = "pod-template-hash"


class Templates(_Folded[tuple[int, str]]):
    """Every watched ReplicaSet, folded into the current pod template of each Deployment: the newest
    revision's ``pod-template-hash``, which names its pods ``<deployment>-<hash>-<suffix>``."""

    @staticmethod
    def key(obj: Mapping[str, Any]) -> ServiceKey | None:
        meta = obj.get("metadata") or {}
        for owner in meta.get("ownerReferences") or []:
            if owner.get("kind") == "Deployment" and owner.get("controller"):
                return str(meta.get("namespace") or ""), str(owner.get("name") or "")
        return None

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> ServiceKey | None:
        key = self.key(obj)
        if key is None:
            return None
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        sets = self._by_key.setdefault(key, {})
        template_hash = (meta.get("labels") or {}).get(TEMPLATE_HASH_LABEL)
        if event_type == "DELETED" or not template_hash:
            sets.pop(name, None)
        else:
            try:
                revision = int((meta.get("annotations") or {}).get(REVISION_ANNOTATION) or 0)
            except ValueError:
                revision = 0
            sets[name] = (revision, str(template_hash))
        if not sets:
            del self._by_key[key]
        return key

    def prefix(self, key: ServiceKey) -> str | None:
        """The pod-name prefix of the current template's pods (None: not known, any pod will do)."""
        sets = self._by_key.get(key)
        if not sets:
            return None
        _, template_hash = max(sets.values())
        return f"{key[1]}-{template_hash}-"


@dataclass(slots=True)
class Observed:
    """What one look at a function's endpoints changed."""

    #: Starts that got a pod: (the start's future, the pod it now holds).
    handed: list[tuple[asyncio.Future[Endpoint], Endpoint]] = field(default_factory=list)
    #: Pods that were handed out and are gone (deleted, terminating): report them lost.
    lost: list[Endpoint] = field(default_factory=list)


class Instances:
    """One function's pods, from the backend's side. Every pod is in at most one of: handed out
    (``assigned``), ``free`` (ready, nobody holds it), ``deleting``; anything else is starting.

    Two views feed it: the Service's endpoints (:meth:`observe`, the EndpointSlice: ready pods) and, when
    the pods are watched, the pod objects (:meth:`observe_pods`). A pod that appeared while a start was
    waiting is *fresh*: the gateway scaled up for it, so once it has an address and a running agent the
    backend may ask that agent directly (``GET /readyz``) and :meth:`hand_over` it on a 200, before the
    kubelet's readiness probe and the EndpointSlice catch up. Such a pod is *early* until its endpoint is
    ready. Everything else (pods adopted at start, pods that were ready once and lost it, pods of an older
    template) goes by the EndpointSlice only. A pod with a deletionTimestamp is never handed out."""

    def __init__(self) -> None:
        self.assigned: dict[str, Endpoint] = {}
        self.free: dict[str, Endpoint] = {}
        #: When each free pod became free (the caller's monotonic clock).
        self.free_since: dict[str, float] = {}
        self.deleting: set[str] = set()
        self.pending: deque[asyncio.Future[Endpoint]] = deque()
        #: Pods that appeared while a start waited, never ready nor handed out yet.
        self.fresh: set[str] = set()
        #: Handed out on their agent's answer, their endpoint not ready yet.
        self.early: set[str] = set()
        #: Pods whose agent the backend is asking now (kept by the backend).
        self.probing: set[str] = set()
        #: Pods that were ready once (slice or Ready condition): the EndpointSlice decides for them.
        self.seen_ready: set[str] = set()
        self._current: dict[str, Endpoint] = {}
        #: The pod objects (None: pods are not watched, the EndpointSlice alone decides).
        self._pods: dict[str, Pod] | None = None
        self._template: str | None = None

    def waiting(self) -> int:
        return sum(1 for future in self.pending if not future.done())

    def needed(self) -> int:
        """Pods the function needs right now: those handed out plus one per waiting start."""
        return len(self.assigned) + self.waiting()

    def observe(self, endpoints: Mapping[str, Endpoint], now: float, template: str | None = None) -> Observed:
        """Take the Service's current endpoints: lose vanished pods, serve waiting starts FIFO.

        ``template`` is the pod-name prefix of the Deployment's current template: during a rollout, pods
        of an older template (old code) are never handed out."""
        self._current = dict(endpoints)
        self._template = template
        return self._reconcile(now)

    def observe_pods(
        self, pods: Mapping[str, Pod], now: float, template: str | None = None, *, listed: bool = False
    ) -> Observed:
        """Take the function's current pod objects. ``listed``: they come from a (re)list, so a pod not
        seen before was not created for a waiting start as far as the gateway knows (it is not fresh)."""
        known = set(self._pods or {})
        if not listed and self.waiting():
            self.fresh |= set(pods) - known
        self.fresh &= set(pods)
        self._pods = dict(pods)
        self._template = template
        return self._reconcile(now)

    def _reconcile(self, now: float) -> Observed:
        endpoints, pods, template = self._current, self._pods, self._template
        observed = Observed()
        self.seen_ready |= {pod for pod, endpoint in endpoints.items() if endpoint.ready}
        if pods is not None:
            self.seen_ready |= {name for name, pod in pods.items() if pod.ready}
        self.seen_ready &= set(endpoints) | set(pods or {})
        for name, held in list(self.assigned.items()):
            current = endpoints.get(name)
            if name in self.early and current is not None and current.ready:
                self.early.discard(name)  # ready as any other pod from now on
            info = pods.get(name) if pods is not None else None
            if name in self.early:
                # Not in the EndpointSlice (or not ready there) yet: its pod object says whether it lives.
                gone = info is None or info.uid != held.uid or info.terminating
                gone = gone or (current is not None and (current.terminating or current.uid != held.uid))
            else:
                # Not-ready but alive is tolerated (an agent resetting its runtime); gone or stopping is not.
                gone = current is None or current.terminating or current.uid != held.uid
                gone = gone or (info is not None and (info.terminating or info.uid != held.uid))
            if gone:
                del self.assigned[name]
                self.early.discard(name)
                observed.lost.append(held)
        self.deleting &= set(endpoints) | set(pods or {})
        free: dict[str, Endpoint] = {}
        for name, endpoint in endpoints.items():
            eligible = template is None or name.startswith(template)
            info = pods.get(name) if pods is not None else None
            stopping = info is not None and (info.terminating or info.uid != endpoint.uid)
            if eligible and endpoint.ready and not stopping and name not in self.assigned and name not in self.deleting:
                free[name] = endpoint
        self.free_since = {name: self.free_since.get(name, now) for name in free}
        self.free = free
        while self.free and self.pending:
            future = self.pending.popleft()
            if future.done():
                continue
            endpoint = self._take()
            future.set_result(endpoint)
            observed.handed.append((future, endpoint))
        return observed

    def _usable_early(self, name: str) -> Pod | None:
        """The fresh pod ``name`` if it may be handed out on its agent's answer right now."""
        if self._pods is None or name not in self.fresh or name in self.seen_ready:
            return None
        pod = self._pods.get(name)
        if pod is None or not pod.reachable:
            return None
        if name in self.assigned or name in self.free or name in self.deleting:
            return None
        if self._template is not None and not name.startswith(self._template):
            return None
        return pod

    def candidates(self) -> list[Pod]:
        """Fresh pods whose agent is worth asking now: a start waits, the pod has an address and a running
        agent, is not stopping, was never ready, and is nobody's yet; none already being asked."""
        if not self.waiting():
            return []
        found = [self._usable_early(name) for name in sorted(self.fresh - self.probing)]
        return [pod for pod in found if pod is not None]

    def still_candidate(self, name: str, uid: str) -> Pod | None:
        """The pod being asked, if asking it is still worth it (same pod, still usable, a start waits)."""
        pod = self._usable_early(name)
        return pod if pod is not None and pod.uid == uid and self.waiting() else None

    def hand_over(self, name: str, uid: str) -> tuple[asyncio.Future[Endpoint], Endpoint] | None:
        """The agent of fresh pod ``name`` answered ready: give the pod to the oldest waiting start."""
        pod = self._usable_early(name)
        if pod is None or pod.uid != uid:
            return None
        while self.pending:
            future = self.pending.popleft()
            if future.done():
                continue
            endpoint = pod.endpoint()
            self.assigned[name] = endpoint
            self.early.add(name)
            self.fresh.discard(name)
            future.set_result(endpoint)
            return future, endpoint
        return None

    def _take(self) -> Endpoint:
        # The longest-ready free pod first: it has been waiting longest for work.
        pod = min(self.free, key=lambda name: self.free_since[name])
        endpoint = self.free.pop(pod)
        del self.free_since[pod]
        self.assigned[pod] = endpoint
        self.fresh.discard(pod)
        return endpoint

    def claim(self) -> Endpoint | None:
        """Hand out a free ready pod at once, if there is one."""
        return self._take() if self.free else None

    def wait(self, future: asyncio.Future[Endpoint]) -> None:
        self.pending.append(future)

    def forget(self, future: asyncio.Future[Endpoint]) -> None:
        """A start gave up (timeout, cancelled): it no longer counts, and a pod it got goes back."""
        if future in self.pending:
            self.pending.remove(future)
        if future.done() and not future.cancelled() and future.exception() is None:
            self.give_back(future.result())

    def give_back(self, endpoint: Endpoint) -> None:
        """A handed-out pod that was never used: free again (e.g. its start was cancelled); a pod handed
        out early goes back to waiting for its endpoint to be ready."""
        if self.assigned.pop(endpoint.pod, None) is not None:
            self.early.discard(endpoint.pod)
            current = self._current.get(endpoint.pod)
            if current is not None and current.ready:
                self.free[endpoint.pod] = current
                self.free_since.setdefault(endpoint.pod, 0.0)

    def release(self, pod: str) -> bool:
        """The dispatcher is done with this pod: it is to be deleted. False if it was not handed out."""
        held = self.assigned.pop(pod, None)
        self.early.discard(pod)
        self.fresh.discard(pod)
        self.deleting.add(pod)
        return held is not None

    def expired(self, now: float, idle_s: float) -> list[Endpoint]:
        """Free pods nobody took for ``idle_s``: marked deleting and returned (the caller deletes them)."""
        old = [pod for pod, since in self.free_since.items() if now - since >= idle_s]
        taken: list[Endpoint] = []
        for pod in old:
            taken.append(self.free.pop(pod))
            del self.free_since[pod]
            self.deleting.add(pod)
        return taken


# ---- Function objects ------------------------------------------------------------------------------


def function_of(obj: Mapping[str, Any]) -> Function:
    """A Function object from the API → the spec model (raises :class:`SpecError`)."""
    meta = obj.get("metadata") or {}
    document = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace") or "default",
            "labels": meta.get("labels") or {},
        },
        "spec": obj.get("spec") or {},
    }
    source = f"{meta.get('namespace')}/{meta.get('name')}"
    return parse_function(document, source)


def code_digest(function: Function) -> tuple[str, int]:
    """Lambda's CodeSha256 (base64 SHA-256) of the code as declared, and the inline code's size."""
    code = function.spec.code.model_dump(mode="json", exclude_none=True)
    digest = hashlib.sha256(json.dumps(code, sort_keys=True).encode()).digest()
    size = (
        sum(len(text.encode()) for text in function.spec.code.inline.files.values()) if function.spec.code.inline else 0
    )
    return base64.b64encode(digest).decode(), size


def lambda_time(timestamp: str | None) -> str:
    """A Kubernetes timestamp (``2026-11-26T22:10:15Z``) in Lambda's format (``...15.000+0000``)."""
    if not timestamp:
        return "1970-01-01T00:00:00.000+0000"
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def select_functions(
    objects: Iterable[Mapping[str, Any]], parse: Callable[[Mapping[str, Any]], Function] = function_of
) -> tuple[dict[str, tuple[Function, str]], list[SpecError]]:
    """Valid Functions by name (the oldest wins a name used in two namespaces), with their creation
    time; invalid ones as errors. ``parse`` may be a cached :func:`function_of`."""
    chosen: dict[str, tuple[Function, str]] = {}
    errors: list[SpecError] = []
    ordered = sorted(objects, key=lambda o: str((o.get("metadata") or {}).get("creationTimestamp") or ""))
    for obj in ordered:
        meta = obj.get("metadata") or {}
        try:
            function = parse(obj)
        except SpecError as exc:
            errors.append(exc)
            continue
        if function.name in chosen:
            other = chosen[function.name][0].metadata.namespace
            errors.append(
                SpecError(
                    f"{function.metadata.namespace}/{function.name}",
                    "metadata.name",
                    f"{function.name!r} is already served from namespace {other}",
                )
            )
            continue
        chosen[function.name] = (function, str(meta.get("creationTimestamp") or ""))
    return chosen, errors
