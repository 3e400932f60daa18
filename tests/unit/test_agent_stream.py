"""Streaming response mode: the size cap is Lambda's 200 MB, and how a stream's trailer fields become the
invocation's error."""

from __future__ import annotations

import base64

from lambdalet_agent.server import stream_error
from lambdalet_agent.settings import STREAM_RESPONSE_LIMIT, from_args


def test_the_streamed_response_cap_is_200_mb() -> None:
    assert STREAM_RESPONSE_LIMIT == 200 * 1024 * 1024 == 209_715_200
    assert from_args(["--handler", "app.handler"], {}).stream_response_limit == STREAM_RESPONSE_LIMIT


def test_error_trailers_give_the_type_and_the_decoded_body() -> None:
    body = b'{"errorMessage":"stream broke","errorType":"RuntimeError"}'
    trailers = {
        "lambda-runtime-function-error-type": "Function.RuntimeError",
        "lambda-runtime-function-error-body": base64.b64encode(body).decode(),
    }
    assert stream_error(trailers) == ("Function.RuntimeError", body)


def test_a_missing_or_undecodable_body_becomes_an_empty_message_of_the_type() -> None:
    expected = ("Custom.Broken", b'{"errorType":"Custom.Broken","errorMessage":""}')
    assert stream_error({"lambda-runtime-function-error-type": "Custom.Broken"}) == expected
    broken = {"lambda-runtime-function-error-type": "Custom.Broken", "lambda-runtime-function-error-body": "%%%"}
    assert stream_error(broken) == expected


def test_a_body_without_a_type_names_its_own_type() -> None:
    body = b'{"errorMessage":"x","errorType":"TypeError"}'
    assert stream_error({"lambda-runtime-function-error-body": base64.b64encode(body).decode()}) == ("TypeError", body)


def test_no_error_trailers_is_no_error() -> None:
    assert stream_error({}) is None
    assert stream_error({"x-other": "1"}) is None
