"""Batched, per-sample random augmentation of uint8 image batches on the training device.

PIL transforms in DataLoader workers cannot keep an accelerator busy on small images, so views are made from a
whole uint8 batch at once with tensor ops; the same code runs on CPU and CUDA. Per view and sample, in order
(the BYOL / DINO / SimCLR pipeline):

1. random resized crop: area fraction uniform in ``crop_scale``, log aspect ratio uniform in ``crop_ratio``,
   10 attempts then torchvision's central fallback. Boxes are continuous (sub-pixel) and each box is
   resampled bilinearly to the view size with ``grid_sample``; the horizontal flip is folded into the same
   sampling grid.
2. colour jitter with probability ``jitter_prob``: brightness, contrast, saturation and hue factors as in
   torchvision's ``ColorJitter``, applied in a random order drawn per sample (torchvision draws one order
   per call), with values clamped to [0, 1] after each op.
3. grayscale with probability ``grayscale_prob`` (ITU-R 601 luma, replicated to 3 channels).
4. Gaussian blur with probability ``blur_prob``, sigma uniform in ``blur_sigma``, reflect padding, separable
   kernels of radius ceil(3 * max sigma) (capped below the view size), one kernel per sample.
5. solarisation with probability ``solarize_prob``: values >= ``solarize_threshold`` become 1 - value.
6. normalisation with the dataset's per-channel mean and std.

Every random number of a sample comes from ``ssl.data.random`` keyed by (seed, epoch, view, sample index), so
a sample gets the same views whatever batch, batch position, batch size or process it is augmented in.

One-channel data (Fashion-MNIST) keeps one channel: saturation, hue and grayscale need colour and are skipped;
brightness, contrast, blur and solarisation apply as usual.

Image folders cut step 1 in their DataLoader workers from each whole photo (``crop_boxes``, the same numbers;
``ssl.data.folder``) and hand over one uint8 batch per view: steps 2-6 and the flip then run here as for resident
data.

Deviations from torchvision, all deliberate: continuous crop boxes instead of integer ones; no antialiasing
when a resident image's crop is shrunk (crops of 28-96 px data are at most ~1.5x the view size; folders resample
with antialiasing); a per-sample rather than per-batch jitter order.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ssl.data.random import counter_keys, uniform
from ssl.errors import UserError

CROP_ATTEMPTS = 10
# On CPU a view is made in chunks of samples with about this many output values, so that every op's tensors stay
# in cache (1.2-1.3x faster); views are per sample, so chunking changes no result. A GPU takes the whole batch.
CPU_CHUNK_VALUES = 1 << 18


# The uniform draws of one (seed, epoch, view, sample), by column. New quantities go at the end, so adding one
# never changes the others.
_DRAWS = {
    "crop_area": CROP_ATTEMPTS,
    "crop_ratio": CROP_ATTEMPTS,
    "crop_position": 2,
    "flip": 1,
    "jitter": 1,
    "jitter_factors": 4,
    "jitter_order": 4,
    "grayscale": 1,
    "blur": 2,
    "solarize": 1,
}
# Draw k of a key does not depend on how many are drawn: the crop's columns come first, so `crop_boxes` can draw
# them alone.
_CROP_DRAWS = _DRAWS["crop_area"] + _DRAWS["crop_ratio"] + _DRAWS["crop_position"]


class JitterOp(IntEnum):
    """Columns of `ViewParams.jitter` and `ViewParams.jitter_order`."""

    BRIGHTNESS = 0
    CONTRAST = 1
    SATURATION = 2
    HUE = 3


@dataclass(frozen=True)
class ViewRecipe:
    """How one view is made. The defaults are the identity (a plain resize), so recipes name what they use."""

    size: int
    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.0
    jitter_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if self.size < 1:
            problems.append(f"size={self.size} must be positive")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append(f"crop_scale={list(self.crop_scale)} must satisfy 0 < low <= high <= 1")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio={list(self.crop_ratio)} must satisfy 0 < low <= high")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma={list(self.blur_sigma)} must satisfy 0 < low <= high")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.hue <= 0.5:
            problems.append(f"hue={self.hue} must be in [0, 0.5]")
        if problems:
            raise UserError(f"bad augmentation view: {'; '.join(problems)}; fix it in configs/augment/")

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any]) -> "ViewRecipe":
        """From a config entry; lists become tuples, unknown keys are a `UserError`."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise UserError(f"unknown augmentation key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**{key: _tuple_if_list(value) for key, value in entry.items()})


