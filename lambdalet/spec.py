"""The Function spec: one model, the single source of truth.

``apiVersion: lambdalet.dev/v1alpha1``, ``kind: Function``. The same model validates the manifests that
``lambdalet up`` reads, is what the gateway serves, and generates the CRD's OpenAPI schema
(``lambdalet.crd``). Lambda's names where they exist (``runtime``, ``handler``, ``memoryMB``,
``timeoutSeconds``, ``reservedConcurrency`` ...), Kubernetes conventions elsewhere.

Pure: parsing and validation only. Reading files is limited to ``load_manifest_file``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_GROUP = "lambdalet.dev"
API_VERSION: Final = "lambdalet.dev/v1alpha1"
KIND: Final = "Function"

#: Lambda's runtime identifiers that lambdalet runs.
Runtime = Literal[
    "python3.11",
    "python3.12",
    "python3.13",
    "nodejs20.x",
    "nodejs22.x",
    "java17",
    "java21",
    "ruby3.2",
    "ruby3.3",
    "ruby3.4",
    "provided.al2023",
    "provided.al2",
]
RUNTIMES: tuple[str, ...] = get_args(Runtime)

#: Variables Lambda sets itself; a function may not set them (Lambda developer guide, "Defined runtime
#: environment variables").
RESERVED_VARIABLES = frozenset(
    {
        "_HANDLER",
        "_X_AMZN_TRACE_ID",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_EXECUTION_ENV",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION",
        "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_LAMBDA_RUNTIME_API",
        "LAMBDA_TASK_ROOT",
        "LAMBDA_RUNTIME_DIR",
    }
)
#: Lambda limits the customer's variables to 4 KB in total.
MAX_VARIABLES_BYTES = 4096
#: Most invocations one environment may run at once (``perEnvironmentConcurrency``). The agent accepts up
#: to 1024, but each slot of our Python bootstrap (and awslambdaric's) is a worker process that imports the
#: handler inside the environment's one ``memoryMB``: past a few dozen the slots only share the same CPU and
#: memory thinner, and a mistyped large value would exhaust the environment before its first invocation.
MAX_PER_ENVIRONMENT_CONCURRENCY = 64

# Function names become Deployment, Service and ConfigMap names: an RFC 1035 label.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
VARIABLE_PATTERN = r"^[a-zA-Z]([a-zA-Z0-9_])*$"
_NAME = re.compile(NAME_PATTERN)
_VARIABLE = re.compile(VARIABLE_PATTERN)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InlineCode(_Model):
    """Source files given in the manifest itself (stored in a ConfigMap on Kubernetes)."""

    files: dict[str, str] = Field(min_length=1, description="File name (relative to the code root) to file content.")

    @field_validator("files")
    @classmethod
    def _relative_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name in files:
            parts = Path(name).parts
            if not name or Path(name).is_absolute() or ".." in parts:
                raise ValueError(f"file name {name!r} must be a relative path inside the code directory")
        return files


class ConfigMapCode(_Model):
    """Code stored in an existing ConfigMap: each key is a file."""

    name: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap, same namespace.")


class Code(_Model):
    """Where the function's code comes from: exactly one source."""

    path: str | None = Field(
        default=None,
        description="A local directory, relative to the manifest (embedded mode only; not in a cluster).",
    )
    inline: InlineCode | None = Field(default=None, description="Files given inline.")
    configMap: ConfigMapCode | None = Field(default=None, description="Files from an existing ConfigMap.")
    image: str | None = Field(
        default=None,
        min_length=1,
        description="A container image with its own Runtime API client (any AWS Lambda image).",
    )
    url: str | None = Field(
        default=None, pattern=r"^https?://", description="A zip archive over HTTP(S), unpacked at start."
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected SHA-256 (hex) of the archive at `url`; a mismatch refuses the code.",
    )

    def sources(self) -> list[str]:
        return [name for name in ("path", "inline", "configMap", "image", "url") if getattr(self, name)]

    @model_validator(mode="after")
    def _exactly_one(self) -> Code:
        found = self.sources()
        if len(found) != 1:
            given = ", ".join(found) if found else "none"
            raise ValueError(f"exactly one of path, inline, configMap, image, url must be set (given: {given})")
        if self.sha256 is not None and self.url is None:
            raise ValueError("sha256 applies only to url")
        return self


class SecretKeySelector(_Model):
    name: str = Field(min_length=1, description="Secret name, same namespace.")
    key: str = Field(min_length=1, description="Key in the Secret.")
    optional: bool = False


class SecretVariable(_Model):
    """One variable taken from a Secret key (Kubernetes only)."""

    name: str = Field(pattern=VARIABLE_PATTERN, description="Environment variable name.")
    secretKeyRef: SecretKeySelector


