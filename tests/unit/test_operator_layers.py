"""The operator's layers, enforced: the pure modules (builders, status, settings) import no I/O library
and no API client, only ``kube`` imports the Kubernetes client, and nothing imports the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "lambdalet_operator"
IO_MODULES = {"aiohttp", "kopf", "kubernetes_asyncio", "socket", "subprocess", "lambdalet_operator.kube"}


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def roots(names: set[str]) -> set[str]:
    return names | {name.split(".")[0] for name in names}


@pytest.mark.parametrize("module", ["manifests", "status", "settings"])
def test_pure_modules_do_no_io(module: str) -> None:
    assert not roots(imports(module)) & IO_MODULES


@pytest.mark.parametrize("module", [p.stem for p in sorted(PACKAGE.glob("*.py"))])
def test_only_kube_talks_to_the_api_and_nothing_imports_the_gateway(module: str) -> None:
    found = roots(imports(module))
    assert "lambdalet_gateway" not in found
    if module != "kube":
        assert "kubernetes_asyncio" not in found
