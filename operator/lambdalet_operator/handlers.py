"""kopf handlers: unpack the event, call ``reconcile`` with the one API client, map the outcome to kopf.

Started as ``kopf run --standalone -m lambdalet_operator.handlers [--all-namespaces | -n NS ...]``.

What kopf itself writes, and where (configured in ``configure``):

* annotation ``lambdalet.dev/last-handled-configuration`` on each Function: the spec last handled, the
  base for kopf's diffs (instead of kopf's default ``kopf.zalando.org/...`` annotation);
* annotations ``lambdalet.dev/<handler-id>`` on a Function only while a handler is being retried
  (progress: retry count, backoff), removed when it succeeds;
* annotation ``lambdalet.dev/kopf-managed: "yes"``, kopf's marker that it has seen the Function;
* no finalizers: there is no deletion handler and no daemon or timer (kopf adds a finalizer for those,
  and a Function could then not be deleted while the operator is down); children go with the Function
  through owner references;
* Kubernetes Events on Functions for handler failures (``kopf`` posts them), and ``Repaired`` /
  ``RepairFailed`` / ``RepairThrottled`` when a child changed outside the Function is put back (or not).

Children are repaired from one watch per child kind (ConfigMaps, ServiceAccounts, Services, Deployments,
NetworkPolicies, filtered by the managed-by label): a child deleted, or changed in a field the operator
writes, reconciles its owning Function (``reconcile.repair``), within a per-Function budget; a repair
that has to wait for the budget is retried once it allows (``_recheck``).

``--standalone`` turns off kopf's peering (no ``KopfPeering`` objects): run one operator replica.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any, cast

import kopf

from lambdalet.crd import PLURAL, VERSION
from lambdalet.spec import API_GROUP
from lambdalet_operator import kube, manifests
from lambdalet_operator.reconcile import (
    API_RETRY_SECONDS,
    FORBIDDEN_RETRY_SECONDS,
    Locks,
    Outcome,
    RepairBudget,
    controller_of,
    reconcile,
    refresh_status,
    repair,
)
from lambdalet_operator.settings import Settings

logger = logging.getLogger("lambdalet.operator")

MEMO_API = "api"
MEMO_SETTINGS = "settings"
MEMO_LOCKS = "locks"
MEMO_BUDGET = "repair-budget"
MEMO_RECHECKS = "repair-rechecks"

#: The children's watches: every object the operator writes carries this label.
MANAGED = {"app.kubernetes.io/managed-by": manifests.MANAGED_BY}
#: Plural of each watched child resource → its kind.
CHILD_KINDS = {
    "configmaps": "ConfigMap",
    "serviceaccounts": "ServiceAccount",
    "services": "Service",
    "deployments": "Deployment",
    "networkpolicies": "NetworkPolicy",
}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # No CRD or namespace discovery at run time: the chart installs the CRD first, and the operator needs
    # no list/watch on customresourcedefinitions or namespaces (least privilege).
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # kopf's health endpoint logs every probe through aiohttp's access log: keep only problems.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    api, _configuration = await kube.Kube.connect(os.environ)
    memo[MEMO_API] = api
    memo[MEMO_SETTINGS] = Settings.from_env(os.environ)
    memo[MEMO_LOCKS] = Locks()
    memo[MEMO_BUDGET] = RepairBudget()
    memo[MEMO_RECHECKS] = {}


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    rechecks: dict[Any, asyncio.Task[None]] = memo.get(MEMO_RECHECKS) or {}
    for task in rechecks.values():
        task.cancel()
    api: kube.Kube | None = memo.get(MEMO_API)
    if api is not None:
        await api.close()


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf uses the same identity as ``kube`` (see ``kube.load_configuration``)."""
    try:
        configuration = await kube.load_configuration(os.environ)
    except kube.KubeError as exc:
        raise kopf.LoginError(str(exc)) from exc
    creds = await kube.credentials(configuration)
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=creds.ca_path,
        token=creds.token,
        certificate_path=creds.certificate_path,
        private_key_path=creds.private_key_path,
        insecure=creds.insecure,
    )


