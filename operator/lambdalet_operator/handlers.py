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
* Kubernetes Events on Functions for handler failures (``kopf`` posts them).

``--standalone`` turns off kopf's peering (no ``KopfPeering`` objects): run one operator replica.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from lambdalet.crd import PLURAL, VERSION
from lambdalet.spec import API_GROUP
from lambdalet_operator import kube, manifests
from lambdalet_operator.reconcile import Locks, controller_of, reconcile, refresh_status
from lambdalet_operator.settings import Settings

logger = logging.getLogger("lambdalet.operator")

#: Backoff for API errors: kopf retries the handler after this delay.
API_RETRY_SECONDS = 5.0

MEMO_API = "api"
MEMO_SETTINGS = "settings"
MEMO_LOCKS = "locks"


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


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
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


async def _reconcile(body: Mapping[str, Any], memo: kopf.Memo) -> None:
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
            raise kopf.TemporaryError(f"permission denied (the operator's Role lacks it): {exc}", delay=30) from exc
        except kube.KubeError as exc:
            raise kopf.TemporaryError(f"Kubernetes API error: {exc}", delay=API_RETRY_SECONDS) from exc
    _raise_for(outcome.retry_after, outcome.permanent, outcome.message)


@kopf.on.resume(API_GROUP, VERSION, PLURAL)
@kopf.on.create(API_GROUP, VERSION, PLURAL)
@kopf.on.update(API_GROUP, VERSION, PLURAL)
async def function_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(body, memo)


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": manifests.MANAGED_BY})
async def deployment_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A function's Deployment changed (rollout progress, scaling by the gateway, deletion by hand)."""
    owner = controller_of(body)
    if owner is None:
        return
    name, uid = owner
    namespace = str(body["metadata"]["namespace"])
    api: kube.Kube = memo[MEMO_API]
    locks: Locks = memo[MEMO_LOCKS]
    try:
        if type == "DELETED":
            function = await api.get("Function", namespace, name)
            if function is not None and function["metadata"].get("uid") == uid:
                if not function["metadata"].get("deletionTimestamp"):
                    logger.warning("Deployment of Function %s/%s was deleted; re-creating it", namespace, name)
                    await _reconcile(function, memo)
            else:
                locks.forget(namespace, name)
            return
        async with locks(namespace, name):
            await refresh_status(api, namespace, name, uid, _now)
    except kube.KubeError as exc:
        # Event handlers are not retried by kopf: the next Deployment event refreshes the status.
        logger.warning("could not refresh the status of Function %s/%s: %s", namespace, name, exc)


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
