"""Stage `experiment`: one grid run trains and scores in process, writes its result last, and is not
trained again while its key (params, inputs, code) holds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tasks import grid_run
from tasks.config import Params, ParamsError
from tasks.grid import runs
from tests.micro_project import prepared


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    return prepared(tmp_path_factory, "grid-stage", {"experiments": {"epochs": 1}})


def test_a_run_writes_its_result_and_is_then_up_to_date(project: tuple[Path, Params],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root, params = project
    monkeypatch.chdir(root)
    result = grid_run.run(params, "baseline_hrlr", 0)

    written = json.loads(runs.result_path(params, "baseline_hrlr", 0).read_text())
    assert written == result
    assert set(result["rows"]) == {"lr", "r2", "r3", "r4", "r8", "hr"}
    for row in result["rows"].values():
        assert 0.0 <= row["rank1"] <= row["rank5"] <= row["rank10"] <= row["rank20"] <= 1.0
    losses = result["final_losses"]
    assert losses["L_adv"] == losses["L_D"] == 0.0 and min(losses["L_rec"], losses["L_cls"]) > 0  # Eq. 7 w/o L_adv
    assert (result["config"], result["seed"], result["trial"], result["epochs"]) == ("baseline_hrlr", 0, 0, 1)
    assert runs.is_done(params, "baseline_hrlr", 0)
    _assert_mlflow_run(root, result)

    again = grid_run.run(params, "baseline_hrlr", 0)  # up to date: returned as written, not trained
    assert again == result

    longer = dataclasses.replace(params, experiments=dataclasses.replace(params.experiments, epochs=2))
    assert not runs.is_done(longer, "baseline_hrlr", 0)  # a changed param makes it stale
    assert runs.is_done(params, "baseline_hrlr", 0, code="other code") is False

    index = params.store_dir() / "index.json"  # other pixels under the same manifest paths: stale
    original = index.read_text()
    index.write_text(json.dumps(json.loads(original) | {"sha256": "0" * 64}))
    try:
        assert not runs.is_done(params, "baseline_hrlr", 0)
    finally:
        index.write_text(original)
    assert runs.is_done(params, "baseline_hrlr", 0)


def _assert_mlflow_run(root: Path, result: dict) -> None:
    """The grid run in MLflow: metrics in the pipeline's sections, params as a person reads them."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "experiment grid" in experiment.tags["mlflow.note.content"]
    metrics = run.data.metrics
    lr = result["rows"]["lr"]
    assert metrics["eval/lr_rank1"] == pytest.approx(100 * lr["rank1"], abs=5e-5) and metrics["eval/r8_mAP"] >= 0
    assert metrics["eval_std/lr_rank1"] == pytest.approx(lr["rank1_std"])
    assert {"train/L_cls", "epoch/L_cls"} <= set(metrics)
    assert metrics["time/train_seconds"] == result["train_seconds"] and metrics["time/eval_seconds"] >= 0
    assert not {k for k in metrics if "/" not in k}, sorted(metrics)  # every figure in a chart section
    assert run.data.params["train.trials"] == "[0]" and not [k for k in run.data.params if k.startswith("sources.")]


