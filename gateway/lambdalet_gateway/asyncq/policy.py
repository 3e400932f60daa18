"""Lambda's asynchronous retry policy and destination records, as pure functions of their inputs.

Function errors: up to ``maximumRetryAttempts`` retries, about 1 minute before the first and 2 minutes
before the second. Throttles and system errors: back to the queue with exponential backoff from 1 s up to
5 minutes, without consuming a retry, until the event is older than ``maximumEventAgeSeconds``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

from lambdalet_gateway.asyncq.model import Event, FunctionSettings, LastResponse

Condition = Literal["Success", "RetriesExhausted", "EventAgeExceeded"]

#: Lambda waits about this long before the first retry after a function error, twice that before the second.
RETRY_BASE_SECONDS = 60.0
THROTTLE_BACKOFF_MIN_SECONDS = 1.0
THROTTLE_BACKOFF_MAX_SECONDS = 300.0
#: Lambda's default (and largest) maximumEventAgeSeconds.
DEFAULT_MAXIMUM_EVENT_AGE = 21600


class RequestContext(TypedDict):
    requestId: str
    functionArn: str
    condition: Condition
    approximateInvokeCount: int


class ResponseContext(TypedDict, total=False):
    statusCode: int
    executedVersion: str
    functionError: str


class DestinationRecord(TypedDict):
    version: str
    timestamp: str
    requestContext: RequestContext
    requestPayload: Any
    responseContext: ResponseContext
    responsePayload: Any


@dataclass(frozen=True, slots=True)
class Timing:
    """Scales for tests: real Lambda uses 1.0 for both."""

    retry_delay_scale: float = 1.0
    event_age_scale: float = 1.0
    throttle_backoff_max: float = THROTTLE_BACKOFF_MAX_SECONDS


def expired(event: Event, function: FunctionSettings, now: float, timing: Timing) -> bool:
    """Whether the event is older than the function's ``maximumEventAgeSeconds``."""
    return now - event.received_at > function.maximum_event_age_seconds * timing.event_age_scale


def retry_delay(errors_so_far: int, timing: Timing) -> float:
    """Delay before the retry that follows the ``errors_so_far``-th function error (1 min, then 2 min)."""
    return RETRY_BASE_SECONDS * float(2 ** max(errors_so_far - 1, 0)) * timing.retry_delay_scale


def should_retry(errors_so_far: int, function: FunctionSettings) -> bool:
    """After ``errors_so_far`` function errors, whether one more attempt is allowed."""
    return errors_so_far <= function.maximum_retry_attempts


def throttle_backoff(throttles_so_far: int, timing: Timing) -> float:
    """Exponential backoff after the ``throttles_so_far``-th consecutive throttle: 1 s, 2 s, 4 s ... capped."""
    exponent = min(max(throttles_so_far - 1, 0), 16)
    return min(timing.throttle_backoff_max, THROTTLE_BACKOFF_MIN_SECONDS * float(2**exponent))


def _json_or_text(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        try:
            return body.decode()
        except UnicodeDecodeError:
            return base64.b64encode(body).decode()


def timestamp(now: float) -> str:
    """ISO 8601 with milliseconds and ``Z``, as Lambda writes it."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def destination_record(
    event: Event,
    function: FunctionSettings,
    condition: Condition,
    response: LastResponse | None,
    now: float,
) -> DestinationRecord:
    """Lambda's invocation record for a destination.

    ``response`` is the last attempt's response; for ``EventAgeExceeded`` before any attempt ran there is
    none, and the response context carries no status.
    """
    context: ResponseContext = {}
    if response is not None:
        context["statusCode"] = response.status_code
        context["executedVersion"] = response.executed_version
        if response.function_error is not None:
            context["functionError"] = response.function_error
    return {
        "version": "1.0",
        "timestamp": timestamp(now),
        "requestContext": {
            "requestId": event.request_id,
            "functionArn": f"{function.arn}:{response.executed_version if response else '$LATEST'}",
            "condition": condition,
            "approximateInvokeCount": event.invokes,
        },
        "requestPayload": _json_or_text(event.payload),
        "responseContext": context,
        "responsePayload": _json_or_text(response.payload) if response is not None else None,
    }
