"""An offline segmentation set cut from a classification set: 2x2 mosaics of items, masks from their pixels.

Each mosaic tiles four randomly drawn items (Fashion-MNIST: 28 px -> 56 x 56). A pixel's class is 0
(background) unless the item under it is brighter than `threshold` there, in which case it is the item's
class + 1. The draw is a pure function of `seed`, so the same arguments always give the same set.
"""

import torch

from ssl.eval.seg_data import SegmentationSet


def build_mosaics(images: torch.Tensor, labels: torch.Tensor, classes: list[str], count: int, threshold: int,
                  seed: int, name: str = "fmnist_mosaic") -> SegmentationSet:
    """`count` mosaics from uint8 `images` (N, C, H, W) and their `labels`; items are drawn with replacement.

    Foreground is where the brightest channel exceeds `threshold` (0-255), so colour sources work too.
    """
    _, channels, height, width = images.shape
    picks = torch.randint(len(images), (count, 2, 2), generator=torch.Generator().manual_seed(seed))
    picks = picks.to(images.device)  # drawn on the CPU so the set is the same on every device
    items = images[picks]  # (count, 2, 2, C, H, W): grid row, grid column, then the item
    foreground = items.amax(dim=3) > threshold
    item_masks = torch.where(foreground, (labels[picks] + 1)[..., None, None], 0).to(torch.uint8)
    mosaics = items.permute(0, 3, 1, 4, 2, 5).reshape(count, channels, 2 * height, 2 * width)
    masks = item_masks.permute(0, 1, 3, 2, 4).reshape(count, 2 * height, 2 * width)
    return SegmentationSet(mosaics.contiguous(), masks.contiguous(), ["background", *classes], name)