def _raise_for(outcome_retry: float | None, permanent: bool, message: str) -> None:
    if permanent:
        raise kopf.PermanentError(message)
    if outcome_retry is not None:
        raise kopf.TemporaryError(message, delay=outcome_retry)


def _as_body(obj: Mapping[str, Any]) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, dict(obj)))


def _post(function: Mapping[str, Any], outcome: Outcome) -> None:
    """A Kubernetes Event on the Function for a repair (``kubectl describe function`` lists them)."""
    if outcome.refused:
        message = "the API server did not keep what the operator wrote: " + "; ".join(outcome.refused)
        kopf.event(_as_body(function), type="Warning", reason="RepairFailed", message=message)
    elif outcome.repaired:
        message = "put back children changed outside the Function: " + "; ".join(outcome.changes)
        kopf.event(_as_body(function), type="Normal", reason="Repaired", message=message)


async def _reconcile(body: Mapping[str, Any], memo: kopf.Memo) -> Outcome:
    api: kube.Kube = memo[MEMO_API]
    locks: Locks = memo[MEMO_LOCKS]
    raw: dict[str, Any] = {
        "metadata": dict(body["metadata"]),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }
    namespace, name = raw["metadata"]["namespace"], raw["metadata"]["name"]
    async with locks(namespace, name):
        try:
            outcome = await reconcile(api, memo[MEMO_SETTINGS], raw, _now)
        except kube.Forbidden as exc:
            message = f"permission denied (the operator's Role lacks it): {exc}"
            raise kopf.TemporaryError(message, delay=FORBIDDEN_RETRY_SECONDS) from exc
        except kube.KubeError as exc:
            raise kopf.TemporaryError(f"Kubernetes API error: {exc}", delay=API_RETRY_SECONDS) from exc
    _post(body, outcome)
    _raise_for(outcome.retry_after, outcome.permanent, outcome.message)
    return outcome


@kopf.on.resume(API_GROUP, VERSION, PLURAL)
@kopf.on.create(API_GROUP, VERSION, PLURAL)
@kopf.on.update(API_GROUP, VERSION, PLURAL)
async def function_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(body, memo)


