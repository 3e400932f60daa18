"""The scaling decision as a pure function of (now, observations, spec): injected time, no sleeps."""

from __future__ import annotations

from lambdalet_gateway.autoscaler import Decision, EnvironmentView, Observations, ScalingSpec, decide

SPEC = ScalingSpec(provisioned=0, idle_timeout_s=300.0, max_environments=10)


def idle(env_id: str, since: float, *, provisioned: bool = False) -> EnvironmentView:
    return EnvironmentView(env_id, provisioned, busy=False, idle_since=since)


def busy(env_id: str, *, provisioned: bool = False) -> EnvironmentView:
    return EnvironmentView(env_id, provisioned, busy=True, idle_since=0.0)


def test_nothing_to_do_for_an_unused_function() -> None:
    assert decide(1000.0, Observations(), SPEC) == Decision()


def test_a_waiting_invocation_starts_one_environment_from_zero() -> None:
    assert decide(0.0, Observations(waiting=1), SPEC).start_on_demand == 1


def test_waiting_invocations_already_covered_by_starting_environments_start_nothing_more() -> None:
    assert decide(0.0, Observations(waiting=3, starting_on_demand=3), SPEC).start_on_demand == 0
    assert decide(0.0, Observations(waiting=5, starting_on_demand=3), SPEC).start_on_demand == 2


def test_scale_out_stops_at_the_cap() -> None:
    envs = tuple(busy(f"e{i}") for i in range(8))
    decision = decide(0.0, Observations(environments=envs, waiting=5), SPEC)
    assert decision.start_on_demand == 2


def test_zero_cap_starts_nothing() -> None:
    spec = ScalingSpec(provisioned=0, idle_timeout_s=300.0, max_environments=0)
    assert decide(0.0, Observations(waiting=4), spec).start_on_demand == 0


def test_idle_environment_retires_exactly_at_its_timeout() -> None:
    obs = Observations(environments=(idle("a", since=100.0),))
    before = decide(399.9, obs, SPEC)
    assert before.retire == ()
    assert before.next_check == 400.0
    assert decide(400.0, obs, SPEC).retire == ("a",)


def test_busy_environments_never_retire() -> None:
    assert decide(10_000.0, Observations(environments=(busy("a"),)), SPEC).retire == ()


def test_only_the_expired_environments_retire_and_next_check_is_the_earliest_deadline() -> None:
    obs = Observations(environments=(idle("old", 0.0), idle("new", 250.0), idle("mid", 200.0)))
    decision = decide(310.0, obs, SPEC)
    assert decision.retire == ("old",)
    assert decision.next_check == 500.0


def test_provisioned_environments_start_ahead_and_stay_warm() -> None:
    spec = ScalingSpec(provisioned=2, idle_timeout_s=1.0, max_environments=10)
    assert decide(0.0, Observations(), spec).start_provisioned == 2
    assert decide(0.0, Observations(starting_provisioned=1), spec).start_provisioned == 1
    warm = Observations(environments=(idle("p1", 0.0, provisioned=True), idle("p2", 0.0, provisioned=True)))
    decision = decide(1_000_000.0, warm, spec)
    assert decision == Decision(next_check=None)


def test_lowering_provisioned_concurrency_retires_idle_surplus() -> None:
    spec = ScalingSpec(provisioned=1, idle_timeout_s=300.0, max_environments=10)
    obs = Observations(environments=(idle("p1", 0.0, provisioned=True), idle("p2", 0.0, provisioned=True)))
    assert len(decide(0.0, obs, spec).retire) == 1


def test_waiters_count_provisioned_environments_being_started() -> None:
    spec = ScalingSpec(provisioned=2, idle_timeout_s=300.0, max_environments=10)
    decision = decide(0.0, Observations(waiting=3), spec)
    assert decision.start_provisioned == 2
    assert decision.start_on_demand == 1


def test_retired_environments_free_room_for_new_ones() -> None:
    spec = ScalingSpec(provisioned=0, idle_timeout_s=1.0, max_environments=1)
    decision = decide(5.0, Observations(environments=(idle("a", 0.0),), waiting=0), spec)
    assert decision.retire == ("a",)


FOUR = ScalingSpec(provisioned=0, idle_timeout_s=300.0, max_environments=10, per_environment=4)


def test_with_four_slots_an_environment_is_started_for_every_four_waiting() -> None:
    assert decide(0.0, Observations(waiting=1), FOUR).start_on_demand == 1
    assert decide(0.0, Observations(waiting=4), FOUR).start_on_demand == 1
    assert decide(0.0, Observations(waiting=5), FOUR).start_on_demand == 2
    assert decide(0.0, Observations(waiting=9), FOUR).start_on_demand == 3


def test_with_four_slots_a_starting_environment_covers_four_waiting() -> None:
    assert decide(0.0, Observations(waiting=4, starting_on_demand=1), FOUR).start_on_demand == 0
    assert decide(0.0, Observations(waiting=5, starting_on_demand=1), FOUR).start_on_demand == 1
    assert decide(0.0, Observations(waiting=3, starting_provisioned=1), FOUR).start_on_demand == 0


def test_with_four_slots_full_environments_scale_out_to_the_cap() -> None:
    spec = ScalingSpec(provisioned=0, idle_timeout_s=300.0, max_environments=2, per_environment=4)
    full = (busy("e0"),)
    assert decide(0.0, Observations(environments=full, waiting=8), spec).start_on_demand == 1


def test_with_four_slots_only_environments_with_nothing_in_flight_retire() -> None:
    envs = (busy("partly-used"), idle("unused", 0.0))
    decision = decide(300.0, Observations(environments=envs), FOUR)
    assert decision.retire == ("unused",)
