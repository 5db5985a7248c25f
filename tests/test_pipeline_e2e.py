"""End to end: the Prefect flow `rain` runs every DVC stage (Ray Train with two DDP workers, MLflow
tracking and registry) on a micro configuration, then nothing re-runs, then only what a changed
train parameter touches re-runs.

The flow run is the session's one (conftest.py `pipeline_run`, shared with the registry, search and serving
tests); what changes the project (a re-run with other params) happens in a copy of it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.micro_project import MICRO, dvc, merge, write_params
from tests.trained_project import OVERRIDES

pytestmark = pytest.mark.e2e

METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP")


@pytest.fixture(scope="module")
def first_run(pipeline_run: tuple[Path, dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    return pipeline_run


def test_flow_runs_every_stage_and_registers_a_candidate(first_run: tuple[Path, dict[str, Any]]) -> None:
    from mlflow import MlflowClient

    project, result = first_run
    assert [s["stage"] for s in result["stages"]] == ["fingerprint", "download", "manifest", "synthesize", "decode",
                                                      "train", "evaluate", "register"]
    assert all(s["status"] == "ran" for s in result["stages"]), result["stages"]

    metrics = json.loads((project / "reports/synthetic/metrics.json").read_text())
    assert metrics == result["metrics"]
    for key in METRICS:
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["rows"]) == {"lr", "r2", "r3", "r4", "r8", "hr"}
    for row in metrics["rows"].values():  # CMC is non-decreasing in rank
        assert row["rank1"] <= row["rank5"] <= row["rank10"] <= row["rank20"] <= 1.0
    assert metrics["evaluations_per_row"] == metrics["trials"] * metrics["gallery_draws"] == 1  # 1 trial x 1 draw
    assert metrics["std_over"] == "gallery draws"  # several draws: tests/test_evaluate.py
    assert "single-shot" in metrics["protocol"]["cmc"] and "every HR image" in metrics["protocol"]["mAP"]

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("rain-reid", "candidate")
    assert version.tags["dataset"] == "synthetic"
    assert float(version.tags["lr_rank1"]) == pytest.approx(100 * metrics["rank1"], abs=1e-4)  # percent, as shown
    run = client.get_run(version.run_id)
    assert {"train/L_cls", "train/L_tri", "train/L_rec", "train/L_adv", "train/L_D", "eval/lr_rank1"} <= set(
        run.data.metrics)
    assert run.data.metrics["eval/lr_rank1"] == pytest.approx(100 * metrics["rank1"], abs=1e-4)  # one unit: percent
    trained = json.loads((project / "models/synthetic/train.json").read_text())["trials"]["0"]
    assert "collapse" in trained and trained["collapse"] is None  # checked, and the features did not collapse
    assert run.data.metrics["game/collapsed"] == 0.0 and "collapse" not in run.data.tags
    for picture in ("cmc.png", "tsne_identity.png", "tsne_resolution.png", "ranked_gallery.png"):
        assert (project / "reports/synthetic" / picture).stat().st_size > 0


def test_mlflow_shows_the_results_table_the_cmc_curve_and_described_models(
        first_run: tuple[Path, dict[str, Any]]) -> None:
    from mlflow import MlflowClient

    project, result = first_run
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("rain-reid", "candidate")
    run = client.get_run(version.run_id)
    note = run.data.tags["mlflow.note.content"]  # the run page's description
    assert (project / "reports/synthetic/table.md").read_text().strip() in note
    assert f"[cmc.png](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/evaluation/cmc.png" \
        "?workflowType=machine_learning)" in note  # a link the UI opens, wherever it runs, in its training views
    cmc = client.get_metric_history(run.info.run_id, "cmc/lr")
    assert [m.step for m in cmc] == list(range(1, 21))  # a curve over rank, 1 to 20
    values = [m.value for m in cmc]
    # In percent, as every rate MLflow shows. metrics.json rounds its fractions to 6 decimals; the curve keeps the full
    # value (1/3 differs from 0.333333 by 3.3e-7)
    assert values == sorted(values) and values[-1] <= 100
    assert values[0] == pytest.approx(100 * result["metrics"]["rows"]["lr"]["rank1"], abs=5e-5)
    assert "cross-resolution person re-ID" in client.get_registered_model("rain-reid").description
    assert f"rank-1 {100 * result['metrics']['rank1']:.1f}%" in version.description


def test_mlflow_store_shows_the_experiment_kind_grouped_metrics_readable_params_and_lr_tags(
        first_run: tuple[Path, dict[str, Any]]) -> None:
    """What a person opening `mlflow ui` on the store finds after one pipeline run."""
    from mlflow import MlflowClient

    project, result = first_run
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rain-synthetic")
    assert experiment is not None
    # The UI opens it on its training runs (not the GenAI overview), with a description of what it holds.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Training runs of the RAIN pipeline" in experiment.tags["mlflow.note.content"]
    assert "mlflow.sharedViewState.rain-results" in experiment.tags  # the runs list with the figures as columns

    version = client.get_model_version_by_alias("rain-reid", "candidate")
    run = client.get_run(version.run_id)
    assert "## Results (percent)" in run.data.tags["mlflow.note.content"]
    names = set(run.data.metrics)
    for section in ("train/", "epoch/", "game/", "eval/", "eval_std/", "cmc/", "time/"):  # one chart section each
        assert any(n.startswith(section) for n in names), (section, sorted(names))
    assert {"epoch/L_cls", "epoch/images_per_second", "game/D4_accuracy_HR", "game/grad_f5_ratio", "eval/lr_mAP",
            "eval_std/lr_rank1", "cmc/r8"} <= names
    ungrouped = {n for n in names if "/" not in n}
    assert not ungrouped, ungrouped  # no loss, epoch mean, evaluation figure or time outside a section

    params = run.data.params  # as a person reads them, and no dataset source this run did not use
    assert params["protocol.train_rates"] == "[2, 3, 4]" and params["model.pretrained"] == "none"
    assert params["evaluate.flip"] == "false" and not [k for k in params if k.startswith("sources.")]

    lr = result["metrics"]["rows"]["lr"]
    for figure in ("rank1", "rank1_std", "rank5", "rank10", "rank20", "mAP"):  # the gate's tags, named for LR
        assert float(version.tags[f"lr_{figure}"]) == pytest.approx(100 * lr[figure], abs=1e-4)  # in percent
    assert version.tags["mlr_manifest_sha256"] == run.data.tags["mlr_manifest_sha256"]  # one name per hash
    assert "LR queries: rank-1" in version.description
    linked = {m.key: m.value for m in client.get_logged_model(version.source.removeprefix("models:/")).metrics}
    assert linked["train/L_cls"] == pytest.approx(run.data.metrics["train/L_cls"])  # the final step's, as the run


def test_the_flow_run_is_named_and_tagged_by_its_settings_and_links_its_mlflow_run_and_model(
        first_run: tuple[Path, dict[str, Any]]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName

    from flows.links import pipeline_label
    from tasks.config import load_params

    project, result = first_run
    name, tags = pipeline_label(load_params(project / "params.yaml"))
    assert name == "synthetic-rain-resnet18-2ep-t0" and any(t.startswith("width:") for t in tags)
    with get_client(sync_client=True) as client:
        (run,) = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["rain"])))
                  if r.name == name]
        assert set(tags) <= set(run.tags) and "variant:rain" in run.tags
        assert {"outcome:trained", "ran:train", "ran:register"} <= set(run.tags)  # what it did, in the runs list
        (artifact, *_) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["rain-results-synthetic"])))
    markdown = str(artifact.data)
    run_id = json.loads((project / "models/synthetic/train.json").read_text())["trials"]["0"]["mlflow_run_id"]
    ml = r"\?workflowType=machine_learning"  # every link opens the MLflow UI's training views
    assert re.search(rf"\[MLflow run, trial 0\]\(http://127\.0\.0\.1:5000/#/experiments/\d+/runs/{run_id}{ml}\)",
                     markdown)
    version = result["registration"]["version"]
    assert f"(http://127.0.0.1:5000/#/models/rain-reid/versions/{version}?workflowType=machine_learning)" in markdown
    # Pictures as links a browser opens: the MLflow UI's view of the run's artifacts (not file: URLs).
    assert re.search(rf"\[cmc\]\(http://127\.0\.0\.1:5000/#/experiments/\d+/runs/{run_id}/artifacts/evaluation/"
                     rf"cmc\.png{ml}\)", markdown)
    # The experiment on its training runs, in the saved view that shows their figures.
    assert "runs?viewStateShareKey=rain-results&workflowType=machine_learning)" in markdown
    assert "**This flow run trained a model (train ran " in markdown and "| train | ran |" in markdown
    assert "## The settings that decide the result" in markdown and "| objective | variant rain," in markdown


def test_the_flow_log_shows_one_line_per_epoch_and_no_dvc_git_hint(first_run: tuple[Path, dict[str, Any]]) -> None:
    """What a user reads in the Prefect UI: training's epoch lines (from rank 0 of the Ray worker group), none of
    DVC's "git add dvc.lock" advice."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

    from flows.links import pipeline_label
    from tasks.config import load_params

    project, _ = first_run
    name, _ = pipeline_label(load_params(project / "params.yaml"))
    # One prefix per line: the stage's label, then the epoch line (no Ray worker prefix, no second time and level).
    epoch_line = re.compile(r"^train \| epoch (\d+)/(\d+): L_adv .* \| \d+ images/s, .* \| ")
    with get_client(sync_client=True) as client:
        (run,) = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["rain"])))
                  if r.name == name]
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
        for _ in range(30):  # the flow's logs reach the server in batches, shortly after the flow returns
            messages: list[str] = []
            while page := client.read_logs(log_filter=log_filter, limit=200, offset=len(messages)):
                messages += [entry.message for entry in page]
            if any(epoch_line.search(m) for m in messages):
                break
            time.sleep(1)
    epochs = [match.groups() for m in messages if (match := epoch_line.search(m))]
    assert epochs == [("1", "2"), ("2", "2")], messages
    assert not [m for m in messages if re.search(r"git add|autostage|dvc push", m)]
    # No tool's notices or dead URLs, and no line with a second prefix after the stage's label.
    noise = re.compile(r"RAY_AUTH_MODE|View the dashboard|:8265|MLflow database tables|Updating database tables|"
                       r"Inferring model signature|pid=\d+\)|\| \d\d:\d\d:\d\d (INFO|WARNING) |\(1 lines ")
    assert not [m for m in messages if noise.search(m)], messages