@dataclass
class ViewParams:
    """The random parameters of one view for a batch of B samples."""

    boxes: Tensor  # (B, 4) float: crop x0, y0, width, height in source pixels
    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B, 4) brightness, contrast, saturation factors, hue shift in turns; identity if not drawn
    jitter_order: Tensor  # (B, 4) sort keys: a sample's jitter ops run in ascending key order
    grayscale: Tensor  # (B,) bool
    blur_sigma: Tensor  # (B,) float, 0 where the sample is not blurred
    solarize: Tensor  # (B,) bool

    def select(self, start: int, stop: int) -> "ViewParams":
        """The parameters of samples ``start:stop``."""
        return ViewParams(**{field.name: getattr(self, field.name)[start:stop] for field in fields(self)})


def sample_crop_boxes(
    u_area: Tensor,
    u_ratio: Tensor,
    u_position: Tensor,
    height: int | Tensor,
    width: int | Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Tensor:
    """Random resized crop boxes (B, 4) as (x0, y0, w, h) from uniforms (B, attempts), (B, attempts), (B, 2), for
    images of one size (``height``, ``width`` ints) or of one size each (float or int tensors (B,)).

    Like torchvision: the first attempt whose box fits the image wins; if none fits, the largest central box
    with the aspect ratio clamped into ``ratio``.
    """
    height = torch.as_tensor(height, dtype=torch.float32, device=u_area.device).reshape(-1, 1)
    width = torch.as_tensor(width, dtype=torch.float32, device=u_area.device).reshape(-1, 1)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * u_ratio)
    w = torch.sqrt(target_area * aspect)
    h = torch.sqrt(target_area / aspect)
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    height, width = height.squeeze(1), width.squeeze(1)
    image_ratio = width / height
    fallback_w = torch.where(image_ratio > ratio[1], height * ratio[1], width)
    fallback_h = torch.where(image_ratio < ratio[0], width / ratio[0], height)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    position = torch.where(found[:, None], u_position, 0.5)
    x0 = position[:, 0] * (width - w)
    y0 = position[:, 1] * (height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_boxes(recipe: "ViewRecipe", seed: int, epoch: int, view: int, indices: Tensor, height: int | Tensor,
               width: int | Tensor) -> Tensor:
    """The crop boxes (B, 4) of view ``view`` for samples ``indices``: the same numbers `ViewAugmenter` draws, so an
    image folder's worker can cut the views from each whole image before the rest of the view is made."""
    keys = counter_keys(indices, seed, epoch, view)
    u_area, u_ratio, u_position = uniform(keys, _CROP_DRAWS).split(list(_DRAWS.values())[:3], dim=1)
    return sample_crop_boxes(u_area, u_ratio, u_position, height, width, recipe.crop_scale, recipe.crop_ratio)


def resized_crop(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Bilinearly resample each sample's box (x0, y0, w, h) to (size, size), mirrored where ``flip``."""
    batch, channels, height, width = images.shape
    x0, y0, w, h = boxes.unbind(dim=1)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1] (pixel edges, since
    # align_corners=False); a negative x scale mirrors the box about its centre.
    sign = 1.0 - 2.0 * flip.to(images.dtype)
    zero = torch.zeros_like(w)
    theta = torch.stack(
        [sign * w / width, zero, (2 * x0 + w) / width - 1, zero, h / height, (2 * y0 + h) / height - 1], dim=1
    ).view(batch, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), [batch, channels, size, size], align_corners=False)
    # Sample points lie inside the box, at most half a pixel beyond the outer pixel centres: clamp there.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_gray(images: Tensor) -> Tensor:
    """ITU-R 601 luma (B, 1, H, W) of RGB images; one-channel images are their own gray."""
    if images.shape[1] == 1:
        return images
    return 0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]


def shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of RGB images in [0, 1] by ``shift`` (B,) turns, keeping saturation and value."""
    # Pixel-wise choices use lerp with 0/1 weights, an exact select: torch.where with a full-size mask is
    # several times slower than arithmetic on CPU.
    red, green, blue = images.unbind(dim=1)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    red_max = (value == red).to(images.dtype)
    green_max = (value == green).to(images.dtype)
    # Hue in sixths of a turn: the maximum channel picks the sector, the other two the position in it.
    difference = torch.lerp(torch.lerp(red - green, blue - red, green_max), green - blue, red_max)
    sector = (1 - red_max) * (4 - 2 * green_max)  # red 0, green 2, blue 4
    hue = (difference / chroma.clamp_min(1e-12) + sector) / 6  # grays: difference 0, hue 0
    # HSV -> RGB in closed form: channel n (R=5, G=3, B=1) is V - C * clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 * hue) mod 6, and V * S = C.
    offsets = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype) / 6
    turns = hue[:, None] + (offsets[None, :, None, None] + shift[:, None, None, None])
    k = 6 * (turns - turns.floor())
    return value[:, None] - chroma[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _blend(images: Tensor, op: Tensor, factor: Tensor) -> Tensor:
    """One brightness, contrast or saturation step per sample (``op`` (B,)): blend with black, the mean gray
    or the gray image by ``factor`` (B,), then clamp. A factor of 1 leaves the sample exactly unchanged."""
    gray = to_gray(images)
    op = op.view(-1, 1, 1, 1)
    mean_or_black = gray.mean(dim=(1, 2, 3), keepdim=True) * (op == JitterOp.CONTRAST)
    reference = torch.lerp(mean_or_black, gray, (op == JitterOp.SATURATION).to(images.dtype))
    # lerp(ref, x, 1) computes x - (x - ref) * 0: exactly x.
    return torch.lerp(reference, images, factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def color_jitter(images: Tensor, jitter: Tensor, order: Tensor, with_hue: bool = True) -> Tensor:
    """Brightness, contrast, saturation (factors, 1 = identity) and hue (shift in turns, 0 = identity), from
    ``jitter`` (B, 4), each sample's ops in ascending ``order`` (B, 4) keys.

    Hue is the costly op, so it runs once for the whole batch: each sample's blend ops before its hue run
    in three steps before it (samples with fewer wait with factor 1), the rest in three steps after.
    """
    blend_keys = order[:, :3]
    blend_order = blend_keys.argsort(dim=1)
    blend_factors = jitter[:, :3].gather(1, blend_order)
    if not with_hue:
        for step in range(3):
            images = _blend(images, blend_order[:, step], blend_factors[:, step])
        return images
    blends_before_hue = (blend_keys < order[:, 3:]).sum(dim=1)
    for step in range(3):
        factor = torch.where(step < blends_before_hue, blend_factors[:, step], 1.0)
        images = _blend(images, blend_order[:, step], factor)
    shift = jitter[:, JitterOp.HUE]
    images = torch.lerp(images, shift_hue(images, shift), (shift != 0).to(images.dtype).view(-1, 1, 1, 1))
    for step in range(3):
        factor = torch.where(step >= blends_before_hue, blend_factors[:, step], 1.0)
        images = _blend(images, blend_order[:, step], factor)
    return images


def gaussian_blur(images: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with one ``sigma`` (B,) per sample (0 = unchanged), reflect padding."""
    batch, channels, height, width = images.shape
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (taps / sigma.clamp_min(1e-6)[:, None]) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    kernels = torch.where((sigma > 0)[:, None], kernels, (taps == 0).to(images.dtype))
    # Per-sample kernels as one grouped convolution over the batch folded into channels.
    weights = kernels.repeat_interleave(channels, dim=0)
    groups = batch * channels
    out = images.reshape(1, groups, height, width)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), weights.view(groups, 1, 1, -1), groups=groups)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), weights.view(groups, 1, -1, 1), groups=groups)
    return out.view(batch, channels, height, width)


