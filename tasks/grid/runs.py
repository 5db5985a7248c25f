"""A grid run's result: where it lives, its key (what it executed: resolved params, input manifests and
code), and whether the result on disk is current. Shared by the experiment stage, the report and the flow."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.grid import configs as grid
from tasks.grid.data import train_manifest, train_store
from tasks.infra import imports
from tasks.infra.imports import PROJECT_ROOT

RESULT_FILE = "result.json"


STAGE = "tasks.grid_run"  # the module every grid run executes (grid/dvc.yaml's command)


def run_dir(params: Params, config: str, seed: int) -> Path:
    return params.experiments_dir() / "runs" / config / f"seed-{seed}"


def result_path(params: Params, config: str, seed: int) -> Path:
    return run_dir(params, config, seed) / RESULT_FILE


def code_hash(root: Path = PROJECT_ROOT) -> str:
    """sha256 of the files a grid run executes, found by following the imports of its stage module:
    table definitions, labels and paper figures are not among them."""
    return imports.code_hash(STAGE, root)


def inputs(params: Params, config: str, code: str | None = None) -> dict[str, str]:
    """What a run reads: the manifests (rows, labels, splits), the stores' pixels, and its code."""
    from tasks.images.store import ImageStore
    from tasks.infra.tracking import file_hash

    return {"train_manifest": file_hash(train_manifest(params, config)),
            "eval_manifest": file_hash(params.mlr_manifest_path()),
            "train_store": ImageStore(train_store(params, config)).digest,
            "eval_store": ImageStore(params.store_dir()).digest, "code": code or code_hash()}


def current_key(params: Params, config: str, seed: int, code: str | None = None) -> str:
    return grid.run_key(params, config, seed, inputs(params, config, code))


def load_result(params: Params, config: str, seed: int) -> dict[str, Any] | None:
    path = result_path(params, config, seed)
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable result ({exc}); delete it to run again") from exc


def is_done(params: Params, config: str, seed: int, code: str | None = None) -> bool:
    result = load_result(params, config, seed)
    return result is not None and result.get("key") == current_key(params, config, seed, code)


def experiments_mlflow_name(params: Params) -> str:
    return f"rain-{params.dataset.name}-experiments"


def experiments_mlflow_description(params: Params) -> str:
    """What experiment `experiments_mlflow_name` holds, on its page in the MLflow UI."""
    from tasks.infra.tracking import EPOCH, EVAL, EVAL_STD, GAME, TRAIN

    return (f"The paper's experiment grid (`rain experiments`, grid/dvc.yaml) on dataset `{params.dataset.name}`: "
            f"a parent run per grid, with each table row's mean over seeds (`{EVAL}<config>.<row>_<metric>`, the "
            f"std over seeds in `{EVAL_STD}`) and the grid's tables and plots as artifacts; nested under it, one "
            f"run per configuration and seed with its params, losses per step (`{TRAIN}`) and epoch "
            f"(`{EPOCH}`), the min-max game's diagnostics (`{GAME}`), and every evaluation row (`{EVAL}`, "
            f"`{EVAL_STD}`).")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
