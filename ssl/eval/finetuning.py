"""Full fine-tuning: the exported backbone plus a linear head, trained end to end on labelled images."""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl.device import autocast
from ssl.eval.preprocess import eval_inputs, random_crop_flip
from ssl.eval.training import train_head_and_backbone


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
        with autocast(images.device):
            features = self.backbone(eval_inputs(images, self.meta))
        return self.head(features.float())


def train_classifier(model: Classifier, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                     batch_size: int, lr: float, backbone_lr: float, weight_decay: float, warmup_epochs: int,
                     padding: int, seed: int, on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Cross-entropy on random crop + flip views; images (uint8) and labels on the model's device. Returns the mean
    training loss of every epoch (`ssl.eval.training.train_head_and_backbone`)."""
    def batch_loss(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(random_crop_flip(images[batch], padding, generator)), labels[batch])

    return train_head_and_backbone(model, len(images), batch_loss, epochs, batch_size, lr, backbone_lr, weight_decay,
                                   seed, warmup_epochs, on_epoch)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of `model` (in eval mode) for every image, in order."""
    model.eval()
    return torch.cat([model(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])
