"""Repairing a Function's children (``reconcile.repair``) against an in-memory API: a child deleted or
changed by hand is put back and reported in ``ChildrenInSync``; replicas and server-filled fields are
left alone; a server that mutates on write converges after one write; one that undoes the write is
reported and not fought; repairs of one Function are rate-limited."""

from __future__ import annotations

import copy
from typing import Any

from lambdalet_operator import status
from lambdalet_operator.kube import Forbidden, Invalid, Obj
from lambdalet_operator.reconcile import FORBIDDEN_RETRY_SECONDS, RepairBudget, reconcile, repair
from lambdalet_operator.settings import Settings
from operator_support import NOW, FakeApi, resource

SETTINGS = Settings(gateway_url="http://gw.test:8080")


def now() -> Any:
    return NOW


class Clock:
    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


async def deployed(api: FakeApi, **spec: Any) -> None:
    api.put(resource(**spec))
    fn = api.find("Function", "hello")
    assert fn is not None
    await reconcile(api, SETTINGS, fn, now)
    api.writes.clear()


def sync_condition(api: FakeApi) -> dict[str, Any] | None:
    fn = api.find("Function", "hello")
    assert fn is not None
    found = status.find_condition(fn["status"], status.CHILDREN_IN_SYNC)
    return dict(found) if found is not None else None


def child(api: FakeApi, kind: str, name: str = "hello") -> Obj:
    found = api.find(kind, name)
    assert found is not None, kind
    return found


async def test_a_deleted_service_is_recreated_and_reported() -> None:
    api = FakeApi()
    await deployed(api)
    gone = child(api, "Service")
    await api.delete("Service", "default", "hello")
    budget = RepairBudget()
    result = await repair(api, SETTINGS, "Service", gone, deleted=True, now=now, budget=budget)
    assert result is not None and result.outcome is not None and result.outcome.repaired
    assert child(api, "Service")["spec"]["selector"] == {"lambdalet.dev/function": "hello"}
    assert ("create", "Service", "hello") in api.writes
    condition = sync_condition(api)
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("True", "Repaired")
    assert "created Service hello" in condition["message"]
    # Ready stays first, and stays what it was.
    fn = api.find("Function", "hello")
    assert fn is not None and fn["status"]["conditions"][0]["type"] == "Ready"


async def test_a_loosened_network_policy_is_reverted() -> None:
    api = FakeApi()
    await deployed(api, network={"egress": []})
    policy = child(api, "NetworkPolicy")
    policy["spec"]["egress"] = [{}]  # allow everything
    result = await repair(api, SETTINGS, "NetworkPolicy", policy, deleted=False, now=now, budget=RepairBudget())
    assert result is not None and result.drift == ("NetworkPolicy hello: spec.egress",)
    assert child(api, "NetworkPolicy")["spec"]["egress"] == []
    condition = sync_condition(api)
    assert condition is not None and "updated NetworkPolicy hello (spec.egress)" in condition["message"]


