"""The operator's pure builders: what a Function turns into (ConfigMap, ServiceAccount, Deployment,
Service, NetworkPolicy), checked field by field as a cluster user would see them."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from lambdalet_operator import manifests
from lambdalet_operator.settings import Settings, SettingsError
from operator_support import UID, function

SETTINGS = Settings()


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def deployment_of(**spec: Any) -> dict[str, Any]:
    fn = function(**spec)
    return manifests.deployment(fn, UID, SETTINGS, manifests.code_sha256(fn, {"app.py": "x"}))


def assert_restricted(pod: dict[str, Any]) -> None:
    """The `restricted` Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    spec = pod["spec"]
    pod_ctx = spec.get("securityContext", {})
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for volume in spec.get("volumes", []):
        assert set(volume) - {"name"} <= {"configMap", "emptyDir", "secret", "projected", "downwardAPI"}
    for container in spec["containers"] + spec.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 0
        assert ctx["readOnlyRootFilesystem"] is True
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}
        assert not ctx.get("privileged")


def test_inline_code_becomes_a_configmap_mounted_at_var_task() -> None:
    fn = function(code={"inline": {"files": {"app.py": "A", "lib/util.py": "B"}}})
    cm = manifests.configmap(fn, UID)
    assert cm is not None
    assert cm["metadata"]["name"] == "hello-code"
    assert sorted(cm["data"].values()) == ["A", "B"]
    assert all("/" not in key for key in cm["data"])  # ConfigMap keys cannot hold a path
    pod = manifests.deployment(fn, UID, SETTINGS, "h")["spec"]["template"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "code")
    paths = {item["path"]: cm["data"][item["key"]] for item in volume["configMap"]["items"]}
    assert paths == {"app.py": "A", "lib/util.py": "B"}
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "code")
    assert mount == {"name": "code", "mountPath": "/var/task", "readOnly": True}


def test_the_runtime_image_runs_the_agent_with_lambdas_environment() -> None:
    dep = deployment_of(memoryMB=256, timeoutSeconds=30, environment={"variables": {"STAGE": "prod"}})
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/lambdalet/python3.12:0.1.0"
    assert "command" not in container and "args" not in container  # the image's entrypoint is the agent
    assert env_of(container) == {
        "_HANDLER": "app.handler",
        "LAMBDA_TASK_ROOT": "/var/task",
        "LAMBDALET_RUNTIME": "python3.12",
        "AWS_LAMBDA_FUNCTION_NAME": "hello",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "30",
        "LAMBDALET_AGENT_PORT": "8080",
        "LAMBDALET_BIND_ADDRESS": "0.0.0.0",
        "STAGE": "prod",
    }
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_registry_and_tag_come_from_the_operator_settings() -> None:
    settings = Settings.from_env(
        {"LAMBDALET_IMAGE_REGISTRY": "registry.local:5000/lambdalet/", "LAMBDALET_IMAGE_TAG": "dev"}
    )
    fn = function(runtime="nodejs22.x", handler="index.handler")
    dep = manifests.deployment(fn, UID, settings, "h")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local:5000/lambdalet/nodejs22.x:dev"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LAMBDALET_IMAGE_TAG", "bad tag"),
        ("LAMBDALET_IMAGE_PULL_POLICY", "Sometimes"),
        ("LAMBDALET_GATEWAY_URL", "gateway:8080"),
        ("LAMBDALET_RUN_AS_USER", "0"),
    ],
)
def test_bad_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(("memory", "cpu"), [(128, "73m"), (1769, "1000m"), (10240, "5789m")])
def test_memory_limit_equals_request_and_cpu_is_proportional(memory: int, cpu: str) -> None:
    resources = deployment_of(memoryMB=memory)["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"memory": f"{memory}Mi", "cpu": cpu}, "limits": {"memory": f"{memory}Mi"}}


def test_tmp_is_an_emptydir_sized_by_ephemeral_storage() -> None:
    pod = deployment_of(ephemeralStorageMB=2048)["spec"]["template"]["spec"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "2048Mi"}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize(
    "code",
    [
        {"inline": {"files": {"app.py": "x"}}},
        {"configMap": {"name": "my-code"}},
        {"url": "https://example.com/code.zip"},
        {"image": "public.ecr.aws/lambda/python:3.12"},
    ],
)
def test_every_pod_passes_the_restricted_pod_security_standard(code: dict[str, Any]) -> None:
    assert_restricted(deployment_of(code=code)["spec"]["template"])


def test_secret_references_become_env_value_from_and_env_from() -> None:
    dep = deployment_of(
        environment={
            "secretKeyRefs": [{"name": "DB_PASSWORD", "secretKeyRef": {"name": "db", "key": "password"}}],
            "envFrom": [{"secretRef": {"name": "api-keys", "optional": True}}],
        }
    )
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["DB_PASSWORD"] == {"secretKeyRef": {"name": "db", "key": "password", "optional": False}}
    assert container["envFrom"] == [{"secretRef": {"name": "api-keys", "optional": True}}]


def test_every_child_is_owned_by_the_function_and_labelled() -> None:
    fn = function(network={"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]})
    children = [
        manifests.configmap(fn, UID),
        manifests.service_account(fn, UID),
        manifests.deployment(fn, UID, SETTINGS, "h"),
        manifests.service(fn, UID),
        manifests.network_policy(fn, UID),
    ]
    for child in children:
        assert child is not None
        meta = child["metadata"]
        assert meta["namespace"] == "default"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "lambdalet.dev/v1alpha1",
                "kind": "Function",
                "name": "hello",
                "uid": UID,
                "controller": True,
            }
        ]
        assert meta["labels"]["lambdalet.dev/function"] == "hello"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "lambdalet-operator"


def test_the_service_selects_the_function_pods_on_port_http() -> None:
    fn = function()
    svc = manifests.service(fn, UID)
    pod_labels = manifests.deployment(fn, UID, SETTINGS, "h")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]


