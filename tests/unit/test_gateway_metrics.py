"""The gateway's per-function metrics: plain numbers on the hot path, exposed at scrape time exactly as
prometheus-client's own ``Counter`` and ``Histogram`` would expose the same events."""

from __future__ import annotations

import re

from lambdalet_gateway.metrics import DURATION_BUCKETS, Metrics
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

#: (function, outcome, duration s, init s or None, billed GB-s or None); then throttles (function, reason)
EVENTS = [
    ("hello", "success", 0.0004, 0.2, 0.000125),
    ("hello", "success", 0.003, None, 0.000125),
    ("hello", "function_error", 1.0, None, 0.125),  # exactly on a bucket's bound: counted in that bucket
    ("slow", "success", 1200.0, None, 150.0),  # past the last bound: only +Inf
    ("slow", "error", None, None, None),
]
THROTTLES = [("hello", "ReservedFunctionConcurrentInvocationLimitExceeded"), ("hello", "RATE"), ("hello", "RATE")]


def _ours() -> bytes:
    metrics = Metrics()
    for name in ("hello", "slow", "idle"):
        metrics.function(name)
    for name, outcome, duration, init, billed in EVENTS:
        fm = metrics.function(name)
        fm.outcomes[outcome] += 1
        if duration is not None:
            fm.duration.observe(duration)
        if init is not None:
            fm.cold_starts += 1
            fm.init_duration.observe(init)
        if billed is not None:
            fm.billed_gb_seconds += billed
    for name, reason in THROTTLES:
        metrics.function(name).throttled(reason)
    return metrics.render()


def _reference() -> bytes:
    """The same events through prometheus-client's classes, as the gateway recorded them before."""
    registry = CollectorRegistry(auto_describe=False)
    invocations = Counter(
        "lambdalet_invocations",
        "Invocations by outcome: success, function_error, error (platform), throttled.",
        ["function", "outcome"],
        registry=registry,
    )
    duration = Histogram(
        "lambdalet_invocation_duration_seconds",
        "Function duration as the execution environment reports it.",
        ["function"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    init = Histogram(
        "lambdalet_init_duration_seconds",
        "Init duration of cold starts.",
        ["function"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    throttles = Counter(
        "lambdalet_throttles", "Throttled invocations by Lambda's Reason.", ["function", "reason"], registry=registry
    )
    cold = Counter(
        "lambdalet_cold_starts", "Invocations that ran the function's init.", ["function"], registry=registry
    )
    billed = Counter(
        "lambdalet_billed_gb_seconds",
        "Billed duration times configured memory (Lambda's cost model), GB-seconds.",
        ["function"],
        registry=registry,
    )
    for name in ("hello", "slow", "idle"):
        for outcome in ("success", "function_error", "error", "throttled"):
            invocations.labels(function=name, outcome=outcome)
        duration.labels(function=name)
        init.labels(function=name)
        cold.labels(function=name)
        billed.labels(function=name)
    for name, outcome, seconds, init_s, gb_s in EVENTS:
        invocations.labels(function=name, outcome=outcome).inc()
        if seconds is not None:
            duration.labels(function=name).observe(seconds)
        if init_s is not None:
            cold.labels(function=name).inc()
            init.labels(function=name).observe(init_s)
        if gb_s is not None:
            billed.labels(function=name).inc(gb_s)
    for name, reason in THROTTLES:
        invocations.labels(function=name, outcome="throttled").inc()
        throttles.labels(function=name, reason=reason).inc()
    return generate_latest(registry)


def _without_created_values(text: bytes) -> list[str]:
    return [re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", line) for line in text.decode().splitlines()]


def test_the_exposition_is_prometheus_clients_own() -> None:
    """Line for line, in the same order (only the creation timestamps differ)."""
    assert _without_created_values(_ours()) == _without_created_values(_reference())


def test_values() -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(_ours().decode())
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("lambdalet_invocations_total", function="hello", outcome="success") == 2
    assert value("lambdalet_invocations_total", function="hello", outcome="throttled") == 3
    assert value("lambdalet_invocations_total", function="idle", outcome="success") == 0
    assert value("lambdalet_throttles_total", function="hello", reason="RATE") == 2
    assert value("lambdalet_invocation_duration_seconds_bucket", function="hello", le="0.001") == 1
    assert value("lambdalet_invocation_duration_seconds_bucket", function="hello", le="1.0") == 3
    assert value("lambdalet_invocation_duration_seconds_bucket", function="slow", le="900.0") == 0
    assert value("lambdalet_invocation_duration_seconds_bucket", function="slow", le="+Inf") == 1
    assert value("lambdalet_invocation_duration_seconds_count", function="hello") == 3
    assert value("lambdalet_init_duration_seconds_sum", function="hello") == 0.2
    assert value("lambdalet_cold_starts_total", function="hello") == 1
    assert value("lambdalet_billed_gb_seconds_total", function="slow") == 150.0
