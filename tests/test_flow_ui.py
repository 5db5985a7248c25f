"""What the flows show in the Prefect UI without running: the grid deployment's form (typed parameters with
help, the table names it accepts), where the links to MLflow point, and which stage output lines reach the
flow's log at which level."""

from __future__ import annotations

import logging
import re
import typing
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from flows.grid import TableKey, experiments
from flows.links import (
    SETTINGS_LINE,
    artifact_url,
    experiment_url,
    grid_label,
    mlflow_ui,
    model_version_url,
    picture_links,
    pipeline_label,
    run_url,
    settings_markdown,
)
from flows.pipeline import STAGES, StageResult, flow_log_line, left_out_note, outcome, results_markdown
from tasks.config import load_params
from tasks.evaluate import run_description
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
    # Width and learning rate change every figure, so the Prefect UI shows them too (as tags, not in the name).
    assert f"width:{params.model.base_channels}" in tags and f"lr:{params.objective.lr:g}" in tags


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
    assert run_url(ui, "3", "abc") == f"{ui}/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert model_version_url(ui, "rain reid", 7) == f"{ui}/#/models/rain%20reid/versions/7?" \
        "workflowType=machine_learning"


@pytest.mark.parametrize(("line", "shown"), [
    ("To track the changes with git, run:", None),
    ("\tgit add dvc.lock", None),
    ("   ", None),
    ("\x1b[36m(RayTrainWorker pid=4120)\x1b[0m Started training worker group of 2 workers", None),
    ("(TrainController pid=77, ip=10.0.0.3) TrainingReport(checkpoint=None, metrics={...})", None),
    # One prefix per line: Prefect's record has the time and level, so Ray's and our logger's prefixes go.
    ("\x1b[36m(RayTrainWorker pid=4120)\x1b[0m 00:12:01 INFO tasks.training.progress: epoch 3/20: L_cls 4.1",
     (logging.INFO, "epoch 3/20: L_cls 4.1")),
    ("(RayTrainWorker pid=4120, ip=10.0.0.3) 00:12:01 WARNING tasks.training.loop: features collapsed",
     (logging.WARNING, "features collapsed")),
    ("21:43:53 INFO tasks.evaluate: evaluate: LR rank-1 37.7%", (logging.INFO, "evaluate: LR rank-1 37.7%")),
    ("21:43:53 ERROR tasks.register: no run", (logging.ERROR, "no run")),
    ("04:12:34 INFO __main__: register: rain-reid version 1", (logging.INFO, "register: rain-reid version 1")),
    ("(TrainController pid=77) WARNING worker group shrank", (logging.WARNING, "(TrainController pid=77) WARNING "
                                                             "worker group shrank")),
    ("loop.py:207: UserWarning: Detected call of `lr_scheduler.step()`",
     (logging.WARNING, "loop.py:207: UserWarning: Detected call of `lr_scheduler.step()`")),
    ("ERROR: failed to reproduce 'train'", (logging.ERROR, "ERROR: failed to reproduce 'train'")),
    ("rain-stage-error: ValueError: no rows", (logging.ERROR, "rain-stage-error: ValueError: no rows")),
    ("Running stage 'train':", (logging.INFO, "Running stage 'train':")),
    ("2026-11-27 15:03:33,326 INFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
     "http://127.0.0.1:8265", None),
    ("2026-11-27 15:03:22,885 WARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
     "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. ", None),
    ("2026-11-27 15:03:22,885 WARNING worker.py:12 -- a Ray warning", (logging.WARNING, "2026-11-27 15:03:22,885 "
                                                                      "WARNING worker.py:12 -- a Ray warning")),
    # Ray's own logger writes a tab after the time (ray/_private/log.py): its notices were shown (issue 30).
    ("2026-11-27 15:03:33,326\tINFO worker.py:2029 -- Started a local Ray instance. View the dashboard at "
     "\x1b[1m\x1b[32m127.0.0.1:8265 \x1b[39m\x1b[22m", None),
    ("2026-11-27 15:03:22,885\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
     "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.", None),
    # MLflow's own notices (its logger's format) and its schema migrations'.
    ("2026/11/27 21:43:50 INFO mlflow.store.db.utils: Creating initial MLflow database tables...", None),
    ("2026/11/27 21:43:50 INFO mlflow.store.db.utils: Updating database tables", None),
    ("2026/11/27 21:44:10 INFO mlflow.pyfunc: Inferring model signature from input example", None),
    ("INFO  [alembic.runtime.migration] Context impl SQLiteImpl.", None),
    ("2026/11/27 21:44:10 WARNING mlflow.models.model: Model logged without a signature",
     (logging.WARNING, "2026/11/27 21:44:10 WARNING mlflow.models.model: Model logged without a signature")),
])
def test_stage_output_reaches_the_flow_log_without_hints_or_ray_noise_at_its_level(
        line: str, shown: tuple[int, str] | None) -> None:
    assert flow_log_line(line) == shown


