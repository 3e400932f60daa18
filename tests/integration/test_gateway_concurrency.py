"""Concurrency caps, proven from the function's side: every invocation records when it ran, and the
number running at once never exceeds reservedConcurrency (or the platform's limit); the rest get 429
TooManyRequestsException with Lambda's Reason."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway_support import RunningGateway, running_gateway, write_function

RECORDER = """
import json, os, time

def handler(event, context):
    start = time.time()
    time.sleep(float(event["seconds"]))
    end = time.time()
    with open(os.path.join(os.environ["RECORD_DIR"], context.aws_request_id), "w") as f:
        json.dump([start, end], f)
    return {"ok": True}
"""


def max_overlap(record_dir: Path) -> int:
    edges: list[tuple[float, int]] = []
    for file in record_dir.iterdir():
        start, end = json.loads(file.read_text())
        edges += [(start, 1), (end, -1)]
    running = peak = 0
    for _, delta in sorted(edges, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    return peak


def burst(gateway: RunningGateway, name: str, count: int, seconds: float) -> list[tuple[int, dict[str, str], bytes]]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: gateway.invoke(name, {"seconds": seconds}), range(count)))


def check(replies: list[tuple[int, dict[str, str], bytes]], record_dir: Path, cap: int, reason: str) -> None:
    ok = [r for r in replies if r[0] == 200]
    throttled = [r for r in replies if r[0] == 429]
    assert len(ok) + len(throttled) == len(replies), [r[0] for r in replies]
    assert len(ok) >= 2
    assert throttled, "nothing was throttled"
    for _, headers, body in throttled:
        assert headers["x-amzn-ErrorType"] == "TooManyRequestsException"
        assert headers["Retry-After"] == "1"
        assert json.loads(body)["Reason"] == reason
    assert len(list(record_dir.iterdir())) == len(ok)
    assert 2 <= max_overlap(record_dir) <= cap


def test_reserved_concurrency_caps_fifty_concurrent_invocations(tmp_path: Path) -> None:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_function(
        manifests,
        "slow",
        {"app.py": RECORDER},
        reservedConcurrency=10,
        timeoutSeconds=30,
        environment={"variables": {"RECORD_DIR": str(record_dir)}},
    )
    # a generous wait-queue timeout: ten agents start at once on a possibly busy machine
    with running_gateway([manifests], tmp_path, queue_timeout_s=100.0) as gateway:
        replies = burst(gateway, "slow", 50, 3.0)
        check(replies, record_dir, 10, "ReservedFunctionConcurrentInvocationLimitExceeded")
        assert len(gateway.agent_pids("slow")) <= 10


def test_platform_concurrency_limit(tmp_path: Path) -> None:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_function(
        manifests,
        "busy",
        {"app.py": RECORDER},
        timeoutSeconds=30,
        environment={"variables": {"RECORD_DIR": str(record_dir)}},
    )
    with running_gateway([manifests], tmp_path, concurrency_limit=4, queue_timeout_s=100.0) as gateway:
        replies = burst(gateway, "busy", 16, 3.0)
        check(replies, record_dir, 4, "ConcurrentInvocationLimitExceeded")
