"""The seam between the dispatcher and whatever runs execution environments.

A backend starts one environment (an agent serving the Invoke API, ready: ``GET /readyz`` answered 200)
and stops one. Everything else — admission, the one-invocation-per-environment rule, the wait queue, the
scaling decision, metrics — stays in the dispatcher, so every backend gets the same behaviour.

The local backend runs agent processes on loopback; a Kubernetes backend maps ``start`` to one more ready
pod (Deployment scale + EndpointSlice) and ``stop`` to removing that pod.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NewType, Protocol

from lambdalet.spec import Function

from .agent_client import AgentConnection

EnvironmentId = NewType("EnvironmentId", str)


@dataclass(eq=False, slots=True)
class Environment:
    """One ready execution environment: an agent that takes one invocation at a time."""

    id: EnvironmentId
    function: str
    #: Base URL of the agent, e.g. ``http://127.0.0.1:40123``.
    url: str
    provisioned: bool
    #: Backend-private handle (a process, a pod name ...).
    handle: object = field(default=None, repr=False)
    #: Set by the dispatcher: the function's generation this environment was started for.
    generation: int = 0
    #: The dispatcher's keep-alive connection to the agent (created on first use).
    connection: AgentConnection | None = field(default=None, repr=False)

    def connect(self) -> AgentConnection:
        """The environment's connection, created from ``url`` (``http://host:port``) on first use."""
        if self.connection is None:
            host, _, port = self.url.removeprefix("http://").rstrip("/").rpartition(":")
            self.connection = AgentConnection(host.strip("[]"), int(port))
        return self.connection


class StartError(Exception):
    """An environment could not be started; the message is the reason a user should read.

    ``function_error`` marks reasons that belong to the function (code that cannot be built or run),
    answered as a function error rather than as a platform failure.
    """

    def __init__(self, message: str, *, function_error: bool = False, error_type: str = "Runtime.StartError") -> None:
        super().__init__(message)
        self.function_error = function_error
        self.error_type = error_type


#: Called by a backend when an environment goes away on its own (process exit, pod deleted).
LostCallback = Callable[[Environment], None]


class Backend(Protocol):
    async def start(self, function: Function, *, provisioned: bool) -> Environment:
        """Start one environment for ``function`` and return it once ready; raise :class:`StartError`."""
        ...

    async def stop(self, environment: Environment) -> None:
        """Stop an environment the dispatcher no longer uses; leave nothing running."""
        ...

    async def close(self) -> None:
        """Stop everything (gateway shutdown)."""
        ...
