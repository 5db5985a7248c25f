"""How the min-max game of Eq. 8 stands, measured on one training step's own tensors.

Whether the adversarial term helps depends on the balance of the game: a discriminator that always wins
gives F a useless gradient, one that is always fooled may mean F gave up identity information to fool
it. These figures say which, per step, at no extra forward:

* ``D{j}_accuracy_HR`` / ``D{j}_accuracy_LR``: the share of HR features D_j calls HR (logit > 0) and of
  LR features it calls LR (logit <= 0), before its update on this batch. 1 / 1: D_j wins outright;
  their mean 0.5: D_j cannot tell the resolutions apart (the game's fixed point).
* ``feature_distance``: mean over images of ||v^H - v^L|| (the same image at HR and at LR) over the mean
  distance between HR features of different images: scale-free, so shrinking every feature does not
  lower it (the measure of tests/test_adversarial_alignment.py).
* ``centroid_gap``: ||mean v^H - mean v^L|| over the same spread: the shift between the two feature
  distributions, which is what the discriminators see.
* ``feature_spread``: the mean distance between the features v of different images over their mean norm.
  Near 0, every image has the same feature: F has collapsed and no ranking is possible (``collapse``);
  an untrained F gives ~0.5 in train mode (random images, resnet18 at half width).
* ``grad_f{j}_L_adv`` / ``grad_f{j}_L_id``: the norms of the gradients at f_j of w_adv L_adv and of
  w_cls L_cls + w_tri L_tri (the identity losses), and ``grad_f{j}_ratio`` their ratio: how hard the
  adversarial term pulls on the features against the terms that make them discriminative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def discriminator_accuracy(logits_hr: Tensor, logits_lr: Tensor) -> tuple[float, float]:
    """(share of HR logits > 0, share of LR logits <= 0), each over its own rows; logits (N,).

    On identical HR and LR features every image is right once and wrong once, so the two sum to 1.
    """
    return float((logits_hr.float() > 0).float().mean()), float((logits_lr.float() <= 0).float().mean())


def _spread(v_hr: Tensor) -> Tensor:
    """Mean distance between the HR features of different images (N >= 2); v_hr (N, d)."""
    n = v_hr.shape[0]
    dist = torch.cdist(v_hr, v_hr)  # (N, N), zero diagonal
    return dist.sum() / max(n * (n - 1), 1)


def feature_spread(v: Tensor) -> float:
    """Mean distance between the features of different images over their mean norm; v (N, d), N >= 2. Scale-free,
    so a collapse shows whatever the features' size."""
    v = v.detach().float()
    return float(_spread(v) / v.norm(dim=1).mean().clamp(min=1e-12))


COLLAPSE_SPREAD = 0.05
"""``feature_spread`` below this: collapsed. A tenth of an untrained F's spread in train mode (0.51 on random
images); a collapsed run sits far lower (its batch-hard L_tri stays at the margin: every distance ~0)."""
MARGIN_STUCK = 0.05
"""L_tri per term within this fraction of the margin (above or below) reads as stuck at the margin."""


def collapse(feature_spread: float, l_tri_per_term: float | None, margin: float) -> str | None:
    """Why the features have collapsed, from an epoch's means, or None. ``l_tri_per_term`` is L_tri over its terms
    (HR and LR: 2) when the triplet loss is on, else None. A collapse is every feature at one point: a low spread,
    and, with the triplet loss on, L_tri at its margin (where every distance it compares is ~0). Both are needed
    there: features with a large common offset (ReLU then pooling; BNNeck's v, whose retrieval feature is BN(v))
    have a low spread over their norm while they still rank (CUHK03 crops: spread 0.04, L_tri 0.4 per term against
    a margin of 0.3, validation rank-1 rising)."""
    if feature_spread >= COLLAPSE_SPREAD:
        return None
    why = f"every feature at one point (feature spread {feature_spread:.3g} < {COLLAPSE_SPREAD:g})"
    if l_tri_per_term is None:
        return why
    if abs(l_tri_per_term - margin) > MARGIN_STUCK * margin:
        return None  # the triplet loss still separates what it compares
    return why + f", L_tri at its margin ({l_tri_per_term:.3g} per term, margin {margin:g})"


def feature_distance(v_hr: Tensor, v_lr: Tensor) -> float:
    """Mean ||v_i^H - v_i^L|| over images i, relative to the HR spread; v_hr, v_lr (N, d), row i the same image."""
    v_hr, v_lr = v_hr.detach().float(), v_lr.detach().float()
    return float((v_hr - v_lr).norm(dim=1).mean() / _spread(v_hr).clamp(min=1e-12))


def centroid_gap(v_hr: Tensor, v_lr: Tensor) -> float:
    """||mean_i v_i^H - mean_i v_i^L|| relative to the HR spread; v_hr, v_lr (N, d)."""
    v_hr, v_lr = v_hr.detach().float(), v_lr.detach().float()
    return float((v_hr.mean(0) - v_lr.mean(0)).norm() / _spread(v_hr).clamp(min=1e-12))


def gradient_norms(adversarial: Tensor, identity: Tensor, feats: Sequence[Tensor],
                   levels: Sequence[int]) -> dict[str, float]:
    """Norms of d(adversarial)/d f_j and d(identity)/d f_j for each level j, and their ratio.

    ``adversarial`` (w_adv L_adv) and ``identity`` (w_cls L_cls + w_tri L_tri) are 0-dim losses whose graphs
    contain ``feats`` (f_j, one per level). The graphs are kept for the step's own backward, and no
    parameter's ``.grad`` changes: only the features' gradients are computed.
    """
    out: dict[str, float] = {}
    for name, loss in (("L_adv", adversarial), ("L_id", identity)):
        if not loss.requires_grad:  # a term that is off: no gradient at all
            grads: Sequence[Tensor | None] = [None] * len(feats)
        else:
            grads = torch.autograd.grad(loss, list(feats), retain_graph=True, allow_unused=True)
        for j, g in zip(levels, grads, strict=True):
            out[f"grad_f{j}_{name}"] = 0.0 if g is None else float(g.float().norm())
    for j in levels:
        out[f"grad_f{j}_ratio"] = out[f"grad_f{j}_L_adv"] / max(out[f"grad_f{j}_L_id"], 1e-12)
    return out
