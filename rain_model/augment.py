"""Training-time augmentation of an HR image and its LR copy, one random draw per pair.

The LR copy is the same picture at a lower resolution (brought back to H x W), so whatever moves or hides a
part of the HR image must do the same to the LR one: each row of x_hr and the same row of x_lr get the same
horizontal flip, the same crop offset and the same erased rectangle. The options are those of the re-ID
"strong baseline" (Luo et al. 2019: flip, zero padding then a random crop back to the input size, random
erasing, Zhong et al. 2020); the paper uses none of them. Pure tensor functions: the caller owns the generator.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor
from torch.nn import functional as F

ERASE_AREA = (0.02, 0.4)
"""Random erasing: the rectangle's share of the image, uniform in this range (reid-strong-baseline's)."""
ERASE_ASPECT = (0.3, 1 / 0.3)
"""Random erasing: the rectangle's height / width, uniform in this range (reid-strong-baseline's 0.3-3.3)."""
ERASE_FILL = 0.5
"""What an erased rectangle holds: mid-grey (0.5 in [0, 1], 128 in uint8) in every channel. A constant free
of dataset statistics (reid-strong-baseline fills with ImageNet's mean); the model normalises inside."""


def pair_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one training step: a function of (seed, rank, global step) alone, so a run resumed
    from a checkpoint at step s draws what the uninterrupted run drew there, with no state to save."""
    digest = hashlib.sha256(f"rain-augment:{seed}:{rank}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def augment_pair(x_hr: Tensor, x_lr: Tensor, generator: torch.Generator, flip: bool = False, pad: int = 0,
                 erase: float = 0.0) -> tuple[Tensor, Tensor]:
    """x_hr, x_lr (B, 3, H, W), uint8 or float in [0, 1], with the same transform applied to row i of both.

    ``flip``: mirror each pair left-right with probability 1/2. ``pad`` > 0: pad with ``pad`` zero pixels on
    every side and crop back to H x W at an offset uniform in [0, 2 pad]^2 (a shift of up to ``pad`` pixels).
    ``erase``: with this probability per pair, fill one rectangle with ERASE_FILL; its area is a share of H x W
    uniform in ERASE_AREA, its aspect (h / w) uniform in ERASE_ASPECT, clamped to the image (where
    reid-strong-baseline retries a draw that does not fit, so that a probability of 1 erases every pair), its
    position uniform where it fits. Applied in that order. Every random number is drawn from ``generator``
    (a CPU generator), the same ones whatever is switched on; with everything off the inputs come back as they are.
    """
    if x_hr.shape != x_lr.shape or x_hr.dim() != 4:
        raise ValueError(f"x_hr {tuple(x_hr.shape)} and x_lr {tuple(x_lr.shape)} must both be (B, 3, H, W)")
    b, _, h, w = x_hr.shape
    if not 0 <= pad < min(h, w):
        raise ValueError(f"pad={pad!r}: must be in [0, {min(h, w)})")
    if not 0.0 <= erase <= 1.0:
        raise ValueError(f"erase={erase!r}: must be in [0, 1]")
    draws = torch.rand((8, b), generator=generator, dtype=torch.float64)  # (8, B): one column per pair
    if not flip and pad == 0 and erase == 0.0:
        return x_hr, x_lr
    x = torch.cat([x_hr, x_lr])  # (2B, 3, H, W): row i and row B + i are one pair
    device = x.device
    if flip:
        mirrored = (draws[0] < 0.5).repeat(2).to(device)  # (2B,)
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    if pad > 0:
        dy = (draws[1] * (2 * pad + 1)).long().clamp(max=2 * pad).repeat(2).to(device)  # (2B,)
        dx = (draws[2] * (2 * pad + 1)).long().clamp(max=2 * pad).repeat(2).to(device)  # (2B,)
        padded = F.pad(x, (pad, pad, pad, pad))  # (2B, 3, H + 2 pad, W + 2 pad), zeros
        rows = dy[:, None] + torch.arange(h, device=device)  # (2B, H)
        cols = dx[:, None] + torch.arange(w, device=device)  # (2B, W)
        picked = padded[torch.arange(2 * b, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        x = picked.permute(0, 3, 1, 2)  # (2B, H, W, 3) -> (2B, 3, H, W)
    if erase > 0.0:
        erased = draws[3] < erase  # (B,): rand in [0, 1), so 1 erases every pair and 0 none
        area = (ERASE_AREA[0] + draws[4] * (ERASE_AREA[1] - ERASE_AREA[0])) * h * w  # (B,) pixels
        aspect = ERASE_ASPECT[0] + draws[5] * (ERASE_ASPECT[1] - ERASE_ASPECT[0])  # (B,) height / width
        eh = torch.sqrt(area * aspect).round().long().clamp(1, h)  # (B,)
        ew = torch.sqrt(area / aspect).round().long().clamp(1, w)  # (B,)
        top = (draws[6] * (h - eh + 1)).long().clamp(max=h - eh)  # (B,)
        left = (draws[7] * (w - ew + 1)).long().clamp(max=w - ew)  # (B,)
        ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]  # (1, H, 1), (1, 1, W)
        inside = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None])
                  & (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None]))  # (B, H, W)
        mask = (inside & erased[:, None, None]).repeat(2, 1, 1)[:, None].to(device)  # (2B, 1, H, W)
        fill = torch.tensor(round(ERASE_FILL * 255) if x.dtype == torch.uint8 else ERASE_FILL, dtype=x.dtype,
                            device=device)
        x = torch.where(mask, fill, x)
    return x[:b], x[b:]