def test_picture_and_experiment_links_open_in_the_mlflow_ui(tmp_path: Path) -> None:
    """Browsers refuse file: links from a web page; the MLflow UI shows the pictures under the run's artifacts."""
    for name in ("cmc.png", "ranked_gallery.png", "metrics.json"):
        (tmp_path / name).write_bytes(b"")
    ui = "http://127.0.0.1:5000"
    assert picture_links(ui, "3", "abc", tmp_path) == [
        f"[cmc]({ui}/#/experiments/3/runs/abc/artifacts/evaluation/cmc.png?workflowType=machine_learning)",
        f"[ranked gallery]({ui}/#/experiments/3/runs/abc/artifacts/evaluation/ranked_gallery.png"
        "?workflowType=machine_learning)"]
    assert experiment_url("http://h:5000", "3") == "http://h:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert experiment_url("http://h:5000", "3", "viewStateShareKey=rain-results") == (
        "http://h:5000/#/experiments/3/runs?viewStateShareKey=rain-results&workflowType=machine_learning")


def _opens_in_training_views(link: str) -> bool:
    """The MLflow UI's page of `link` (absolute or relative: its route follows `#`) opens in the training views:
    MLflow 3.17's front end reads `workflowType` from the route's query on every page, else the browser's switch,
    which is GenAI until a user turns it."""
    route = urlsplit(urlsplit(link).fragment)
    return route.path.startswith("/") and parse_qs(route.query).get("workflowType") == ["machine_learning"]


def test_every_kind_of_link_to_mlflow_opens_its_training_views(tmp_path: Path) -> None:
    """Each link the project prints or writes: the experiment's runs, a run, a picture among a run's artifacts (flow
    log and Prefect artifact), a model version, and the run description's relative picture links."""
    (tmp_path / "cmc.png").write_bytes(b"")
    (tmp_path / "table.md").write_text("| Method | Rank 1 |\n|:---|---:|\n| LR | 37.7 |\n")
    ui = "http://127.0.0.1:5000"
    kinds = {"experiment": experiment_url(ui, "3"), "run": run_url(ui, "3", "abc"),
             "experiment's results view": experiment_url(ui, "3", "viewStateShareKey=rain-results"),
             "artifact": artifact_url(ui, "3", "abc", "evaluation/cmc.png"),
             "model version": model_version_url(ui, "rain-reid", 2),
             "picture (flow log, artifact)": re.findall(r"\((.+?)\)", picture_links(ui, "3", "abc", tmp_path)[0])[0]}
    description = run_description({"protocol": {"cmc": "single-shot", "mAP": "all HR"}}, tmp_path, "3", "abc")
    kinds["run description's picture"] = re.findall(r"\[cmc\.png\]\((.+?)\)", description)[0]
    assert kinds["run description's picture"].startswith("#/experiments/3/runs/abc/artifacts/evaluation/cmc.png")
    for kind, link in kinds.items():
        assert _opens_in_training_views(link), (kind, link)
    assert urlsplit(urlsplit(kinds["artifact"]).fragment).path == "/experiments/3/runs/abc/artifacts/evaluation/cmc.png"


