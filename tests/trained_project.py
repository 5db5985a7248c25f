"""What the session's trained micro project is (conftest.py's `pipeline_run`: one run of the Prefect flow `rain`,
every DVC stage, Ray Train with two DDP workers, MLflow tracking and registry) and helpers for the tests that
read it (tests/test_pipeline_e2e.py, test_registry.py, test_search.py, test_serving.py).

Its evaluation uses the cosine distance and a single gallery draw, so evaluate's LR rank-1 is computed
on exactly one query/gallery set with the ranking that unit-norm embeddings give: the figure a search
over the same images must reproduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL = "rain-reid"
OVERRIDES: dict[str, Any] = {"evaluate": {"distance": "cosine", "gallery_repeats": 1}}


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
