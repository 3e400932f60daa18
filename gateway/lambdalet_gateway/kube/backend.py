"""The Kubernetes backend: each execution environment is one ready pod of the function's Deployment.

Watches (list, then watch from the list's resourceVersion; relist on 410 Gone), per served namespace or
across all of them:

- ``Function`` objects → the dispatcher's functions (through :class:`FunctionWatch`, the registry the app
  runs in place of the manifest registry); a deleted Function's next invocation is a 404;
- the functions' Deployments → their replica count;
- the functions' ReplicaSets → the current pod template (during a rollout, pods of an older template, that
  is older code, are never handed out);
- the functions' EndpointSlices (``kubernetes.io/service-name=<function>``) → ready pods (no polling);
- the functions' pods (``lambdalet.dev/function``) → address, agent container running, deletionTimestamp.

``start`` hands out a ready pod nobody holds (one adopted at gateway start, or left over) or raises the
Deployment's replicas through the ``scale`` subresource to the pods held plus the starts waiting (never
above reservedConcurrency) and returns with the first new pod whose agent is ready. A pod that appeared
while a start waited (the gateway scaled up for it) is asked directly as soon as it has an address and a
running agent container: ``GET /readyz`` on its agent, every few milliseconds with back-off, for at most
``PROBE_LIMIT_S``; on a 200 it goes to the oldest waiting start, before the kubelet's next readiness
probe and the EndpointSlice say it is ready (as Knative's activator probes new pods). Every other pod —
adopted at gateway start, ready once and not any more, of an older template — is used only when its
EndpointSlice endpoint is ready; a pod with a deletionTimestamp is never handed out. ``stop`` is only called for an
environment with no invocation in flight (the dispatcher stops idle or finished environments only); it
deletes exactly that pod, then lowers the replicas by one. In that order a ReplicaSet never picks a pod
itself: if it sees the deletion before the new count it starts a replacement, and the lower count then
removes a not-yet-ready pod (a ReplicaSet scales down unscheduled, pending and not-ready pods first),
never a ready pod that may be serving an invocation. A pod in use that is not Ready yet (handed out on its
agent's answer) would be the ReplicaSet's first choice, so the count is lowered only once every pod in use
is ready (or not at all, after ``LOWER_WAIT_S``: the spare pod is then idle and removed later). Replicas
never go below provisionedConcurrency, and a ready pod nobody holds for idleTimeoutSeconds is removed the
same way.

Instances the gateway sees disappear (pod deleted or terminating) are reported lost; an invocation that
meets a refused or reset connection makes the dispatcher stop that environment, which deletes the pod
(a refused connection, where nothing was sent, is delivered to another environment).

Gateway restarts: ready pods that are running when the gateway starts are adopted (handed out to the
dispatcher's starts first, before any scaling); when the gateway shuts down its pods are left running
for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp

from lambdalet.spec import Function, SpecError
from lambdalet_gateway.backend import Environment, EnvironmentId, LostCallback, StartError
from lambdalet_gateway.registry import Catalog, FunctionRecord, Registry
from lambdalet_gateway.settings import Settings

from .api import (
    DEPLOYMENTS,
    ENDPOINT_SLICES,
    FUNCTIONS,
    PODS,
    REPLICA_SETS,
    Conflict,
    Gone,
    KubeApi,
    KubeError,
    NotFound,
    Obj,
)
from .book import (
    FUNCTION_LABEL,
    Endpoint,
    EndpointBook,
    Instances,
    Observed,
    Pod,
    PodBook,
    ServiceKey,
    Templates,
    code_digest,
    function_of,
    lambda_time,
    select_functions,
)

log = logging.getLogger("lambdalet.gateway.kube")

SLICE_SELECTOR: Final = f"kubernetes.io/service-name,{FUNCTION_LABEL}"
#: How long a start waits for a ready pod (image pulls and slow inits included).
START_LIMIT_S: Final = 120.0
CONNECT_LIMIT_S: Final = 60.0
RETRY_S: Final = 1.0
#: How often free pods are checked against their idle timeout (local bookkeeping, no API calls).
REAP_INTERVAL_S: Final = 1.0
#: Asking a new pod's agent ``GET /readyz``: the first interval, doubled up to the cap after each miss
#: (a refused connection or a 503 costs the agent next to nothing; the cap bounds how late a ready agent
#: is noticed), for at most PROBE_LIMIT_S (after that the pod is used once its EndpointSlice says ready).
PROBE_FIRST_INTERVAL_S: Final = 0.005
PROBE_MAX_INTERVAL_S: Final = 0.05
PROBE_LIMIT_S: Final = 60.0
PROBE_TIMEOUT_S: Final = 1.0
#: ``0``/``false``: never ask agents directly; every pod waits for its EndpointSlice endpoint (the kubelet's
#: readiness probe), as before this path existed. For comparisons (benchmarks.k8s_cold_start) and as a way out.
PROBE_AGENTS_VARIABLE: Final = "LAMBDALET_KUBE_PROBE_AGENTS"
#: How long lowering the replicas waits for pods in use to be Ready (see the module docstring).
LOWER_WAIT_S: Final = 30.0
LOWER_POLL_S: Final = 0.1


@dataclass(eq=False)
class _FunctionState:
    function: Function
    instances: Instances = field(default_factory=Instances)
    #: The Deployment's spec.replicas as last seen (None: not seen yet).
    replicas: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    removed: bool = False

    @property
    def namespace(self) -> str:
        return self.function.metadata.namespace

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def key(self) -> ServiceKey:
        return self.namespace, self.name


class Api(Protocol):
    """What the backend needs of :class:`~lambdalet_gateway.kube.api.KubeApi` (tests pass a fake)."""

    async def list(self, kind: tuple[str, str], namespace: str | None, selector: str = "") -> tuple[list[Obj], str]: ...

    def watch(
        self, kind: tuple[str, str], namespace: str | None, resource_version: str, selector: str = ""
    ) -> AsyncIterator[Obj]: ...

    async def get_scale(self, namespace: str, deployment: str) -> int: ...

    async def set_scale(self, namespace: str, deployment: str, replicas: int) -> int: ...

    async def delete_pod(self, namespace: str, name: str, uid: str | None) -> None: ...

    async def close(self) -> None: ...


class FunctionWatch(Registry):
    """The function registry of a gateway on Kubernetes: Functions come from the API, not manifests."""

    def __init__(self, backend: KubernetesBackend, on_change: Callable[[Catalog], None]) -> None:
        super().__init__((), on_change)
        self._backend = backend

    def publish(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._on_change(catalog)

    async def reload(self) -> bool:
        """Connect, list everything, start the watches (the first call); later calls change nothing."""
        await self._backend.open(self)
        return True

    async def run(self, interval: float) -> None:
        try:
            await self._backend.run()
        finally:
            # The app cancels this first when it shuts down: from then on the pods outlive the gateway.
            self._backend.detach()


class KubernetesBackend:
    def __init__(
        self,
        settings: Settings,
        on_lost: LostCallback,
        *,
        environ: Mapping[str, str] | None = None,
        api: Api | None = None,
    ) -> None:
        self._settings = settings
        self._on_lost = on_lost
        self._environ = dict(os.environ if environ is None else environ)
        self._probe_agents = settings.kube_probe_agents
        self._scopes: tuple[str | None, ...] = settings.namespaces or (None,)
        self._api: Api | None = api
        self._detached = False
        self._opened = False
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()
        self._registry: FunctionWatch | None = None
        self._function_objects: dict[tuple[str, str], Obj] = {}
        self._parsed: dict[tuple[str, str], tuple[object, Function | SpecError]] = {}
        self._replicas: dict[tuple[str, str], int] = {}
        self._book = EndpointBook()
        self._pods = PodBook()
        #: Scopes whose pods have been listed (the pod view of a function is known only then).
        self._pod_scopes: set[str | None] = set()
        self._session: aiohttp.ClientSession | None = None
        self._templates = Templates()
        self._states: dict[str, _FunctionState] = {}
        self._envs: dict[tuple[str, str], Environment] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._watches: list[asyncio.Task[None]] = []

    # ---- wiring ----------------------------------------------------------------------------------

    def registry(self, on_change: Callable[[Catalog], None]) -> FunctionWatch:
        self._registry = FunctionWatch(self, on_change)
        return self._registry

    async def open(self, registry: FunctionWatch) -> None:
        if self._opened:
            return
        self._opened = True
        self._registry = registry
        if self._api is None:
            self._api = await KubeApi.connect(self._environ)
        kinds: list[
            tuple[tuple[str, str], str, Callable[[str | None, list[Obj]], None], Callable[[str, Obj], None]]
        ] = [
            (FUNCTIONS, "", self._functions_listed, self._function_event),
            (DEPLOYMENTS, FUNCTION_LABEL, self._deployments_listed, self._deployment_event),
            (REPLICA_SETS, FUNCTION_LABEL, self._replica_sets_listed, self._replica_set_event),
            (ENDPOINT_SLICES, SLICE_SELECTOR, self._slices_listed, self._slice_event),
            (PODS, FUNCTION_LABEL, self._pods_listed, self._pod_event),
        ]
        for scope in self._scopes:
            for kind, selector, listed, event in kinds:
                try:
                    items, version = await self._api.list(kind, scope, selector)
                except KubeError as exc:
                    if kind == FUNCTIONS:
                        raise  # no functions to serve: fail fast (credentials, RBAC, CRD missing)
                    log.warning("listing %s in %s failed (the watch retries): %s", kind[1], scope or "all", exc)
                    version = ""
                else:
                    listed(scope, items)
                self._watches.append(
                    asyncio.create_task(
                        self._watch(kind, scope=scope, selector=selector, version=version, listed=listed, event=event),
                        name=f"lambdalet-watch-{kind[1]}",
                    )
                )
        self._spawn(self._reap())
        self._connected.set()
        log.info("watching Functions in %s", ", ".join(s or "all namespaces" for s in self._scopes))

    async def run(self) -> None:
        await self._closed.wait()

    def detach(self) -> None:
        """The gateway is shutting down: stopping an environment now only forgets it, so its pod stays
        ready for the next gateway to adopt (or to remove after the function's idle timeout)."""
        self._detached = True

    async def _watch(
        self,
        kind: tuple[str, str],
        *,
        scope: str | None,
        selector: str,
        version: str,
        listed: Callable[[str | None, list[Obj]], None],
        event: Callable[[str, Obj], None],
    ) -> None:
        assert self._api is not None
        while not self._closed.is_set():
            try:
                if not version:
                    items, version = await self._api.list(kind, scope, selector)
                    listed(scope, items)
                async for change in self._api.watch(kind, scope, version, selector):
                    obj = change.get("object") or {}
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if change.get("type") != "BOOKMARK":
                        event(str(change.get("type")), obj)
            except Gone:
                version = ""
            except KubeError as exc:
                log.warning("watching %s in %s failed (retrying): %s", kind[1], scope or "all namespaces", exc)
                version = ""
                await asyncio.sleep(RETRY_S)
            except Exception:
                log.exception("handling a %s event failed", kind[1])
                version = ""
                await asyncio.sleep(RETRY_S)

    # ---- Functions -------------------------------------------------------------------------------

    def _functions_listed(self, scope: str | None, items: list[Obj]) -> None:
        for key in [k for k in self._function_objects if scope is None or k[0] == scope]:
            del self._function_objects[key]
        for obj in items:
            self._function_objects[_key(obj)] = obj
        self._parsed = {key: value for key, value in self._parsed.items() if key in self._function_objects}
        self._publish()

    def _function_event(self, event_type: str, obj: Obj) -> None:
        if event_type == "DELETED":
            self._function_objects.pop(_key(obj), None)
            self._parsed.pop(_key(obj), None)
        else:
            known = self._function_objects.get(_key(obj))
            if known is not None and _generation(known) == _generation(obj):
                self._function_objects[_key(obj)] = obj
                return  # a status update: nothing the gateway serves changed
            self._function_objects[_key(obj)] = obj
        self._publish()

    def _publish(self) -> None:
        chosen, errors = select_functions(self._function_objects.values(), self._parse)
        for error in errors:
            log.error("invalid Function: %s", error)
        records: dict[str, FunctionRecord] = {}
        for name, (function, created) in chosen.items():
            sha, size = code_digest(function)
            source = Path(function.metadata.namespace) / "functions" / name
            records[name] = FunctionRecord(function, source, sha, size, lambda_time(created))
        for name, state in list(self._states.items()):
            current = chosen.get(name)
            if current is None or current[0].metadata.namespace != state.namespace:
                self._drop(state)
            else:
                state.function = current[0]
        if self._registry is not None:
            self._registry.publish(Catalog(records, tuple(errors)))

    def _parse(self, obj: Mapping[str, Any]) -> Function:
        """``function_of``, once per object generation (every Function event republishes them all)."""
        meta = obj.get("metadata") or {}
        version = (meta.get("uid"), meta.get("generation"))
        cached = self._parsed.get(_key(obj))
        if cached is None or cached[0] != version:
            try:
                cached = (version, function_of(obj))
            except SpecError as exc:
                cached = (version, exc)
            self._parsed[_key(obj)] = cached
        if isinstance(cached[1], SpecError):
            raise cached[1]
        return cached[1]

    def _drop(self, state: _FunctionState) -> None:
        state.removed = True
        del self._states[state.name]
        for future in state.instances.pending:
            if not future.done():
                future.set_exception(StartError(f"function {state.name} was deleted"))
        state.instances.pending.clear()

    def _state(self, function: Function) -> _FunctionState:
        state = self._states.get(function.name)
        if state is None or state.namespace != function.metadata.namespace:
            state = _FunctionState(function)
            state.replicas = self._replicas.get(state.key)
            self._states[function.name] = state
            self._observe(state)
            self._observe_pods(state, listed=True)
        return state

    # ---- Deployments -----------------------------------------------------------------------------

    def _deployments_listed(self, scope: str | None, items: list[Obj]) -> None:
        for key in [k for k in self._replicas if scope is None or k[0] == scope]:
            del self._replicas[key]
        for obj in items:
            self._deployment_event("ADDED", obj)

    def _deployment_event(self, event_type: str, obj: Obj) -> None:
        key = _key(obj)
        if event_type == "DELETED":
            self._replicas.pop(key, None)
            return
        replicas = int((obj.get("spec") or {}).get("replicas") or 0)
        self._replicas[key] = replicas
        state = self._states.get(key[1])
        if state is not None and state.key == key and not state.lock.locked():
            state.replicas = replicas
            if state.instances.needed() > replicas:
                self._spawn(self._raise(state))

    # ---- ReplicaSets (which pods run the current template) -------------------------------------

    def _replica_sets_listed(self, scope: str | None, items: list[Obj]) -> None:
        for key in self._templates.replace(scope, items):
            self._service_changed(key)

    def _replica_set_event(self, event_type: str, obj: Obj) -> None:
        key = self._templates.apply(event_type, obj)
        if key is not None:
            self._service_changed(key)

    # ---- EndpointSlices --------------------------------------------------------------------------

    def _slices_listed(self, scope: str | None, items: list[Obj]) -> None:
        for key in self._book.replace(scope, items):
            self._service_changed(key)

    def _slice_event(self, event_type: str, obj: Obj) -> None:
        key = self._book.apply(event_type, obj)
        if key is not None:
            self._service_changed(key)

    def _service_changed(self, key: ServiceKey) -> None:
        state = self._states.get(key[1])
        if state is not None and state.key == key:
            self._observe(state)

    def _observe(self, state: _FunctionState) -> None:
        endpoints = self._book.endpoints(state.key)
        observed = state.instances.observe(endpoints, time.monotonic(), self._templates.prefix(state.key))
        self._report(state, observed)
        self._probe_candidates(state)

    # ---- Pods (new pods used as soon as their agent answers) -------------------------------------

    def _pods_listed(self, scope: str | None, items: list[Obj]) -> None:
        self._pod_scopes.add(scope)
        self._pods.replace(scope, items)
        for state in list(self._states.values()):
            if scope is None or state.namespace == scope:
                self._observe_pods(state, listed=True)

    def _pod_event(self, event_type: str, obj: Obj) -> None:
        key = self._pods.apply(event_type, obj)
        state = self._states.get(key[1]) if key is not None else None
        if state is not None and state.key == key:
            self._observe_pods(state, listed=False)

    def _observe_pods(self, state: _FunctionState, *, listed: bool) -> None:
        if None not in self._pod_scopes and state.namespace not in self._pod_scopes:
            return  # not listed (yet): the EndpointSlice alone decides
        pods = self._pods.pods(state.key)
        template = self._templates.prefix(state.key)
        observed = state.instances.observe_pods(pods, time.monotonic(), template, listed=listed)
        self._report(state, observed)
        self._probe_candidates(state)

    def _probe_candidates(self, state: _FunctionState) -> None:
        if not self._probe_agents:
            return
        for pod in state.instances.candidates():
            state.instances.probing.add(pod.name)
            self._spawn(self._probe(state, pod))

    async def _probe(self, state: _FunctionState, pod: Pod) -> None:
        """Ask the new pod's agent until it is ready, then hand the pod to the oldest waiting start;
        stop as soon as the pod is no longer worth asking (stopping, ready by its endpoint, nobody waits)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROBE_LIMIT_S
        interval = PROBE_FIRST_INTERVAL_S
        try:
            while not state.removed:
                current = state.instances.still_candidate(pod.name, pod.uid)
                if current is None:
                    return
                if loop.time() >= deadline:
                    state.instances.fresh.discard(pod.name)  # from now on its EndpointSlice decides
                    log.info(
                        "pod %s/%s: its agent was not ready within %g s; waiting for its endpoint",
                        state.namespace,
                        pod.name,
                        PROBE_LIMIT_S,
                    )
                    return
                if await self._agent_ready(current.endpoint().url):
                    if state.instances.hand_over(pod.name, pod.uid) is not None:
                        log.info(
                            "pod %s/%s: its agent is ready before the pod is; handed to a waiting start",
                            state.namespace,
                            pod.name,
                            extra={"function": state.name, "namespace": state.namespace, "pod": pod.name},
                        )
                    return
                await asyncio.sleep(interval)
                interval = min(interval * 2, PROBE_MAX_INTERVAL_S)
        finally:
            state.instances.probing.discard(pod.name)

    async def _agent_ready(self, url: str) -> bool:
        """``GET /readyz`` on an agent answered 200 (anything else, or no answer in time, is not ready)."""
        if self._session is None:
            # One connection per probe, closed after it: pods come and go, nothing is worth keeping open.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
            )
        try:
            async with self._session.get(f"{url}/readyz") as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _report(self, state: _FunctionState, observed: Observed) -> None:
        for endpoint in observed.lost:
            env = self._envs.pop((state.namespace, endpoint.pod), None)
            if env is not None:
                log.warning(
                    "environment %s of %s is gone (pod deleted or stopping)", env.id, state.name, extra=_fields(env)
                )
                self._on_lost(env)

    # ---- Backend ---------------------------------------------------------------------------------

    async def start(self, function: Function, *, provisioned: bool) -> Environment:
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), CONNECT_LIMIT_S)
            except TimeoutError:
                raise StartError("the gateway is not connected to the Kubernetes API") from None
        state = self._state(function)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_LIMIT_S
        while True:
            endpoint = state.instances.claim()
            if endpoint is None:
                endpoint = await self._wait_for_pod(state, deadline)
            if endpoint.pod in state.instances.assigned:
                break
            # Lost between being handed out and this task resuming: wait for another.
        early = endpoint.pod in state.instances.early
        env = Environment(
            id=EnvironmentId(f"{state.namespace}/{endpoint.pod}"),
            function=function.name,
            url=endpoint.url,
            provisioned=provisioned,
            handle=endpoint,
        )
        self._envs[(state.namespace, endpoint.pod)] = env
        log.info(
            "environment %s of %s ready at %s%s",
            env.id,
            function.name,
            env.url,
            " (its agent answered; the pod is not Ready yet)" if early else "",
            extra=_fields(env),
        )
        return env

    async def _wait_for_pod(self, state: _FunctionState, deadline: float) -> Endpoint:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Endpoint] = loop.create_future()
        state.instances.wait(future)
        self._spawn(self._raise(state))
        self._probe_candidates(state)
        try:
            done, _ = await asyncio.wait({future}, timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:
            state.instances.forget(future)
            raise
        if not done:
            state.instances.forget(future)
            raise StartError(
                f"no pod of Deployment {state.namespace}/{state.name} became ready within {START_LIMIT_S:g} s "
                f"(replicas {state.replicas}); see `kubectl describe deployment -n {state.namespace} {state.name}`"
            )
        return future.result()

    async def stop(self, environment: Environment) -> None:
        """Delete the environment's pod, then lower the replicas by one (see the module docstring)."""
        endpoint = environment.handle
        if not isinstance(endpoint, Endpoint):
            return
        namespace = environment.id.split("/", 1)[0]
        self._envs.pop((namespace, endpoint.pod), None)
        state = self._states.get(environment.function)
        if state is not None and state.namespace != namespace:
            state = None
        if state is not None:
            state.instances.release(endpoint.pod)
        if not self._detached:
            await self._remove(state, namespace, endpoint)

    async def _remove(self, state: _FunctionState | None, namespace: str, endpoint: Endpoint) -> None:
        assert self._api is not None
        try:
            await self._api.delete_pod(namespace, endpoint.pod, endpoint.uid)
        except (NotFound, Conflict):
            # Already gone: its ReplicaSet has replaced it (the replacement is a free pod) or will not.
            return
        except KubeError as exc:
            log.warning("could not delete pod %s/%s: %s", namespace, endpoint.pod, exc)
            if state is not None:
                state.instances.deleting.discard(endpoint.pod)
            return
        if state is not None and not state.removed:
            await self._lower(state)

    async def close(self) -> None:
        self._closed.set()
        for task in [*self._watches, *self._tasks]:
            task.cancel()
        for task in [*self._watches, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for state in list(self._states.values()):
            self._drop(state)
        if self._session is not None:
            await self._session.close()
        if self._api is not None:
            await self._api.close()

    # ---- scaling ---------------------------------------------------------------------------------

    async def _current_replicas(self, state: _FunctionState) -> int | None:
        assert self._api is not None
        if state.replicas is None:
            try:
                state.replicas = await self._api.get_scale(state.namespace, state.name)
            except NotFound:
                return None  # not created yet: the Deployment's ADDED event raises it
        return state.replicas

    async def _raise(self, state: _FunctionState) -> None:
        """Replicas up to the pods held plus the starts waiting, capped by reservedConcurrency."""
        assert self._api is not None
        async with state.lock:
            if state.removed:
                return
            current = await self._current_replicas(state)
            if current is None:
                return
            target = state.instances.needed()
            cap = state.function.spec.reservedConcurrency
            if cap is not None:
                target = min(target, cap)
            if target <= current:
                return
            try:
                state.replicas = await self._api.set_scale(state.namespace, state.name, target)
            except NotFound:
                state.replicas = None
                return
            except KubeError as exc:
                log.warning("scaling %s/%s to %d failed (retrying): %s", state.namespace, state.name, target, exc)
                state.replicas = None
                self._spawn(self._later(RETRY_S, self._raise(state)))
                return
            log.info(
                "scaled %s/%s from %d to %d replicas",
                state.namespace,
                state.name,
                current,
                target,
                extra={"function": state.name, "namespace": state.namespace, "replicas": target},
            )

    async def _lower(self, state: _FunctionState) -> None:
        """One pod was deleted: one replica less, but not below what is needed or provisioned."""
        assert self._api is not None
        # A pod in use that is not Ready yet is the one a ReplicaSet removes first when the count drops
        # before it has seen the deletion: wait until the pods in use are ready.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOWER_WAIT_S
        while state.instances.early:
            if state.removed or self._detached:
                return  # the function is gone, or the gateway is shutting down: its pods stay as they are
            if loop.time() >= deadline:
                log.warning(
                    "not lowering the replicas of %s/%s: pods in use are still not Ready (%s)",
                    state.namespace,
                    state.name,
                    ", ".join(sorted(state.instances.early)),
                )
                return
            await asyncio.sleep(LOWER_POLL_S)
        async with state.lock:
            if state.removed:
                return
            # The server's count, not the last watch event: a stale count could lower by two, and the
            # ReplicaSet would then choose the second pod itself.
            try:
                current = state.replicas = await self._api.get_scale(state.namespace, state.name)
            except KubeError as exc:
                log.warning("reading the scale of %s/%s failed: %s", state.namespace, state.name, exc)
                return
            spec = state.function.spec
            floor = spec.provisionedConcurrency
            if spec.reservedConcurrency is not None:
                floor = min(floor, spec.reservedConcurrency)
            target = max(current - 1, state.instances.needed(), floor, 0)
            if target >= current:
                return
            try:
                state.replicas = await self._api.set_scale(state.namespace, state.name, target)
            except KubeError as exc:
                log.warning("scaling %s/%s down to %d failed: %s", state.namespace, state.name, target, exc)
                state.replicas = None
                return
            log.info(
                "scaled %s/%s from %d to %d replicas",
                state.namespace,
                state.name,
                current,
                target,
                extra={"function": state.name, "namespace": state.namespace, "replicas": target},
            )

    async def _reap(self) -> None:
        """Remove ready pods nobody took within the function's idle timeout (adopted or left over)."""
        while not self._closed.is_set():
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            for state in list(self._states.values()):
                for endpoint in state.instances.expired(now, float(state.function.spec.idleTimeoutSeconds)):
                    log.info("removing pod %s/%s: idle and not in use", state.namespace, endpoint.pod)
                    self._spawn(self._remove(state, state.namespace, endpoint))

    async def _later(self, delay: float, work: Awaitable[None]) -> None:
        await asyncio.sleep(delay)
        await work

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("Kubernetes backend task failed", exc_info=task.exception())


def _fields(env: Environment) -> dict[str, str]:
    """Structured log fields of an environment (as the dispatcher logs them)."""
    return {"function": env.function, "environment": env.id}


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _generation(obj: Mapping[str, Any]) -> object:
    return (obj.get("metadata") or {}).get("generation")
