"""The Runtime API state machine of one execution environment: pure, no I/O, no clock.

The runtime (the bootstrap) drives it through the four Runtime API calls; the agent drives it when it
hands an event to a waiting ``/next`` and when it resets the environment. Every call that is not allowed
in the current state raises :class:`InvalidStateTransition`, which the HTTP layer renders as
``403 InvalidStateTransition`` with the message format of AWS's emulator
(``State transition from <state> to <target> failed for runtime. Error: State transition is not allowed``).
A ``/response`` or ``/error`` naming another request id while an invocation runs raises
:class:`InvalidRequestId` (``400 InvalidRequestID``). The state names are the emulator's.

:class:`ConcurrentRuntimeState` is the state of a runtime that serves several invocations at once
(``AWS_LAMBDA_MAX_CONCURRENCY`` > 1), after the emulator's Lambda Managed Instances mode.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Phase(enum.Enum):
    """Where the runtime is; the values are the names AWS's emulator uses in its 403 messages."""

    STARTED = "Started"  # bootstrap launched, init running, no /next yet
    INIT_ERROR = "InitError"  # the runtime reported /init/error
    READY = "Ready"  # the runtime waits at /next, no event handed out yet
    RUNNING = "Running"  # an event was handed out; waiting for /response or /error
    RESPONSE_SENT = "RuntimeResponseSentState"  # result posted; waiting for the next /next


# The target names used in messages, as the emulator spells them.
TARGET_READY = "Ready"
TARGET_RESPONSE = "InvocationResponse"
TARGET_ERROR = "InvocationErrorResponse"
TARGET_INIT_ERROR = "InitError"
TARGET_RUNNING = "Running"

NOT_ALLOWED = "State transition is not allowed"


class RuntimeApiError(Exception):
    """A Runtime API call that the current state refuses; carries the HTTP status and Lambda error body."""

    status = 400
    error_type = ""
    default_message = ""

    def __init__(self, message: str | None = None) -> None:
        message = self.default_message if message is None else message
        super().__init__(message)
        self.message = message


class InvalidStateTransition(RuntimeApiError):
    status = 403
    error_type = "InvalidStateTransition"

    def __init__(self, current: Phase, target: str) -> None:
        super().__init__(f"State transition from {current.value} to {target} failed for runtime. Error: {NOT_ALLOWED}")
        self.current = current
        self.target = target


class InvalidRequestId(RuntimeApiError):
    status = 400
    error_type = "InvalidRequestID"
    default_message = "Invalid request ID"


class _InitPhase:
    """What both states share: init ends at the first ``/next`` or with one ``/init/error``."""

    phase: Phase

    def init_error(self) -> None:
        """``POST /init/error``: only during init."""
        if self.phase is not Phase.STARTED:
            raise InvalidStateTransition(self.phase, TARGET_INIT_ERROR)
        self.phase = Phase.INIT_ERROR


@dataclass(slots=True)
class RuntimeState(_InitPhase):
    """The state of one runtime process (a reset starts a new one with :meth:`restart`)."""

    phase: Phase = Phase.STARTED
    request_id: str | None = None
    # True until the first event of this runtime process: that invocation reports Init Duration.
    cold: bool = True

    def next(self) -> bool:
        """``GET /next``. Returns True when this call completes init (the first ``/next``)."""
        if self.phase is Phase.STARTED:
            self.phase = Phase.READY
            return True
        if self.phase is Phase.RESPONSE_SENT:
            self.phase = Phase.READY
            self.request_id = None
            return False
        raise InvalidStateTransition(self.phase, TARGET_READY)

    def deliver(self, request_id: str) -> bool:
        """The agent hands an event to the waiting ``/next``. Returns True on the cold (first) invoke."""
        if self.phase is not Phase.READY:
            raise InvalidStateTransition(self.phase, TARGET_RUNNING)
        self.phase = Phase.RUNNING
        self.request_id = request_id
        cold, self.cold = self.cold, False
        return cold

    def check_result(self, request_id: str, *, error: bool) -> None:
        """Would ``POST /invocation/{id}/response`` (or ``/error``) be accepted? Raises if not."""
        if self.phase is not Phase.RUNNING:
            raise InvalidStateTransition(self.phase, TARGET_ERROR if error else TARGET_RESPONSE)
        if request_id != self.request_id:
            raise InvalidRequestId()

    def result(self, request_id: str, *, error: bool) -> None:
        """``POST /invocation/{id}/response`` or ``/error`` accepted."""
        self.check_result(request_id, error=error)
        self.phase = Phase.RESPONSE_SENT

    def restart(self, *, cold: bool = True) -> None:
        """A new runtime process replaces the old one (after a timeout, crash or init error)."""
        self.phase = Phase.STARTED
        self.request_id = None
        self.cold = cold


