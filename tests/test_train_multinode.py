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

    from tasks.infra.raycluster import disconnect

    # A process still connected to the session's embedded cluster (an earlier test's ray_local) would train there:
    # connect() is a no-op while connected.
    disconnect()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster.address
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


def test_an_embedded_cluster_is_its_own_not_the_last_one_started_on_the_machine(two_nodes: str) -> None:
    """With no address, ray.init would join the last cluster `ray start` (here ray.cluster_utils) started on this
    machine, someone else's that may stop at any time: the stages start their own."""
    import subprocess
    import sys

    from tests.micro_project import REPO

    code = ("import os, ray\nfrom tasks.infra.raycluster import connect\nconnect(None)\n"
            "print(ray.get_runtime_context().gcs_address)\nos._exit(0)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    address = out.stdout.strip().splitlines()[-1]
    assert address and address != two_nodes, (address, two_nodes)
