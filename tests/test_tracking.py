"""MLflow experiments and metric names as tasks/infra/tracking.py defines them, on a throwaway sqlite store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tasks.infra.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    LOCATION_COLUMNS,
    NOTE_TAG,
    RESULTS_VIEW,
    eval_metric,
    eval_metrics,
    is_rate,
    mlflow_experiment_id,
    relocate_artifacts,
    results_view,
    results_view_query,
    shown,
    tracking_uri,
)


@pytest.fixture
def client(tmp_path: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_new_experiment_opens_on_its_training_runs_and_says_what_it_holds(client: Any, tmp_path: Path) -> None:
    # MLflow 3's UI opens an experiment without a kind on its GenAI overview.
    assert (EXPERIMENT_KIND_TAG, EXPERIMENT_KIND) == ("mlflow.experimentKind", "custom_model_development")
    exp_id = mlflow_experiment_id(client, "rain-x", "Training runs of x", tmp_path)
    experiment = client.get_experiment(exp_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert experiment.tags[NOTE_TAG] == "Training runs of x"  # the experiment page's description
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "rain-x").resolve().as_uri()
    assert mlflow_experiment_id(client, "rain-x", "Training runs of x", tmp_path) == exp_id  # found, not made again


def test_an_existing_experiment_gets_the_tags_it_lacks_and_keeps_its_own_description(client: Any,
                                                                                     tmp_path: Path) -> None:
    bare = client.create_experiment("rain-old")  # as an older version of the pipeline made it
    assert mlflow_experiment_id(client, "rain-old", "What it holds", tmp_path) == bare
    tags = client.get_experiment(bare).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND and tags[NOTE_TAG] == "What it holds"

    edited = client.create_experiment("rain-edited", tags={NOTE_TAG: "written by a person in the UI"})
    mlflow_experiment_id(client, "rain-edited", "What it holds", tmp_path)
    tags = client.get_experiment(edited).tags
    assert tags[NOTE_TAG] == "written by a person in the UI" and tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_a_process_that_loses_the_race_to_create_the_experiment_goes_on_in_the_winners(
        client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clones starting a grid at once on a team server both find no experiment and both create it; the store
    refuses the second name (RESOURCE_ALREADY_EXISTS), and that process must log into the one the other made."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    winner = MlflowClient(client.tracking_uri)
    won: list[str] = []
    look_up = client.get_experiment_by_name

    def too_late(name: str) -> Any:  # the other process creates it between this one's look-up and its create
        if not won:
            won.append(mlflow_experiment_id(winner, name, "What it holds", tmp_path, views=results_view(now_ms=1)))
            return None
        return look_up(name)

    create = client.create_experiment
    refused: list[str] = []

    def create_seen(*args: Any, **kwargs: Any) -> Any:
        try:
            return create(*args, **kwargs)
        except MlflowException as exc:
            refused.append(exc.error_code)
            raise

    monkeypatch.setattr(client, "get_experiment_by_name", too_late)
    monkeypatch.setattr(client, "create_experiment", create_seen)
    assert mlflow_experiment_id(client, "rain-race", "What it holds", tmp_path, views=results_view(now_ms=2)) == won[0]
    assert refused == ["RESOURCE_ALREADY_EXISTS"]  # the race really was lost, not avoided
    assert [e.name for e in client.search_experiments()].count("rain-race") == 1
    tags = client.get_experiment(won[0]).tags
    assert json.loads(tags[f"mlflow.sharedViewState.{RESULTS_VIEW}"])["createdAt"] == 1  # the winner's, kept


def test_an_experiment_that_cannot_be_created_fails_with_the_stores_reason(client: Any, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused create with no experiment of that name afterwards is not a lost race: the store's error stands."""
    from mlflow.exceptions import MlflowException

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise MlflowException("the store is read-only", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(client, "create_experiment", refuse)
    with pytest.raises(MlflowException, match="the store is read-only"):
        mlflow_experiment_id(client, "rain-refused", "What it holds", tmp_path)


def test_evaluation_figures_and_their_std_go_to_sections_of_their_own() -> None:
    assert eval_metric("lr", "rank1") == "eval/lr_rank1" and eval_metric("r8", "mAP") == "eval/r8_mAP"
    assert eval_metric("lr", "rank1_std") == "eval_std/lr_rank1"
    rows = {"lr": {"row": "lr", "label": "LR queries", "rank1": 0.5, "rank1_std": 0.1, "mAP": 0.3, "mAP_std": 0.0}}
    assert eval_metrics(rows) == {"eval/lr_rank1": 50.0, "eval_std/lr_rank1": 10.0, "eval/lr_mAP": 30.0,
                                  "eval_std/lr_mAP": 0.0}  # in percent, as MLflow shows every rate


def test_every_rate_mlflow_shows_is_in_percent_and_nothing_else_is_scaled() -> None:
    # Names as the stages log them: evaluation, CMC, validation (per retrieval feature too), the game, a grid's rows.
    rates = ["eval/lr_rank1", "eval_std/lr_rank1", "eval/r8_mAP", "eval/hr_rank20", "cmc/lr", "val/lr_rank1",
             "val/best_lr_rank1", "val/lr_mAP", "val/lr_rank1_bnneck", "val/probe_accuracy", "game/D4_accuracy_HR",
             "eval/multi_level.lr_rank1", "lr_rank1", "lr_rank1_std"]
    others = ["train/L_cls", "epoch/L_D", "epoch/images_per_second", "val/best_epoch", "val/centroid_gap",
              "game/collapsed", "game/w_adv", "game/feature_spread", "game/grad_f5_ratio", "time/train_seconds",
              "system/cpu_utilization_percentage"]
    assert [k for k in rates if not is_rate(k)] == [] and [k for k in others if is_rate(k)] == []
    assert shown("eval/lr_rank1", 0.377) == pytest.approx(37.7) and shown("train/L_cls", 0.377) == 0.377
    assert str(shown("eval/lr_mAP", 0.608565)) == "60.8565"  # no float noise for the runs list to print


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _locations(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return [value for table, column in LOCATION_COLUMNS
                for (value,) in con.execute(f"SELECT {column} FROM {table}") if value and value.startswith("file:")]


def _train_like_the_stages(project: Path, picture: Path, run_id: str | None = None) -> tuple[str, str]:
    """What train, evaluate and register write to the project's store: a run (or `run_id`'s) with a picture, a
    logged model with a file, and a model version of it; returns (run id, model id)."""
    import os

    import mlflow
    from mlflow.tracking._tracking_service import utils

    # Each stage is a process of its own: without MLflow's tracking URI (set_tracking_uri sets the variable) and
    # without its per-process cache of each run's artifact location.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    utils._artifact_repos_cache.clear()
    mlflow.set_tracking_uri(tracking_uri(project))  # as register does: a version of a logged model reads it there
    client = mlflow.MlflowClient()
    experiment = mlflow_experiment_id(client, "rain-x", "Training runs of x", project)
    run_id = run_id or client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(picture), artifact_path="evaluation")
    model = client.create_logged_model(experiment, name="rain-reid-x-trial0", source_run_id=run_id)
    client.log_model_artifacts(model.model_id, str(picture.parent))
    if not client.search_registered_models(filter_string="name = 'rain-reid'"):
        client.create_registered_model("rain-reid")
    client.create_model_version("rain-reid", f"models:/{model.model_id}", run_id=run_id)
    return run_id, model.model_id


def test_a_copied_project_keeps_its_own_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow records absolute file: locations: a copy of a project that had run read the first folder's artifacts
    and trained into it. Once the copy opens its store, every location is its own, and a training in the copy
    (new run, pictures added to an earlier run, logged model, model version) writes nothing in the original."""
    import shutil

    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)  # set_tracking_uri below: undone after
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "cmc.png").write_bytes(b"a picture")
    original = tmp_path / "original"
    original.mkdir()
    first_run, _ = _train_like_the_stages(original, pictures / "cmc.png")
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    before, recorded = _files(original), _locations(original / "mlflow.db")
    assert all(loc.startswith(original.resolve().as_uri() + "/mlartifacts/") for loc in recorded)

    (pictures / "cmc.png").write_bytes(b"a new picture")
    new_run, new_model = _train_like_the_stages(copy, pictures / "cmc.png")
    _train_like_the_stages(copy, pictures / "cmc.png", run_id=first_run)  # evaluate again, on the first run

    assert _files(original) == before  # nothing new, nothing rewritten in the original
    assert _locations(original / "mlflow.db") == recorded
    own = copy.resolve().as_uri() + "/mlartifacts/"
    assert recorded and all(loc.startswith(own) for loc in _locations(copy / "mlflow.db"))
    client = MlflowClient(tracking_uri(copy))
    for run_id in (first_run, new_run):  # what the copy's UI shows: its own files
        local = Path(client.download_artifacts(run_id, "evaluation/cmc.png", str(tmp_path / run_id)))
        assert local.read_bytes() == b"a new picture"
    assert client.get_logged_model(new_model).artifact_location.startswith(own)
    assert relocate_artifacts(copy / "mlflow.db", copy / "mlartifacts") == 0  # done once


def test_the_experiment_holds_a_saved_view_of_its_runs_figures_as_mlflows_ui_reads_one(client: Any,
                                                                                        tmp_path: Path) -> None:
    """MLflow's runs list shows no metric column until a user picks one; a saved view (an experiment tag, as the
    UI's "Save as new view" writes it) lists the evaluation figures, best LR rank-1 first, and the experiment link
    opens it. The envelope passes the UI's own check (a string name, a number createdAt, a string state)."""
    import json

    exp_id = mlflow_experiment_id(client, "rain-x", "x", tmp_path, views=results_view(now_ms=5))
    tags = client.get_experiment(exp_id).tags
    envelope = json.loads(tags[f"mlflow.sharedViewState.{RESULTS_VIEW}"])
    assert isinstance(envelope["name"], str) and envelope["createdAt"] == 5 and isinstance(envelope["state"], str)
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`eval/lr_rank1`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:3] == ["metrics.`eval/lr_rank1`", "metrics.`eval_std/lr_rank1`",
                                            "metrics.`eval/lr_rank5`"]
    assert state["columnOrder"][:2] == ["attributes.`Run Name`", "metrics.`eval/lr_rank1`"]  # figures first
    assert results_view_query(tags) == "viewStateShareKey=rain-results"
    assert results_view_query({}) == ""  # an experiment without it (older) gets no address the UI would refuse
    edited = json.dumps({**envelope, "name": "mine"})
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{RESULTS_VIEW}", edited)
    mlflow_experiment_id(client, "rain-x", "x", tmp_path, views=results_view())
    assert client.get_experiment(exp_id).tags[f"mlflow.sharedViewState.{RESULTS_VIEW}"] == edited  # a user's kept


# Each process imports MLflow first (seconds), says so, and opens the store when every one has: at the same moment.
_OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
project, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
from mlflow import MlflowClient
import mlflow.store.model_registry.sqlalchemy_store, mlflow.store.tracking.sqlalchemy_store
from tasks.infra.tracking import mlflow_experiment_id, tracking_uri
ready.touch()
while not go.exists():
    time.sleep(0.01)
client = MlflowClient(tracking_uri(project))
print(mlflow_experiment_id(client, "rain-race", "two at once", project))
client.search_registered_models()
"""


def test_processes_opening_a_fresh_store_at_once_all_get_it(tmp_path: Path) -> None:
    """Before: each ran MLflow's migrations on the new mlflow.db and all but one died (`duplicate column name: step`,
    or alembic's `expected to match one row`), as two grid runs started together on a fresh project did."""
    import os
    import subprocess
    import sys
    import time

    from tests.micro_project import REPO

    project = tmp_path / "project"
    project.mkdir()
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(project), str(tmp_path / f"ready{i}"),
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(3)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    assert all(code == 0 for _, _, code in results), [err[-2000:] for _, err, _ in results]
    assert len({out.strip() for out, _, _ in results}) == 1  # one experiment, the same id for each
