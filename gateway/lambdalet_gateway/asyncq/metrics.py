"""Prometheus metrics of the async path (registered on the registry the gateway serves)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_AGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600, 1800, 3600, 21600)


class AsyncMetrics:
    """Counters by function; ``dropped`` by reason (``retries_exhausted``, ``event_age_exceeded``,
    ``reserved_concurrency_zero``, ``function_not_found``): an event leaves the queue without success only
    through one of these, after its failure destination (if any) has the record."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.received = Counter(
            "lambdalet_async_events_received_total", "Async events accepted (202).", ["function"], registry=registry
        )
        self.delivered = Counter(
            "lambdalet_async_events_delivered_total",
            "Async events whose invocation succeeded.",
            ["function"],
            registry=registry,
        )
        self.retried = Counter(
            "lambdalet_async_events_retried_total",
            "Async events returned to the queue, by reason (function_error, throttled, system_error, ...).",
            ["function", "reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "lambdalet_async_events_dropped_total",
            "Async events that left the queue without success, by reason.",
            ["function", "reason"],
            registry=registry,
        )
        self.redelivered = Counter(
            "lambdalet_async_events_redelivered_total",
            "Deliveries of an event whose previous delivery ended without a recorded outcome (possible duplicate).",
            ["function"],
            registry=registry,
        )
        self.age = Histogram(
            "lambdalet_async_event_age_at_delivery_seconds",
            "Time from acceptance to successful delivery.",
            ["function"],
            buckets=_AGE_BUCKETS,
            registry=registry,
        )
        self.destination_deliveries = Counter(
            "lambdalet_async_destination_deliveries_total",
            "Invocation records sent to a destination, by condition and kind (function, queue).",
            ["function", "condition", "kind"],
            registry=registry,
        )
        self.destination_failures = Counter(
            "lambdalet_async_destination_failures_total",
            "Invocation records that could not be sent to their destination, by kind.",
            ["function", "kind"],
            registry=registry,
        )
        self.depth = Gauge(
            "lambdalet_async_queue_depth", "Async events stored, per function.", ["function"], registry=registry
        )
