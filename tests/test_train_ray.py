"""Ray Train behaviour of the train stage: lost workers, non-finite losses, several nodes.

Each test runs the real stage (`tasks.train.run`) on the micro dataset with a real Ray cluster on this
machine; the embedded cluster is the session's (conftest.py `ray_local`). The tests that kill or fail a worker
group are in CI's tier (`heavy`); the rest run in `make test`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rain_model.sampler import IdentityBalancedSampler
from tasks import train
from tasks.config import Params
from tasks.images.loaders import read_rows
from tasks.training import resume
from tasks.training.weights import PretrainedWeightsError
from tests.micro_project import micro_params, prepare_data

pytestmark = pytest.mark.e2e


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_sampler(mlr: Path, params: Params) -> IdentityBalancedSampler:
    labels = [r["label"] for r in read_rows(str(mlr), 0, ["train"])]
    return IdentityBalancedSampler(labels, params.train.p, params.train.k, params.train.seed)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "trial-0.safetensors"))


@pytest.mark.heavy
def test_lost_worker_resumes_from_checkpoint_and_matches_an_uninterrupted_run(ray_local: None, workdir: Path) -> None:
    params = micro_params({"train": {"epochs": 3}, "ray": {"max_failures": 1}})
    mlr = prepare_data(workdir, params)
    clean = train.run(params, mlr, params.store_dir(), workdir / "clean", workdir / "runs")
    steps_per_epoch = len(train_sampler(mlr, params))
    fault = train.FaultPlan(rank=1, step=steps_per_epoch + 1, marker=str(workdir / "killed"))
    resumed = train.run(params, mlr, params.store_dir(), workdir / "resumed", workdir / "runs", fault=fault)
    assert (workdir / "killed").exists()  # the worker really died mid-epoch 2
    assert resumed["trials"]["0"]["epochs"] == clean["trials"]["0"]["epochs"] == 3
    a, b = weights(workdir / "clean"), weights(workdir / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_non_finite_loss_stops_every_worker_and_writes_no_model(ray_local: None, workdir: Path) -> None:
    params = micro_params({"train": {"epochs": 2}, "objective": {"lr": 1.0e38, "lr_d_ratio": 1.0}})
    mlr = prepare_data(workdir, params)
    with pytest.raises(train.NonFiniteTraining, match=r"step \d+: L_\w+ is not finite"):
        train.run(params, mlr, params.store_dir(), workdir / "models", workdir / "runs")
    assert not (workdir / "models" / "trial-0.safetensors").exists()
    assert not (workdir / "models" / "train.json").exists()


@pytest.mark.heavy
def test_two_workers_equal_one_worker_with_the_same_global_batch_in_two_parts(ray_local: None, workdir: Path) -> None:
    """Exact equivalence of 2 workers x B/2 with 1 worker x B is impossible with BatchNorm: each DDP
    worker normalises with its own half's statistics (and SyncBatchNorm is GPU-only in torch 2.14).
    The nearest property: one worker given the same global batch as two micro-batches (BN per part,
    gradients summed then divided, as DDP's all-reduce does) takes the same steps as two DDP workers.
    Both sides use one thread per worker: Adam turns the rounding differences of other thread counts
    in near-zero gradients into full-size steps. Parameters must agree within 1e-5 (measured: 0.0);
    BN running statistics differ by design (DDP keeps rank 0's), so they are not compared."""
    two = micro_params({"train": {"epochs": 2}, "ray": {"num_workers": 2, "cpus_per_worker": 1}})
    one = micro_params({"train": {"epochs": 2, "micro_batches": 2}, "ray": {"num_workers": 1, "cpus_per_worker": 1}})
    mlr = prepare_data(workdir, two)
    train.run(two, mlr, two.store_dir(), workdir / "two", workdir / "runs")
    train.run(one, mlr, one.store_dir(), workdir / "one", workdir / "runs")
    a, b = weights(workdir / "two"), weights(workdir / "one")
    running = ("running_mean", "running_var", "num_batches_tracked")
    compared = [k for k in a if not k.endswith(running)]
    assert len(compared) > 50
    for key in compared:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def _mlflow_run(run_id: str) -> object:
    import mlflow

    from tasks.infra.tracking import tracking_uri

    return mlflow.MlflowClient(tracking_uri()).get_run(run_id)


@pytest.mark.heavy
def test_a_rerun_after_a_failed_run_continues_from_its_checkpoint(ray_local: None, workdir: Path) -> None:
    """Across invocations, as after a killed `dvc repro`: the second `run` finds the first one's Ray run by
    its key, continues its MLflow run, and ends with the weights of an uninterrupted run."""
    params = micro_params({"train": {"epochs": 4}, "ray": {"max_failures": 0}})
    mlr = prepare_data(workdir, params)
    clean = train.run(params, mlr, params.store_dir(), workdir / "clean", workdir / "runs-clean")
    steps_per_epoch = len(train_sampler(mlr, params))
    # Killed in epoch 2: checkpoints are uploaded in the background, so under load the one after epoch 1 may
    # not be committed yet, but the one after epoch 0 is.
    fault = train.FaultPlan(rank=1, step=2 * steps_per_epoch + 1, marker=str(workdir / "killed"))
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises for a lost worker with no retries left
        train.run(params, mlr, params.store_dir(), workdir / "resumed", workdir / "runs", fault=fault)
    assert (workdir / "killed").exists() and not (workdir / "resumed" / "trial-0.safetensors").exists()
    [interrupted] = (workdir / "runs" / "ray").iterdir()
    first_run_id = resume.previous_mlflow_run(interrupted)
    assert first_run_id is not None and _mlflow_run(first_run_id).info.status == "FAILED"

    resumed = train.run(params, mlr, params.store_dir(), workdir / "resumed", workdir / "runs")
    trial = resumed["trials"]["0"]
    assert trial["mlflow_run_id"] == first_run_id
    finished = _mlflow_run(first_run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags.get("resumed") == "true"
    assert finished.data.tags.get("resumed_at_epoch") in ("1", "2")  # from a checkpoint, not from epoch 0
    assert not interrupted.exists()  # a finished run leaves nothing to resume
    a, b = weights(workdir / "clean"), weights(workdir / "resumed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert clean["trials"]["0"]["mlflow_run_id"] != first_run_id


@pytest.mark.heavy
def test_a_rerun_with_changed_params_starts_fresh_and_old_runs_are_pruned(ray_local: None, workdir: Path) -> None:
    params = micro_params({"train": {"epochs": 2}, "ray": {"max_failures": 0, "keep_runs": 1}})
    mlr = prepare_data(workdir, params)
    fault = train.FaultPlan(rank=0, step=len(train_sampler(mlr, params)) + 1, marker=str(workdir / "killed"))
    with pytest.raises(Exception):  # noqa: B017
        train.run(params, mlr, params.store_dir(), workdir / "models", workdir / "runs", fault=fault)
    [interrupted] = (workdir / "runs" / "ray").iterdir()
    changed = micro_params({"train": {"epochs": 2}, "objective": {"w_rec": 0.5},
                            "ray": {"max_failures": 0, "keep_runs": 1}})
    summary = train.run(changed, mlr, changed.store_dir(), workdir / "models", workdir / "runs")
    assert summary["trials"]["0"]["mlflow_run_id"] != resume.previous_mlflow_run(interrupted)
    assert not interrupted.exists()  # keep_runs = 1: only the current run's folder may stay
    assert not {"resumed", "resumed_at_epoch"} & set(_mlflow_run(summary["trials"]["0"]["mlflow_run_id"]).data.tags)


def test_more_workers_than_the_cluster_has_fail_at_once_naming_both(ray_local: None, workdir: Path) -> None:
    import time

    from tasks.infra.raycluster import NotEnoughResources

    params = micro_params({"train": {"p": 64}, "ray": {"num_workers": 64, "cpus_per_worker": 1}})  # P: one per worker
    mlr = prepare_data(workdir, params)
    started = time.monotonic()
    with pytest.raises(NotEnoughResources, match=r"ray\.num_workers .*64 x \(1 CPU, 0 GPU\) requested.*has \d+ CPUs"):
        train.run(params, mlr, params.store_dir(), workdir / "models", workdir / "runs")
    assert time.monotonic() - started < 30


def test_a_grid_run_bigger_than_any_node_is_refused_naming_the_setting(ray_local: None) -> None:
    from tasks.infra.raycluster import NotEnoughResources, require_resources

    require_resources(1, 1, 0, "experiments.cpus_per_run, experiments.use_gpu")  # fits: no error
    with pytest.raises(NotEnoughResources, match=r"^experiments\.cpus_per_run, experiments\.use_gpu: 1 x "
                                                 r"\(10000 CPU, 0 GPU\) requested"):
        require_resources(1, 10_000, 0, "experiments.cpus_per_run, experiments.use_gpu")


def test_a_missing_pretrained_file_is_refused_before_ray_starts(workdir: Path) -> None:
    params = micro_params({"model": {"pretrained_path": "weights/missing.pth"}})
    with pytest.raises(PretrainedWeightsError,
                       match=r"model\.pretrained_path = 'weights/missing.pth': no such file"):
        train.run(params, workdir / "mlr.parquet", workdir / "store", workdir / "models", workdir / "runs")
