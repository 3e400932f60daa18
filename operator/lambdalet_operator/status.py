"""Status of a Function: its ``Ready`` condition and instance counts, computed from what was observed.

Pure: every function takes the observed objects and the time, and returns the ``.status`` to write,
validated against ``lambdalet.crd.FunctionStatus`` (the schema the CRD publishes).

``Ready`` reasons, each with a message a person can act on:

* ``Ready``           — the current spec is deployed; provisioned environments are up.
* ``Progressing``     — a rollout is under way, or provisioned environments are starting.
* ``InvalidSpec``     — the spec breaks a rule the API server could not check; fix the named field.
* ``CodeUnavailable`` — the code cannot be found (e.g. the named ConfigMap does not exist yet).
* ``Conflict``        — a child's name is taken by an object this Function does not own.
* ``RolloutFailed``   — the Deployment exceeded its progress deadline (pods crash or cannot start).

``ChildrenInSync``, written only once a child has needed repair (see ``reconcile.repair``):

* ``Repaired``        — True: a child deleted or changed by hand was put back; the message says which,
  which fields, and when.
* ``RepairFailed``    — False: the API server did not keep what the operator wrote (an admission webhook
  or another controller changes it back); the operator does not fight it.
* ``RepairThrottled`` — False: the children were repaired too often; the next repair waits.
* ``InSync``          — True: after one of the two above, every child is as the operator writes it.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from lambdalet.crd import FunctionStatus

READY = "Ready"
CHILDREN_IN_SYNC = "ChildrenInSync"


class Reason(StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    INVALID_SPEC = "InvalidSpec"
    CODE_UNAVAILABLE = "CodeUnavailable"
    CONFLICT = "Conflict"
    ROLLOUT_FAILED = "RolloutFailed"


#: Reasons decided by reconciling the spec (not by watching the Deployment): they stay until the spec
#: changes or the next reconcile succeeds.
SPEC_REASONS = frozenset({Reason.INVALID_SPEC, Reason.CODE_UNAVAILABLE, Reason.CONFLICT})


class SyncReason(StrEnum):
    IN_SYNC = "InSync"
    REPAIRED = "Repaired"
    REPAIR_FAILED = "RepairFailed"
    REPAIR_THROTTLED = "RepairThrottled"


def timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find_condition(status: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == kind:
            result: Mapping[str, Any] = condition
            return result
    return None


def ready_condition(status: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return find_condition(status, READY)


def condition(
    previous: Mapping[str, Any] | None,
    *,
    ok: bool,
    reason: Reason | SyncReason,
    message: str,
    generation: int | None,
    now: datetime.datetime,
    kind: str = READY,
) -> dict[str, Any]:
    """A condition (``Ready`` unless ``kind`` says otherwise); ``lastTransitionTime`` moves only when the
    status flips."""
    value = "True" if ok else "False"
    since = timestamp(now)
    if previous is not None and previous.get("status") == value and previous.get("lastTransitionTime"):
        since = str(previous["lastTransitionTime"])
    return {
        "type": kind,
        "status": value,
        "reason": str(reason),
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def deployment_readiness(
    deployment: Mapping[str, Any], provisioned: int, function_name: str
) -> tuple[bool, Reason, str, int, int]:
    """(ready, reason, message, ready instances, desired instances) from a Deployment as observed."""
    spec = deployment.get("spec") or {}
    st = deployment.get("status") or {}
    desired = int(spec.get("replicas") or 0)
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    total = int(st.get("replicas") or 0)
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    observed = int(st.get("observedGeneration") or 0)
    pods = f"`kubectl get pods -l lambdalet.dev/function={function_name}` and their logs"
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return (
                False,
                Reason.ROLLOUT_FAILED,
                f"the new environments did not become ready in time ({cond.get('message', '')}); check {pods}",
                ready,
                desired,
            )
    if observed < generation:
        return False, Reason.PROGRESSING, "the Deployment has not yet seen the new configuration", ready, desired
    if updated < total:
        return (
            False,
            Reason.PROGRESSING,
            f"rolling out the new configuration: {updated} of {total} environments updated",
            ready,
            desired,
        )
    if ready < min(provisioned, desired):
        return (
            False,
            Reason.PROGRESSING,
            f"waiting for provisioned environments: {ready} of {provisioned} ready; if this persists, check {pods}",
            ready,
            desired,
        )
    if desired == 0:
        return True, Reason.READY, "scaled to zero; the first invocation starts an environment", ready, desired
    return True, Reason.READY, f"{ready} of {desired} environments ready", ready, desired


def sync_condition(
    previous: Mapping[str, Any] | None,
    *,
    ok: bool,
    reason: SyncReason,
    message: str,
    generation: int | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The ``ChildrenInSync`` condition, from the previous ``.status``."""
    return condition(
        find_condition(previous, CHILDREN_IN_SYNC),
        ok=ok,
        reason=reason,
        message=message,
        generation=generation,
        now=now,
        kind=CHILDREN_IN_SYNC,
    )


def with_condition(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The previous conditions with ``new`` in place of the one of its type (merge patch replaces the
    whole list); ``Ready`` stays first."""
    out = [dict(c) for c in (previous or {}).get("conditions") or [] if c.get("type") != new["type"]]
    out.append(dict(new))
    out.sort(key=lambda c: c.get("type") != READY)
    return out


def build(
    previous: Mapping[str, Any] | None,
    *,
    ok: bool,
    reason: Reason,
    message: str,
    generation: int | None,
    now: datetime.datetime,
    code_sha256: str | None = None,
    url: str | None = None,
    ready: int | None = None,
    desired: int | None = None,
    sync: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole ``.status`` to merge-patch; keys left None are not written. Conditions other than
    ``Ready`` are kept from ``previous`` (``sync``, when given, replaces ``ChildrenInSync``)."""
    ready_now = condition(
        ready_condition(previous), ok=ok, reason=reason, message=message, generation=generation, now=now
    )
    conditions = with_condition(previous, ready_now)
    if sync is not None:
        conditions = with_condition({"conditions": conditions}, sync)
    out: dict[str, Any] = {"conditions": conditions, "observedGeneration": generation}
    for key, value in (
        ("codeSha256", code_sha256),
        ("url", url),
        ("readyInstances", ready),
        ("desiredInstances", desired),
    ):
        if value is not None:
            out[key] = value
    FunctionStatus.model_validate(out)
    return out


def differs(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything (avoids status writes that only bump versions)."""
    current = current or {}
    return any(current.get(key) != value for key, value in new.items())
