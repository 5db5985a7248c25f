"""D_j: resolution discriminators on feature level j (Eq. 1)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class ResolutionDiscriminator(nn.Module):
    """D_j: f_j (B, d_j, h, w) -> logit (B,) that f_j was extracted from an HR image.

    A stack of 1x1 convolutions with LeakyReLU judges every location of the map, the hidden map is
    globally average-pooled and a linear layer gives one logit per image (D_j = sigmoid(logit)).
    """

    def __init__(self, in_channels: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for out in hidden:
            layers += [nn.Conv2d(width, out, kernel_size=1), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, f: Tensor) -> Tensor:
        h = self.body(f)  # (B, c, h, w)
        return self.head(h.mean(dim=(2, 3))).squeeze(1)  # (B,)


class ResolutionDiscriminators(nn.Module):
    """All D_j, one per level in ``levels``; called on the feature maps of those levels, in order."""

    def __init__(self, levels: tuple[int, ...], level_channels: Sequence[int], hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.levels = levels
        self.by_level = nn.ModuleDict({f"f{j}": ResolutionDiscriminator(level_channels[j - 1], hidden) for j in levels})

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """feats: f_j for j in ``levels`` -> one logit vector (B,) per level."""
        if len(feats) != len(self.levels):
            raise ValueError(f"expected one feature map per level {self.levels}, got {len(feats)}")
        return tuple(self.by_level[f"f{j}"](f) for j, f in zip(self.levels, feats, strict=True))
