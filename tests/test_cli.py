"""The `rain` command: help everywhere, bad params refused before any stage, serving rain/full and
rain-grid/experiments."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.micro_project import MICRO, make_project, write_params


@pytest.mark.parametrize("command", [[], ["run"], ["serve"], ["team"], ["team", "up"], ["team", "down"],
                                     ["team", "status"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_run_refuses_a_mistyped_params_key_before_any_stage(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    write_params(project, {"train": {"epohcs": 2}})
    result = CliRunner().invoke(app, ["run", "--project", str(project)])
    assert result.exit_code == 2
    assert "unknown key 'train.epohcs'" in result.output
    assert not (project / "data").exists() and not (project / "dvc.lock").exists()


def test_experiments_refuses_an_unknown_table_naming_the_known_ones(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    result = CliRunner().invoke(app, ["experiments", "--project", str(project), "--table", "table9"])
    assert result.exit_code == 2
    assert "unknown table(s) ['table9']" in result.output and "figure5" in result.output
    assert not (project / "data").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.e2e
def test_served_deployment_runs_from_a_second_terminal(tmp_path: Path) -> None:
    """Terminal 1: `rain serve`; terminal 2: `prefect deployment run rain/full`, then rain-grid/experiments (one
    table); both runs complete."""
    project = make_project(tmp_path)
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    bin_dir = Path(sys.executable).parent
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(bin_dir / "rain"), "serve", "--project", str(project), "--port", str(port)],
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client_env = dict(env, PREFECT_API_URL=f"http://127.0.0.1:{port}/api", COLUMNS="250")
    try:
        deadline = time.monotonic() + 240
        while True:  # the deployment exists once `rain serve` has registered it
            ls = subprocess.run([str(bin_dir / "prefect"), "deployment", "ls"], env=client_env,
                                capture_output=True, text=True)
            if "rain/full" in ls.stdout and "rain-grid/experiments" in ls.stdout:
                break
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "rain serve did not register rain/full in time"
            time.sleep(3)
        # The UI's pages ask this port's API, not the default 4200's.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=30) as answer:
            assert json.load(answer)["api_url"] == f"http://127.0.0.1:{port}/api"
        run = subprocess.run([str(bin_dir / "prefect"), "deployment", "run", "rain/full", "--watch",
                              "--watch-timeout", "600"], env=client_env, capture_output=True, text=True,
                             timeout=660)
        assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "serve.log").read_text()[-6000:]
        runs = subprocess.run([str(bin_dir / "prefect"), "flow-run", "ls"], env=client_env, capture_output=True,
                              text=True)
        assert "COMPLETED" in runs.stdout.upper(), runs.stdout
        assert (project / "reports/synthetic/registration.json").exists()
        grid = subprocess.run([str(bin_dir / "prefect"), "deployment", "run", "rain-grid/experiments", "--param",
                               'tables=["table4"]', "--watch", "--watch-timeout", "600"], env=client_env,
                              capture_output=True, text=True, timeout=660)
        assert grid.returncode == 0, grid.stdout + grid.stderr + (tmp_path / "serve.log").read_text()[-6000:]
        assert "### Table 4" in (project / "experiments/synthetic/results.md").read_text()
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        exposed = [line for line in listening.splitlines() if f":{port} " in line and "127.0.0.1" not in line]
        assert not exposed, exposed
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def test_run_refuses_the_raw_folder_spelt_absolute_as_paths_lr_and_deletes_nothing(tmp_path: Path) -> None:
    # Issue 28, item 2: accepted, and `rain run` emptied data/raw/ before synthesize failed.
    project = make_project(tmp_path)
    image = project / "data" / "raw" / "synthetic" / "0001_c1_00.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"raw data")
    write_params(project, {**MICRO, "paths": {"lr": str(project / "data" / "raw")}})
    result = CliRunner().invoke(app, ["run", "--project", str(project)])
    assert result.exit_code == 2, result.output
    assert "paths.lr" in result.output and "the same folder as paths.raw = 'data/raw'" in result.output
    assert image.read_bytes() == b"raw data" and not (project / "dvc.lock").exists()
