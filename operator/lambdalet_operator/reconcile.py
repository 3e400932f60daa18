"""Reconciling one Function: validate, build the children (``manifests``), apply them through the API
client, and report ``.status``.

The API client is passed in (``Api``, the small interface ``kube.Kube`` implements), so this module is
tested with an in-memory fake. Writers of a Function's status hold that Function's lock and read the
Deployment fresh inside it: the last writer always reports the newest state, so status never goes back
in time.

Children are written only when they differ from what the operator would write (``drift.differences``:
the operator's own fields, not the ones the API server fills in), so a reconcile of an unchanged Function
writes nothing, and a child the server mutates on write converges after that one write. A child deleted
or changed by hand is put back by ``repair`` (called from the child watches in ``handlers``), at most
``REPAIR_LIMIT`` times per ``REPAIR_WINDOW_SECONDS`` per Function (``RepairBudget``): past that, something
keeps changing the children back, and repairs wait instead of fighting it. What a repair did, or why it
could not, is the Function's ``ChildrenInSync`` condition (``status``).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from lambdalet.spec import API_VERSION, KIND, Function, SpecError, all_errors, parse_function, validate_for_cluster
from lambdalet_operator import drift, manifests, status
from lambdalet_operator.kube import Conflict, Forbidden, Invalid, KubeError, Obj
from lambdalet_operator.settings import Settings

logger = logging.getLogger("lambdalet.operator")

#: Deployment annotation: the Function generation its template was built from.
GENERATION_ANNOTATION: Final = "lambdalet.dev/function-generation"
CODE_RETRY_SECONDS: Final = 10.0
CONFLICT_RETRY_SECONDS: Final = 30.0
#: Repairs of one Function's children allowed per window; past that, the next one waits.
REPAIR_LIMIT: Final = 10
REPAIR_WINDOW_SECONDS: Final = 60.0
#: A repair stopped by an API error is tried again after this long (a missing permission: longer).
API_RETRY_SECONDS: Final = 5.0
FORBIDDEN_RETRY_SECONDS: Final = 30.0


class Api(Protocol):
    async def get(self, kind: str, namespace: str, name: str) -> Obj | None: ...
    async def create(self, obj: Mapping[str, Any]) -> Obj: ...
    async def merge_patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj: ...
    async def replace(self, obj: Mapping[str, Any], resource_version: str) -> Obj: ...
    async def delete(self, kind: str, namespace: str, name: str) -> None: ...
    async def patch_function_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Obj: ...


@dataclass(frozen=True)
class Outcome:
    """What a reconcile decided; the kopf handler turns it into success, a retry, or a permanent error."""

    reason: status.Reason
    message: str
    retry_after: float | None = None  # transient: try again later
    permanent: bool = False  # the spec itself must change
    #: Children written, as "created Service f", "updated NetworkPolicy f (spec.egress)", "deleted ...".
    changes: tuple[str, ...] = ()
    #: Whether those writes put back children changed outside the Function (its spec was already applied).
    repaired: bool = False
    #: Children the API server did not keep as written, with the fields it changed back.
    refused: tuple[str, ...] = ()


@dataclass
class Applied:
    """What one apply wrote, and what the API server did not keep."""

    changes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class Locks:
    """One asyncio lock per Function (the operator is a single process: ``kopf run --standalone``)."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def __call__(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        lock = self._locks.get((namespace, name))
        if lock is not None and not lock.locked():
            del self._locks[(namespace, name)]


class NameTaken(Exception):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(
            f"a {kind} named {name!r} already exists and is not owned by this Function; "
            f"delete or rename it, or rename the Function"
        )


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def parse(body: Mapping[str, Any]) -> tuple[Function | None, list[str]]:
    """The Function model of a custom resource, or the problems that make it invalid (field: rule)."""
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", meta.get("name")
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": body.get("spec") or {},
    }
    source = f"Function {namespace}/{name}"
    errors = all_errors(document, source)
    if errors:
        return None, [f"{e.field}: {e.rule}" for e in errors]
    function = parse_function(document, source)
    try:
        validate_for_cluster(function, source)
    except SpecError as exc:
        return None, [f"{exc.field}: {exc.rule}"]
    return function, []


