"""Lambda's error wire format: status, x-amzn-ErrorType, and the JSON body clients parse."""

from __future__ import annotations

import json

from lambdalet_gateway.errors import (
    RESERVED_LIMIT,
    InvalidRequestContent,
    RequestTooLarge,
    ServiceError,
    Throttled,
    not_found,
)


def body(response_body: object) -> dict[str, object]:
    assert isinstance(response_body, bytes)
    decoded: dict[str, object] = json.loads(response_body)
    return decoded


def test_not_found() -> None:
    response = not_found("arn:aws:lambda:us-east-1:000000000000:function:nope", request_id="r1").response()
    assert response.status == 404
    assert response.headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    assert response.headers["x-amzn-RequestId"] == "r1"
    assert body(response.body) == {
        "Type": "User",
        "Message": "Function not found: arn:aws:lambda:us-east-1:000000000000:function:nope",
    }


def test_throttled_carries_reason_and_retry_after() -> None:
    response = Throttled(RESERVED_LIMIT).response()
    assert response.status == 429
    assert response.headers["x-amzn-ErrorType"] == "TooManyRequestsException"
    assert response.headers["Retry-After"] == "1"
    assert body(response.body) == {
        "Type": "User",
        "message": "Rate Exceeded.",
        "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
        "retryAfterSeconds": "1",
    }


def test_too_large_and_bad_json_and_service() -> None:
    too_large = RequestTooLarge().response()
    assert too_large.status == 413
    assert body(too_large.body)["message"] == (
        "Request must be smaller than 6291456 bytes for the InvokeFunction operation"
    )
    assert InvalidRequestContent("x").response().headers["x-amzn-ErrorType"] == "InvalidRequestContentException"
    service = ServiceError("boom").response()
    assert service.status == 500
    assert body(service.body)["Type"] == "Service"
