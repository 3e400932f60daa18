"""Prometheus metrics, each labelled by ``function``, in the gateway's own registry.

Per-invocation figures are plain numbers in a :class:`FunctionMetrics` per function that the hot path adds
to; they become Prometheus counters and histograms only when ``/metrics`` is scraped (hand-written rather
than prometheus-client's ``Counter``/``Histogram`` on purpose: those cost a lock and a dozen Python calls
per invocation; the exposition is the same, as the unit tests check against prometheus-client's own).
Gauges that describe the current state (environments by state, concurrent executions) are read from the
dispatcher at scrape time too, so the hot path pays nothing for them.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_BOUNDS = (*(floatToGoString(b) for b in DURATION_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


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


OUTCOMES = ("success", "function_error", "error", "throttled")


class _Histogram:
    """A histogram's cumulative state: per-bucket counts (the last one is ``+Inf``) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value


class FunctionMetrics:
    """One function's per-invocation figures as plain numbers the hot path adds to: no prometheus-client
    call (with its lock and checks, about 13 Python calls per invocation) until ``/metrics`` is scraped,
    when :class:`_FunctionCollector` reads them."""

    __slots__ = (
        "billed_gb_seconds",
        "cold_starts",
        "created",
        "duration",
        "function",
        "init_duration",
        "outcomes",
        "throttles",
    )

    def __init__(self, function: str) -> None:
        self.function = function
        self.created = time.time()
        #: Invocations by outcome (see :data:`OUTCOMES`).
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        #: Throttled invocations by Lambda's Reason, and when each reason first occurred.
        self.throttles: dict[str, tuple[int, float]] = {}
        self.duration = _Histogram()
        self.init_duration = _Histogram()
        self.cold_starts = 0
        self.billed_gb_seconds = 0.0

    def throttled(self, reason: str) -> None:
        self.outcomes["throttled"] += 1
        count, created = self.throttles.get(reason, (0, time.time()))
        self.throttles[reason] = (count + 1, created)


class _FunctionCollector(Collector):
    """The per-function counters and histograms, in the exposition prometheus-client's own ``Counter`` and
    ``Histogram`` give (``_total``, ``_bucket``/``_count``/``_sum``, ``_created``)."""

    def __init__(self, functions: dict[str, FunctionMetrics]) -> None:
        self._functions = functions

    def collect(self) -> Iterator[Metric]:
        functions = list(self._functions.values())
        invocations = CounterMetricFamily(
            "lambdalet_invocations",
            "Invocations by outcome: success, function_error, error (platform), throttled.",
            labels=["function", "outcome"],
        )
        duration = HistogramMetricFamily(
            "lambdalet_invocation_duration_seconds",
            "Function duration as the execution environment reports it.",
            labels=["function"],
        )
        init = HistogramMetricFamily(
            "lambdalet_init_duration_seconds", "Init duration of cold starts.", labels=["function"]
        )
        throttles = CounterMetricFamily(
            "lambdalet_throttles", "Throttled invocations by Lambda's Reason.", labels=["function", "reason"]
        )
        cold = CounterMetricFamily(
            "lambdalet_cold_starts", "Invocations that ran the function's init.", labels=["function"]
        )
        billed = CounterMetricFamily(
            "lambdalet_billed_gb_seconds",
            "Billed duration times configured memory (Lambda's cost model), GB-seconds.",
            labels=["function"],
        )
        for fm in functions:
            for outcome, count in fm.outcomes.items():
                invocations.add_metric([fm.function, outcome], count, created=fm.created)
            for family, histogram in ((duration, fm.duration), (init, fm.init_duration)):
                buckets, total = [], 0
                for bound, count in zip(_BOUNDS, histogram.counts, strict=True):
                    total += count
                    buckets.append((bound, total))
                family.add_metric([fm.function], buckets, histogram.sum)
                family.samples.append(Sample(f"{family.name}_created", {"function": fm.function}, fm.created))
        for fm in functions:
            for reason, (count, created) in fm.throttles.items():
                throttles.add_metric([fm.function, reason], count, created=created)
            cold.add_metric([fm.function], fm.cold_starts, created=fm.created)
            billed.add_metric([fm.function], fm.billed_gb_seconds, created=fm.created)
        yield from (invocations, duration, init, throttles, cold, billed)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._functions: dict[str, FunctionMetrics] = {}
        self.registry.register(_FunctionCollector(self._functions))

    def function(self, name: str) -> FunctionMetrics:
        found = self._functions.get(name)
        if found is None:
            found = self._functions[name] = FunctionMetrics(name)
        return found

    def watch(self, source: Callable[[], Iterable[PoolSnapshot]]) -> None:
        self.registry.register(_StateCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
