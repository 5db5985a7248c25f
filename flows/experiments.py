"""The Prefect flow behind deployment `rain/experiments`: the paper's comparison grid (tasks/grid.py).

1. The data stages and `experiment_data` run through DVC (`dvc repro --single-item`), as in flow `rain`.
2. Every (configuration, seed) whose result is missing or stale runs as `python -m tasks.experiment`,
   the command of dvc.yaml's `experiment` matrix, as many at once as `experiments.parallel` allows (one
   Prefect task each). Runs already done are not run again: a grid stopped half-way continues with only
   the missing runs.
3. `tasks.experiments_report` writes the tables and plots and nests every run under this grid's MLflow
   parent run; the flow publishes the table as a Prefect artifact.
4. Runs and report are recorded in dvc.lock (`dvc commit`), so `dvc repro` afterwards has nothing to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.pipeline import stage_env, stage_task, stream_command
from tasks import grid
from tasks.config import ExperimentsConfig, Params, ParamsError, load_params

GRID_FILE = "grid/dvc.yaml"  # the grid's stages, outside the pipeline's dvc.yaml
DATA_STAGES = ("download", "manifest", "synthesize", f"{GRID_FILE}:experiment_data")
MAX_PARALLEL = 64  # the thread pool's size; `experiments.parallel` decides how many runs really go at once
# Prefect's decorator is typed for the base future class; this runner's futures are a subclass.
_THREADS = cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(MAX_PARALLEL))


def run_parallelism(params: Params) -> int:
    cfg = params.experiments
    if cfg.parallel:
        return cfg.parallel
    if cfg.use_gpu:
        import torch

        return max(1, torch.cuda.device_count())
    return max(1, (os.cpu_count() or 1) // cfg.cpus_per_run)


@task(name="grid-run", task_run_name="{config}-seed{seed}")
def grid_run(config: str, seed: int, project_dir: Path, parent_run_id: str, threads: int, gpu: int | None) -> float:
    """One grid run as its own process (the dvc.yaml command); returns its wall time."""
    env = stage_env() | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    cmd = [sys.executable, "-m", "tasks.experiment", config, str(seed), "--parent-run-id", parent_run_id]
    started = time.perf_counter()
    stream_command(cmd, project_dir, env, f"experiment@{config}-{seed}")
    return time.perf_counter() - started


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Params paths are relative to the project folder."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@flow(name="rain", flow_run_name="experiments", log_prints=True, task_runner=_THREADS)
def experiments(project_dir: str = ".", dataset: str | None = None, seeds: list[int] | None = None,
                tables: list[str] | None = None) -> dict[str, Any]:
    """The paper's Tables 1-4 and Figure 5 on `dataset` over `seeds` (defaults: params.yaml)."""
    from tasks.experiment import code_hash, is_done
    from tasks.experiments_report import open_parent_run
    from tasks.experiments_report import run as report

    root = Path(project_dir).resolve()
    params = load_params(root / "params.yaml")
    if dataset is not None and dataset != params.dataset.name:
        raise ParamsError(f"dataset {dataset!r}: {root / 'params.yaml'} names dataset.name = "
                          f"{params.dataset.name!r}; every DVC stage's paths come from it, so set it there "
                          f"(or pass project_dir of a project set up for {dataset!r})")
    chosen = tuple(seeds) if seeds is not None else params.experiments.seeds
    ExperimentsConfig(seeds=chosen)  # refuses an empty or repeated seed list by name
    selected = grid.tables(tuple(tables) if tables else None)
    configs = grid.configs_of(selected)
    logger = get_run_logger()
    for stage in DATA_STAGES:
        stage_task.with_options(name=stage.rpartition(":")[2])(stage, root)

    started = time.perf_counter()
    with _inside(root):
        code = code_hash(root)
        todo = [(c, s) for c in configs for s in chosen if not is_done(params, c, s, code)]
        parent = open_parent_run(params)
    parallel = run_parallelism(params)
    logger.info("grid: %d configurations x %d seeds; %d to run, %d up to date; %d at once",
                len(configs), len(chosen), len(todo), len(configs) * len(chosen) - len(todo), parallel)
    failed, wall = _run_all(todo, root, parent, params, parallel)
    grid_seconds = time.perf_counter() - started
    record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seeds": list(chosen), "configs": configs,
              "ran": len(todo) - len(failed), "failed": failed, "reused": len(configs) * len(chosen) - len(todo),
              "parallel": parallel, "wall_seconds": round(grid_seconds, 1),
              "run_seconds": {f"{c}-seed{s}": round(t, 1) for (c, s), t in wall.items()}}
    with _inside(root):
        log_file = params.experiments_dir() / "grid_runs.jsonl"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if failed:
            _fail_parent(parent)
            raise RuntimeError(f"{len(failed)} grid run(s) failed: {', '.join(failed)} (the others are kept; "
                               "run the grid again to retry only these)")
        summary = report(params, chosen, parent, tuple(t.key for t in selected))
    _record_in_dvc(root, params, chosen, configs, selected)
    results_md = (root / params.experiments_dir() / "results.md").read_text()
    create_markdown_artifact(key=f"rain-experiments-{_slug(params.dataset.name)}", markdown=results_md)
    create_table_artifact(key=f"rain-experiments-table-{_slug(params.dataset.name)}", table=[
        {"table": r["table"], "row": r["row"], "config": r["config"],
         **{m: f"{100 * r[m]:.1f} ± {100 * r[m + '_std']:.1f}" for m in ("rank1", "mAP") if m in r}}
        for rows in summary["tables"].values() for r in rows], description="Mean ± std over seeds (%)")
    return summary | {"grid": record}


