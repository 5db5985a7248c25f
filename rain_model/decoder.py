"""G: the high-resolution decoder that reconstructs the HR image from f5 (Eq. 2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class HRDecoder(nn.Module):
    """G of the paper: f5 (B, d, H/32, W/32) -> x_rec (B, 3, H, W) in [0, 1].

    A 1x1 convolution reduces d to ``channels[0]``; then one learned stage per entry of ``channels``
    (nearest x2 up-sampling, 3x3 convolution, batch norm, ReLU) and a 3x3 convolution to RGB. With
    fewer than five stages the RGB map is brought the rest of the way to H x W by bilinear
    interpolation; a sigmoid gives [0, 1], the range of the HR target.

    The default (four stages, 64-32-16-8 channels, i.e. RGB predicted at H/2 x W/2) keeps G cheap:
    it is an auxiliary branch that runs on both the HR and the LR half of every batch, and the last
    stage at full resolution would cost as much as the other four on a CPU (memory-bound layers with
    few channels) for detail that the 32x down-sampled f5 hardly holds. Five entries give a fully
    learned full-resolution decoder.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        if not 1 <= len(channels) <= 5:
            raise ValueError(f"decoder_channels={channels!r}: must have 1 to 5 entries (x2 stages)")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels[0], kernel_size=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        ]
        width = channels[0]
        for out in channels:
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(width, out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            width = out
        self.body = nn.Sequential(*layers)
        self.to_rgb = nn.Conv2d(width, 3, kernel_size=3, padding=1)
        self.bilinear_factor = 2 ** (5 - len(channels))

    def forward(self, f5: Tensor) -> Tensor:
        h = self.body(f5)  # (B, c_last, H/f, W/f), f = bilinear_factor
        rgb_logits = self.to_rgb(h)  # (B, 3, H/f, W/f)
        if self.bilinear_factor > 1:
            rgb_logits = F.interpolate(
                rgb_logits, scale_factor=self.bilinear_factor, mode="bilinear", align_corners=False
            )  # (B, 3, H, W)
        return rgb_logits.sigmoid()  # (B, 3, H, W)
