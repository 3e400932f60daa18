"""The one module that talks to the Kubernetes API (through ``kubernetes_asyncio``'s ApiClient).

Objects go in and come out as plain dicts; credentials, the raw call and the error types (``KubeError``
and its subclasses, cause chained) come from the transport shared with the gateway,
``lambdalet.kubeclient``, so handlers decide retry-or-not on our own types.

Credentials: in a pod, the ServiceAccount token and CA from ``$LAMBDALET_SERVICEACCOUNT_DIR`` (default
``/var/run/secrets/kubernetes.io/serviceaccount``; the chart sets it so that a node that materialises
volumes elsewhere can rewrite it) and ``KUBERNETES_SERVICE_HOST``/``_PORT``; outside a pod, the
kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``). kopf logs in with the same credentials
(``handlers.login``), so the operator has exactly one identity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from kubernetes_asyncio import client as k8s

from lambdalet import kubeclient
from lambdalet.crd import PLURAL, VERSION
from lambdalet.kubeclient import Conflict, Forbidden, Invalid, KubeError, NotFound, Obj, load_configuration
from lambdalet.spec import API_GROUP

# Handlers and reconcile decide retry-or-not on these types, imported from here (their one API module).
__all__ = [
    "Conflict",
    "Credentials",
    "Forbidden",
    "Invalid",
    "Kube",
    "KubeError",
    "NotFound",
    "Obj",
    "credentials",
    "load_configuration",
    "path",
]

logger = logging.getLogger("lambdalet.operator.kube")

FIELD_MANAGER: Final = "lambdalet-operator"


# (api prefix, plural) per kind the operator handles.
_KINDS: Final[dict[str, tuple[str, str]]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Service": ("/api/v1", "services"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "Function": (f"/apis/{API_GROUP}/{VERSION}", PLURAL),
}


def path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = _KINDS[kind]
    out = f"{prefix}/namespaces/{namespace}/{plural}"
    if name is not None:
        out += f"/{name}"
    if subresource is not None:
        out += f"/{subresource}"
    return out


@dataclass(frozen=True)
class Credentials:
    """What kopf needs to log in as the same identity as this client."""

    server: str
    ca_path: str | None
    token: str | None
    certificate_path: str | None
    private_key_path: str | None
    insecure: bool


async def credentials(configuration: k8s.Configuration) -> Credentials:
    header = await configuration.get_api_key_with_prefix("BearerToken")
    token = str(header).split(" ", 1)[-1].strip() if header else None
    return Credentials(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        insecure=not configuration.verify_ssl,
    )


class Kube:
    """A small dict-in, dict-out client for the objects the operator manages."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self._api = api

    @classmethod
    async def connect(cls, environ: Mapping[str, str]) -> tuple[Kube, k8s.Configuration]:
        configuration = await load_configuration(environ)
        return cls(k8s.ApiClient(configuration)), configuration

    async def close(self) -> None:
        await self._api.close()

    async def _call(
        self,
        method: str,
        url: str,
        what: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> Obj:
        return await kubeclient.call(self._api, method, url, what, body=body, content_type=content_type, query=query)

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return await self._call("GET", path(kind, namespace, name), f"get {kind} {namespace}/{name}")
        except NotFound:
            return None

    async def create(self, obj: Mapping[str, Any]) -> Obj:
        meta = obj["metadata"]
        return await self._call(
            "POST",
            path(obj["kind"], meta["namespace"]),
            f"create {obj['kind']} {meta['namespace']}/{meta['name']}",
            body=obj,
            query=[("fieldManager", FIELD_MANAGER)],
        )

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        return await self._call(
            "PATCH",
            path(kind, namespace, name),
            f"patch {kind} {namespace}/{name}",
            body=patch,
            content_type="application/merge-patch+json",
            query=[("fieldManager", FIELD_MANAGER)],
        )

    async def replace(self, obj: Mapping[str, Any], resource_version: str) -> Obj:
        meta = obj["metadata"]
        body = {**obj, "metadata": {**meta, "resourceVersion": resource_version}}
        return await self._call(
            "PUT",
            path(obj["kind"], meta["namespace"], meta["name"]),
            f"replace {obj['kind']} {meta['namespace']}/{meta['name']}",
            body=body,
            query=[("fieldManager", FIELD_MANAGER)],
        )

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._call(
                "DELETE",
                path(kind, namespace, name),
                f"delete {kind} {namespace}/{name}",
                body={"propagationPolicy": "Background"},
            )
        except NotFound:
            return

    async def patch_function_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Obj:
        return await self._call(
            "PATCH",
            path("Function", namespace, name, "status"),
            f"patch Function {namespace}/{name} status",
            body={"status": status},
            content_type="application/merge-patch+json",
            query=[("fieldManager", FIELD_MANAGER)],
        )
