"""Agent settings from flags, then environment, then defaults; runtime discovery from runtime.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from lambdalet_agent import runtimes
from lambdalet_agent.settings import SettingsError, from_args

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    s = from_args(["--handler", "app.handler"], {})
    assert (s.code_dir, s.runtime, s.host, s.port, s.timeout_s, s.memory_mb) == (
        "/var/task",
        "python3.12",
        "127.0.0.1",
        9000,
        3.0,
        128,
    )
    assert (s.runtime_api_host, s.runtime_api_port) == ("127.0.0.1", 0)
    assert (s.function_name, s.function_version, s.initialization_type) == ("function", "$LATEST", "on-demand")
    assert s.function_arn == "arn:aws:lambda:us-east-1:012345678912:function:function"


def test_environment_is_the_fallback_and_flags_win() -> None:
    environ = {
        "LAMBDA_TASK_ROOT": "/code",
        "_HANDLER": "env.handler",
        "LAMBDALET_RUNTIME": "nodejs22.x",
        "LAMBDALET_BIND_ADDRESS": "0.0.0.0",
        "LAMBDALET_AGENT_PORT": "8080",
        "LAMBDALET_RUNTIME_API_ADDRESS": "127.0.0.1:9001",
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "30",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1024",
        "AWS_LAMBDA_FUNCTION_NAME": "orders",
        "AWS_REGION": "eu-west-1",
    }
    s = from_args([], environ)
    assert (s.code_dir, s.handler, s.runtime, s.host, s.port) == ("/code", "env.handler", "nodejs22.x", "0.0.0.0", 8080)
    assert (s.runtime_api_port, s.timeout_s, s.memory_mb, s.function_name) == (9001, 30.0, 1024, "orders")
    assert s.function_arn == "arn:aws:lambda:eu-west-1:012345678912:function:orders"
    s = from_args(["--handler", "flag.handler", "--port", "0", "--memory", "256", "--timeout", "2"], environ)
    assert (s.handler, s.port, s.memory_mb, s.timeout_s) == ("flag.handler", 0, 256, 2.0)


def test_command_after_double_dash_and_handler_from_its_last_argument() -> None:
    s = from_args(["--code", "/c", "--", "python", "-m", "awslambdaric", "app.handler"], {})
    assert s.command == ("python", "-m", "awslambdaric", "app.handler")
    assert s.handler == "app.handler"
    assert s.runtime is None
    assert s.code_dir == "/c"


def test_env_flags_are_user_variables() -> None:
    s = from_args(["--handler", "a.b", "--env", "A=1", "--env", "B=x=y"], {})
    assert dict(s.user_env) == {"A": "1", "B": "x=y"}


@pytest.mark.parametrize(
    ("argv", "environ", "fragment"),
    [
        ([], {}, "--handler"),
        (["--handler", "a.b", "--timeout", "0"], {}, "--timeout"),
        (["--handler", "a.b"], {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "lots"}, "not a number"),
        (["--handler", "a.b", "--memory", "20000"], {}, "--memory"),
        (["--handler", "a.b", "--env", "NOEQUALS"], {}, "K=V"),
        (["--handler", "a.b", "--runtime-api-address", "9001"], {}, "HOST:PORT"),
        (["--handler", "a.b", "--"], {}, "'--'"),
    ],
)
def test_invalid_settings_name_the_flag_or_variable(argv: list[str], environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment.replace("-", r"\-")):
        from_args(argv, environ)


def test_python_runtimes_are_discovered_from_runtime_json() -> None:
    found = runtimes.discover(REPO / "runtime-images")
    for runtime_id in ("python3.11", "python3.12", "python3.13"):
        assert found[runtime_id].command == (sys.executable, str(REPO / "runtime-images" / "python" / "bootstrap.py"))
    assert runtimes.resolve("python3.12", "/code", {}) == [
        sys.executable,
        str(REPO / "runtime-images" / "python" / "bootstrap.py"),
    ]


def test_runtimes_dir_from_environment_and_placeholders(tmp_path: Path) -> None:
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "runtime.json").write_text(
        json.dumps({"runtimes": ["fake1.x"], "command": ["{python}", "{dir}/boot", "{code}/x"], "requires": []})
    )
    assert runtimes.resolve("fake1.x", "/code", {"LAMBDALET_RUNTIMES_DIR": str(tmp_path)}) == [
        sys.executable,
        f"{tmp_path}/fake/boot",
        "/code/x",
    ]
    with pytest.raises(runtimes.RuntimeNotFound, match="unknown runtime 'nope'"):
        runtimes.resolve("nope", "/code", {"LAMBDALET_RUNTIMES_DIR": str(tmp_path)})


def test_missing_required_program_is_reported(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "runtime.json").write_text(
        json.dumps({"runtimes": ["x1"], "command": ["x"], "requires": ["program-that-is-not-installed"]})
    )
    with pytest.raises(runtimes.RuntimeNotFound, match="program-that-is-not-installed"):
        runtimes.resolve("x1", "/code", {"LAMBDALET_RUNTIMES_DIR": str(tmp_path)})


def test_provided_runs_the_code_bootstrap(tmp_path: Path) -> None:
    with pytest.raises(runtimes.InvalidEntrypoint):
        runtimes.resolve("provided.al2023", str(tmp_path), {})
    bootstrap = tmp_path / "bootstrap"
    bootstrap.write_text("#!/bin/sh\n")
    with pytest.raises(runtimes.InvalidEntrypoint):  # not executable
        runtimes.resolve("provided.al2", str(tmp_path), {})
    os.chmod(bootstrap, 0o755)
    assert runtimes.resolve("provided.al2023", str(tmp_path), {}) == [str(bootstrap)]
