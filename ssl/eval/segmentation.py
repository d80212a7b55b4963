"""Semantic segmentation on a backbone's dense features: heads, the backbone+head model, training, evaluation.

Heads map `forward_dense` features (B, C, h, w) to class logits at (h, w); the model upsamples them bilinearly
to the mask size. `linear` is the DINOv2 linear protocol (BatchNorm, then a 1x1 convolution: a per-location
linear classifier); `fcn` is a small FCN head (3x3 convolution, BatchNorm, ReLU, dropout, 1x1 convolution).
The backbone stays frozen in eval mode unless fine-tuned.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl.device import autocast
from ssl.errors import UserError
from ssl.eval.metrics import ConfusionMatrix
from ssl.eval.preprocess import normalise
from ssl.eval.seg_data import IGNORE_INDEX, SegmentationSet
from ssl.eval.training import train_head_and_backbone


def linear_head(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, num_classes, kernel_size=1))


def fcn_head(in_channels: int, num_classes: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.1),
        nn.Conv2d(hidden, num_classes, kernel_size=1),
    )


HEADS = {"linear": linear_head, "fcn": fcn_head}


class Segmenter(nn.Module):
    """backbone.forward_dense -> head -> logits upsampled to the input's size.

    `meta` is the export's metadata: inputs are normalised with its mean/std at their own resolution (dense
    features work at any size). A frozen backbone (`finetune=False`) runs without gradients and stays in eval
    mode even when the segmenter is put in training mode, so its BatchNorm statistics never move.
    """

    def __init__(self, backbone: nn.Module, head_name: str, num_classes: int, meta: dict[str, Any],
                 finetune: bool = False) -> None:
        super().__init__()
        if head_name not in HEADS:
            raise UserError(f"unknown segmentation head {head_name!r}; choose one of: {', '.join(HEADS)}")
        self.backbone = backbone.requires_grad_(finetune)
        # Dense maps are `feature_dim` wide for every backbone (ResNet: last stage; ViT: token width).
        self.head = HEADS[head_name](backbone.feature_dim, num_classes)
        self.meta = meta
        self.finetune = finetune

    def train(self, mode: bool = True) -> "Segmenter":
        super().train(mode)
        self.backbone.train(mode and self.finetune)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> float32 logits (B, num_classes, H, W)."""
        inputs = normalise(images, self.meta["mean"], self.meta["std"])
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            with autocast(images.device):
                dense = self.backbone.forward_dense(inputs)
        logits = self.head(dense.float())
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def random_flip_pairs(images: torch.Tensor, masks: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each (image, mask) pair left-right with probability 1/2, the same way for both."""
    flip = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images, torch.where(flip[:, None, None], masks.flip(-1), masks)


def train_segmenter(model: Segmenter, data: SegmentationSet, epochs: int, batch_size: int, lr: float,
                    backbone_lr: float, weight_decay: float, seed: int,
                    on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Cross-entropy (ignoring 255) on random flips; `data` already on the model's device. Returns the mean loss of
    every epoch (`ssl.eval.training.train_head_and_backbone`)."""
    def batch_loss(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images, masks = random_flip_pairs(data.images[batch], data.masks[batch], generator)
        return F.cross_entropy(model(images), masks.long(), ignore_index=IGNORE_INDEX)

    return train_head_and_backbone(model, len(data.images), batch_loss, epochs, batch_size, lr, backbone_lr,
                                   weight_decay, seed, on_epoch=on_epoch)


@torch.no_grad()
def evaluate_segmenter(model: Segmenter, data: SegmentationSet, batch_size: int) -> ConfusionMatrix:
    """The confusion matrix of the model's per-pixel argmax over `data`."""
    model.eval()
    confusion = ConfusionMatrix(data.num_classes, data.images.device, IGNORE_INDEX)
    for start in range(0, len(data.images), batch_size):
        images = data.images[start:start + batch_size]
        confusion.update(model(images).argmax(1), data.masks[start:start + batch_size])
    return confusion