def _changed_pipeline_stages(project: Path) -> set[str]:
    """Stages of the pipeline's dvc.yaml that `dvc status` reports (the grid's never ran here), but `fingerprint`:
    it is always changed (it reads the dataset's source files on every repro, tasks/fingerprint.py)."""
    out = dvc(project, "status", "dvc.yaml")
    assert re.search(r"^fingerprint:\n\s+always changed", out, flags=re.M), out
    return {m for m in re.findall(r"^(\w+):", out, flags=re.M)} - {"fingerprint"}


def test_editing_the_training_loop_makes_train_stale_and_nothing_upstream(
        first_run: tuple[Path, dict[str, Any]]) -> None:
    project, _ = first_run
    loop = project / "tasks/training/loop.py"
    original = loop.read_text()
    assert _changed_pipeline_stages(project) == set()
    loop.write_text(original + "\n# a learning-rate warm-up\n")
    try:
        # register too: the registered model bundles the project's code (MLflow code_paths), loop included
        assert _changed_pipeline_stages(project) == {"train", "register"}
    finally:
        loop.write_text(original)
    assert _changed_pipeline_stages(project) == set()


def test_a_second_run_finds_every_stage_up_to_date(first_run: tuple[Path, dict[str, Any]]) -> None:
    from flows.pipeline import rain

    project, _ = first_run
    again = rain(project_dir=str(project))
    assert all(s["status"] == "up to date" for s in again["stages"][1:]), again["stages"]
    first = again["stages"][0]
    assert (first["stage"], first["status"]) == ("fingerprint", "ran")  # always runs; its output did not change


