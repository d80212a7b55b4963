"""``data.decode=gpu``: the training process decodes a batch of JPEGs with nvJPEG and cuts the views on the GPU.

Workers only read the bytes of the files nvJPEG takes (baseline/progressive JPEGs in YCbCr or grayscale, upright);
PNGs, CMYK JPEGs, rotated photos and anything nvJPEG refuses are cut on the CPU as with ``data.decode=cpu``. The
boxes are the same; each is resampled with the same antialiased bicubic filter PIL uses (cubic a = -0.5, support
widened by the shrink factor, weights renormalised at the image edge), computed here as two small matrix products
per image and view size, in float32 (PIL rounds to uint8 between its two passes: results differ by a level or two).
"""

import io
from collections.abc import Sequence

import torch
from torch import Tensor

from ssl.data.folder import BadImage, cut_views


def _cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5, PIL's bicubic."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """(V, out_size, in_size) resampling rows taking the interval [start, start + length) (V,) of an ``in_size``
    pixel axis to ``out_size`` pixels, antialiased when shrinking (the kernel is stretched by the shrink factor)."""
    scale = length / out_size
    stretch = scale.clamp_min(1.0)
    centres = start[:, None] + (torch.arange(out_size, device=start.device) + 0.5) * scale[:, None]
    pixels = torch.arange(in_size, device=start.device) + 0.5
    weights = _cubic((pixels[None, None, :] - centres[:, :, None]) / stretch[:, None, None])
    return weights / weights.sum(dim=2, keepdim=True)


def cut_views_from_tensor(image: Tensor, boxes: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """uint8 views (C, size, size) of a decoded uint8 image (C, H, W): box ``boxes[v]`` (x0, y0, w, h) resampled to
    ``sizes[v]``. Views of one size are made together: rows (V, s, H) @ image (C, H, W) @ columns (V, W, s)."""
    _, height, width = image.shape
    source = image.to(torch.float32)
    boxes = boxes.to(device=image.device, dtype=torch.float32)
    views: list[Tensor | None] = [None] * len(sizes)
    for size in sorted(set(sizes)):
        chosen = [view for view, view_size in enumerate(sizes) if view_size == size]
        x0, y0, w, h = boxes[chosen].unbind(dim=1)
        rows = bicubic_weights(y0, h, height, size)
        columns = bicubic_weights(x0, w, width, size).transpose(1, 2)
        made = (rows[:, None] @ source[None] @ columns[:, None]).round_().clamp_(0, 255).to(torch.uint8)
        for view, crop in zip(chosen, made):
            views[view] = crop
    return views


def decode_on_device(encoded: Sequence[Tensor], channels: int, device: torch.device) -> list[Tensor | None]:
    """uint8 (C, H, W) images on ``device`` decoded by nvJPEG from the files' bytes; None where it refuses one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        return list(decode_jpeg(list(encoded), mode=mode, device=device))
    except RuntimeError:  # one bad file fails the whole batch: find it
        decoded: list[Tensor | None] = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=mode, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def cut_encoded_views(views: list[Tensor], positions: Sequence[int], encoded: Sequence[Tensor], boxes: Tensor,
                      names: Sequence[str], channels: int) -> list[int]:
    """Decode ``encoded`` on the views' device and write the views of batch position ``positions[i]`` (boxes
    ``boxes[i]`` (V, 4)) into ``views`` (one uint8 (B, C, s, s) per view). A file nvJPEG refuses is cut on the CPU
    instead; returns the i of the files no decoder takes (their views are left as they were)."""
    sizes = [view.shape[-1] for view in views]
    refused = []
    decoded = decode_on_device(encoded, channels, views[0].device)
    for i, (position, image) in enumerate(zip(positions, decoded)):
        if image is None:
            try:
                crops = cut_views(io.BytesIO(encoded[i].numpy().tobytes()), names[i], boxes[i], sizes, channels)
            except BadImage:
                refused.append(i)
                continue
        else:
            crops = cut_views_from_tensor(image, boxes[i], sizes)
        for view, crop in zip(views, crops):
            view[position] = crop.to(view.device)
    return refused
