"""Sleeps ``event["seconds"]`` seconds (timeout and concurrency demos)."""

import time


def handler(event, context):
    seconds = float(event.get("seconds", 1)) if isinstance(event, dict) else 1.0
    time.sleep(seconds)
    return {"slept": seconds, "remainingMs": context.get_remaining_time_in_millis()}
