"""Lambda function names: bare, partial ARN, full ARN, qualifiers."""

from __future__ import annotations

import pytest

from lambdalet.names import FunctionRef, InvalidFunctionName, function_arn, parse_function_name


@pytest.mark.parametrize(
    ("value", "qualifier", "expected"),
    [
        ("hello", None, FunctionRef("hello")),
        ("hello:$LATEST", None, FunctionRef("hello", "$LATEST")),
        ("hello", "prod", FunctionRef("hello", "prod")),
        ("123456789012:function:hello", None, FunctionRef("hello", account="123456789012")),
        (
            "arn:aws:lambda:us-west-2:123456789012:function:hello:7",
            None,
            FunctionRef("hello", "7", "us-west-2", "123456789012"),
        ),
    ],
)
def test_name_forms(value: str, qualifier: str | None, expected: FunctionRef) -> None:
    assert parse_function_name(value, qualifier) == expected


@pytest.mark.parametrize(
    ("value", "qualifier", "message"),
    [
        ("", None, "1 to 256 characters"),
        ("hello world", None, "does not match"),
        ("x" * 65, None, "longer than 64"),
        ("hello:1", "2", "differ"),
        ("hello", "bad qualifier!", "Qualifier"),
    ],
)
def test_invalid_names(value: str, qualifier: str | None, message: str) -> None:
    with pytest.raises(InvalidFunctionName, match=message):
        parse_function_name(value, qualifier)


def test_arn() -> None:
    assert function_arn("hello") == "arn:aws:lambda:us-east-1:000000000000:function:hello"
    assert function_arn("hello", qualifier="$LATEST").endswith("function:hello:$LATEST")