def test_the_deployment_leaves_replicas_to_the_autoscaler() -> None:
    fn = function(provisionedConcurrency=2, reservedConcurrency=5)
    dep = manifests.deployment(fn, UID, SETTINGS, "h")
    assert "replicas" not in dep["spec"]
    assert manifests.initial_replicas(fn) == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_a_code_change_changes_the_pod_template_and_nothing_else_does() -> None:
    def template(files: dict[str, str], **spec: Any) -> dict[str, Any]:
        fn = function(code={"inline": {"files": files}}, **spec)
        pod: dict[str, Any] = manifests.deployment(fn, UID, SETTINGS, manifests.code_sha256(fn))["spec"]["template"]
        return pod

    first = template({"app.py": "v1"})
    assert template({"app.py": "v1"}) == first
    changed = template({"app.py": "v2"})
    key = manifests.CODE_HASH_ANNOTATION
    assert changed["metadata"]["annotations"][key] != first["metadata"]["annotations"][key]


def test_own_service_account_without_a_token_unless_one_is_named() -> None:
    fn = function()
    account = manifests.service_account(fn, UID)
    assert account is not None and account["automountServiceAccountToken"] is False
    pod = manifests.deployment(fn, UID, SETTINGS, "h")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "hello" and pod["automountServiceAccountToken"] is False

    named = function(serviceAccountName="reader")
    assert manifests.service_account(named, UID) is None
    pod = manifests.deployment(named, UID, SETTINGS, "h")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "reader" and "automountServiceAccountToken" not in pod


def test_network_rules_become_an_egress_network_policy() -> None:
    rules = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 5432, "protocol": "TCP"}]}]
    policy = manifests.network_policy(function(network={"egress": rules}), UID)
    assert policy is not None
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"lambdalet.dev/function": "hello"}},
        "policyTypes": ["Egress"],
        "egress": rules,
    }
    deny_all = manifests.network_policy(function(network={"egress": []}), UID)
    assert deny_all is not None and deny_all["spec"]["egress"] == []
    assert manifests.network_policy(function(), UID) is None


