"""Shared test set-up: quiet, local, loopback-only settings for every framework the stages touch."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.infra.environment import set_quiet_local_defaults

# Before any test imports Prefect, Ray, DVC or MLflow.
set_quiet_local_defaults()
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("RAY_ADDRESS", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The cores are shared out by processes (make test runs one per core): a second OpenMP thread per process, and
    # per stage subprocess it starts, only spins against the other process (a GPU-check test took 7x its time).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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
    """A temporary Prefect server for the whole session (per xdist process: each has its own PREFECT_HOME).
    The start-up bound is generous: it only stops a server that never comes up, not a slow one on a busy machine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):
        yield


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One embedded Ray cluster for every test of this process that trains in-process on one machine."""
    from tasks.infra.raycluster import disconnect

    yield
    disconnect()


@pytest.fixture
def ray_local(ray_cluster: None) -> None:
    """This process connected to the session's embedded cluster (started again if a multi-node test, which needs
    a cluster of its own, shut it down)."""
    from tasks.infra.raycluster import connect

    connect(None)  # a no-op while connected


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, prefect_server: None) -> tuple[Path, dict[str, Any]]:
    """(project, the flow's result) of the session's one run of the Prefect flow `rain` on the trained micro
    project (tests/trained_project.py). The tests using it share one xdist process (`pytest_collection_modifyitems`
    below), which builds it once and runs them in file order."""
    from flows.pipeline import rain
    from tests.micro_project import make_project
    from tests.trained_project import OVERRIDES

    project = make_project(tmp_path_factory.mktemp("trained"), OVERRIDES)
    return project, rain(project_dir=str(project))


@pytest.fixture(scope="session")
def trained_project(pipeline_run: tuple[Path, dict[str, Any]]) -> Path:
    return pipeline_run[0]


@pytest.fixture(scope="session")
def champion_project(trained_project: Path) -> Path:
    """The trained micro project with a `champion` version."""
    from tests.trained_project import ensure_champion

    ensure_champion(trained_project)
    return trained_project


@pytest.fixture
def mlflow_global(trained_project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at the trained project for one test, then put it back: some client
    calls resolve `models:/m-...` sources through it, not the client's. `set_tracking_uri` also sets
    MLFLOW_TRACKING_URI, which every later test of the process would otherwise log to."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    from tests.trained_project import tracking

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking(trained_project))
    mlflow.set_tracking_uri(tracking(trained_project))
    yield


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the session's trained project run in one xdist process (`--dist loadgroup`), so it is built
    once; derived from the fixtures each test uses, not kept by hand."""
    for item in items:
        if "pipeline_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("pipeline_run"))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `--dist loadgroup`, xdist groups a test by a suffix it writes into the test's node id through a private
    attribute; pytest 9.2 renamed that attribute and every group then silently became no group (the trained project
    built in both processes). Stop at once if it happens again (constraints.txt pins pytest 9.1.1)."""
    if session.config.getoption("loadgroup", default=False):
        ungrouped = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not group {ungrouped[0]} (and {len(ungrouped) - 1} more): "
                                    "this pytest and pytest-xdist do not work together; see constraints.txt")
