"""Async settings, built from an injected environment (``AsyncSettings.from_env(os.environ)``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lambdalet_gateway.asyncq.policy import THROTTLE_BACKOFF_MAX_SECONDS, Timing

Backend = Literal["sqlite", "nats"]


class SettingsError(ValueError):
    """An environment variable has a value we cannot use; the message names it."""


def _float(environ: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: not a number") from exc
    if value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    return value


@dataclass(frozen=True, slots=True)
class AsyncSettings:
    """How the async path stores and delivers events.

    | env | default |
    | LAMBDALET_ASYNC_BACKEND | sqlite (embedded) or nats (Kubernetes) |
    | LAMBDALET_ASYNC_SQLITE_PATH | ``$LAMBDALET_STATE_DIR/async.sqlite3``, else ``.lambdalet/async.sqlite3`` |
    | LAMBDALET_NATS_URL | nats://127.0.0.1:4222 (comma-separated list for a cluster) |
    | LAMBDALET_ASYNC_WORKER_CONCURRENCY | 64 (events in flight per gateway process) |
    | LAMBDALET_ASYNC_RETRY_DELAY_SCALE | 1.0 (tests shrink Lambda's 1 min / 2 min retry delays) |
    | LAMBDALET_ASYNC_EVENT_AGE_SCALE | 1.0 (tests shrink maximumEventAgeSeconds) |
    | LAMBDALET_ASYNC_THROTTLE_BACKOFF_MAX | 300 seconds |
    | LAMBDALET_ASYNC_ACK_WAIT | 30 seconds (NATS: redelivery after a worker vanished) |
    """

    backend: Backend = "sqlite"
    #: None: in the gateway's state directory when it has one, else ``.lambdalet/async.sqlite3``.
    sqlite_path: Path | None = None
    nats_url: str = "nats://127.0.0.1:4222"
    worker_concurrency: int = 64
    timing: Timing = field(default_factory=Timing)
    ack_wait: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AsyncSettings:
        backend = environ.get("LAMBDALET_ASYNC_BACKEND", "sqlite") or "sqlite"
        if backend not in ("sqlite", "nats"):
            raise SettingsError(f"LAMBDALET_ASYNC_BACKEND={backend!r}: must be sqlite or nats")
        concurrency = _float(environ, "LAMBDALET_ASYNC_WORKER_CONCURRENCY", 64, minimum=1)
        if concurrency != int(concurrency):
            raise SettingsError(f"LAMBDALET_ASYNC_WORKER_CONCURRENCY={concurrency}: must be a whole number")
        return cls(
            backend="nats" if backend == "nats" else "sqlite",
            sqlite_path=Path(environ["LAMBDALET_ASYNC_SQLITE_PATH"])
            if environ.get("LAMBDALET_ASYNC_SQLITE_PATH")
            else None,
            nats_url=environ.get("LAMBDALET_NATS_URL") or "nats://127.0.0.1:4222",
            worker_concurrency=int(concurrency),
            timing=Timing(
                retry_delay_scale=_float(environ, "LAMBDALET_ASYNC_RETRY_DELAY_SCALE", 1.0),
                event_age_scale=_float(environ, "LAMBDALET_ASYNC_EVENT_AGE_SCALE", 1.0),
                throttle_backoff_max=_float(
                    environ, "LAMBDALET_ASYNC_THROTTLE_BACKOFF_MAX", THROTTLE_BACKOFF_MAX_SECONDS, minimum=0.001
                ),
            ),
            ack_wait=_float(environ, "LAMBDALET_ASYNC_ACK_WAIT", 30.0, minimum=1.0),
        )
