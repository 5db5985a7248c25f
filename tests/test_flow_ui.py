"""What the flows show in the Prefect UI without running: the grid deployment's form (typed parameters with
help, the table names it accepts) and where the links to MLflow point."""

from __future__ import annotations

import typing

import pytest

from flows.grid import TableKey, experiments
from flows.links import grid_label, mlflow_ui, model_version_url, run_url
from tasks.config import load_params
from tasks.grid.tables import TABLES
from tests.micro_project import REPO


def test_the_grid_form_offers_exactly_the_grid_tables() -> None:
    assert typing.get_args(TableKey) == tuple(t.key for t in TABLES)
    schema = experiments.parameters.model_dump()["properties"]
    (listed,) = [option for option in schema["tables"]["anyOf"] if option.get("type") == "array"]
    assert listed["items"]["enum"] == [t.key for t in TABLES]


def test_every_grid_parameter_has_help_and_a_type() -> None:
    schema = experiments.parameters.model_dump()["properties"]
    assert set(schema) == {"project_dir", "dataset", "seeds", "tables"}
    for name, prop in schema.items():
        assert prop.get("description"), name
        assert "type" in prop or "anyOf" in prop, name


def test_grid_runs_are_named_by_dataset_epochs_and_seeds() -> None:
    params = load_params(REPO / "params.yaml")
    name, tags = grid_label(params, (0, 1, 2))
    assert name == f"experiments-synthetic-{params.experiments.epochs}ep-seeds0,1,2"
    assert "seeds:0,1,2" in tags and "dataset:synthetic" in tags


@pytest.mark.parametrize(("tracking", "env", "ui"), [
    ("https://mlflow.example.org/", None, "https://mlflow.example.org"),  # a team server is its own UI
    ("sqlite:////srv/rain/mlflow.db", None, "http://127.0.0.1:5000"),  # `mlflow ui` as README starts it
    ("sqlite:////srv/rain/mlflow.db", "http://10.0.0.5:8080/", "http://10.0.0.5:8080"),
])
def test_links_point_at_the_mlflow_ui_that_shows_the_store(monkeypatch: pytest.MonkeyPatch, tracking: str,
                                                            env: str | None, ui: str) -> None:
    if env is None:
        monkeypatch.delenv("RAIN_MLFLOW_UI", raising=False)
    else:
        monkeypatch.setenv("RAIN_MLFLOW_UI", env)
    assert mlflow_ui(tracking) == ui
    assert run_url(ui, "3", "abc") == f"{ui}/#/experiments/3/runs/abc"
    assert model_version_url(ui, "rain reid", 7) == f"{ui}/#/models/rain%20reid/versions/7"
