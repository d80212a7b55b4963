"""Backbones: an `nn.Module` with `feature_dim`, `forward(x) -> (B, D)` and `forward_dense(x) -> (B, C, h, w)`.

`build_backbone(name, **kwargs)` is the only constructor; exports record `{"name", "kwargs"}` so the same call
rebuilds the module from the file alone.
"""

import inspect
from functools import partial

import torch
import torchvision
from torch import nn

from ssl.errors import UserError, refuse_unknown_arguments
from ssl.models.vit import VARIANTS, VisionTransformer

STEMS = ("imagenet", "cifar", "stride2", "cifar_pad2")
"""ResNet stems, by how much they shrink the image before `layer1`:
``imagenet``: 7x7 stride-2 convolution and 3x3 stride-2 max-pool (/4; torchvision's, for 224 px images);
``cifar``: one 3x3 stride-1 convolution padded by 1, no max-pool (/1: a 32 px image gives 32x32 maps; the usual
'same'-padded stem for 32 px images);
``cifar_pad2``: the same convolution padded by 2 (32 px -> 34x34 maps, 5x5 at `layer4` instead of 4x4):
solo-learn's CIFAR stem (solo/methods/base.py replaces conv1 so for cifar10/cifar100), which the recipes that
follow solo-learn use (byol_cifar, dino_cifar); with the same weights its features differ from ``cifar``'s;
``stride2``: one 3x3 stride-2 convolution padded by 1, no max-pool (/2; 28-32 px images on a CPU: a quarter of the
cifar stem's cost in every later stage, and `layer4` still sees 2x2 on 28 px instead of the imagenet stem's 1x1)."""
SMALL_STEMS = {"cifar": (1, 1), "cifar_pad2": (1, 2), "stride2": (2, 1)}  # the 3x3 stems' (stride, padding)
TORCHVISION_WIDTH = 64  # channels out of torchvision's stem; each later stage doubles them (64-128-256-512)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, with one of `STEMS` in front of `layer1` and `width` channels
    out of the stem (torchvision's 64; stage i has width * 2**i, so the feature is 8 * width * block expansion)."""

    def __init__(self, depth: int, in_channels: int = 3, stem: str = "imagenet", width: int = TORCHVISION_WIDTH
                 ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise UserError(f"unknown ResNet stem {stem!r}; choose one of: {', '.join(STEMS)}")
        if not isinstance(width, int) or width < 1:
            raise UserError(f"ResNet width={width!r} must be a positive whole number of channels (torchvision: 64)")
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if width != TORCHVISION_WIDTH:
            _narrow(net, width)
        if stem == "imagenet":
            if in_channels != 3:
                net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            stride, padding = SMALL_STEMS[stem]
            net.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=stride, padding=padding, bias=False)
            net.maxpool = nn.Identity()
        self.feature_dim: int = net.fc.in_features
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_dense(x).mean(dim=(2, 3))


def _narrow(net: torchvision.models.ResNet, width: int) -> None:
    """Rebuild `net`'s stem and stages with `width` channels in place of 64, initialised as torchvision initialises
    its own (Kaiming-normal fan-out convolutions, BatchNorm at weight 1, bias 0)."""
    block = type(net.layer1[0])
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.inplanes = width
    for stage in range(4):  # layer1 keeps the stem's resolution, layer2-4 halve it
        name = f"layer{stage + 1}"
        blocks = len(getattr(net, name))
        setattr(net, name, net._make_layer(block, width * 2**stage, blocks, stride=1 if stage == 0 else 2))
    net.fc = nn.Linear(8 * width * block.expansion, net.fc.out_features)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


# Each name fixes the architecture (ResNet depth; ViT width, depth, heads); the rest are the backbone's arguments.
BACKBONES: dict[str, partial[nn.Module]] = {
    "resnet18": partial(ResNetBackbone, 18),
    "resnet50": partial(ResNetBackbone, 50),
    "vit_tiny": partial(VisionTransformer, **VARIANTS["tiny"]),
    "vit_small": partial(VisionTransformer, **VARIANTS["small"]),
}


def backbone_arguments(name: str) -> list[str]:
    """The keyword arguments backbone `name` takes (`in_channels`, `stem`, ...): not those its name fixes."""
    builder = BACKBONES[name]
    return [arg for arg in inspect.signature(builder).parameters if arg not in builder.keywords]


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Build backbone `name` (one of `BACKBONES`) with its keyword arguments (`backbone_arguments(name)`)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    refuse_unknown_arguments(f"backbone {name!r}", kwargs, backbone_arguments(name), settable_in="backbone.kwargs")
    try:
        backbone = BACKBONES[name](**kwargs)
    except TypeError as error:  # a value of the wrong type (the names were checked above)
        raise UserError(f"backbone {name!r} cannot be built with {kwargs}: {error}") from None
    backbone.spec = {"name": name, "kwargs": dict(kwargs)}
    return backbone
