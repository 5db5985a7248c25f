"""The default discriminators learn at a pace that lets the game play: on the HR and LR features of a fixed F,
the D_j with the default optimizer settings tell the two resolutions apart within a few steps.

Why: with D at an absolute 1e-4 against F's 2e-3 (before issue 27) L_D sat at a coin flip's 4 ln 2 for whole
runs on real crops and L_adv's gradient carried no information. Here F is frozen (a fresh network: its HR and
LR features differ, since the LR copies lost the fine texture), so all D has to do is what a linear probe does.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from rain_model.config import ModelConfig, ObjectiveConfig
from rain_model.diagnostics import discriminator_accuracy
from rain_model.losses import discriminator_loss
from rain_model.network import RAIN
from rain_model.objective import make_optimizers

H, W, BATCH = 64, 32, 32
FEW_STEPS = 12  # D updates allowed; a linear probe needs one fit
SEPARATED = 0.8  # balanced accuracy on held-out features that counts as telling HR from LR (measured at 12 steps:
# lr_d_ratio 0.5 0.93 / 0.84 for D4 / D5, 1.0 0.86 / 0.85, 0.3 0.94 / 0.88, the former 0.05 0.57 / 0.73; each
# reaches 0.86-0.95 by 48 steps)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR, LR) batches: smooth colour fields with a fine texture; LR = down-sampled by r in {2, 3, 4} and
    bilinearly restored, as the MLR protocol makes them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, H // 16, W // 16, generator=g)
    x_hr = (F.interpolate(coarse, size=(H, W), mode="bilinear") + 0.3 * torch.rand(n, 3, H, W, generator=g)).clamp(0, 1)
    x_lr = torch.empty_like(x_hr)
    for i in range(n):
        r = int(torch.randint(2, 5, (1,), generator=g))
        small = F.interpolate(x_hr[i : i + 1], size=(H // r, W // r), mode="bilinear", antialias=True)
        x_lr[i] = F.interpolate(small, size=(H, W), mode="bilinear")[0]
    return x_hr, x_lr


def _fixed_features(model: RAIN, seed: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """f_j of a batch's BATCH HR then BATCH LR rows, as the D step sees them (train-mode F, detached); (features,
    n_hr)."""
    x_hr, x_lr = _images(BATCH, seed)
    with torch.no_grad():
        out = model.generator(torch.cat([x_hr, x_lr]), levels=model.discriminators.levels, decode=False,
                              classify=False)
    return tuple(f.detach() for f in out.feats), BATCH


def _accuracy_after(obj: ObjectiveConfig, steps: int) -> float:
    """Balanced accuracy of the D_j (the worst level) on held-out features after `steps` D updates."""
    torch.manual_seed(0)
    model = RAIN(ModelConfig(), num_classes=8).train()
    optimizer = make_optimizers(model, obj).discriminator
    train = [_fixed_features(model, seed) for seed in range(8)]
    held_out = [_fixed_features(model, seed=100 + i) for i in range(4)]
    for step in range(steps):
        feats, n = train[step % len(train)]
        logits = model.discriminators(feats)
        optimizer.zero_grad()
        discriminator_loss([lg[:n] for lg in logits], [lg[n:] for lg in logits]).backward()
        optimizer.step()
    with torch.no_grad():
        logits = [model.discriminators(feats) for feats, _ in held_out]  # per batch, per level (2 BATCH,)
    levels = range(len(logits[0]))
    return min(sum(sum(discriminator_accuracy(lg[j][:BATCH], lg[j][BATCH:])) / 2 for lg in logits) / len(logits)
               for j in levels)


def test_the_default_discriminators_separate_a_fixed_f_s_hr_and_lr_features_within_a_few_steps() -> None:
    assert _accuracy_after(ObjectiveConfig(), FEW_STEPS) >= SEPARATED


def test_the_old_pace_does_not_which_is_what_this_test_guards_against() -> None:
    """D at the former absolute 1e-4 (1/20 of F's 2e-3) is still far from it after the same steps: the check
    above can fail, and a default that drifts back to it would fail it."""
    old = dataclasses.replace(ObjectiveConfig(), lr_d_ratio=0.05)
    assert _accuracy_after(old, FEW_STEPS) < SEPARATED
