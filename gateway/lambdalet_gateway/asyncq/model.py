"""The async event and the values exchanged at the seams. Pure: data only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

RequestId = NewType("RequestId", str)


@dataclass(frozen=True, slots=True)
class LastResponse:
    """What the most recent attempt returned (kept so a later failure record can show it)."""

    status_code: int
    executed_version: str
    function_error: str | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted ``Event`` invocation, as stored in the queue.

    ``errors`` counts function errors so far (drives the retry policy); ``invokes`` counts deliveries that
    may have run the function (Lambda's ``approximateInvokeCount``); ``throttles`` counts consecutive
    throttles (drives the backoff). ``received_at`` and ``not_before`` are Unix seconds.
    """

    request_id: str
    function: str
    payload: bytes
    received_at: float
    not_before: float = 0.0
    errors: int = 0
    invokes: int = 0
    throttles: int = 0
    last: LastResponse | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A leased event. ``redelivered`` is true when an earlier lease ended without a recorded outcome
    (the process holding it died, or the broker redelivered): the function may already have run once."""

    event: Event
    redelivered: bool = False
    token: object = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a destination record goes: exactly one of a function (invoked asynchronously) or a queue."""

    function: str | None = None
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class FunctionSettings:
    """The parts of a function's configuration the async path needs."""

    name: str
    arn: str
    maximum_retry_attempts: int = 2
    maximum_event_age_seconds: int = 21600
    on_success: Destination | None = None
    on_failure: Destination | None = None
    reserved_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class InvokeResult:
    """A completed invocation: the function ran (successfully or with a function error)."""

    status_code: int
    payload: bytes
    function_error: str | None = None
    executed_version: str = "$LATEST"


class Throttled(Exception):
    """The invocation was refused for concurrency (reserved or platform limit); the function did not run."""


class InvokeFailed(Exception):
    """A system error: the platform could not run the invocation (no environment, connection lost)."""


class FunctionGone(Exception):
    """The function no longer exists."""
