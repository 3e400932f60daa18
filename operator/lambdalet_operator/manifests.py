"""Pure builders: a validated Function → the child objects that run it.

Every builder takes the parsed ``Function`` (``lambdalet.spec``), the owner's uid and the operator's
``Settings`` and returns plain dicts ready for the API server. No I/O here, no clock, no randomness: the
same input always gives the same objects, which is what makes reconciling idempotent.

Children (all in the Function's namespace, all with a controller owner reference to the Function):

* ConfigMap ``<name>-code``  — inline code (only for ``code.inline``)
* ServiceAccount ``<name>``  — unless ``spec.serviceAccountName`` names one (the execution-role analog)
* Deployment ``<name>``      — the execution environments; the agent serves port 8080 (``http``)
* Service ``<name>``         — port ``http``; its EndpointSlices list the ready environments
* NetworkPolicy ``<name>``   — only with ``spec.network`` (the VPC analog)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

from lambdalet.spec import API_VERSION, KIND, Function
from lambdalet_operator.settings import Settings

Manifest = dict[str, Any]

#: Label on every child and every function pod; the gateway selects a function's pods with it.
FUNCTION_LABEL: Final = "lambdalet.dev/function"
#: Pod-template annotation: SHA-256 of the code, so a code change rolls the pods.
CODE_HASH_ANNOTATION: Final = "lambdalet.dev/code-sha256"
MANAGED_BY: Final = "lambdalet-operator"
AGENT_PORT: Final = 8080
PORT_NAME: Final = "http"
#: ``code.image`` functions: the agent serves the Runtime API on the pod's IP (from the downward API, in
#: this variable of both containers), not on loopback, so it also works where pods share a loopback.
POD_IP_VARIABLE: Final = "LAMBDALET_POD_IP"
RUNTIME_API_PORT: Final = 9001
RUNTIME_API_ADDRESS: Final = f"$({POD_IP_VARIABLE}):{RUNTIME_API_PORT}"
TASK_ROOT: Final = "/var/task"
#: Lambda's CPU share: one vCPU per 1769 MB of memory.
MB_PER_VCPU: Final = 1769
#: Extra time past the function timeout for a pod to finish its in-flight invocation when it is stopped.
GRACE_SECONDS: Final = 10

#: Fetches a zip archive, checks its SHA-256 when one is given, and unpacks it into the code directory.
#: Runs with the runtime image's Python (every runtime image has one: the agent is its entrypoint).
FETCH_SCRIPT: Final = """\
import hashlib, io, sys, urllib.request, zipfile
url, expected, target = sys.argv[1], sys.argv[2], sys.argv[3]
with urllib.request.urlopen(url, timeout=60) as response:
    data = response.read()
actual = hashlib.sha256(data).hexdigest()
if expected and actual != expected:
    sys.exit(f"code.url: SHA-256 mismatch: expected {expected}, got {actual} ({url})")
