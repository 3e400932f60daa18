"""Test helpers for the operator's unit tests: Function documents, and an in-memory API fake behind the
operator's ``Api`` interface (merge patch with JSON merge-patch semantics, generations, 404/409)."""

from __future__ import annotations

import copy
import datetime
import itertools
from collections.abc import Mapping
from typing import Any

from lambdalet_operator.kube import Conflict, NotFound, Obj

from lambdalet.spec import Function, parse_function

NOW = datetime.datetime(2026, 11, 26, 12, 0, 0, tzinfo=datetime.UTC)
UID = "0a1b2c3d-0000-4000-8000-000000000001"


def document(name: str = "hello", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "runtime": "python3.12",
        "handler": "app.handler",
        "code": {"inline": {"files": {"app.py": "def handler(event, context):\n    return event\n"}}},
    }
    body.update(spec)
    return {
        "apiVersion": "lambdalet.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def function(name: str = "hello", **spec: Any) -> Function:
    return parse_function(document(name, **spec))


def resource(name: str = "hello", generation: int = 1, uid: str = UID, **spec: Any) -> dict[str, Any]:
    """A Function as the API server returns it (with uid and generation)."""
    body = document(name, **spec)
    body["metadata"] |= {"uid": uid, "generation": generation, "resourceVersion": "1"}
    return body


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class FakeApi:
    """Objects by (kind, namespace, name); records every write as (verb, kind, name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.writes: list[tuple[str, str, str]] = []
        self._versions = itertools.count(100)

    def put(self, obj: Mapping[str, Any]) -> Obj:
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(stored["kind"], meta["namespace"], meta["name"])] = stored
        return copy.deepcopy(stored)

    def find(self, kind: str, name: str, namespace: str = "default") -> Obj | None:
        return self.objects.get((kind, namespace, name))

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    async def create(self, obj: Mapping[str, Any]) -> Obj:
        meta = obj["metadata"]
        if (obj["kind"], meta["namespace"], meta["name"]) in self.objects:
            raise Conflict(f"{obj['kind']} {meta['name']} exists", 409)
        self.writes.append(("create", obj["kind"], meta["name"]))
        return self.put(obj)

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        current = self.objects.get((kind, namespace, name))
        if current is None:
            raise NotFound(f"{kind} {name}", 404)
        self.writes.append(("patch", kind, name))
        updated = merge(current, patch)
        if updated.get("spec") != current.get("spec"):
            updated["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        return self.put(updated)

    async def replace(self, obj: Mapping[str, Any], resource_version: str) -> Obj:
        meta = obj["metadata"]
        current = self.objects.get((obj["kind"], meta["namespace"], meta["name"]))
        if current is None:
            raise NotFound(f"{obj['kind']} {meta['name']}", 404)
        if current["metadata"]["resourceVersion"] != resource_version:
            raise Conflict("stale resourceVersion", 409)
        self.writes.append(("replace", obj["kind"], meta["name"]))
        return self.put(obj)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        if self.objects.pop((kind, namespace, name), None) is not None:
            self.writes.append(("delete", kind, name))

    async def patch_function_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> Obj:
        current = self.objects[("Function", namespace, name)]
        self.writes.append(("status", "Function", name))
        current["status"] = merge(current.get("status") or {}, status)
        return copy.deepcopy(current)
