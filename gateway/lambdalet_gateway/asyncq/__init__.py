"""Asynchronous invocation (``X-Amz-Invocation-Type: Event``): accept durably, deliver at least once.

An event is accepted (202) only after it is durably stored in an :class:`EventQueue`: SQLite (WAL, fsync on
commit) for the embedded platform, NATS JetStream (file storage, explicit acks) on Kubernetes. A
:class:`Worker` leases events, invokes the function through an :class:`Invoker` (the gateway's dispatcher,
so reserved concurrency and the platform limit apply), and settles each event by Lambda's rules: retries
after function errors, backoff on throttles, expiry by event age, and destination records.

Layers: ``model`` and ``policy`` are pure (no I/O, no clock reads); ``sqlite`` and ``jetstream`` are the only
modules that touch storage; ``worker`` is the only one that invokes functions; ``http`` is the seam the
gateway's handlers call. Nothing here imports the rest of the gateway.
"""

from lambdalet_gateway.asyncq.model import (
    Delivery,
    Event,
    FunctionGone,
    FunctionSettings,
    InvokeFailed,
    InvokeResult,
    Throttled,
)
from lambdalet_gateway.asyncq.queue import EventQueue, Functions, Invoker, QueueUnavailable
from lambdalet_gateway.asyncq.settings import AsyncSettings

__all__ = [
    "AsyncSettings",
    "Delivery",
    "Event",
    "EventQueue",
    "FunctionGone",
    "FunctionSettings",
    "Functions",
    "InvokeFailed",
    "InvokeResult",
    "Invoker",
    "QueueUnavailable",
    "Throttled",
]