UPSTREAM_OF_TRAIN = {"download", "manifest", "synthesize", "decode"}


def _with_epochs(project: Path, epochs: int) -> None:
    write_params(project, merge(merge(MICRO, OVERRIDES), {"train": {"epochs": epochs}}))


def test_a_train_param_makes_train_stale_and_nothing_upstream(first_run: tuple[Path, dict[str, Any]]) -> None:
    project, _ = first_run
    written = (project / "params.yaml").read_text()
    _with_epochs(project, 1)
    try:
        changed = _changed_pipeline_stages(project)
    finally:
        (project / "params.yaml").write_text(written)
    assert "train" in changed and not changed & UPSTREAM_OF_TRAIN, changed
    assert _changed_pipeline_stages(project) == set()


@pytest.mark.heavy
def test_a_train_param_reruns_train_and_exactly_what_reads_its_output(first_run: tuple[Path, dict[str, Any]],
                                                                      tmp_path: Path) -> None:
    """The real re-run, in a copy of the project (the session's stays as the other tests read it). The copy trains
    into its own store and artifacts: nothing new appears in the original (MLflow recorded absolute locations into
    it, tasks/infra/tracking.py relocate_artifacts)."""
    from mlflow import MlflowClient

    original = first_run[0]
    before = {p.relative_to(original).as_posix() for p in (original / "mlartifacts").rglob("*")}
    project = Path(shutil.copytree(original, tmp_path / "project", symlinks=True))
    _with_epochs(project, 1)
    out = dvc(project, "repro")
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"fingerprint", "train", "evaluate", "register"}, out
    assert {p.relative_to(original).as_posix() for p in (original / "mlartifacts").rglob("*")} == before
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("rain-reid", "candidate")
    own = (project / "mlartifacts").resolve().as_uri()
    assert client.get_run(version.run_id).info.artifact_uri.startswith(own)
    assert (project / "mlartifacts" / client.get_run(version.run_id).info.artifact_uri.removeprefix(own + "/")
            / "evaluation" / "cmc.png").is_file()
    assert client.get_logged_model(version.source.removeprefix("models:/")).artifact_location.startswith(own)
