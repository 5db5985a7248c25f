"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): the train stage joins the cluster by
address, places one worker on each node, and completes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks import train
from tests.micro_project import micro_params, prepare_data

pytestmark = [pytest.mark.e2e, pytest.mark.heavy]


@pytest.fixture()
def two_nodes() -> Iterator[str]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # both nodes on loopback
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster.address
    from tasks.infra.raycluster import disconnect

    disconnect()
    cluster.shutdown()


def test_workers_are_placed_on_both_nodes(two_nodes: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    params = micro_params({"ray": {"address": two_nodes, "num_workers": 2, "cpus_per_worker": 1}})
    mlr = prepare_data(tmp_path, params)
    summary = train.run(params, mlr, params.store_dir(), tmp_path / "models", tmp_path / "runs")
    assert summary["trials"]["0"]["ray_nodes"] == 2
    assert summary["trials"]["0"]["workers"] == 2
    assert (tmp_path / "models" / "trial-0.safetensors").stat().st_size > 0
