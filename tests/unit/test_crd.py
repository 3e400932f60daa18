"""The Function CRD: the committed files are exactly the generator's output, the schema is structural
(what the API server requires), and it carries the model's fields, defaults, ranges and rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lambdalet import cli, crd
from lambdalet.spec import RUNTIMES, FunctionSpec

ROOT = Path(__file__).resolve().parents[2]


def spec_schema() -> dict[str, Any]:
    version = crd.crd()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def walk(node: Any, where: str = "") -> Any:
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            yield from walk(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{where}[{index}]")


@pytest.mark.parametrize(
    "path", ["crds/lambdalet.dev_functions.yaml", "charts/lambdalet/crds/lambdalet.dev_functions.yaml"]
)
def test_committed_crd_is_the_generators_output(path: str) -> None:
    assert (ROOT / path).read_text() == crd.render(), f"{path} is stale: run `lambdalet crd -o {path}`"


def test_lambdalet_crd_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == crd.render()


def test_the_schema_is_structural() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for where, node in walk(schema):
        if where.endswith((".x-kubernetes-validations", ".properties")):
            continue
        if "type" in node or "rule" in node or where.endswith("additionalProperties"):
            assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "const"} & set(node), where
            assert node.get("additionalProperties") is not False, where
            if node.get("type") == "object":
                assert not ("properties" in node and "additionalProperties" in node), where
        if "properties" in where.rsplit(".", 2)[-2:-1]:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), where


def test_every_model_field_is_in_the_schema_with_its_limits() -> None:
    schema = spec_schema()["properties"]
    assert set(schema) == {field.alias or name for name, field in FunctionSpec.model_fields.items()}
    assert schema["memoryMB"].items() >= {"minimum": 128, "maximum": 10240, "default": 128, "type": "integer"}.items()
    assert schema["timeoutSeconds"].items() >= {"minimum": 1, "maximum": 900, "default": 3}.items()
    assert schema["ephemeralStorageMB"].items() >= {"minimum": 512, "maximum": 10240, "default": 512}.items()
    assert schema["reservedConcurrency"]["minimum"] == 0 and schema["reservedConcurrency"]["nullable"] is True
    assert schema["provisionedConcurrency"].items() >= {"minimum": 0, "default": 0}.items()
    assert schema["runtime"]["enum"] == list(RUNTIMES)
    assert schema["async"]["default"] == {}
    assert (
        schema["async"]["properties"]["maximumRetryAttempts"].items()
        >= {"minimum": 0, "maximum": 2, "default": 2}.items()
    )
    egress = schema["network"]["properties"]["egress"]["items"]
    assert egress == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert spec_schema()["required"] == ["code"]
    assert all(
        prop.get("description") for prop in schema.values() if prop.get("type") != "object" or prop.get("properties")
    )


def rules_at(*path: str) -> list[str]:
    node = spec_schema()
    for name in path:
        node = node["properties"][name]
    return [rule["rule"] for rule in node.get("x-kubernetes-validations", [])]


def test_cross_field_rules_are_cel_validations() -> None:
    spec_rules = " ".join(rules_at())
    assert "has(self.handler)" in spec_rules and "startsWith('provided')" in spec_rules
    assert "self.provisionedConcurrency" in spec_rules and "self.reservedConcurrency" in spec_rules
    code_rules = rules_at("code")
    assert any(".size() == 1" in rule and "has(self.image)" in rule for rule in code_rules)
    assert "!has(self.path)" in code_rules


def test_resource_names_columns_and_status() -> None:
    spec = crd.crd()["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["fn"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Runtime", "Ready", "Instances", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"conditions", "observedGeneration", "codeSha256", "url", "readyInstances", "desiredInstances"} <= set(
        status
    )


def test_yaml_round_trips() -> None:
    assert yaml.safe_load(crd.render()) == crd.crd()


def test_per_environment_concurrency_is_bounded_and_refused_with_an_image() -> None:
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    field = spec["properties"]["perEnvironmentConcurrency"]
    assert (field["minimum"], field["maximum"], field["default"]) == (1, 64, 1)
    assert any("perEnvironmentConcurrency == 1" in rule and "code.image" in rule for rule in rules_at())
