"""Two clones, one team (issue 29, item 2): `rain team up` starts PostgreSQL, an MLflow server and a Prefect server on
it; clone A runs the pipeline against them and pushes its data and models to the team's DVC remote; clone B, a
`git clone` of A, pulls and, without training, finds DVC up to date, sees A's MLflow runs, artifacts and model
version and A's Prefect flow run, and promotes the version through the gate. Then both clones start a grid at the same
moment: the runs of each land in the one experiment, and nothing already there is harmed. The tracking database
refusing a wrong password is one line (item 4). `rain team down` leaves no process behind.

Everything through the real command line, as two people would type it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.infra import team
from tests.micro_project import REPO, dvc, make_project
from tests.trained_project import MODEL, OVERRIDES

pytestmark = [pytest.mark.e2e, pytest.mark.heavy]

EXPERIMENT = "rain-synthetic"
GRID_EXPERIMENT = "rain-synthetic-experiments"  # tasks/grid/runs.py experiments_mlflow_name
# The pipeline's outputs DVC does not cache (dvc.yaml `cache: false`) under the git-ignored reports/: shared through
# git, as DVC means them to be, so a clone that pulls finds evaluate and register up to date.
UNCACHED = ("reports/synthetic/metrics.json", "reports/synthetic/cmc.csv", "reports/synthetic/registration.json")
WAIT = 900  # seconds for a service to start: only stops one that never comes up (the suite shares 2 cores)
GRID_WAIT = 1800  # seconds for the two grids run at once: only stops a hung one


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(GIT_AUTHOR_NAME="A", GIT_AUTHOR_EMAIL="a@example.invalid", GIT_COMMITTER_NAME="A",
               GIT_COMMITTER_EMAIL="a@example.invalid", COLUMNS="200", **extra)
    return env


def rain(*args: str, env: dict[str, str], timeout: float = 2400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def git(project: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def flow_runs(api_url: str, flow: str) -> list[dict[str, Any]]:
    """Every run of flow `flow` the team's Prefect server holds."""
    query = json.dumps({"flows": {"name": {"any_": [flow]}}}).encode()
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=query,
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        runs: list[dict[str, Any]] = json.load(answer)
    return runs


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[Path, dict[str, str]]]:
    """(team folder, what a teammate exports) while the team's services run; stopped after, whatever happened.

    The folder is not under pytest's temporary root: run as root, PostgreSQL runs as `nobody`, which must be able to
    enter every folder above its data, and each pytest session that starts resets that root to mode 700."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rain-team-"))
    base.chmod(0o755)
    team_dir = base / "services"
    try:
        up = rain("team", "up", "--dir", str(team_dir), "--wait", str(WAIT), env=_env(), timeout=WAIT + 60)
        assert up.returncode == 0, up.stdout + up.stderr
        exported = dict(re.findall(r"^\s+export (\w+)=(\S+)$", up.stdout, flags=re.M))
        assert set(exported) == {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}, up.stdout
        assert f"dvc remote add -d team {team_dir.resolve() / 'dvc-remote'}" in up.stdout
        yield team_dir, exported
    finally:
        down = rain("team", "down", "--dir", str(team_dir), env=_env(), timeout=200)
        assert down.returncode == 0 or "no team here" in down.stderr, down.stdout + down.stderr
        assert team.processes(team_dir) == []
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def clones(services: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(clone A, clone B): A ran the pipeline against the team's services, committed and pushed; B is a `git clone`
    of A that pulled A's data and models."""
    team_dir, exported = services
    teammate = _env(**exported)
    root = tmp_path_factory.mktemp("clones")

    # Clone A: the team's DVC remote in its committed config, then the pipeline against the team's servers.
    (root / "a").mkdir()
    a = make_project(root / "a", OVERRIDES)
    dvc(a, "remote", "add", "-d", "team", str(team_dir / "dvc-remote"))
    git(a, "add", "-A")
    git(a, "commit", "-qm", "project")
    ran = rain("run", "--project", str(a), env=teammate)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    # dvc.lock, and the outputs DVC does not cache (the register stage's record of the version it made: so that DVC
    # runs the stage rather than restoring an old record; evaluate's metrics and CMC table), through git.
    git(a, "add", "-A")
    git(a, "add", "-f", *UNCACHED)
    git(a, "commit", "-qm", "trained")
    dvc(a, "push")

    # Clone B: pulls what A pushed.
    b = root / "b"
    git(root, "clone", "-q", str(a), str(b))
    dvc(b, "pull", "dvc.yaml")  # the pipeline's stages: the grid's (grid/dvc.yaml) never ran, nothing to pull
    return a, b


