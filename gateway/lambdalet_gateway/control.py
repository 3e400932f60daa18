"""The read-only control plane: Lambda's ListFunctions, GetFunction and GetFunctionConfiguration shapes.

Pure builders from a :class:`~lambdalet_gateway.registry.FunctionRecord`; the handlers live in ``app``.
"""

from __future__ import annotations

import platform
from typing import Any

from lambdalet.names import function_arn

from .registry import FunctionRecord

ARCHITECTURE = "arm64" if platform.machine().lower() in {"arm64", "aarch64"} else "x86_64"
DESCRIPTION_ANNOTATION = "lambdalet.dev/description"


def function_configuration(record: FunctionRecord, *, region: str, account: str) -> dict[str, Any]:
    """Lambda's FunctionConfiguration for one function."""
    function = record.function
    spec = function.spec
    name = function.name
    config: dict[str, Any] = {
        "FunctionName": name,
        "FunctionArn": function_arn(name, region=region, account=account),
    }
    if spec.runtime is not None:
        config["Runtime"] = spec.runtime
    role_name = spec.serviceAccountName or f"lambdalet-{name}"
    config["Role"] = f"arn:aws:iam::{account}:role/{role_name}"
    if spec.handler is not None:
        config["Handler"] = spec.handler
    config.update(
        {
            "CodeSize": record.code_size,
            "Description": function.metadata.annotations.get(DESCRIPTION_ANNOTATION, ""),
            "Timeout": spec.timeoutSeconds,
            "MemorySize": spec.memoryMB,
            "LastModified": record.last_modified,
            "CodeSha256": record.code_sha256,
            "Version": "$LATEST",
        }
    )
    if spec.environment.variables:
        config["Environment"] = {"Variables": dict(spec.environment.variables)}
    config.update(
        {
            "TracingConfig": {"Mode": "PassThrough"},
            "RevisionId": record.code_sha256[:8] + record.last_modified,
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "PackageType": "Image" if spec.code.image else "Zip",
            "Architectures": [ARCHITECTURE],
            "EphemeralStorage": {"Size": spec.ephemeralStorageMB},
            "SnapStart": {"ApplyOn": "None", "OptimizationStatus": "Off"},
            "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{name}"},
        }
    )
    return config


def get_function(record: FunctionRecord, *, region: str, account: str) -> dict[str, Any]:
    """Lambda's GetFunction response."""
    spec = record.function.spec
    code: dict[str, Any]
    if spec.code.image:
        code = {"RepositoryType": "ECR", "ImageUri": spec.code.image, "ResolvedImageUri": spec.code.image}
    else:
        location = spec.code.url or (f"file://{spec.code.path}" if spec.code.path else "")
        code = {"RepositoryType": "S3", "Location": location}
    result: dict[str, Any] = {
        "Configuration": function_configuration(record, region=region, account=account),
        "Code": code,
    }
    if record.function.metadata.labels:
        result["Tags"] = dict(record.function.metadata.labels)
    if spec.reservedConcurrency is not None:
        result["Concurrency"] = {"ReservedConcurrentExecutions": spec.reservedConcurrency}
    return result


def list_functions(
    records: list[FunctionRecord], *, region: str, account: str, marker: str | None, max_items: int
) -> dict[str, Any]:
    """Lambda's ListFunctions page: functions sorted by name; ``NextMarker`` is the next offset."""
    ordered = sorted(records, key=lambda r: r.function.name)
    start = int(marker) if marker and marker.isdigit() else 0
    page = ordered[start : start + max_items]
    result: dict[str, Any] = {
        "Functions": [function_configuration(r, region=region, account=account) for r in page],
    }
    if start + max_items < len(ordered):
        result["NextMarker"] = str(start + max_items)
    return result
