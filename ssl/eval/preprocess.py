"""How uint8 images become backbone inputs downstream: the export's own normalisation and resolution.

Evaluation is deterministic (normalise, then resize + center-crop to the export's `input_size` when the data
differs); training heads may add the classic CIFAR-style augmentation, a random crop from a padded image plus a
horizontal flip, drawn per sample from a seeded generator so runs repeat.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssl.errors import UserError


def check_channels(meta: dict[str, Any], channels: int, data_name: str) -> None:
    """Refuse data whose channel count differs from the one the export was trained on."""
    if channels != meta["channels"]:
        raise UserError(f"the export takes {meta['channels']}-channel images but {data_name} has {channels}; "
                        f"choose data with {meta['channels']} channels")


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 standardised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def resize_center_crop(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize the shorter side to `size`, then take the central `size` x `size` square (no-op if already there).

    `mode="nearest-exact"` is for label maps (float (B, 1, H, W)): labels are copied, never blended.
    """
    height, width = images.shape[-2:]
    if height == width == size:
        return images
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    images = F.interpolate(images, size=resized, mode=mode, antialias=mode == "bilinear")
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    return images[..., top:top + size, left:left + size]


def eval_inputs(images: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """uint8 images -> what the exported backbone expects, with no randomness."""
    return resize_center_crop(normalise(images, meta["mean"], meta["std"]), meta["input_size"])


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per sample: a random crop of the original size from the zero-padded image, then a coin-flip mirror.

    Done for the whole batch with one gather, so it costs one indexing op on the device, not a Python loop.
    """
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    rows = top + torch.arange(height, device=device)
    cols = left + torch.arange(width, device=device)
    flip = torch.rand(batch, 1, device=device, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(-1), cols)
    samples = torch.arange(batch, device=device).view(batch, 1, 1)
    # padded[n, :, rows[n, i], cols[n, j]] for every n, i, j -> (B, H, W, C)
    crops = padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2)
