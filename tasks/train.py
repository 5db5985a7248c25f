"""Stage `train`: the RAIN objective under Ray Train (`TorchTrainer`, DDP), one model per listed trial.

The driver starts (or joins) a Ray cluster, checks that it can place the worker group (else it fails at once,
naming both sides), opens one MLflow run per trial, and runs `train_worker` on `ray.num_workers` workers,
over DDP with `ddp_backend` (NCCL on GPUs, gloo on CPUs). Workers read the decoded-image store and
checkpoint (tasks/training/loop.py `checkpoint_due`) into <paths.runs>/ray/<run>, outside every DVC output.
The run's name is a key of its params, data and code (tasks/training/resume.py), so a restarted worker group
and a re-run after a killed one both continue from the last checkpoint, in the same MLflow run. The final
weights are written as safetensors into models/<dataset>/, the stage's DVC output. A signal (the flow was
killed) marks the MLflow run KILLED and writes no weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tasks.config import Params, flat_params, load_params, params_values_sha256
from tasks.infra.logs import setup_logging
from tasks.infra.raycluster import connect, require_resources
from tasks.infra.tracking import (
    CMC,
    COLLAPSE,
    EPOCH,
    EVAL,
    EVAL_STD,
    GAME,
    TIME,
    TRAIN,
    git_commit,
    log_params,
    mlflow_experiment_id,
    results_view,
    tracking_uri,
)
from tasks.training import resume, weights
from tasks.training.artifacts import STATE_FILE, summary_path, weights_path
from tasks.training.loop import (
    FaultPlan,
    NonFiniteTraining,
    TrainJob,
    WorkerContext,
    ddp_backend,
    kept_weights,
    train_loop,
)

log = logging.getLogger(__name__)

__all__ = ["FaultPlan", "NonFiniteTraining", "run", "train_worker"]


def run(params: Params, mlr_path: Path, store_dir: Path, model_dir: Path, runs_dir: Path,
        fault: FaultPlan | None = None) -> dict[str, Any]:
    """Train each listed trial on a Ray worker group; write its weights and the stage's summary."""
    import mlflow

    as_written = params  # the run key hashes params as params.yaml has them, the initial weights by content
    params = weights.resolve(params)  # a missing file fails here, not in a worker
    connect(params.ray.address)  # before `ray.train` is imported (by _torch_trainer): it imports ray
    ray_params = params.ray
    require_resources(ray_params.num_workers, ray_params.cpus_per_worker, 1 if ray_params.use_gpu else 0,
                      "ray.num_workers x (ray.cpus_per_worker, ray.use_gpu)")
    model_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri()
    client = mlflow.MlflowClient(uri)
    exp_id = mlflow_experiment_id(client, f"rain-{params.dataset.name}", experiment_description(params),
                                  views=results_view())

    summary: dict[str, Any] = {"trials": {}}
    reads = resume.inputs(mlr_path, store_dir, params.model.pretrained_path)
    for trial in params.train.trials:
        rows = _training_rows(mlr_path, trial)
        name = resume.run_name(params, trial, resume.run_key(as_written, trial, reads))
        ray_dir = runs_dir.resolve() / "ray"
        pruned = resume.prune(ray_dir, ray_params.keep_runs, current=name)
        if pruned:
            log.info("train: deleted %d older interrupted Ray run(s) (ray.keep_runs = %d)", len(pruned),
                     ray_params.keep_runs)
        run_id = _open_mlflow_run(client, exp_id, ray_dir / name, params, trial, reads["mlr_manifest"])
        # Workers do not share the driver's working folder: the store's path is absolute.
        job = TrainJob(params=params, rows=rows, store=str(store_dir.resolve()), tracking_uri=uri, run_id=run_id,
                       fault=fault, mlr=str(mlr_path.resolve()))
        summary["trials"][str(trial)] = _train_trial(job, trial, name, client, run_id, model_dir, ray_dir)
    summary_path(model_dir).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _training_rows(mlr_path: Path, trial: int) -> list[dict[str, Any]]:
    from tasks.images.loaders import read_rows

    rows = read_rows(str(mlr_path), trial, ["train"])
    if not rows:
        raise ValueError(f"{mlr_path}: trial {trial} has no training rows (protocol.trials too small?)")
    return rows


