"""The Runtime API state machine: every allowed transition, and every other call refused with the
emulator's 403 InvalidStateTransition message (or 400 InvalidRequestID for a wrong request id)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from lambdalet_agent.state import InvalidRequestId, InvalidStateTransition, Phase, RuntimeState

REQUEST_ID = "8476a536-e9f4-11e8-9739-2dfe598c3fcd"


def in_phase(phase: Phase) -> RuntimeState:
    """Drive a fresh state machine into ``phase`` through allowed transitions only."""
    state = RuntimeState()
    if phase is Phase.STARTED:
        return state
    if phase is Phase.INIT_ERROR:
        state.init_error()
        return state
    state.next()
    if phase is Phase.READY:
        return state
    state.deliver(REQUEST_ID)
    if phase is Phase.RUNNING:
        return state
    state.result(REQUEST_ID, error=False)
    assert phase is Phase.RESPONSE_SENT
    return state


Call = Callable[[RuntimeState], object]
CALLS: dict[str, tuple[Call, str]] = {
    "next": (lambda s: s.next(), "Ready"),
    "deliver": (lambda s: s.deliver("another-id"), "Running"),
    "response": (lambda s: s.result(REQUEST_ID, error=False), "InvocationResponse"),
    "error": (lambda s: s.result(REQUEST_ID, error=True), "InvocationErrorResponse"),
    "init_error": (lambda s: s.init_error(), "InitError"),
}
ALLOWED: dict[tuple[Phase, str], Phase] = {
    (Phase.STARTED, "next"): Phase.READY,
    (Phase.STARTED, "init_error"): Phase.INIT_ERROR,
    (Phase.READY, "deliver"): Phase.RUNNING,
    (Phase.RUNNING, "response"): Phase.RESPONSE_SENT,
    (Phase.RUNNING, "error"): Phase.RESPONSE_SENT,
    (Phase.RESPONSE_SENT, "next"): Phase.READY,
}


@pytest.mark.parametrize(("phase", "call"), sorted(ALLOWED, key=str))
def test_allowed_transitions(phase: Phase, call: str) -> None:
    state = in_phase(phase)
    CALLS[call][0](state)
    assert state.phase is ALLOWED[(phase, call)]


INVALID = [(phase, call) for phase in Phase for call in CALLS if (phase, call) not in ALLOWED]


@pytest.mark.parametrize(("phase", "call"), INVALID, ids=[f"{p.value}-{c}" for p, c in INVALID])
def test_every_other_transition_is_invalid_and_leaves_the_state_alone(phase: Phase, call: str) -> None:
    state = in_phase(phase)
    before = (state.phase, state.request_id, state.cold)
    with pytest.raises(InvalidStateTransition) as raised:
        CALLS[call][0](state)
    assert raised.value.status == 403
    assert raised.value.error_type == "InvalidStateTransition"
    assert raised.value.message == (
        f"State transition from {phase.value} to {CALLS[call][1]} failed for runtime. "
        "Error: State transition is not allowed"
    )
    assert (state.phase, state.request_id, state.cold) == before


def test_every_phase_and_call_is_covered() -> None:
    assert len(INVALID) + len(ALLOWED) == len(Phase) * len(CALLS)


@pytest.mark.parametrize("error", [False, True])
def test_result_for_another_request_id_is_invalid_request_id(error: bool) -> None:
    state = in_phase(Phase.RUNNING)
    with pytest.raises(InvalidRequestId) as raised:
        state.result("not-the-current-id", error=error)
    assert (raised.value.status, raised.value.error_type, raised.value.message) == (
        400,
        "InvalidRequestID",
        "Invalid request ID",
    )
    assert state.phase is Phase.RUNNING
    state.result(REQUEST_ID, error=error)  # the right id still works


def test_duplicate_response_is_refused() -> None:
    state = in_phase(Phase.RUNNING)
    state.result(REQUEST_ID, error=False)
    with pytest.raises(InvalidStateTransition):
        state.result(REQUEST_ID, error=False)
    with pytest.raises(InvalidStateTransition):
        state.result(REQUEST_ID, error=True)


def test_first_next_completes_init_and_only_the_first_event_is_cold() -> None:
    state = RuntimeState()
    assert state.next() is True
    assert state.deliver("a") is True
    state.result("a", error=False)
    assert state.next() is False
    assert state.deliver("b") is False
    assert state.request_id == "b"


def test_restart_starts_a_cold_runtime() -> None:
    state = in_phase(Phase.RUNNING)
    state.restart()
    assert (state.phase, state.request_id, state.cold) == (Phase.STARTED, None, True)
    state.next()
    assert state.deliver("c") is True
