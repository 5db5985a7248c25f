"""One micro project trained and registered by the real pipeline (`dvc repro`), shared by every test module
that uses a registered model (registry, search, serving): training it is most of their cost.

Its evaluation uses the cosine distance and a single gallery draw, so evaluate's LR rank-1 is computed
on exactly one query/gallery set with the ranking that unit-norm embeddings give: the figure a search
over the same images must reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.micro_project import dvc, make_project

MODEL = "rain-reid"
OVERRIDES: dict[str, Any] = {"evaluate": {"distance": "cosine", "gallery_repeats": 1}}

_projects: dict[str, Path] = {}


def trained_project(factory: pytest.TempPathFactory) -> Path:
    """The session's trained project (built by the first caller, ~1 minute on 2 cores)."""
    if "project" not in _projects:
        project = make_project(factory.mktemp("trained"), OVERRIDES)
        dvc(project, "repro")
        _projects["project"] = project
    return _projects["project"]


def tracking(project: Path) -> str:
    return f"sqlite:///{project / 'mlflow.db'}"


def ensure_champion(project: Path) -> str:
    """Version number of `champion`, promoting the first registered version through the gate if none."""
    from mlflow import MlflowClient

    from tasks.registry.promote import PromoteRequest, host_lock_path, promote

    client = MlflowClient(tracking(project))
    aliases = client.get_registered_model(MODEL).aliases
    if "champion" not in aliases:
        decision = promote(client, PromoteRequest(model_name=MODEL, version="1"),
                           host_lock_path(tracking(project), project))
        assert decision.accepted, decision
        aliases = client.get_registered_model(MODEL).aliases
    return str(aliases["champion"])