def experiment_description(params: Params) -> str:
    """What experiment `rain-<dataset>` holds, on its page in the MLflow UI."""
    return (f"Training runs of the RAIN pipeline (`dvc repro`, `rain run`) on dataset `{params.dataset.name}`: one "
            f"run per trained trial, with every parameter, each loss by its paper name per step (`{TRAIN}`) and "
            f"its epoch mean (`{EPOCH}`), the min-max game's diagnostics per epoch (`{GAME}`: each D_j's accuracy, "
            f"the HR-LR feature distance, L_adv's gradient against the identity losses'), the evaluation figures "
            f"per query row (`{EVAL}`, their std in "
            f"`{EVAL_STD}`), each row's CMC curve over rank (`{CMC}`) (every rank-k, mAP and accuracy in percent, "
            f"as the results table and the descriptions give them), the report pictures, a results table as the "
            f"run's description, and the logged model that the register stage makes a version of "
            f"`{params.register.model_name}`. The saved view \"Results\" (Views) lists each run's figures.")


def _open_mlflow_run(client: Any, exp_id: str, ray_run: Path, params: Params, trial: int,
                     mlr_manifest_sha256: str) -> str:
    """The MLflow run of Ray run `ray_run`: the interrupted one it resumes, reopened, or a new one tagged with
    its lineage and holding every param; returns its id. The lineage tags are named as on the model version
    (tasks/register.py): `mlr_manifest_sha256` (the data it trained on), `params_values_sha256` (every
    parameter value it ran with, initial weights resolved)."""
    previous = resume.previous_mlflow_run(ray_run)
    if previous is not None:
        try:
            status = client.get_run(previous).info.status
        except Exception:  # deleted, or another tracking store
            status = None
        if status in ("RUNNING", "KILLED", "FAILED"):
            client.update_run(previous, status="RUNNING")
            client.set_tag(previous, "resumed", "true")
            log.info("train: trial %d resumes Ray run %s from its last checkpoint (MLflow run %s)", trial,
                     ray_run.name, previous)
            return str(previous)
    name = f"{params.dataset.name}-trial{trial}-{time.strftime('%Y%m%d-%H%M%S')}"
    mlflow_run = client.create_run(exp_id, run_name=name, tags={
        "git_commit": git_commit(), "mlr_manifest_sha256": mlr_manifest_sha256,
        "params_values_sha256": params_values_sha256(params),
        "dataset": params.dataset.name, "ray_run": ray_run.name,
        "trial": str(trial), "variant": params.objective.variant, "stage": "train"})
    run_id = str(mlflow_run.info.run_id)
    log_params(client, run_id, flat_params(params))
    resume.remember_mlflow_run(ray_run, run_id)
    return run_id


