"""Linear probes on frozen features: a whole (lr, weight decay) grid trained at once, chosen on held-out data.

With the backbone frozen the probe is multinomial logistic regression, so the only real choices are the
learning rate and the weight decay. `LinearProbe` holds G independent classifiers as one (D, G, C) tensor and
`ProbeSGD` gives each its own lr and weight decay, so the grid costs one (B, D) x (D, G*C) matmul per step. Features are
standardised with the training set's mean and std (MAE's BatchNorm-without-affine, computed once), which puts
every backbone's features on the same scale and lets one lr grid fit them all.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl.eval.metrics import topk_accuracy


class LinearProbe(nn.Module):
    """G linear classifiers over standardised features: `forward(features (N, D)) -> logits (G, N, C)`."""

    def __init__(self, feature_mean: torch.Tensor, feature_std: torch.Tensor, num_classes: int,
                 num_heads: int = 1) -> None:
        super().__init__()
        dim = feature_mean.numel()
        self.register_buffer("feature_mean", feature_mean.reshape(dim).clone())
        self.register_buffer("feature_std", feature_std.reshape(dim).clone())
        # Zero init: the problem is convex, so the start only has to be the same for every head and every run.
        self.weight = nn.Parameter(torch.zeros(dim, num_heads, num_classes, device=feature_mean.device))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes, device=feature_mean.device))

    @classmethod
    def for_features(cls, features: torch.Tensor, num_classes: int, num_heads: int = 1) -> "LinearProbe":
        """A probe standardising with the statistics of `features` (the training features)."""
        return cls(features.mean(0), features.std(0).clamp_min(1e-6), num_classes, num_heads)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, G, C): one plain matmul for all heads, which stays fast in the backward pass too."""
        dim, heads, classes = self.weight.shape
        standardised = (features - self.feature_mean) / self.feature_std
        return (standardised @ self.weight.view(dim, heads * classes)).view(-1, heads, classes) + self.bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head_logits(features).transpose(0, 1)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over heads of each head's mean cross-entropy, so every head gets its own full gradient."""
        logits = self.head_logits(features)  # (B, G, C)
        per_sample = F.cross_entropy(logits.transpose(1, 2), labels[:, None].expand(-1, logits.shape[1]),
                                     reduction="none")
        return per_sample.mean(0).sum()


class ProbeSGD:
    """SGD with momentum where head g of a `LinearProbe` has its own lr and weight decay (none on the bias).

    The lr follows a cosine from its base value to 0 over `total_steps`, precomputed on the device so a step
    never waits for the host.
    """

    def __init__(self, probe: LinearProbe, lrs: Sequence[float], weight_decays: Sequence[float],
                 total_steps: int, momentum: float = 0.9) -> None:
        device = probe.weight.device
        self.probe = probe
        # Shaped (G, 1) to broadcast over the weight (D, G, C) and the bias (G, C) alike.
        self.lrs = torch.tensor(lrs, dtype=torch.float32, device=device).view(-1, 1)
        self.weight_decays = torch.tensor(weight_decays, dtype=torch.float32, device=device).view(-1, 1)
        steps = torch.arange(total_steps, dtype=torch.float32, device=device)
        self.schedule = 0.5 * (1 + torch.cos(math.pi * steps / total_steps))
        self.momentum = momentum
        self.buffers = [torch.zeros_like(probe.weight), torch.zeros_like(probe.bias)]
        self.step_count = 0

    @torch.no_grad()
    def step(self) -> None:
        lr = self.lrs * self.schedule[self.step_count]
        weight, bias = self.probe.weight, self.probe.bias
        for param, buffer, grad in ((weight, self.buffers[0], weight.grad + self.weight_decays * weight),
                                    (bias, self.buffers[1], bias.grad)):
            buffer.mul_(self.momentum).add_(grad)
            param.sub_(lr * buffer)
            param.grad = None
        self.step_count += 1


@dataclass
class ProbeConfig:
    """The probe protocol: the (lr, weight decay) grid, its held-out split, and the SGD run per grid point.

    lrs are for `batch_size`; the cosine schedule runs over `epochs` passes over the (cached) training features.
    The defaults live in configs/linear_eval.yaml (`linear`).
    """

    lrs: Sequence[float]
    weight_decays: Sequence[float]
    epochs: int
    batch_size: int
    val_fraction: float
    seed: int = 0


def train_probe(probe: LinearProbe, labels: torch.Tensor, features_of: Callable[[torch.Tensor], torch.Tensor],
                lrs: Sequence[float], weight_decays: Sequence[float], epochs: int, batch_size: int,
                seed: int) -> LinearProbe:
    """Train every head of `probe` for `epochs` shuffled passes over `labels` (on the probe's device).

    `features_of(indices)` gives the features of those training samples: a lookup in cached features, or the
    frozen backbone run on freshly augmented images (`ssl.eval.features.AugmentedFeatures`).
    """
    device = labels.device
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    optimizer = ProbeSGD(probe, lrs, weight_decays, epochs * steps_per_epoch)
    generator = torch.Generator(device).manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), device=device, generator=generator).split(batch_size):
            probe.loss(features_of(batch), labels[batch]).backward()
            optimizer.step()
    return probe


@dataclass
class ProbeSelection:
    """The (lr, weight decay) picked on the held-out split, and the held-out top-1 (%) of every grid point."""

    lr: float
    weight_decay: float
    grid: list[dict[str, float]]


def select_hyperparameters(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           config: ProbeConfig) -> ProbeSelection:
    """Hold out `val_fraction` of the training features, train the whole grid on the rest, keep the best top-1.

    Ties go to the first grid point (smallest lr, then smallest weight decay, in the order given).
    """
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(config.seed))
    order = order.to(features.device)
    num_val = min(len(features) - 1, max(1, round(config.val_fraction * len(features))))
    val, fit = order[:num_val], order[num_val:]
    grid = [(lr, wd) for lr in config.lrs for wd in config.weight_decays]
    fit_features = features[fit]
    probe = LinearProbe.for_features(fit_features, num_classes, num_heads=len(grid))
    train_probe(probe, labels[fit], fit_features.__getitem__, [lr for lr, _ in grid], [wd for _, wd in grid],
                config.epochs, config.batch_size, config.seed)
    with torch.no_grad():
        val_top1 = topk_accuracy(probe(features[val]), labels[val], 1).tolist()
    best = max(range(len(grid)), key=lambda g: (val_top1[g], -g))
    return ProbeSelection(lr=grid[best][0], weight_decay=grid[best][1],
                          grid=[{"lr": lr, "weight_decay": wd, "val_top1": 100 * top1}
                                for (lr, wd), top1 in zip(grid, val_top1)])


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: ProbeConfig,
                     final_features_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> tuple[LinearProbe, ProbeSelection]:
    """Pick (lr, weight decay) on held-out cached features, then retrain one probe on the whole training set.

    The retraining reads `final_features_of(indices)` when given (the augmented protocol: the backbone on
    fresh crop + flip views), else the cached `features`. Standardisation always uses the cached features.
    """
    selection = select_hyperparameters(features, labels, num_classes, config)
    probe = LinearProbe.for_features(features, num_classes)
    train_probe(probe, labels, final_features_of or features.__getitem__, [selection.lr],
                [selection.weight_decay], config.epochs, config.batch_size, config.seed)
    return probe, selection
