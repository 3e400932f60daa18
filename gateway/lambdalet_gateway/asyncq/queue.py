"""The seams: the durable ``EventQueue``, and what the worker needs from the gateway (``Invoker``,
``Functions``). One-method-ish protocols so tests pass tiny fakes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from lambdalet_gateway.asyncq.model import Delivery, Event, FunctionSettings, InvokeResult, LastResponse


class QueueUnavailable(Exception):
    """The queue could not store or settle an event (broker down, disk error). Nothing was accepted."""


@dataclass(frozen=True, slots=True)
class Message:
    """A destination record for a queue subject; ``id`` lets a broker drop a re-sent copy."""

    subject: str
    body: bytes
    id: str = ""


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a delivery ends: removed from the queue, with follow-ups stored in the same step.

    ``events`` are new events (destination functions are invoked asynchronously); ``messages`` go to
    destination queues.
    """

    events: Sequence[Event] = ()
    messages: Sequence[Message] = ()


class EventQueue(Protocol):
    """A durable queue of async events. ``put`` returns only once the event survives a crash."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, event: Event) -> None:
        """Store the event durably (raise ``QueueUnavailable`` when it could not be)."""

    async def lease(self, limit: int, exclude: frozenset[str], now: float) -> list[Delivery]:
        """Up to ``limit`` events due at ``now``, skipping functions in ``exclude``, leased to this worker."""
        ...

    async def complete(self, delivery: Delivery, settlement: Settlement) -> None:
        """Remove the event, storing the follow-ups: both happen, or (after a crash) neither."""

    async def reschedule(
        self,
        delivery: Delivery,
        not_before: float,
        *,
        ran: bool,
        function_error: bool,
        last: LastResponse | None,
    ) -> None:
        """Return the event to the queue until ``not_before``. ``ran``: the function ran (a retry after a
        function error); otherwise it was throttled or hit a system error and does not count as an invoke."""

    async def release(self, delivery: Delivery) -> None:
        """Give a lease back untouched (the worker took more than it can start)."""

    async def wait(self, within: float) -> None:
        """Return when new events may be due, or after ``within`` seconds."""

    async def depth(self) -> Mapping[str, int]:
        """Stored events per function."""
        ...

    async def heartbeat(self, delivery: Delivery) -> None:
        """Keep a lease alive during a long invocation."""


class Invoker(Protocol):
    """Runs one invocation through the gateway's data path (admission, concurrency limits, an environment).

    Raises ``Throttled`` (concurrency), ``InvokeFailed`` (system error) or ``FunctionGone``.
    """

    async def invoke(self, function: str, payload: bytes, *, request_id: str) -> InvokeResult: ...


class Functions(Protocol):
    """The function registry as the async path sees it."""

    def lookup(self, name: str) -> FunctionSettings | None: ...


class StaticFunctions:
    """A fixed registry (tests, and callers that rebuild it on change)."""

    def __init__(self, functions: Mapping[str, FunctionSettings]) -> None:
        self._functions = dict(functions)

    def lookup(self, name: str) -> FunctionSettings | None:
        return self._functions.get(name)
