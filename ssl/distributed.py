"""torchrun support: one process per device, NCCL on GPUs and gloo on CPUs.

`torchrun --nproc_per_node=N -m ssl.pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run is
a single process and every helper here is a no-op.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn

from ssl.errors import UserError


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_process(device_type: str, timeout_s: float = 600) -> Process:
    """Join the process group torchrun describes in the environment (if any) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Process()
    process = Process(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        if process.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {process.local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                            "lower --nproc_per_node")
        torch.cuda.set_device(process.local_rank)
    if not dist.is_initialized():
        # A rank that dies makes torchrun stop the others; the timeout bounds any collective left waiting.
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return process


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of every process, on any device.

    torch's `SyncBatchNorm` runs on GPUs only; this one all-reduces with autograd-aware collectives
    (`torch.distributed.nn.all_reduce`), so it also runs on CPUs with gloo. Two passes, as `F.batch_norm` does:
    mean = sum(x) / n, then var = sum((x - mean)^2) / n over all processes (n = global count per channel). The
    running variance uses the unbiased var * n / (n - 1). Single-process or eval mode: plain `F.batch_norm`.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = dist_nn.all_reduce(torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype,
                                                device=input.device))
        mean = dist_nn.all_reduce(input.sum(dims)) / count
        centered = input - mean.view(shape)
        var = dist_nn.all_reduce(centered.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * count / (count - 1)).to(self.running_var.dtype), momentum)
        output = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Swap every BatchNorm for one synchronised across processes: torch's SyncBatchNorm on CUDA, else ours."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        reference = module.weight if module.affine else module.running_mean
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats, **factory)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        if module.affine:
            converted.requires_grad_(module.weight.requires_grad)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device_type))
    return module


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over processes (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values
