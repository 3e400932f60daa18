"""``perEnvironmentConcurrency`` through ``lambdalet up``, proven from the function's side.

A barrier handler records its arrival and then waits, bounded, until as many invocations as the event
names have arrived (it fails otherwise), then until the test lets it go. Four invocations of a function
with ``perEnvironmentConcurrency: 4`` pass the barrier of four inside ONE environment (they report the
same Runtime API address, one per agent, and ``lambdalet ls`` shows one busy environment); a fifth starts
a second environment; with ``reservedConcurrency: 4`` the fifth is throttled instead.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from gateway_support import LAMBDALET, lambdalet_up, wait_for, write_function

BARRIER = """
import os, time

def handler(event, context):
    arrived = os.path.join(event["dir"], "arrived")
    open(os.path.join(arrived, context.aws_request_id), "w").close()
    deadline = time.monotonic() + 30
    while len(os.listdir(arrived)) < event["parties"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(os.listdir(arrived))} of {event['parties']} arrived together")
        time.sleep(0.02)
    while not os.path.exists(os.path.join(event["dir"], "release")):
        if time.monotonic() > deadline:
            raise RuntimeError("never released")
        time.sleep(0.02)
    return {"environment": os.environ["AWS_LAMBDA_RUNTIME_API"], "pid": os.getpid()}
"""


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    manifests = tmp_path_factory.mktemp("manifests")
    write_function(manifests, "gather", {"app.py": BARRIER}, perEnvironmentConcurrency=4, timeoutSeconds=60)
    write_function(
        manifests, "capped", {"app.py": BARRIER}, perEnvironmentConcurrency=4, reservedConcurrency=4, timeoutSeconds=60
    )
    with lambdalet_up(manifests) as url:
        yield url


def invoke(url: str, name: str, event: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/2015-03-31/functions/{name}/invocations", data=json.dumps(event).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=90) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def barrier(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    (directory / "arrived").mkdir(parents=True)
    return directory


def arrived(directory: Path) -> int:
    return len(list((directory / "arrived").iterdir()))


def ls(url: str) -> dict[str, dict[str, str]]:
    """``lambdalet ls`` as a user reads it: each function's row, by column name."""
    out = subprocess.run([LAMBDALET, "ls", "--endpoint", url], capture_output=True, text=True, timeout=60, check=True)
    header, *rows = out.stdout.splitlines()
    columns = header.split()
    return {row.split()[0]: dict(zip(columns, row.split(), strict=True)) for row in rows}


def test_four_invocations_share_one_environment_and_a_fifth_starts_another(endpoint: str, tmp_path: Path) -> None:
    four = barrier(tmp_path, "four")
    fifth = barrier(tmp_path, "fifth")
    with ThreadPoolExecutor(max_workers=5) as pool:
        together = [pool.submit(invoke, endpoint, "gather", {"dir": str(four), "parties": 4}) for _ in range(4)]
        wait_for(lambda: arrived(four) == 4, timeout=60, what="four invocations inside")
        row = ls(endpoint)["gather"]
        assert (row["IDLE"], row["BUSY"], row["STARTING"]) == ("0", "1", "0")
        late: Future[tuple[int, dict[str, str], dict[str, Any]]] = pool.submit(
            invoke, endpoint, "gather", {"dir": str(fifth), "parties": 1}
        )
        wait_for(lambda: arrived(fifth) == 1, timeout=60, what="the fifth invocation inside")
        row = ls(endpoint)["gather"]
        assert (row["IDLE"], row["BUSY"]) == ("0", "2")
        (four / "release").touch()
        (fifth / "release").touch()
        replies = [f.result() for f in together]
        last = late.result()
    assert [status for status, _, _ in replies] == [200] * 4, replies
    shared = {body["environment"] for _, _, body in replies}
    assert len(shared) == 1, shared
    # served overlapped by the environment's four runtime workers
    assert len({body["pid"] for _, _, body in replies}) == 4
    assert last[0] == 200, last
    assert last[2]["environment"] not in shared
    wait_for(lambda: ls(endpoint)["gather"]["BUSY"] == "0", timeout=30, what="both environments idle")
    assert ls(endpoint)["gather"]["IDLE"] == "2"


def test_reserved_concurrency_four_with_four_per_environment_throttles_the_fifth(endpoint: str, tmp_path: Path) -> None:
    four = barrier(tmp_path, "capped")
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = [pool.submit(invoke, endpoint, "capped", {"dir": str(four), "parties": 4}) for _ in range(4)]
        wait_for(lambda: arrived(four) == 4, timeout=60, what="four invocations inside")
        status, headers, body = invoke(endpoint, "capped", {"dir": str(four), "parties": 1})
        (four / "release").touch()
        replies = [f.result() for f in together]
    assert status == 429
    assert headers["x-amzn-ErrorType"] == "TooManyRequestsException"
    assert body["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert [s for s, _, _ in replies] == [200] * 4
    assert len({b["environment"] for _, _, b in replies}) == 1
    assert ls(endpoint)["capped"]["IDLE"] == "1"
