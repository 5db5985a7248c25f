"""RAIN: F (backbone), G (HR decoder), C (classifier) and the discriminators D_j."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rain_model.backbone import Features, ResNetBackbone, gap
from rain_model.config import ModelConfig
from rain_model.decoder import HRDecoder
from rain_model.discriminator import ResolutionDiscriminators


@dataclass
class GeneratorOutput:
    """What one forward of F/G/C gives the objective (N images in, N = B or 2B)."""

    feats: tuple[Tensor, ...]
    """f_j for the requested levels, each (N, d_j, H/2^j, W/2^j)."""
    v: Tensor
    """v = GAP(f5), (N, d): what L_tri reads (before the BNNeck when there is one)."""
    logits: Tensor | None
    """C(v), or C(BN(v)) with the BNNeck, (N, K); None when C was skipped."""
    x_rec: Tensor | None
    """G(f5), (N, 3, H, W) in [0, 1]; None when G was skipped."""
    touch: Tensor
    """0-dim zero that depends on every parameter of a skipped head (add it to the loss; see forward)."""


class Generator(nn.Module):
    """The min side of Eq. 8: F (``backbone``), G (``decoder``) and C (``classifier``)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}: must be >= 1")
        if cfg.pretrained is not None:  # silently training from scratch instead would be worse than failing
            raise ValueError(f"pretrained={cfg.pretrained!r}: fetch the weights and pass them as pretrained_path "
                             "(tasks/training/weights.py resolve)")
        self.backbone = ResNetBackbone(cfg.backbone, cfg.pretrained_path, cfg.base_channels)
        d = self.backbone.channels[4]
        self.decoder = HRDecoder(d, cfg.decoder_channels)
        self.classifier = nn.Linear(d, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)
        self.retrieval_feature = cfg.retrieval_feature
        # BNNeck (reid-strong-baseline): BN between v and C, its shift frozen at 0. Absent when off, so the
        # weights (and a state_dict saved without it) are exactly the paper network's.
        self.neck: nn.BatchNorm1d | None = None
        if cfg.bnneck:
            self.neck = nn.BatchNorm1d(d)
            self.neck.bias.requires_grad_(False)

    def forward(
        self, x: Tensor, levels: tuple[int, ...] = (), decode: bool = True, classify: bool = True
    ) -> GeneratorOutput:
        """Run F on x (N, 3, H, W) in [0, 1], then G and C if asked.

        A skipped head still enters the graph through ``touch`` (0 x the sum of its parameters): under
        DistributedDataParallel without ``find_unused_parameters`` every parameter must get a gradient
        in every step, and a zero gradient (cleared again by the objective) satisfies that for free.
        """
        f = self.backbone(x)
        f5 = f[4]  # (N, d, H/32, W/32)
        v = gap(f5)  # (N, d)
        x_rec = self.decoder(f5) if decode else None  # (N, 3, H, W)
        logits = self.classifier(self._neck(v)) if classify else None  # (N, K)
        skipped = [p for p in self.skipped_parameters(decode, classify)]
        touch = torch.stack([p.sum() for p in skipped]).sum() * 0.0 if skipped else v.new_zeros(())
        return GeneratorOutput(tuple(f[j - 1] for j in levels), v, logits, x_rec, touch)

    def skipped_parameters(self, decode: bool, classify: bool) -> Iterator[nn.Parameter]:
        """Parameters of the heads a forward with these switches does not run."""
        if not decode:
            yield from self.decoder.parameters()
        if not classify:  # the BNNeck feeds C alone: it is skipped with it
            yield from self.classifier.parameters()
            if self.neck is not None:
                yield from self.neck.parameters()

    def _neck(self, v: Tensor) -> Tensor:
        """BN(v) with the BNNeck, else v: (N, d) -> (N, d)."""
        return v if self.neck is None else self.neck(v)

    def features(self, x: Tensor) -> Features:
        """f1..f5 of F for images x (B, 3, H, W) in [0, 1]."""
        return self.backbone(x)

    def embed(self, x: Tensor) -> Tensor:
        """The retrieval feature of x (B, 3, H, W) in [0, 1], (B, d): v = GAP(f5), or BN(v) with
        ``retrieval_feature: bnneck``."""
        v = gap(self.backbone(x)[4])  # (B, d)
        return self._neck(v) if self.retrieval_feature == "bnneck" else v


class RAIN(nn.Module):
    """Resolution Adaptation and re-Identification Network (AAAI 2019).

    ``generator`` holds F, G and C (updated to minimise Eq. 7); ``discriminators`` holds one D_j per
    level in ``cfg.levels`` (updated to maximise Eq. 1). Keeping them as two modules lets the training
    stage wrap each in DistributedDataParallel and give each its own optimizer.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg, num_classes)
        self.discriminators = ResolutionDiscriminators(cfg.levels, self.generator.backbone.channels, cfg.disc_channels)

    def embed(self, x: Tensor) -> Tensor:
        """The retrieval feature (``Generator.embed``: v = GAP(f5), or BN(v)): x (B, 3, H, W) in [0, 1] -> (B, d)."""
        return self.generator.embed(x)

    def forward(self, x: Tensor) -> Tensor:
        """Same as ``embed`` (so an exported model maps images to embeddings)."""
        return self.embed(x)
