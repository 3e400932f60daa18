"""Concurrent mode (``--max-concurrency``/``AWS_LAMBDA_MAX_CONCURRENCY`` > 1): the settings and the pure
Runtime API state of a runtime that serves several invocations at once (AWS's emulator's rules in its
Lambda Managed Instances mode)."""

from __future__ import annotations

import pytest
from lambdalet_agent.settings import SettingsError, from_args
from lambdalet_agent.state import (
    ConcurrentRuntimeState,
    InvalidRequestId,
    InvalidStateTransition,
    InvokeTimedOut,
    Phase,
)


def test_max_concurrency_from_the_flag_or_lambdas_variable() -> None:
    assert from_args(["--handler", "a.b"], {}).max_concurrency == 1
    assert from_args(["--handler", "a.b", "--max-concurrency", "4"], {}).max_concurrency == 4
    from_env = from_args(["--handler", "a.b"], {"AWS_LAMBDA_MAX_CONCURRENCY": "8"})
    assert from_env.max_concurrency == 8
    assert from_env.initialization_type == "lambda-managed-instances"
    assert from_args(["--handler", "a.b"], {}).initialization_type == "on-demand"


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--max-concurrency", "0"], {}, "--max-concurrency/AWS_LAMBDA_MAX_CONCURRENCY=0 must be 1-"),
        (["--max-concurrency", "two"], {}, "--max-concurrency"),
        ([], {"AWS_LAMBDA_MAX_CONCURRENCY": "100000"}, "AWS_LAMBDA_MAX_CONCURRENCY=100000"),
        (["--max-concurrency", "2", "--external-runtime"], {}, "--external-runtime"),
    ],
)
def test_bad_max_concurrency_is_refused_by_name(argv: list[str], environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named.replace("/", ".")):
        from_args(["--handler", "a.b", *argv], environ)


def test_up_to_limit_next_calls_wait_and_init_ends_at_the_first() -> None:
    state = ConcurrentRuntimeState(limit=2)
    assert state.next() is True
    assert state.phase is Phase.READY
    assert state.next() is False
    with pytest.raises(InvalidStateTransition):
        state.next()  # a third worker: more than the runtime was told it may run
    assert state.deliver("a") is True  # the cold invocation
    assert state.deliver("b") is False
    assert state.taken == 2
    assert state.next() is False  # a worker came back


def test_results_are_matched_by_request_id() -> None:
    state = ConcurrentRuntimeState(limit=3)
    for _ in range(3):
        state.next()
    state.deliver("a")
    state.deliver("b")
    state.result("b", error=False)  # out of order is fine
    with pytest.raises(InvalidRequestId):
        state.result("b", error=True)  # a second result
    with pytest.raises(InvalidRequestId):
        state.check_result("nope", error=False)
    state.result("a", error=True)
    assert state.taken == 0


def test_a_timed_out_invocation_holds_its_worker_until_its_late_result() -> None:
    state = ConcurrentRuntimeState(limit=2)
    state.next()
    state.deliver("slow")
    state.time_out("slow")
    assert state.taken == 1  # the worker is still busy with it
    with pytest.raises(InvokeTimedOut) as late:
        state.result("slow", error=False)
    assert (late.value.status, late.value.error_type, late.value.message) == (410, "InvokeTimeout", "Invoke timeout")
    assert state.taken == 0
    with pytest.raises(InvalidRequestId):
        state.result("slow", error=False)  # only once


def test_init_error_once_and_only_during_init() -> None:
    state = ConcurrentRuntimeState(limit=2)
    state.init_error()
    with pytest.raises(InvalidStateTransition):
        state.init_error()  # a second worker's report
    with pytest.raises(InvalidStateTransition):
        state.next()
    state.restart()
    state.next()
    with pytest.raises(InvalidStateTransition):
        state.init_error()


def test_restart_forgets_every_worker() -> None:
    state = ConcurrentRuntimeState(limit=2)
    state.next()
    state.next()
    state.deliver("a")
    state.time_out("a")
    state.restart()
    assert (state.phase, state.waiting, state.taken, state.cold) == (Phase.STARTED, 0, 0, True)
