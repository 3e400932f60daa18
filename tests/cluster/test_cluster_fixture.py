"""The `cluster` fixture itself: LAMBDALET_TEST_CLUSTER=existing uses the cluster KUBECONFIG names and
starts nothing; a cluster that cannot be reached fails the run instead of skipping it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_support import ROOT, Cluster, ClusterUnavailable, start_cluster

HERE = Path(__file__).resolve().parent


def run_pytest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def test_existing_mode_uses_the_kubeconfig_it_is_given(cluster: Cluster, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "elsewhere.kubeconfig"
    shutil.copy(cluster.kubeconfig, kubeconfig)

    found = start_cluster({"LAMBDALET_TEST_CLUSTER": "existing", "KUBECONFIG": str(kubeconfig)})

    assert found.kubeconfig == kubeconfig
    assert found.local is False
    assert found.get("namespace", "default")["metadata"]["name"] == "default"


def test_cluster_tests_pass_in_existing_mode(cluster: Cluster, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "elsewhere.kubeconfig"
    shutil.copy(cluster.kubeconfig, kubeconfig)
    env = {**os.environ, "LAMBDALET_TEST_CLUSTER": "existing", "KUBECONFIG": str(kubeconfig)}

    result = run_pytest(
        env, str(HERE / "test_cluster_node.py"), str(HERE / "test_cluster_auth.py"), "-k", "forbidden or ready"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_unreachable_cluster_fails_instead_of_skipping(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["LAMBDALET_TEST_CLUSTER"] = "existing"

    result = run_pytest(env, str(HERE / "test_cluster_node.py"), "-k", "ready")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "the test cluster is unavailable" in result.stdout
    assert "KUBECONFIG" in result.stdout
    assert "skipped" not in result.stdout


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LAMBDALET_TEST_CLUSTER": "existing"}, "needs KUBECONFIG"),
        ({"LAMBDALET_TEST_CLUSTER": "existing", "KUBECONFIG": "/nonexistent/kubeconfig"}, "needs KUBECONFIG"),
        ({"LAMBDALET_TEST_CLUSTER": "kind"}, "must be 'local' or 'existing'"),
    ],
)
def test_bad_settings_name_the_problem(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ClusterUnavailable, match=message):
        start_cluster(environ)
