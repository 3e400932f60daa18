"""Fixtures for the cluster tier: `cluster` (session) and `namespace` (per test).

A cluster that cannot be built, started or reached fails the tests that need it; nothing is skipped.
See cluster_support.py for the Cluster API and for LAMBDALET_TEST_CLUSTER=existing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cluster_support import Cluster, ClusterUnavailable, start_cluster


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    try:
        return start_cluster(os.environ)
    except ClusterUnavailable as error:
        pytest.fail(f"the test cluster is unavailable: {error}", pytrace=False)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, deleted (without waiting) afterwards."""
    name = cluster.create_namespace(request.node.name.removeprefix("test_")[:30])
    yield name
    cluster.delete_namespace(name)
