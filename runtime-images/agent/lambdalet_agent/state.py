"""The Runtime API state machine of one execution environment: pure, no I/O, no clock.

The runtime (the bootstrap) drives it through the four Runtime API calls; the agent drives it when it
hands an event to a waiting ``/next`` and when it resets the environment. Every call that is not allowed
in the current state raises :class:`InvalidStateTransition`, which the HTTP layer renders as
``403 InvalidStateTransition`` with the message format of AWS's emulator
(``State transition from <state> to <target> failed for runtime. Error: State transition is not allowed``).
A ``/response`` or ``/error`` naming another request id while an invocation runs raises
:class:`InvalidRequestId` (``400 InvalidRequestID``). The state names are the emulator's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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

    def __init__(self, message: str) -> None:
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

    def __init__(self) -> None:
        super().__init__("Invalid request ID")


@dataclass(slots=True)
class RuntimeState:
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

    def init_error(self) -> None:
        """``POST /init/error``: only during init."""
        if self.phase is not Phase.STARTED:
            raise InvalidStateTransition(self.phase, TARGET_INIT_ERROR)
        self.phase = Phase.INIT_ERROR

    def restart(self, *, cold: bool = True) -> None:
        """A new runtime process replaces the old one (after a timeout, crash or init error)."""
        self.phase = Phase.STARTED
        self.request_id = None
        self.cold = cold
