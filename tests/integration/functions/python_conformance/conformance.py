"""The conformance function (Python twin); every runtime has one with the same actions."""

from __future__ import annotations

import os
import time
from typing import Any


class ConformanceError(Exception):
    """The error type the function raises."""


_invocations = 0


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _invocations
    _invocations += 1
    action = event.get("action")
    if action == "echo":
        return {"echo": event.get("payload")}
    if action == "log":
        print(f"conformance log {event['message']}")
        return {"logged": True}
    if action == "count":
        return {"count": _invocations}
    if action == "error":
        raise ConformanceError(event["message"])
    if action == "sleep":
        time.sleep(event["seconds"])
        return {"slept": event["seconds"]}
    if action == "crash":
        os._exit(3)
    if action == "big":
        return {"data": "x" * event["size"]}
    if action == "context":
        return {
            "requestId": context.aws_request_id,
            "remainingMs": context.get_remaining_time_in_millis(),
            "functionName": context.function_name,
            "functionVersion": context.function_version,
            "memoryMB": int(context.memory_limit_in_mb),
            "invokedFunctionArn": context.invoked_function_arn,
            "logGroupName": context.log_group_name,
            "logStreamName": context.log_stream_name,
        }
    raise ValueError(f"unknown action {action}")
