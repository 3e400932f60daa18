"""The Function CustomResourceDefinition, generated from the spec model (``lambdalet.spec``).

The OpenAPI v3 schema of ``spec`` is derived from ``FunctionSpec``'s JSON schema, so the CRD and the model
cannot drift: ``$defs`` are inlined, ``anyOf [X, null]`` becomes ``X`` with ``nullable: true``, defaults,
enums, ranges, patterns and descriptions are kept, and the cross-field rules that the model checks in
Python are restated as CEL ``x-kubernetes-validations``. The status schema comes from ``FunctionStatus``,
the model the operator writes.

``lambdalet crd`` prints the CRD as YAML; ``crds/lambdalet.dev_functions.yaml`` and the chart's copy are
that output (a unit test keeps them equal). Pure: no I/O besides printing.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lambdalet.spec import API_GROUP, KIND, NAME_PATTERN, RESERVED_VARIABLES, RUNTIMES, FunctionSpec

VERSION: Final = "v1alpha1"
PLURAL: Final = "functions"
SINGULAR: Final = "function"
SHORT_NAMES: Final = ("fn",)
CRD_NAME: Final = f"{PLURAL}.{API_GROUP}"

Schema = dict[str, Any]


class Condition(BaseModel):
    """A Kubernetes-style condition (``metav1.Condition``)."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="Condition type, e.g. `Ready`.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason: Ready, Progressing, InvalidSpec, CodeUnavailable ...")
    message: str = Field(default="", description="What happened and what to do about it.")
    lastTransitionTime: str = Field(description="When the status last changed (RFC 3339).")
    observedGeneration: int | None = Field(default=None, description="The generation this condition is about.")


class FunctionStatus(BaseModel):
    """What the operator reports about a Function (``.status``)."""

    model_config = ConfigDict(extra="forbid")

    conditions: list[Condition] = Field(default_factory=list, description="Current conditions; `Ready` first.")
    observedGeneration: int | None = Field(default=None, description="The spec generation last reconciled.")
    codeSha256: str | None = Field(default=None, description="SHA-256 of the code the pods run (hex).")
    url: str | None = Field(default=None, description="Where to invoke the function through the gateway.")
    readyInstances: int | None = Field(default=None, description="Execution environments ready to serve.")
    desiredInstances: int | None = Field(default=None, description="Execution environments asked for.")


