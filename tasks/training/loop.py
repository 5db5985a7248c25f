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

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tasks.config import Params, TrainConfig
from tasks.infra.tracking import COLLAPSE, GAME, RANK1_BY_FEATURE, VALIDATION, shown
from tasks.training.progress import Progress

if TYPE_CHECKING:  # imported where used: the Ray driver imports this module and needs none of them
    from torch.optim.lr_scheduler import LRScheduler
    from torch.utils.data import DataLoader

    from rain_model.network import RAIN
    from rain_model.objective import Optimizers
    from rain_model.sampler import IdentityBalancedSampler

log = logging.getLogger(__name__)


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
    mlr: str | None = None  # the MLR manifest (absolute): with protocol.val_identities, its validation rows are
    # scored every train.val_every_epochs and the best epoch's weights are kept; its test rows are never read


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


@dataclass
class _Training:
    """What one worker trains: built once, advanced batch by batch, and checkpointed as a whole."""

    model: RAIN
    optimizers: Optimizers
    schedulers: list[LRScheduler]  # generator's, then discriminator's when it steps
    sampler: IdentityBalancedSampler
    loader: DataLoader[Any]
    generator: torch.nn.Module  # model.generator, DDP-wrapped when there are several ranks
    discriminators: torch.nn.Module  # model.discriminators, likewise
    num_classes: int
    nodes: list[str]  # the node of every rank
    next_epoch: int = 0
    step: int = 0  # global training steps taken so far
    best: dict[str, Any] | None = None  # rank 0, when validating: {"epoch", "lr_rank1", "model"} of the best epoch


def train_loop(job: TrainJob, ctx: WorkerContext) -> None:
    """The RAIN min-max game (Eq. 8) on this rank's share of every identity-balanced batch."""
    torch.manual_seed(job.params.train.seed)
    training = _build_training(job, ctx)
    if ctx.resume is not None:
        _resume_from(training, ctx.resume)
    resumed_at = training.next_epoch if ctx.resume is not None else None
    logger = _RankZeroLogger(job, resumed_at, nodes=training.nodes) if ctx.rank == 0 else None
    progress = Progress(job.params.train.epochs, len(training.loader), shown_losses(job.params)) \
        if ctx.rank == 0 else None
    try:
        _train_epochs(job, ctx, training, logger, progress)
    finally:
        if logger is not None:
            logger.close()


def _build_training(job: TrainJob, ctx: WorkerContext) -> _Training:
    """This rank's loader, the model on its device, both optimizers and LR schedules, DDP-wrapped."""
    from rain_model.network import RAIN
    from rain_model.objective import make_optimizers, place_model

    params = job.params
    sampler, loader, labels = _build_loader(job, ctx)
    num_classes = max(max(labels, default=-1) + 1, 1)  # the labelled identities (one output at 0% labels)
    model = place_model(RAIN(params.model, num_classes), params.objective, ctx.device)
    optimizers = make_optimizers(model, params.objective)
    schedulers = lr_schedulers(optimizers, params)
    generator, discriminators, nodes = _wrap_for_ddp(model, ctx)
    return _Training(model=model, optimizers=optimizers, schedulers=schedulers, sampler=sampler, loader=loader,
                     generator=generator, discriminators=discriminators, num_classes=num_classes, nodes=nodes)


def lr_schedulers(optimizers: Optimizers, params: Params) -> list[LRScheduler]:
    """The per-epoch schedules: F/G/C's warm-up and decays (train.*), then D's, which warms up with them and
    decays with them only under objective.decay_d. No schedule for an optimizer that never steps (no L_adv:
    no D step); torch warns when one is stepped."""
    from rain_model.objective import StepPlan, make_schedulers

    cfg = params.train
    schedulers = make_schedulers((optimizers.generator,), cfg.lr_decay_epochs, cfg.lr_decay, cfg.warmup_epochs,
                                 cfg.warmup_factor)
    if StepPlan.of(params.objective).adversarial:
        d_decay = cfg.lr_decay_epochs if params.objective.decay_d else ()
        schedulers += make_schedulers((optimizers.discriminator,), d_decay, cfg.lr_decay, cfg.warmup_epochs,
                                      cfg.warmup_factor)
    return schedulers


