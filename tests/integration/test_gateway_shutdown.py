"""The local backend's shutdown: an agent whose start is still in progress when the gateway closes is
ended with the others, so nothing is left running (a start that finished after close() used to leave its
agent behind, e.g. during a burst at shutdown)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from gateway_support import agent_pids, process_tree
from lambdalet_gateway.backend import StartError
from lambdalet_gateway.local import LocalBackend
from lambdalet_gateway.logs import LogStore
from lambdalet_gateway.settings import Settings

from lambdalet.spec import Function

SLOW_INIT = "import time\ntime.sleep(2)\n\ndef handler(event, context):\n    return event\n"


def function(name: str) -> Function:
    return Function.model_validate(
        {
            "apiVersion": "lambdalet.dev/v1alpha1",
            "kind": "Function",
            "metadata": {"name": name},
            "spec": {
                "runtime": "python3.12",
                "handler": "app.handler",
                "code": {"inline": {"files": {"app.py": SLOW_INIT}}},
            },
        }
    )


@pytest.mark.parametrize("fast_start", [True, False], ids=["forked", "spawned"])
async def test_close_ends_agents_whose_start_is_in_progress(tmp_path: Path, fast_start: bool) -> None:
    state_dir = tmp_path / "state"
    settings = Settings(state_dir=state_dir, fast_start=fast_start)
    backend = LocalBackend(settings, LogStore(), lambda env: None)
    # provisioned: the start waits for the runtime's (slow) init, so it is still in progress at close()
    starts = [asyncio.create_task(backend.start(function(f"fn{i}"), provisioned=True)) for i in range(3)]
    try:
        for _ in range(200):
            if len(agent_pids(state_dir)) >= 3:
                break
            await asyncio.sleep(0.05)
        started = agent_pids(state_dir)
        assert len(started) >= 3, "three agents are starting"
        tree = process_tree(started)
    finally:
        await backend.close()
    results = await asyncio.gather(*starts, return_exceptions=True)
    assert all(isinstance(r, (StartError, asyncio.CancelledError)) for r in results), results
    assert process_tree(tree | agent_pids(state_dir)) == set(), "no agent or runtime outlives close()"
    with pytest.raises(StartError, match="shutting down"):
        await backend.start(function("late"), provisioned=False)
