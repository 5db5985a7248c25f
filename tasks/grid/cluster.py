"""The experiment grid on a Ray cluster: each (configuration, seed) of tasks/grid/configs.py is one Ray task.

A run is `tasks.grid_run.run` inside a Ray worker, which asks for `experiments.cpus_per_run` CPUs and,
with `experiments.use_gpu`, one GPU (Ray sets CUDA_VISIBLE_DEVICES). Ray's scheduler decides how many runs
go at once and on which node. A run whose worker is lost (process killed, node gone) is run again, up to
`ray.max_failures` times; an exception raised by the run itself is a real failure and is not retried.

The cluster is the one `ray.address` / RAY_ADDRESS names, else an embedded local one (tasks/infra/raycluster.py).
A run reads its data and writes its result.json relative to the project folder, as the DVC command does:
on a multi-node cluster that folder (with `paths.experiments` in it) must be storage every node sees at
the same path, and every node needs this code installed.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import Params
from tasks.infra.raycluster import connect, disconnect, require_resources

if TYPE_CHECKING:
    from ray import ObjectRef

    from tasks.training.loop import FaultPlan

# Read by a run from the driver's environment, not the worker's: a node started by `ray start` elsewhere
# would otherwise log to its own default (the project's sqlite file) instead of the grid's MLflow server.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)
TASK_NAME = "grid_run"  # worker processes show `ray::grid_run` while they train a run


@contextmanager
def cluster(address: str | None) -> Iterator[None]:
    """Connected to the grid's Ray cluster for the duration. A connection this opened is closed at the end,
    so the runs it submitted end with it (an embedded cluster stops); one already open is left as it is."""
    already = sys.modules.get("ray")  # not imported here before `connect`: it sets what `import ray` reads
    opened = already is None or not already.is_initialized()
    connect(address)
    try:
        yield
    finally:
        if opened:
            disconnect()


def submit(params: Params, config: str, seed: int, project_dir: Path, parent_run_id: str | None,
           fault: FaultPlan | None = None) -> ObjectRef[dict[str, Any]]:
    """Queue run (`config`, `seed`) on the cluster; `ray.get` of the reference gives `grid_run`'s summary.
    `fault` is a test hook: the run's training loop kills its worker once (tasks/training/loop.py)."""
    connect(params.ray.address)
    import ray

    cfg = params.experiments
    # One run must fit a node, or Ray would keep it pending for ever.
    require_resources(1, cfg.cpus_per_run, 1 if cfg.use_gpu else 0, "experiments.cpus_per_run, experiments.use_gpu")
    remote = ray.remote(grid_run).options(
        name=TASK_NAME, num_cpus=cfg.cpus_per_run, num_gpus=1 if cfg.use_gpu else 0,
        max_retries=params.ray.max_failures, retry_exceptions=False)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    ref: ObjectRef[dict[str, Any]] = remote.remote(params, config, seed, str(project_dir.resolve()), parent_run_id,
                                                   env, fault)
    return ref


def outcome(ref: ObjectRef[dict[str, Any]]) -> dict[str, Any]:
    """Wait for a submitted run; raises the run's exception (or Ray's, when its worker was lost too often)."""
    import ray

    summary: dict[str, Any] = ray.get(ref)
    return summary


def grid_run(params: Params, config: str, seed: int, project_dir: str, parent_run_id: str | None,
             env: dict[str, str], fault: FaultPlan | None) -> dict[str, Any]:
    """The Ray task: one grid run in this worker process, inside the project folder (params paths are
    relative to it). Returns where it ran and how long it took; the result itself is in result.json."""
    import ray
    import torch

    from tasks import grid_run
    from tasks.infra.logs import setup_logging

    setup_logging()
    torch.set_num_threads(params.experiments.cpus_per_run)
    before_dir, before_env = Path.cwd(), {k: os.environ.get(k) for k in env}
    os.chdir(project_dir)
    os.environ.update(env)
    started = time.perf_counter()
    try:
        grid_run.run(params, config, seed, parent_run_id, fault=fault)
    finally:  # the worker process serves other tasks afterwards
        os.chdir(before_dir)
        for key, value in before_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"config": config, "seed": seed, "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(), "seconds": round(time.perf_counter() - started, 1)}