def _build_loader(job: TrainJob, ctx: WorkerContext) -> tuple[IdentityBalancedSampler, DataLoader[Any], list[int]]:
    """This rank's share of P x K identity-balanced batches, read from the decoded-image store, and the
    training labels (-1: unlabelled; the sampler and the losses see the same ones)."""
    from torch.utils.data import DataLoader

    from rain_model.sampler import IdentityBalancedSampler
    from tasks.images.loaders import semi_supervised_labels
    from tasks.images.store import ImageStore, StorePairs, as_batch

    cfg = job.params.train
    labels = semi_supervised_labels([r["label"] for r in job.rows], cfg.label_fraction, cfg.seed)
    dataset = StorePairs(ImageStore(job.store), job.rows, (cfg.height, cfg.width), labels)
    sampler = IdentityBalancedSampler(labels, cfg.p, cfg.k, cfg.seed, ctx.rank, ctx.world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=as_batch, num_workers=cfg.loader_workers,
                        persistent_workers=cfg.loader_workers > 0, pin_memory=ctx.device.type == "cuda")
    return sampler, loader, labels


def _wrap_for_ddp(model: RAIN, ctx: WorkerContext) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """(generator, discriminators, node of every rank): the model's halves as they are on one rank,
    DDP-wrapped over the process group on several."""
    from torch.nn.parallel import DistributedDataParallel

    generator: torch.nn.Module = model.generator
    discriminators: torch.nn.Module = model.discriminators
    if ctx.world <= 1:
        return generator, discriminators, [ctx.node]
    # The process group was set up by Ray Train (tasks/train.py asks for ddp_backend).
    backend = torch.distributed.get_backend()
    if backend != ddp_backend(ctx.device):
        raise RuntimeError(f"process group uses {backend}, {ctx.device.type} training needs {ddp_backend(ctx.device)}")
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    generator = DistributedDataParallel(generator, device_ids=ids)
    if any(True for _ in discriminators.parameters()):
        discriminators = DistributedDataParallel(discriminators, device_ids=ids)
    gathered: list[Any] = [None] * ctx.world
    torch.distributed.all_gather_object(gathered, ctx.node)
    return generator, discriminators, [str(n) for n in gathered]


def _resume_from(training: _Training, state: dict[str, Any]) -> None:
    """Continue exactly where `state` (a `_checkpoint_state`) left off: the epoch after its epoch."""
    training.model.load_state_dict(state["model"])
    training.optimizers.load_state_dict(state["optimizers"])
    for sched, sched_state in zip(training.schedulers, state["schedulers"], strict=True):
        sched.load_state_dict(sched_state)
    training.sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng"].cpu())
    training.next_epoch, training.step = state["epoch"] + 1, state["step"]
    training.best = state.get("best")


def shown_losses(params: Params) -> tuple[str, ...]:
    """The loss terms the objective optimises, by the paper's names, and L_D when D trains."""
    from rain_model.objective import LOSS_NAMES

    terms = params.objective.active_terms()
    return tuple(n for n in LOSS_NAMES if n in terms or (n == "L_D" and "L_adv" in terms))


