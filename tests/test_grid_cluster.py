"""The experiment grid on a two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node): runs spread
over both nodes, a run whose worker is killed mid-training runs again and finishes, a run that raises fails
with its own exception, and the results equal a one-machine run of the same configurations and seeds."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks import grid_run
from tasks.config import Params, ParamsError
from tasks.grid import cluster as grid_cluster
from tasks.grid import runs
from tasks.training.loop import FaultPlan
from tests.micro_project import micro_params, prepare_data

pytestmark = [pytest.mark.e2e, pytest.mark.heavy]

RUNS = [("multi_level", 0), ("baseline_hr", 0)]  # both train on the pipeline's MLR manifest (train_rates None)


@pytest.fixture()
def two_nodes() -> Iterator[list[str]]:
    """Two one-CPU nodes, this process connected as the driver; yields the node ids."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # both nodes on loopback
    import ray
    from ray.cluster_utils import Cluster

    from tasks.infra.raycluster import disconnect

    disconnect()  # an earlier test's embedded cluster would take the grid's runs
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    finally:
        disconnect()
        cluster.shutdown()


def test_grid_runs_spread_over_nodes_survive_a_lost_worker_and_match_one_machine(
        two_nodes: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tasks.grid_report import open_parent_run

    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    params = micro_params({"ray": {"max_failures": 1}})
    prepare_data(project, params)
    parent = open_parent_run(params)  # as the flow does: the MLflow database exists before runs go out

    # Two one-CPU runs queued at once: Ray places one on each node.
    refs = {run: grid_cluster.submit(params, *run, project, parent) for run in RUNS}
    outcomes = {run: grid_cluster.outcome(ref) for run, ref in refs.items()}
    assert sorted(o["node_id"] for o in outcomes.values()) == sorted(two_nodes)
    on_cluster = {run: json.loads(runs.result_path(params, *run).read_text()) for run in RUNS}
    assert all(result["key"] == runs.current_key(params, *run) for run, result in on_cluster.items())
    written = json.dumps(list(on_cluster.values()))
    assert not any(node in written for node in two_nodes)  # results stay comparable across machines

    # A run whose worker is killed at step 1 (os._exit) runs again on a fresh worker and finishes; a run that
    # raises fails with its own exception.
    again = _elsewhere(params, "retried")
    marker = tmp_path / "worker-lost"
    retried = grid_cluster.outcome(grid_cluster.submit(again, *RUNS[0], project, parent,
                                                       fault=FaultPlan(rank=0, step=1, marker=str(marker))))
    assert marker.exists() and retried["config"] == RUNS[0][0]
    assert json.loads(runs.result_path(again, *RUNS[0]).read_text())["rows"] == on_cluster[RUNS[0]]["rows"]
    with pytest.raises(ParamsError, match="'no_such'"):
        grid_cluster.outcome(grid_cluster.submit(params, "no_such", 0, project, parent))

    # One machine: the same runs in this process, as `python -m tasks.grid_run` does (cpus_per_run threads).
    local = _elsewhere(params, "one-machine")
    threads = torch.get_num_threads()
    torch.set_num_threads(params.experiments.cpus_per_run)
    try:
        here = {run: grid_run.run(local, *run) for run in RUNS}
    finally:
        torch.set_num_threads(threads)
    for run in RUNS:
        assert here[run]["rows"] == on_cluster[run]["rows"], run  # every metric of every query set, exactly
        assert here[run]["final_losses"] == on_cluster[run]["final_losses"], run


def _elsewhere(params: Params, folder: str) -> Params:
    """The same params with the grid's results in another folder (run keys ignore paths)."""
    return dataclasses.replace(params, paths=dataclasses.replace(params.paths, experiments=folder))
