"""The node stand-in's pure parts (tests/cluster/tools/node.py): image table, $(VAR) expansion, quantities,
path rewriting, and its list+watch loop against a scripted API (resume from the last resourceVersion,
list again on 410 Gone, skip bookmarks)."""

from __future__ import annotations

import asyncio
import decimal
import importlib.util
import json
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

NODE_PY = Path(__file__).resolve().parents[1] / "cluster" / "tools" / "node.py"


def load_node() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lambdalet_test_node", NODE_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


node = load_node()


@pytest.mark.parametrize(
    ("reference", "repository"),
    [
        ("ghcr.io/lambdalet/agent:0.1.0", "ghcr.io/lambdalet/agent"),
        ("ghcr.io/lambdalet/python3.12", "ghcr.io/lambdalet/python3.12"),
        ("ghcr.io/lambdalet/gateway:0.1.0@sha256:0123abcd", "ghcr.io/lambdalet/gateway"),
        ("localhost:5000/team/app", "localhost:5000/team/app"),
        ("localhost:5000/team/app:v2", "localhost:5000/team/app"),
    ],
)
def test_image_repository_drops_tag_and_digest(reference: str, repository: str) -> None:
    assert node.image_repository(reference) == repository


def test_every_project_image_has_a_local_command() -> None:
    components = ["agent", "gateway", "operator", *node.RUNTIMES]
    for component in components:
        assert node.resolve_image(f"ghcr.io/lambdalet/{component}:0.1.0") is not None, component
    runtime = node.resolve_image("ghcr.io/lambdalet/nodejs22.x:0.1.0")
    assert runtime.entrypoint == ("lambdalet", "agent")
    assert ("LAMBDALET_RUNTIME", "nodejs22.x") in runtime.env
    assert node.resolve_image("ghcr.io/lambdalet/operator:0.1.0").entrypoint[:2] == ("kopf", "run")
    assert node.resolve_image("docker.io/library/nginx:1.27") is None


def test_expand_replaces_defined_variables_only() -> None:
    env = {"A": "1", "B": "two"}
    assert node.expand("$(A)-$(B)", env) == "1-two"
    assert node.expand("$$(A) $(MISSING) $$", env) == "$(A) $(MISSING) $"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", "0.5"),
        ("2", "2"),
        ("128Mi", "134217728"),
        ("1G", "1000000000"),
        ("1e3", "1000"),
        ("1.5Gi", "1610612736"),
    ],
)
def test_parse_quantity(text: str, value: str) -> None:
    assert node.parse_quantity(text) == decimal.Decimal(value)


def test_parse_quantity_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="quantity"):
        node.parse_quantity("12 apples")


def test_rewrite_path_maps_values_under_a_mount_path_to_its_directory() -> None:
    mounts = [
        node.Mount(Path("/state/code"), "/var/task", True),
        node.Mount(Path("/state/lib"), "/var/task/lib", True),
    ]
    assert node.rewrite_path("/var/task", mounts) == "/state/code"
    assert node.rewrite_path("/var/task/app.py", mounts) == "/state/code/app.py"
    assert node.rewrite_path("/var/task/lib/x.so", mounts) == "/state/lib/x.so"
    assert node.rewrite_path("/var/taskforce", mounts) == "/var/taskforce"
    assert node.rewrite_path("app.handler", mounts) == "app.handler"


# ---------------------------------------------------------------------------------------------- list+watch


def pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": version}}


class FakeApi:
    """Lists and watch streams scripted per call; records the resourceVersion each watch asked for."""

    def __init__(self) -> None:
        self.lists = [
            {"metadata": {"resourceVersion": "10"}, "items": []},
            {"metadata": {"resourceVersion": "20"}, "items": [pod("b", "19")]},
        ]
        self.watches: list[list[dict[str, Any]]] = [
            [{"type": "ADDED", "object": pod("a", "11")}, {"type": "BOOKMARK", "object": pod("", "12")}],
            [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}],
            [{"type": "DELETED", "object": pod("a", "21")}],
        ]
        self.watched_versions: list[str] = []
        self.list_count = 0
        self.finished = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.query["fieldSelector"] == "spec.nodeName=n"
        if request.query.get("watch") != "true":
            self.list_count += 1
            return web.json_response(self.lists.pop(0))
        self.watched_versions.append(request.query["resourceVersion"])
        response = web.StreamResponse()
        await response.prepare(request)
        if not self.watches:
            self.finished.set()
            await asyncio.sleep(3600)
        for event in self.watches.pop(0):
            await response.write(json.dumps(event).encode() + b"\n")
        return response  # the server ends the stream: the client must resume


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeApi, str]]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_get("/api/v1/pods", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_follow_resumes_after_disconnects_and_lists_again_on_410(fake_api: tuple[FakeApi, str]) -> None:
    fake, url = fake_api
    api = node.Api(url, ssl.create_default_context())
    listed: list[list[str]] = []
    events: list[tuple[str, str]] = []

    task = asyncio.create_task(
        node.follow(
            api,
            "/api/v1/pods",
            {"fieldSelector": "spec.nodeName=n"},
            lambda items: listed.append([i["metadata"]["name"] for i in items]),
            lambda kind, obj: events.append((kind, obj["metadata"]["name"])),
            retry_delay=0.01,
        )
    )
    try:
        await asyncio.wait_for(fake.finished.wait(), 10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await api.close()

    # 10: from the first list; 12: the bookmark seen before the stream ended; 410 -> list again -> 20;
    # 21: the DELETED event of the third stream.
    assert fake.watched_versions == ["10", "12", "20", "21"]
    assert fake.list_count == 2
    assert listed == [[], ["b"]]
    assert events == [("ADDED", "a"), ("DELETED", "a")]
