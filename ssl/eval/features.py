"""Pooled embeddings of a frozen backbone: once per dataset (cached), or per batch of fresh augmented views."""

from typing import Any

import torch
from torch import nn

from ssl.device import autocast
from ssl.eval.preprocess import eval_inputs, random_crop_flip


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    meta: dict[str, Any],
    device: torch.device,
    batch_size: int = 256,
    precision: torch.autocast | None = None,
) -> torch.Tensor:
    """Pooled embeddings (N, feature_dim), float32 on `device`, of uint8 `images` (N, C, H, W) on any device.

    The backbone must already be in eval mode on `device` (`ssl.load_backbone` returns it so): BatchNorm uses
    its running statistics and nothing in it changes. `precision` is the autocast it runs under (default
    `ssl.device.autocast`: bfloat16 on CUDA); the features come out float32 for the classifiers either way.
    """
    precision = autocast(device) if precision is None else precision
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        with precision:
            chunks.append(backbone(eval_inputs(batch, meta)).float())
    return torch.cat(chunks)


class AugmentedFeatures:
    """`features(indices)`: the frozen backbone on random-crop + flip views of those images, drawn anew per call.

    This is the papers' linear protocol (and solo-learn's main_linear): the backbone runs on every batch of
    every epoch. `images` (uint8, N x C x H x W) should already be on the backbone's device.
    """

    def __init__(self, backbone: nn.Module, images: torch.Tensor, meta: dict[str, Any], padding: int,
                 seed: int) -> None:
        self.backbone, self.images, self.meta, self.padding = backbone, images, meta, padding
        self.generator = torch.Generator(images.device).manual_seed(seed)

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        views = random_crop_flip(self.images[indices], self.padding, self.generator)
        with torch.no_grad(), autocast(self.images.device):
            return self.backbone(eval_inputs(views, self.meta)).float()
