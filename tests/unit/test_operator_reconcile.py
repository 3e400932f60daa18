"""Reconciling a Function against an in-memory API (``operator_support.FakeApi``): children created once,
idempotent repeats, replicas never fought, spec problems reported in status, and readiness following the
Deployment."""

from __future__ import annotations

from typing import Any

from lambdalet_operator import manifests
from lambdalet_operator.reconcile import GENERATION_ANNOTATION, Outcome, reconcile, refresh_status
from lambdalet_operator.settings import Settings
from operator_support import NOW, UID, FakeApi, resource

SETTINGS = Settings(gateway_url="http://gw.test:8080")


def now() -> Any:
    return NOW


async def run(api: FakeApi, body: dict[str, Any]) -> Outcome:
    api.put(body)
    stored = api.find("Function", body["metadata"]["name"])
    assert stored is not None
    return await reconcile(api, SETTINGS, stored, now)


def ready(api: FakeApi, name: str = "hello") -> dict[str, Any]:
    fn = api.find("Function", name)
    assert fn is not None
    [condition] = fn["status"]["conditions"]
    return dict(condition)


async def test_first_reconcile_creates_every_child_with_replicas_from_provisioned_concurrency() -> None:
    api = FakeApi()
    outcome = await run(api, resource(provisionedConcurrency=2, network={"egress": []}))
    assert outcome.retry_after is None and not outcome.permanent
    for kind, name in [
        ("ConfigMap", "hello-code"),
        ("ServiceAccount", "hello"),
        ("Service", "hello"),
        ("Deployment", "hello"),
        ("NetworkPolicy", "hello"),
    ]:
        assert api.find(kind, name) is not None, kind
    deployment = api.find("Deployment", "hello")
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["annotations"][GENERATION_ANNOTATION] == "1"
    fn = api.find("Function", "hello")
    assert fn is not None
    assert fn["status"]["url"] == "http://gw.test:8080/2015-03-31/functions/hello/invocations"
    assert fn["status"]["codeSha256"] == manifests.files_sha256(fn["spec"]["code"]["inline"]["files"])
    assert fn["status"]["observedGeneration"] == 1
    # The Deployment controller has not seen it yet: progressing, not ready.
    assert ready(api)["status"] == "False" and ready(api)["reason"] == "Progressing"


async def test_repeated_reconciles_change_nothing_and_leave_replicas_to_the_autoscaler() -> None:
    api = FakeApi()
    await run(api, resource(provisionedConcurrency=1))
    deployment = api.find("Deployment", "hello")
    assert deployment is not None
    deployment["spec"]["replicas"] = 7  # the gateway's autoscaler scaled up
    generation = deployment["metadata"]["generation"]
    api.writes.clear()
    fn = api.find("Function", "hello")
    assert fn is not None
    await reconcile(api, SETTINGS, fn, now)
    deployment = api.find("Deployment", "hello")
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 7
    assert deployment["metadata"]["generation"] == generation
    assert not [w for w in api.writes if w[0] in {"create", "delete"}]


async def test_a_code_update_rolls_the_pod_template() -> None:
    api = FakeApi()
    await run(api, resource())
    before = api.find("Deployment", "hello")
    assert before is not None
    old = before["spec"]["template"]["metadata"]["annotations"][manifests.CODE_HASH_ANNOTATION]
    await run(api, resource(generation=2, code={"inline": {"files": {"app.py": "def handler(e, c):\n    return 2\n"}}}))
    after = api.find("Deployment", "hello")
    assert after is not None
    assert after["spec"]["template"]["metadata"]["annotations"][manifests.CODE_HASH_ANNOTATION] != old
    cm = api.find("ConfigMap", "hello-code")
    assert cm is not None and "return 2" in next(iter(cm["data"].values()))


async def test_invalid_spec_is_reported_in_status_and_is_permanent() -> None:
    api = FakeApi()
    outcome = await run(api, resource(environment={"variables": {"AWS_REGION": "x"}}))
    assert outcome.permanent
    condition = ready(api)
    assert condition["reason"] == "InvalidSpec"
    assert "spec.environment.variables" in condition["message"] and "AWS_REGION" in condition["message"]
    assert api.find("Deployment", "hello") is None


