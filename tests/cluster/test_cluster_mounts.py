"""The node stand-in's container mounts (tests/cluster/tools/node.py `launch_argv`), run for real in a
mount namespace: a volume mounted over a directory that holds another volume's source, or this checkout,
must not hide them — the case of a /tmp emptyDir when the checkout or the cluster state lives under /tmp."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

NODE_PY = Path(__file__).resolve().parent / "tools" / "node.py"


def load_node() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lambdalet_test_node_mounts", NODE_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(node: ModuleType, command: list[str], mounts: list[object]) -> subprocess.CompletedProcess[str]:
    argv = node.launch_argv(command, mounts, "/", "mounts-test")
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_a_volume_over_the_parent_of_other_sources_hides_nothing(tmp_path: Path) -> None:
    node = load_node()
    assert node.NAMESPACES_WORK, "the node stand-in needs mount namespaces (unshare) on this machine"
    empty_dir = tmp_path / "empty"
    config = tmp_path / "config"
    empty_dir.mkdir()
    config.mkdir()
    (config / "key").write_text("value\n")
    mounts = [
        node.Mount(empty_dir, str(tmp_path), False),  # covers the config volume's source
        node.Mount(config, str(tmp_path / "etc"), True),
    ]
    result = run(node, ["/bin/cat", str(tmp_path / "etc" / "key")], mounts)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "value\n"
    assert not list(Path(node.STAGE_DIR).glob("*/*")), "the staging bind leaked onto the host"


def test_a_volume_over_the_checkout_leaves_the_interpreter_reachable(tmp_path: Path) -> None:
    node = load_node()
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    mounts = [node.Mount(empty_dir, str(node.ROOT.parent), False)]
    result = run(node, [sys.executable, "-c", "print('alive')"], mounts)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "alive\n"
