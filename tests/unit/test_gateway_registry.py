"""Manifests to functions: records with Lambda's CodeSha256/CodeSize/LastModified, errors naming file,
field and rule, duplicates refused, change detection; and the control-plane shapes built from them."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from pathlib import Path

import pytest
from lambdalet_gateway.control import function_configuration, get_function, list_functions
from lambdalet_gateway.registry import Catalog, Registry, fingerprint, load

MANIFEST = """apiVersion: lambdalet.dev/v1alpha1
kind: Function
metadata:
  name: {name}
  labels: {{team: a}}
  annotations: {{lambdalet.dev/description: says hi}}
spec:
  runtime: python3.12
  handler: app.handler
  code: {{path: code}}
  reservedConcurrency: 3
"""


def make(tmp_path: Path, name: str = "hello") -> Path:
    (tmp_path / "code").mkdir(exist_ok=True)
    (tmp_path / "code" / "app.py").write_text("def handler(e, c):\n    return 1\n")
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(MANIFEST.format(name=name))
    return manifest


def test_records(tmp_path: Path) -> None:
    make(tmp_path)
    catalog = load([tmp_path])
    assert catalog.errors == ()
    record = catalog.functions["hello"]
    assert record.code_size == len("def handler(e, c):\n    return 1\n")
    expected = hashlib.sha256(b"app.py\0def handler(e, c):\n    return 1\n\0").digest()
    assert base64.b64decode(record.code_sha256) == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", record.last_modified)


def test_errors_name_file_field_and_rule(tmp_path: Path) -> None:
    make(tmp_path)
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: lambdalet.dev/v1alpha1\nkind: Function\nmetadata: {name: bad}\n"
        "spec: {runtime: python3.12, handler: a.b, code: {path: nowhere}, timeoutSeconds: 0, memoryMB: 1}\n"
    )
    (tmp_path / "dup.yaml").write_text(MANIFEST.format(name="hello"))
    catalog = load([tmp_path])
    assert list(catalog.functions) == ["hello"]
    fields = {(Path(e.source).name, e.field) for e in catalog.errors}
    assert ("bad.yaml", "spec.timeoutSeconds") in fields
    assert ("bad.yaml", "spec.memoryMB") in fields
    assert ("dup.yaml", "metadata.name") in fields or ("hello.yaml", "metadata.name") in fields


def test_fingerprint_follows_manifests_and_code(tmp_path: Path) -> None:
    make(tmp_path)
    catalog = load([tmp_path])
    before = fingerprint([tmp_path], catalog)
    assert fingerprint([tmp_path], catalog) == before
    (tmp_path / "code" / "app.py").write_text("def handler(e, c):\n    return 22\n")
    assert fingerprint([tmp_path], catalog) != before


def test_function_configuration_fields(tmp_path: Path) -> None:
    make(tmp_path)
    record = load([tmp_path]).functions["hello"]
    config = function_configuration(record, region="eu-west-1", account="123456789012")
    assert config["FunctionName"] == "hello"
    assert config["FunctionArn"] == "arn:aws:lambda:eu-west-1:123456789012:function:hello"
    assert config["Description"] == "says hi"
    assert config["Runtime"] == "python3.12"
    assert config["Handler"] == "app.handler"
    assert config["Timeout"] == 3
    assert config["MemorySize"] == 128
    assert config["CodeSha256"] == record.code_sha256
    assert config["Version"] == "$LATEST"
    assert config["State"] == "Active"
    assert config["PackageType"] == "Zip"
    assert config["EphemeralStorage"] == {"Size": 512}
    assert config["Architectures"] in (["x86_64"], ["arm64"])
    assert "Environment" not in config
    full = get_function(record, region="eu-west-1", account="123456789012")
    assert full["Tags"] == {"team": "a"}
    assert full["Concurrency"] == {"ReservedConcurrentExecutions": 3}


def test_list_functions_pages(tmp_path: Path) -> None:
    for name in ("c", "a", "b"):
        make(tmp_path, name)
    records = list(load([tmp_path]).functions.values())
    first = list_functions(records, region="r", account="1", marker=None, max_items=2)
    assert [f["FunctionName"] for f in first["Functions"]] == ["a", "b"]
    second = list_functions(records, region="r", account="1", marker=first["NextMarker"], max_items=2)
    assert [f["FunctionName"] for f in second["Functions"]] == ["c"]
    assert "NextMarker" not in second


async def test_reload_reports_invalid_manifests_once_with_structured_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make(tmp_path)
    (tmp_path / "bad.yaml").write_text(MANIFEST.format(name="Bad_Name"))
    seen: list[Catalog] = []
    registry = Registry([tmp_path], seen.append)
    with caplog.at_level(logging.ERROR, logger="lambdalet.gateway.registry"):
        assert await registry.reload() is True
        assert await registry.reload() is False
    assert [sorted(c.functions) for c in seen] == [["hello"]]
    (record,) = caplog.records
    assert record.name == "lambdalet.gateway.registry"
    assert Path(record.__dict__["source"]).name == "bad.yaml"
    assert record.__dict__["field"] == "metadata.name"
    assert "does not match" in record.__dict__["rule"] or "pattern" in record.__dict__["rule"]