class SecretRef(_Model):
    name: str = Field(min_length=1, description="Secret name, same namespace.")
    optional: bool = False


class EnvFromSource(_Model):
    """All keys of a Secret as variables (Kubernetes only)."""

    secretRef: SecretRef


class Environment(_Model):
    """The function's environment variables (Lambda's `Environment.Variables`) and secret references."""

    variables: dict[str, str] = Field(default_factory=dict, description="Name to value.")
    secretKeyRefs: list[SecretVariable] = Field(
        default_factory=list, description="Variables from Secret keys (Kubernetes only)."
    )
    envFrom: list[EnvFromSource] = Field(
        default_factory=list, description="Every key of a Secret as a variable (Kubernetes only)."
    )

    @field_validator("variables")
    @classmethod
    def _variables(cls, variables: dict[str, str]) -> dict[str, str]:
        for key in variables:
            if not _VARIABLE.match(key):
                raise ValueError(f"variable name {key!r} must match {VARIABLE_PATTERN}")
            if key in RESERVED_VARIABLES:
                raise ValueError(f"variable {key!r} is reserved by Lambda and set by the platform")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in variables.items())
        if size > MAX_VARIABLES_BYTES:
            raise ValueError(f"variables total {size} bytes; Lambda's limit is {MAX_VARIABLES_BYTES}")
        return variables


class Network(_Model):
    """Egress rules for the function's pods (the VPC analog): Kubernetes NetworkPolicy egress rules."""

    egress: list[dict[str, Any]] = Field(
        default_factory=list,
        description="NetworkPolicy egress rules (`to`, `ports`); an empty list denies all egress.",
    )


class Destination(_Model):
    """Where an async invocation record goes: another function, or a queue subject."""

    function: str | None = Field(default=None, pattern=NAME_PATTERN, description="A function's name.")
    queue: str | None = Field(default=None, min_length=1, description="A queue subject or topic name.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Destination:
        if (self.function is None) == (self.queue is None):
            raise ValueError("a destination names exactly one of function, queue")
        return self


class Destinations(_Model):
    onSuccess: Destination | None = None
    onFailure: Destination | None = None


class AsyncConfig(_Model):
    """Asynchronous invocation settings (Lambda's EventInvokeConfig)."""

    maximumRetryAttempts: int = Field(
        default=2, ge=0, le=2, description="Retries after a function error (Lambda: 0-2)."
    )
    maximumEventAgeSeconds: int = Field(
        default=21600, ge=60, le=21600, description="Discard events older than this (Lambda: 60-21600)."
    )
    destinations: Destinations = Field(default_factory=Destinations)


class FunctionSpec(_Model):
    """What a Function runs and how: Lambda's function configuration."""

    runtime: Runtime | None = Field(default=None, description="Lambda runtime id (not needed with code.image).")
    handler: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Entry point in the runtime's format, e.g. `app.handler` (not needed with code.image).",
    )
    code: Code
    memoryMB: int = Field(default=128, ge=128, le=10240, description="Memory, MB; CPU is in proportion.")
    timeoutSeconds: int = Field(default=3, ge=1, le=900, description="Invocation timeout in seconds.")
    environment: Environment = Field(default_factory=Environment)
    ephemeralStorageMB: int = Field(default=512, ge=512, le=10240, description="Size of /tmp, MB.")
    reservedConcurrency: int | None = Field(
        default=None, ge=0, description="Maximum concurrent executions; 0 throttles every invocation."
    )
    provisionedConcurrency: int = Field(default=0, ge=0, description="Environments initialised ahead and kept warm.")
    idleTimeoutSeconds: int = Field(
        default=300, ge=1, le=86400, description="Stop an idle environment after this many seconds."
    )
    perEnvironmentConcurrency: int = Field(
        default=1,
        ge=1,
        le=MAX_PER_ENVIRONMENT_CONCURRENCY,
        description=(
            "Invocations one environment runs at once (Lambda Managed Instances' "
            "PerExecutionEnvironmentMaxConcurrency); 1 is Lambda's one at a time."
        ),
    )
    serviceAccountName: str | None = Field(
        default=None, description="Kubernetes ServiceAccount to run as (the execution role analog)."
    )
    network: Network | None = Field(default=None, description="Egress rules (Kubernetes NetworkPolicy).")
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")

    @model_validator(mode="after")
    def _cross_field(self) -> FunctionSpec:
        if self.code.image is None:
            if self.runtime is None:
                raise ValueError("runtime is required unless code.image is set")
            if self.handler is None and not self.runtime.startswith("provided"):
                raise ValueError("handler is required unless code.image is set")
        if self.code.image is not None and self.perEnvironmentConcurrency > 1:
            # An image brings its own runtime client, which the agent cannot serve concurrently.
            raise ValueError("perEnvironmentConcurrency above 1 needs a runtime (code.image runs one at a time)")
        if self.reservedConcurrency is not None and self.provisionedConcurrency > self.reservedConcurrency:
            raise ValueError(
                f"provisionedConcurrency ({self.provisionedConcurrency}) must not exceed "
                f"reservedConcurrency ({self.reservedConcurrency})"
            )
        return self


