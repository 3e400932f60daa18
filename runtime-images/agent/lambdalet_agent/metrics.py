"""Prometheus metrics of one execution environment (one registry per agent, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "lambdalet_agent_invocations",
            "Invocations handled by this execution environment, by outcome (success, error).",
            ["outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lambdalet_agent_errors",
            "Failed invocations by Lambda error type (function errors, Sandbox.Timedout, Runtime.ExitError...).",
            ["error_type"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "lambdalet_agent_invocation_duration_seconds",
            "Duration of invocations as reported on the REPORT line.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.init_duration = Histogram(
            "lambdalet_agent_init_duration_seconds",
            "Runtime init duration (bootstrap start to its first /next).",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.resets = Counter(
            "lambdalet_agent_resets",
            "Environment resets (runtime killed and re-initialised), by reason (timeout, exit, init_error).",
            ["reason"],
            registry=self.registry,
        )
        self.busy = Counter(
            "lambdalet_agent_busy_rejections",
            "Invocations refused with 429 because one was already running.",
            registry=self.registry,
        )

        # Children bound once: no label lookup on the hot path.
        self.successes = self.invocations.labels("success")
        self.failures = self.invocations.labels("error")

    def render(self) -> bytes:
        return generate_latest(self.registry)
