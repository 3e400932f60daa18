"""Test functions for execution-environment tests (any engineer may reuse them).

Handlers: ok, echo, raise_error, sleep, crash, allocate, big_response, context, unicode, env, log,
not_serializable, stream_print.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

_held: list[bytearray] = []


def ok(event: Any, context: Any) -> dict[str, Any]:
    return {"ok": True}


def echo(event: Any, context: Any) -> Any:
    return event


def raise_error(event: Any, context: Any) -> None:
    raise ValueError(event.get("message", "boom") if isinstance(event, dict) else "boom")


def sleep(event: Any, context: Any) -> dict[str, Any]:
    seconds = float(event.get("seconds", 10)) if isinstance(event, dict) else 10.0
    time.sleep(seconds)
    return {"slept": seconds}


def crash(event: Any, context: Any) -> None:
    print("about to crash", flush=True)
    code = int(event.get("code", 3)) if isinstance(event, dict) else 3
    os._exit(code)


def allocate(event: Any, context: Any) -> dict[str, Any]:
    """Allocate (and touch) ``mb`` megabytes; ``hold`` keeps them across invocations."""
    mb = int(event.get("mb", 64)) if isinstance(event, dict) else 64
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    if isinstance(event, dict) and event.get("hold"):
        _held.append(block)
    return {"allocated_mb": mb}


def big_response(event: Any, context: Any) -> str:
    size = int(event.get("bytes", 7 * 1024 * 1024)) if isinstance(event, dict) else 7 * 1024 * 1024
    return "x" * size


def context(event: Any, context: Any) -> dict[str, Any]:
    identity = context.identity
    client_context = context.client_context
    return {
        "aws_request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "log_group_name": context.log_group_name,
        "log_stream_name_set": bool(context.log_stream_name),
        "remaining_ms": context.get_remaining_time_in_millis(),
        "identity": {
            "cognito_identity_id": identity.cognito_identity_id,
            "cognito_identity_pool_id": identity.cognito_identity_pool_id,
        },
        "client_context_custom": getattr(client_context, "custom", None),
        "trace_id": os.environ.get("_X_AMZN_TRACE_ID"),
    }


def unicode(event: Any, context: Any) -> dict[str, Any]:
    return {"text": "héllo wörld ✓ 日本"}


def env(event: Any, context: Any) -> dict[str, Any]:
    names = event.get("names", []) if isinstance(event, dict) else []
    return {name: os.environ.get(name) for name in names} | {"cwd": os.getcwd()}


def log(event: Any, context: Any) -> dict[str, Any]:
    print(f"stdout line for {context.aws_request_id}")
    print(f"stderr line for {context.aws_request_id}", file=sys.stderr)
    return {"logged": True}


def not_serializable(event: Any, context: Any) -> Any:
    return {1, 2, 3}
