"""The loss terms of RAIN (Eq. 1-6) as pure functions of tensors.

Labels are long tensors; -1 marks an unlabelled image (semi-supervised training), which never enters
L_cls or L_tri. Every function returns a 0-dim float tensor that is finite and differentiable even when
no sample qualifies (it is then 0 with zero gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_loss(logits_hr: Sequence[Tensor], logits_lr: Sequence[Tensor], smoothing: float = 0.0) -> Tensor:
    """Loss of the D step: minus Eq. 1, summed over the levels j.

    D_j maximises Eq. 1, E_xH[log D_j(f_j^H)] + E_xL[log(1 - D_j(f_j^L))], which is minimising the
    binary cross-entropy with HR features labelled 1 and LR features labelled 0. ``logits_*[j]`` are
    the pre-sigmoid outputs of D_j, shape (B,). The features must be detached by the caller.
    ``smoothing`` > 0 labels HR features 1 - smoothing instead (one-sided label smoothing).
    """
    terms = [
        F.binary_cross_entropy_with_logits(hr, torch.full_like(hr, 1.0 - smoothing))
        + F.binary_cross_entropy_with_logits(lr, torch.zeros_like(lr))
        for hr, lr in zip(logits_hr, logits_lr, strict=True)
    ]
    return torch.stack(terms).sum()


def adversarial_loss(logits_hr: Sequence[Tensor], logits_lr: Sequence[Tensor], form: str) -> Tensor:
    """L_adv of the feature extractor F (its side of Eq. 1 in Eq. 7-8), summed over the levels j.

    ``form="non_saturating"`` (default): L_adv = -E_xL[log D_j(f_j^L)], i.e. the LR features are labelled
    "HR" and F is trained to make D_j take them for HR features. Why this and not Eq. 1 verbatim: when F
    minimises log(1 - D_j(f_j^L)) (the minimax form), the gradient vanishes exactly when D_j confidently
    rejects the LR features, which is the usual state early in training, when HR and LR features are easy
    to tell apart; -log D_j(f_j^L) has the same fixed point (D_j = 1/2 on both sets, i.e. matched
    feature distributions) and a strong gradient there (Goodfellow et al. 2014). The HR term of Eq. 1 is
    left to the D step: the HR features are the target distribution (the gallery is HR) and are shaped by
    L_cls/L_tri/L_rec; F is not asked to make them look low-resolution. ``logits_hr`` is not used.

    ``form="minimax"``: L_adv = Eq. 1 itself, E_xH[log D_j(f_j^H)] + E_xL[log(1 - D_j(f_j^L))], which F
    minimises through both the HR and the LR features (= -discriminator_loss).
    """
    if form == "non_saturating":
        terms = [F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)) for lr in logits_lr]
        return torch.stack(terms).sum()
    if form == "minimax":
        return -discriminator_loss(logits_hr, logits_lr)
    raise ValueError(f"adv_loss={form!r}: must be non_saturating or minimax (reversal: see reverse_gradient)")


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None  # type: ignore[attr-defined]


def reverse_gradient(x: Tensor, scale: float) -> Tensor:
    """x unchanged, with the gradient flowing back through it multiplied by -scale (Ganin & Lempitsky 2015):
    a loss that D_j minimises on reverse_gradient(f_j, w_adv) trains D_j and makes F maximise it, weighted
    w_adv, in one backward (the `reversal` form of L_adv)."""
    return _GradientReversal.apply(x, scale)


def reconstruction_loss(x_rec: Tensor, x_hr: Tensor) -> Tensor:
    """One expectation of L_rec (Eq. 2): the L1 distance between G's output and the HR image.

    Eq. 2 is reconstruction_loss(G(f5^H), x^H) + reconstruction_loss(G(f5^L), x^{L->H}): the target is
    the HR image for both the HR and the LR input. The L1 norm is averaged over pixels and channels
    (Eq. 2 divided by 3HW), so its weight does not depend on the image size. Shapes (B, 3, H, W).
    """
    return F.l1_loss(x_rec, x_hr)


def classification_loss(logits: Tensor, labels: Tensor, smoothing: float = 0.0) -> Tensor:
    """One expectation of L_cls (Eq. 3): cross-entropy of C(v) against the identity label.

    Eq. 3 is classification_loss(C(v^H), y) + classification_loss(C(v^L), y). Averaged over the labelled
    images only; labels -1 contribute nothing (0 with zero gradient if no image is labelled).
    ``smoothing`` = eps > 0 smooths the target (label smoothing, Szegedy et al. 2016): 1 - eps + eps / K on
    the identity and eps / K on each other class, i.e. (1 - eps) CE(y) + eps mean_k CE(k); 0: Eq. 3 as written.
    logits (B, K), labels (B,) long.
    """
    labelled = labels >= 0  # (B,)
    per_image = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none",
                                label_smoothing=smoothing)  # (B,)
    per_image = torch.where(labelled, per_image, torch.zeros_like(per_image))
    return per_image.sum() / labelled.sum().clamp(min=1)


def triplet_loss(
    v: Tensor, labels: Tensor, margin: float, mining: str, generator: torch.Generator | None = None
) -> Tensor:
    """One expectation of L_tri (Eq. 4-6) within one resolution set: mean of max(0, m + d_pos - d_neg).

    Eq. 6 is triplet_loss(v^H, y) + triplet_loss(v^L, y): positives and negatives of an HR anchor are
    taken from the HR images of the batch, those of an LR anchor from the LR images, as the paper
    writes it. d_pos, d_neg are Euclidean distances ||v_x - v_xpos||_2, ||v_x - v_xneg||_2 (Eq. 4-5),
    computed exactly (torch.cdist without the matrix-product shortcut, whose rounding at 0 distance
    would give NaN gradients for duplicated images).

    How each anchor x (an image with label >= 0) gets its pair, among the other labelled images:

    * ``mining="sampled"`` (the paper): one positive (same label, not x itself) and one negative
      (other label), each drawn uniformly at random. One matrix ``torch.rand((N, N), generator=...)``
      of scores is drawn per call; the positive of anchor i is the valid j with the highest score
      ``scores[i, j]``, the negative likewise (positives and negatives are disjoint, so the two draws
      are independent).
    * ``mining="batch_hard"`` (Hermans et al. 2017): the farthest positive and the closest negative.

    Anchors without a positive or without a negative in the set are left out; the loss is the mean over
    the remaining anchors (0 if none). Unlabelled images (-1) are never anchors, positives or negatives.
    v (N, d), labels (N,) long.
    """
    n = v.shape[0]
    v32 = v.float()
    dist = torch.cdist(v32, v32, compute_mode="donot_use_mm_for_euclid_dist")  # (N, N)
    labelled = labels >= 0  # (N,)
    both = labelled[:, None] & labelled[None, :]  # (N, N)
    same = labels[:, None] == labels[None, :]  # (N, N)
    not_self = ~torch.eye(n, dtype=torch.bool, device=v.device)  # (N, N)
    is_pos = both & same & not_self  # (N, N)
    is_neg = both & ~same  # (N, N)
    if mining == "batch_hard":
        d_pos = torch.where(is_pos, dist, torch.zeros_like(dist)).amax(dim=1)  # (N,)
        d_neg = torch.where(is_neg, dist, torch.full_like(dist, torch.inf)).amin(dim=1)  # (N,)
    elif mining == "sampled":
        scores = torch.rand((n, n), generator=generator, device=v.device)  # (N, N)
        pos = torch.where(is_pos, scores, torch.full_like(scores, -1.0)).argmax(dim=1)  # (N,)
        neg = torch.where(is_neg, scores, torch.full_like(scores, -1.0)).argmax(dim=1)  # (N,)
        d_pos = dist.gather(1, pos[:, None]).squeeze(1)  # (N,)
        d_neg = dist.gather(1, neg[:, None]).squeeze(1)  # (N,)
    else:
        raise ValueError(f"mining={mining!r}: must be batch_hard or sampled")
    anchor = is_pos.any(dim=1) & is_neg.any(dim=1)  # (N,)
    d_neg = torch.where(anchor, d_neg, torch.zeros_like(d_neg))  # no inf left in the graph
    hinge = F.relu(margin + d_pos - d_neg)  # (N,)
    hinge = torch.where(anchor, hinge, torch.zeros_like(hinge))
    return hinge.sum() / anchor.sum().clamp(min=1)