def test_the_run_description_shows_the_results_table_as_aligned_text(tmp_path: Path) -> None:
    """MLflow 3.17 draws a Markdown table without cell padding ("37.7 ± 1.2 80.0 ± 0.9" ran together): the run
    description holds the table as a code block, its columns padded."""
    table = "| Method | Rank 1 | Rank 5 |\n|:-------|-------:|-------:|\n| LR     |   37.7 |   80.0 |"
    (tmp_path / "table.md").write_text(table + "\n")
    description = run_description({"protocol": {"cmc": "single-shot", "mAP": "all HR"}}, tmp_path, "3", "abc")
    assert f"```\n{table}\n```" in description


def _stage(stage: str, status: str, seconds: float = 1.0) -> StageResult:
    return StageResult(stage, status, seconds)


def test_a_training_run_and_a_no_op_differ_in_tags_and_say_what_they_did() -> None:
    """Issue 30: a run that retrained and one where every stage was up to date had the same name and tags."""
    up_to_date = [_stage("fingerprint", "ran")] + [_stage(s, "up to date") for s in STAGES[1:]]
    trained = [_stage(s, "ran", 126.0 if s == "train" else 1.0) for s in STAGES]
    reevaluated = [*up_to_date[:6], _stage("evaluate", "ran"), _stage("register", "ran")]
    said, tags = outcome(trained)
    assert said == "trained a model (train ran 126 s)"
    assert tags == ["outcome:trained", *(f"ran:{s}" for s in STAGES[1:])]  # fingerprint runs every time: no news
    assert outcome(up_to_date) == ("had nothing to do: every stage was up to date", ["outcome:up-to-date"])
    said, tags = outcome(reevaluated)
    assert tags == ["outcome:reused", "ran:evaluate", "ran:register"] and "up to date" in said
    # Each is said as "This flow run <said>.": it starts with its verb (the no-op's once read "This flow run nothing")
    assert [outcome(r)[0].split()[0] for r in (trained, reevaluated, up_to_date)] == ["trained", "reused", "had"]
    params = load_params(REPO / "params.yaml")
    markdown = results_markdown(params, trained, "| t |\n|:--|\n| 1 |", [("MLflow run, trial 0", "http://x")], [],
                                {"model_uri": "models:/rain-reid/1", "alias": "candidate"})
    assert "**This flow run trained a model (train ran 126 s).**" in markdown
    assert "| train | ran | 126.0 |" in markdown and "| register | ran | 1.0 |" in markdown


def test_the_results_artifact_shows_every_setting_that_decides_the_result() -> None:
    """The flow's only parameter is the project folder: its artifact lists the settings of params.yaml that decide
    the result, every key the train stage depends on among them."""
    from tasks.config import param_values, train_stage_params

    params = load_params(REPO / "params.yaml")
    table = settings_markdown(params)
    rows: dict[str, str] = {}
    section = ""
    for line in table.splitlines()[2:]:  # a section goes on over the rows whose first cell is empty
        first, settings = (cell.strip() for cell in line.strip("|").split(" | ", 1))
        section = first or section
        rows[section] = f"{rows[section]}, {settings}" if section in rows else f" {settings}"
        # Prefect's artifact page does not wrap a cell: no row reads on past the edge of the window
        assert len(settings) <= SETTINGS_LINE or ", " not in settings, line
    assert set(rows) == {"dataset", "protocol", "model", "objective", "train", "evaluate", "ray"}
    wanted = [k for k in param_values(params) if any(k == w or k.startswith(w + ".") for w in train_stage_params())]
    for key in wanted:
        section, _, name = key.partition(".")
        assert f" {name} " in rows[section] or f", {name} " in rows[section], key
    assert "name synthetic" in rows["dataset"] and f"lr {params.objective.lr}" in rows["objective"]


