"""Pure bookkeeping for the Kubernetes backend: no I/O, no clock (time is passed in), no tasks.

:class:`EndpointBook` folds EndpointSlice events into the ready pods of each Service (a Service's
endpoints may be spread over several slices; a pod may briefly appear in two). :class:`Instances` is one
function's view of its pods: which are handed out as environments, which starts wait for a pod, which
ready pods nobody holds yet (adopted at gateway start, or left over), and which are being deleted.
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
from typing import Any

from lambdalet.spec import Function, SpecError, parse_function

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_PORT = 8080
PORT_NAME = "http"

ServiceKey = tuple[str, str]  # (namespace, Service name)


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


class EndpointBook:
    """Every watched EndpointSlice, folded into endpoints per Service."""

    def __init__(self) -> None:
        self._slices: dict[ServiceKey, dict[str, tuple[Endpoint, ...]]] = {}

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
        slices = self._slices.setdefault(key, {})
        if event_type == "DELETED":
            slices.pop(name, None)
            if not slices:
                del self._slices[key]
        else:
            slices[name] = slice_endpoints(obj)
        return key

    def replace(self, namespace: str | None, items: Iterable[Mapping[str, Any]]) -> set[ServiceKey]:
        """A fresh list of one namespace's slices (``None``: all): return every Service that may differ."""
        touched = {key for key in self._slices if namespace is None or key[0] == namespace}
        for key in touched:
            del self._slices[key]
        for obj in items:
            added = self.apply("ADDED", obj)
            if added is not None:
                touched.add(added)
        return touched

    def endpoints(self, key: ServiceKey) -> dict[str, Endpoint]:
        """Pod name → endpoint; when two slices list a pod, the ready entry wins."""
        merged: dict[str, Endpoint] = {}
        for endpoints in self._slices.get(key, {}).values():
            for endpoint in endpoints:
                known = merged.get(endpoint.pod)
                if known is None or (endpoint.ready and not known.ready):
                    merged[endpoint.pod] = endpoint
        return merged


REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
TEMPLATE_HASH_LABEL = "pod-template-hash"


class Templates:
    """Every watched ReplicaSet, folded into the current pod template of each Deployment: the newest
    revision's ``pod-template-hash``, which names its pods ``<deployment>-<hash>-<suffix>``."""

    def __init__(self) -> None:
        self._sets: dict[ServiceKey, dict[str, tuple[int, str]]] = {}

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
        sets = self._sets.setdefault(key, {})
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
            del self._sets[key]
        return key

    def replace(self, namespace: str | None, items: Iterable[Mapping[str, Any]]) -> set[ServiceKey]:
        touched = {key for key in self._sets if namespace is None or key[0] == namespace}
        for key in touched:
            del self._sets[key]
        for obj in items:
            added = self.apply("ADDED", obj)
            if added is not None:
                touched.add(added)
        return touched

    def prefix(self, key: ServiceKey) -> str | None:
        """The pod-name prefix of the current template's pods (None: not known, any pod will do)."""
        sets = self._sets.get(key)
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
    (``assigned``), ``free`` (ready, nobody holds it), ``deleting``; anything else is starting."""

    def __init__(self) -> None:
        self.assigned: dict[str, Endpoint] = {}
        self.free: dict[str, Endpoint] = {}
        #: When each free pod became free (the caller's monotonic clock).
        self.free_since: dict[str, float] = {}
        self.deleting: set[str] = set()
        self.pending: deque[asyncio.Future[Endpoint]] = deque()
        self._current: dict[str, Endpoint] = {}

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
        observed = Observed()
        for pod, held in list(self.assigned.items()):
            current = endpoints.get(pod)
            # Not-ready but alive is tolerated (an agent resetting its runtime); gone or stopping is not.
            if current is None or current.terminating or current.uid != held.uid:
                del self.assigned[pod]
                observed.lost.append(held)
        self.deleting &= set(endpoints)
        free: dict[str, Endpoint] = {}
        for pod, endpoint in endpoints.items():
            eligible = template is None or pod.startswith(template)
            if eligible and endpoint.ready and pod not in self.assigned and pod not in self.deleting:
                free[pod] = endpoint
        self.free_since = {pod: self.free_since.get(pod, now) for pod in free}
        self.free = free
        while self.free and self.pending:
            future = self.pending.popleft()
            if future.done():
                continue
            endpoint = self._take()
            future.set_result(endpoint)
            observed.handed.append((future, endpoint))
        return observed

    def _take(self) -> Endpoint:
        # The longest-ready free pod first: it has been waiting longest for work.
        pod = min(self.free, key=lambda name: self.free_since[name])
        endpoint = self.free.pop(pod)
        del self.free_since[pod]
        self.assigned[pod] = endpoint
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
        """A handed-out pod that was never used: free again (e.g. its start was cancelled)."""
        if self.assigned.pop(endpoint.pod, None) is not None:
            current = self._current.get(endpoint.pod)
            if current is not None and current.ready:
                self.free[endpoint.pod] = current
                self.free_since.setdefault(endpoint.pod, 0.0)

    def release(self, pod: str) -> bool:
        """The dispatcher is done with this pod: it is to be deleted. False if it was not handed out."""
        held = self.assigned.pop(pod, None)
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
