"""Agent settings: a frozen dataclass built from command-line flags, then the environment, then defaults.

No I/O here beyond reading the injected ``environ`` mapping; errors raise :class:`SettingsError` with a
message naming the flag or variable.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RUNTIME = "python3.12"
INIT_TIMEOUT_S = 10.0
MAX_MEMORY_MB = 10240
MAX_CONCURRENCY = 1024  # invocations one environment may run at once (AWS_LAMBDA_MAX_CONCURRENCY)
# A streamed response (Lambda-Runtime-Function-Response-Mode: streaming) may be up to 200 MB, Lambda's quota.
STREAM_RESPONSE_LIMIT = 200 * 1024 * 1024
TRUE_WORDS = ("1", "true", "yes")


class SettingsError(ValueError):
    """An invalid flag or environment variable; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    code_dir: str = "/var/task"
    handler: str = ""
    runtime: str | None = DEFAULT_RUNTIME
    command: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 9000
    port_file: str | None = None
    runtime_api_host: str = "127.0.0.1"
    runtime_api_port: int = 0
    timeout_s: float = 3.0
    memory_mb: int = 128
    function_name: str = "function"
    function_version: str = "$LATEST"
    initialization_type: str = "on-demand"
    region: str = "us-east-1"
    account_id: str = "012345678912"
    user_env: Mapping[str, str] = field(default_factory=dict)
    init_timeout_s: float = INIT_TIMEOUT_S
    # No bootstrap of its own: another container's Runtime API client is the runtime (code.image).
    external_runtime: bool = False
    # Invocations run at once (Lambda Managed Instances' AWS_LAMBDA_MAX_CONCURRENCY); 1 = one at a time.
    max_concurrency: int = 1
    # Bytes a streamed response may carry; past it the stream ends with Function.ResponseSizeTooLarge.
    stream_response_limit: int = STREAM_RESPONSE_LIMIT

    @property
    def function_arn(self) -> str:
        return f"arn:aws:lambda:{self.region}:{self.account_id}:function:{self.function_name}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lambdalet agent",
        description="Run one Lambda execution environment: the Runtime API for a bootstrap, and the "
        "invoke endpoint POST /2015-03-31/functions/function/invocations.",
    )
    p.add_argument("--code", metavar="DIR", help="function code directory (env LAMBDA_TASK_ROOT)")
    p.add_argument("--handler", metavar="H", help="handler, e.g. app.handler (env _HANDLER)")
    p.add_argument("--runtime", metavar="ID", help="runtime id, e.g. python3.12 (env LAMBDALET_RUNTIME)")
    p.add_argument("--host", metavar="H", help="bind address (env LAMBDALET_BIND_ADDRESS)")
    p.add_argument("--port", metavar="N", type=int, help="invoke port, 0 = ephemeral (env LAMBDALET_AGENT_PORT)")
    p.add_argument("--port-file", metavar="PATH", help="write the bound port number to PATH")
    p.add_argument(
        "--runtime-api-address",
        metavar="HOST:PORT",
        help="Runtime API listen address (env LAMBDALET_RUNTIME_API_ADDRESS, default 127.0.0.1:0)",
    )
    p.add_argument("--timeout", metavar="SECONDS", type=float, help="env AWS_LAMBDA_FUNCTION_TIMEOUT")
    p.add_argument("--memory", metavar="MB", type=int, help="env AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    p.add_argument("--function-name", metavar="N", help="env AWS_LAMBDA_FUNCTION_NAME")
    p.add_argument("--function-version", metavar="V", help="env AWS_LAMBDA_FUNCTION_VERSION")
    p.add_argument("--initialization-type", metavar="T", help="env AWS_LAMBDA_INITIALIZATION_TYPE")
    p.add_argument(
        "--max-concurrency",
        metavar="N",
        help="run up to N invocations at once, as Lambda Managed Instances: the runtime gets "
        "AWS_LAMBDA_MAX_CONCURRENCY=N and may wait at /next N times (env AWS_LAMBDA_MAX_CONCURRENCY, default 1)",
    )
    p.add_argument(
        "--external-runtime",
        action="store_true",
        default=None,
        help="start no bootstrap: serve the Runtime API for a runtime started elsewhere (another container "
        "of the pod, sharing its process namespace) and reset it by killing its session "
        "(env LAMBDALET_EXTERNAL_RUNTIME=1)",
    )
    p.add_argument("--env", metavar="K=V", action="append", default=[], help="user variable (repeatable)")
    return p


# Built once, at import: constructing it imports argparse's lazy dependencies (~6 ms). An agent forked from
# the zygote (which imported this module) then only parses its flags (~0.2 ms).
PARSER = _parser()


def usage() -> str:
    return PARSER.format_help() + "\n  -- COMMAND ARGS...     replaces the runtime's bootstrap\n"


def _number(value: str, name: str, kind: type[int] | type[float]) -> float:
    try:
        return kind(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a number") from None


def from_args(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build settings from ``argv`` (without the leading ``agent``), falling back to ``environ``."""
    args_list = list(argv)
    command: tuple[str, ...] = ()
    if "--" in args_list:
        cut = args_list.index("--")
        command = tuple(args_list[cut + 1 :])
        args_list = args_list[:cut]
        if not command:
            raise SettingsError("'--' must be followed by a command")
    try:
        ns = PARSER.parse_args(args_list)
    except SystemExit as exc:
        raise SettingsError(f"invalid arguments: {' '.join(args_list)}") from exc

    def pick(flag_value: object, env: str, default: str) -> str:
        if flag_value is not None:
            return str(flag_value)
        return environ.get(env) or default

    handler = pick(ns.handler, "_HANDLER", "")
    external = bool(ns.external_runtime) or environ.get("LAMBDALET_EXTERNAL_RUNTIME", "").lower() in TRUE_WORDS
    if external and command:
        raise SettingsError("--external-runtime (LAMBDALET_EXTERNAL_RUNTIME) starts no bootstrap: drop '-- COMMAND'")
    if not handler and len(command) >= 2:
        handler = command[-1]  # as AWS's emulator does: the last argument of the command is the handler
    runtime: str | None = ns.runtime or environ.get("LAMBDALET_RUNTIME") or None
    if runtime is None and not command and not external:
        runtime = DEFAULT_RUNTIME
    if not command and not external and not handler and not (runtime or "").startswith("provided"):
        raise SettingsError("--handler (or _HANDLER) is required unless a command follows '--'")

    port = int(_number(pick(ns.port, "LAMBDALET_AGENT_PORT", "9000"), "--port/LAMBDALET_AGENT_PORT", int))
    api = pick(ns.runtime_api_address, "LAMBDALET_RUNTIME_API_ADDRESS", "127.0.0.1:0")
    api_host, sep, api_port_text = api.rpartition(":")
    if not sep or not api_host:
        raise SettingsError(f"--runtime-api-address/LAMBDALET_RUNTIME_API_ADDRESS={api!r} is not HOST:PORT")
    api_port = int(_number(api_port_text, "--runtime-api-address", int))
    timeout = _number(pick(ns.timeout, "AWS_LAMBDA_FUNCTION_TIMEOUT", "3"), "--timeout", float)
    if not 0 < timeout <= 900:
        raise SettingsError(f"--timeout/AWS_LAMBDA_FUNCTION_TIMEOUT={timeout} must be in (0, 900] seconds")
    memory = int(_number(pick(ns.memory, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"), "--memory", int))
    if not 1 <= memory <= MAX_MEMORY_MB:
        raise SettingsError(f"--memory/AWS_LAMBDA_FUNCTION_MEMORY_SIZE={memory} must be 1-{MAX_MEMORY_MB} MB")
    concurrency = int(_number(pick(ns.max_concurrency, "AWS_LAMBDA_MAX_CONCURRENCY", "1"), "--max-concurrency", int))
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise SettingsError(f"--max-concurrency/AWS_LAMBDA_MAX_CONCURRENCY={concurrency} must be 1-{MAX_CONCURRENCY}")
    if concurrency > 1 and external:
        raise SettingsError("--external-runtime (LAMBDALET_EXTERNAL_RUNTIME) cannot be used with --max-concurrency > 1")
    initialization_type = "lambda-managed-instances" if concurrency > 1 else "on-demand"
    user_env: dict[str, str] = {}
    for item in ns.env:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SettingsError(f"--env {item!r} is not K=V")
        user_env[key] = value
    return Settings(
        code_dir=str(Path(pick(ns.code, "LAMBDA_TASK_ROOT", "/var/task")).absolute()),
        handler=handler,
        runtime=runtime,
        command=command,
        host=pick(ns.host, "LAMBDALET_BIND_ADDRESS", "127.0.0.1"),
        port=port,
        port_file=ns.port_file,
        runtime_api_host=api_host,
        runtime_api_port=api_port,
        timeout_s=timeout,
        memory_mb=memory,
        function_name=pick(ns.function_name, "AWS_LAMBDA_FUNCTION_NAME", "function"),
        function_version=pick(ns.function_version, "AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        initialization_type=pick(ns.initialization_type, "AWS_LAMBDA_INITIALIZATION_TYPE", initialization_type),
        region=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        user_env=user_env,
        external_runtime=external,
        max_concurrency=concurrency,
    )