def test_flows_are_named_from_their_settings_before_their_first_log_line(prefect_server: None) -> None:
    """Prefect names a flow run through `flow_run_name` before it logs "Beginning flow run '<name>'", so the
    terminal and the UI show one name (the flow renaming itself later left the terminal with Prefect's drawn name);
    a project whose params.yaml cannot be read keeps the drawn name and the flow reports the error itself."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.grid import experiments as grid_flow
    from flows.links import grid_run_name, pipeline_run_name
    from flows.pipeline import rain

    assert rain.flow_run_name is pipeline_run_name and grid_flow.flow_run_name is grid_run_name

    @flow(flow_run_name=pipeline_run_name)
    def named(project_dir: str = ".") -> None:
        return None

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        state = named(project_dir=str(REPO), return_state=True)
        missing = named(project_dir="/nonexistent-rain-project", return_state=True)
    finally:
        logger.removeHandler(handler)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        other = client.read_flow_run(missing.state_details.flow_run_id)
    expected, _ = pipeline_label(load_params(REPO / "params.yaml"))
    beginnings = [r.getMessage() for r in records if r.getMessage().startswith("Beginning flow run")]
    assert run.name == expected and beginnings[0].startswith(f"Beginning flow run {expected!r}")
    assert state.is_completed() and missing.is_completed() and other.name != expected
    assert beginnings[1].startswith(f"Beginning flow run {other.name!r}")


@pytest.mark.parametrize(("count", "said"), [(1, "(1 line of "), (2, "(2 lines of ")])
def test_what_a_stage_left_out_of_the_flow_log_is_counted_in_good_english(count: int, said: str) -> None:
    assert left_out_note(count, Path("logs/x/train.log")).startswith(said)
    assert left_out_note(count, Path("logs/x/train.log")).endswith(" only in logs/x/train.log)")


def test_the_grid_form_offers_the_accepted_dataset_names() -> None:
    from flows.grid import DatasetName
    from tasks.config import DATASETS

    assert typing.get_args(DatasetName) == DATASETS
    schema = experiments.parameters.model_dump()["properties"]
    (named,) = [option for option in schema["dataset"]["anyOf"] if option.get("type") == "string"]
    assert named["enum"] == list(DATASETS)


def _served_grid_form(project: Path) -> dict[str, typing.Any]:
    """The grid deployment's parameter schema as `rain serve` registers it (flows/cli.py)."""
    from prefect.deployments.runner import RunnerDeployment

    from flows.cli import _grid_form

    deployment = typing.cast(RunnerDeployment, experiments.to_deployment(
        name="experiments", parameters={"project_dir": str(project)}))
    _grid_form(deployment, project)
    return deployment._parameter_openapi_schema.model_dump()


def _assert_opens_on_params_yaml(properties: dict[str, typing.Any], project: Path) -> None:
    from tasks.config import DATASETS
    from tasks.grid.tables import TABLES

    params = load_params(project / "params.yaml")
    expected = {"project_dir": str(project), "dataset": params.dataset.name, "seeds": list(params.experiments.seeds),
                "tables": [t.key for t in TABLES]}
    for name, default in expected.items():
        prop = properties[name]
        assert "anyOf" not in prop and prop["type"] in ("string", "array"), (name, prop)  # no "None" branch
        assert prop["default"] == default, name  # the Parameters tab's Default, the form's first value
    assert properties["dataset"]["enum"] == list(DATASETS)
    assert properties["tables"]["items"]["enum"] == [t.key for t in TABLES]
    for table in TABLES:  # the paper's titles beside the keys the multi-select lists
        assert f"- `{table.key}`: {table.title}" in properties["tables"]["description"]


def test_the_grid_run_form_opens_on_params_yaml_values_with_the_tables_titles(tmp_path: Path) -> None:
    """Prefect's form opened every optional field on "None" (`Property is type "None"`) and the Parameters tab had
    blank Type and Default: the served deployment types each field as its value, params.yaml's value first."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("seeds: [0, 1, 2]",
                                                                                     "seeds: [4, 5]"))
    _assert_opens_on_params_yaml(_served_grid_form(tmp_path)["properties"], tmp_path)


def test_the_prefect_server_keeps_the_grid_form_as_served(prefect_server: None, tmp_path: Path) -> None:
    """What the UI reads: the deployment's parameter schema as the Prefect API returns it."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import RunnerDeployment

    from flows.cli import _grid_form

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    deployment = typing.cast(RunnerDeployment, experiments.to_deployment(
        name="experiments", parameters={"project_dir": str(tmp_path)}))
    _grid_form(deployment, tmp_path)
    deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment_by_name("rain-grid/experiments")
    _assert_opens_on_params_yaml(stored.parameter_openapi_schema["properties"], tmp_path)
