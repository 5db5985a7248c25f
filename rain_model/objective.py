"""The training objective of RAIN (Eq. 7) and its min-max optimisation (Eq. 8), one step at a time."""

from __future__ import annotations

import bisect
import contextlib
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler

from rain_model.config import ObjectiveConfig
from rain_model.diagnostics import (
    centroid_gap,
    discriminator_accuracy,
    feature_distance,
    feature_spread,
    gradient_norms,
)
from rain_model.losses import (
    adversarial_loss,
    classification_loss,
    discriminator_loss,
    reconstruction_loss,
    reverse_gradient,
    triplet_loss,
)
from rain_model.network import RAIN, Generator, GeneratorOutput

LOSS_NAMES = ("L_adv", "L_rec", "L_cls", "L_tri", "L_total", "L_D")
"""Keys of the dict ``train_step`` returns (also the MLflow metric names)."""


class NonFiniteLossError(RuntimeError):
    """A loss term of a training step is NaN or infinite; the message names the step and the term."""


@dataclass
class Batch:
    """One training batch: HR images, their synthetic LR versions (same order), identity labels."""

    x_hr: Tensor
    """(B, 3, H, W) float in [0, 1]."""
    x_lr: Tensor
    """(B, 3, H, W) float in [0, 1]: x_hr down-sampled and brought back to H x W."""
    labels: Tensor
    """(B,) long; -1 = unlabelled (contributes L_rec and L_adv only)."""


@dataclass
class Optimizers:
    """One optimizer for F, G, C (the min side of Eq. 8) and one for all D_j (the max side)."""

    generator: torch.optim.Optimizer
    discriminator: torch.optim.Optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])


def make_optimizers(model: RAIN, obj: ObjectiveConfig) -> Optimizers:
    """Adam for F/G/C (lr, weight_decay, beta1) and Adam for all D_j (lr_d, beta1_d, no decay)."""
    return Optimizers(
        generator=torch.optim.Adam(
            model.generator.parameters(), lr=obj.lr, betas=(obj.beta1, 0.999), weight_decay=obj.weight_decay
        ),
        discriminator=torch.optim.Adam(model.discriminators.parameters(), lr=obj.lr_d, betas=(obj.beta1_d, 0.999)),
    )


def lr_factor(epoch: int, decay_epochs: Sequence[int], decay: float, warmup_epochs: int = 0,
              warmup_factor: float = 0.01) -> float:
    """The learning rates' multiplier after ``epoch`` epochs (from 0): a linear warm-up from ``warmup_factor``
    at epoch 0 to 1 at ``warmup_epochs`` (reid-strong-baseline's WarmupMultiStepLR), times ``decay`` for every
    epoch of ``decay_epochs`` already reached."""
    warm = 1.0
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        warm = warmup_factor * (1 - alpha) + alpha
    return warm * decay ** bisect.bisect_right(list(decay_epochs), epoch)


def make_schedulers(optimizers: Sequence[torch.optim.Optimizer], decay_epochs: Sequence[int], decay: float,
                    warmup_epochs: int = 0, warmup_factor: float = 0.01) -> list[LRScheduler]:
    """One per-epoch schedule per optimizer, all by ``lr_factor``. Without a warm-up it is MultiStepLR, whose
    rates (and checkpointed state) are exactly those of a run from before warm-up existed; with one, a LambdaLR
    (its state is the epoch count: a resumed run continues the same schedule)."""
    if warmup_epochs == 0:
        return [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(decay_epochs), gamma=decay)
                for opt in optimizers]
    factor = functools.partial(lr_factor, decay_epochs=tuple(decay_epochs), decay=decay,
                               warmup_epochs=warmup_epochs, warmup_factor=warmup_factor)
    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls and convolutions in hardware (avx512_bf16 or AMX tiles).

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: that is true on any AVX-512 CPU, where oneDNN
    emulates bf16, and a RAIN step there took 2.2x its fp32 time (an Intel Xeon without avx512_bf16).
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def place_model(model: RAIN, obj: ObjectiveConfig, device: torch.device) -> RAIN:
    """Move the model to ``device``; with ``channels_last`` also convert its memory format.

    Call before building optimizers and before wrapping in DistributedDataParallel.
    """
    model.to(device)
    if obj.bf16_autocast and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("objective.bf16_autocast is true but this CPU has no bfloat16 instructions (avx512_bf16 or "
                      "AMX): oneDNN emulates them, slower than fp32 (bench/precision.py); set "
                      "objective.bf16_autocast: false", stacklevel=2)
    if obj.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@dataclass(frozen=True)
