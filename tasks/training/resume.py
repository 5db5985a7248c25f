"""Continuing an interrupted training in a new invocation, and only when nothing it computes from changed.

A trial's Ray run is named by a key of what its weights depend on: the train stage's params (the list
dvc.yaml gives, `tasks.config.train_stage_params`), its input manifest and decoded-image store, and the
code the stage executes. Ray Train resumes a run whose name and storage folder it finds again from the last
checkpoint it reported, so a re-run with unchanged params, data and code continues where a killed one
stopped, and anything changed gets a new name and starts fresh. A finished run's folder is deleted once its
weights are written (they are the stage's output); interrupted ones are kept for resuming, at most
`ray.keep_runs`, the newest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tasks.config import Params, param_values, train_stage_params

MLFLOW_RUN_FILE = "rain-mlflow-run"  # in a Ray run's folder: the MLflow run a resumed run continues
STAGE = "tasks.train"


def inputs(mlr_path: Path, store_dir: Path, pretrained: str | None) -> dict[str, str]:
    """What every trial reads besides params: the MLR manifest, the store's pixels, the stage's code and the
    file of initial weights (by content: params name its path, or only `imagenet`)."""
    from tasks.images.store import ImageStore
    from tasks.infra.imports import code_hash
    from tasks.infra.tracking import file_hash

    return {"mlr_manifest": file_hash(mlr_path), "store": ImageStore(store_dir).digest, "code": code_hash(STAGE),
            "pretrained": file_hash(Path(pretrained)) if pretrained else "none"}


def run_key(params: Params, trial: int, inputs: dict[str, str]) -> str:
    """sha256 of the trial, the train stage's params (other trials listed do not count) and `inputs`."""
    wanted = train_stage_params()
    chosen = {k: v for k, v in param_values(params).items()
              if k != "train.trials" and any(k == w or k.startswith(w + ".") for w in wanted)}
    text = json.dumps({"trial": trial, "params": chosen, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_name(params: Params, trial: int, key: str) -> str:
    return f"{params.dataset.name}-trial{trial}-{key[:16]}"


def remember_mlflow_run(run_dir: Path, run_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MLFLOW_RUN_FILE).write_text(run_id)


def previous_mlflow_run(run_dir: Path) -> str | None:
    try:
        return (run_dir / MLFLOW_RUN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def prune(ray_dir: Path, keep: int, current: str) -> list[str]:
    """Delete all but the `keep` newest run folders (`current` always stays); returns the names deleted."""
    if not ray_dir.is_dir():
        return []
    others = sorted((d for d in ray_dir.iterdir() if d.is_dir() and d.name != current),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    doomed = others[max(keep - 1, 0):]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return [d.name for d in doomed]
