"""The one module of the gateway that talks to the Kubernetes API (through ``kubernetes_asyncio``).

Objects go in and come out as plain dicts. Library errors are translated here, once, into
:class:`KubeError` and its subclasses with the cause chained. Watches are read as a raw byte stream (one
JSON event per line) so no typed model is built for every EndpointSlice change.

Credentials: in a pod, the ServiceAccount token and CA from ``$LAMBDALET_SERVICEACCOUNT_DIR`` (default
``/var/run/secrets/kubernetes.io/serviceaccount``) and ``KUBERNETES_SERVICE_HOST``/``_PORT``; outside a
pod, the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

log = logging.getLogger("lambdalet.gateway.kube.api")

DEFAULT_SERVICEACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
REQUEST_TIMEOUT_S: Final = 30.0
#: Server-side limit of one watch request; the caller resumes from the last resourceVersion.
WATCH_TIMEOUT_S: Final = 240

Obj = dict[str, Any]

FUNCTIONS: Final = ("/apis/lambdalet.dev/v1alpha1", "functions")
DEPLOYMENTS: Final = ("/apis/apps/v1", "deployments")
REPLICA_SETS: Final = ("/apis/apps/v1", "replicasets")
ENDPOINT_SLICES: Final = ("/apis/discovery.k8s.io/v1", "endpointslices")
PODS: Final = ("/api/v1", "pods")


class KubeError(Exception):
    """A failed API call (transient unless a subclass says otherwise)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Gone(KubeError):
    """A watch's resourceVersion is too old: list again."""


def collection(kind: tuple[str, str], namespace: str | None) -> str:
    prefix, plural = kind
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


def _translate(exc: BaseException, what: str) -> KubeError:
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        detail = exc.reason or ""
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(exc.body or "{}").get("message") or detail
        return _by_status(status, f"{what}: {status} {detail}")
    return KubeError(f"{what}: {type(exc).__name__}: {exc}")


def _by_status(status: int, message: str) -> KubeError:
    if status == 404:
        return NotFound(message, status)
    if status == 409:
        return Conflict(message, status)
    if status == 410:
        return Gone(message, status)
    return KubeError(message, status)


async def load_configuration(environ: Mapping[str, str]) -> k8s.Configuration:
    """In-cluster credentials when a ServiceAccount token is mounted, otherwise the kubeconfig."""
    configuration = k8s.Configuration()
    sa_dir = Path(environ.get("LAMBDALET_SERVICEACCOUNT_DIR") or DEFAULT_SERVICEACCOUNT_DIR)
    if environ.get("KUBERNETES_SERVICE_HOST") and (sa_dir / "token").exists():
        loader = InClusterConfigLoader(
            token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt"), environ=dict(environ)
        )
        loader.load_and_set(configuration)
        log.info("using the pod's ServiceAccount credentials from %s", sa_dir)
    else:
        try:
            await load_kube_config(config_file=environ.get("KUBECONFIG"), client_configuration=configuration)
        except ConfigException as exc:
            raise KubeError(f"no Kubernetes credentials: no ServiceAccount token in {sa_dir} and {exc}") from exc
        log.info("using kubeconfig credentials for %s", configuration.host)
    # Watches hold connections: one per kind and namespace, plus the calls on the scaling path.
    configuration.connection_pool_maxsize = 64
    return configuration


class KubeApi:
    """The calls the gateway makes: list and watch, the scale subresource, and deleting one pod."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self._api = api

    @classmethod
    async def connect(cls, environ: Mapping[str, str]) -> KubeApi:
        return cls(k8s.ApiClient(await load_configuration(environ)))

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
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
            raise _translate(exc, what) from exc
        return dict(result or {})

    async def list(self, kind: tuple[str, str], namespace: str | None, selector: str = "") -> tuple[list[Obj], str]:
        """Every object of a kind (one namespace, or all with ``None``) and the list's resourceVersion."""
        query = [("labelSelector", selector)] if selector else []
        url = collection(kind, namespace)
        result = await self._call("GET", url, f"list {url}", query=query)
        return list(result.get("items") or []), str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(
        self, kind: tuple[str, str], namespace: str | None, resource_version: str, selector: str = ""
    ) -> AsyncIterator[Obj]:
        """Watch events (``{"type": ..., "object": ...}``, bookmarks included) from ``resource_version``
        until the server ends the request; raises :class:`Gone` when the version is too old."""
        url = collection(kind, namespace)
        query = [
            ("watch", "1"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(WATCH_TIMEOUT_S)),
        ]
        if selector:
            query.append(("labelSelector", selector))
        try:
            response = await self._api.call_api(
                url,
                "GET",
                header_params={"Accept": "application/json"},
                query_params=query,
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT_S),
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
            raise _translate(exc, f"watch {url}") from exc
        try:
            if response.status != 200:
                text = await response.text()
                raise _by_status(response.status, f"watch {url}: {response.status} {text[:300]}")
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if not line.strip():
                        continue
                    event: Obj = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise _by_status(int(status.get("code") or 0), f"watch {url}: {status.get('message')}")
                    yield event
        except aiohttp.ClientError as exc:
            raise KubeError(f"watch {url}: {type(exc).__name__}: {exc}") from exc
        finally:
            response.release()

    async def get_scale(self, namespace: str, deployment: str) -> int:
        url = f"{collection(DEPLOYMENTS, namespace)}/{deployment}/scale"
        scale = await self._call("GET", url, f"get {url}")
        return int((scale.get("spec") or {}).get("replicas") or 0)

    async def set_scale(self, namespace: str, deployment: str, replicas: int) -> int:
        """Set the Deployment's replicas through its scale subresource; return what the server holds."""
        url = f"{collection(DEPLOYMENTS, namespace)}/{deployment}/scale"
        scale = await self._call(
            "PATCH",
            url,
            f"scale {namespace}/{deployment} to {replicas}",
            body={"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )
        return int((scale.get("spec") or {}).get("replicas") or 0)

    async def delete_pod(self, namespace: str, name: str, uid: str | None) -> None:
        """Delete exactly this pod (the uid precondition refuses a newer pod of the same name)."""
        url = f"{collection(PODS, namespace)}/{name}"
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid:
            body["preconditions"] = {"uid": uid}
        await self._call("DELETE", url, f"delete pod {namespace}/{name}", body=body)
