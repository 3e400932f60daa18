"""The handler of the `lambdalet.test/python-ric` test image (run by AWS's awslambdaric): it reports the
process it runs in, and times out or crashes on request, so the cluster tests can see resets."""

from __future__ import annotations

import os
import time
from typing import Any


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    action = event.get("action")
    if action == "sleep":
        time.sleep(float(event["seconds"]))
    elif action == "crash":
        os._exit(3)
    return {
        "hello": event.get("name"),
        "pid": os.getpid(),
        "function": context.function_name,
        "memory": context.memory_limit_in_mb,
        "handler": os.environ.get("_HANDLER"),
    }