async def test_code_path_is_refused_in_a_cluster() -> None:
    api = FakeApi()
    outcome = await run(api, resource(code={"path": "./src"}))
    assert outcome.permanent
    assert "spec.code.path" in ready(api)["message"]


async def test_a_missing_code_configmap_is_retried_and_named_in_status() -> None:
    api = FakeApi()
    outcome = await run(api, resource(code={"configMap": {"name": "my-code"}}))
    assert outcome.retry_after is not None and not outcome.permanent
    condition = ready(api)
    assert condition["reason"] == "CodeUnavailable" and "'my-code'" in condition["message"]
    api.put({"kind": "ConfigMap", "metadata": {"name": "my-code", "namespace": "default"}, "data": {"app.py": "x"}})
    outcome = await run(api, resource(code={"configMap": {"name": "my-code"}}))
    assert outcome.reason == "Progressing"
    assert api.find("Deployment", "hello") is not None


async def test_an_object_not_owned_by_the_function_is_never_taken_over() -> None:
    api = FakeApi()
    api.put({"kind": "Service", "metadata": {"name": "hello", "namespace": "default"}, "spec": {"ports": []}})
    outcome = await run(api, resource())
    assert outcome.reason == "Conflict" and outcome.retry_after is not None
    assert "Service named 'hello'" in ready(api)["message"]
    service = api.find("Service", "hello")
    assert service is not None and service["spec"] == {"ports": []}


async def test_children_that_the_spec_no_longer_needs_are_removed() -> None:
    api = FakeApi()
    await run(api, resource(network={"egress": []}))
    await run(api, resource(generation=2, code={"image": "example.com/fn:1"}, runtime=None, serviceAccountName="x"))
    assert api.find("ConfigMap", "hello-code") is None
    assert api.find("NetworkPolicy", "hello") is None
    assert api.find("ServiceAccount", "hello") is None


def rolled_out(api: FakeApi, replicas: int, ready_replicas: int) -> None:
    deployment = api.find("Deployment", "hello")
    assert deployment is not None
    deployment["spec"]["replicas"] = replicas
    deployment["status"] = {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready_replicas,
    }


async def test_deployment_progress_moves_the_function_to_ready() -> None:
    api = FakeApi()
    await run(api, resource(provisionedConcurrency=2))
    rolled_out(api, replicas=2, ready_replicas=1)
    await refresh_status(api, "default", "hello", UID, now)
    assert ready(api)["reason"] == "Progressing" and "1 of 2" in ready(api)["message"]
    rolled_out(api, replicas=2, ready_replicas=2)
    await refresh_status(api, "default", "hello", UID, now)
    fn = api.find("Function", "hello")
    assert fn is not None
    assert ready(api)["status"] == "True" and ready(api)["reason"] == "Ready"
    assert (fn["status"]["readyInstances"], fn["status"]["desiredInstances"]) == (2, 2)


async def test_scale_to_zero_is_ready() -> None:
    api = FakeApi()
    await run(api, resource())
    rolled_out(api, replicas=0, ready_replicas=0)
    await refresh_status(api, "default", "hello", UID, now)
    assert ready(api)["status"] == "True" and "scaled to zero" in ready(api)["message"]


async def test_a_deployment_of_an_older_generation_does_not_make_a_newer_spec_ready() -> None:
    api = FakeApi()
    await run(api, resource())
    fn = api.find("Function", "hello")
    assert fn is not None
    fn["metadata"]["generation"] = 2  # edited; its reconcile has not run yet
    rolled_out(api, replicas=1, ready_replicas=1)
    await refresh_status(api, "default", "hello", UID, now)
    assert ready(api)["reason"] == "Progressing"
    assert fn["status"]["readyInstances"] == 1


async def test_spec_problems_stay_in_status_while_the_deployment_changes() -> None:
    api = FakeApi()
    await run(api, resource())
    await run(api, resource(generation=2, code={"configMap": {"name": "absent"}}))
    rolled_out(api, replicas=1, ready_replicas=1)
    await refresh_status(api, "default", "hello", UID, now)
    assert ready(api)["reason"] == "CodeUnavailable"
