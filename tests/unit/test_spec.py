"""The Function spec: defaults, ranges, cross-field rules, and error messages that name file, field and rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lambdalet.spec import SpecError, all_errors, load_manifests, parse_function, validate_for_cluster


def manifest(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "runtime": "python3.12",
        "handler": "app.handler",
        "code": {"inline": {"files": {"app.py": "def handler(e, c): return e\n"}}},
    }
    body.update(spec)
    return {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": "hello"},
        "spec": body,
    }


def messages(document: dict[str, Any]) -> list[str]:
    return [str(error) for error in all_errors(document, "fn.yaml")]


def test_defaults_are_lambdas() -> None:
    fn = parse_function(manifest())
    assert (fn.spec.memoryMB, fn.spec.timeoutSeconds, fn.spec.ephemeralStorageMB) == (128, 3, 512)
    assert fn.spec.provisionedConcurrency == 0
    assert fn.spec.reservedConcurrency is None
    assert fn.spec.idleTimeoutSeconds == 300
    assert fn.spec.async_.maximumRetryAttempts == 2
    assert fn.spec.async_.maximumEventAgeSeconds == 21600


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"memoryMB": 64}, "fn.yaml: spec.memoryMB: Input should be greater than or equal to 128 (got 64)"),
        (
            {"memoryMB": 10241},
            "fn.yaml: spec.memoryMB: Input should be less than or equal to 10240 (got 10241)",
        ),
        (
            {"timeoutSeconds": 0},
            "fn.yaml: spec.timeoutSeconds: Input should be greater than or equal to 1 (got 0)",
        ),
        ({"timeoutSeconds": 901}, "fn.yaml: spec.timeoutSeconds: Input should be less than or equal to 900"),
        (
            {"ephemeralStorageMB": 100},
            "fn.yaml: spec.ephemeralStorageMB: Input should be greater than or equal",
        ),
        (
            {"reservedConcurrency": -1},
            "fn.yaml: spec.reservedConcurrency: Input should be greater than or equal",
        ),
        ({"runtime": "cobol"}, "fn.yaml: spec.runtime: unknown runtime 'cobol'; one of python3.11"),
        ({"handler": None}, "fn.yaml: spec: handler is required unless code.image is set"),
        ({"memory": 256}, "fn.yaml: spec.memory: unknown field"),
        (
            {"async": {"maximumRetryAttempts": 3}},
            "fn.yaml: spec.async.maximumRetryAttempts: Input should be less",
        ),
        (
            {"async": {"maximumEventAgeSeconds": 30}},
            "fn.yaml: spec.async.maximumEventAgeSeconds: Input should",
        ),
        (
            {"code": {"inline": {"files": {"a.py": ""}}, "image": "x"}},
            "fn.yaml: spec.code: exactly one of path, inline, configMap, image, url must be set (given: inline, image)",
        ),
        (
            {"code": {}},
            "fn.yaml: spec.code: exactly one of path, inline, configMap, image, url must be set (given: none)",
        ),
        (
            {"reservedConcurrency": 1, "provisionedConcurrency": 2},
            "fn.yaml: spec: provisionedConcurrency (2) must not exceed reservedConcurrency (1)",
        ),
        (
            {"environment": {"variables": {"AWS_REGION": "x"}}},
            "fn.yaml: spec.environment.variables: variable 'AWS_REGION' is reserved by Lambda",
        ),
        (
            {"environment": {"variables": {"BIG": "x" * 5000}}},
            "fn.yaml: spec.environment.variables: variables total 5003 bytes; Lambda's limit is 4096",
        ),
        (
            {"code": {"inline": {"files": {"../escape.py": ""}}}},
            "fn.yaml: spec.code.inline.files: file name '../escape.py' must be a relative path",
        ),
        (
            {"async": {"destinations": {"onFailure": {"function": "dlq", "queue": "q"}}}},
            "fn.yaml: spec.async.destinations.onFailure: a destination names exactly one of function, queue",
        ),
    ],
)
def test_invalid_specs_name_the_field_and_rule(spec: dict[str, Any], expected: str) -> None:
    found = messages(manifest(**spec))
    assert any(message.startswith(expected) for message in found), found
    with pytest.raises(SpecError):
        parse_function(manifest(**spec), "fn.yaml")


def test_bad_name_and_kind() -> None:
    document = manifest()
    document["metadata"]["name"] = "Hello_World"
    assert messages(document)[0].startswith("fn.yaml: metadata.name: String should match pattern")
    document["kind"] = "Deployment"
    assert messages(document) == ["fn.yaml: kind: must be Function (got 'Deployment')"]


def test_image_needs_no_runtime_or_handler() -> None:
    fn = parse_function(manifest(runtime=None, handler=None, code={"image": "public.ecr.aws/lambda/python:3.12"}))
    assert fn.spec.code.image == "public.ecr.aws/lambda/python:3.12"


def test_provided_runtime_needs_no_handler() -> None:
    assert parse_function(manifest(runtime="provided.al2023", handler=None)).spec.handler is None


def test_load_manifests_resolves_code_path(tmp_path: Path) -> None:
    (tmp_path / "hello" / "src").mkdir(parents=True)
    (tmp_path / "hello" / "function.yaml").write_text(
        "apiVersion: lambdalet.dev/v1alpha1\nkind: Function\nmetadata: {name: hello}\n"
        "spec: {runtime: python3.12, handler: app.handler, code: {path: src}}\n"
    )
    (tmp_path / "other.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    [fn] = load_manifests(tmp_path)
    assert fn.spec.code.path == str((tmp_path / "hello" / "src").resolve())
    with pytest.raises(SpecError, match=r"spec.code.path: a local path is not allowed in a cluster"):
        validate_for_cluster(fn)


def test_load_reports_missing_directory_and_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "fn.yaml"
    bad.write_text(
        "apiVersion: lambdalet.dev/v1alpha1\nkind: Function\nmetadata: {name: x}\n"
        "spec: {runtime: python3.12, handler: a.b, code: {path: nowhere}}\n"
    )
    with pytest.raises(SpecError, match=r"fn.yaml: spec.code.path: .*nowhere is not a directory"):
        load_manifests(bad)
    bad.write_text("kind: [unclosed\n")
    with pytest.raises(SpecError, match=r"fn.yaml: \(file\): not valid YAML"):
        load_manifests(bad)


def test_per_environment_concurrency_defaults_to_one_and_is_bounded() -> None:
    assert parse_function(manifest()).spec.perEnvironmentConcurrency == 1
    assert parse_function(manifest(perEnvironmentConcurrency=64)).spec.perEnvironmentConcurrency == 64
    assert messages(manifest(perEnvironmentConcurrency=0)) == [
        "fn.yaml: spec.perEnvironmentConcurrency: Input should be greater than or equal to 1 (got 0)"
    ]
    assert messages(manifest(perEnvironmentConcurrency=65)) == [
        "fn.yaml: spec.perEnvironmentConcurrency: Input should be less than or equal to 64 (got 65)"
    ]
    assert messages(manifest(perEnvironmentConcurrency="four")) == [
        "fn.yaml: spec.perEnvironmentConcurrency: Input should be a valid integer, "
        "unable to parse string as an integer (got 'four')"
    ]


def test_per_environment_concurrency_needs_a_runtime_not_an_image() -> None:
    document = manifest(perEnvironmentConcurrency=4, code={"image": "example.com/fn:1"})
    del document["spec"]["runtime"], document["spec"]["handler"]
    assert messages(document) == [
        "fn.yaml: spec: perEnvironmentConcurrency above 1 needs a runtime (code.image runs one at a time)"
    ]