def test_a_torn_result_is_refused_by_path_and_an_unknown_configuration_by_name(
        project: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch) -> None:
    root, params = project
    monkeypatch.chdir(root)
    path = runs.result_path(params, "no_tri", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"config": "no_t')
    with pytest.raises(ValueError, match=str(path)):
        runs.is_done(params, "no_tri", 0)
    with pytest.raises(ParamsError, match="'no_such'"):
        grid_run.run(params, "no_such", 0)


def test_the_flow_refuses_a_dataset_params_yaml_does_not_name(tmp_path: Path) -> None:
    from flows.grid import experiments
    from tests.micro_project import write_params

    write_params(tmp_path, {})
    with pytest.raises(ParamsError, match=r"dataset 'viper'.*dataset\.name = 'synthetic'"):
        experiments.fn(project_dir=str(tmp_path), dataset="viper")
    with pytest.raises(ParamsError, match=r"experiments\.seeds"):
        experiments.fn(project_dir=str(tmp_path), seeds=[1, 1])
    with pytest.raises(ParamsError, match="table7"):
        experiments.fn(project_dir=str(tmp_path), tables=["table7"])


def test_a_sweep_run_trains_without_its_validation_identities_and_keeps_its_best_epoch_there(
        project: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch) -> None:
    """adv_* runs train on the grid_data variant with experiments.val_identities held out, score that split
    after every epoch, are tested with the best epoch's weights, and record the choice and the game."""
    from tasks import grid_data
    from tasks.grid.data import train_manifest
    from tasks.images.loaders import read_rows

    root, params = project
    monkeypatch.chdir(root)
    longer = dataclasses.replace(params, experiments=dataclasses.replace(params.experiments, epochs=2))
    grid_data.run(longer)
    manifest = train_manifest(longer, "adv_0.3")
    assert manifest != longer.mlr_manifest_path()
    held_out = {r["person_id"] for r in read_rows(str(manifest), 0, ["val_query"])}
    assert len(held_out) == longer.experiments.val_identities
    assert not held_out & {r["person_id"] for r in read_rows(str(manifest), 0, ["train"])}

    result = grid_run.run(longer, "adv_0.3", 0)
    validation = result["validation"]
    assert validation["identities"] == 2 and validation["kept_epoch"] in (1, 2)
    assert 0.0 <= validation["lr_rank1"] <= 1.0 and validation["lr_rank1"] >= validation["last_epoch_lr_rank1"]
    assert {"D4_accuracy_HR", "D5_accuracy_LR", "feature_distance", "grad_f5_ratio"} <= set(result["final_game"])
    assert set(result["rows"]) == {"lr", "r2", "r3", "r4", "r8", "hr"}  # tested on the pipeline's test split
    assert grid_run.run(params, "baseline_hrlr", 0)["validation"] is None  # no split, no choice


def test_a_run_whose_features_collapse_says_so_in_its_epoch_line_result_mlflow_run_and_report(
        project: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Provoked: F's pooling made to give every image the same feature (v = 1), the collapse the default RAIN
    showed on real crops (L_tri at its margin, no ranking possible)."""
    import logging

    import rain_model.network
    from tasks import grid_report

    root, params = project
    monkeypatch.chdir(root)
    monkeypatch.setattr(rain_model.network, "gap", lambda f5: f5.mean(dim=(2, 3)) * 0.0 + 1.0)  # (N, d) of ones
    collapsed = dataclasses.replace(params, paths=dataclasses.replace(params.paths, experiments="collapsed"))
    with caplog.at_level(logging.INFO):
        result = grid_run.run(collapsed, "multi_level", 0)

    assert result["collapse"].startswith("every feature at one point (feature spread 0 < 0.05)")
    assert f"L_tri at its margin ({params.objective.margin:.3g} per term" in result["collapse"]
    assert result["final_game"]["collapsed"] == 1.0
    assert [r for r in caplog.records if "COLLAPSED (feature spread 0)" in r.getMessage()]  # the epoch line
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "collapsed" in r.getMessage()]
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.data.tags["collapse"] == f"epoch 1: {result['collapse']}"
    assert run.data.metrics["game/collapsed"] == 1.0

    report = "\n".join(grid_report.collapse_warning({("multi_level", 0): result}))
    assert "1 run(s) ended with collapsed features" in report and "`multi_level` seed 0" in report
    assert f"| yes: {result['collapse']} |" in grid_report.runs_markdown({("multi_level", 0): result}, ["multi_level"])


def test_a_healthy_run_is_not_called_collapsed(project: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch) -> None:
    root, params = project
    monkeypatch.chdir(root)
    result = grid_run.run(params, "baseline_hrlr", 0)  # trained by the first test of this module (or now)
    assert result["collapse"] is None and result["final_game"]["collapsed"] == 0.0
    assert result["final_game"]["feature_spread"] > 0.05
    from tasks import grid_report

    assert grid_report.collapse_warning({("baseline_hrlr", 0): result}) == []
    assert "| no |" in grid_report.runs_markdown({("baseline_hrlr", 0): result}, ["baseline_hrlr"])


def test_a_choice_run_is_scored_on_its_validation_split_and_never_reads_the_test_split(
        project: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch) -> None:
    """`strong_lr_x3` chooses a rate: every scoring call it makes is on the validation split, and its result has
    no test rows; both retrieval features are scored there, since BNNeck is on."""
    import tasks.evaluation.scoring as scoring
    from tasks import grid_data
    from tasks.protocol.splits import VAL

    root, params = project
    monkeypatch.chdir(root)
    grid_data.run(params)  # the variant with experiments.val_identities held out
    splits: list[str] = []
    score_trial = scoring.score_trial

    def recorded(*args: object, **kwargs: object) -> object:
        splits.append(str(args[5] if len(args) > 5 else kwargs.get("split", "test")))
        return score_trial(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scoring, "score_trial", recorded)
    result = grid_run.run(params, "strong_lr_x3", 0)
    assert splits and set(splits) == {VAL}, splits
    assert result["rows"] == {} and result["validation"]["identities"] == params.experiments.val_identities
    assert {"last_epoch_lr_rank1_v", "last_epoch_lr_rank1_bnneck"} <= set(result["validation"])
