"""Linear probes on frozen features: multinomial logistic regression fitted to convergence, L2 chosen on held-out data.

With the backbone frozen the probe is multinomial logistic regression, a convex problem whose one real choice is
the L2 strength (weight decay). Features are standardised with the training set's mean and std (MAE's
BatchNorm-without-affine, computed once), which puts every backbone's features on the same scale.

Cached protocol (`fit_linear_probe` without `final_features_of`): every weight decay is fitted by full-batch
L-BFGS with a strong-Wolfe line search (`fit_logistic`) until the gradient vanishes or float32 allows no further
progress, so the held-out comparison is between optima, not between points an SGD schedule happened to reach.
(An SGD (lr, weight decay) grid stopped after a fixed number of epochs picked a point on its grid's edge, lr 0.3 and
weight decay 0, and scored 2 points under a converged logistic regression.) The weight decay is chosen on a held-out
part of train from a log grid that grows by a decade while its edge wins (`next_weight_decay`), then the probe is
refitted on all of train with it.

Augmented protocol (`final_features_of` given): the final probe sees fresh crop + flip views through the backbone at
every step, which only a stochastic optimiser can use. The weight decay is chosen as above (it is a property of the
features and labels, and L-BFGS finds it reliably); then an SGD lr grid at that weight decay is trained at once on
the cached held-out split (`LinearProbe` holds G heads as one (D, G, C) tensor, `ProbeSGD` gives each its own lr),
and the best lr drives the SGD run on augmented views.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl.errors import UserError
from ssl.eval.metrics import topk_accuracy
from ssl.optim import cosine_schedule

# Rows per chunk of the full-batch loss: keeps the (rows, classes) temporaries near 16 MB for any class count.
CHUNK_ELEMENTS = 1 << 22
# L-BFGS memory (as scipy's default): 2 x 10 vectors of the weights' size, small even for 2048 x 1000 weights.
LBFGS_HISTORY = 10


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


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (floored, so constant dimensions standardise to 0 instead of dividing by 0)."""
    return features.mean(0), features.std(0).clamp_min(1e-6)


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
        self.schedule = cosine_schedule(1.0, 0.0, total_steps).to(device, torch.float32)
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
    """The probe protocol. The defaults live in configs/linear_eval.yaml (`linear`).

    weight_decays: the starting L2 grid (0 and positive values); weight_decay_bounds: (low, high), how far the
    grid may grow by decades past its edges; max_iter, tolerance: per L-BFGS fit (stop at max |gradient| <=
    tolerance); val_fraction: the share of train held out to choose. lrs, epochs, batch_size: protocol=augmented
    only, its SGD runs (lrs are for `batch_size`; the cosine schedule runs over `epochs` passes).
    """

    weight_decays: Sequence[float]
    weight_decay_bounds: Sequence[float]
    max_iter: int
    tolerance: float
    val_fraction: float
    lrs: Sequence[float]
    epochs: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.weight_decays or any(value < 0 for value in self.weight_decays):
            raise UserError(f"linear.weight_decays={list(self.weight_decays)}: give one or more values >= 0")
        if len(self.weight_decay_bounds) != 2 or not 0 < self.weight_decay_bounds[0] <= self.weight_decay_bounds[1]:
            raise UserError(f"linear.weight_decay_bounds={list(self.weight_decay_bounds)}: give [low, high] "
                            "with 0 < low <= high")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"linear.val_fraction={self.val_fraction}: give a share strictly between 0 and 1")


