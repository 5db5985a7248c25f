"""L_adv makes HR and LR features of the same images closer (the point of Eq. 1).

Two identical training runs on a tiny generated re-ID problem, one with L_adv (variant rain) and one
without (baseline_hrlr, i.e. RAIN without L_adv); same seed, same batches. On held-out images:

* cross-resolution gap = mean_i ||v_i^H - v_i^L|| / mean_{i,j} ||v_i^H - v_j^H||: how far an image's LR
  feature is from its HR feature, relative to how far HR features of different images are (scale-free,
  so shrinking all features does not help);
* centroid gap = ||mean_i v_i^H - mean_i v_i^L|| / mean_{i,j} ||v_i^H - v_j^H||: the shift between the
  two feature distributions, which is what the discriminators see;
* a fresh discriminator: an L2-regularised logistic regression trained on half of the held-out images
  to tell v^H from v^L, scored by its cross-entropy on the other half (higher = less sure).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rain_model.config import ModelConfig, ObjectiveConfig
from rain_model.network import RAIN
from rain_model.objective import Batch, make_optimizers, train_step

SEED = 1
N_IDS, H, W = 8, 32, 32
STEPS = 60


def _images(n_per_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Identity = three coloured stripes (top/middle/bottom) and a fine binary texture; per image: a
    random texture shift and pixel noise. LR = down-sampled by r in {2, 3, 4}, bilinearly restored."""
    g_ids = torch.Generator().manual_seed(SEED)
    colours = torch.rand(N_IDS, 3, 3, 1, 1, generator=g_ids)  # (K, stripe, RGB, 1, 1)
    texture = (torch.rand(N_IDS, 1, H, W, generator=g_ids) > 0.5).float()  # (K, 1, H, W)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_IDS).repeat_interleave(n_per_id)  # (N,)
    x_hr = torch.empty(len(labels), 3, H, W)
    x_lr = torch.empty(len(labels), 3, H, W)
    for i, y in enumerate(labels.tolist()):
        stripes = torch.cat([colours[y, s].expand(3, H // 3 + (s < H % 3), W) for s in range(3)], dim=1)
        shift = int(torch.randint(0, 4, (1,), generator=g))
        tex = torch.roll(texture[y], shifts=shift, dims=2)  # (1, H, W)
        x_hr[i] = (stripes * (0.75 + 0.25 * tex) + 0.05 * torch.randn(3, H, W, generator=g)).clamp(0, 1)
        r = int(torch.randint(2, 5, (1,), generator=g))
        small = F.interpolate(x_hr[i : i + 1], size=(H // r, W // r), mode="bilinear", antialias=True)
        x_lr[i] = F.interpolate(small, size=(H, W), mode="bilinear")[0]
    return x_hr, x_lr, labels


def _train_and_embed(variant: str) -> tuple[np.ndarray, np.ndarray]:
    x_hr, x_lr, labels = _images(8, seed=SEED + 1)
    x_test_hr, x_test_lr, _ = _images(16, seed=SEED + 2)
    torch.manual_seed(SEED)
    model = RAIN(ModelConfig(backbone="resnet18", base_channels=64, levels=(4, 5), decoder_channels=(32, 16, 8)),
                 N_IDS)
    # Higher rates than the defaults: few steps. The fp32, contiguous layout the thresholds below were measured
    # with: channels_last and bf16 change float rounding, and 60 adversarial steps carry it into another
    # trajectory. Gap ratio (with / without L_adv) over seeds 1-6, measured: fp32 contiguous 0.40 0.54 0.58
    # 0.54 0.42 0.31; channels_last 0.88 0.91 0.41 0.66 0.56 0.36 (below 1 on every seed, weaker on 5 of 6);
    # bf16 autocast (on an avx512_bf16 CPU) 0.66 0.59 0.64 0.33 0.43 0.25.
    obj = ObjectiveConfig(variant=variant, lr=1e-3, lr_d_ratio=3.0, channels_last=False, bf16_autocast=False)
    optimizers = make_optimizers(model, obj)
    g = torch.Generator().manual_seed(SEED + 3)
    model.train()
    for step in range(STEPS):  # P = 4 identities x K = 4 images
        ids = torch.randperm(N_IDS, generator=g)[:4]
        idx = torch.cat([y * 8 + torch.randperm(8, generator=g)[:4] for y in ids.tolist()])  # (16,)
        batch = Batch(x_hr[idx], x_lr[idx], labels[idx])
        train_step(model.generator, model.discriminators, optimizers, batch, obj, step)
    model.eval()
    with torch.no_grad():
        return model.embed(x_test_hr).numpy(), model.embed(x_test_lr).numpy()


def _alignment(v_hr: np.ndarray, v_lr: np.ndarray) -> dict[str, float]:
    spread = np.linalg.norm(v_hr[:, None] - v_hr[None], axis=2).mean()
    n = len(v_hr)
    half = np.random.default_rng(0).permutation(n)
    fit, held_out = half[: n // 2], half[n // 2 :]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000))
    probe.fit(np.concatenate([v_hr[fit], v_lr[fit]]), np.r_[np.ones(len(fit)), np.zeros(len(fit))])
    y_held = np.r_[np.ones(len(held_out)), np.zeros(len(held_out))]
    p_held = probe.predict_proba(np.concatenate([v_hr[held_out], v_lr[held_out]]))
    return {
        "gap": float(np.linalg.norm(v_hr - v_lr, axis=1).mean() / spread),
        "centroid_gap": float(np.linalg.norm(v_hr.mean(0) - v_lr.mean(0)) / spread),
        "probe_cross_entropy": float(log_loss(y_held, p_held)),
    }


def test_adversarial_loss_brings_hr_and_lr_features_closer() -> None:
    torch.set_num_threads(1)
    without = _alignment(*_train_and_embed("baseline_hrlr"))
    with_adv = _alignment(*_train_and_embed("rain"))
    report = f"without L_adv {without}, with L_adv {with_adv}"
    # measured here: gap 0.165 -> 0.065, centroid gap 0.098 -> 0.027, probe cross-entropy 0.50 -> 0.64
    # (seeds 2 and 3 of this problem: gap ratio <= 0.58, centroid ratio <= 0.44, cross-entropy +0.09)
    assert with_adv["gap"] < 0.75 * without["gap"], report
    assert with_adv["centroid_gap"] < 0.7 * without["centroid_gap"], report
    assert with_adv["probe_cross_entropy"] > without["probe_cross_entropy"] + 0.03, report