def test_a_user_image_runs_beside_the_agent_sidecar() -> None:
    fn = function(code={"image": "public.ecr.aws/lambda/python:3.12"}, runtime=None, handler="app.handler")
    pod = manifests.deployment(fn, UID, SETTINGS, manifests.code_sha256(fn))["spec"]["template"]["spec"]
    agent, runtime = pod["containers"]
    assert pod["shareProcessNamespace"] is True
    assert agent["image"] == "ghcr.io/lambdalet/agent:0.1.0"
    # The agent starts no bootstrap: the user's container is the runtime, reached on the pod's IP.
    assert agent["args"] == ["--external-runtime", "--runtime-api-address", "$(LAMBDALET_POD_IP):9001"]
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    assert agent["env"][0] == runtime["env"][0] == {"name": "LAMBDALET_POD_IP", "valueFrom": pod_ip}
    assert agent["ports"][0]["name"] == "http"
    assert runtime["image"] == "public.ecr.aws/lambda/python:3.12"
    assert "command" not in runtime  # the image's own entrypoint (its Runtime API client)
    assert runtime["args"] == ["app.handler"]  # the handler replaces the image's CMD, as ImageConfig.Command
    env = env_of(runtime)
    assert env["AWS_LAMBDA_RUNTIME_API"] == "$(LAMBDALET_POD_IP):9001"
    assert env["_HANDLER"] == "app.handler"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "hello" and env["LAMBDA_TASK_ROOT"] == "/var/task"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "128"
    assert manifests.configmap(fn, UID) is None
    assert_restricted({"spec": pod})


def test_a_user_image_without_a_handler_keeps_its_own_cmd() -> None:
    fn = function(code={"image": "example.com/fn:1"}, runtime=None, handler=None)
    pod = manifests.deployment(fn, UID, SETTINGS, manifests.code_sha256(fn))["spec"]["template"]["spec"]
    _, runtime = pod["containers"]
    assert "args" not in runtime and "_HANDLER" not in env_of(runtime)


def test_url_code_is_fetched_and_checked_by_an_init_container() -> None:
    digest = "a" * 64
    fn = function(code={"url": "https://example.com/code.zip", "sha256": digest})
    pod = manifests.deployment(fn, UID, SETTINGS, manifests.code_sha256(fn))["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["args"] == ["https://example.com/code.zip", digest, "/var/task"]
    assert {"name": "code", "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]
    assert manifests.code_sha256(fn) == digest


def test_fetch_script_unpacks_a_zip_and_refuses_a_wrong_hash(tmp_path: Path) -> None:

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("app.py", "print('hi')\n")
    data = archive.getvalue()
    source = tmp_path / "code.zip"
    source.write_bytes(data)
    target = tmp_path / "task"
    target.mkdir()
    url = source.as_uri()
    ok = subprocess.run(
        [sys.executable, "-c", manifests.FETCH_SCRIPT, url, hashlib.sha256(data).hexdigest(), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert (target / "app.py").read_text() == "print('hi')\n"
    bad = subprocess.run(
        [sys.executable, "-c", manifests.FETCH_SCRIPT, url, "0" * 64, str(tmp_path / "other")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "SHA-256 mismatch" in bad.stderr


def test_configmap_code_hash_follows_the_configmap_content() -> None:
    fn = function(code={"configMap": {"name": "my-code"}})
    assert manifests.code_sha256(fn, {"app.py": "1"}) != manifests.code_sha256(fn, {"app.py": "2"})
    with pytest.raises(ValueError, match="ConfigMap"):
        manifests.code_sha256(fn)


def test_per_environment_concurrency_above_one_tells_the_agent_and_changes_the_pod_template() -> None:
    one = deployment_of()
    four = deployment_of(perEnvironmentConcurrency=4)
    [container] = four["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["AWS_LAMBDA_MAX_CONCURRENCY"] == "4"
    [plain] = one["spec"]["template"]["spec"]["containers"]
    assert "AWS_LAMBDA_MAX_CONCURRENCY" not in env_of(plain)
    # a changed N rolls the pods (the agent reads it at start)
    assert one["spec"]["template"] != four["spec"]["template"]
