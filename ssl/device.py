"""The device every entry point runs on (`device=auto|cpu|cuda|cuda:N`), and the precision it computes in."""

import re

import torch

from ssl.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; asking for a CUDA device that is not there is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"unknown device {name!r}; choose one of: auto, cpu, cuda, cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device={name} but {torch.cuda.device_count()} CUDA devices are visible; use device=cpu, "
                        "device=auto or a visible one")
    return device


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bfloat16 autocast on CUDA (when `enabled`); float32 on any other device."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")
