"""Manifests in embedded mode: an invalid manifest is reported (file, field, reason) while valid ones keep
serving; new, changed and removed manifests (and changed code) are picked up without a restart."""

from __future__ import annotations

import json
from pathlib import Path

from gateway_support import running_gateway, wait_for, write_function

V1 = 'def handler(event, context):\n    return "v1"\n'
V2 = 'def handler(event, context):\n    return "v2"\n'


def test_invalid_manifests_are_reported_and_valid_ones_serve(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_function(manifests, "good", {"app.py": V1})
    (manifests / "bad-memory.yaml").write_text(
        "apiVersion: lambdalet.dev/v1alpha1\nkind: Function\nmetadata: {name: bad}\n"
        "spec: {runtime: python3.12, handler: a.b, code: {inline: {files: {a.py: ''}}}, memoryMB: 64}\n"
    )
    (manifests / "bad-runtime.yaml").write_text(
        "apiVersion: lambdalet.dev/v1alpha1\nkind: Function\nmetadata: {name: worse}\n"
        "spec: {runtime: cobol, handler: a.b, code: {inline: {files: {a.py: ''}}}}\n"
    )
    (manifests / "broken.yaml").write_text("kind: [unclosed\n")
    with running_gateway([manifests], tmp_path) as gateway:
        status = gateway.status()
        assert [f["name"] for f in status["functions"]] == ["good"]
        errors = {Path(e["file"]).name: e for e in status["errors"]}
        assert errors["bad-memory.yaml"]["field"] == "spec.memoryMB"
        assert "greater than or equal to 128" in errors["bad-memory.yaml"]["reason"]
        assert errors["bad-runtime.yaml"]["field"] == "spec.runtime"
        assert "unknown runtime 'cobol'" in errors["bad-runtime.yaml"]["reason"]
        assert "not valid YAML" in errors["broken.yaml"]["reason"]
        code, _, body = gateway.invoke("good")
        assert (code, json.loads(body)) == (200, "v1")
        assert gateway.invoke("bad")[0] == 404


def test_manifest_and_code_changes_are_reloaded(tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "app.py").write_text(V1)
    (manifests / "local.yaml").write_text(
        "apiVersion: lambdalet.dev/v1alpha1\nkind: Function\nmetadata: {name: local}\n"
        f"spec: {{runtime: python3.12, handler: app.handler, code: {{path: {code_dir}}}}}\n"
    )
    with running_gateway([manifests], tmp_path) as gateway:
        assert json.loads(gateway.invoke("local")[2]) == "v1"
        (code_dir / "app.py").write_text(V2)
        wait_for(lambda: json.loads(gateway.invoke("local")[2]) == "v2", what="the code change")

        write_function(manifests, "added", {"app.py": V1})
        wait_for(lambda: gateway.invoke("added")[0] == 200, what="the new function")

        write_function(manifests, "added", {"app.py": V2})
        wait_for(lambda: json.loads(gateway.invoke("added")[2]) == "v2", what="the changed manifest")

        (manifests / "added.yaml").write_text("apiVersion: lambdalet.dev/v1alpha1\nkind: Function\nmetadata: {}\n")
        wait_for(lambda: gateway.invoke("added")[0] == 404, what="the function to go")
        assert gateway.status()["errors"][0]["file"].endswith("added.yaml")
        wait_for(lambda: not gateway.agent_pids("added"), what="its environments to stop")
        assert json.loads(gateway.invoke("local")[2]) == "v2"
