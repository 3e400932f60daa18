"""The scaling decision: a pure function of (now, observations, spec). No I/O, no clock, no asyncio.

The dispatcher calls :func:`decide` whenever an invocation has to wait for an environment (scale from
zero, scale out) and a background task calls it on a timer (provisioned environments, idle scale-to-zero);
both apply the :class:`Decision` through a :class:`~lambdalet_gateway.backend.Backend`.

Lambda's model: one invocation per environment, so the number of environments follows concurrency;
with ``per_environment`` N (Lambda Managed Instances) an environment takes up to N invocations at once.
- provisioned environments are started ahead and never retired for idleness;
- invocations that find no environment with a free slot get new ones started for them, one for every N
  waiting (less those already starting), while the function's environments stay under its cap;
- an on-demand environment with nothing in flight for ``idle_timeout_s`` is retired.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EnvironmentView:
    """One running environment as the autoscaler sees it."""

    id: str
    provisioned: bool
    #: Has an invocation in flight.
    busy: bool
    #: Monotonic seconds when it last became idle (ignored while busy).
    idle_since: float


@dataclass(frozen=True, slots=True)
class Observations:
    environments: tuple[EnvironmentView, ...] = ()
    starting_on_demand: int = 0
    starting_provisioned: int = 0
    #: Invocations admitted and waiting for an environment (there is then no free slot in any).
    waiting: int = 0


@dataclass(frozen=True, slots=True)
class ScalingSpec:
    provisioned: int
    idle_timeout_s: float
    #: Most environments the function may have (its reserved concurrency, or the platform's limit,
    #: divided by ``per_environment`` and rounded up).
    max_environments: int
    #: Invocations one environment takes at once.
    per_environment: int = 1


@dataclass(frozen=True, slots=True)
class Decision:
    start_provisioned: int = 0
    start_on_demand: int = 0
    #: Idle environments to stop.
    retire: tuple[str, ...] = ()
    #: The earliest time a later call would decide something new (an idle deadline), if any.
    next_check: float | None = None


def decide(now: float, observations: Observations, spec: ScalingSpec) -> Decision:
    """What to start and what to stop now."""
    envs = observations.environments
    provisioned_alive = sum(1 for env in envs if env.provisioned) + observations.starting_provisioned
    start_provisioned = max(0, spec.provisioned - provisioned_alive)

    retire: list[str] = []
    next_check: float | None = None
    surplus_provisioned = max(0, provisioned_alive - spec.provisioned)
    for env in envs:
        if env.busy:
            continue
        if env.provisioned:
            if surplus_provisioned > 0:
                retire.append(env.id)
                surplus_provisioned -= 1
            continue
        deadline = env.idle_since + spec.idle_timeout_s
        if deadline <= now:
            retire.append(env.id)
        elif next_check is None or deadline < next_check:
            next_check = deadline

    total = len(envs) - len(retire) + observations.starting_on_demand + observations.starting_provisioned
    room = max(0, spec.max_environments - total)
    start_provisioned = min(start_provisioned, room)
    pending = observations.starting_on_demand + observations.starting_provisioned + start_provisioned
    # every environment starting takes ``per_environment`` of the waiting invocations
    needed = -(-observations.waiting // spec.per_environment)
    start_on_demand = max(0, min(needed - pending, room - start_provisioned))
    return Decision(
        start_provisioned=start_provisioned,
        start_on_demand=start_on_demand,
        retire=tuple(retire),
        next_check=next_check,
    )
