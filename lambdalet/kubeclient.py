"""The Kubernetes transport the gateway and the operator share: credentials, one raw call, one error
hierarchy. Each component still has exactly one module that uses it (``lambdalet_gateway.kube.api``,
``lambdalet_operator.kube``) and decides there which calls it makes.

Unlike the rest of ``lambdalet`` this module does I/O; it is imported only by those two modules.

Credentials: in a pod, the ServiceAccount token and CA from ``$LAMBDALET_SERVICEACCOUNT_DIR`` (default
``/var/run/secrets/kubernetes.io/serviceaccount``) and ``KUBERNETES_SERVICE_HOST``/``_PORT``; outside a
pod, the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

log = logging.getLogger("lambdalet.kubeclient")

DEFAULT_SERVICEACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
REQUEST_TIMEOUT_S: Final = 30.0

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


class Gone(KubeError):
    """A watch's resourceVersion is too old: list again."""


class Invalid(KubeError):
    """The API server refused the object itself (422, 400): retrying the same object cannot help."""


class Forbidden(KubeError):
    """Authentication or RBAC refused the call: the chart's Role lacks a permission."""


_BY_STATUS: Final[dict[int, type[KubeError]]] = {
    400: Invalid,
    401: Forbidden,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Invalid,
}


def by_status(status: int, message: str) -> KubeError:
    return _BY_STATUS.get(status, KubeError)(message, status)


def translate(exc: BaseException, what: str) -> KubeError:
    """A library error as our own type, with the API server's message when it sent one."""
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        detail = exc.reason or ""
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(exc.body or "{}").get("message") or detail
        return by_status(status, f"{what}: {status} {detail}")
    return KubeError(f"{what}: {type(exc).__name__}: {exc}")


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
        return configuration
    try:
        await load_kube_config(config_file=environ.get("KUBECONFIG"), client_configuration=configuration)
    except ConfigException as exc:
        raise KubeError(f"no Kubernetes credentials: no ServiceAccount token in {sa_dir} and {exc}") from exc
    log.info("using kubeconfig credentials for %s", configuration.host)
    return configuration


async def call(
    api: k8s.ApiClient,
    method: str,
    url: str,
    what: str,
    *,
    body: Any = None,
    content_type: str = "application/json",
    query: list[tuple[str, str]] | None = None,
) -> Obj:
    """One API call, dict in and dict out; failures raise :class:`KubeError` with the cause chained."""
    headers = {"Accept": "application/json", "Content-Type": content_type}
    try:
        result = await api.call_api(
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
        raise translate(exc, what) from exc
    return dict(result or {})