class Metadata(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Function(_Model):
    """A ``lambdalet.dev/v1alpha1`` Function."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    apiVersion: Literal["lambdalet.dev/v1alpha1"] = API_VERSION
    kind: Literal["Function"] = KIND
    metadata: Metadata
    spec: FunctionSpec

    @property
    def name(self) -> str:
        return self.metadata.name


class SpecError(ValueError):
    """A manifest that is not a valid Function; the message names the file, the field and the rule."""

    def __init__(self, source: str, field: str, rule: str) -> None:
        self.source = source
        self.field = field
        self.rule = rule
        super().__init__(f"{source}: {field}: {rule}")


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.startswith("function-after[") or item in RUNTIMES:
            continue
        else:
            parts.append(("." if parts else "") + ("async" if item == "async_" else item))
    return "".join(parts) or "(document)"


def _errors(exc: ValidationError, source: str) -> list[SpecError]:
    found: list[SpecError] = []
    for error in exc.errors(include_url=False):
        field = _field_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "literal_error" and field.endswith("runtime"):
            message = f"unknown runtime {error.get('input')!r}; one of {', '.join(RUNTIMES)}"
        elif error.get("input") is not None and error["type"] not in {"missing", "model_type"}:
            value = error["input"]
            if isinstance(value, str | int | float | bool):
                message = f"{message} (got {value!r})"
        found.append(SpecError(source, field, message))
    return found


def parse_function(document: Mapping[str, Any], source: str = "<manifest>") -> Function:
    """Validate one manifest document; raise the first ``SpecError`` (``all_errors`` gives them all)."""
    errors = all_errors(document, source)
    if errors:
        raise errors[0]
    return Function.model_validate(document)


def all_errors(document: Mapping[str, Any], source: str = "<manifest>") -> list[SpecError]:
    """Every problem with one manifest document, each naming its field and rule; empty when valid."""
    if not isinstance(document, Mapping):
        return [SpecError(source, "(document)", "a manifest must be a mapping")]
    if document.get("apiVersion") != API_VERSION:
        return [SpecError(source, "apiVersion", f"must be {API_VERSION} (got {document.get('apiVersion')!r})")]
    if document.get("kind") != KIND:
        return [SpecError(source, "kind", f"must be {KIND} (got {document.get('kind')!r})")]
    try:
        Function.model_validate(document)
    except ValidationError as exc:
        return _errors(exc, source)
    return []


def is_function_document(document: object) -> bool:
    """Whether a YAML document is meant to be a Function (whatever its validity)."""
    return (
        isinstance(document, Mapping)
        and document.get("kind") == KIND
        and str(document.get("apiVersion", "")).startswith(f"{API_GROUP}/")
    )


def _documents(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), "(file)", f"cannot read: {exc}") from exc
    try:
        yield from enumerate(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise SpecError(str(path), "(file)", f"not valid YAML: {exc}") from exc


def load_manifest_file(path: Path) -> list[Function]:
    """Load every Function in a YAML file; ``code.path`` becomes absolute (relative to the file).

    Documents of other kinds are ignored; the first invalid Function raises ``SpecError``.
    """
    functions: list[Function] = []
    documents = [doc for _, doc in _documents(path) if doc is not None]
    for index, document in enumerate(documents):
        if not is_function_document(document):
            continue
        source = str(path) if len(documents) == 1 else f"{path} (document {index + 1})"
        function = parse_function(document, source)
        code = function.spec.code
        if code.path is not None:
            resolved = (path.parent / code.path).resolve()
            if not resolved.is_dir():
                raise SpecError(source, "spec.code.path", f"{resolved} is not a directory")
            new_code = code.model_copy(update={"path": str(resolved)})
            function = function.model_copy(update={"spec": function.spec.model_copy(update={"code": new_code})})
        functions.append(function)
    return functions


def load_manifests(path: Path) -> list[Function]:
    """Load Functions from a file, or from every ``*.yaml``/``*.yml`` file under a directory."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())
        return [function for file in files for function in load_manifest_file(file)]
    return load_manifest_file(path)


def validate_for_cluster(function: Function, source: str = "<manifest>") -> None:
    """Rules that hold only on Kubernetes: a local ``code.path`` cannot reach a cluster."""
    if function.spec.code.path is not None:
        raise SpecError(
            source,
            "spec.code.path",
            "a local path is not allowed in a cluster; use inline, configMap, image or url",
        )