async def ensure(
    api: Api,
    desired: Mapping[str, Any],
    uid: str,
    *,
    replace: bool = False,
    applied: Applied | None = None,
    **on_create: Any,
) -> Obj:
    """Create ``desired`` or bring the existing object in line with it (merge patch, or a full replace
    for objects whose keys must be able to disappear), writing nothing when the operator's fields already
    match (``drift.differences``). ``on_create`` adds top-level ``spec`` fields that are set only at
    creation. What was written, and what the server did not keep, goes to ``applied``."""
    applied = applied if applied is not None else Applied()
    kind, meta = desired["kind"], desired["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current = await api.get(kind, namespace, name)
    if current is None:
        body = dict(desired)
        if on_create:
            body["spec"] = {**body["spec"], **on_create}
        try:
            written = await api.create(body)
        except Conflict:
            current = await api.get(kind, namespace, name)
            if current is None:
                raise
        else:
            applied.changes.append(f"created {kind} {name}")
            _check_kept(desired, written, applied)
            return written
    if not owned_by(current, meta["ownerReferences"][0]["uid"]):
        raise NameTaken(kind, name)
    differing = drift.differences(desired, current)
    if not differing:
        return current
    if replace:
        written = await api.replace(desired, str(current["metadata"]["resourceVersion"]))
    else:
        patch = {key: value for key, value in desired.items() if key not in {"apiVersion", "kind", "metadata"}}
        patch["metadata"] = {
            "labels": meta["labels"],
            "annotations": meta.get("annotations", {}),
            "ownerReferences": meta["ownerReferences"],
        }
        written = await api.merge_patch(kind, namespace, name, patch)
    applied.changes.append(f"updated {kind} {name} ({', '.join(differing)})")
    _check_kept(desired, written, applied)
    return written


def _check_kept(desired: Mapping[str, Any], written: Mapping[str, Any], applied: Applied) -> None:
    left = drift.differences(desired, written)
    if left:
        applied.refused.append(f"{desired['kind']} {desired['metadata']['name']} ({', '.join(left)})")


async def remove_if_owned(
    api: Api, kind: str, namespace: str, name: str, uid: str, *, applied: Applied | None = None
) -> None:
    current = await api.get(kind, namespace, name)
    if current is not None and owned_by(current, uid):
        await api.delete(kind, namespace, name)
        if applied is not None:
            applied.changes.append(f"deleted {kind} {name}")


async def _code_hash(api: Api, function: Function) -> tuple[str | None, str]:
    """(hash, problem): the code's hash, or why the code is unavailable."""
    source = function.spec.code.configMap
    if source is None:
        return manifests.code_sha256(function), ""
    found = await api.get("ConfigMap", function.metadata.namespace, source.name)
    if found is None:
        return None, (
            f"the ConfigMap {source.name!r} named by spec.code.configMap does not exist in namespace "
            f"{function.metadata.namespace!r}; create it (one key per file), retrying every "
            f"{CODE_RETRY_SECONDS:.0f} s"
        )
    data = dict(found.get("data") or {})
    if not data:
        return None, f"the ConfigMap {source.name!r} named by spec.code.configMap has no data (one key per file)"
    return manifests.code_sha256(function, data), ""


async def write_status(api: Api, body: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    meta = body["metadata"]
    if status.differs(body.get("status"), new):
        await api.patch_function_status(meta["namespace"], meta["name"], new)


async def _apply(
    api: Api, settings: Settings, function: Function, *, uid: str, generation: int, code_hash: str, applied: Applied
) -> Obj:
    namespace = function.metadata.namespace
    configmap = manifests.configmap(function, uid)
    if configmap is not None:
        await ensure(api, configmap, uid, replace=True, applied=applied)
    else:
        await remove_if_owned(
            api, "ConfigMap", namespace, manifests.code_configmap_name(function), uid, applied=applied
        )
    account = manifests.service_account(function, uid)
    if account is not None:
        await ensure(api, account, uid, applied=applied)
    else:
        await remove_if_owned(api, "ServiceAccount", namespace, function.name, uid, applied=applied)
    policy = manifests.network_policy(function, uid)
    if policy is not None:
        await ensure(api, policy, uid, applied=applied)
    else:
        await remove_if_owned(api, "NetworkPolicy", namespace, function.name, uid, applied=applied)
    await ensure(api, manifests.service(function, uid), uid, applied=applied)
    deployment = desired_deployment(function, uid, settings, generation, code_hash)
    return await ensure(api, deployment, uid, applied=applied, replicas=manifests.initial_replicas(function))


def desired_deployment(function: Function, uid: str, settings: Settings, generation: int, code_hash: str) -> Obj:
    deployment = manifests.deployment(function, uid, settings, code_hash)
    deployment["metadata"]["annotations"] = {GENERATION_ANNOTATION: str(generation)}
    return deployment


def _sync_condition(
    previous: Mapping[str, Any] | None, applied: Applied, repairing: bool, generation: int, stamp: datetime.datetime
) -> dict[str, Any] | None:
    """The ``ChildrenInSync`` condition after an apply, or None to keep the previous one."""
    if applied.refused:
        message = (
            "the API server did not keep what the operator wrote: "
            + "; ".join(applied.refused)
            + " (an admission webhook or another controller changes it back); the operator does not fight "
            "it: it tries again when the child or the Function changes"
        )
        return status.sync_condition(
            previous,
            ok=False,
            reason=status.SyncReason.REPAIR_FAILED,
            message=message,
            generation=generation,
            now=stamp,
        )
    if repairing and applied.changes:
        message = f"at {status.timestamp(stamp)} put back children changed outside the Function: " + "; ".join(
            applied.changes
        )
        return status.sync_condition(
            previous, ok=True, reason=status.SyncReason.REPAIRED, message=message, generation=generation, now=stamp
        )
    before = status.find_condition(previous, status.CHILDREN_IN_SYNC)
    if before is not None and before.get("status") != "True":
        message = f"at {status.timestamp(stamp)} every child is as the operator writes it"
        return status.sync_condition(
            previous, ok=True, reason=status.SyncReason.IN_SYNC, message=message, generation=generation, now=stamp
        )
    return None


async def reconcile(
    api: Api,
    settings: Settings,
    body: Mapping[str, Any],
    now: Callable[[], datetime.datetime],
) -> Outcome:
    """Bring a Function's children in line with its spec and write its status. Never raises for the
    spec's own problems: they become the status and the outcome."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    generation = int(meta.get("generation") or 0)
    previous = body.get("status")
    # The spec was applied before: whatever has to be written now was changed outside the Function.
    repairing = (previous or {}).get("observedGeneration") == generation

    def report(ok: bool, reason: status.Reason, message: str, **fields: Any) -> dict[str, Any]:
        return status.build(previous, ok=ok, reason=reason, message=message, generation=generation, now=now(), **fields)

    function, problems = parse(body)
    if function is None:
        message = "invalid spec: " + "; ".join(problems)
        await write_status(api, body, report(False, status.Reason.INVALID_SPEC, message))
        return Outcome(status.Reason.INVALID_SPEC, message, permanent=True)

    code_hash, problem = await _code_hash(api, function)
    if code_hash is None:
        await write_status(api, body, report(False, status.Reason.CODE_UNAVAILABLE, problem))
        return Outcome(status.Reason.CODE_UNAVAILABLE, problem, retry_after=CODE_RETRY_SECONDS)

    applied = Applied()
    try:
        await _apply(api, settings, function, uid=uid, generation=generation, code_hash=code_hash, applied=applied)
    except NameTaken as exc:
        await write_status(api, body, report(False, status.Reason.CONFLICT, str(exc)))
        return Outcome(status.Reason.CONFLICT, str(exc), retry_after=CONFLICT_RETRY_SECONDS)
    except Invalid as exc:
        if repairing:
            # The spec was accepted before: what refuses the child now is not the spec (an admission
            # policy, a webhook). Ready stays as it is; ChildrenInSync says what was refused.
            return await _repair_refused(api, body, exc, applied=applied, now=now)
        message = f"the API server refused a child object: {exc}"
        await write_status(api, body, report(False, status.Reason.INVALID_SPEC, message))
        return Outcome(status.Reason.INVALID_SPEC, message, permanent=True)

    # Read the Deployment again: the status must describe the newest state seen (see module docstring).
    deployment = await api.get("Deployment", namespace, name)
    if deployment is None:
        raise KubeError(f"Deployment {namespace}/{name} disappeared right after it was applied")
    ok, reason, message, ready, desired = status.deployment_readiness(
        deployment, function.spec.provisionedConcurrency, name
    )
    new = report(
        ok,
        reason,
        message,
        code_sha256=code_hash,
        url=manifests.invoke_url(function, settings),
        ready=ready,
        desired=desired,
        sync=_sync_condition(previous, applied, repairing, generation, now()),
    )
    await write_status(api, body, new)
    logger.info(
        "reconciled Function %s/%s generation %d: %s%s",
        namespace,
        name,
        generation,
        reason,
        f"; wrote: {'; '.join(applied.changes)}" if applied.changes else "",
        extra={"function": name},
    )
    return Outcome(
        reason,
        message,
        changes=tuple(applied.changes),
        repaired=repairing and bool(applied.changes),
        refused=tuple(applied.refused),
    )


async def _repair_refused(
    api: Api, body: Mapping[str, Any], error: Invalid, *, applied: Applied, now: Callable[[], datetime.datetime]
) -> Outcome:
    previous = body.get("status") or {}
    message = (
        f"the API server refused to put back a child: {error} (an admission policy or webhook?); the "
        f"operator tries again in {REPAIR_WINDOW_SECONDS:.0f} s and whenever the child or the Function changes"
    )
    await _write_sync(api, body, status.SyncReason.REPAIR_FAILED, message, now)
    ready = status.ready_condition(previous) or {}
    reason = status.Reason(ready.get("reason") or status.Reason.PROGRESSING)
    return Outcome(
        reason,
        str(ready.get("message") or message),
        changes=tuple(applied.changes),
        repaired=bool(applied.changes),
        refused=(*applied.refused, f"refused: {error}"),
    )


def controller_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the Function that controls a child object, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")) == API_VERSION:
            return str(ref["name"]), str(ref["uid"])
    return None


async def refresh_status(
    api: Api,
    namespace: str,
    name: str,
    uid: str,
    now: Callable[[], datetime.datetime],
) -> None:
    """Re-derive a Function's readiness from its Deployment as it is now (after a Deployment event)."""
    function = await api.get("Function", namespace, name)
    if function is None or function["metadata"].get("uid") != uid:
        return
    deployment = await api.get("Deployment", namespace, name)
    if deployment is None:
        return
    generation = int(function["metadata"].get("generation") or 0)
    built_from = (deployment["metadata"].get("annotations") or {}).get(GENERATION_ANNOTATION)
    current = function.get("status") or {}
    provisioned = int((function.get("spec") or {}).get("provisionedConcurrency") or 0)
    ok, reason, message, ready, desired = status.deployment_readiness(deployment, provisioned, name)
    previous_ready = status.ready_condition(current)
    spec_problem = previous_ready is not None and previous_ready.get("reason") in status.SPEC_REASONS
    if spec_problem or built_from != str(generation) or current.get("observedGeneration") != generation:
        # The spec's own problem stands, or the newest spec is not applied yet (its reconcile writes the
        # status when it is): only the instance counts are news.
        counts = {"readyInstances": ready, "desiredInstances": desired}
        if any(current.get(k) != v for k, v in counts.items()):
            await api.patch_function_status(namespace, name, counts)
        return
    new = status.build(current, ok=ok, reason=reason, message=message, generation=generation, now=now())
    new |= {"readyInstances": ready, "desiredInstances": desired}
    await write_status(api, function, new)


class RepairBudget:
    """At most ``limit`` repairs of one Function's children per ``window`` seconds (a sliding window).

    A repair that keeps being undone (another controller, an admission webhook, a script in a loop) would
    otherwise be a write-watch-write loop against the API server."""

    def __init__(
        self,
        limit: int = REPAIR_LIMIT,
        window: float = REPAIR_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self._clock = limit, window, clock
        self._spent: dict[tuple[str, str], deque[float]] = {}

    def wait(self, namespace: str, name: str) -> float:
        """Seconds until the next repair of this Function may run (0: now)."""
        spent = self._spent.get((namespace, name))
        if not spent:
            return 0.0
        now = self._clock()
        while spent and spent[0] <= now - self.window:
            spent.popleft()
        if len(spent) < self.limit:
            return 0.0
        return spent[0] + self.window - now

    def spend(self, namespace: str, name: str) -> None:
        self._spent.setdefault((namespace, name), deque()).append(self._clock())

    def record(self, namespace: str, name: str, outcome: Outcome) -> None:
        """Count a reconcile that wrote children; one the API server undid spends the whole window (it
        would undo the next attempt too)."""
        if outcome.refused:
            now = self._clock()
            self._spent[(namespace, name)] = deque([now] * self.limit)
        elif outcome.changes:
            self.spend(namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        self._spent.pop((namespace, name), None)


#: Kind of a child → the manifest the operator would write for it (None: it should not exist).
_SIMPLE_CHILDREN: Final[dict[str, Callable[[Function, str], Obj | None]]] = {
    "ConfigMap": manifests.configmap,
    "ServiceAccount": manifests.service_account,
    "NetworkPolicy": manifests.network_policy,
    "Service": manifests.service,
}
CHILD_KINDS: Final = (*_SIMPLE_CHILDREN, "Deployment")


async def child_drift(
    api: Api, settings: Settings, function_body: Mapping[str, Any], child: Mapping[str, Any]
) -> list[str]:
    """How a child differs from what reconciling its Function would write: the differing fields, or
    ``["(not wanted)"]`` for a child the Function no longer has; empty when the child is as it should be or
    the Function cannot say (an invalid spec or missing code: its own retries deal with it)."""
    kind, child_name = str(child["kind"]), str(child["metadata"]["name"])
    function, _problems = parse(function_body)
    if function is None:
        return []
    uid = str(function_body["metadata"]["uid"])
    desired: Obj | None
    if kind == "Deployment":
        code_hash, _problem = await _code_hash(api, function)
        if code_hash is None:
            return []
        generation = int(function_body["metadata"].get("generation") or 0)
        desired = desired_deployment(function, uid, settings, generation, code_hash)
    elif kind in _SIMPLE_CHILDREN:
        desired = _SIMPLE_CHILDREN[kind](function, uid)
    else:
        return []
    if desired is None:
        return ["(not wanted)"]
    if desired["metadata"]["name"] != child_name:
        return []  # not a name this Function writes
    return drift.differences(desired, child)


@dataclass(frozen=True)
class Repair:
    """What ``repair`` did for one child event."""

    function: Obj  # the owning Function as read
    drift: tuple[str, ...]  # what was found ("deleted" for a deleted child)
    outcome: Outcome | None = None  # the reconcile that repaired it
    wait: float = 0.0  # > 0: not repaired (throttled, or ``error``); try again after this many seconds
    error: str = ""  # the API error that stopped the repair


async def repair(
    api: Api,
    settings: Settings,
    kind: str,
    child: Mapping[str, Any],
    *,
    deleted: bool,
    now: Callable[[], datetime.datetime],
    budget: RepairBudget,
) -> Repair | None:
    """Put back one child of a Function if it was deleted or drifted from what the operator writes, by
    reconciling the Function. None when there is nothing to do: the child is as it should be, it has no
    owning Function (or the Function is going away), or the Function's newest spec is not applied yet (its
    own reconcile writes the children; a repair now would report a spec change as drift)."""
    owner = controller_of(child)
    if owner is None:
        return None
    name, uid = owner
    namespace = str(child["metadata"]["namespace"])
    function = await api.get("Function", namespace, name)
    if function is None or function["metadata"].get("uid") != uid or function["metadata"].get("deletionTimestamp"):
        budget.forget(namespace, name)
        return None
    current = function.get("status") or {}
    if current.get("observedGeneration") != int(function["metadata"].get("generation") or 0):
        return None
    ready = status.ready_condition(current)
    if ready is not None and ready.get("reason") in status.SPEC_REASONS:
        return None
    child_name = str(child["metadata"]["name"])
    if deleted:
        found = ["deleted"]
    else:
        found = await child_drift(api, settings, function, {**child, "kind": kind})
        if not found:
            return None
    what = tuple(f"{kind} {child_name}: {item}" for item in found)
    wait = budget.wait(namespace, name)
    if wait > 0:
        await report_throttled(api, function, what, wait=wait, now=now, budget=budget)
        return Repair(function, what, wait=wait)
    try:
        outcome = await reconcile(api, settings, function, now)
    except KubeError as exc:
        retry = FORBIDDEN_RETRY_SECONDS if isinstance(exc, Forbidden) else API_RETRY_SECONDS
        await report_failed(api, function, what, error=exc, retry=retry, now=now)
        return Repair(function, what, wait=retry, error=str(exc))
    budget.record(namespace, name, outcome)
    return Repair(function, what, outcome)


async def report_throttled(
    api: Api,
    function: Mapping[str, Any],
    what: tuple[str, ...],
    *,
    wait: float,
    now: Callable[[], datetime.datetime],
    budget: RepairBudget,
) -> None:
    """``ChildrenInSync`` False, ``RepairThrottled``: what drifted and when the next repair runs (written
    once: not over a ``RepairFailed``, which says more, nor over itself)."""
    message = (
        f"{'; '.join(what)}: not repaired yet: the children were repaired {budget.limit} times in the last "
        f"{budget.window:.0f} s (something keeps changing them: another controller, an admission webhook, a "
        f"script?); the next repair runs in {wait:.0f} s"
    )
    previous = status.find_condition(function.get("status"), status.CHILDREN_IN_SYNC)
    if previous is not None and previous.get("reason") in {
        status.SyncReason.REPAIR_THROTTLED,
        status.SyncReason.REPAIR_FAILED,
    }:
        return
    await _write_sync(api, function, status.SyncReason.REPAIR_THROTTLED, message, now)


async def report_failed(
    api: Api,
    function: Mapping[str, Any],
    what: tuple[str, ...],
    *,
    error: Exception,
    retry: float,
    now: Callable[[], datetime.datetime],
) -> None:
    """``ChildrenInSync`` False, ``RepairFailed``: the repair's API call failed (best effort: the API may
    be what is failing)."""
    message = f"{'; '.join(what)}: the repair failed: {error}; trying again in {retry:.0f} s"
    try:
        await _write_sync(api, function, status.SyncReason.REPAIR_FAILED, message, now)
    except KubeError as exc:
        logger.warning("could not report the failed repair in Function status: %s", exc)


async def _write_sync(
    api: Api, function: Mapping[str, Any], reason: status.SyncReason, message: str, now: Callable[[], datetime.datetime]
) -> None:
    current = function.get("status") or {}
    generation = int(function["metadata"].get("generation") or 0)
    condition = status.sync_condition(
        current, ok=False, reason=reason, message=message, generation=generation, now=now()
    )
    meta = function["metadata"]
    await api.patch_function_status(
        meta["namespace"], meta["name"], {"conditions": status.with_condition(current, condition)}
    )
