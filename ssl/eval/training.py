"""The loop fine-tuning and segmentation share: AdamW with its own lr for the backbone, on a warm-up + cosine.

The head learns from scratch while the backbone should only drift from its pretrained weights, hence two
learning rates. Biases and normalisation parameters get no weight decay (`ssl.optim.param_groups`).
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import AdamW

from ssl.optim import cosine_schedule, param_groups


def train_head_and_backbone(model: nn.Module, count: int,
                            batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], epochs: int,
                            batch_size: int, lr: float, backbone_lr: float, weight_decay: float, seed: int,
                            warmup_epochs: int = 0, on_epoch: Callable[[int, float], None] | None = None
                            ) -> list[float]:
    """Train `model.head` (at `lr`) and the trainable part of `model.backbone` (at `backbone_lr`, both warmed up over
    `warmup_epochs`, then on a cosine to 0) for `epochs` shuffled passes over `count` samples, a batch's loss being
    `batch_loss(indices, generator)` (its random augmentation drawn from `generator`). Returns the mean loss of
    every epoch, read from the device once per epoch and passed to `on_epoch(epoch, loss)`, epochs counted from 1.
    """
    groups = []
    for module, base_lr in ((model.head, lr), (model.backbone, backbone_lr)):
        for group in param_groups(module.named_parameters()):
            if group["params"]:
                groups.append({"params": group["params"], "base_lr": base_lr,
                               "weight_decay": weight_decay * group["wd_scale"]})
    optimizer = AdamW(groups, lr=lr, foreach=True)
    steps_per_epoch = -(-count // batch_size)
    # Host floats: setting a group's lr never touches the device. A run shorter than its warm-up is all warm-up.
    factors = cosine_schedule(1.0, 0.0, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch).tolist()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    model.train()
    losses, step = [], 0
    for epoch in range(1, epochs + 1):
        total = torch.zeros((), device=device)
        for batch in torch.randperm(count, device=device, generator=generator).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factors[step]
            loss = batch_loss(batch, generator)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.detach() * len(batch)
            step += 1
        losses.append(total.item() / count)
        if on_epoch:
            on_epoch(epoch, losses[-1])
    return losses
