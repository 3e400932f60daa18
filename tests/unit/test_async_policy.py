"""Lambda's async retry policy and the destination record, as pure functions (no I/O, no clock)."""

from __future__ import annotations

import json

from lambdalet_gateway.asyncq import policy
from lambdalet_gateway.asyncq.model import Event, FunctionSettings, LastResponse
from lambdalet_gateway.asyncq.settings import AsyncSettings, SettingsError

FUNCTION = FunctionSettings(name="orders", arn="arn:aws:lambda:us-east-1:000000000000:function:orders")


def test_retry_delays_are_one_then_two_minutes() -> None:
    timing = policy.Timing()
    assert policy.retry_delay(1, timing) == 60.0
    assert policy.retry_delay(2, timing) == 120.0
    assert policy.retry_delay(1, policy.Timing(retry_delay_scale=0.01)) == 0.6


def test_retries_follow_maximum_retry_attempts() -> None:
    assert policy.should_retry(1, FUNCTION)
    assert policy.should_retry(2, FUNCTION)
    assert not policy.should_retry(3, FUNCTION)
    none = FunctionSettings(name="f", arn="arn", maximum_retry_attempts=0)
    assert not policy.should_retry(1, none)


def test_throttle_backoff_doubles_from_one_second_to_five_minutes() -> None:
    timing = policy.Timing()
    assert [policy.throttle_backoff(n, timing) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert policy.throttle_backoff(30, timing) == 300.0
    assert policy.throttle_backoff(5, policy.Timing(throttle_backoff_max=0.05)) == 0.05


def test_expiry_uses_maximum_event_age_scaled() -> None:
    event = Event(request_id="r", function="orders", payload=b"{}", received_at=1000.0)
    short = FunctionSettings(name="orders", arn="a", maximum_event_age_seconds=60)
    assert not policy.expired(event, short, 1059.0, policy.Timing())
    assert policy.expired(event, short, 1061.0, policy.Timing())
    assert policy.expired(event, short, 1001.0, policy.Timing(event_age_scale=0.01))


def test_failure_record_has_lambdas_fields() -> None:
    event = Event(request_id="req-1", function="orders", payload=b'{"k": 1}', received_at=0.0, invokes=3)
    last = LastResponse(200, "$LATEST", "Unhandled", b'{"errorMessage":"boom","errorType":"Error"}')
    record = policy.destination_record(event, FUNCTION, "RetriesExhausted", last, 1573755365.568)
    assert record == {
        "version": "1.0",
        "timestamp": "2019-11-14T18:16:05.568Z",
        "requestContext": {
            "requestId": "req-1",
            "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:orders:$LATEST",
            "condition": "RetriesExhausted",
            "approximateInvokeCount": 3,
        },
        "requestPayload": {"k": 1},
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
        "responsePayload": {"errorMessage": "boom", "errorType": "Error"},
    }
    json.dumps(record)


def test_success_record_has_no_function_error_and_keeps_non_json_bodies() -> None:
    event = Event(request_id="r", function="orders", payload=b'"text"', received_at=0.0, invokes=1)
    record = policy.destination_record(event, FUNCTION, "Success", LastResponse(200, "$LATEST", None, b"plain"), 0.0)
    assert record["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert record["requestPayload"] == "text"
    assert record["responsePayload"] == "plain"


def test_age_exceeded_before_any_run_has_empty_response_context() -> None:
    event = Event(request_id="r", function="orders", payload=b"{}", received_at=0.0)
    record = policy.destination_record(event, FUNCTION, "EventAgeExceeded", None, 0.0)
    assert record["responseContext"] == {}
    assert record["responsePayload"] is None
    assert record["requestContext"]["approximateInvokeCount"] == 0


def test_settings_from_env_name_the_variable() -> None:
    settings = AsyncSettings.from_env(
        {
            "LAMBDALET_ASYNC_BACKEND": "nats",
            "LAMBDALET_ASYNC_RETRY_DELAY_SCALE": "0.01",
            "LAMBDALET_NATS_URL": "nats://x:1",
        }
    )
    assert settings.backend == "nats"
    assert settings.timing.retry_delay_scale == 0.01
    assert settings.nats_url == "nats://x:1"
    try:
        AsyncSettings.from_env({"LAMBDALET_ASYNC_EVENT_AGE_SCALE": "soon"})
    except SettingsError as exc:
        assert "LAMBDALET_ASYNC_EVENT_AGE_SCALE" in str(exc)
    else:
        raise AssertionError("a bad scale was accepted")
