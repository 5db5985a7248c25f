"""Stage `train`: the RAIN objective under Ray Train (`TorchTrainer`, DDP), one model per listed trial.

The driver starts (or joins) a Ray cluster, opens one MLflow run per trial, and runs `train_worker` on
`ray.num_workers` workers. Workers checkpoint every `train.checkpoint_every_epochs` epochs into
<paths.runs>/ray (outside every DVC output, so a restarted worker group resumes from there); the
final weights are written as safetensors into models/<dataset>/, the stage's DVC output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.config import Params, load_params
from tasks.logs import setup_logging
from tasks.raycluster import connect
from tasks.tracking import experiment, file_hash, git_commit, tracking_uri

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def weights_path(model_dir: Path, trial: int) -> Path:
    return model_dir / f"trial-{trial}.safetensors"


def summary_path(model_dir: Path) -> Path:
    return model_dir / "train.json"


def flat_params(params: Params) -> dict[str, str]:
    """Params as dotted keys, the way MLflow and DVC show them."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix.rstrip(".")] = str(value)

    walk("", params)
    return out


def params_hash(params: Params) -> str:
    return hashlib.sha256(json.dumps(flat_params(params), sort_keys=True).encode()).hexdigest()


def run(params: Params, mlr_path: Path, model_dir: Path, runs_dir: Path,
        fault: FaultPlan | None = None) -> dict[str, Any]:
    import mlflow

    connect(params.ray.address)  # before `ray.train` is imported: it imports ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.loaders import read_rows

    model_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri()
    client = mlflow.MlflowClient(uri)
    exp_id = experiment(client, f"rain-{params.dataset.name}")

    summary: dict[str, Any] = {"trials": {}}
    data_hash = file_hash(mlr_path)
    for trial in params.train.trials:
        # Workers do not share the driver's working folder: hand them absolute paths.
        rows = [r | {"hr_path": str(Path(r["hr_path"]).resolve()), "lr_path": str(Path(r["lr_path"]).resolve())}
                for r in read_rows(str(mlr_path), trial, ["train"])]
        if not rows:
            raise ValueError(f"{mlr_path}: trial {trial} has no training rows (protocol.trials too small?)")
        name = f"{params.dataset.name}-trial{trial}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        mlflow_run = client.create_run(exp_id, run_name=name, tags={
            "git_commit": git_commit(), "data_hash": data_hash, "params_hash": params_hash(params),
            "dataset": params.dataset.name,
            "trial": str(trial), "variant": params.objective.variant, "stage": "train"})
        run_id = mlflow_run.info.run_id
        for key, value in flat_params(params).items():
            client.log_param(run_id, key, value[:6000])
        job = {"params": params, "rows": rows, "tracking_uri": uri, "run_id": run_id, "fault": fault}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=params.ray.num_workers, use_gpu=params.ray.use_gpu,
                                         resources_per_worker={"CPU": params.ray.cpus_per_worker}),
            run_config=RunConfig(
                name=name, storage_path=str(runs_dir.resolve() / "ray"),
                failure_config=FailureConfig(max_failures=params.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=params.ray.keep_checkpoints)),
        )
        started = time.perf_counter()
        try:
            result = trainer.fit()
        except Exception:
            client.set_terminated(run_id, status="FAILED")
            raise
        if result.metrics and "nonfinite" in result.metrics:
            client.set_terminated(run_id, status="FAILED")
            raise NonFiniteTraining(f"train: trial {trial} stopped on a non-finite loss: {result.metrics['nonfinite']}"
                                    " (no model written; lower objective.lr or check the data)")
        if result.checkpoint is None:
            client.set_terminated(run_id, status="FAILED")
            raise RuntimeError(f"train: Ray run {name} finished without a checkpoint")
        with result.checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        _save_weights(state["model"], weights_path(model_dir, trial))
        seconds = time.perf_counter() - started
        client.log_metric(run_id, "train_seconds", seconds)
        client.set_terminated(run_id, status="FINISHED")
        summary["trials"][str(trial)] = {
            "weights": weights_path(model_dir, trial).name, "mlflow_run_id": run_id, "ray_run": name,
            "num_classes": state["num_classes"], "epochs": state["epoch"] + 1, "seconds": round(seconds, 1),
            "ray_nodes": int((result.metrics or {}).get("nodes", 1)), "workers": params.ray.num_workers,
            "final_losses": {k: round(v, 5) for k, v in (result.metrics or {}).items()
                             if k.startswith("L_")},
        }
        log.info("train: trial %d done in %.0f s, %s", trial, seconds, summary["trials"][str(trial)]["final_losses"])
    summary_path(model_dir).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


@dataclass(frozen=True)
class FaultPlan:
    """Test hook: hard-kill worker `rank` when it reaches global step `step`, once (marker file)."""

    rank: int
    step: int
    marker: str


