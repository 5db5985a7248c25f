"""A tracking server, tracking database or Prefect server that is down, never answers or refuses the credentials:
each `rain` command that needs it ends with one line naming the URI (its password hidden), within the stated
timeout (tasks/infra/tracking.py SERVICE_TIMEOUT_S), before anything is written (issue 29, item 4). The refused
credentials of a real PostgreSQL: tests/test_team_e2e.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.infra.tracking import SERVICE_TIMEOUT_S, redact
from tests.micro_project import MICRO, write_params
from tests.test_one_line_errors import one_line_error, own_tracking_uri  # noqa: F401 (an autouse fixture)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server, or a firewall's black hole)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, MICRO)
    return project


def _invoke(project: Path, args: list[str], env: dict[str, str]) -> tuple[str, float]:
    start = time.monotonic()
    result = CliRunner().invoke(app, [*args, "--project", str(project)], env=env)
    return one_line_error(result), time.monotonic() - start


@pytest.mark.parametrize("command", [["run"], ["promote", "--list"]])
def test_a_tracking_server_that_is_down_is_one_line_and_nothing_is_written(project: Path, command: list[str]
                                                                          ) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    line, seconds = _invoke(project, command, {"MLFLOW_TRACKING_URI": uri})
    assert line.startswith(f"error: MLFLOW_TRACKING_URI={uri}: the tracking server does not answer"), line
    assert seconds < SERVICE_TIMEOUT_S + 60  # no hang (MLflow alone retries for minutes); slack for a busy CI
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml"]  # no store, no stage output, no log


def test_a_tracking_server_that_never_answers_is_one_line_after_the_timeout(project: Path, silent_server: int
                                                                           ) -> None:
    uri = f"http://127.0.0.1:{silent_server}"
    line, seconds = _invoke(project, ["run"], {"MLFLOW_TRACKING_URI": uri})
    assert line == (f"error: MLFLOW_TRACKING_URI={uri}: the tracking server gave no answer within "
                    f"{SERVICE_TIMEOUT_S:g} s; nothing was run"), line
    assert SERVICE_TIMEOUT_S - 1 < seconds < SERVICE_TIMEOUT_S + 60


def test_a_prefect_server_that_is_down_is_one_line(project: Path) -> None:
    api = f"http://127.0.0.1:{_closed_port()}/api"
    line, _ = _invoke(project, ["run"], {"PREFECT_API_URL": api})
    assert line.startswith(f"error: PREFECT_API_URL={api}: the Prefect server does not answer"), line


def test_a_tracking_database_that_is_down_is_one_line_without_its_password(project: Path) -> None:
    uri = f"postgresql://rain:s3cret@127.0.0.1:{_closed_port()}/mlflow"
    line, _ = _invoke(project, ["promote", "--list"], {"MLFLOW_TRACKING_URI": uri})
    assert line.startswith(f"error: MLFLOW_TRACKING_URI={redact(uri)}: the tracking database refuses or does not "
                           "answer: "), line
    assert "s3cret" not in line and "rain:***@" in line


def test_redact_hides_only_the_password() -> None:
    assert redact("postgresql://u:p@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
