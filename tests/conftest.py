"""Shared test set-up: quiet, local, loopback-only settings for every framework the stages touch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.infra.environment import set_quiet_local_defaults

# Before any test imports Prefect, Ray, DVC or MLflow.
set_quiet_local_defaults()
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def prefect_server(prefect_home: Path) -> Iterator[None]:
    """A temporary Prefect server for the whole session (slow to start on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def champion_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's trained micro project (tests/trained_project.py) with a `champion` version."""
    from tests.trained_project import ensure_champion, trained_project

    project = trained_project(tmp_path_factory)
    ensure_champion(project)
    return project
