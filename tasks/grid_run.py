"""Stage `grid_run` (a grid/dvc.yaml matrix over configuration x seed): one run of the paper's grid.

The run trains configuration `config` (tasks/grid/configs.py) with `seed` in this process (the shared training
loop, tasks/training/loop.py, as one worker: grid runs are small and many, so they go side by side rather
than each over a Ray worker group), then scores it exactly as the evaluate stage does, on the pipeline's
MLR queries of its trial. It writes <experiments>/<dataset>/runs/<config>/seed-<seed>/result.json, last
and atomically: a run stopped half-way leaves no result, so it counts as missing and runs again.

A result carries a key (tasks/grid/runs.py): the hash of the run's resolved params, its input manifests
and the code it executes.
A run whose result has the current key is up to date and is not trained again, whichever of `dvc repro`
or the Prefect flow `rain-grid/experiments` asks for it.

    python -m tasks.grid_run <config> <seed> [--parent-run-id RUN]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from rain_model.config import RETRIEVAL_FEATURES
from tasks.config import Params, flat_params, load_params
from tasks.grid import configs as grid
from tasks.grid.data import train_manifest, train_store
from tasks.grid.runs import (
    experiments_mlflow_description,
    experiments_mlflow_name,
    inputs,
    load_result,
    result_path,
    write_atomic,
)
from tasks.infra.logs import setup_logging
from tasks.infra.tracking import COLLAPSE, GAME, RANK1_BY_FEATURE, VALIDATION
from tasks.training import weights

if TYPE_CHECKING:
    import torch

    from tasks.training.loop import FaultPlan, TrainJob

log = logging.getLogger(__name__)

def run(params: Params, config: str, seed: int, parent_run_id: str | None = None,
        fault: FaultPlan | None = None) -> dict[str, Any]:
    """Train and score one grid run; returns its result (also written to result.json). `fault` is a test
    hook: the training loop kills this process once at a given step (tasks/training/loop.py)."""
    from tasks.training.loop import TrainJob

    run_inputs = inputs(params, config)  # once: the key and the result record the same inputs
    key = grid.run_key(params, config, seed, run_inputs)
    existing = load_result(params, config, seed)
    if existing is not None and existing.get("key") == key:
        log.info("experiment %s seed %d: up to date (%s)", config, seed, result_path(params, config, seed))
        return existing
    run_params = _run_params(params, config, seed)
    trial = grid.trial_of(params, seed)
    rows = _training_rows(params, config, trial)
    device = _device(params)

    client, run_id = _start_mlflow_run(params, run_params, config, seed, trial, key, parent_run_id, flat_params)
    try:
        job = TrainJob(params=weights.resolve(run_params), rows=rows, store=str(train_store(params, config).resolve()),
                       tracking_uri=client.tracking_uri, run_id=run_id, fault=fault,
                       mlr=str(train_manifest(params, config).resolve()))
        state, final_metrics, train_seconds = _train(job, device, f"experiment {config} seed {seed}")
        # A run that chooses a setting is scored on its validation split only: the test split is not read.
        scores, eval_seconds = _score(params, run_params, state, trial, device) if grid.CONFIGS[config].test \
            else ({}, 0.0)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    table = _table(params, scores)
    result = {
        "config": config, "seed": seed, "trial": trial, "key": key, "inputs": run_inputs,
        "description": grid.CONFIGS[config].description, "epochs": run_params.train.epochs,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "final_losses": {k: round(float(v), 5) for k, v in final_metrics.items() if k.startswith("L_")},
        "final_game": {k.removeprefix(GAME): round(float(v), 5) for k, v in final_metrics.items()
                       if k.startswith(GAME)},
        "validation": _validation(run_params, state, final_metrics),
        COLLAPSE: final_metrics.get(COLLAPSE),  # why the last epoch's features collapsed; None: they did not
        "rows": table, "mlflow_run_id": run_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _finish_mlflow_run(client, run_id, result)
    write_atomic(result_path(params, config, seed), json.dumps(result, indent=2))
    if table:
        log.info("experiment %s seed %d: LR rank-1 %.1f%%, r8 rank-1 %.1f%% (train %.0f s, eval %.0f s)", config,
                 seed, 100 * table["lr"]["rank1"], 100 * table.get("r8", table["lr"])["rank1"], train_seconds,
                 eval_seconds)
    else:
        log.info("experiment %s seed %d: validation LR rank-1 %.1f%% (train %.0f s; test split not read)", config,
                 seed, 100 * state["best"]["lr_rank1"], train_seconds)
    return result


def _validation(run_params: Params, state: dict[str, Any], final_metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The validation split's verdict: the epoch kept (1-based) and its LR rank-1; None without validation."""
    if state.get("best") is None:
        return None
    return {"identities": run_params.protocol.val_identities, "kept_epoch": state["best"]["epoch"] + 1,
            "lr_rank1": round(float(state["best"]["lr_rank1"]), 6),
            "last_epoch_lr_rank1": round(float(final_metrics[VALIDATION + "lr_rank1"]), 6),
            **{f"last_epoch_{k}": round(float(final_metrics[VALIDATION + k]), 6)  # HR against LR, in eval mode
               for k in ("probe_accuracy", "centroid_gap", *(RANK1_BY_FEATURE + f for f in RETRIEVAL_FEATURES))
               if VALIDATION + k in final_metrics}}


