"""The one module that talks to the Kubernetes API (through ``kubernetes_asyncio``'s ApiClient).

Objects go in and come out as plain dicts; library errors are translated once into ``KubeError`` and its
subclasses (with the cause chained), so handlers decide retry-or-not on our own types.

Credentials: in a pod, the ServiceAccount token and CA from ``$LAMBDALET_SERVICEACCOUNT_DIR`` (default
``/var/run/secrets/kubernetes.io/serviceaccount``; the chart sets it so that a node that materialises
volumes elsewhere can rewrite it) and ``KUBERNETES_SERVICE_HOST``/``_PORT``; outside a pod, the
kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``). kopf logs in with the same credentials
(``handlers.login``), so the operator has exactly one identity.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from lambdalet.crd import PLURAL, VERSION
from lambdalet.spec import API_GROUP

logger = logging.getLogger("lambdalet.operator.kube")

DEFAULT_SERVICEACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
FIELD_MANAGER: Final = "lambdalet-operator"
REQUEST_TIMEOUT: Final = 30.0

Obj = dict[str, Any]


class KubeError(Exception):
    """A failed API call; transient unless a subclass says otherwise."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Invalid(KubeError):
    """The API server refused the object itself (422, 400): retrying the same object cannot help."""


class Forbidden(KubeError):
    """RBAC denied the call: the chart's Role lacks a permission."""


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


def _translate(exc: BaseException, what: str) -> KubeError:
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        detail = exc.reason or ""
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(exc.body or "{}").get("message") or detail
        message = f"{what}: {status} {detail}"
        if status == 404:
            return NotFound(message, status)
        if status == 409:
            return Conflict(message, status)
        if status in (400, 422):
            return Invalid(message, status)
        if status in (401, 403):
            return Forbidden(message, status)
        return KubeError(message, status)
    return KubeError(f"{what}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Credentials:
    """What kopf needs to log in as the same identity as this client."""

    server: str
    ca_path: str | None
    token: str | None
    certificate_path: str | None
    private_key_path: str | None
    insecure: bool


async def load_configuration(environ: Mapping[str, str]) -> k8s.Configuration:
    """In-cluster credentials when a token is mounted, otherwise the kubeconfig."""
    configuration = k8s.Configuration()
    sa_dir = Path(environ.get("LAMBDALET_SERVICEACCOUNT_DIR") or DEFAULT_SERVICEACCOUNT_DIR)
    if environ.get("KUBERNETES_SERVICE_HOST") and (sa_dir / "token").exists():
        loader = InClusterConfigLoader(
            token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt"), environ=dict(environ)
        )
        loader.load_and_set(configuration)
        logger.info("using the pod's ServiceAccount credentials from %s", sa_dir)
        return configuration
    try:
        await load_kube_config(config_file=environ.get("KUBECONFIG"), client_configuration=configuration)
    except ConfigException as exc:
        raise KubeError(f"no Kubernetes credentials: no ServiceAccount token in {sa_dir} and {exc}") from exc
    logger.info("using kubeconfig credentials for %s", configuration.host)
    return configuration


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
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            result = await self._api.call_api(
                url,
                method,
                header_params=headers,
                query_params=query or [],
                body=body,
                response_types_map={200: "object", 201: "object", 202: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
            raise _translate(exc, what) from exc
        return dict(result or {})

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
