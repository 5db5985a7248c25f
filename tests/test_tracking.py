"""MLflow experiments and metric names as tasks/infra/tracking.py defines them, on a throwaway sqlite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.infra.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    eval_metric,
    eval_metrics,
    mlflow_experiment_id,
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


def test_evaluation_figures_and_their_std_go_to_sections_of_their_own() -> None:
    assert eval_metric("lr", "rank1") == "eval/lr_rank1" and eval_metric("r8", "mAP") == "eval/r8_mAP"
    assert eval_metric("lr", "rank1_std") == "eval_std/lr_rank1"
    rows = {"lr": {"row": "lr", "label": "LR queries", "rank1": 0.5, "rank1_std": 0.1, "mAP": 0.3, "mAP_std": 0.0}}
    assert eval_metrics(rows) == {"eval/lr_rank1": 0.5, "eval_std/lr_rank1": 0.1, "eval/lr_mAP": 0.3,
                                  "eval_std/lr_mAP": 0.0}
