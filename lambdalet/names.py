"""Lambda names and ARNs: parsing what callers send, building what Lambda returns. Pure; no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "000000000000"
LATEST = "$LATEST"

# FunctionName as the Invoke API accepts it (API reference, pattern of the current model).
_FUNCTION_NAME = re.compile(
    r"^(?:arn:(?:aws[a-zA-Z-]*)?:lambda:)?"
    r"(?P<region>[a-z]{2}(?:-gov)?-[a-z]+-\d{1}:)?"
    r"(?P<account>\d{12}:)?"
    r"(?:function:)?"
    r"(?P<name>[a-zA-Z0-9\-_\.]+)"
    r"(?::(?P<qualifier>\$LATEST|[a-zA-Z0-9\-_]+))?$"
)
_QUALIFIER = re.compile(r"^[a-zA-Z0-9$_\-]{1,128}$")


class InvalidFunctionName(ValueError):
    """The caller's FunctionName or Qualifier does not match Lambda's patterns."""


@dataclass(frozen=True, slots=True)
class FunctionRef:
    """A parsed FunctionName: ``name``, optional ``qualifier``, and region/account when given as an ARN."""

    name: str
    qualifier: str | None = None
    region: str | None = None
    account: str | None = None


def parse_function_name(value: str, qualifier: str | None = None) -> FunctionRef:
    """Parse a bare name, a partial ARN or a full ARN, each optionally with ``:qualifier``.

    An explicit ``qualifier`` (the ``Qualifier`` query parameter) must agree with one in the name.
    """
    if not 1 <= len(value) <= 256:
        raise InvalidFunctionName(f"FunctionName must be 1 to 256 characters, got {len(value)}")
    match = _FUNCTION_NAME.match(value)
    if match is None:
        raise InvalidFunctionName(f"FunctionName {value!r} does not match Lambda's function name pattern")
    name = match["name"]
    if len(name) > 64:
        raise InvalidFunctionName(f"function name {name!r} is longer than 64 characters")
    in_name = match["qualifier"]
    if qualifier is not None and qualifier != "":
        if not _QUALIFIER.match(qualifier):
            raise InvalidFunctionName(f"Qualifier {qualifier!r} does not match [a-zA-Z0-9$_-]{{1,128}}")
        if in_name is not None and in_name != qualifier:
            raise InvalidFunctionName(
                f"the qualifier in FunctionName ({in_name}) and the Qualifier parameter ({qualifier}) differ"
            )
        in_name = qualifier
    region = match["region"][:-1] if match["region"] else None
    account = match["account"][:-1] if match["account"] else None
    return FunctionRef(name=name, qualifier=in_name, region=region, account=account)


def function_arn(
    name: str,
    *,
    region: str = DEFAULT_REGION,
    account: str = DEFAULT_ACCOUNT,
    qualifier: str | None = None,
) -> str:
    """``arn:aws:lambda:<region>:<account>:function:<name>[:<qualifier>]``."""
    arn = f"arn:aws:lambda:{region}:{account}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn
