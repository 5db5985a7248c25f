"""The Prefect flow behind deployment `rain-grid/experiments`: the paper's comparison grid (tasks/grid/configs.py).

1. The data stages and `grid_data` run through DVC (`dvc repro --single-item`), as in flow `rain`.
2. Every (configuration, seed) whose result is missing or stale goes to the Ray cluster (`ray.address` /
   RAY_ADDRESS, else an embedded local one) as one Ray task (tasks/grid/cluster.py) with
   `experiments.cpus_per_run` CPUs, and one GPU with `experiments.use_gpu`: Ray decides how many run at
   once and where. A run whose worker is lost is retried (`ray.max_failures`); a run that fails does not
   stop the others. Each run is one Prefect task that waits for its Ray task. Runs already done are not
   run again: a grid stopped half-way continues with only the missing runs; runs in flight end with the
   flow process (its Ray job ends with it).
   Runs write the same result.json as `dvc repro grid/dvc.yaml` under `paths.experiments`, relative to the
   project folder: on a multi-node cluster the project folder must be storage every node sees.
3. `tasks.grid_report` writes the tables and plots and nests every run under this grid's MLflow
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
from typing import TYPE_CHECKING, Any, Literal, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.states import State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.links import grid_label, grid_run_name, label_flow_run
from flows.pipeline import run_stages, stage_env
from tasks.config import ExperimentsConfig, Params, ParamsError, load_params
from tasks.grid import cluster as grid_cluster
from tasks.grid import tables as grid_tables
from tasks.infra import reaper
from tasks.infra.logs import new_run_folder

if TYPE_CHECKING:
    from ray import ObjectRef

# The grid's tables by key (tasks/grid/tables.py TABLES; tests/test_flow_ui.py keeps the two equal): a Literal, so
# the deployment's form in the Prefect UI offers exactly these.
TableKey = Literal["table1", "table2", "table3", "table4", "figure5", "adv_sweep", "choices"]
# The dataset names params.yaml accepts (tasks/config.py DATASETS; tests/test_flow_ui.py keeps the two equal): the
# form offers them as a choice.
DatasetName = Literal["synthetic", "viper", "cuhk03", "cuhk03-detected", "caviar", "market1501", "custom"]
GRID_FILE = "grid/dvc.yaml"  # the grid's stages, outside the pipeline's dvc.yaml
DATA_STAGES = ("fingerprint", "download", "manifest", "synthesize", "decode", f"{GRID_FILE}:grid_data")
MAX_WAITING = 64  # Prefect tasks waiting on their Ray task at once; all runs are queued on the cluster at once
# Prefect's decorator is typed for the base future class; this runner's futures are a subclass.
_THREADS = cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(MAX_WAITING))


@task(name="grid-run", task_run_name="{config}-seed{seed}", cache_policy=NO_CACHE)
def grid_run(config: str, seed: int, run: ObjectRef[dict[str, Any]]) -> dict[str, Any]:
    """One grid run: waits for its Ray task (submitted by the flow); returns where it ran and its wall time."""
    outcome = grid_cluster.outcome(run)
    get_run_logger().info("%s seed %d: done in %.0f s on node %s (%s)", config, seed, outcome["seconds"],
                          outcome["node_id"][:12], outcome["host"])
    return outcome


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Params paths are relative to the project folder."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@flow(name="rain-grid", flow_run_name=grid_run_name, log_prints=True, task_runner=_THREADS)
def experiments(project_dir: str = ".", dataset: DatasetName | None = None, seeds: list[int] | None = None,
                tables: list[TableKey] | None = None) -> dict[str, Any] | State:
    """The paper's Tables 1-4 and Figure 5 on `dataset` over `seeds` (defaults: params.yaml).

    Args:
        project_dir: The rain project folder (params.yaml, dvc.yaml); relative to where the flow runs.
        dataset: Must equal params.yaml's dataset.name (a check, not a switch); empty: params.yaml's.
        seeds: Seeds to run, e.g. [0, 1, 2]; each trains on protocol trial seed mod protocol.trials. Empty:
            experiments.seeds in params.yaml.
        tables: Which tables to compute (only their configurations run): the paper's five and the L_adv
            sweep. Empty: all.
    """
    from tasks.grid.runs import code_hash, is_done
    from tasks.grid_report import open_parent_run
    from tasks.grid_report import run as report

    reaper.guard()  # nothing this flow starts outlives it (a killed flow run included)
    root = Path(project_dir).resolve()
    params = load_params(root / "params.yaml")
    if dataset is not None and dataset != params.dataset.name:
        raise ParamsError(f"dataset {dataset!r}: {root / 'params.yaml'} names dataset.name = "
                          f"{params.dataset.name!r}; every DVC stage's paths come from it, so set it there "
                          f"(or pass project_dir of a project set up for {dataset!r})")
    chosen = tuple(seeds) if seeds is not None else params.experiments.seeds
    ExperimentsConfig(seeds=chosen)  # refuses an empty or repeated seed list by name
    label_flow_run(*grid_label(params, chosen))
    selected = grid_tables.tables(tuple(tables) if tables else None)
    configs = grid_tables.configs_of(selected)
    logger = get_run_logger()
    log_dir = new_run_folder(root / params.paths.logs)  # this run's stage logs, a folder of its own
    stages = run_stages(DATA_STAGES, root, log_dir)
    if isinstance(stages, State):  # a stage failed: calling the flow raises its StageFailed
        return stages

    started = time.perf_counter()
    with _inside(root):
        code = code_hash(root)
        todo = [(c, s) for c in configs for s in chosen if not is_done(params, c, s, code)]
        parent = open_parent_run(params)
    logger.info("grid: %d configurations x %d seeds; %d to run, %d up to date",
                len(configs), len(chosen), len(todo), len(configs) * len(chosen) - len(todo))
    failed, outcomes = _run_all(todo, root, parent, params) if todo else ([], {})
    grid_seconds = time.perf_counter() - started
    record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seeds": list(chosen), "configs": configs,
              "ran": len(todo) - len(failed), "failed": failed, "reused": len(configs) * len(chosen) - len(todo),
              "wall_seconds": round(grid_seconds, 1),
              "run_seconds": {f"{c}-seed{s}": o["seconds"] for (c, s), o in outcomes.items()},
              "run_nodes": {f"{c}-seed{s}": o["node_id"] for (c, s), o in outcomes.items()},
              "nodes": len({o["node_id"] for o in outcomes.values()})}
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
         **{m: f"{100 * r[m]:.1f} ± {100 * r[m + '_std']:.1f}" for m in grid_tables.RANK1_AND_MAP if m in r}}
        for rows in summary["tables"].values() for r in rows], description="Mean ± std over seeds (%)")
    return summary | {"grid": record}


def deployment_form(properties: dict[str, Any], params: Params, project: Path) -> dict[str, Any]:
    """The run form of deployment `rain-grid/experiments` (`properties`: the flow's parameter schema): each optional
    field typed as its value with params.yaml's value as its default (the flow's own default, None, opens Prefect's
    form on "None" with `Property is type "None"` and leaves the Parameters tab's Type and Default blank), and the
    table choice listing each table's title beside its key (Prefect's multi-select shows the keys alone). The
    defaults are params.yaml's when `rain serve` read it; the flow itself still reads params.yaml for a run that
    does not set them (`prefect deployment run` without -p)."""
    def value_branch(prop: dict[str, Any]) -> dict[str, Any]:
        branch = next(o for o in prop.get("anyOf", [prop]) if o.get("type") != "null")
        return {k: v for k, v in prop.items() if k not in ("anyOf", "default")} | branch

    # A blank line between the items: Prefect 3.9's form drew "- a\n- b" as one item (seen in Chromium).
    titles = "\n\n".join(f"- `{t.key}`: {t.title}" for t in grid_tables.TABLES)
    form = dict(properties)
    form["project_dir"] = {**properties["project_dir"], "default": str(project)}
    form["dataset"] = value_branch(properties["dataset"]) | {"default": params.dataset.name}
    form["seeds"] = value_branch(properties["seeds"]) | {"default": list(params.experiments.seeds)}
    form["tables"] = value_branch(properties["tables"]) | {
        "default": [t.key for t in grid_tables.TABLES],
        "description": f"{properties['tables'].get('description', '')}\n\n{titles}".strip()}
    return form


def _run_all(todo: list[tuple[str, int]], root: Path, parent: str, params: Params
             ) -> tuple[list[str], dict[tuple[str, int], dict[str, Any]]]:
    """Queue every run on the Ray cluster, then wait for each as its own Prefect task; a failed run does not
    stop the others. Returns the failed runs (in grid order) and the others' outcomes."""
    with grid_cluster.cluster(params.ray.address):  # a cluster this opened ends here, with any run still going
        queued = {(c, s): grid_cluster.submit(params, c, s, root, parent) for c, s in todo}  # all before any wait
        waiting = {grid_run.submit(c, s, run): (c, s) for (c, s), run in queued.items()}
        outcomes: dict[tuple[str, int], dict[str, Any]] = {}
        for done in as_completed(list(waiting)):
            config, seed = waiting[done]
            try:
                outcomes[(config, seed)] = done.result()
            except Exception as exc:
                get_run_logger().error("grid run %s seed %d failed: %s", config, seed, exc)
    failed = [f"{config} seed {seed}" for config, seed in todo if (config, seed) not in outcomes]
    return failed, outcomes


def _fail_parent(run_id: str) -> None:
    from mlflow import MlflowClient

    from tasks.infra.tracking import tracking_uri

    MlflowClient(tracking_uri()).set_terminated(run_id, status="FAILED")


def _record_in_dvc(root: Path, params: Params, seeds: tuple[int, ...], configs: list[str],
                   selected: tuple[grid_tables.Table, ...]) -> None:
    """`dvc commit` the matrix stages this grid computed (the ones dvc.yaml has: params.yaml's seeds)."""
    logger = get_run_logger()
    stages = [f"{GRID_FILE}:grid_run@{c}-{s}" for c in configs for s in seeds if s in params.experiments.seeds]
    if selected == grid_tables.TABLES and tuple(seeds) == tuple(params.experiments.seeds):
        stages.append(f"{GRID_FILE}:grid_report")
    if not stages:
        return
    out = subprocess.run([sys.executable, "-m", "dvc", "--wait-for-lock", "commit", "--force", *stages], cwd=root,
                         env=stage_env(), capture_output=True, text=True)
    if out.returncode != 0:  # the results stand; only `dvc repro` will not know them
        logger.warning("dvc commit of the grid failed (exit %d): %s", out.returncode, out.stderr[-2000:])


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower())