def test_two_clones_share_runs_models_and_data_through_the_team_services(
        services: tuple[Path, dict[str, str]], clones: tuple[Path, Path], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    team_dir, exported = services
    config = team.load(team_dir)
    for address in (config.mlflow_uri, config.prefect_api_url):  # loopback only, as documented
        assert address.startswith("http://127.0.0.1:"), address
    teammate = _env(**exported)
    a, b = clones
    assert not (a / "mlflow.db").exists() and not (a / "mlartifacts").exists()  # nothing tracked locally

    # Clone B trains nothing, and DVC finds every stage up to date.
    dvc(b, "repro", "fingerprint")  # its outputs are not cached (so not pushed): it reads the dataset's sources
    status = dvc(b, "status", "dvc.yaml")
    assert set(re.findall(r"^(\w+):", status, flags=re.M)) <= {"fingerprint"}, status  # `always changed`, alone
    assert (b / "models/synthetic/train.json").stat().st_size > 0  # pulled, not trained

    # B sees A's runs and model version on the team's MLflow, and A's artifacts in the team's artifact root.
    client = MlflowClient(exported["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    candidate = client.get_model_version_by_alias(MODEL, "candidate")
    registration = json.loads((b / "reports/synthetic/registration.json").read_text())
    assert str(registration["version"]) == candidate.version  # the version A's pushed registration names
    picture = client.download_artifacts(candidate.run_id, "evaluation/cmc.png", str(tmp_path / "seen-by-b"))
    assert Path(picture).stat().st_size > 0
    assert list((team_dir / "artifacts").rglob("cmc.png"))  # stored once, in the team folder

    # ... and A's flow run on the team's Prefect server.
    pipeline_runs = flow_runs(exported["PREFECT_API_URL"], "rain")
    assert [r["state_type"] for r in pipeline_runs] == ["COMPLETED"], pipeline_runs

    # B promotes A's version through the gate.
    promoted = rain("promote", "--project", str(b), env=teammate, timeout=300)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == candidate.version

    # The team's database refusing a wrong password: one line naming the URI, the password hidden.
    wrong = f"postgresql://{team.DB_USER}:wrong-password@127.0.0.1:{config.postgres_port}/mlflow"
    refused = rain("promote", "--list", "--project", str(b), env=_env(MLFLOW_TRACKING_URI=wrong), timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and "password authentication failed" in line, refused.stderr
    assert line.startswith(f"error: MLFLOW_TRACKING_URI=postgresql://{team.DB_USER}:***@127.0.0.1:"), line
    assert "wrong-password" not in line


def test_a_grid_from_each_clone_at_once_lands_in_one_experiment_and_harms_nothing(
        services: tuple[Path, dict[str, str]], clones: tuple[Path, Path], tmp_path: Path) -> None:
    """Both teammates type `rain experiments` at the same moment. The grid's experiment does not exist yet, so both
    processes race to create it: one experiment holds each clone's runs, every run finished with its artifacts on
    the team's artifact root, both flow runs completed on the team's Prefect server, and the registry the pipeline
    filled (versions, aliases) reads as it did before."""
    from mlflow import MlflowClient

    _, exported = services
    teammate = _env(**exported)
    client = MlflowClient(exported["MLFLOW_TRACKING_URI"])
    assert client.get_experiment_by_name(GRID_EXPERIMENT) is None  # made by the grids below, by whichever wins
    versions_before = sorted((v.version, v.run_id, v.status) for v in client.search_model_versions(f"name='{MODEL}'"))
    aliases_before = client.get_registered_model(MODEL).aliases
    assert "candidate" in aliases_before, aliases_before
    pipeline = client.get_experiment_by_name(EXPERIMENT)
    assert pipeline is not None
    pipeline_runs_before = {r.info.run_id for r in client.search_runs([pipeline.experiment_id])}

    # A grid's results are each clone's own (none was pushed), so each clone trains what it is asked for whatever the
    # seed; the teammates split the seeds between them, as a team would, so each clone's run is known by its seed.
    # Table 2 reads one configuration: one run per clone, the smallest grid that trains.
    a, b = clones
    seeds = {a: 0, b: 1}
    logs = {clone: tmp_path / f"grid-{seed}.log" for clone, seed in seeds.items()}
    started: dict[Path, subprocess.Popen[bytes]] = {}
    try:
        for clone, seed in seeds.items():
            with logs[clone].open("wb") as log:
                started[clone] = subprocess.Popen(
                    [sys.executable, "-m", "flows.cli", "experiments", "--project", str(clone), "--table", "table2",
                     "--seed", str(seed)], env=teammate, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
        codes = {clone: proc.wait(timeout=GRID_WAIT) for clone, proc in started.items()}
    finally:
        for proc in started.values():  # a hung grid: its process group (its Ray cluster too) must not outlive it
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    outputs = {clone: logs[clone].read_text() for clone in seeds}
    assert codes == {a: 0, b: 0}, {str(clone): out[-6000:] for clone, out in outputs.items()}
    for out in outputs.values():
        assert "grid: 1 run(s) trained, 0 up to date" in out, out[-3000:]

    # One experiment, on the team's artifact root, holding each clone's parent run and the run nested under it.
    found = client.search_experiments(filter_string=f"name = '{GRID_EXPERIMENT}'")
    assert len(found) == 1, found
    experiment = found[0]
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    out_dir = Path("experiments/synthetic")
    parents = {clone: json.loads((clone / out_dir / "results.json").read_text())["parent_run_id"] for clone in seeds}
    nested = {clone: json.loads((clone / out_dir / f"runs/multi_level/seed-{seed}/result.json").read_text())
              ["mlflow_run_id"] for clone, seed in seeds.items()}
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=100)}
    assert set(runs) == {*parents.values(), *nested.values()}, sorted(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values()), {k: r.info.status for k, r in runs.items()}
    for clone, seed in seeds.items():
        tags = runs[nested[clone]].data.tags
        assert (tags["seed"], tags["mlflow.parentRunId"]) == (str(seed), parents[clone]), tags
        shown = client.download_artifacts(parents[clone], "results.md", str(tmp_path / f"seen-{seed}"))
        assert Path(shown).read_text() == (clone / out_dir / "results.md").read_text()

    # Both flow runs completed on the team's Prefect server.
    grid_runs = flow_runs(exported["PREFECT_API_URL"], "rain-grid")
    assert sorted((r["parameters"]["project_dir"], r["state_type"]) for r in grid_runs) == sorted(
        (str(clone.resolve()), "COMPLETED") for clone in seeds), grid_runs

    # The store the pipeline filled is as it was, and each clone still reads it through the command line.
    assert sorted((v.version, v.run_id, v.status) for v in client.search_model_versions(f"name='{MODEL}'")) \
        == versions_before
    assert client.get_registered_model(MODEL).aliases == aliases_before
    assert {r.info.run_id for r in client.search_runs([pipeline.experiment_id])} == pipeline_runs_before
    for clone in seeds:
        listed = rain("promote", "--list", "--project", str(clone), env=teammate, timeout=300)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert all(alias in listed.stdout for alias in aliases_before), listed.stdout


def test_down_stops_every_service_and_up_again_keeps_the_data(services: tuple[Path, dict[str, str]]) -> None:
    """Down, then up: the same addresses, the same runs (the data stays in the team folder)."""
    from mlflow import MlflowClient

    team_dir, exported = services
    before = {e.name for e in MlflowClient(exported["MLFLOW_TRACKING_URI"]).search_experiments()}
    down = rain("team", "down", "--dir", str(team_dir), env=_env(), timeout=200)
    assert down.returncode == 0 and "stopped: prefect, mlflow, postgres" in down.stdout, down.stdout + down.stderr
    assert team.processes(team_dir) == []
    status = rain("team", "status", "--dir", str(team_dir), env=_env(), timeout=60)
    assert status.returncode == 1 and status.stdout.count(": down") == 3, status.stdout
    up = rain("team", "up", "--dir", str(team_dir), "--wait", str(WAIT), env=_env(), timeout=WAIT + 60)
    assert up.returncode == 0, up.stdout + up.stderr
    assert dict(re.findall(r"^\s+export (\w+)=(\S+)$", up.stdout, flags=re.M)) == exported
    assert {e.name for e in MlflowClient(exported["MLFLOW_TRACKING_URI"]).search_experiments()} == before