def _run_all(todo: list[tuple[str, int]], root: Path, parent: str, params: Params, parallel: int
             ) -> tuple[list[str], dict[tuple[str, int], float]]:
    """Keep `parallel` runs going until none is left; a failed run does not stop the others."""
    pending = list(todo)
    running: dict[PrefectFuture[float], tuple[str, int]] = {}
    failed: list[str] = []
    wall: dict[tuple[str, int], float] = {}
    slots = list(range(parallel))
    slot_of: dict[PrefectFuture[float], int] = {}
    while pending or running:
        while pending and len(running) < parallel:
            config, seed = pending.pop(0)
            slot = slots.pop(0)
            gpu = slot if params.experiments.use_gpu else None
            future = grid_run.submit(config, seed, root, parent, params.experiments.cpus_per_run, gpu)
            running[future], slot_of[future] = (config, seed), slot
        done = next(as_completed(list(running)))
        config, seed = running.pop(done)
        slots.append(slot_of.pop(done))
        try:
            wall[(config, seed)] = done.result()
        except Exception as exc:
            get_run_logger().error("grid run %s seed %d failed: %s", config, seed, exc)
            failed.append(f"{config} seed {seed}")
    return failed, wall


def _fail_parent(run_id: str) -> None:
    from mlflow import MlflowClient

    from tasks.tracking import tracking_uri

    MlflowClient(tracking_uri()).set_terminated(run_id, status="FAILED")


def _record_in_dvc(root: Path, params: Params, seeds: tuple[int, ...], configs: list[str],
                   selected: tuple[grid.Table, ...]) -> None:
    """`dvc commit` the matrix stages this grid computed (the ones dvc.yaml has: params.yaml's seeds)."""
    logger = get_run_logger()
    stages = [f"{GRID_FILE}:experiment@{c}-{s}" for c in configs for s in seeds if s in params.experiments.seeds]
    if selected == grid.TABLES and tuple(seeds) == tuple(params.experiments.seeds):
        stages.append(f"{GRID_FILE}:experiments_report")
    if not stages:
        return
    out = subprocess.run([sys.executable, "-m", "dvc", "--wait-for-lock", "commit", "--force", *stages], cwd=root,
                         env=stage_env(), capture_output=True, text=True)
    if out.returncode != 0:  # the results stand; only `dvc repro` will not know them
        logger.warning("dvc commit of the grid failed (exit %d): %s", out.returncode, out.stderr[-2000:])


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())