class NonFiniteTraining(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step and the loss term."""


def _checkpoint_state(model: torch.nn.Module, optimizers: Any, schedulers: list[Any], sampler: Any, epoch: int,
                      step: int, num_classes: int) -> dict[str, Any]:
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizers": optimizers.state_dict(), "schedulers": [s.state_dict() for s in schedulers],
            "sampler": sampler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch, "step": step,
            "num_classes": num_classes}


def train_worker(job: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the RAIN min-max game (Eq. 8) on this rank's share of each batch.

    Every epoch ends with one `ray.train.report` on every rank (Ray requires equal counts); rank 0
    attaches a checkpoint every `checkpoint_every_epochs` epochs holding everything a restarted worker
    group needs to continue exactly: weights, both optimizers, both LR schedules, sampler position,
    RNG state and the step counter.
    """
    import ray.train
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from rain_model.network import RAIN
    from rain_model.objective import Batch, NonFiniteLossError, make_optimizers, place_model, train_step
    from rain_model.sampler import IdentityBalancedSampler
    from tasks.loaders import PairDataset, semi_supervised_labels

    params: Params = job["params"]
    cfg = params.train
    fault: FaultPlan | None = job.get("fault")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if params.ray.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    rows = job["rows"]
    labels = semi_supervised_labels([r["label"] for r in rows], cfg.label_fraction, cfg.seed)
    num_classes = len({r["label"] for r in rows})
    dataset = PairDataset(rows, (cfg.height, cfg.width), labels)
    sampler = IdentityBalancedSampler([r["label"] for r in rows], cfg.p, cfg.k, cfg.seed, rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.loader_workers,
                        persistent_workers=cfg.loader_workers > 0)

    model = place_model(RAIN(params.model, num_classes), params.objective, device)
    optimizers = make_optimizers(model, params.objective)
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_decay_epochs), gamma=cfg.lr_decay)
                  for opt in (optimizers.generator, optimizers.discriminator)]
    generator: torch.nn.Module = model.generator
    discriminators: torch.nn.Module = model.discriminators
    if world > 1:  # gloo on CPU, NCCL on GPU: chosen by Ray Train's TorchConfig
        ids = [device.index] if device.type == "cuda" else None
        generator = DistributedDataParallel(generator, device_ids=ids)
        if any(True for _ in discriminators.parameters()):
            discriminators = DistributedDataParallel(discriminators, device_ids=ids)

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: continue from the last reported state
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizers.load_state_dict(state["optimizers"])
        for sched, sched_state in zip(schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sched_state)
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]

    nodes: list[str | None] = [None] * world
    node = ray.get_runtime_context().get_node_id()
    if world > 1:
        torch.distributed.all_gather_object(nodes, node)
    else:
        nodes = [node]
    mlflow = MlflowClient(job["tracking_uri"]) if rank == 0 else None
    if mlflow is not None:
        mlflow.set_tag(job["run_id"], "ray_nodes", ",".join(sorted({str(n) for n in nodes})))
    monitor = None
    if mlflow is not None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(job["run_id"], sampling_interval=10, resume_logging=checkpoint is not None,
                                       tracking_uri=job["tracking_uri"])
        monitor.start()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            batches = 0
            try:
                for x_hr, x_lr, y in loader:
                    if fault is not None and rank == fault.rank and step == fault.step \
                            and not Path(fault.marker).exists():
                        Path(fault.marker).touch()
                        os._exit(1)  # a lost worker: no clean-up, no report
                    batch = Batch(x_hr=x_hr.to(device).float().div_(255), x_lr=x_lr.to(device).float().div_(255),
                                  labels=y.to(device))
                    losses = train_step(generator, discriminators, optimizers, batch, params.objective, step)
                    values = {k: float(v) for k, v in losses.items()}
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if mlflow is not None:
                        now = int(time.time() * 1000)
                        mlflow.log_batch(job["run_id"], metrics=[Metric(k, v, now, step) for k, v in values.items()])
                    step += 1
                    batches += 1
            except NonFiniteLossError as exc:
                # Every rank sees the same non-finite step (the check is all-reduced), so every rank
                # reports once more and stops: no hang, and no pointless restart from a checkpoint.
                # Result.metrics only carries checkpointed reports, so rank 0 attaches a marker.
                failure = {"nonfinite": str(exc), "epoch": epoch}
                if rank == 0:
                    with tempfile.TemporaryDirectory() as tmp:
                        (Path(tmp) / "nonfinite.json").write_text(json.dumps(failure))
                        ray.train.report(failure, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(failure)
                return
            for sched in schedulers:
                sched.step()
            metrics = {k: v / max(batches, 1) for k, v in sums.items()} | {"epoch": epoch,
                                                                           "nodes": len(set(nodes))}
            if mlflow is not None:
                now = int(time.time() * 1000)
                mlflow.log_batch(job["run_id"], metrics=[Metric(f"epoch_{k}", v, now, epoch)
                                                         for k, v in metrics.items() if k.startswith("L_")])
            last = epoch == cfg.epochs - 1
            if rank == 0 and (last or (epoch + 1) % cfg.checkpoint_every_epochs == 0):
                with tempfile.TemporaryDirectory() as tmp:
                    torch.save(_checkpoint_state(model, optimizers, schedulers, sampler, epoch, step, num_classes),
                               Path(tmp) / STATE_FILE)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
    finally:
        if monitor is not None:
            monitor.finish()


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.mlr_manifest_path(), params.model_dir(), Path(params.paths.runs))


if __name__ == "__main__":
    main()
