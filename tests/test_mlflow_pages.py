"""What the MLflow pages of a registered model show, built without a run: the logged model's name and
description, and the model version's description, each leading with the LR queries' figures."""

from __future__ import annotations

import pytest

from tasks.config import load_params
from tasks.register import figures_line, logged_model_name, model_description, version_description
from tests.micro_project import REPO

LR = {"rank1": 0.377333, "rank1_std": 0.012, "rank5": 0.8, "rank10": 0.922, "rank20": 0.98, "mAP": 0.466}
METRICS = {"rows": {"lr": LR}, "trials": 1, "gallery_draws": 10}
TABLE = "| Method |     Rank 1 |\n|:-------|-----------:|\n| LR     | 37.7 ± 1.2 |"


def test_the_logged_model_is_named_for_its_model_dataset_and_trial_as_mlflow_allows() -> None:
    from mlflow.utils.validation import _validate_logged_model_name

    params = load_params(REPO / "params.yaml")
    name = logged_model_name(params, "0")
    assert name == f"{params.register.model_name}-{params.dataset.name}-trial0" != "model"
    _validate_logged_model_name(name)  # MLflow's own check (no / : . % or quotes)


def test_figures_read_in_percent_headline_first() -> None:
    assert figures_line(LR) == ("LR queries: rank-1 37.7% (std 1.2), rank-5 80.0%, rank-10 92.2%, rank-20 98.0%, "
                                "mAP 46.6%")


@pytest.mark.parametrize("describe", ["logged model", "model version"])
def test_a_models_description_starts_with_its_figures(describe: str) -> None:
    params = load_params(REPO / "params.yaml")
    text = (model_description(params, "0", "run1", METRICS, TABLE) if describe == "logged model"
            else version_description(params, "0", "run1", LR))
    first = text.splitlines()[0]
    assert first.lstrip("*").startswith(figures_line(LR)), first
    assert "run1" in text
    if describe == "logged model":
        assert "mean of 1 trial x 10 gallery draws" in first
        assert f"```\n{TABLE}\n```" in text  # every query set's figures, as the run description shows them
