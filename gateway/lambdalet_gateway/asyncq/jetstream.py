"""``NatsQueue``: the durable event queue on Kubernetes, on NATS JetStream.

Events are messages on ``lambdalet.async.<function>`` in one stream (file storage, work-queue retention: a
message is removed when acknowledged). Every gateway replica pulls from one durable consumer with
explicit acks: a message is delivered to one replica at a time and redelivered after ``ack_wait`` when that
replica vanishes (long invocations send progress acks). A publish is acknowledged by the broker only once
stored, and ``put`` returns only then — the 202 follows.

An event's state (function errors, invokes, throttles, last response) travels in the message body; a state
change is a new message (published with a ``Nats-Msg-Id`` derived from the state, so a repeat after a crash
is dropped by the broker's duplicate window) followed by a synchronous ack of the old one.

Destination queues are subjects; a subject with no stream yet gets one (file storage).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from lambdalet_gateway.asyncq.model import Delivery, Event, LastResponse
from lambdalet_gateway.asyncq.queue import QueueUnavailable, Settlement

log = logging.getLogger("lambdalet.asyncq.nats")

STREAM = "LAMBDALET_ASYNC"
PREFIX = "lambdalet.async."
CONSUMER = "lambdalet-worker"
#: How long a pull waits for messages before the worker looks again.
FETCH_SECONDS = 0.5
#: The broker drops a message whose ``Nats-Msg-Id`` it stored within this window.
DUPLICATE_WINDOW = 600.0
_TIMEOUT = 2.0
_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)


def _envelope(event: Event) -> bytes:
    last = event.last
    return json.dumps(
        {
            "requestId": event.request_id,
            "function": event.function,
            "receivedAt": event.received_at,
            "notBefore": event.not_before,
            "errors": event.errors,
            "invokes": event.invokes,
            "throttles": event.throttles,
            "payload": base64.b64encode(event.payload).decode(),
            "last": None
            if last is None
            else {
                "statusCode": last.status_code,
                "executedVersion": last.executed_version,
                "functionError": last.function_error,
                "payload": base64.b64encode(last.payload).decode(),
            },
        }
    ).encode()


def _event(body: bytes) -> Event:
    data: dict[str, Any] = json.loads(body)
    raw_last = data.get("last")
    last = (
        None
        if raw_last is None
        else LastResponse(
            int(raw_last["statusCode"]),
            str(raw_last["executedVersion"]),
            raw_last.get("functionError"),
            base64.b64decode(raw_last["payload"]),
        )
    )
    return Event(
        request_id=str(data["requestId"]),
        function=str(data["function"]),
        payload=base64.b64decode(data["payload"]),
        received_at=float(data["receivedAt"]),
        not_before=float(data.get("notBefore", 0.0)),
        errors=int(data.get("errors", 0)),
        invokes=int(data.get("invokes", 0)),
        throttles=int(data.get("throttles", 0)),
        last=last,
    )


def _state_id(event: Event) -> str:
    return f"{event.request_id}/{event.errors}/{event.invokes}/{event.throttles}"


def _stream_for(subject: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", subject)[:40]
    return f"LAMBDALET_DEST_{readable}_{hashlib.sha256(subject.encode()).hexdigest()[:8]}"


@dataclass
class _Held:
    """Messages fetched for functions at their concurrency limit, kept (with progress acks) until a slot frees."""

    messages: list[tuple[Msg, Event]] = field(default_factory=list)
    touched: float = 0.0


class NatsQueue:
    """The ``EventQueue`` on NATS JetStream (see the module docstring)."""

    def __init__(self, servers: str, *, ack_wait: float = 30.0, max_pending: int = 256) -> None:
        self.servers = [s.strip() for s in servers.split(",") if s.strip()]
        self.ack_wait = ack_wait
        self.max_pending = max_pending
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._held = _Held()
        self._deferred: set[int] = set()
        self._dest_streams: set[str] = set()
        self._closing = False
        self._stale = False

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise QueueUnavailable("the NATS queue is not started")
        return self._js

    async def start(self) -> None:
        async def disconnected() -> None:
            if not self._closing:
                log.warning("disconnected from NATS; reconnecting")

        async def reconnected() -> None:
            log.warning("reconnected to NATS")
            # A pull subscription does not reliably survive a broker restart; bind a fresh one.
            self._stale = True

        async def error(exc: Exception) -> None:
            log.warning("NATS: %s", exc)

        deadline = time.monotonic() + 30.0
        while True:
            try:
                self._nc = await nats.connect(
                    servers=self.servers,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.2,
                    connect_timeout=2,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                )
                break
            except _ERRORS as exc:
                if time.monotonic() > deadline:
                    raise QueueUnavailable(f"cannot connect to NATS at {self.servers}: {exc}") from exc
                await asyncio.sleep(0.5)
        self._js = self._nc.jetstream(timeout=_TIMEOUT)
        await self._ensure()

    async def _subscribe(self) -> None:
        self._stale = False
        if self._sub is not None:
            with contextlib.suppress(*_ERRORS):
                await self._sub.unsubscribe()
        self._sub = await self.js.pull_subscribe(
            PREFIX + ">",
            durable=CONSUMER,
            stream=STREAM,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_deliver=-1,
                max_ack_pending=self.max_pending,
            ),
        )

    async def _ensure(self) -> None:
        config = api.StreamConfig(
            name=STREAM,
            subjects=[PREFIX + ">"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.WORK_QUEUE,
            duplicate_window=DUPLICATE_WINDOW,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(config)
        await self._subscribe()

    async def close(self) -> None:
        if self._nc is not None:
            self._closing = True
            if not self._nc.is_closed:
                await self._nc.close()
        self._nc = self._js = self._sub = None

    # -- EventQueue -----------------------------------------------------------------------------------------

    async def _publish(self, event: Event) -> None:
        try:
            await self.js.publish(PREFIX + event.function, _envelope(event), headers={"Nats-Msg-Id": _state_id(event)})
        except _ERRORS as exc:
            raise QueueUnavailable(f"NATS did not store event {event.request_id}: {exc!r}") from exc

    async def put(self, event: Event) -> None:
        await self._publish(event)

    async def lease(self, limit: int, exclude: frozenset[str], now: float) -> list[Delivery]:
        if self._sub is None:
            raise QueueUnavailable("the NATS queue is not started")
        if self._stale:
            try:
                await self._subscribe()
            except _ERRORS as exc:
                self._stale = True
                raise QueueUnavailable(f"cannot subscribe to NATS: {exc!r}") from exc
        ready: list[Delivery] = []
        held: list[tuple[Msg, Event]] = []
        for msg, event in self._held.messages:
            if len(ready) < limit and event.function not in exclude:
                ready.append(self._delivery(msg, event))
            else:
                held.append((msg, event))
        self._held.messages = held
        await self._touch_held()
        room = min(limit - len(ready), self.max_pending - len(held))
        if room <= 0:
            return ready
        try:
            fetched = await self._sub.fetch(room, timeout=0.05 if ready or held else FETCH_SECONDS)
        except TimeoutError:  # nothing to fetch (nats-py raises both its own and the builtin timeout)
            return ready
        except _ERRORS as exc:
            if ready:
                return ready
            raise QueueUnavailable(f"cannot fetch from NATS: {exc!r}") from exc
        for msg in fetched:
            try:
                event = _event(msg.data)
            except (ValueError, KeyError, binascii.Error):
                log.error("terminating a malformed async message on %s", msg.subject)
                with contextlib.suppress(*_ERRORS):
                    await msg.term()
                continue
            if event.not_before > now:
                self._deferred.add(msg.metadata.sequence.stream)
                with contextlib.suppress(*_ERRORS):
                    await msg.nak(delay=event.not_before - now)
            elif event.function in exclude or len(ready) >= limit:
                self._held.messages.append((msg, event))
            else:
                ready.append(self._delivery(msg, event))
        return ready

    def _delivery(self, msg: Msg, event: Event) -> Delivery:
        seq = msg.metadata.sequence.stream
        deferred = seq in self._deferred
        self._deferred.discard(seq)
        # A message delivered before without a deliberate deferral by this process: the earlier holder may
        # have run it (an approximation: deferrals made by a process that died also count).
        redelivered = msg.metadata.num_delivered > 1 and not deferred
        return Delivery(replace(event, invokes=event.invokes + 1), redelivered=redelivered, token=msg)

    async def _touch_held(self) -> None:
        now = time.monotonic()
        if not self._held.messages or now - self._held.touched < self.ack_wait / 3:
            return
        self._held.touched = now
        for msg, _ in self._held.messages:
            with contextlib.suppress(*_ERRORS):
                await msg.in_progress()

    @staticmethod
    def _msg(delivery: Delivery) -> Msg:
        if not isinstance(delivery.token, Msg):
            raise TypeError("a NatsQueue delivery carries its message")
        return delivery.token

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await self._msg(delivery).ack_sync(timeout=_TIMEOUT)
        except _ERRORS as exc:
            raise QueueUnavailable(f"NATS did not take the ack: {exc!r}") from exc

    async def complete(self, delivery: Delivery, settlement: Settlement) -> None:
        for event in settlement.events:
            await self._publish(event)
        for message in settlement.messages:
            await self.publish(message.subject, message.body, message.id)
        await self._ack(delivery)

    async def reschedule(
        self,
        delivery: Delivery,
        not_before: float,
        *,
        ran: bool,
        function_error: bool,
        last: LastResponse | None,
    ) -> None:
        event = delivery.event
        updated = replace(
            event,
            not_before=not_before,
            errors=event.errors + (1 if function_error else 0),
            invokes=event.invokes if ran else event.invokes - 1,
            throttles=0 if ran else event.throttles + 1,
            last=last if last is not None else event.last,
        )
        await self._publish(updated)
        await self._ack(delivery)

    async def release(self, delivery: Delivery) -> None:
        msg = self._msg(delivery)
        self._held.messages.append((msg, replace(delivery.event, invokes=delivery.event.invokes - 1)))

    async def wait(self, within: float) -> None:
        # ``lease`` blocks in the broker's pull for up to FETCH_SECONDS: nothing to wait for here.
        await asyncio.sleep(0)

    async def depth(self) -> Mapping[str, int]:
        try:
            info = await self.js.stream_info(STREAM, subjects_filter=PREFIX + ">")
        except _ERRORS as exc:
            raise QueueUnavailable(f"cannot read the NATS stream: {exc!r}") from exc
        subjects = info.state.subjects or {}
        return {subject.removeprefix(PREFIX): int(count) for subject, count in subjects.items()}

    async def heartbeat(self, delivery: Delivery) -> None:
        try:
            await self._msg(delivery).in_progress()
        except _ERRORS as exc:
            raise QueueUnavailable(f"cannot extend the lease: {exc!r}") from exc

    # -- destination queues ---------------------------------------------------------------------------------

    async def publish(self, subject: str, body: bytes, message_id: str = "") -> None:
        """Store a destination record on ``subject`` (creating a stream for it when none captures it)."""
        headers = {"Nats-Msg-Id": message_id} if message_id else None
        try:
            try:
                await self.js.publish(subject, body, headers=headers)
            except nats.js.errors.NoStreamResponseError:
                await self._destination_stream(subject)
                await self.js.publish(subject, body, headers=headers)
        except _ERRORS as exc:
            raise QueueUnavailable(f"NATS did not store the record on {subject}: {exc!r}") from exc

    async def _destination_stream(self, subject: str) -> None:
        name = _stream_for(subject)
        if name in self._dest_streams:
            return
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await self.js.add_stream(
                api.StreamConfig(
                    name=name,
                    subjects=[subject],
                    storage=api.StorageType.FILE,
                    duplicate_window=DUPLICATE_WINDOW,
                )
            )
        self._dest_streams.add(name)

    async def messages(self, subject: str) -> list[bytes]:
        """Every record stored on a destination subject, oldest first (tools and tests)."""
        try:
            stream = await self.js.find_stream_name_by_subject(subject)
            info = await self.js.stream_info(stream, subjects_filter=subject)
        except nats.js.errors.NotFoundError:
            return []
        except _ERRORS as exc:
            raise QueueUnavailable(f"cannot read {subject}: {exc!r}") from exc
        count = int((info.state.subjects or {}).get(subject, 0))
        found: list[bytes] = []
        if count == 0:
            return found
        try:
            sub = await self.js.subscribe(subject, stream=stream, ordered_consumer=True)
            try:
                while len(found) < count:
                    found.append((await sub.next_msg(timeout=_TIMEOUT)).data)
            finally:
                with contextlib.suppress(*_ERRORS):
                    await sub.unsubscribe()
        except _ERRORS as exc:
            raise QueueUnavailable(f"cannot read {subject}: {exc!r}") from exc
        return found
