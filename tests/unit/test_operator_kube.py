"""The operator's one API client module (``lambdalet_operator.kube``) against kmock, the kopf author's
Kubernetes API emulator: dict-in/dict-out CRUD, JSON merge patches, and API errors translated into the
operator's own exception types (which decide retry or not)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from lambdalet_operator import kube


@pytest.fixture
async def api(kmock: Any) -> AsyncIterator[kube.Kube]:
    client = kube.Kube(k8s.ApiClient(k8s.Configuration(host=str(kmock.url).rstrip("/"))))
    yield client
    await client.close()


CONFIGMAP = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "code", "namespace": "ns"},
    "data": {"a": "1"},
}


async def test_create_get_patch_delete(api: kube.Kube) -> None:
    assert await api.get("ConfigMap", "ns", "code") is None
    created = await api.create(CONFIGMAP)
    assert created["data"] == {"a": "1"}
    patched = await api.merge_patch("ConfigMap", "ns", "code", {"data": {"a": None, "b": "2"}})
    assert patched["data"] == {"b": "2"}  # JSON merge patch: null removes a key
    assert (await api.get("ConfigMap", "ns", "code") or {})["data"] == {"b": "2"}
    await api.delete("ConfigMap", "ns", "code")
    await api.delete("ConfigMap", "ns", "code")  # already gone: not an error
    assert await api.get("ConfigMap", "ns", "code") is None


async def test_creating_an_existing_object_is_a_conflict(api: kube.Kube) -> None:
    await api.create(CONFIGMAP)
    with pytest.raises(kube.Conflict, match="create ConfigMap ns/code: 409"):
        await api.create(CONFIGMAP)


@pytest.mark.parametrize(
    ("status", "error"),
    [(422, kube.Invalid), (403, kube.Forbidden), (404, kube.NotFound), (500, kube.KubeError), (503, kube.KubeError)],
)
async def test_api_errors_become_the_operators_types(
    kmock: Any, api: kube.Kube, status: int, error: type[kube.KubeError]
) -> None:
    await api.create({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fn", "namespace": "ns"}})
    kmock["patch"] << status << {"kind": "Status", "message": "spec.replicas: Invalid value"}
    with pytest.raises(error) as caught:
        await api.merge_patch("Deployment", "ns", "fn", {"spec": {}})
    assert caught.value.status == status
    assert f"patch Deployment ns/fn: {status}" in str(caught.value)
    # Only 4xx problems of the object itself are permanent; server errors stay transient.
    assert isinstance(caught.value, kube.Invalid) == (status == 422)


async def test_status_is_written_through_the_status_subresource(kmock: Any, api: kube.Kube) -> None:
    await api.create(
        {"apiVersion": "lambdalet.dev/v1alpha1", "kind": "Function", "metadata": {"name": "fn", "namespace": "ns"}}
    )
    await api.patch_function_status("ns", "fn", {"observedGeneration": 3})
    [request] = [r for r in kmock if r.method == "PATCH"]
    assert request.url.path == "/apis/lambdalet.dev/v1alpha1/namespaces/ns/functions/fn/status"
    assert request.subresource == "status"
    assert request.headers["Content-Type"] == "application/merge-patch+json"
    assert request.data == {"status": {"observedGeneration": 3}}
    assert request.params["fieldManager"] == "lambdalet-operator"


async def test_in_cluster_credentials_come_from_the_service_account_directory(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    environ = {
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "LAMBDALET_SERVICEACCOUNT_DIR": str(tmp_path),
    }
    configuration = await kube.load_configuration(environ)
    creds = await kube.credentials(configuration)
    assert creds.server == "https://10.0.0.1:443"
    assert creds.token == "s3cret-token"
    assert creds.ca_path == str(tmp_path / "ca.crt")


async def test_no_credentials_at_all_is_a_clear_error(tmp_path: Path) -> None:
    environ = {"KUBECONFIG": str(tmp_path / "missing"), "LAMBDALET_SERVICEACCOUNT_DIR": str(tmp_path)}
    with pytest.raises(kube.KubeError, match="no Kubernetes credentials"):
        await kube.load_configuration(environ)