def _train_epochs(job: TrainJob, ctx: WorkerContext, training: _Training, logger: _RankZeroLogger | None,
                  progress: Progress | None) -> None:
    """The remaining epochs, each ending in exactly one report (with a checkpoint state when one is due)."""
    from rain_model.objective import NonFiniteLossError

    cfg = job.params.train
    last_checkpoint = time.monotonic()
    for epoch in range(training.next_epoch, cfg.epochs):
        try:
            metrics = _one_epoch(job, ctx, training, epoch, logger, progress)
        except NonFiniteLossError as exc:
            # Every rank sees the same non-finite step (the check is all-reduced), so every rank
            # reports once more and stops: no hang, and no pointless restart from a checkpoint.
            # Result.metrics only carries checkpointed reports, so rank 0 attaches a marker state.
            failure = {"nonfinite": str(exc), "epoch": epoch}
            ctx.report(failure, failure if ctx.rank == 0 else None)
            return
        if ctx.rank == 0 and validation_due(job, epoch):
            metrics |= _validate(job, ctx, training, epoch)
        if logger is not None:
            logger.epoch(metrics, epoch)
        if ctx.rank == 0 and COLLAPSE in metrics:
            log.warning("epoch %d/%d: the features have collapsed: %s", epoch + 1, cfg.epochs, metrics[COLLAPSE])
        if progress is not None:
            progress.epoch(epoch, metrics, metrics["images_per_second"] * ctx.world)  # all ranks
        if ctx.rank == 0 and checkpoint_due(cfg, epoch, time.monotonic() - last_checkpoint):
            last_checkpoint = time.monotonic()
            ctx.report(metrics, _checkpoint_state(training, epoch))
        else:
            ctx.report(metrics, None)


def _one_epoch(job: TrainJob, ctx: WorkerContext, training: _Training, epoch: int,
               logger: _RankZeroLogger | None, progress: Progress | None) -> dict[str, Any]:
    """Train on every batch of `epoch`, step the LR schedules, and return the epoch's report."""
    training.sampler.set_epoch(epoch)
    training.model.train()
    if progress is not None:
        progress.start_epoch()
    started, start_time = time.perf_counter(), time.time()
    sums, game, batches, images = _train_batches(job, ctx, training, logger, progress, epoch)
    for sched in training.schedulers:
        sched.step()
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {k: v / max(batches, 1) for k, v in sums.items()}
    metrics |= {GAME + k: v / max(batches, 1) for k, v in game.items()}
    collapsed = collapse_reason(job.params, metrics)
    metrics[GAME + "collapsed"] = float(collapsed is not None)
    if collapsed is not None:
        metrics[COLLAPSE] = collapsed
    if "L_adv" in job.params.objective.active_terms():
        from rain_model.objective import adv_weight

        metrics[GAME + "w_adv"] = adv_weight(job.params.objective, epoch)
    # Identity images per second on this rank (each is seen at HR and LR).
    metrics |= {"epoch": epoch, "nodes": len(set(training.nodes)), "images": images,
                "images_per_second": images / max(seconds, 1e-9), "epoch_start_time": start_time,
                "epoch_end_time": time.time()}
    return metrics


def collapse_reason(params: Params, metrics: dict[str, Any]) -> str | None:
    """Why this epoch's features collapsed (rain_model/diagnostics.py `collapse`), from its means; None if not."""
    from rain_model.diagnostics import collapse
    from rain_model.objective import StepPlan

    if GAME + "feature_spread" not in metrics:  # an epoch without a batch measured nothing
        return None
    obj = params.objective
    terms = 1 if StepPlan.of(obj).hr_only else 2  # L_tri sums an HR and an LR term, as the objective's halves
    l_tri = metrics["L_tri"] / terms if "L_tri" in obj.active_terms() else None
    return collapse(metrics[GAME + "feature_spread"], l_tri, obj.margin)


