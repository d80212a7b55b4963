"""Optimisers and schedules for pretraining.

Parameter groups: weights (ndim > 1) get weight decay and LARS adaptation; biases and normalisation
parameters (ndim <= 1) get neither, as in BYOL/SimCLR. Every group carries `lr_scale` and `wd_scale`: the
loop sets `lr = lr_schedule[step] * lr_scale` and `weight_decay = wd_schedule[step] * wd_scale` each step,
so one precomputed array per knob drives all groups (the online probe is a group with its own scale).
"""

import math
from collections.abc import Iterable

import torch
from torch import nn

from ssl.errors import UserError


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], exclude_bias_and_norm: bool = True
) -> list[dict]:
    """Split trainable parameters into a decayed/adapted group and a bias/norm group."""
    decay, no_decay = [], []
    for _, param in named_parameters:
        if param.requires_grad:
            (no_decay if exclude_bias_and_norm and param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "lr_scale": 1.0, "wd_scale": 1.0, "lars_exclude": False},
        {"params": no_decay, "lr_scale": 1.0, "wd_scale": 0.0, "lars_exclude": True},
    ]


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> torch.Tensor:
    """Per-step values: a linear warm-up from `warmup_start` to `base`, then a cosine from `base` towards `final`.

    DINO's `utils.cosine_scheduler`, step for step (solo-learn's `LinearWarmupCosineAnnealingLR` stepped per
    optimiser step gives the same values). Over the W warm-up steps k = 0 .. W-1 the value is
    `warmup_start + (base - warmup_start) * k / (W - 1)` (np.linspace: the first step is `warmup_start`, the last
    `base`); over the n = total_steps - W steps after it, k = 0 .. n-1, it is
    `final + (base - final) * (1 + cos(pi * k / n)) / 2`, so the last step stays just short of `final`. The same
    form serves the lr, the weight decay and the teacher's momentum: DINO, solo-learn and deepmind's BYOL all run
    the momentum cosine over every step (tau_k = 1 - (1 - base) (1 + cos(pi k / T)) / 2 for end 1, never exactly
    1). A warm-up longer than the run is cut short to the run (a 1-epoch smoke run of a recipe with 10 warm-up
    epochs still reaches `base` at its last step).
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = torch.linspace(warmup_start, base, warmup_steps, dtype=torch.float64)
    steps = torch.arange(total_steps - warmup_steps, dtype=torch.float64)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * steps / max(len(steps), 1)))
    return torch.cat([warmup, cosine])


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as BYOL and solo-learn use it.

    For each parameter p with gradient g in a group without `lars_exclude`:
        trust = eta * |p| / (|g| + weight_decay * |p|)   (1 when either norm is 0)
        trust = min(trust / lr, 1) if clip_lr           (the LARC variant: never above the global lr)
        d = trust * (g + weight_decay * p)
    Excluded groups (biases, norms) use d = g. Then buf = momentum * buf + d and p -= lr * buf.
    Norms and trust ratios are computed with multi-tensor kernels and stay on the device (no host sync).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, clip_lr: bool = True) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                    "clip_lr": clip_lr, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            if not group["lars_exclude"]:
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                trust = group["eta"] * param_norms / (grad_norms + wd * param_norms)
                trust = torch.where((param_norms > 0) & (grad_norms > 0), trust, torch.ones_like(trust))
                if group["clip_lr"]:
                    trust = torch.clamp(trust / lr, max=1.0)
                grads = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
                torch._foreach_mul_(grads, list(trust.unbind()))
            for param in params:
                if "momentum_buffer" not in self.state[param]:
                    self.state[param]["momentum_buffer"] = torch.zeros_like(param)
            buffers = [self.state[param]["momentum_buffer"] for param in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-lr)
        return loss


OPTIMIZERS = ("lars", "sgd", "adamw")


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.9,
                    eta: float = 0.02, clip_lr: bool = True, betas: tuple[float, float] = (0.9, 0.999)
                    ) -> torch.optim.Optimizer:
    """Build optimiser `name` over `groups` (from `param_groups`); lr and wd are rewritten every step."""
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), foreach=True)
    raise UserError(f"unknown optimiser {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
