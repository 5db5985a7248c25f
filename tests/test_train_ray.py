"""Ray Train behaviour of the train stage: lost workers, non-finite losses, several nodes.

Each test runs the real stage (`tasks.train.run`) on the micro dataset with a real Ray cluster on this
machine; the embedded cluster is shared by the tests of this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rain_model.sampler import IdentityBalancedSampler
from tasks import train
from tasks.config import Params
from tasks.images.loaders import read_rows
from tests.micro_project import micro_params, prepare_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    from tasks.infra.raycluster import connect

    connect(None)  # before anything imports ray: it decides the loopback-only mode
    yield
    import ray

    ray.shutdown()


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train_sampler(mlr: Path, params: Params) -> IdentityBalancedSampler:
    labels = [r["label"] for r in read_rows(str(mlr), 0, ["train"])]
    return IdentityBalancedSampler(labels, params.train.p, params.train.k, params.train.seed)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "trial-0.safetensors"))


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
    params = micro_params({"train": {"epochs": 2}, "objective": {"lr": 1.0e38, "lr_d": 1.0e38}})
    mlr = prepare_data(workdir, params)
    with pytest.raises(train.NonFiniteTraining, match=r"step \d+: L_\w+ is not finite"):
        train.run(params, mlr, params.store_dir(), workdir / "models", workdir / "runs")
    assert not (workdir / "models" / "trial-0.safetensors").exists()
    assert not (workdir / "models" / "train.json").exists()


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