zipfile.ZipFile(io.BytesIO(data)).extractall(target)
print(f"fetched {url} ({len(data)} bytes, sha256 {actual}) into {target}")
"""


def labels(function: Function) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": function.name,
        "app.kubernetes.io/component": "function",
        "app.kubernetes.io/part-of": "lambdalet",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        FUNCTION_LABEL: function.name,
    }


def selector(function: Function) -> dict[str, str]:
    return {FUNCTION_LABEL: function.name}


def owner_reference(function: Function, uid: str) -> Manifest:
    # No blockOwnerDeletion: background garbage collection needs none, and setting it would require
    # `update` on functions/finalizers.
    return {"apiVersion": API_VERSION, "kind": KIND, "name": function.name, "uid": uid, "controller": True}


def _metadata(function: Function, uid: str, name: str) -> Manifest:
    return {
        "name": name,
        "namespace": function.metadata.namespace,
        "labels": labels(function),
        "ownerReferences": [owner_reference(function, uid)],
    }


def code_configmap_name(function: Function) -> str:
    return f"{function.name}-code"


def service_account_name(function: Function) -> str:
    return function.spec.serviceAccountName or function.name


def _configmap_keys(files: Mapping[str, str]) -> dict[str, str]:
    """File path → ConfigMap key (keys allow only ``[-._a-zA-Z0-9]``; nested paths are mapped back by
    the volume's ``items``)."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for index, path in enumerate(sorted(files)):
        key = re.sub(r"[^-._a-zA-Z0-9]", "_", path)
        if key in used:
            key = f"{key}.{index}"
        used.add(key)
        keys[path] = key
    return keys


def files_sha256(files: Mapping[str, str]) -> str:
    """SHA-256 of a set of code files (names and contents, order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(json.dumps([name, files[name]]).encode())
    return digest.hexdigest()


def code_sha256(function: Function, configmap_data: Mapping[str, str] | None = None) -> str:
    """What identifies the code the pods run: a content hash where the operator can see the content
    (inline, configMap), the archive's declared hash for ``url``, and the reference itself for ``image``."""
    code = function.spec.code
    if code.inline is not None:
        return files_sha256(code.inline.files)
    if code.configMap is not None:
        if configmap_data is None:
            raise ValueError("the ConfigMap's data is needed to hash code.configMap")
        return files_sha256(configmap_data)
    if code.url is not None:
        return code.sha256 or hashlib.sha256(code.url.encode()).hexdigest()
    if code.image is not None:
        _, _, digest = code.image.partition("@sha256:")
        return digest or hashlib.sha256(code.image.encode()).hexdigest()
    raise ValueError("code.path cannot run in a cluster")


def configmap(function: Function, uid: str) -> Manifest | None:
    """The ConfigMap holding inline code, or None when the code is not inline."""
    inline = function.spec.code.inline
    if inline is None:
        return None
    keys = _configmap_keys(inline.files)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(function, uid, code_configmap_name(function)),
        "data": {keys[path]: inline.files[path] for path in sorted(inline.files)},
    }


def service_account(function: Function, uid: str) -> Manifest | None:
    """The function's own ServiceAccount (no API token mounted), unless it names one."""
    if function.spec.serviceAccountName is not None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(function, uid, function.name),
        "automountServiceAccountToken": False,
    }


