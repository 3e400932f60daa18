"""The gateway's Kubernetes backend: functions from ``Function`` objects, environments from pods.

- ``book`` — pure bookkeeping: EndpointSlices → ready pods per Service, pod objects → address, agent
  running, deletionTimestamp; which pod is handed out to which start (a new pod as soon as its agent
  answers); Function objects → ``lambdalet.spec.Function``. No I/O, no clock, no asyncio tasks.
- ``api`` — the one module that calls the Kubernetes API (``kubernetes_asyncio``); nothing else here
  imports the client library.
- ``backend`` — the :class:`~lambdalet_gateway.backend.Backend` (Deployment ``scale`` subresource up,
  delete-then-scale down), the watches that feed it and the dispatcher, and the ``GET /readyz`` asked of
  new pods' agents.

Importing this package is cheap: the client library is imported by ``api`` only, and the gateway imports
``backend`` only when ``LAMBDALET_BACKEND=kubernetes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from lambdalet_gateway.registry import Catalog, Registry


@runtime_checkable
class FunctionSource(Protocol):
    """A backend that also knows which functions exist (Kubernetes: the Function objects it watches);
    the app runs its registry instead of the manifest registry."""

    def registry(self, on_change: Callable[[Catalog], None]) -> Registry: ...
