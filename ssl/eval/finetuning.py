"""Full fine-tuning: the exported backbone plus a linear head, trained end to end on labelled images."""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl.eval.preprocess import eval_inputs, random_crop_flip
from ssl.eval.training import HeadAndBackboneAdamW


class Classifier(nn.Module):
    """uint8 images -> the export's preprocessing -> backbone -> linear head -> class logits (float32)."""

    def __init__(self, backbone: nn.Module, num_classes: int, meta: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(True)
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        # Zero init: the first updates move the head onto the pretrained features instead of pushing random-head
        # gradients back into the backbone.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.meta = meta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            features = self.backbone(eval_inputs(images, self.meta))
        return self.head(features.float())


def train_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                     batch_size: int, lr: float, backbone_lr: float, weight_decay: float, warmup_epochs: int,
                     padding: int, seed: int, on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Cross-entropy on random crop + flip views; images (uint8) and labels on the model's device.

    Returns the mean training loss of every epoch (read from the device once per epoch, then passed to
    `on_epoch(epoch, loss)` when given, epochs counted from 1).
    """
    steps_per_epoch = -(-len(images) // batch_size)
    optimizer = HeadAndBackboneAdamW(model.head, model.backbone, lr, backbone_lr, weight_decay,
                                     epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    generator = torch.Generator(images.device).manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        total = torch.zeros((), device=images.device)
        for batch in torch.randperm(len(images), device=images.device, generator=generator).split(batch_size):
            loss = F.cross_entropy(model(random_crop_flip(images[batch], padding, generator)), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(batch)
        losses.append(total.item() / len(images))
        if on_epoch:
            on_epoch(len(losses), losses[-1])
    return losses


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of `model` (in eval mode) for every image, in order."""
    model.eval()
    return torch.cat([model(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])