class StepPlan:
    """Which parts of the network one step runs, derived from the objective config."""

    hr_only: bool
    """baseline_hr: only the HR half of the batch goes through F."""
    adversarial: bool
    """L_adv is on: run the D step and feed f_j (j in levels) to the D_j."""
    decode: bool
    """L_rec is on: run G."""
    classify: bool
    """L_cls is on: run C."""

    @classmethod
    def of(cls, obj: ObjectiveConfig) -> StepPlan:
        terms = obj.active_terms()
        return cls(
            hr_only=obj.variant == "baseline_hr",
            adversarial="L_adv" in terms,
            decode="L_rec" in terms,
            classify="L_cls" in terms,
        )


def _unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, DistributedDataParallel | nn.DataParallel):
        return module.module
    return module


def _autocast(obj: ObjectiveConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the batch's device: CUDA in production; the CPU runs the same path in tests."""
    if obj.bf16_autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_finite(losses: dict[str, Tensor], step: int) -> None:
    """Raise NonFiniteLossError when a term is NaN/inf on this rank or on any other rank.

    Under torch.distributed the verdict is all-reduced before anything else happens, so every rank
    raises at the same step instead of one rank stopping while the others wait in DDP's all-reduce.
    """
    values = torch.stack([value.detach().float() for value in losses.values()])  # (T,)
    bad = (~torch.isfinite(values)).to(torch.float32)  # (T,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bool(bad.any()):
        return
    for name, value, flag in zip(losses, values.tolist(), bad.tolist(), strict=True):
        if flag:
            raise NonFiniteLossError(f"step {step}: {name} is not finite ({value} on this rank)")


def forward_generator(
    generator: nn.Module, batch: Batch, obj: ObjectiveConfig, levels: tuple[int, ...]
) -> GeneratorOutput:
    """One forward of F (and of G, C when their losses are on) on the HR and LR halves as one batch.

    ``generator`` is a ``Generator`` or its DistributedDataParallel wrapper (called, not unwrapped, so
    DDP sees the forward). Outputs cover 2B images, HR first then LR (B HR images for baseline_hr);
    ``levels`` are the feature levels returned for the discriminators (empty when L_adv is off).
    """
    plan = StepPlan.of(obj)
    x_in = batch.x_hr if plan.hr_only else torch.cat([batch.x_hr, batch.x_lr])  # (2B, 3, H, W)
    if obj.channels_last:
        x_in = x_in.contiguous(memory_format=torch.channels_last)
    with _autocast(obj, x_in.device):
        out: GeneratorOutput = generator(
            x_in, levels=levels if plan.adversarial else (), decode=plan.decode, classify=plan.classify
        )
    return out


def _discriminator_update(
    discriminators: nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: Sequence[tuple[Sequence[Tensor], int]],
    obj: ObjectiveConfig,
    step: int,
    diagnostics: dict[str, float] | None = None,
) -> Tensor:
    """The max side of Eq. 8: ``obj.d_steps`` updates of all D_j, each with the mean over `parts`
    (micro-batches) of each part's L_D gradient; returns the mean L_D of the first update (detached).

    A part is (f_j for j in the discriminators' levels, each (2B, d_j, h, w) with HR rows first; n_hr).
    The features are detached here, so F, G and C get no gradient from this update. With ``diagnostics``,
    each D_j's accuracy on the HR and the LR rows before its first update is added to it.
    """
    detached = [(tuple(f.detach() for f in feats), n_hr) for feats, n_hr in parts]
    first = None
    for d_step in range(obj.d_steps):
        optimizer.zero_grad(set_to_none=True)
        total = None
        for feats_det, n_hr in detached:
            with _autocast(obj, feats_det[0].device):
                logits = discriminators(feats_det)  # per level (2B,)
            logits_hr, logits_lr = [lg[:n_hr].float() for lg in logits], [lg[n_hr:].float() for lg in logits]
            if d_step == 0 and diagnostics is not None:
                _record_accuracy(diagnostics, _unwrap(discriminators), logits_hr, logits_lr, len(parts))
            l_d = discriminator_loss(logits_hr, logits_lr, obj.d_label_smoothing)
            _check_finite({"L_D": l_d}, step)
            l_d.backward()
            total = l_d.detach() / len(parts) if total is None else total + l_d.detach() / len(parts)
        _average_grads(optimizer, len(parts))
        optimizer.step()
        first = total if first is None else first
    assert first is not None
    return first


def _record_accuracy(diagnostics: dict[str, float], d_net: nn.Module, logits_hr: Sequence[Tensor],
                     logits_lr: Sequence[Tensor], parts: int) -> None:
    """Add each D_j's accuracy on one part's HR and LR logits (a 1/`parts` share: the mean over parts)."""
    for j, hr, lr in zip(getattr(d_net, "levels", ()), logits_hr, logits_lr, strict=True):
        acc_hr, acc_lr = discriminator_accuracy(hr.detach(), lr.detach())
        diagnostics[f"D{j}_accuracy_HR"] = diagnostics.get(f"D{j}_accuracy_HR", 0.0) + acc_hr / parts
        diagnostics[f"D{j}_accuracy_LR"] = diagnostics.get(f"D{j}_accuracy_LR", 0.0) + acc_lr / parts


def adv_weight(obj: ObjectiveConfig, epoch: int) -> float:
    """The weight of L_adv in epoch ``epoch`` (from 0): w_adv, ramped up over ``obj.adv_ramp_epochs``."""
    if obj.adv_ramp_epochs == 0:
        return obj.w_adv
    return obj.w_adv * min(1.0, epoch / obj.adv_ramp_epochs)


def generator_losses(
    discriminators: nn.Module, out: GeneratorOutput, batch: Batch, obj: ObjectiveConfig,
    w_adv: float | None = None, diagnostics: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """The four terms of Eq. 7 on one forward's outputs (with graph); switched-off terms are 0 constants.

    Every term is the sum of its HR and its LR expectation (only HR for baseline_hr). L_adv goes through
    the current D_j with their parameters detached: F gets the gradient, the D_j get none. With
    ``adv_loss="reversal"``, L_adv is instead the D_j's own loss (minus Eq. 1) on
    ``reverse_gradient(f_j, w_adv)`` with live D_j parameters: its backward trains the D_j and gives F minus
    w_adv times its gradient, so it enters L_total with weight 1 (``w_adv`` defaults to ``obj.w_adv``;
    ``diagnostics`` then receives the D_j's accuracies, measured on these logits).
    """
    plan = StepPlan.of(obj)
    n_hr = batch.x_hr.shape[0]
    labels = batch.labels
    halves = [slice(0, n_hr)] if plan.hr_only else [slice(0, n_hr), slice(n_hr, 2 * n_hr)]
    zero = out.v.new_zeros((), dtype=torch.float32)
    losses = {"L_adv": zero, "L_rec": zero, "L_cls": zero, "L_tri": zero}
    if plan.adversarial and obj.adv_loss == "reversal":
        scale = obj.w_adv if w_adv is None else w_adv
        with _autocast(obj, out.v.device):
            logits = discriminators(tuple(reverse_gradient(f, scale) for f in out.feats))  # per level (2B,)
        logits_hr, logits_lr = [lg[:n_hr].float() for lg in logits], [lg[n_hr:].float() for lg in logits]
        losses["L_adv"] = discriminator_loss(logits_hr, logits_lr, obj.d_label_smoothing)
        if diagnostics is not None:
            _record_accuracy(diagnostics, _unwrap(discriminators), logits_hr, logits_lr, parts=1)
    elif plan.adversarial:
        d_net = _unwrap(discriminators)
        d_params = {name: p.detach() for name, p in d_net.named_parameters()}
        feats = out.feats if obj.adv_loss == "minimax" else tuple(f[n_hr:] for f in out.feats)
        with _autocast(obj, out.v.device):
            logits = functional_call(d_net, d_params, (feats,))  # per level (2B,) or (B,)
        if obj.adv_loss == "minimax":
            logits_hr = [lg[:n_hr].float() for lg in logits]
            logits_lr = [lg[n_hr:].float() for lg in logits]
        else:
            logits_hr, logits_lr = [], [lg.float() for lg in logits]
        losses["L_adv"] = adversarial_loss(logits_hr, logits_lr, obj.adv_loss)
    if plan.adversarial and obj.adv_levels == "mean":
        losses["L_adv"] = losses["L_adv"] / len(out.feats)
    if plan.decode:
        assert out.x_rec is not None
        x_rec = out.x_rec.float()  # (2B, 3, H, W)
        losses["L_rec"] = sum((reconstruction_loss(x_rec[half], batch.x_hr) for half in halves), start=zero)
    if plan.classify:
        assert out.logits is not None
        losses["L_cls"] = sum((classification_loss(out.logits[half], labels, obj.label_smoothing)
                                  for half in halves), start=zero)
    if "L_tri" in obj.active_terms():
        losses["L_tri"] = sum(
            (triplet_loss(out.v[half], labels, obj.margin, obj.mining) for half in halves), start=zero
        )
    return losses


def _average_grads(optimizer: torch.optim.Optimizer, parts: int) -> None:
    """Sum of the parts' gradients, then one division: the order DDP's all-reduce averages in, so a
    single worker with micro-batches reproduces several workers' steps to the last bit where it can."""
    if parts == 1:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.div_(parts)


def _generator_update(
    generator: nn.Module,
    discriminators: nn.Module,
    optimizer: torch.optim.Optimizer,
    parts: Sequence[tuple[GeneratorOutput, Batch]],
    obj: ObjectiveConfig,
    step: int,
    w_adv: float,
    diagnostics: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """The min side of Eq. 8: one update of F, G, C on L_total = sum_t w_t L_t (Eq. 7), its gradient the
    mean over `parts` (micro-batches); returns the mean detached terms and ``L_total``.

    Only the generator optimizer steps; the D_j are used with detached parameters and do not change.
    Terms whose weight is 0 in the config are not computed, so they contribute exactly zero gradient;
    parameters of a head that was not run (G or C) end the step with ``grad = None`` and are skipped by
    the optimizer. ``w_adv`` is this step's weight of L_adv (``adv_weight``'s ramp). With ``diagnostics``,
    the first part's gradient norms at each f_j are added to it (``diagnostics.gradient_norms``).
    """
    plan = StepPlan.of(obj)
    reversal = plan.adversarial and obj.adv_loss == "reversal"  # w_adv acts inside the reversal layer
    weights = {"L_adv": 1.0 if reversal else w_adv, "L_rec": obj.w_rec, "L_cls": obj.w_cls, "L_tri": obj.w_tri}
    optimizer.zero_grad(set_to_none=True)
    mean: dict[str, Tensor] = {}
    for i, (out, batch) in enumerate(parts):
        losses = generator_losses(discriminators, out, batch, obj, w_adv, diagnostics if i == 0 else None)
        zero = out.v.new_zeros((), dtype=torch.float32)
        l_total = sum((weights[name] * losses[name] for name in obj.active_terms()), start=zero)
        losses["L_total"] = l_total
        _check_finite(losses, step)
        if diagnostics is not None and i == 0 and plan.adversarial:
            identity = weights["L_cls"] * losses["L_cls"] + weights["L_tri"] * losses["L_tri"]
            levels = tuple(getattr(_unwrap(discriminators), "levels", ()))
            diagnostics |= gradient_norms(weights["L_adv"] * losses["L_adv"], identity, out.feats, levels)
        (l_total + out.touch).backward()
        for name, value in losses.items():
            term = value.detach().float() / len(parts)
            mean[name] = term if name not in mean else mean[name] + term
    g_net = _unwrap(generator)
    if not isinstance(g_net, Generator):
        raise TypeError(f"generator must be a rain_model.network.Generator, got {type(g_net).__name__}")
    for p in g_net.skipped_parameters(plan.decode, plan.classify):
        p.grad = None
    _average_grads(optimizer, len(parts))
    optimizer.step()
    return mean


def train_step(
    generator: nn.Module,
    discriminators: nn.Module,
    optimizers: Optimizers,
    batch: Batch,
    obj: ObjectiveConfig,
    step: int,
    micro_batches: int = 1,
    w_adv: float | None = None,
    diagnostics: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """One RAIN training step (Eq. 8): first the D step, then the F/G/C step.

    1. F (and G, C when on) run once on the stacked batch [x_hr; x_lr] (2B images; B for baseline_hr).
    2. D step (only when L_adv is on: variant rain and w_adv > 0): every D_j is trained to tell f_j^H
       from f_j^L on the detached features (maximise Eq. 1), with its own optimizer.
    3. F/G/C step: minimise Eq. 7, w_adv L_adv + w_rec L_rec + w_cls L_cls + w_tri L_tri, where L_adv is
       the non-saturating -log D_j(f_j^L) by default (see ``losses.adversarial_loss`` for why) and
       uses the just-updated D_j.

    ``generator``/``discriminators`` are ``model.generator``/``model.discriminators`` or their
    DistributedDataParallel wrappers (each is called through its wrapper, so gradients are averaged
    over ranks; every parameter gets a gradient in every step, so no unused-parameter errors). The model
    must be in train mode. Raises NonFiniteLossError naming the step and the term if any loss is NaN or
    infinite. Returns detached 0-dim float32 tensors keyed ``L_adv, L_rec, L_cls, L_tri, L_total, L_D``
    (0 for terms that are off).

    ``micro_batches`` > 1 splits the batch into that many consecutive equal parts, runs F on each part
    separately (so BatchNorm normalises with each part's statistics) and averages the parts' gradients
    before each update: on one device, the same update as that many DDP workers each given one part.

    ``w_adv`` is this step's weight of L_adv (default ``obj.w_adv``; the training loop passes
    ``adv_weight(obj, epoch)``). ``diagnostics``, when given, receives the state of the game on this
    batch (rain_model/diagnostics.py): every D_j's accuracy, the features' spread, the HR-LR feature distance
    and centroid gap, and the gradient norms at each f_j. Computing them changes nothing the step does.
    """
    _check_batch(batch)
    n = batch.x_hr.shape[0]
    if micro_batches < 1 or n % micro_batches:
        raise ValueError(f"micro_batches={micro_batches}: must divide the batch size {n}")
    plan = StepPlan.of(obj)
    d_net = _unwrap(discriminators)
    levels: tuple[int, ...] = tuple(getattr(d_net, "levels", ()))
    size = n // micro_batches
    chunks = [Batch(x_hr=batch.x_hr[i:i + size], x_lr=batch.x_lr[i:i + size], labels=batch.labels[i:i + size])
              for i in range(0, n, size)]
    parts = [(forward_generator(generator, chunk, obj, levels), chunk) for chunk in chunks]
    l_d = parts[0][0].v.new_zeros((), dtype=torch.float32)
    reversal = plan.adversarial and obj.adv_loss == "reversal"
    if reversal:  # the D_j learn in the F/G/C backward: their gradients are collected there
        optimizers.discriminator.zero_grad(set_to_none=True)
    elif plan.adversarial:
        l_d = _discriminator_update(discriminators, optimizers.discriminator,
                                    [(out.feats, chunk.x_hr.shape[0]) for out, chunk in parts], obj, step,
                                    diagnostics)
    if diagnostics is not None:
        # Each part's v holds its HR rows, then its LR rows (row i and row n_hr + i: the same image).
        v_hr = torch.cat([out.v[:chunk.x_hr.shape[0]] for out, chunk in parts])  # (B, d)
        diagnostics["feature_spread"] = feature_spread(v_hr)
    if diagnostics is not None and not plan.hr_only:
        v_lr = torch.cat([out.v[chunk.x_hr.shape[0]:] for out, chunk in parts])  # (B, d)
        diagnostics["feature_distance"] = feature_distance(v_hr, v_lr)
        diagnostics["centroid_gap"] = centroid_gap(v_hr, v_lr)
    losses = _generator_update(generator, discriminators, optimizers.generator, parts, obj, step,
                               obj.w_adv if w_adv is None else w_adv, diagnostics)
    if reversal:
        _average_grads(optimizers.discriminator, len(parts))
        optimizers.discriminator.step()
        l_d = losses["L_adv"]  # the D_j's loss itself (see generator_losses)
    losses["L_D"] = l_d
    return {name: losses[name] for name in LOSS_NAMES}


def _check_batch(batch: Batch) -> None:
    if batch.x_hr.shape != batch.x_lr.shape or batch.x_hr.dim() != 4:
        raise ValueError(f"x_hr {tuple(batch.x_hr.shape)} and x_lr {tuple(batch.x_lr.shape)} must both be (B, 3, H, W)")
    if batch.labels.shape != (batch.x_hr.shape[0],) or batch.labels.dtype != torch.long:
        raise ValueError(
            f"labels must be long of shape ({batch.x_hr.shape[0]},), got {batch.labels.dtype} "
            f"{tuple(batch.labels.shape)}"
        )
