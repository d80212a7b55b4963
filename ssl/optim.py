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
                    warmup_start: float = 0.0, final_at_last_step: bool = False) -> torch.Tensor:
    """Per-step values: linear warm-up from `warmup_start` to `base`, then cosine from `base` to `final`.

    Over the n = total_steps - warmup_steps cosine steps k = 0 .. n-1 the value is
    `final + (base - final) * (1 + cos(pi * k / K)) / 2`. K = n by default (DINO's `cosine_scheduler`, used for lr
    and wd: the last step stays just short of `final`); `final_at_last_step=True` takes K = n - 1, so the last step
    is exactly `final` (BYOL's teacher momentum, `end - (end - base) * (cos(pi * k / K) + 1) / 2`; a single step is
    `final`). A warm-up longer than the run is cut short (a 1-epoch smoke run of a recipe with 10 warm-up epochs).
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = torch.linspace(warmup_start, base, warmup_steps + 1, dtype=torch.float64)[1:]
    steps = torch.arange(total_steps - warmup_steps, dtype=torch.float64)
    span = len(steps) - 1 if final_at_last_step else len(steps)
    angle = math.pi * steps / span if span > 0 else torch.full_like(steps, math.pi)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(angle))
    return torch.cat([warmup, cosine])[:total_steps]


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