def train_probe(probe: LinearProbe, labels: torch.Tensor, features_of: Callable[[torch.Tensor], torch.Tensor],
                lrs: Sequence[float], weight_decays: Sequence[float], epochs: int, batch_size: int,
                seed: int) -> LinearProbe:
    """Train every head of `probe` with SGD for `epochs` shuffled passes over `labels` (on the probe's device).

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


@torch.no_grad()
def logistic_loss_and_grad(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of `features @ weight.T + bias` plus `weight_decay / 2 * |weight|^2` (the bias is not
    decayed: the SGD convention, where weight decay adds `weight_decay * weight` to the gradient), and its
    gradients. `weight` is (C, D), like `nn.Linear`: both matmuls then read `features` row-major, the fast way.

    Computed in row chunks, so memory beyond `features` stays small whatever N and C are.
    """
    count, num_classes = len(features), len(bias)
    loss = torch.zeros((), dtype=torch.float64, device=features.device)
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    rows = max(1, CHUNK_ELEMENTS // num_classes)
    for start in range(0, count, rows):
        chunk, chunk_labels = features[start:start + rows], labels[start:start + rows]
        log_probs = torch.addmm(bias, chunk, weight.T).log_softmax(1)
        loss -= log_probs.gather(1, chunk_labels[:, None]).sum(dtype=torch.float64)
        # d(cross-entropy)/d(logits) = softmax - one-hot.
        residual = log_probs.exp_()
        residual[torch.arange(len(chunk_labels), device=features.device), chunk_labels] -= 1
        grad_weight.addmm_(residual.T, chunk)
        grad_bias += residual.sum(0)
    loss = loss.float() / count + 0.5 * weight_decay * weight.square().sum()
    return loss, grad_weight.div_(count).add_(weight, alpha=weight_decay), grad_bias.div_(count)


@dataclass
class LogisticFit:
    """An L-BFGS solution: `weight` (C, D), `bias` (C,), the iterations it took, whether a tolerance stopped it
    (rather than `max_iter`) and the largest |gradient| entry at the end."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int
    converged: bool
    grad_max: float


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int, tolerance: float, start: LogisticFit | None = None) -> LogisticFit:
    """Full-batch L-BFGS (strong-Wolfe line search) on `logistic_loss_and_grad`, from zero or from `start`.

    It stops at max |gradient| <= `tolerance`, or when float32 allows no further decrease of the loss (the line
    search then makes no progress), or after `max_iter` iterations / `max_iter * 5 // 4` loss evaluations; only
    the last two count as not converged. Warm starts from the solution of a neighbouring weight decay make a
    whole grid cost little more than its first point.
    """
    weight = features.new_zeros(num_classes, features.shape[1]) if start is None else start.weight.clone()
    bias = features.new_zeros(num_classes) if start is None else start.bias.clone()
    max_eval = max_iter * 5 // 4
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, max_eval=max_eval,
                                  tolerance_grad=tolerance, tolerance_change=1e-9, history_size=LBFGS_HISTORY,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        loss, weight.grad, bias.grad = logistic_loss_and_grad(features, labels, weight, bias, weight_decay)
        return loss

    optimizer.step(closure)
    state = optimizer.state[weight]
    _, grad_weight, grad_bias = logistic_loss_and_grad(features, labels, weight, bias, weight_decay)
    grad_max = max(grad_weight.abs().max().item(), grad_bias.abs().max().item())
    return LogisticFit(weight, bias, iterations=state["n_iter"],
                       converged=state["n_iter"] < max_iter and state["func_evals"] < max_eval, grad_max=grad_max)


def _clean(value: float) -> float:
    """value rounded to 12 significant digits: 1e-6 * 10 is 1e-05, not 9.999999999999999e-06."""
    return float(f"{value:.12g}")


def best_weight_decay(scores: dict[float, tuple[float, float]]) -> float:
    """The weight decay with the highest held-out top-1, then the lowest held-out loss (top-1 ties are common on
    small held-out sets), then the strongest L2, given `scores[weight_decay] = (top-1, loss)`."""
    return max(scores, key=lambda wd: (scores[wd][0], -scores[wd][1], wd))


def next_weight_decay(scores: dict[float, tuple[float, float]], bounds: Sequence[float]) -> float | None:
    """The weight decay to try next, given `scores[weight_decay] = (held-out top-1, held-out loss)`, or None.

    The best point (`best_weight_decay`) on an edge of the positive grid means the optimum may lie
    beyond it: the largest value winning asks for a decade more, the smallest winning (over 0 too, when 0 was
    tried) for a decade less, within `bounds` (low, high). 0 winning ends the search: no weaker L2 exists.
    """
    best = best_weight_decay(scores)
    positives = sorted(wd for wd in scores if wd > 0)
    if best == 0 or not positives:
        return None
    candidates = ([_clean(best * 10)] if best == positives[-1] else []) + (
        [_clean(best / 10)] if best == positives[0] else [])
    low, high = bounds
    return next((wd for wd in candidates if low <= wd <= high and wd not in scores), None)


@dataclass
class ProbeSelection:
    """The weight decay picked on the held-out split, every grid point tried (held-out top-1 % and loss, L-BFGS
    iterations), and how the final probe was trained: the L-BFGS refit (cached), or the lr picked by the SGD grid
    and its held-out top-1s (augmented)."""

    weight_decay: float
    grid: list[dict]
    final: dict
    lr_grid: list[dict[str, float]] | None = None

    def report(self) -> dict:
        """The selection as the `linear` block of linear_eval.json shows it."""
        return {"weight_decay": self.weight_decay, "grid": self.grid, **self.final,
                **({"lr_grid": self.lr_grid} if self.lr_grid is not None else {})}


def select_weight_decay(fit: torch.Tensor, fit_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
                        num_classes: int, config: ProbeConfig) -> tuple[float, LogisticFit, list[dict]]:
    """Fit every weight decay of the grid on standardised `fit` features, score it on `val`, grow the grid while an
    edge wins; returns the best weight decay, its fit (a warm start for the refit) and the grid, by weight decay.

    The grid runs from the strongest L2 down, each fit warm-started from the previous one (strong L2 converges in
    a few iterations, and each weaker one starts near its optimum); a new edge value starts from the old edge.
    """
    fits: dict[float, LogisticFit] = {}
    scores: dict[float, tuple[float, float]] = {}
    grid: dict[float, dict] = {}

    def evaluate(weight_decay: float, start: LogisticFit | None) -> LogisticFit:
        fits[weight_decay] = fit_logistic(fit, fit_labels, num_classes, weight_decay, config.max_iter,
                                          config.tolerance, start)
        logits = torch.addmm(fits[weight_decay].bias, val, fits[weight_decay].weight.T)
        scores[weight_decay] = (100 * topk_accuracy(logits, val_labels, 1).item(),
                                F.cross_entropy(logits, val_labels).item())
        grid[weight_decay] = {"weight_decay": weight_decay, "val_top1": scores[weight_decay][0],
                              "val_loss": scores[weight_decay][1], "iterations": fits[weight_decay].iterations,
                              "converged": fits[weight_decay].converged}
        return fits[weight_decay]

    previous = None
    for weight_decay in sorted({float(value) for value in config.weight_decays}, reverse=True):
        previous = evaluate(weight_decay, previous)
    while (weight_decay := next_weight_decay(scores, config.weight_decay_bounds)) is not None:
        evaluate(weight_decay, fits[best_weight_decay(scores)])  # the edge it extends
    best = best_weight_decay(scores)
    return best, fits[best], [grid[wd] for wd in sorted(grid)]


def select_lr(fit: torch.Tensor, fit_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
              num_classes: int, weight_decay: float, config: ProbeConfig) -> tuple[float, list[dict[str, float]]]:
    """The SGD lr (of `config.lrs`, all trained at once as one probe's heads) with the best held-out top-1 at
    `weight_decay`, for the augmented protocol's SGD run; ties go to the smaller lr. Features are standardised."""
    dim = fit.shape[1]
    probe = LinearProbe(fit.new_zeros(dim), fit.new_ones(dim), num_classes, num_heads=len(config.lrs))
    train_probe(probe, fit_labels, fit.__getitem__, config.lrs, [weight_decay] * len(config.lrs), config.epochs,
                config.batch_size, config.seed)
    with torch.no_grad():
        val_top1 = topk_accuracy(probe(val), val_labels, 1).tolist()
    best = max(range(len(val_top1)), key=lambda g: (val_top1[g], -config.lrs[g]))
    return config.lrs[best], [{"lr": lr, "val_top1": 100 * top1} for lr, top1 in zip(config.lrs, val_top1)]


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: ProbeConfig,
                     final_features_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> tuple[LinearProbe, ProbeSelection]:
    """Choose the weight decay on held-out cached features, then fit one probe on the whole training set.

    Cached (`final_features_of` None): an L-BFGS refit on all cached features, warm-started from the chosen grid
    point. Augmented: an SGD lr chosen at that weight decay on the held-out split, then SGD on
    `final_features_of(indices)` (the backbone on fresh crop + flip views). Standardisation uses the statistics
    of all cached training features throughout (labels play no part in them, so holding out stays fair), which
    lets one standardised copy, ordered held-out rows first, serve as both parts and the refit without more copies.
    """
    mean, std = feature_statistics(features)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(config.seed)).to(features.device)
    num_val = min(len(features) - 1, max(1, round(config.val_fraction * len(features))))
    standardised = features[order].sub_(mean).div_(std)
    ordered_labels = labels[order]
    val, fit = standardised[:num_val], standardised[num_val:]
    val_labels, fit_labels = ordered_labels[:num_val], ordered_labels[num_val:]
    weight_decay, chosen, grid = select_weight_decay(fit, fit_labels, val, val_labels, num_classes, config)

    probe = LinearProbe(mean, std, num_classes)
    if final_features_of is None:
        final = fit_logistic(standardised, ordered_labels, num_classes, weight_decay, config.max_iter,
                             config.tolerance, chosen)
        with torch.no_grad():
            probe.weight.copy_(final.weight.T[:, None])
            probe.bias.copy_(final.bias[None])
        return probe, ProbeSelection(weight_decay, grid, {"optimizer": "lbfgs", "iterations": final.iterations,
                                                          "converged": final.converged, "grad_max": final.grad_max})
    lr, lr_grid = select_lr(fit, fit_labels, val, val_labels, num_classes, weight_decay, config)
    del standardised, val, fit  # the augmented run below holds the backbone's activations instead
    train_probe(probe, labels, final_features_of, [lr], [weight_decay], config.epochs, config.batch_size, config.seed)
    return probe, ProbeSelection(weight_decay, grid, {"optimizer": "sgd", "lr": lr, "epochs": config.epochs}, lr_grid)