def _run_params(params: Params, config: str, seed: int) -> Params:
    """The params configuration `config` trains with under `seed`, checkpointing after the last epoch only
    (the state is held in memory, not written, and only the last one is used)."""
    run_params = grid.configure(params, config, seed)
    return dataclasses.replace(run_params, train=dataclasses.replace(
        run_params.train, checkpoint_every_epochs=0, checkpoint_every_seconds=math.inf))


def _training_rows(params: Params, config: str, trial: int) -> list[dict[str, Any]]:
    from tasks.images.loaders import read_rows

    rows = read_rows(str(train_manifest(params, config)), trial, ["train"])
    if not rows:
        raise ValueError(f"{train_manifest(params, config)}: trial {trial} has no training rows")
    return rows


def _device(params: Params) -> torch.device:
    import torch

    device = torch.device("cuda") if params.experiments.use_gpu else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("experiments.use_gpu is true but this process sees no CUDA device")
    return device


def _train(job: TrainJob, device: torch.device, what: str) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The shared training loop as one worker in this process; returns (final checkpoint state, last
    epoch's report, seconds). A non-finite loss raises NonFiniteTraining naming `what`."""
    from tasks.training.loop import NonFiniteTraining, WorkerContext, train_loop

    final: dict[str, Any] = {}

    def keep(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        final["metrics"] = metrics
        if state is not None:
            final["state"] = state

    started = time.perf_counter()
    train_loop(job, WorkerContext(device=device, report=keep))
    if "nonfinite" in final.get("metrics", {}):
        raise NonFiniteTraining(f"{what}: {final['metrics']['nonfinite']}")
    return final["state"], final["metrics"], time.perf_counter() - started


def _score(params: Params, run_params: Params, state: dict[str, Any], trial: int,
           device: torch.device) -> tuple[dict[str, Any], float]:
    """The trained model scored exactly as the evaluate stage scores, on the pipeline's MLR queries of
    `trial`; returns (scores per query set, seconds)."""
    from rain_model.network import RAIN
    from tasks.evaluation.scoring import score_trial
    from tasks.images.store import ImageStore
    from tasks.training.loop import kept_weights

    model = RAIN(weights.without_initial_weights(run_params).model, state["num_classes"])
    model.load_state_dict(kept_weights(state))
    model = model.to(device).eval()
    started = time.perf_counter()
    scores, _ = score_trial(model, run_params, params.mlr_manifest_path(), trial, ImageStore(params.store_dir()))
    return scores, time.perf_counter() - started


def _table(params: Params, scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One summary row per query set, labelled as the grid's tables label it."""
    from tasks.evaluation.scoring import row_label, summarise

    unseen = params.protocol.unseen_rates
    return {name: summarise(name, evals) | {"label": row_label(name, unseen)} for name, evals in scores.items()}


def _finish_mlflow_run(client: Any, run_id: str, result: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    from tasks.infra.tracking import TIME, eval_metrics, log_metrics

    now = int(time.time() * 1000)
    seconds = {TIME + name: result[name] for name in ("train_seconds", "eval_seconds")}
    figures = [Metric(key, value, now, 0) for key, value in (eval_metrics(result["rows"]) | seconds).items()]
    log_metrics(client, run_id, figures)
    client.set_terminated(run_id, status="FINISHED")


def _start_mlflow_run(params: Params, run_params: Params, config: str, seed: int, trial: int, key: str,
                      parent_run_id: str | None, flat_params: Any) -> tuple[Any, str]:
    from mlflow import MlflowClient

    from tasks.infra.tracking import git_commit, log_params, mlflow_experiment_id, tracking_uri

    client = MlflowClient(tracking_uri())
    exp_id = mlflow_experiment_id(client, experiments_mlflow_name(params), experiments_mlflow_description(params))
    tags = {"config": config, "seed": str(seed), "trial": str(trial), "result_key": key, "git_commit": git_commit(),
            "dataset": params.dataset.name, "stage": "experiment"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, run_name=f"{config}-seed{seed}", tags=tags).info.run_id
    log_params(client, run_id, flat_params(run_params))
    return client, str(run_id)


def main() -> None:
    ap = argparse.ArgumentParser(description="Train and score one configuration of the paper's grid.")
    ap.add_argument("config", choices=list(grid.CONFIGS))
    ap.add_argument("seed", type=int)
    ap.add_argument("--parent-run-id", default=None, help="MLflow run to nest this run under")
    args = ap.parse_args()
    setup_logging()
    params = load_params()
    import torch

    torch.set_num_threads(params.experiments.cpus_per_run)
    run(params, args.config, args.seed, args.parent_run_id)


if __name__ == "__main__":
    main()
