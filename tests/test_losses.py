"""The loss terms (Eq. 1-6) against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rain_model.losses import (
    adversarial_loss,
    classification_loss,
    discriminator_loss,
    reconstruction_loss,
    triplet_loss,
)


def _labels() -> torch.Tensor:
    # 4 identities with 3, 3, 2, 1 images (identity 3 has no positive), and 3 unlabelled images
    return torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, -1, -1, -1])


def _reference_triplet(v: torch.Tensor, labels: list[int], margin: float, mining: str, seed: int) -> float:
    """Eq. 4-6 with explicit loops over anchors, positives and negatives."""
    n = len(labels)
    scores = torch.rand((n, n), generator=torch.Generator().manual_seed(seed)).tolist()

    def dist(i: int, j: int) -> float:
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(v[i].tolist(), v[j].tolist(), strict=True)))

    hinges = []
    for i in range(n):
        if labels[i] < 0:
            continue
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(n) if labels[j] >= 0 and labels[j] != labels[i]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            d_pos = max(dist(i, j) for j in pos)
            d_neg = min(dist(i, j) for j in neg)
        else:
            d_pos = dist(i, max(pos, key=lambda j: scores[i][j]))
            d_neg = dist(i, max(neg, key=lambda j: scores[i][j]))
        hinges.append(max(0.0, margin + d_pos - d_neg))
    return sum(hinges) / len(hinges) if hinges else 0.0


@pytest.mark.parametrize("mining", ["batch_hard", "sampled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_loss_equals_brute_force_reference(mining: str, seed: int) -> None:
    torch.manual_seed(seed)
    labels = _labels()
    v = torch.randn(len(labels), 8, dtype=torch.float64)
    margin = 1.5  # large enough that some hinges are active and some are not
    got = triplet_loss(v, labels, margin, mining, generator=torch.Generator().manual_seed(seed))
    want = _reference_triplet(v, labels.tolist(), margin, mining, seed)
    assert want > 0
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_sampled_mining_draws_every_valid_positive_and_negative() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    v = torch.randn(7, 4)
    generator = torch.Generator().manual_seed(0)
    seen_losses = {round(float(triplet_loss(v, labels, 5.0, "sampled", generator)), 5) for _ in range(200)}
    # anchor 0 alone has 3 positives x 3 negatives; the mean over anchors takes many distinct values
    assert len(seen_losses) > 20


def test_unlabelled_samples_contribute_nothing_to_cls_and_tri() -> None:
    torch.manual_seed(0)
    labels = _labels()
    unlabelled = labels < 0
    v = torch.randn(len(labels), 8, requires_grad=True)
    logits = torch.randn(len(labels), 5, requires_grad=True)
    l_tri = triplet_loss(v, labels, 0.3, "batch_hard")
    l_cls = classification_loss(logits, labels)
    (l_tri + l_cls).backward()
    assert v.grad is not None and logits.grad is not None
    assert torch.all(v.grad[unlabelled] == 0) and torch.all(logits.grad[unlabelled] == 0)

    v2 = v.detach().clone()
    logits2 = logits.detach().clone()
    v2[unlabelled] = torch.randn(int(unlabelled.sum()), 8) * 100
    logits2[unlabelled] = torch.randn(int(unlabelled.sum()), 5) * 100
    labels2 = labels.clone()
    labels2[unlabelled] = -7  # any negative label means unlabelled
    for mining in ("batch_hard", "sampled"):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(
            triplet_loss(v.detach(), labels, 0.3, mining, g1), triplet_loss(v2, labels2, 0.3, mining, g2)
        )
    assert torch.equal(classification_loss(logits.detach(), labels), classification_loss(logits2, labels2))


def test_classification_loss_is_cross_entropy_over_labelled_images() -> None:
    torch.manual_seed(0)
    labels = _labels()
    logits = torch.randn(len(labels), 5)
    keep = labels >= 0
    want = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(classification_loss(logits, labels), want)


def test_no_labelled_image_gives_zero_finite_losses_with_zero_gradient() -> None:
    labels = torch.full((6,), -1)
    v = torch.randn(6, 8, requires_grad=True)
    logits = torch.randn(6, 5, requires_grad=True)
    losses = [classification_loss(logits, labels)] + [
        triplet_loss(v, labels, 0.3, mining) for mining in ("batch_hard", "sampled")
    ]
    total = torch.stack(losses).sum()
    total.backward()
    assert float(total.detach()) == 0.0
    assert v.grad is not None and logits.grad is not None
    assert torch.all(v.grad == 0) and torch.all(logits.grad == 0)


@pytest.mark.parametrize("mining", ["batch_hard", "sampled"])
def test_triplet_gradient_is_finite_for_duplicated_images(mining: str) -> None:
    v = torch.randn(4, 8)
    v = torch.cat([v, v]).requires_grad_(True)  # every image twice: positive distance exactly 0
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    loss = triplet_loss(v, labels, 0.3, mining)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_discriminator_and_adversarial_losses_match_eq1() -> None:
    torch.manual_seed(0)
    logits_hr = [torch.randn(5), torch.randn(5)]
    logits_lr = [torch.randn(5), torch.randn(5)]
    eq1 = torch.stack([
        torch.log(torch.sigmoid(hr)).mean() + torch.log(1 - torch.sigmoid(lr)).mean()
        for hr, lr in zip(logits_hr, logits_lr, strict=True)
    ]).sum()
    assert float(eq1) < 0  # a sum of log-probabilities
    torch.testing.assert_close(discriminator_loss(logits_hr, logits_lr), -eq1)
    torch.testing.assert_close(adversarial_loss(logits_hr, logits_lr, "minimax"), eq1)
    non_saturating = -torch.stack([torch.log(torch.sigmoid(lr)).mean() for lr in logits_lr]).sum()
    assert float(non_saturating) > 0  # minus a sum of log-probabilities
    torch.testing.assert_close(adversarial_loss(logits_hr, logits_lr, "non_saturating"), non_saturating)
    with pytest.raises(ValueError, match="adv_loss"):
        adversarial_loss(logits_hr, logits_lr, "wasserstein")


def test_non_saturating_loss_keeps_a_gradient_where_minimax_saturates() -> None:
    logit_lr = torch.tensor([-12.0], requires_grad=True)  # D is sure the LR feature is LR
    (g_ns,) = torch.autograd.grad(adversarial_loss([], [logit_lr], "non_saturating"), logit_lr)
    (g_mm,) = torch.autograd.grad(adversarial_loss([torch.zeros(1)], [logit_lr], "minimax"), logit_lr)
    assert abs(float(g_mm)) < 1e-4 < abs(float(g_ns))


def test_reconstruction_loss_is_mean_absolute_error() -> None:
    torch.manual_seed(0)
    x_rec, x_hr = torch.rand(2, 3, 32, 16), torch.rand(2, 3, 32, 16)
    want = (x_rec - x_hr).abs().sum() / x_rec.numel()
    torch.testing.assert_close(reconstruction_loss(x_rec, x_hr), want)