def _rule(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> Schema:
    out: Schema = {"rule": rule, "message": message}
    if field_path is not None:
        out["fieldPath"] = field_path
    if reason is not None:
        out["reason"] = reason
    return out


_CODE_SOURCES = ("path", "inline", "configMap", "image", "url")

#: Cross-field rules, by JSON-pointer-like location in the spec schema ("" is the spec itself). Each one
#: restates a rule of ``FunctionSpec``/``Code``/``Destination``/``Environment`` (see lambdalet/spec.py).
_SPEC_RULES: Final[dict[tuple[str, ...], list[Schema]]] = {
    (): [
        _rule(
            "has(self.code.image) || has(self.runtime)",
            "runtime is required unless code.image is set",
            ".runtime",
            "FieldValueRequired",
        ),
        _rule(
            "has(self.code.image) || has(self.handler) || (has(self.runtime) && self.runtime.startsWith('provided'))",
            "handler is required unless code.image is set (or the runtime is provided.*)",
            ".handler",
            "FieldValueRequired",
        ),
        _rule(
            "!has(self.reservedConcurrency) || "
            "(has(self.provisionedConcurrency) ? self.provisionedConcurrency : 0) <= self.reservedConcurrency",
            "provisionedConcurrency must not exceed reservedConcurrency",
            ".provisionedConcurrency",
            "FieldValueInvalid",
        ),
        _rule(
            "!has(self.code.image) || !has(self.perEnvironmentConcurrency) || self.perEnvironmentConcurrency == 1",
            "perEnvironmentConcurrency above 1 needs a runtime (code.image runs one at a time)",
            ".perEnvironmentConcurrency",
            "FieldValueForbidden",
        ),
    ],
    ("code",): [
        _rule(
            "[" + ", ".join(f"has(self.{name})" for name in _CODE_SOURCES) + "].filter(x, x).size() == 1",
            "exactly one of path, inline, configMap, image, url must be set",
        ),
        _rule(
            "!has(self.path)",
            "a local path is not allowed in a cluster; use inline, configMap, image or url",
            ".path",
            "FieldValueForbidden",
        ),
        _rule("!has(self.sha256) || has(self.url)", "sha256 applies only to url", ".sha256", "FieldValueForbidden"),
    ],
    ("environment", "variables"): [
        _rule(
            "self.all(k, !(k in [" + ", ".join(f"'{v}'" for v in sorted(RESERVED_VARIABLES)) + "]))",
            "a variable name is reserved by Lambda and set by the platform: " + ", ".join(sorted(RESERVED_VARIABLES)),
        ),
        _rule(
            r"self.all(k, k.matches('^[a-zA-Z][a-zA-Z0-9_]*$'))",
            "variable names must match ^[a-zA-Z][a-zA-Z0-9_]*$",
        ),
    ],
    ("async", "destinations", "onSuccess"): [
        _rule("has(self.function) != has(self.queue)", "a destination names exactly one of function, queue"),
    ],
    ("async", "destinations", "onFailure"): [
        _rule("has(self.function) != has(self.queue)", "a destination names exactly one of function, queue"),
    ],
}

#: Sizes that keep CEL's cost estimate bounded (the API server refuses rules over unbounded maps of
#: unbounded strings). They match Lambda's own limits: 4 KB of variables in total.
_BOUNDS: Final[dict[tuple[str, ...], Schema]] = {
    ("environment", "variables"): {"maxProperties": 512},
}
_VARIABLE_NAME_MAX = 256

_DROP = {"title", "additionalProperties", "$defs", "const"}


def _resolve(node: Any, defs: dict[str, Schema]) -> Any:
    """Inline ``$ref``s, turn ``anyOf [X, null]`` into nullable X, and drop what CRDs do not accept."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **node}
        return _resolve(merged, defs)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        merged = {**_resolve(options[0], defs), **{k: v for k, v in node.items() if k != "default"}}
        merged["nullable"] = True
        if node.get("default") is not None:
            merged["default"] = node["default"]
        return _resolve(merged, defs)
    extra = node.get("additionalProperties")
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _resolve(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _resolve(value, defs)
    if isinstance(extra, dict):
        # A map: ``additionalProperties`` holds the value schema (no ``properties`` alongside it).
        out["additionalProperties"] = _resolve(extra, defs)
    elif extra is True:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _object_defaults(schema: Schema) -> None:
    """Optional, non-nullable nested objects default to ``{}`` so their own defaults apply (the model's
    ``default_factory``)."""
    for prop in schema.get("properties", {}).values():
        if prop.get("type") == "object" and "properties" in prop:
            if not prop.get("nullable") and "default" not in prop:
                prop["default"] = {}
            _object_defaults(prop)
        elif prop.get("type") == "array" and isinstance(prop.get("items"), dict):
            _object_defaults(prop["items"])
    for name in schema.get("required", []):
        schema["properties"][name].pop("default", None)


def _at(schema: Schema, path: tuple[str, ...]) -> Schema:
    node = schema
    for name in path:
        node = node["properties"][name]
    return node


def spec_schema() -> Schema:
    """The OpenAPI v3 schema of ``.spec``, from ``FunctionSpec``."""
    raw = FunctionSpec.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, Schema] = raw.get("$defs", {})
    schema: Schema = _resolve(raw, defs)
    _object_defaults(schema)
    for path, bounds in _BOUNDS.items():
        _at(schema, path).update(bounds)
    for path, rules in _SPEC_RULES.items():
        _at(schema, path)["x-kubernetes-validations"] = copy.deepcopy(rules)
    # Keys of maps get a bounded length too, for the same cost reason.
    _at(schema, ("environment", "variables"))["additionalProperties"]["maxLength"] = 4096
    _at(schema, ("runtime",))["enum"] = list(RUNTIMES)
    return schema


def status_schema() -> Schema:
    raw = FunctionStatus.model_json_schema(by_alias=True, mode="serialization")
    schema: Schema = _resolve(raw, raw.get("$defs", {}))
    conditions = schema["properties"]["conditions"]
    conditions.pop("default", None)
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    for name in ("lastTransitionTime",):
        conditions["items"]["properties"][name]["format"] = "date-time"
    return schema


def crd() -> Schema:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "lambdalet"}},
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["lambdalet"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Instances", "type": "integer", "jsonPath": ".status.readyInstances"},
                        {
                            "name": "Reason",
                            "type": "string",
                            "priority": 1,
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                        },
                        {"name": "URL", "type": "string", "priority": 1, "jsonPath": ".status.url"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": f"A Lambda function: {API_GROUP}/{VERSION} {KIND}.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "x-kubernetes-validations": [
                                _rule(
                                    f"self.metadata.name.matches('{NAME_PATTERN}') && size(self.metadata.name) <= 63",
                                    "metadata.name must be a DNS label (lower-case letters, digits and '-', "
                                    "starting with a letter, at most 63 characters): it names the Deployment "
                                    "and Service",
                                ),
                            ],
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    """The CRD as a YAML document (what ``crds/lambdalet.dev_functions.yaml`` holds)."""
    header = "# Generated by `lambdalet crd` from lambdalet/spec.py; do not edit by hand.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lambdalet crd", description="Print the Function CRD as YAML.")
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    args = parser.parse_args(list(argv)[1:])
    text = render()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:  # noqa: PTH123 - one file, one write
            out.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
