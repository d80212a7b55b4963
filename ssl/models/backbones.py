"""Backbones: an `nn.Module` with `feature_dim`, `forward(x) -> (B, D)` and `forward_dense(x) -> (B, C, h, w)`.

`build_backbone(name, **kwargs)` is the only constructor; exports record `{"name", "kwargs"}` so the same call
rebuilds the module from the file alone.
"""

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from ssl.errors import UserError


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier.

    `small_stem` swaps the 7x7 stride-2 convolution and max-pool for one 3x3 stride-1 convolution, the usual
    stem for 32 px images (CIFAR), so the last stage still sees a 4x4 map instead of 1x1.
    """

    def __init__(self, depth: int, in_channels: int = 3, small_stem: bool = False) -> None:
        super().__init__()
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if small_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.feature_dim: int = net.fc.in_features
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_dense(x).mean(dim=(2, 3))


def _vit(variant: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        from ssl.models.vit import VisionTransformer

        return VisionTransformer.from_variant(variant, **kwargs)

    return build


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda **kwargs: ResNetBackbone(18, **kwargs),
    "resnet50": lambda **kwargs: ResNetBackbone(50, **kwargs),
    "vit_tiny": _vit("tiny"),
    "vit_small": _vit("small"),
}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build backbone `name` (one of `BACKBONES`) with its keyword arguments (`in_channels`, `small_stem`, ...)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    try:
        backbone = BACKBONES[name](**kwargs)
    except TypeError as error:
        raise UserError(f"backbone {name!r} does not take these arguments {sorted(kwargs)}: {error}") from None
    backbone.spec = {"name": name, "kwargs": dict(kwargs)}
    return backbone
