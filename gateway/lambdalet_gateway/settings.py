"""Gateway settings: a frozen dataclass built from an injected environment, then overridden by flags.

``Settings.from_env(os.environ)`` fails fast with a :class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from lambdalet.names import DEFAULT_ACCOUNT, DEFAULT_REGION

#: Values of the event-loop choice (``LAMBDALET_EVENT_LOOP``): uvloop when importable, or either one.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


class SettingsError(ValueError):
    """An invalid setting; the message names the variable or flag."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: Where the functions come from: manifest files or directories (embedded mode).
    manifests: tuple[Path, ...] = ()
    backend: str = "local"
    #: Kubernetes backend: the namespaces whose Functions it serves (empty: all namespaces).
    namespaces: tuple[str, ...] = ()
    #: Platform-wide cap on concurrent executions (Lambda's account concurrency limit).
    concurrency_limit: int = 1000
    #: Per function: at most this many invocations wait for an environment to start ...
    queue_size: int = 100
    #: ... each for at most this long (then 502 ResourceNotReadyException).
    queue_timeout_s: float = 30.0
    region: str = DEFAULT_REGION
    account_id: str = DEFAULT_ACCOUNT
    #: How often the autoscaler runs (it also runs whenever an invocation waits).
    scale_interval_s: float = 0.5
    #: How often manifests are checked for changes.
    reload_interval_s: float = 1.0
    #: The interpreter that runs ``-m lambdalet_agent`` for local environments.
    agent_python: str = sys.executable
    #: Where local environments keep generated files (inline code, port files).
    state_dir: Path | None = None
    #: Log lines kept per function for ``lambdalet logs``.
    log_lines: int = 5000
    #: Echo every function's log lines to the gateway's stdout, prefixed with the function name.
    echo_logs: bool = False
    shutdown_timeout_s: float = 5.0
    #: Cap each local environment's CPU at memoryMB/1769 of a CPU (cgroups, where allowed).
    cpu_limits: bool = False
    #: Local agents are forked from a zygote that imported the agent (Linux), instead of each starting an
    #: interpreter: a cold start without the interpreter's start and the agent's imports.
    fast_start: bool = True
    #: With fast start, agents forked ahead and kept waiting for the next cold starts.
    standby_agents: int = 1
    #: Kubernetes backend: hand a new pod to a waiting start as soon as its agent answers ``GET /readyz``
    #: (not when the kubelet's readiness probe next passes).
    kube_probe_agents: bool = True
    #: The event loop: ``auto`` (uvloop where installed, else asyncio's), ``uvloop`` or ``asyncio``.
    event_loop: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        def integer(name: str, default: int, minimum: int) -> int:
            raw = environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                raise SettingsError(f"{name} must be an integer (got {raw!r})") from None
            if value < minimum:
                raise SettingsError(f"{name} must be at least {minimum} (got {value})")
            return value

        def number(name: str, default: float) -> float:
            raw = environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise SettingsError(f"{name} must be a number (got {raw!r})") from None
            if value <= 0:
                raise SettingsError(f"{name} must be positive (got {value})")
            return value

        def flag(name: str, default: bool = False) -> bool:
            raw = environ.get(name, "").lower()
            if raw == "":
                return default
            if raw in {"0", "false", "no"}:
                return False
            if raw in {"1", "true", "yes"}:
                return True
            raise SettingsError(f"{name} must be true or false (got {environ[name]!r})")

        event_loop = environ.get("LAMBDALET_EVENT_LOOP") or cls.event_loop
        if event_loop not in EVENT_LOOPS:
            raise SettingsError(f"LAMBDALET_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)} (got {event_loop!r})")
        manifests = tuple(Path(p) for p in environ.get("LAMBDALET_MANIFESTS", "").split(os.pathsep) if p)
        state_dir = environ.get("LAMBDALET_STATE_DIR")
        return cls(
            host=environ.get("LAMBDALET_BIND_ADDRESS") or cls.host,
            port=integer("LAMBDALET_GATEWAY_PORT", cls.port, 0),
            manifests=manifests,
            backend=environ.get("LAMBDALET_BACKEND") or cls.backend,
            namespaces=tuple(n.strip() for n in environ.get("LAMBDALET_NAMESPACES", "").split(",") if n.strip()),
            concurrency_limit=integer("LAMBDALET_CONCURRENCY_LIMIT", cls.concurrency_limit, 1),
            queue_size=integer("LAMBDALET_QUEUE_SIZE", cls.queue_size, 1),
            queue_timeout_s=number("LAMBDALET_QUEUE_TIMEOUT_SECONDS", cls.queue_timeout_s),
            region=environ.get("LAMBDALET_REGION") or environ.get("AWS_REGION") or cls.region,
            account_id=environ.get("LAMBDALET_ACCOUNT_ID") or cls.account_id,
            scale_interval_s=number("LAMBDALET_SCALE_INTERVAL_SECONDS", cls.scale_interval_s),
            agent_python=environ.get("LAMBDALET_AGENT_PYTHON") or sys.executable,
            state_dir=Path(state_dir) if state_dir else None,
            echo_logs=flag("LAMBDALET_ECHO_LOGS"),
            cpu_limits=flag("LAMBDALET_CPU_LIMITS"),
            # LAMBDALET_AGENT_FORK_SERVER: the former opt-in for the same mechanism, now on by default
            fast_start=flag("LAMBDALET_FAST_START", True) and flag("LAMBDALET_AGENT_FORK_SERVER", True),
            standby_agents=integer("LAMBDALET_STANDBY_AGENTS", cls.standby_agents, 0),
            kube_probe_agents=flag("LAMBDALET_KUBE_PROBE_AGENTS", True),
            event_loop=event_loop,
        )

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with the given fields replaced (``None`` values are ignored: flags not given)."""
        given = {key: value for key, value in changes.items() if value is not None}
        return replace(self, **given)  # type: ignore[arg-type]