def _train_batches(job: TrainJob, ctx: WorkerContext, training: _Training, logger: _RankZeroLogger | None,
                   progress: Progress | None, epoch: int) -> tuple[dict[str, float], dict[str, float], int, int]:
    """One `train_step` per batch of the loader; returns (sum of each loss, sum of each diagnostic of the
    game (rain_model/diagnostics.py), batches, images)."""
    from rain_model.augment import augment_pair, pair_generator
    from rain_model.objective import Batch, adv_weight, train_step

    device = ctx.device
    cfg = job.params.train
    augment = cfg.augment_flip or cfg.augment_pad > 0 or cfg.augment_erase > 0
    w_adv = adv_weight(job.params.objective, epoch)
    sums: dict[str, float] = {}
    game: dict[str, float] = {}
    batches, images = 0, 0
    for x_hr, x_lr, y in training.loader:  # uint8 (B, 3, H, W) twice, labels (B,)
        _maybe_fail(job.fault, ctx.rank, training.step)
        x_hr = x_hr.to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W)
        x_lr = x_lr.to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W)
        if augment:  # training only; the step's draw depends on (seed, rank, step) alone, so a resumed run repeats it
            x_hr, x_lr = augment_pair(x_hr, x_lr, pair_generator(cfg.seed, ctx.rank, training.step),
                                      flip=cfg.augment_flip, pad=cfg.augment_pad, erase=cfg.augment_erase)
        batch = Batch(x_hr=x_hr, x_lr=x_lr, labels=y.to(device, non_blocking=True))
        diagnostics: dict[str, float] = {}
        losses = train_step(training.generator, training.discriminators, training.optimizers, batch,
                            job.params.objective, training.step, micro_batches=job.params.train.micro_batches,
                            w_adv=w_adv, diagnostics=diagnostics)
        values = {k: float(v) for k, v in losses.items()}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        for k, v in diagnostics.items():
            game[k] = game.get(k, 0.0) + v
        if logger is not None:
            logger.step(values, training.step)
        training.step += 1
        batches += 1
        images += int(y.shape[0])
        if progress is not None:
            progress.batch(epoch, batches, images * ctx.world)
    return sums, game, batches, images


def validation_due(job: TrainJob, epoch: int) -> bool:
    """Score the validation split after `epoch`: every train.val_every_epochs epochs and after the last, when
    the job has a manifest with validation identities."""
    cfg = job.params.train
    if job.mlr is None or job.params.protocol.val_identities == 0:
        return False
    return (epoch + 1) % cfg.val_every_epochs == 0 or epoch == cfg.epochs - 1


def _validate(job: TrainJob, ctx: WorkerContext, training: _Training, epoch: int) -> dict[str, float]:
    """LR rank-1 and mAP of the model on the trial's validation split (`val/` metrics), scored as the evaluate
    stage scores the test split, and how far apart its HR and LR features are there (`resolution_alignment`: a
    fresh linear probe's accuracy, the centroid gap); keeps this epoch's weights when they are the best so far.
    Changes nothing training does next: eval mode (BatchNorm's statistics frozen) and no torch random numbers
    drawn (the probe's folds use their own seeded generator)."""
    from rain_model.config import RETRIEVAL_FEATURES
    from tasks.evaluation.scoring import score_trial, summarise
    from tasks.images.store import ImageStore
    from tasks.protocol.splits import VAL
    from tasks.training.alignment import resolution_alignment

    assert job.mlr is not None
    trial = int(job.rows[0]["trial"])
    generator = training.model.generator
    configured = generator.retrieval_feature
    # With BNNeck, both features are scored: model.retrieval_feature is chosen on this split, never on the test's.
    ranked: dict[str, float] = {}
    training.model.eval()
    try:
        with torch.no_grad():
            for feature in (configured, *(f for f in RETRIEVAL_FEATURES if f != configured and generator.neck)):
                generator.retrieval_feature = feature
                scores, pictures = score_trial(training.model, job.params, Path(job.mlr), trial, ImageStore(job.store),
                                               VAL)
                ranked[feature] = summarise("lr", scores["lr"])["rank1"]
                if feature == configured:
                    lr, features = summarise("lr", scores["lr"]), pictures
    finally:
        generator.retrieval_feature = configured
        training.model.train()
    alignment = {VALIDATION + k: v for k, v in resolution_alignment(features).items()}  # as retrieval sees them
    by_feature = {VALIDATION + RANK1_BY_FEATURE + f: r for f, r in ranked.items()} if len(ranked) > 1 else {}
    if training.best is None or lr["rank1"] > training.best["lr_rank1"]:
        training.best = {"epoch": epoch, "lr_rank1": lr["rank1"],
                         "model": {k: v.detach().cpu().clone() for k, v in training.model.state_dict().items()}}
    return {VALIDATION + "lr_rank1": lr["rank1"], VALIDATION + "lr_mAP": lr["mAP"],
            VALIDATION + "best_epoch": float(training.best["epoch"] + 1),  # its number, as the epoch line says
            VALIDATION + "best_lr_rank1": training.best["lr_rank1"]} | alignment | by_feature


