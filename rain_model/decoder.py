"""G: the high-resolution decoder that reconstructs the HR image from f5 (Eq. 2)."""

from __future__ import annotations

from torch import Tensor, nn


class HRDecoder(nn.Module):
    """G of the paper: f5 (B, d, H/32, W/32) -> x_rec (B, 3, H, W) in [0, 1].

    A 1x1 convolution reduces d to ``channels[0]``, then five stages of (nearest x2 up-sampling,
    3x3 convolution, batch norm, ReLU) bring the map back to the input size, and a 3x3 convolution with
    a sigmoid gives RGB in [0, 1] (the range of the HR target). Widths are kept small on purpose: G is an
    auxiliary branch and runs on both the HR and the LR half of every batch.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        if len(channels) != 5:
            raise ValueError(f"decoder_channels={channels!r}: must have exactly 5 entries")
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

    def forward(self, f5: Tensor) -> Tensor:
        h = self.body(f5)  # (B, c5, H, W)
        return self.to_rgb(h).sigmoid()  # (B, 3, H, W)
