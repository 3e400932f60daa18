"""The one module of the gateway that talks to the Kubernetes API (through ``kubernetes_asyncio``).

Objects go in and come out as plain dicts; credentials, the raw call and the error types
(:class:`KubeError` and its subclasses, cause chained) come from the transport shared with the operator,
``lambdalet.kubeclient``. Watches are read as a raw byte stream (one
JSON event per line) so no typed model is built for every EndpointSlice change.

Credentials: in a pod, the ServiceAccount token and CA from ``$LAMBDALET_SERVICEACCOUNT_DIR`` (default
``/var/run/secrets/kubernetes.io/serviceaccount``) and ``KUBERNETES_SERVICE_HOST``/``_PORT``; outside a
pod, the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from lambdalet import kubeclient
from lambdalet.kubeclient import REQUEST_TIMEOUT_S, Conflict, Gone, KubeError, NotFound, Obj, by_status, translate

# The error types are the backend's too: it imports them from here, its one API module.
__all__ = ["Conflict", "Gone", "KubeApi", "KubeError", "NotFound", "Obj", "collection", "load_configuration"]

log = logging.getLogger("lambdalet.gateway.kube.api")

#: Server-side limit of one watch request; the caller resumes from the last resourceVersion.
WATCH_TIMEOUT_S: Final = 240

FUNCTIONS: Final = ("/apis/lambdalet.dev/v1alpha1", "functions")
DEPLOYMENTS: Final = ("/apis/apps/v1", "deployments")
REPLICA_SETS: Final = ("/apis/apps/v1", "replicasets")
ENDPOINT_SLICES: Final = ("/apis/discovery.k8s.io/v1", "endpointslices")
PODS: Final = ("/api/v1", "pods")


def collection(kind: tuple[str, str], namespace: str | None) -> str:
    prefix, plural = kind
    return f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"


async def load_configuration(environ: Mapping[str, str]) -> k8s.Configuration:
    configuration = await kubeclient.load_configuration(environ)
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
        return await kubeclient.call(self._api, method, url, what, body=body, content_type=content_type, query=query)

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
            raise translate(exc, f"watch {url}") from exc
        try:
            if response.status != 200:
                text = await response.text()
                raise by_status(response.status, f"watch {url}: {response.status} {text[:300]}")
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
                        raise by_status(int(status.get("code") or 0), f"watch {url}: {status.get('message')}")
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
