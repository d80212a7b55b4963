"""Segmentation data held in memory as uint8 tensors: Pascal VOC 2012 (torchvision) or a folder of image/mask pairs.

Every set becomes a `SegmentationSet` of equal-size images and masks: images are resized on their shorter side
to `image_size` (bilinear, antialiased) and centre-cropped; masks get the same geometry with nearest-neighbour
sampling so labels are never blended. Mask values are class indices, 255 marks pixels to ignore (VOC's object
borders). The Fashion-MNIST mosaic set lives in `ssl.eval.mosaic`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from ssl.errors import UserError
from ssl.eval.preprocess import resize_center_crop

IGNORE_INDEX = 255
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class SegmentationSet:
    """images uint8 (N, C, H, W); masks uint8 (N, H, W) of class indices or IGNORE_INDEX; one name per class."""

    images: torch.Tensor
    masks: torch.Tensor
    classes: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> "SegmentationSet":
        return SegmentationSet(self.images.to(device), self.masks.to(device), self.classes, self.name)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]], classes: list[str] | None,
                   name: str) -> "SegmentationSet":
        """Stack (image, mask) pairs; without class names there are (largest label found + 1) classes."""
        masks = torch.stack([mask for _, mask in pairs])
        if classes is None:
            classes = [str(index) for index in range(int(masks[masks != IGNORE_INDEX].max()) + 1)]
        return cls(torch.stack([image for image, _ in pairs]), masks, list(classes), name)


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image (C, H, W) and mask (H, W) -> both `size` x `size`, same crop, labels kept intact."""
    image = resize_center_crop(image[None].float(), size).round().clamp(0, 255)
    mask = resize_center_crop(mask[None, None].float(), size, mode="nearest-exact")
    return image[0].to(torch.uint8), mask[0, 0].to(torch.uint8)


def load_voc(root: str, split: str, image_size: int, download: bool) -> SegmentationSet:
    """Pascal VOC 2012 segmentation `split` ("train" or "val") from `root` (which holds VOCdevkit/)."""
    from torchvision.datasets import VOCSegmentation
    from torchvision.transforms.functional import pil_to_tensor

    try:
        voc = VOCSegmentation(root, year="2012", image_set=split, download=download)
    except RuntimeError as error:
        raise UserError(f"Pascal VOC 2012 not found under {root} ({error}); set voc.root to the folder holding "
                        "VOCdevkit/, or voc.download=true when online") from None
    pairs = [resize_pair(pil_to_tensor(image.convert("RGB")), pil_to_tensor(mask)[0], image_size)
             for image, mask in voc]
    return SegmentationSet.from_pairs(pairs, VOC_CLASSES, "voc2012")


def load_folder(root: str, split: str, image_size: int, channels: int,
                classes: list[str] | None) -> SegmentationSet:
    """Images `<root>/<split>/images/NAME.{png,jpg,jpeg}` with masks `<root>/<split>/masks/NAME.png`.

    Images are read with `channels` channels (1: grayscale, 3: RGB). Mask pixels are class indices
    (255 = ignore). Without `classes` (names), there are as many classes as the largest label found + 1.
    """
    image_dir, mask_dir = Path(root) / split / "images", Path(root) / split / "masks"
    images = sorted(p for p in image_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"no images in {image_dir}; the folder layout is <root>/<split>/images/*.png|jpg "
                        "with masks in <root>/<split>/masks/<same name>.png")
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    pairs = []
    for image_path in images:
        mask_path = mask_dir / f"{image_path.stem}.png"
        if not mask_path.is_file():
            raise UserError(f"{image_path} has no mask {mask_path}")
        image = decode_image(str(image_path), mode=mode)
        mask = decode_image(str(mask_path), mode=ImageReadMode.UNCHANGED)
        if mask.shape[0] != 1 or mask.shape[1:] != image.shape[1:]:
            raise UserError(f"{mask_path} must be a one-channel PNG the size of its image")
        pairs.append(resize_pair(image, mask[0], image_size))
    return SegmentationSet.from_pairs(pairs, classes, f"folder:{root}")
