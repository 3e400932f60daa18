"""``lambdalet up`` as a user runs it, with the examples: the curl from the README, then
``lambdalet invoke``, ``ls``, ``logs``, and the Prometheus metrics; stopped with SIGINT, no agent left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_support import EXAMPLES, LAMBDALET, free_port, lambdalet_up, ready, wait_for


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with lambdalet_up(EXAMPLES) as url:
        yield url


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAMBDALET, *args], capture_output=True, text=True, timeout=60, check=False)


def test_readme_curl(endpoint: str) -> None:
    request = urllib.request.Request(
        endpoint + "/2015-03-31/functions/hello/invocations", data=b'{"name":"x"}', method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read()) == {"message": "Hello, x!"}


def test_invoke_ls_logs(endpoint: str) -> None:
    out = run("invoke", "hello", "--payload", '{"name": "cli"}', "--log-tail", "--endpoint", endpoint)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"message": "Hello, cli!"}
    assert "REPORT RequestId:" in out.stderr

    listing = run("ls", "--endpoint", endpoint)
    assert listing.returncode == 0
    names = [line.split()[0] for line in listing.stdout.splitlines()[1:]]
    assert {"hello", "http-echo", "slow"} <= set(names)

    logs = run("logs", "hello", "--endpoint", endpoint)
    assert logs.returncode == 0
    assert "greeting cli" in logs.stdout
    assert "START RequestId:" in logs.stdout
    assert "END RequestId:" in logs.stdout

    missing = run("invoke", "nope", "--endpoint", endpoint)
    assert missing.returncode == 1
    assert "ResourceNotFoundException" in missing.stderr


def test_payload_from_file(endpoint: str, tmp_path: Path) -> None:
    payload = tmp_path / "event.json"
    payload.write_text('{"name": "file"}')
    out = run("invoke", "hello", "--payload", f"@{payload}", "--endpoint", endpoint)
    assert json.loads(out.stdout) == {"message": "Hello, file!"}


def test_metrics(endpoint: str) -> None:
    run("invoke", "hello", "--endpoint", endpoint)
    with urllib.request.urlopen(endpoint + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'lambdalet_invocations_total{function="hello",outcome="success"}' in text
    assert 'lambdalet_cold_starts_total{function="hello"} 1.0' in text
    assert 'lambdalet_billed_gb_seconds_total{function="hello"}' in text
    assert 'lambdalet_environments{function="hello",state="idle"} 1.0' in text
    assert 'lambdalet_invocation_duration_seconds_count{function="hello"}' in text
    with urllib.request.urlopen(endpoint + "/healthz", timeout=10) as response:
        assert response.status == 200


def test_logs_follow(endpoint: str) -> None:
    follower = subprocess.Popen(
        [LAMBDALET, "logs", "hello", "-f", "--endpoint", endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert run("invoke", "hello", "--payload", '{"name": "followed"}', "--endpoint", endpoint).returncode == 0
        assert follower.stdout is not None
        for line in follower.stdout:
            if "greeting followed" in line:
                break
    finally:
        follower.terminate()
        follower.communicate(timeout=10)


def test_gateway_module_entrypoint(tmp_path: Path) -> None:
    port = free_port()
    env = os.environ | {"LAMBDALET_BIND_ADDRESS": "127.0.0.1", "LAMBDALET_GATEWAY_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lambdalet_gateway", str(EXAMPLES / "hello")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(url), timeout=60, what="python -m lambdalet_gateway")
        request = urllib.request.Request(url + "/2015-03-31/functions/hello/invocations", data=b'{"name":"m"}')
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read()) == {"message": "Hello, m!"}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    bad = subprocess.run(
        [sys.executable, "-m", "lambdalet_gateway"],
        env=os.environ | {"LAMBDALET_CONCURRENCY_LIMIT": "lots"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "LAMBDALET_CONCURRENCY_LIMIT" in bad.stderr
