"""The Function's Ready condition: reasons derived from the Deployment, and transition times that move
only when the status flips."""

from __future__ import annotations

import datetime
from typing import Any

from lambdalet_operator import status

T0 = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def deployment(
    replicas: int, ready: int, updated: int | None = None, total: int | None = None, **st: Any
) -> dict[str, Any]:
    return {
        "metadata": {"generation": 3},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": 3,
            "replicas": replicas if total is None else total,
            "updatedReplicas": replicas if updated is None else updated,
            "readyReplicas": ready,
            **st,
        },
    }


def test_transition_time_moves_only_when_the_status_flips() -> None:
    first = status.build(None, ok=False, reason=status.Reason.PROGRESSING, message="a", generation=1, now=T0)
    same = status.build(first, ok=False, reason=status.Reason.CODE_UNAVAILABLE, message="b", generation=2, now=T1)
    assert same["conditions"][0]["lastTransitionTime"] == "2026-11-26T12:00:00Z"
    flipped = status.build(same, ok=True, reason=status.Reason.READY, message="c", generation=2, now=T1)
    assert flipped["conditions"][0]["lastTransitionTime"] == "2026-11-26T12:05:00Z"


def test_readiness_from_the_deployment() -> None:
    ok, reason, message, ready, desired = status.deployment_readiness(
        deployment(3, 3), provisioned=1, function_name="f"
    )
    assert (ok, reason, ready, desired) == (True, status.Reason.READY, 3, 3)
    ok, reason, message, *_ = status.deployment_readiness(deployment(3, 1, updated=1, total=4), 0, "f")
    assert (ok, reason) == (False, status.Reason.PROGRESSING) and "1 of 4 environments updated" in message
    ok, reason, message, *_ = status.deployment_readiness(deployment(2, 0), provisioned=2, function_name="f")
    assert (ok, reason) == (
        False,
        status.Reason.PROGRESSING,
    ) and "kubectl get pods -l lambdalet.dev/function=f" in message
    # Scaling by the autoscaler above the provisioned floor does not make the function unready.
    ok, *_ = status.deployment_readiness(deployment(5, 1), provisioned=1, function_name="f")
    assert ok


def test_a_stuck_rollout_says_so() -> None:
    stuck = deployment(
        1,
        0,
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}
        ],
    )
    ok, reason, message, *_ = status.deployment_readiness(stuck, provisioned=1, function_name="f")
    assert (ok, reason) == (False, status.Reason.ROLLOUT_FAILED) and "timed out" in message
