"""Gateway settings from an injected environment: defaults, parsing, and errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from lambdalet_gateway.settings import Settings, SettingsError


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.backend, settings.concurrency_limit) == (
        "127.0.0.1",
        8080,
        "local",
        1000,
    )
    assert settings.cpu_limits is False


def test_environment() -> None:
    settings = Settings.from_env(
        {
            "LAMBDALET_BIND_ADDRESS": "127.0.0.7",
            "LAMBDALET_GATEWAY_PORT": "9090",
            "LAMBDALET_CONCURRENCY_LIMIT": "5",
            "LAMBDALET_MANIFESTS": "a:b/c",
            "LAMBDALET_QUEUE_TIMEOUT_SECONDS": "2.5",
            "LAMBDALET_CPU_LIMITS": "true",
        }
    )
    assert settings.host == "127.0.0.7"
    assert settings.port == 9090
    assert settings.concurrency_limit == 5
    assert settings.manifests == (Path("a"), Path("b/c"))
    assert settings.queue_timeout_s == 2.5
    assert settings.cpu_limits is True
    assert settings.with_overrides(port=1, host=None).port == 1
    assert settings.with_overrides(port=1, host=None).host == "127.0.0.7"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LAMBDALET_GATEWAY_PORT", "http"),
        ("LAMBDALET_CONCURRENCY_LIMIT", "0"),
        ("LAMBDALET_QUEUE_TIMEOUT_SECONDS", "-1"),
        ("LAMBDALET_CPU_LIMITS", "maybe"),
        ("LAMBDALET_EVENT_LOOP", "trio"),
        ("LAMBDALET_KUBE_PROBE_AGENTS", "sometimes"),
    ],
)
def test_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_the_event_loop_is_uvloop_where_installed_unless_opted_out() -> None:
    assert Settings.from_env({}).event_loop == "auto"
    assert Settings.from_env({"LAMBDALET_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
