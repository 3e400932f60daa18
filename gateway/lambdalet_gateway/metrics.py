"""Prometheus metrics, each labelled by ``function``, in the gateway's own registry.

Per-invocation metrics are updated through a :class:`FunctionMetrics` whose labelled children are
resolved once per function, not per request. Gauges that describe the current state (environments by
state, concurrent executions) are read from the dispatcher at scrape time, so the hot path pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    function: str
    idle: int
    busy: int
    starting: int
    waiting: int
    in_flight: int


class _StateCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[PoolSnapshot]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        envs = GaugeMetricFamily(
            "lambdalet_environments", "Execution environments by state.", labels=["function", "state"]
        )
        concurrent = GaugeMetricFamily(
            "lambdalet_concurrent_executions",
            "Invocations admitted and not finished (running or waiting for an environment).",
            labels=["function"],
        )
        waiting = GaugeMetricFamily(
            "lambdalet_waiting_invocations", "Invocations waiting for an environment to start.", labels=["function"]
        )
        for snap in self._source():
            envs.add_metric([snap.function, "idle"], snap.idle)
            envs.add_metric([snap.function, "busy"], snap.busy)
            envs.add_metric([snap.function, "starting"], snap.starting)
            concurrent.add_metric([snap.function], snap.in_flight)
            waiting.add_metric([snap.function], snap.waiting)
        yield envs
        yield concurrent
        yield waiting


class FunctionMetrics:
    """One function's labelled metric children."""

    __slots__ = ("_function", "_throttles", "billed_gb_seconds", "cold_starts", "duration", "init_duration", "outcomes")

    def __init__(self, metrics: Metrics, function: str) -> None:
        self.outcomes = {
            outcome: metrics.invocations.labels(function=function, outcome=outcome)
            for outcome in ("success", "function_error", "error", "throttled")
        }
        self.duration = metrics.duration.labels(function=function)
        self.init_duration = metrics.init_duration.labels(function=function)
        self.cold_starts = metrics.cold_starts.labels(function=function)
        self.billed_gb_seconds = metrics.billed_gb_seconds.labels(function=function)
        self._throttles = metrics.throttles
        self._function = function

    def throttled(self, reason: str) -> None:
        self.outcomes["throttled"].inc()
        self._throttles.labels(function=self._function, reason=reason).inc()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.invocations = Counter(
            "lambdalet_invocations",
            "Invocations by outcome: success, function_error, error (platform), throttled.",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "lambdalet_invocation_duration_seconds",
            "Function duration as the execution environment reports it.",
            ["function"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.init_duration = Histogram(
            "lambdalet_init_duration_seconds",
            "Init duration of cold starts.",
            ["function"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.throttles = Counter(
            "lambdalet_throttles",
            "Throttled invocations by Lambda's Reason.",
            ["function", "reason"],
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "lambdalet_cold_starts", "Invocations that ran the function's init.", ["function"], registry=self.registry
        )
        self.billed_gb_seconds = Counter(
            "lambdalet_billed_gb_seconds",
            "Billed duration times configured memory (Lambda's cost model), GB-seconds.",
            ["function"],
            registry=self.registry,
        )
        self._functions: dict[str, FunctionMetrics] = {}

    def function(self, name: str) -> FunctionMetrics:
        found = self._functions.get(name)
        if found is None:
            found = self._functions[name] = FunctionMetrics(self, name)
        return found

    def watch(self, source: Callable[[], Iterable[PoolSnapshot]]) -> None:
        self.registry.register(_StateCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