class InvokeTimedOut(RuntimeApiError):
    """A ``/response`` or ``/error`` for an invocation the caller was already answered for: it timed out
    (concurrent mode only; a timeout in standard mode resets the runtime). AWS's emulator's answer."""

    status = 410
    error_type = "InvokeTimeout"
    default_message = "Invoke timeout"


@dataclass(slots=True)
class ConcurrentRuntimeState(_InitPhase):
    """The Runtime API state of a runtime that serves up to ``limit`` invocations at once
    (``AWS_LAMBDA_MAX_CONCURRENCY`` > 1, as Lambda Managed Instances), after AWS's emulator in that mode:
    there is no per-runtime Ready/Running cycle, each ``/next`` is a worker waiting for an event and each
    result names its invocation. Init ends at the first ``/next``; ``/init/error`` is accepted once,
    during init. Up to ``limit`` ``/next`` calls may wait at once (one more is ``403``). A result for an
    invocation that is not running is ``400 InvalidRequestID`` (also a second result for one), or ``410
    InvokeTimeout`` once for an invocation that timed out (its worker then comes back to ``/next``)."""

    limit: int
    phase: Phase = Phase.STARTED
    waiting: int = 0  # /next calls not answered yet
    running: set[str] = field(default_factory=set)  # handed out, no result yet
    timed_out: set[str] = field(default_factory=set)  # handed out and timed out, no result from the runtime yet
    cold: bool = True

    @property
    def taken(self) -> int:
        """Workers busy with an invocation, including those still running one that timed out."""
        return len(self.running) + len(self.timed_out)

    def next(self) -> bool:
        """``GET /next``. Returns True when this call completes init (the first ``/next``)."""
        if self.phase is Phase.INIT_ERROR or self.waiting >= self.limit:
            raise InvalidStateTransition(self.phase, TARGET_READY)
        first = self.phase is Phase.STARTED
        self.phase = Phase.READY
        self.waiting += 1
        return first

    def deliver(self, request_id: str) -> bool:
        """An event goes to a waiting ``/next``. Returns True on the cold (first) invoke."""
        if self.waiting < 1:
            raise InvalidStateTransition(self.phase, TARGET_RUNNING)
        self.waiting -= 1
        self.running.add(request_id)
        cold, self.cold = self.cold, False
        return cold

    def check_result(self, request_id: str, *, error: bool) -> None:
        """Would a result for ``request_id`` be accepted? Raises if not (a timed-out one is forgotten)."""
        if request_id in self.running:
            return
        if request_id in self.timed_out:
            self.timed_out.discard(request_id)
            raise InvokeTimedOut()
        raise InvalidRequestId()

    def result(self, request_id: str, *, error: bool) -> None:
        self.check_result(request_id, error=error)
        self.running.discard(request_id)

    def time_out(self, request_id: str) -> None:
        """The caller was answered ``Sandbox.Timedout``; the worker may still be running the invocation."""
        if request_id in self.running:
            self.running.discard(request_id)
            self.timed_out.add(request_id)

    def restart(self, *, cold: bool = True) -> None:
        self.phase = Phase.STARTED
        self.waiting = 0
        self.running.clear()
        self.timed_out.clear()
        self.cold = cold
