"""F: the cross-resolution feature extractor, a torchvision ResNet cut into residual blocks R1..R5."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESNETS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}

Features = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


class ResNetBackbone(nn.Module):
    """F of the paper: ResNet residual blocks R1..R5 giving feature maps f1..f5.

    R1 is the stem (conv1, bn1, relu; stride 2), R2 = max-pool + layer1 (stride 4), R3 = layer2 (8),
    R4 = layer3 (16), R5 = layer4 (32); each f_j is the last activation of its block. Inputs are RGB in
    [0, 1]; the ImageNet mean/std normalisation happens here. Parameter names are torchvision's, so an
    ImageNet state_dict loads directly (its ``fc.*`` entries are ignored).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, arch: str, pretrained_path: str | None = None, base_channels: int = 64) -> None:
        super().__init__()
        resnet = build_resnet(arch, base_channels)
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        expansion = 4 if arch == "resnet50" else 1
        self.channels: tuple[int, ...] = (base_channels, *(base_channels * 2**i * expansion for i in range(4)))
        """Channels d of f1..f5."""
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained_path is not None:
            self.load_imagenet(pretrained_path)

    def forward(self, x: Tensor) -> Features:
        """x (B, 3, H, W) in [0, 1], H and W divisible by 32 -> (f1, f2, f3, f4, f5)."""
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"expected images (B, 3, H, W) with H, W divisible by 32, got {tuple(x.shape)}")
        x_norm = (x - self.mean) / self.std  # (B, 3, H, W)
        f1 = self.relu(self.bn1(self.conv1(x_norm)))  # (B, d1, H/2, W/2)
        f2 = self.layer1(self.maxpool(f1))  # (B, d2, H/4, W/4)
        f3 = self.layer2(f2)  # (B, d3, H/8, W/8)
        f4 = self.layer3(f3)  # (B, d4, H/16, W/16)
        f5 = self.layer4(f4)  # (B, d5, H/32, W/32)
        return f1, f2, f3, f4, f5

    def load_imagenet(self, path: str) -> None:
        """Load a torchvision ImageNet ResNet state_dict from a local file (weights-only unpickling).

        Raises ValueError naming the file when keys or shapes do not match this architecture.
        """
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{path}: not a state_dict of this ResNet; missing keys {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"{path}: shape of {key} is {tuple(value.shape)}, this ResNet needs {tuple(own[key].shape)}"
                )
        self.load_state_dict(state, strict=True)


def build_resnet(arch: str, base_channels: int = 64) -> torchvision.models.ResNet:
    """torchvision's ResNet `arch` with `base_channels` channels in R1 and layer1 (each later layer doubles
    them; torchvision's are 64, which ImageNet weights need). Compute goes with the square of the width:
    at 32 a resnet18 step costs about a third of one at 64 on a CPU (bench/width.py)."""
    if arch not in _RESNETS:
        raise ValueError(f"backbone={arch!r}: must be one of {', '.join(_RESNETS)}")
    resnet = _RESNETS[arch](weights=None)
    if base_channels == 64:
        return resnet
    block = type(resnet.layer1[0])
    depths = [len(layer) for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)]
    resnet.inplanes = base_channels  # _make_layer reads and advances it
    resnet.conv1 = nn.Conv2d(3, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
    resnet.bn1 = nn.BatchNorm2d(base_channels)
    for i, depth in enumerate(depths):
        layer = resnet._make_layer(block, base_channels * 2**i, depth, stride=1 if i == 0 else 2)
        setattr(resnet, f"layer{i + 1}", layer)
    for m in resnet.modules():  # torchvision's own initialisation (ResNet.__init__), for the new layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return resnet


def gap(f: Tensor) -> Tensor:
    """Global average pooling: (B, d, h, w) -> (B, d)."""
    return f.mean(dim=(2, 3))
