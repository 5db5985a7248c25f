"""Shared test set-up: quiet, local, loopback-only settings for every framework the stages touch."""

from __future__ import annotations

import atexit
import os
import sys
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

_verdict: list[int] = []  # the session's exit status, once pytest has reported it


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _verdict.append(int(exitstatus))


@atexit.register  # registered before Ray, Prefect and MLflow import: runs after their exit handlers
def _exit_with_the_verdict() -> None:
    """End the process once every Python exit handler has run, without the interpreter's teardown of
    native libraries: Ray's core-worker threads outlive `ray.shutdown()`, and one CI run that had
    passed every test died in that teardown (SIGSEGV, exit 139). The verdict is pytest's, unchanged;
    PYTHONFAULTHANDLER (Makefile) prints the threads of any crash that comes before this."""
    if _verdict:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_verdict[-1])


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