def service(function: Function, uid: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(function, uid, function.name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(function),
            "ports": [{"name": PORT_NAME, "port": AGENT_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def network_policy(function: Function, uid: str) -> Manifest | None:
    """Egress rules for the function's pods (Lambda's VPC analog), or None without ``spec.network``.

    Ingress is left open: the gateway must reach the agent."""
    network = function.spec.network
    if network is None:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(function, uid, function.name),
        "spec": {
            "podSelector": {"matchLabels": selector(function)},
            "policyTypes": ["Egress"],
            "egress": [dict(rule) for rule in network.egress],
        },
    }


def cpu_millicores(memory_mb: int) -> int:
    """Lambda's proportional CPU: memoryMB / 1769 vCPU, rounded up to a millicore."""
    return math.ceil(memory_mb * 1000 / MB_PER_VCPU)


def _container_security_context(settings: Settings) -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context(settings: Settings) -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _lambda_env(function: Function) -> list[Manifest]:
    spec = function.spec
    env: list[Manifest] = []
    if spec.handler is not None:
        env.append({"name": "_HANDLER", "value": spec.handler})
    env.append({"name": "LAMBDA_TASK_ROOT", "value": TASK_ROOT})
    if spec.runtime is not None:
        env.append({"name": "LAMBDALET_RUNTIME", "value": spec.runtime})
    env += [
        {"name": "AWS_LAMBDA_FUNCTION_NAME", "value": function.name},
        {"name": "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "value": str(spec.memoryMB)},
        {"name": "AWS_LAMBDA_FUNCTION_TIMEOUT", "value": str(spec.timeoutSeconds)},
        {"name": "LAMBDALET_AGENT_PORT", "value": str(AGENT_PORT)},
        {"name": "LAMBDALET_BIND_ADDRESS", "value": "0.0.0.0"},
    ]
    if spec.perEnvironmentConcurrency > 1:
        # The agent runs this many invocations at once (only set above 1: other pods stay as they were).
        env.append({"name": "AWS_LAMBDA_MAX_CONCURRENCY", "value": str(spec.perEnvironmentConcurrency)})
    return env


def _user_env(function: Function) -> tuple[list[Manifest], list[Manifest]]:
    environment = function.spec.environment
    env: list[Manifest] = [{"name": k, "value": v} for k, v in sorted(environment.variables.items())]
    for ref in environment.secretKeyRefs:
        selector_ = ref.secretKeyRef
        env.append(
            {
                "name": ref.name,
                "valueFrom": {
                    "secretKeyRef": {"name": selector_.name, "key": selector_.key, "optional": selector_.optional}
                },
            }
        )
    env_from = [
        {"secretRef": {"name": source.secretRef.name, "optional": source.secretRef.optional}}
        for source in environment.envFrom
    ]
    return env, env_from


def _probes() -> Manifest:
    return {
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": PORT_NAME},
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 2,
            "successThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": PORT_NAME},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
    }


def _code_volume(function: Function) -> Manifest | None:
    code = function.spec.code
    if code.inline is not None:
        keys = _configmap_keys(code.inline.files)
        return {
            "name": "code",
            "configMap": {
                "name": code_configmap_name(function),
                "defaultMode": 0o555,
                "items": [{"key": keys[path], "path": path} for path in sorted(keys)],
            },
        }
    if code.configMap is not None:
        return {"name": "code", "configMap": {"name": code.configMap.name, "defaultMode": 0o555}}
    if code.url is not None:
        return {"name": "code", "emptyDir": {"sizeLimit": "256Mi"}}
    return None


def _pod_ip_env() -> Manifest:
    return {"name": POD_IP_VARIABLE, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def _image_containers(
    function: Function, agent: Manifest, resources: Manifest, tmp_mount: Manifest, settings: Settings
) -> tuple[Manifest, Manifest]:
    """``code.image``: the user's image runs its own entrypoint (its Runtime API client, e.g. AWS's
    ``/lambda-entrypoint.sh``, which runs the client directly when ``AWS_LAMBDA_RUNTIME_API`` is set)
    pointed at the agent; the agent sidecar starts no bootstrap of its own (``--external-runtime``), takes
    invocations on port 8080 and resets the runtime after a timeout or crash by killing its processes,
    which it sees through the shared process namespace; the kubelet then restarts the container.

    Both containers run as the same non-root user with every capability dropped: the agent must be allowed
    to read the runtime's ``/proc/<pid>/fd`` (to find it) and to signal it, and Lambda itself runs images
    as a non-root user on a read-only root filesystem, so images made for Lambda work under it."""
    spec = function.spec
    agent |= {
        "image": settings.agent_image,
        "args": ["--external-runtime", "--runtime-api-address", RUNTIME_API_ADDRESS],
        "env": [
            _pod_ip_env(),
            *(e for e in _lambda_env(function) if e["name"] not in ("LAMBDA_TASK_ROOT", "LAMBDALET_RUNTIME")),
        ],
        "resources": {"requests": {"memory": "64Mi", "cpu": "50m"}, "limits": {"memory": "128Mi"}},
        "volumeMounts": [tmp_mount],
    }
    runtime: Manifest = {
        "name": "function",
        "image": function.spec.code.image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            _pod_ip_env(),
            {"name": "AWS_LAMBDA_RUNTIME_API", "value": RUNTIME_API_ADDRESS},
            *([{"name": "_HANDLER", "value": spec.handler}] if spec.handler else []),
            {"name": "AWS_LAMBDA_FUNCTION_NAME", "value": function.name},
            {"name": "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "value": str(spec.memoryMB)},
            {"name": "AWS_LAMBDA_FUNCTION_VERSION", "value": "$LATEST"},
            {"name": "AWS_LAMBDA_LOG_GROUP_NAME", "value": f"/aws/lambda/{function.name}"},
            {"name": "AWS_LAMBDA_LOG_STREAM_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "AWS_LAMBDA_INITIALIZATION_TYPE", "value": "on-demand"},
            {"name": "LAMBDA_TASK_ROOT", "value": TASK_ROOT},
            {"name": "TZ", "value": ":UTC"},
        ],
        "resources": resources,
        "securityContext": _container_security_context(settings),
        "volumeMounts": [tmp_mount],
    }
    if spec.handler:
        # Lambda's ImageConfig.Command: replaces the image's CMD, which AWS base images read as the handler.
        runtime["args"] = [spec.handler]
    return agent, runtime


def pod_template(function: Function, settings: Settings, code_hash: str) -> Manifest:
    spec = function.spec
    code = spec.code
    memory = f"{spec.memoryMB}Mi"
    resources = {
        "requests": {"memory": memory, "cpu": f"{cpu_millicores(spec.memoryMB)}m"},
        "limits": {"memory": memory},
    }
    user_env, env_from = _user_env(function)
    tmp_mount = {"name": "tmp", "mountPath": "/tmp"}
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {"sizeLimit": f"{spec.ephemeralStorageMB}Mi"}}]
    code_volume = _code_volume(function)
    if code_volume is not None:
        volumes.append(code_volume)
    agent: Manifest = {
        "name": "function" if code.image is None else "agent",
        "ports": [{"name": PORT_NAME, "containerPort": AGENT_PORT, "protocol": "TCP"}],
        **_probes(),
        "securityContext": _container_security_context(settings),
        "imagePullPolicy": settings.image_pull_policy,
    }
    containers: list[Manifest]
    init_containers: list[Manifest] = []
    if code.image is None:
        assert spec.runtime is not None  # the model requires a runtime without code.image
        agent |= {
            "image": settings.runtime_image(spec.runtime),
            "env": _lambda_env(function) + user_env,
            "resources": resources,
            "volumeMounts": [tmp_mount, {"name": "code", "mountPath": TASK_ROOT, "readOnly": True}],
        }
        if env_from:
            agent["envFrom"] = env_from
        containers = [agent]
        if code.url is not None:
            init_containers.append(
                {
                    "name": "fetch-code",
                    "image": settings.runtime_image(spec.runtime),
                    "imagePullPolicy": settings.image_pull_policy,
                    "command": ["python", "-c", FETCH_SCRIPT],
                    "args": [code.url, code.sha256 or "", TASK_ROOT],
                    "securityContext": _container_security_context(settings),
                    "resources": {"requests": {"memory": "64Mi", "cpu": "50m"}, "limits": {"memory": "256Mi"}},
                    "volumeMounts": [{"name": "code", "mountPath": TASK_ROOT}, tmp_mount],
                }
            )
    else:
        agent, runtime = _image_containers(function, agent, resources, tmp_mount, settings)
        if env_from:
            runtime["envFrom"] = env_from
        runtime["env"] += user_env
        containers = [agent, runtime]
    pod_spec: Manifest = {
        "serviceAccountName": service_account_name(function),
        "securityContext": _pod_security_context(settings),
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": spec.timeoutSeconds + GRACE_SECONDS,
        "containers": containers,
        "volumes": volumes,
    }
    if spec.serviceAccountName is None:
        pod_spec["automountServiceAccountToken"] = False
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if code.image is not None:
        # The agent finds the runtime's process and resets it after a timeout or crash: it must see it.
        pod_spec["shareProcessNamespace"] = True
    return {
        "metadata": {"labels": labels(function), "annotations": {CODE_HASH_ANNOTATION: code_hash}},
        "spec": pod_spec,
    }


def deployment(function: Function, uid: str, settings: Settings, code_hash: str) -> Manifest:
    """The function's Deployment, without ``spec.replicas``: the gateway's autoscaler owns the replica
    count (see ``initial_replicas`` for the one time the operator sets it)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(function, uid, function.name),
        "spec": {
            "selector": {"matchLabels": selector(function)},
            "revisionHistoryLimit": 3,
            # New environments start before old ones stop; old ones get the function timeout to finish.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "template": pod_template(function, settings, code_hash),
        },
    }


def initial_replicas(function: Function) -> int:
    """Replicas when the Deployment is created: the provisioned (always warm) environments."""
    return function.spec.provisionedConcurrency


def invoke_url(function: Function, settings: Settings) -> str:
    return f"{settings.gateway_url}/2015-03-31/functions/{function.name}/invocations"