def _train_trial(job: TrainJob, trial: int, name: str, client: Any, run_id: str, model_dir: Path,
                 ray_dir: Path) -> dict[str, Any]:
    """Fit one trial, write its final weights and finish its MLflow run; returns the trial's summary."""
    trainer = _torch_trainer(job, name, ray_dir)
    started = time.perf_counter()
    result, state = _fit(trainer, client, run_id, trial, name)
    _save_weights(kept_weights(state), weights_path(model_dir, trial))
    shutil.rmtree(ray_dir / name, ignore_errors=True)  # finished: nothing left to resume
    seconds = time.perf_counter() - started
    client.log_metric(run_id, TIME + "train_seconds", seconds)
    client.set_terminated(run_id, status="FINISHED")
    trial_summary = {
        "weights": weights_path(model_dir, trial).name, "mlflow_run_id": run_id, "ray_run": name,
        "num_classes": state["num_classes"], "epochs": state["epoch"] + 1, "seconds": round(seconds, 1),
        "kept_epoch": (state.get("best") or {}).get("epoch", state["epoch"]) + 1,  # best on validation, else the last
        "ray_nodes": int((result.metrics or {}).get("nodes", 1)), "workers": job.params.ray.num_workers,
        "final_losses": {k: round(v, 5) for k, v in (result.metrics or {}).items()
                         if k.startswith("L_")},
        COLLAPSE: (result.metrics or {}).get(COLLAPSE),  # why the last epoch's features collapsed; None: they did not
    }
    log.info("train: trial %d done in %.0f s, last epoch's losses %s", trial, seconds,
             "  ".join(f"{k} {v:.4g}" for k, v in trial_summary["final_losses"].items()))
    if trial_summary[COLLAPSE] is not None:
        log.warning("train: trial %d ended collapsed: %s (MLflow run %s, tag `%s`)", trial, trial_summary[COLLAPSE],
                    run_id, COLLAPSE)
    return trial_summary


def _torch_trainer(job: TrainJob, name: str, ray_dir: Path) -> Any:
    """`train_worker` on `ray.num_workers` DDP workers, checkpointing under <ray_dir>/<name> (Ray resumes a
    run it finds there)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_params = job.params.ray
    return TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend=ddp_backend(torch.device("cuda" if ray_params.use_gpu else "cpu"))),
        scaling_config=ScalingConfig(num_workers=ray_params.num_workers, use_gpu=ray_params.use_gpu,
                                     resources_per_worker={"CPU": ray_params.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=str(ray_dir),
            failure_config=FailureConfig(max_failures=ray_params.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ray_params.keep_checkpoints)),
    )


def _fit(trainer: Any, client: Any, run_id: str, trial: int, name: str) -> tuple[Any, dict[str, Any]]:
    """(Ray result, final checkpoint state); a failed, non-finite or checkpoint-less fit fails the MLflow run."""
    try:
        result = trainer.fit()
    except (SystemExit, KeyboardInterrupt):  # a signal: Ray's driver turns SIGTERM and SIGINT into these
        client.set_terminated(run_id, status="KILLED")
        log.warning("train: trial %d stopped by a signal; MLflow run %s marked KILLED, no weights written; a "
                    "re-run with the same params, data and code resumes Ray run %s", trial, run_id, name)
        raise
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
    return result, state


def _save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Written whole or not at all: a stage killed mid-write leaves no truncated weights."""
    from safetensors.torch import save_file

    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(partial))
    os.replace(partial, path)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: the shared loop with Ray's rank, device, checkpoint and report."""
    import ray.train

    setup_logging(replace=True)  # Ray's root handler drops the logger's name, by which the flow's log keeps a line
    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if job.params.ray.use_gpu else torch.device("cpu")
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group or run: continue from the last reported state
        with checkpoint.as_directory() as ckpt_dir:
            resume = torch.load(Path(ckpt_dir) / STATE_FILE, map_location=device, weights_only=True)
        if "nonfinite" in resume:  # a marker, not a state: that run stopped on a NaN; start over
            resume = None

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None:
            ray.train.report(metrics)
            return
        # Uploaded in the background (training goes on); Ray deletes the local copy once stored. A worker
        # lost mid-upload resumes from the previous committed checkpoint, which is just as exact.
        local = Path(tempfile.mkdtemp(prefix="rain-checkpoint-"))
        torch.save(state, local / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)

    train_loop(job, WorkerContext(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                                  node=ray.get_runtime_context().get_node_id(), resume=resume, report=report))


def main() -> None:
    setup_logging()
    params = load_params()
    run(params, params.mlr_manifest_path(), params.store_dir(), params.model_dir(), Path(params.paths.runs))


if __name__ == "__main__":
    main()
