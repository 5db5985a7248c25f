"""The loop every training worker runs, free of Ray: rank, device, resume state and reporting come in a
WorkerContext, so the same code runs under Ray Train (tasks/train.py) and in a plain process (bench/).

Every epoch ends with exactly one `report` on every rank (Ray requires equal counts). Rank 0 attaches
a checkpoint state after the last epoch and whenever `train.checkpoint_every_seconds` have passed since
the last one (or every `train.checkpoint_every_epochs` epochs, if set), holding everything a restarted
worker group needs to continue exactly: weights, both optimizers, both LR schedules, sampler position,
RNG state and the step counter. A checkpoint per epoch would cost more than the epoch on small data.

Images come from the decoded-image store (tasks/images/store.py) as uint8 and become float on the device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.config import Params, TrainConfig


@dataclass(frozen=True)
class FaultPlan:
    """Test hook: hard-kill worker `rank` when it reaches global step `step`, once (marker file)."""

    rank: int
    step: int
    marker: str


@dataclass(frozen=True)
class TrainJob:
    params: Params
    rows: list[dict[str, Any]]  # the trial's training rows of the MLR manifest
    store: str  # the decoded-image store holding the rows' images (absolute: workers may run elsewhere)
    tracking_uri: str | None = None  # MLflow: rank 0 logs losses and system metrics to run_id
    run_id: str | None = None
    fault: FaultPlan | None = None


def _no_report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    return None


@dataclass
class WorkerContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node: str = "local"
    resume: dict[str, Any] | None = None  # a checkpoint state to continue from
    report: Callable[[dict[str, Any], dict[str, Any] | None], None] = _no_report  # (metrics, state to checkpoint)


def ddp_backend(device: torch.device) -> str:
    """The torch.distributed backend for `device`: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def train_loop(job: TrainJob, ctx: WorkerContext) -> None:
    """The RAIN min-max game (Eq. 8) on this rank's share of every identity-balanced batch."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from rain_model.network import RAIN
    from rain_model.objective import Batch, NonFiniteLossError, make_optimizers, place_model, train_step
    from rain_model.sampler import IdentityBalancedSampler
    from tasks.images.loaders import semi_supervised_labels
    from tasks.images.store import ImageStore, StorePairs, as_batch

    params, cfg, device = job.params, job.params.train, ctx.device
    torch.manual_seed(cfg.seed)
    labels = semi_supervised_labels([r["label"] for r in job.rows], cfg.label_fraction, cfg.seed)
    num_classes = len({r["label"] for r in job.rows})
    dataset = StorePairs(ImageStore(job.store), job.rows, (cfg.height, cfg.width), labels)
    sampler = IdentityBalancedSampler([r["label"] for r in job.rows], cfg.p, cfg.k, cfg.seed, ctx.rank, ctx.world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=as_batch, num_workers=cfg.loader_workers,
                        persistent_workers=cfg.loader_workers > 0, pin_memory=device.type == "cuda")

    model = place_model(RAIN(params.model, num_classes), params.objective, device)
    optimizers = make_optimizers(model, params.objective)
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_decay_epochs), gamma=cfg.lr_decay)
                  for opt in (optimizers.generator, optimizers.discriminator)]
    generator: torch.nn.Module = model.generator
    discriminators: torch.nn.Module = model.discriminators
    nodes = [ctx.node]
    if ctx.world > 1:  # the process group was set up by Ray Train (tasks/train.py asks for ddp_backend)
        backend = torch.distributed.get_backend()
        if backend != ddp_backend(device):
            raise RuntimeError(f"process group uses {backend}, {device.type} training needs {ddp_backend(device)}")
        ids = [device.index] if device.type == "cuda" else None
        generator = DistributedDataParallel(generator, device_ids=ids)
        if any(True for _ in discriminators.parameters()):
            discriminators = DistributedDataParallel(discriminators, device_ids=ids)
        gathered: list[Any] = [None] * ctx.world
        torch.distributed.all_gather_object(gathered, ctx.node)
        nodes = [str(n) for n in gathered]

    start_epoch, step = 0, 0
    if ctx.resume is not None:
        state = ctx.resume
        model.load_state_dict(state["model"])
        optimizers.load_state_dict(state["optimizers"])
        for sched, sched_state in zip(schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sched_state)
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"].cpu())
        start_epoch, step = state["epoch"] + 1, state["step"]

    logger = _RankZeroLogger(job, resumed=ctx.resume is not None, nodes=nodes) if ctx.rank == 0 else None
    last_checkpoint = time.monotonic()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            model.train()
            sums: dict[str, float] = {}
            batches, images, started, start_time = 0, 0, time.perf_counter(), time.time()
            try:
                for x_hr, x_lr, y in loader:  # uint8 (B, 3, H, W) twice, labels (B,)
                    _maybe_fail(job.fault, ctx.rank, step)
                    batch = Batch(x_hr=x_hr.to(device, non_blocking=True).float().div_(255),
                                  x_lr=x_lr.to(device, non_blocking=True).float().div_(255),
                                  labels=y.to(device, non_blocking=True))
                    losses = train_step(generator, discriminators, optimizers, batch, params.objective, step,
                                        micro_batches=cfg.micro_batches)
                    values = {k: float(v) for k, v in losses.items()}
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if logger is not None:
                        logger.step(values, step)
                    step += 1
                    batches += 1
                    images += int(y.shape[0])
            except NonFiniteLossError as exc:
                # Every rank sees the same non-finite step (the check is all-reduced), so every rank
                # reports once more and stops: no hang, and no pointless restart from a checkpoint.
                # Result.metrics only carries checkpointed reports, so rank 0 attaches a marker state.
                failure = {"nonfinite": str(exc), "epoch": epoch}
                ctx.report(failure, failure if ctx.rank == 0 else None)
                return
            for sched in schedulers:
                sched.step()
            seconds = time.perf_counter() - started
            metrics: dict[str, Any] = {k: v / max(batches, 1) for k, v in sums.items()}
            # Identity images per second on this rank (each is seen at HR and LR).
            metrics |= {"epoch": epoch, "nodes": len(set(nodes)), "images": images,
                        "images_per_second": images / max(seconds, 1e-9), "epoch_start_time": start_time,
                        "epoch_end_time": time.time()}
            if logger is not None:
                logger.epoch(metrics, epoch)
            if ctx.rank == 0 and checkpoint_due(cfg, epoch, time.monotonic() - last_checkpoint):
                last_checkpoint = time.monotonic()
                ctx.report(metrics, {
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizers": optimizers.state_dict(), "schedulers": [s.state_dict() for s in schedulers],
                    "sampler": sampler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch, "step": step,
                    "num_classes": num_classes})
            else:
                ctx.report(metrics, None)
    finally:
        if logger is not None:
            logger.close()


def checkpoint_due(cfg: TrainConfig, epoch: int, since_last: float) -> bool:
    """After the last epoch always; otherwise by time, or every `checkpoint_every_epochs` epochs if set."""
    by_epochs = cfg.checkpoint_every_epochs > 0 and (epoch + 1) % cfg.checkpoint_every_epochs == 0
    return epoch == cfg.epochs - 1 or by_epochs or since_last >= cfg.checkpoint_every_seconds


def _maybe_fail(fault: FaultPlan | None, rank: int, step: int) -> None:
    if fault is not None and rank == fault.rank and step == fault.step and not Path(fault.marker).exists():
        Path(fault.marker).touch()
        os._exit(1)  # a lost worker: no clean-up, no report


class _RankZeroLogger:
    """MLflow logging from rank 0 only: each loss by its paper name per step, epoch means, system metrics."""

    FLUSH_AT = 600  # metrics per write (MLflow takes up to 1000): 100 steps of the six losses

    def __init__(self, job: TrainJob, resumed: bool, nodes: list[str]) -> None:
        self.run_id = job.run_id
        self.client = None
        self.monitor = None
        self.pending: list[Any] = []  # per-step metrics not yet written
        if job.tracking_uri is None or job.run_id is None:
            return
        from mlflow import MlflowClient
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.client = MlflowClient(job.tracking_uri)
        self.client.set_tag(job.run_id, "ray_nodes", ",".join(sorted(set(nodes))))
        self.monitor = SystemMetricsMonitor(job.run_id, sampling_interval=10, resume_logging=resumed,
                                            tracking_uri=job.tracking_uri)
        self.monitor.start()

    def _log(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.client is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(prefix + k, v, now, step) for k, v in values.items()]
        if len(self.pending) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """One write for many steps: a database round trip per step would stall a GPU step of ~50 ms."""
        if self.client is not None and self.run_id is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending = []

    def step(self, losses: dict[str, float], step: int) -> None:
        self._log(losses, step)

    def epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        self._log({k: float(v) for k, v in metrics.items() if k.startswith("L_") or k == "images_per_second"},
                  epoch, prefix="epoch_")
        self.flush()

    def close(self) -> None:
        self.flush()
        if self.monitor is not None:
            self.monitor.finish()


class NonFiniteTraining(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step and the loss term."""