@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
@kopf.on.event("", "v1", "serviceaccounts", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def child_event(body: kopf.Body, type: str | None, resource: kopf.Resource, memo: kopf.Memo, **_: Any) -> None:
    """A child of a Function was added, changed or deleted: put it back if it was deleted or drifted from
    what the operator writes; a Deployment's changes (rollout progress, scaling by the gateway) also
    refresh the Function's status. The initial listing (``type`` None) only refreshes status: the resume
    handler reconciles every Function at start."""
    kind = CHILD_KINDS[resource.plural]
    owner = controller_of(body)
    if owner is None:
        return
    name, uid = owner
    namespace = str(body["metadata"]["namespace"])
    api: kube.Kube = memo[MEMO_API]
    locks: Locks = memo[MEMO_LOCKS]
    budget: RepairBudget = memo[MEMO_BUDGET]
    result = None
    try:
        async with locks(namespace, name):
            if type is not None:
                result = await repair(
                    api, memo[MEMO_SETTINGS], kind, body, deleted=type == "DELETED", now=_now, budget=budget
                )
            if kind == "Deployment" and type != "DELETED" and (result is None or result.outcome is None):
                await refresh_status(api, namespace, name, uid, _now)
    except kube.KubeError as exc:
        # Event handlers are not retried by kopf: the next event of this child tries again.
        logger.warning("Function %s/%s after a %s event of its %s: %s", namespace, name, type, kind, exc)
        return
    if result is None:
        if type == "DELETED":
            locks.forget(namespace, name)
        return
    if result.wait > 0:
        drifted = "; ".join(result.drift)
        if result.error:
            reason, message = "RepairFailed", f"{drifted}: the repair failed: {result.error}"
        else:
            reason, message = "RepairThrottled", f"{drifted}: repaired too often"
        message += f"; the next repair runs in {result.wait:.0f} s"
        if _schedule_recheck(memo, namespace, name, result.wait):  # once per wait, not per event meanwhile
            logger.warning("Function %s/%s: %s", namespace, name, message)
            kopf.event(_as_body(result.function), type="Warning", reason=reason, message=message)
        return
    if result.outcome is not None:
        logger.warning("Function %s/%s: %s; reconciled", namespace, name, "; ".join(result.drift))
        _post(result.function, result.outcome)
        if result.outcome.refused:  # not kept or refused: try again once the budget allows
            _schedule_recheck(memo, namespace, name, budget.wait(namespace, name))


def _schedule_recheck(memo: kopf.Memo, namespace: str, name: str, wait: float) -> bool:
    """Reconcile the Function after ``wait`` seconds: once the repair budget allows, or after an API error
    (one pending recheck per Function; one stopped by an API error schedules the next). False when one
    is already pending."""
    rechecks: dict[tuple[str, str], asyncio.Task[None]] = memo[MEMO_RECHECKS]
    pending = rechecks.get((namespace, name))
    if pending is not None and not pending.done():
        return False
    key = (namespace, name)
    task = asyncio.get_running_loop().create_task(_recheck(memo, namespace, name, wait))
    rechecks[key] = task

    def forget(done: asyncio.Task[None]) -> None:
        if rechecks.get(key) is done:
            del rechecks[key]

    task.add_done_callback(forget)
    return True


async def _recheck(memo: kopf.Memo, namespace: str, name: str, wait: float) -> None:
    await asyncio.sleep(wait)
    api: kube.Kube = memo[MEMO_API]
    budget: RepairBudget = memo[MEMO_BUDGET]
    try:
        function = await api.get("Function", namespace, name)
        if function is None or function["metadata"].get("deletionTimestamp"):
            return
        outcome = await _reconcile(function, memo)
    except (kopf.TemporaryError, kube.KubeError) as exc:
        api_error = isinstance(exc, kube.KubeError) or isinstance(exc.__cause__, kube.KubeError)
        delay = float(getattr(exc, "delay", None) or API_RETRY_SECONDS)
        logger.warning("Function %s/%s: the delayed repair failed: %s", namespace, name, exc)
        if api_error:  # other problems (the spec's own) are retried by the Function's handler
            memo[MEMO_RECHECKS].pop((namespace, name), None)
            _schedule_recheck(memo, namespace, name, delay)
        return
    except kopf.PermanentError as exc:
        logger.warning("Function %s/%s: the delayed repair found: %s", namespace, name, exc)
        return
    budget.record(namespace, name, outcome)
    if outcome.refused:
        memo[MEMO_RECHECKS].pop((namespace, name), None)
        _schedule_recheck(memo, namespace, name, budget.wait(namespace, name))


@kopf.index(API_GROUP, VERSION, PLURAL)
def code_configmaps(namespace: str | None, name: str | None, spec: kopf.Spec, **_: Any) -> dict[Any, Any] | None:
    """Functions by the ConfigMap that holds their code: (namespace, ConfigMap name) → Function names."""
    source = (spec.get("code") or {}).get("configMap") or {}
    return {(namespace, source["name"]): name} if source.get("name") else None


@kopf.on.event("", "v1", "configmaps")
async def configmap_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """A ConfigMap holding some Functions' code changed: roll their pods to the new code now (and pick
    up a ConfigMap that was missing without waiting for the retry). kopf passes the index by its name."""
    code_configmaps: kopf.Index[Any, Any] = kwargs["code_configmaps"]
    namespace, name = str(body["metadata"]["namespace"]), str(body["metadata"]["name"])
    api: kube.Kube = memo[MEMO_API]
    for function_name in code_configmaps.get((namespace, name), []):
        try:
            function = await api.get("Function", namespace, str(function_name))
            if function is not None and not function["metadata"].get("deletionTimestamp"):
                await _reconcile(function, memo)
        except (kopf.TemporaryError, kopf.PermanentError, kube.KubeError) as exc:
            # Event handlers are not retried; the Function's own handler retries (CodeUnavailable).
            logger.info("Function %s/%s after a change of ConfigMap %s: %s", namespace, function_name, name, exc)