def solarize(images: Tensor, flags: Tensor, threshold: float) -> Tensor:
    """Invert values >= ``threshold`` of the samples where ``flags`` (B,)."""
    invert = (images >= threshold) & flags.view(-1, 1, 1, 1)
    return torch.lerp(images, 1 - images, invert.to(images.dtype))  # exact select, faster than where on CPU


def _recipes(base: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]) -> list[ViewRecipe]:
    """Expand view entries (overrides of ``base``, optional ``count`` copies) into recipes."""
    recipes = []
    for entry in entries:
        merged = {**base, **entry}
        count = merged.pop("count", 1)
        recipes += [ViewRecipe.from_mapping(merged)] * count
    return recipes


class ViewAugmenter:
    """Makes the views of a uint8 batch: ``augmenter(images_u8, indices, epoch) -> list of (B, C, size, size)``
    float32 normalised views, global views first."""

    def __init__(
        self,
        views: Sequence[ViewRecipe],
        num_global_views: int,
        mean: Sequence[float],
        std: Sequence[float],
        channels: int,
        seed: int,
    ) -> None:
        if len(mean) != channels or len(std) != channels:
            raise UserError(f"data.mean and data.std need {channels} values (data.channels), got {mean} / {std}")
        if not 0 < num_global_views <= len(views):
            raise UserError(f"need at least one global view and at most {len(views)}, got {num_global_views}")
        self.views = list(views)
        self.num_global_views = num_global_views
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channels = channels
        self.seed = seed
        self._normalisers: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_config(
        cls, cfg: DictConfig | Mapping[str, Any], mean: Sequence[float], std: Sequence[float], channels: int, seed: int
    ) -> "ViewAugmenter":
        """From an ``augment`` config: ``base`` (shared recipe keys), ``global_views`` and ``local_views`` (lists
        of overrides of ``base``, each with an optional ``count``)."""
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        base = cfg.get("base") or {}
        global_views = _recipes(base, cfg.get("global_views") or [])
        local_views = _recipes(base, cfg.get("local_views") or [])
        return cls(global_views + local_views, len(global_views), mean, std, channels, seed)

    def sample_params(self, indices: Tensor, epoch: int, view: int, height: int, width: int) -> ViewParams:
        """The random parameters of view ``view`` for samples ``indices`` (int64 (B,)) of (height, width) images."""
        recipe = self.views[view]
        keys = counter_keys(indices, self.seed, epoch, view)
        draws = dict(zip(_DRAWS, uniform(keys, sum(_DRAWS.values())).split(list(_DRAWS.values()), dim=1)))
        boxes = sample_crop_boxes(
            draws["crop_area"],
            draws["crop_ratio"],
            draws["crop_position"],
            height,
            width,
            recipe.crop_scale,
            recipe.crop_ratio,
        )
        colour = self.channels == 3
        u = draws["jitter_factors"]
        factors = [
            _factor(u[:, 0], recipe.brightness),
            _factor(u[:, 1], recipe.contrast),
            _factor(u[:, 2], recipe.saturation if colour else 0.0),
            (2 * u[:, 3] - 1) * (recipe.hue if colour else 0.0),
        ]
        jitter_on = draws["jitter"][:, 0] < recipe.jitter_prob
        identity = (1.0, 1.0, 1.0, 0.0)
        jitter = torch.stack([torch.where(jitter_on, f, i) for f, i in zip(factors, identity)], dim=1)
        blur = draws["blur"]
        sigma_low, sigma_high = recipe.blur_sigma
        return ViewParams(
            boxes=boxes,
            flip=draws["flip"][:, 0] < recipe.flip_prob,
            jitter=jitter,
            jitter_order=draws["jitter_order"],
            grayscale=(draws["grayscale"][:, 0] < recipe.grayscale_prob) & colour,
            blur_sigma=torch.where(
                blur[:, 0] < recipe.blur_prob, sigma_low + (sigma_high - sigma_low) * blur[:, 1], 0.0
            ),
            solarize=draws["solarize"][:, 0] < recipe.solarize_prob,
        )

    def __call__(self, images: Tensor | Sequence[Tensor], indices: Tensor, epoch: int) -> list[Tensor]:
        """Views of a batch: ``images`` uint8 (B, C, H, W), cropped here, or the views' crops already cut (an image
        folder's workers do that from each whole image): one uint8 (B, C, size, size) per view, in view order."""
        cropped = not isinstance(images, Tensor)
        batches = list(images) if cropped else [images] * len(self.views)
        if len(batches) != len(self.views):
            raise ValueError(f"expected {len(self.views)} cropped views, got {len(batches)}")
        for batch in batches if cropped else batches[:1]:
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != self.channels:
                raise ValueError(
                    f"expected uint8 images (B, {self.channels}, H, W), got {batch.dtype} {tuple(batch.shape)}"
                )
        if indices.shape != batches[0].shape[:1]:
            raise ValueError(f"need one index per image, got {tuple(indices.shape)} for {batches[0].shape[0]} images")
        indices = indices.to(device=batches[0].device, dtype=torch.int64)
        source = None if cropped else images.to(torch.float32).div_(255)
        height, width = batches[0].shape[-2:]
        views = []
        for view, (recipe, batch) in enumerate(zip(self.views, batches)):
            if cropped and batch.shape[-2:] != (recipe.size, recipe.size):
                raise ValueError(f"view {view} must be cropped to {recipe.size} px, got {tuple(batch.shape[-2:])}")
            params = self.sample_params(indices, epoch, view, height, width)
            chunk = len(batch)
            if batch.device.type == "cpu":
                chunk = max(1, CPU_CHUNK_VALUES // (self.channels * recipe.size**2))
            parts = []
            for start in range(0, len(batch), chunk):
                part = params.select(start, start + chunk)
                if cropped:
                    crops = batch[start : start + chunk].to(torch.float32).div_(255)
                    crops = torch.where(part.flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
                else:
                    crops = resized_crop(source[start : start + chunk], part.boxes, part.flip, recipe.size)
                parts.append(self._colour(crops, part, recipe))
            views.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return views

    def _colour(self, views: Tensor, params: ViewParams, recipe: ViewRecipe) -> Tensor:
        """Jitter, grayscale, blur, solarisation and normalisation of cropped float views in [0, 1]."""
        colour = self.channels == 3
        # Ops a recipe never draws are skipped outright: a static choice, so results stay per-sample.
        if recipe.jitter_prob > 0 and max(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue) > 0:
            views = color_jitter(views, params.jitter, params.jitter_order, with_hue=colour and recipe.hue > 0)
        if colour and recipe.grayscale_prob > 0:
            views = torch.where(params.grayscale.view(-1, 1, 1, 1), to_gray(views).expand_as(views), views)
        if recipe.blur_prob > 0:
            radius = min(math.ceil(3 * recipe.blur_sigma[1]), recipe.size - 1)
            views = gaussian_blur(views, params.blur_sigma, radius)
        if recipe.solarize_prob > 0:
            views = solarize(views, params.solarize, recipe.solarize_threshold)
        mean, std = self._normaliser(views.device)
        return views.sub_(mean).div_(std)

    def _normaliser(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Built once per device: a host-to-device copy in every call would wait for the device.
        if device not in self._normalisers:
            shape = (1, self.channels, 1, 1)
            self._normalisers[device] = (
                torch.tensor(self.mean, device=device).view(shape),
                torch.tensor(self.std, device=device).view(shape),
            )
        return self._normalisers[device]


def _tuple_if_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def _factor(u: Tensor, strength: float) -> Tensor:
    """torchvision's jitter factor: uniform in [max(0, 1 - strength), 1 + strength]."""
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * u
