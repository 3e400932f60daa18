"""Reconciling one Function: validate, build the children (``manifests``), apply them through the API
client, and report ``.status``.

The API client is passed in (``Api``, the small interface ``kube.Kube`` implements), so this module is
tested with an in-memory fake. Writers of a Function's status hold that Function's lock and read the
Deployment fresh inside it: the last writer always reports the newest state, so status never goes back
in time.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from lambdalet.spec import API_VERSION, KIND, Function, SpecError, all_errors, parse_function, validate_for_cluster
from lambdalet_operator import manifests, status
from lambdalet_operator.kube import Conflict, Invalid, KubeError, Obj
from lambdalet_operator.settings import Settings

logger = logging.getLogger("lambdalet.operator")

#: Deployment annotation: the Function generation its template was built from.
GENERATION_ANNOTATION: Final = "lambdalet.dev/function-generation"
CODE_RETRY_SECONDS: Final = 10.0
CONFLICT_RETRY_SECONDS: Final = 30.0


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


async def ensure(api: Api, desired: Mapping[str, Any], uid: str, *, replace: bool = False, **on_create: Any) -> Obj:
    """Create ``desired`` or bring the existing object in line with it (merge patch, or a full replace
    for objects whose keys must be able to disappear). ``on_create`` adds top-level ``spec`` fields that
    are set only at creation."""
    kind, meta = desired["kind"], desired["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current = await api.get(kind, namespace, name)
    if current is None:
        body = dict(desired)
        if on_create:
            body["spec"] = {**body["spec"], **on_create}
        try:
            return await api.create(body)
        except Conflict:
            current = await api.get(kind, namespace, name)
            if current is None:
                raise
    if not owned_by(current, meta["ownerReferences"][0]["uid"]):
        raise NameTaken(kind, name)
    if replace:
        return await api.replace(desired, str(current["metadata"]["resourceVersion"]))
    patch = {key: value for key, value in desired.items() if key not in {"apiVersion", "kind", "metadata"}}
    patch["metadata"] = {
        "labels": meta["labels"],
        "annotations": meta.get("annotations", {}),
        "ownerReferences": meta["ownerReferences"],
    }
    return await api.merge_patch(kind, namespace, name, patch)


async def remove_if_owned(api: Api, kind: str, namespace: str, name: str, uid: str) -> None:
    current = await api.get(kind, namespace, name)
    if current is not None and owned_by(current, uid):
        await api.delete(kind, namespace, name)


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


async def _apply(api: Api, settings: Settings, function: Function, *, uid: str, generation: int, code_hash: str) -> Obj:
    namespace = function.metadata.namespace
    configmap = manifests.configmap(function, uid)
    if configmap is not None:
        await ensure(api, configmap, uid, replace=True)
    else:
        await remove_if_owned(api, "ConfigMap", namespace, manifests.code_configmap_name(function), uid)
    account = manifests.service_account(function, uid)
    if account is not None:
        await ensure(api, account, uid)
    else:
        await remove_if_owned(api, "ServiceAccount", namespace, function.name, uid)
    policy = manifests.network_policy(function, uid)
    if policy is not None:
        await ensure(api, policy, uid)
    else:
        await remove_if_owned(api, "NetworkPolicy", namespace, function.name, uid)
    await ensure(api, manifests.service(function, uid), uid)
    deployment = manifests.deployment(function, uid, settings, code_hash)
    deployment["metadata"]["annotations"] = {GENERATION_ANNOTATION: str(generation)}
    return await ensure(api, deployment, uid, replicas=manifests.initial_replicas(function))


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

    try:
        await _apply(api, settings, function, uid=uid, generation=generation, code_hash=code_hash)
    except NameTaken as exc:
        await write_status(api, body, report(False, status.Reason.CONFLICT, str(exc)))
        return Outcome(status.Reason.CONFLICT, str(exc), retry_after=CONFLICT_RETRY_SECONDS)
    except Invalid as exc:
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
    )
    await write_status(api, body, new)
    logger.info(
        "reconciled Function %s/%s generation %d: %s", namespace, name, generation, reason, extra={"function": name}
    )
    return Outcome(reason, message)


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
