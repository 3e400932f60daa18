"""Lambda's error wire format: one exception hierarchy for everything the gateway answers with an error.

Every failure that reaches a client is a :class:`LambdaError`; its ``response()`` is the rest-json error
Lambda's SDKs parse: the ``x-amzn-ErrorType`` header names the error code and the JSON body carries
``Type`` (``User`` for 4xx, ``Service`` for 5xx), the message (Lambda spells it ``Message`` for some codes
and ``message`` for others) and any extra members such as ``Reason``. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import ClassVar

from aiohttp import web

#: Lambda's synchronous payload limit, in bytes (the request and the response).
MAX_SYNC_PAYLOAD = 6291456

RESERVED_LIMIT = "ReservedFunctionConcurrentInvocationLimitExceeded"
ACCOUNT_LIMIT = "ConcurrentInvocationLimitExceeded"
RATE_LIMIT = "FunctionInvocationRateLimitExceeded"


class LambdaError(Exception):
    """An error answered in Lambda's wire format; subclasses fix the status and the error code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "ServiceException"
    message_key: ClassVar[str] = "Message"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def body(self) -> dict[str, object]:
        return {"Type": "User" if self.status < 500 else "Service", self.message_key: self.message}

    def headers(self) -> dict[str, str]:
        headers = {"x-amzn-ErrorType": self.code, "Content-Type": "application/json"}
        if self.request_id is not None:
            headers["x-amzn-RequestId"] = self.request_id
        return headers

    def response(self, extra_headers: Mapping[str, str] | None = None) -> web.Response:
        headers = self.headers()
        if extra_headers:
            headers.update(extra_headers)
        return web.Response(status=self.status, body=json.dumps(self.body()).encode(), headers=headers)


class ResourceNotFound(LambdaError):
    status = 404
    code = "ResourceNotFoundException"


class InvalidRequestContent(LambdaError):
    status = 400
    code = "InvalidRequestContentException"
    message_key = "message"


class InvalidParameterValue(LambdaError):
    status = 400
    code = "InvalidParameterValueException"
    message_key = "message"


class RequestTooLarge(LambdaError):
    status = 413
    code = "RequestTooLargeException"
    message_key = "message"

    def __init__(self, *, request_id: str | None = None) -> None:
        super().__init__(
            f"Request must be smaller than {MAX_SYNC_PAYLOAD} bytes for the InvokeFunction operation",
            request_id=request_id,
        )


class Throttled(LambdaError):
    """429 ``TooManyRequestsException``: a concurrency cap or the wait queue refused the invocation.

    Distinct so that a caller that can retry later (the async worker) catches exactly this.
    """

    status = 429
    code = "TooManyRequestsException"
    message_key = "message"

    def __init__(self, reason: str, *, retry_after: int = 1, request_id: str | None = None) -> None:
        super().__init__("Rate Exceeded.", request_id=request_id)
        self.reason = reason
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        body = super().body()
        body["Reason"] = self.reason
        body["retryAfterSeconds"] = str(self.retry_after)
        return body

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        headers["Retry-After"] = str(self.retry_after)
        return headers


class ServiceError(LambdaError):
    """500 ``ServiceException``: the platform failed (an environment died, could not start ...)."""


class ResourceNotReady(LambdaError):
    """502 ``ResourceNotReadyException``: no environment could be made ready in time."""

    status = 502
    code = "ResourceNotReadyException"
    message_key = "message"


def not_found(arn: str, *, request_id: str | None = None) -> ResourceNotFound:
    return ResourceNotFound(f"Function not found: {arn}", request_id=request_id)