def kept_weights(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a finished run keeps: the best epoch's on the validation split when it was scored, else
    the last epoch's."""
    best = state.get("best")
    return best["model"] if best is not None else state["model"]


def _checkpoint_state(training: _Training, epoch: int) -> dict[str, Any]:
    """Everything a restarted worker group needs to continue exactly after `epoch` (see `_resume_from`). Its
    weights are the live tensors on the CPU (`.cpu()` copies only from a GPU): a report saves it before
    training goes on."""
    return {"model": {k: v.detach().cpu() for k, v in training.model.state_dict().items()},
            "optimizers": training.optimizers.state_dict(), "schedulers": [s.state_dict() for s in training.schedulers],
            "sampler": training.sampler.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
            "step": training.step, "num_classes": training.num_classes, "best": training.best}


def checkpoint_due(cfg: TrainConfig, epoch: int, since_last: float) -> bool:
    """After the last epoch always; otherwise by time, or every `checkpoint_every_epochs` epochs if set."""
    by_epochs = cfg.checkpoint_every_epochs > 0 and (epoch + 1) % cfg.checkpoint_every_epochs == 0
    return epoch == cfg.epochs - 1 or by_epochs or since_last >= cfg.checkpoint_every_seconds


def _maybe_fail(fault: FaultPlan | None, rank: int, step: int) -> None:
    if fault is not None and rank == fault.rank and step == fault.step and not Path(fault.marker).exists():
        Path(fault.marker).touch()
        os._exit(1)  # a lost worker: no clean-up, no report


class _RankZeroLogger:
    """MLflow logging from rank 0 only: each loss by its paper name per step (`train/L_cls`), epoch means
    (`epoch/L_cls`, `epoch/images_per_second`), the game's diagnostics (`game/D4_accuracy_HR`), system
    metrics (`system/`); sections of tasks/infra/tracking.py."""

    FLUSH_AT = 600  # metrics per write (MLflow takes up to 1000): 100 steps of the six losses

    def __init__(self, job: TrainJob, resumed_at: int | None, nodes: list[str]) -> None:
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
        if resumed_at is not None:  # from a checkpoint: of a lost worker group, or of an earlier invocation
            self.client.set_tag(job.run_id, "resumed_at_epoch", str(resumed_at))
        self.monitor = SystemMetricsMonitor(job.run_id, sampling_interval=10, resume_logging=resumed_at is not None,
                                            tracking_uri=job.tracking_uri)
        self.monitor.start()

    def _log(self, values: dict[str, float], step: int, prefix: str) -> None:
        if self.client is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(prefix + k, shown(prefix + k, v), now, step) for k, v in values.items()]
        if len(self.pending) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """One write for many steps: a database round trip per step would stall a GPU step of ~50 ms."""
        if self.client is not None and self.run_id is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending = []

    def step(self, losses: dict[str, float], step: int) -> None:
        from tasks.infra.tracking import TRAIN

        self._log(losses, step, TRAIN)

    def epoch(self, metrics: dict[str, Any], epoch: int) -> None:
        from tasks.infra.tracking import EPOCH

        # Stepped by the epoch's number as the epoch line prints it (1 to train.epochs), not its index.
        self._log({k: float(v) for k, v in metrics.items() if k.startswith("L_") or k == "images_per_second"},
                  epoch + 1, EPOCH)
        self._log({k: float(v) for k, v in metrics.items() if k.startswith((GAME, VALIDATION))}, epoch + 1, "")
        self.flush()
        if self.client is not None and self.run_id is not None and COLLAPSE in metrics:
            self.client.set_tag(self.run_id, COLLAPSE, f"epoch {epoch + 1}: {metrics[COLLAPSE]}")

    def close(self) -> None:
        self.flush()
        if self.monitor is not None:
            self.monitor.finish()


class NonFiniteTraining(RuntimeError):
    """Training stopped on a NaN/inf loss; the message names the step and the loss term."""
