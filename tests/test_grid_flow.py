"""End to end: the grid flow (deployment `rain-grid/experiments`) on a micro configuration, killed half-way and
started again, shares its runs with `dvc repro grid/dvc.yaml` both ways and nests them in MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tasks.grid import cluster as grid_cluster
from tasks.grid import configs as grid
from tests.micro_project import dvc, make_project
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


def _results(project: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted((project / "experiments/synthetic/runs").glob("*/seed-*/result.json"))}


def _grid_processes(project: Path) -> list[int]:
    """Live Ray workers training a grid run of `project` (titled `ray::grid_run`, working in the project)."""
    title = f"ray::{grid_cluster.TASK_NAME}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and os.readlink(proc / "cwd") == str(project)
                    and (proc / "cmdline").read_bytes().split(b"\0")[0].strip() == title):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.heavy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grid_killed_half_way_runs_only_the_missing_configurations(tmp_path: Path, prefect_server: None) -> None:
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from flows.grid import experiments

    project = make_project(tmp_path)
    total = len(grid.CONFIGS)  # one seed in the micro configuration
    # DVC trains one configuration first (data stages upstream included): the flow must take it as done.
    dvc(project, "repro", "grid/dvc.yaml:grid_run@multi_level-0")
    assert len(_results(project)) == 1

    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    first_log = tmp_path / "first.log"
    with first_log.open("wb") as log:
        first = subprocess.Popen([str(Path(sys.executable).parent / "rain"), "experiments", "-C", str(project)],
                                 env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: len(_results(project)) >= 5 and bool(_grid_processes(project)),
                   progress=lambda: (len(_results(project)), len(_grid_processes(project))), what="the grid flow",
                   failed=lambda: None if first.poll() is None else first_log.read_text()[-3000:])
        os.kill(first.pid, signal.SIGKILL)  # the flow process only: its Ray runs must die with it
        first.wait()
        deadline = time.monotonic() + 60
        while _grid_processes(project):
            assert time.monotonic() < deadline, "grid runs outlived the killed flow by 60 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL) if first.poll() is None else None
    done = _results(project)
    assert 5 <= len(done) < total

    result = experiments(project_dir=str(project))

    assert (result["grid"]["ran"], result["grid"]["reused"], result["grid"]["failed"]) == (total - len(done),
                                                                                           len(done), [])
    after = _results(project)
    assert len(after) == total
    assert all(after[path] == content for path, content in done.items())  # finished runs were not trained again

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rain-synthetic-experiments")
    assert exp is not None
    nested = client.search_runs([exp.experiment_id], max_results=200,
                                filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert {r.info.run_id for r in nested} == {json.loads(c)["mlflow_run_id"] for c in after.values()}
    assert {r.data.tags["config"] for r in nested} == set(grid.CONFIGS)

    out = project / "experiments/synthetic"
    assert "### Figure 5" in (out / "results.md").read_text()
    assert (out / "label_fraction.png").stat().st_size > 0 and (out / "rate_bars.png").stat().st_size > 0
    grid_log = [json.loads(line) for line in (out / "grid_runs.jsonl").read_text().splitlines()]
    assert grid_log[-1]["ran"] == total - len(done)
    # The flow recorded its runs in grid/dvc.lock: DVC has nothing left to do.
    assert "up to date" in dvc(project, "status", "grid/dvc.yaml")


@pytest.mark.slow
def test_dvc_alone_runs_the_whole_grid_then_nothing(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project = make_project(tmp_path)
    out = dvc(project, "repro", "grid/dvc.yaml")
    assert out.count("Running stage 'grid/dvc.yaml:grid_run@") == len(grid.CONFIGS)
    assert "Running stage 'grid/dvc.yaml:grid_report'" in out
    summary = json.loads((project / "experiments/synthetic/results.json").read_text())
    assert "### Figure 5" in (project / "experiments/synthetic/results.md").read_text()

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rain-synthetic-experiments")
    assert exp is not None
    nested = client.search_runs([exp.experiment_id], max_results=200,
                                filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(nested) == len(grid.CONFIGS)
    again = dvc(project, "repro", "grid/dvc.yaml")
    assert re.findall(r"Running stage '([^']+)'", again) == ["fingerprint"], again  # it always runs, and reads
    # the dataset's source files again (tasks/fingerprint.py); nothing else


def test_a_failed_run_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch, prefect_server: None) -> None:
    from prefect import flow, task

    import flows.grid as module
    from tests.micro_project import micro_params

    waited: list[str] = []

    @task
    def fake_run(config: str, seed: int, run: str) -> dict[str, Any]:
        waited.append(run)
        if config == "no_tri":
            raise RuntimeError("boom")
        return {"config": config, "seed": seed, "node_id": f"node-{len(waited) % 2}", "host": "here", "seconds": 1.0}

    monkeypatch.setattr(module, "grid_run", fake_run)
    monkeypatch.setattr(grid_cluster, "cluster", lambda address: contextlib.nullcontext())
    monkeypatch.setattr(grid_cluster, "submit", lambda params, config, seed, root, parent: f"ray-task-{config}-{seed}")
    todo = [("multi_level", 0), ("no_tri", 0), ("no_cls", 0), ("no_rec", 0), ("rates_2", 0)]

    @flow
    def grid_of_five() -> tuple[list[str], dict[tuple[str, int], dict[str, Any]]]:
        return module._run_all(todo, Path("."), "parent", micro_params())

    failed, outcomes = grid_of_five()
    assert failed == ["no_tri seed 0"]
    assert set(outcomes) == set(todo) - {("no_tri", 0)}
    assert sorted(waited) == sorted(f"ray-task-{c}-{s}" for c, s in todo)  # every queued run got its Prefect task
