"""The delivery worker: lease events, invoke through the gateway, settle each by Lambda's rules.

Concurrency: at most ``worker_concurrency`` events in flight per process, and per function at most its
``reservedConcurrency`` (events of a function at its limit are not leased). The invoker's own admission
(reserved concurrency shared with synchronous traffic, the platform limit) may still throttle: a throttled
event goes back to the queue with exponential backoff and keeps its retry budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import replace

from lambdalet_gateway.asyncq import policy
from lambdalet_gateway.asyncq.metrics import AsyncMetrics
from lambdalet_gateway.asyncq.model import (
    Delivery,
    Destination,
    Event,
    FunctionGone,
    FunctionSettings,
    InvokeFailed,
    InvokeResult,
    LastResponse,
    Throttled,
)
from lambdalet_gateway.asyncq.queue import EventQueue, Functions, Invoker, Message, QueueUnavailable, Settlement
from lambdalet_gateway.asyncq.settings import AsyncSettings

log = logging.getLogger("lambdalet.asyncq.worker")

#: How often the worker looks for events that became due (retries, backoffs) when nothing woke it.
POLL_SECONDS = 0.2
DEPTH_SECONDS = 2.0
SETTLE_RETRY_SECONDS = 0.5
SETTLE_GIVE_UP_SECONDS = 300.0
_RECORDS = uuid.UUID("6c616d62-6461-6c65-7400-6173796e6371")


class Worker:
    """Owns the delivery loop of one gateway process. ``accept`` is the 202 path."""

    def __init__(
        self,
        queue: EventQueue,
        invoker: Invoker,
        functions: Functions,
        *,
        settings: AsyncSettings,
        metrics: AsyncMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.invoker = invoker
        self.functions = functions
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._inflight: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: deque[Delivery] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._depth_task: asyncio.Task[None] | None = None
        self._known: set[str] = set()

    # -- accepting ------------------------------------------------------------------------------------------

    async def accept(self, function: str, payload: bytes, request_id: str | None = None) -> str:
        """Store an event durably and return its request id; raises ``QueueUnavailable`` if not stored."""
        request_id = request_id or str(uuid.uuid4())
        now = self.clock()
        await self.queue.put(
            Event(request_id=request_id, function=function, payload=payload, received_at=now, not_before=now)
        )
        self.metrics.received.labels(function).inc()
        return request_id

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="asyncq-worker")
        self._depth_task = asyncio.create_task(self._report_depth(), name="asyncq-depth")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop leasing, give deliveries in flight ``grace`` seconds to finish and settle, then cancel the
        rest (their leases are reclaimed by the next start, so those events run again)."""
        for task in (self._loop_task, self._depth_task):
            if task is not None:
                task.cancel()
        for task in (self._loop_task, self._depth_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        held, self._held = self._held, deque()
        for delivery in held:
            with contextlib.suppress(QueueUnavailable):
                await self.queue.release(delivery)

    # -- the loop -------------------------------------------------------------------------------------------

    def _cap(self, function: str) -> int | None:
        found = self.functions.lookup(function)
        if found is None or found.reserved_concurrency is None or found.reserved_concurrency == 0:
            return None
        return found.reserved_concurrency

    def _has_room(self, function: str) -> bool:
        cap = self._cap(function)
        return cap is None or self._inflight[function] < cap

    def _start(self, delivery: Delivery) -> None:
        self._inflight[delivery.event.function] += 1
        task = asyncio.create_task(self._deliver(delivery), name=f"asyncq-{delivery.event.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _start_held(self) -> None:
        waiting: deque[Delivery] = deque()
        for delivery in self._held:
            if self._has_room(delivery.event.function):
                self._start(delivery)
            else:
                waiting.append(delivery)
        self._held = waiting

    async def _run(self) -> None:
        while True:
            self._start_held()
            free = self.settings.worker_concurrency - len(self._tasks) - len(self._held)
            if free <= 0:
                await self._idle()
                continue
            # Functions at their reserved concurrency, or with leased events waiting here, are not leased.
            exclude = frozenset(
                {name for name in self._inflight if not self._has_room(name)}
                | {delivery.event.function for delivery in self._held}
            )
            try:
                deliveries = await self.queue.lease(free, exclude, self.clock())
            except QueueUnavailable as exc:
                log.warning("cannot lease async events: %s", exc)
                await asyncio.sleep(SETTLE_RETRY_SECONDS)
                continue
            if not deliveries:
                await self._idle()
                continue
            for delivery in deliveries:
                if self._has_room(delivery.event.function):
                    self._start(delivery)
                else:
                    # Keep the lease and start it when a delivery of that function ends.
                    self._held.append(delivery)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("async delivery task failed", exc_info=task.exception())

    async def _idle(self) -> None:
        self._wake.clear()
        waiters = [
            asyncio.ensure_future(self.queue.wait(POLL_SECONDS)),
            asyncio.ensure_future(self._wake.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _report_depth(self) -> None:
        while True:
            with contextlib.suppress(QueueUnavailable):
                depth = await self.queue.depth()
                for name in self._known - set(depth):
                    self.metrics.depth.labels(name).set(0)
                for name, count in depth.items():
                    self.metrics.depth.labels(name).set(count)
                self._known = set(depth)
            await asyncio.sleep(DEPTH_SECONDS)

    # -- one delivery ---------------------------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery) -> None:
        name = delivery.event.function
        # The lease is kept alive for the whole delivery: the invocation and its settlement.
        beat = asyncio.create_task(self._heartbeat(delivery))
        try:
            await self._deliver_one(delivery)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            self._inflight[name] -= 1
            if self._inflight[name] <= 0:
                del self._inflight[name]

    async def _deliver_one(self, delivery: Delivery) -> None:
        event = delivery.event
        timing = self.settings.timing
        if delivery.redelivered:
            self.metrics.redelivered.labels(event.function).inc()
        function = self.functions.lookup(event.function)
        if function is None:
            await self._function_missing(delivery)
            return
        if function.reserved_concurrency == 0:
            # Lambda: with reserved concurrency 0, async events go straight to the failure destination.
            await self._finish(delivery, function, "RetriesExhausted", replace(event, invokes=0), event.last)
            self.metrics.dropped.labels(event.function, "reserved_concurrency_zero").inc()
            return
        if policy.expired(event, function, self.clock(), timing):
            await self._finish(
                delivery, function, "EventAgeExceeded", replace(event, invokes=event.invokes - 1), event.last
            )
            self.metrics.dropped.labels(event.function, "event_age_exceeded").inc()
            return
        try:
            result = await self._invoke(delivery)
        except FunctionGone:
            await self._function_missing(delivery)
            return
        except (Throttled, InvokeFailed) as exc:
            reason = "throttled" if isinstance(exc, Throttled) else "system_error"
            delay = policy.throttle_backoff(event.throttles + 1, timing)
            log.info("async event %s %s; retrying in %.2fs", event.request_id, reason, delay)
            await self._settle_reschedule(delivery, self.clock() + delay, ran=False, function_error=False, last=None)
            self.metrics.retried.labels(event.function, reason).inc()
            return
        last = LastResponse(result.status_code, result.executed_version, result.function_error, result.payload)
        if result.function_error is None:
            self.metrics.age.labels(event.function).observe(max(self.clock() - event.received_at, 0.0))
            await self._finish(delivery, function, "Success", event, last)
            self.metrics.delivered.labels(event.function).inc()
            return
        errors = event.errors + 1
        if policy.should_retry(errors, function):
            delay = policy.retry_delay(errors, timing)
            log.info(
                "async event %s: function error %s; retry %d in %.2fs",
                event.request_id,
                result.function_error,
                errors,
                delay,
            )
            await self._settle_reschedule(delivery, self.clock() + delay, ran=True, function_error=True, last=last)
            self.metrics.retried.labels(event.function, "function_error").inc()
            return
        await self._finish(delivery, function, "RetriesExhausted", event, last)
        self.metrics.dropped.labels(event.function, "retries_exhausted").inc()

    async def _function_missing(self, delivery: Delivery) -> None:
        """The function is unknown: it may be coming back (a manifest being edited, a watch catching up),
        so the event waits with backoff; it is dropped only past Lambda's default maximum event age."""
        event = delivery.event
        timing = self.settings.timing
        if self.clock() - event.received_at > policy.DEFAULT_MAXIMUM_EVENT_AGE * timing.event_age_scale:
            log.warning("dropping async event %s: function %s not found", event.request_id, event.function)
            await self._settle(delivery, Settlement())
            self.metrics.dropped.labels(event.function, "function_not_found").inc()
            return
        delay = policy.throttle_backoff(event.throttles + 1, timing)
        await self._settle_reschedule(delivery, self.clock() + delay, ran=False, function_error=False, last=None)
        self.metrics.retried.labels(event.function, "function_not_found").inc()

    async def _invoke(self, delivery: Delivery) -> InvokeResult:
        event = delivery.event
        return await self.invoker.invoke(event.function, event.payload, request_id=event.request_id)

    async def _heartbeat(self, delivery: Delivery) -> None:
        while True:
            await asyncio.sleep(self.settings.ack_wait / 3)
            with contextlib.suppress(QueueUnavailable):
                await self.queue.heartbeat(delivery)

    async def _finish(
        self,
        delivery: Delivery,
        function: FunctionSettings,
        condition: policy.Condition,
        event: Event,
        last: LastResponse | None,
    ) -> None:
        destination = function.on_success if condition == "Success" else function.on_failure
        settlement = Settlement()
        kind = ""
        if destination is not None:
            record = policy.destination_record(event, function, condition, last, self.clock())
            settlement, kind = self._route(destination, event, condition, json.dumps(record).encode())
        if destination is not None and not kind:
            self.metrics.destination_failures.labels(function.name, "function").inc()
            log.error(
                "async event %s: destination function %s not found; record dropped",
                event.request_id,
                destination.function,
            )
        await self._settle(delivery, settlement)
        if kind:
            self.metrics.destination_deliveries.labels(function.name, condition, kind).inc()
            if kind == "function" and destination is not None and destination.function is not None:
                self.metrics.received.labels(destination.function).inc()

    def _route(
        self, destination: Destination, source: Event, condition: policy.Condition, record: bytes
    ) -> tuple[Settlement, str]:
        # Derived from the source event, so settling the same event twice (after a crash) stores one record.
        record_id = str(uuid.uuid5(_RECORDS, f"{source.request_id}/{condition}"))
        if destination.queue is not None:
            return Settlement(messages=[Message(destination.queue, record, record_id)]), "queue"
        target = destination.function
        if target is None or self.functions.lookup(target) is None:
            return Settlement(), ""
        event = Event(request_id=record_id, function=target, payload=record, received_at=self.clock())
        return Settlement(events=[event]), "function"

    async def _settle(self, delivery: Delivery, settlement: Settlement) -> None:
        await self._retrying(lambda: self.queue.complete(delivery, settlement))

    async def _settle_reschedule(
        self, delivery: Delivery, not_before: float, *, ran: bool, function_error: bool, last: LastResponse | None
    ) -> None:
        await self._retrying(
            lambda: self.queue.reschedule(delivery, not_before, ran=ran, function_error=function_error, last=last)
        )

    async def _retrying(self, step: Callable[[], Awaitable[None]]) -> None:
        """Settle, retrying while the queue is unavailable (a broker restart): the lease is kept alive
        meanwhile, and settling twice is harmless (follow-ups carry ids the queue deduplicates). After
        SETTLE_GIVE_UP_SECONDS the lease is abandoned and the event delivered again."""
        deadline = time.monotonic() + SETTLE_GIVE_UP_SECONDS
        while True:
            try:
                await step()
                return
            except QueueUnavailable as exc:
                if time.monotonic() > deadline:
                    log.error("could not settle an async event; it will be redelivered: %s", exc)
                    return
                await asyncio.sleep(SETTLE_RETRY_SECONDS)