async def test_a_pod_template_edit_is_reverted_but_replicas_are_not() -> None:
    api = FakeApi()
    await deployed(api)
    deployment = child(api, "Deployment")
    deployment["spec"]["replicas"] = 5  # the gateway scaled it
    assert await repair(api, SETTINGS, "Deployment", deployment, deleted=False, now=now, budget=RepairBudget()) is None
    assert api.writes == []
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    container["image"] = "evil.example/python:latest"
    result = await repair(api, SETTINGS, "Deployment", deployment, deleted=False, now=now, budget=RepairBudget())
    assert result is not None and result.outcome is not None
    repaired = child(api, "Deployment")
    assert repaired["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/lambdalet/python3.12:0.1.0"
    assert repaired["spec"]["replicas"] == 5


async def test_a_pending_spec_change_is_not_reported_as_drift() -> None:
    api = FakeApi()
    await deployed(api)
    fn = api.find("Function", "hello")
    assert fn is not None
    fn["metadata"]["generation"] = 2  # edited; its own reconcile has not run yet
    fn["spec"]["memoryMB"] = 512
    deployment = child(api, "Deployment")
    assert await repair(api, SETTINGS, "Deployment", deployment, deleted=False, now=now, budget=RepairBudget()) is None
    assert api.writes == []


class MutatingApi(FakeApi):
    """Rewrites what it stores, as an API server does (here: a quantity to its canonical form, and a
    default it adds) or as an admission webhook that undoes a field (``undo``)."""

    def __init__(self, undo: bool = False) -> None:
        super().__init__()
        self.undo = undo

    def put(self, obj: Any) -> Obj:
        obj = copy.deepcopy(dict(obj))
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                if container["resources"]["requests"].get("cpu") == "1000m":
                    container["resources"]["requests"]["cpu"] = "1"
                container.setdefault("terminationMessagePath", "/dev/termination-log")
        if self.undo and obj["kind"] == "NetworkPolicy":
            obj["spec"]["egress"] = [{}]
        return super().put(obj)


async def test_a_child_the_server_rewrites_converges_after_one_write() -> None:
    api = MutatingApi()
    await deployed(api, memoryMB=1769)  # one vCPU: 1000m, stored as "1"
    deployment = child(api, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["env"] = []
    budget = RepairBudget()
    first = await repair(api, SETTINGS, "Deployment", deployment, deleted=False, now=now, budget=budget)
    assert first is not None and first.outcome is not None and not first.outcome.refused
    assert [w for w in api.writes if w[1] == "Deployment"] == [("patch", "Deployment", "hello")]
    # The watch then delivers the object as stored: nothing more to do.
    again = await repair(api, SETTINGS, "Deployment", child(api, "Deployment"), deleted=False, now=now, budget=budget)
    assert again is None
    fn = api.find("Function", "hello")
    assert fn is not None
    await reconcile(api, SETTINGS, fn, now)
    assert [w for w in api.writes if w[1] == "Deployment"] == [("patch", "Deployment", "hello")]


async def test_a_write_the_server_undoes_is_reported_and_not_fought() -> None:
    api = MutatingApi(undo=True)
    api.put(resource(network={"egress": []}))
    fn = api.find("Function", "hello")
    assert fn is not None
    first = await reconcile(api, SETTINGS, fn, now)
    assert first.refused == ("NetworkPolicy hello (spec.egress)",)
    condition = sync_condition(api)
    assert condition is not None and (condition["status"], condition["reason"]) == ("False", "RepairFailed")
    assert "NetworkPolicy hello (spec.egress)" in condition["message"]
    api.writes.clear()
    clock = Clock()
    budget = RepairBudget(limit=3, window=60, clock=clock)
    policy = child(api, "NetworkPolicy")
    result = await repair(api, SETTINGS, "NetworkPolicy", policy, deleted=False, now=now, budget=budget)
    assert result is not None and result.outcome is not None and result.outcome.refused
    # Its own watch event comes next: the budget is spent, nothing is written until the window passes.
    policy = child(api, "NetworkPolicy")
    throttled = await repair(api, SETTINGS, "NetworkPolicy", policy, deleted=False, now=now, budget=budget)
    assert throttled is not None and throttled.outcome is None and throttled.wait == 60
    assert [w for w in api.writes if w[0] != "status"] == [("patch", "NetworkPolicy", "hello")]
    condition = sync_condition(api)
    assert condition is not None and condition["reason"] == "RepairFailed"  # the more useful of the two
    clock.value += 61
    later = await repair(api, SETTINGS, "NetworkPolicy", policy, deleted=False, now=now, budget=budget)
    assert later is not None and later.outcome is not None


async def test_repairs_are_rate_limited_per_function_and_resume_after_the_window() -> None:
    api = FakeApi()
    await deployed(api)
    clock = Clock()
    budget = RepairBudget(limit=2, window=60, clock=clock)
    for _ in range(2):
        gone = child(api, "Service")
        await api.delete("Service", "default", "hello")
        result = await repair(api, SETTINGS, "Service", gone, deleted=True, now=now, budget=budget)
        assert result is not None and result.outcome is not None
        clock.value += 1
    gone = child(api, "Service")
    await api.delete("Service", "default", "hello")
    throttled = await repair(api, SETTINGS, "Service", gone, deleted=True, now=now, budget=budget)
    assert throttled is not None and throttled.outcome is None and throttled.wait == 58
    assert api.find("Service", "hello") is None
    condition = sync_condition(api)
    assert condition is not None and (condition["status"], condition["reason"]) == ("False", "RepairThrottled")
    assert (
        "Service hello: deleted" in condition["message"] and "repaired 2 times in the last 60 s" in condition["message"]
    )
    assert condition["message"].endswith("the next repair runs in 58 s")
    clock.value += 58
    resumed = await repair(api, SETTINGS, "Service", gone, deleted=True, now=now, budget=budget)
    assert resumed is not None and resumed.outcome is not None
    assert api.find("Service", "hello") is not None
    condition = sync_condition(api)
    assert condition is not None and (condition["status"], condition["reason"]) == ("True", "Repaired")


async def test_a_child_of_a_function_being_deleted_is_left_to_garbage_collection() -> None:
    api = FakeApi()
    await deployed(api)
    fn = api.find("Function", "hello")
    assert fn is not None
    fn["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    gone = child(api, "Service")
    await api.delete("Service", "default", "hello")
    api.writes.clear()
    assert await repair(api, SETTINGS, "Service", gone, deleted=True, now=now, budget=RepairBudget()) is None
    assert api.writes == []


class RefusedServices(FakeApi):
    """Refuses to create Services once ``error`` is set: a Role that lost ``create`` (403), an admission
    policy (422, as the API server answers for a ValidatingAdmissionPolicy)."""

    error: Exception | None = None

    async def create(self, obj: Any) -> Obj:
        if self.error is not None and obj["kind"] == "Service":
            raise self.error
        return await super().create(obj)


async def test_a_repair_the_api_refuses_is_reported_with_the_error_and_retried_later() -> None:
    api = RefusedServices()
    await deployed(api)
    api.error = Forbidden('services is forbidden: cannot create resource "services"', 403)
    gone = child(api, "Service")
    await api.delete("Service", "default", "hello")
    result = await repair(api, SETTINGS, "Service", gone, deleted=True, now=now, budget=RepairBudget())
    assert result is not None and result.outcome is None
    assert result.wait == FORBIDDEN_RETRY_SECONDS and "cannot create resource" in result.error
    condition = sync_condition(api)
    assert condition is not None and (condition["status"], condition["reason"]) == ("False", "RepairFailed")
    assert condition["message"].startswith("Service hello: deleted: the repair failed: services is forbidden")
    assert condition["message"].endswith(f"trying again in {FORBIDDEN_RETRY_SECONDS:.0f} s")


async def test_a_repair_refused_by_admission_is_not_an_invalid_spec() -> None:
    """The spec was accepted before: Ready keeps its reason, ChildrenInSync says what refused the repair,
    and the next attempt waits for the window."""
    api = RefusedServices()
    await deployed(api)
    api.error = Invalid("services is forbidden: ValidatingAdmissionPolicy 'freeze' denied request", 422)
    before = dict((api.find("Function", "hello") or {})["status"]["conditions"][0])
    gone = child(api, "Service")
    await api.delete("Service", "default", "hello")
    clock = Clock()
    budget = RepairBudget(clock=clock)
    result = await repair(api, SETTINGS, "Service", gone, deleted=True, now=now, budget=budget)
    assert result is not None and result.outcome is not None and not result.outcome.permanent
    assert result.outcome.refused == (
        "refused: services is forbidden: ValidatingAdmissionPolicy 'freeze' denied request",
    )
    fn = api.find("Function", "hello")
    assert fn is not None and fn["status"]["conditions"][0] == before
    condition = sync_condition(api)
    assert condition is not None and (condition["status"], condition["reason"]) == ("False", "RepairFailed")
    assert condition["message"].startswith("the API server refused to put back a child: services is forbidden")
    assert budget.wait("default", "hello") == 60
