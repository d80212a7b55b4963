"""Image folders (``root/<class>/<image>``): every view cut from the whole decoded image, as the papers do.

Training views. A view's crop box is drawn (``ssl.data.augment.crop_boxes``, keyed by seed, epoch, view and sample
index) from the image's own width and height as displayed, read from the file header (EXIF orientation applied).
The image is decoded once (``Image.draft`` lets a JPEG decode at 1/2, 1/4 or 1/8 scale only when every box of the
sample still covers at least its view's size at that scale) and each box is resampled straight to its view size
with one antialiased bicubic resize (PIL's, as DINO's RandomResizedCrop). What comes out is uint8 views of their
final sizes; flip, colour, blur, solarisation and normalisation follow on the training device
(``ssl.data.augment.ViewAugmenter``).

Evaluation views: the shorter side resized to ``image_size / eval_crop_fraction`` (256 for 224 at 0.875, the
convention of DINO's eval_linear, timm and torchvision), then the central ``image_size`` square, bicubic.

Files ImageNet holds besides RGB JPEGs decode too: grayscale and CMYK JPEGs are converted, a PNG named ``.JPEG`` is
read as what it is, EXIF orientation is applied. A file that cannot be read raises `BadImage` naming it.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ssl.errors import UserError, is_system_error, os_failure

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (values 5-8 swap width and height).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
DECODERS = ("cpu", "gpu")


class BadImage(UserError):
    """A file of the folder that cannot be decoded (not the machine's fault: that stays an `os_failure`)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode image {path} ({' '.join(reason.split())}); delete or replace the file, "
                         "or set data.skip_bad_images=true to train on without it")
        self.path = path


@dataclass(frozen=True)
class Header:
    """What an image file says of itself before decoding: its format, mode and upright size."""

    format: str | None
    mode: str
    width: int
    height: int
    orientation: int


def _open(path: str | BinaryIO, name: str) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        if is_system_error(error):  # the disk or a permission, not the image
            raise os_failure(error, name) from None
        raise BadImage(name, str(error)) from None


def _header(image: Image.Image, name: str) -> Header:
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError) as error:  # a malformed EXIF block
        raise BadImage(name, str(error)) from None
    orientation = orientation if orientation in _UPRIGHT else 1
    width, height = image.size
    if orientation >= 5:
        width, height = height, width
    return Header(image.format, image.mode, width, height, orientation)


def read_header(path: str) -> Header:
    """The header of the image at ``path``, without decoding its pixels."""
    with _open(path, path) as image:
        return _header(image, path)


def _decode(image: Image.Image, header: Header, name: str, channels: int, scale: float = 1.0) -> Image.Image:
    """The upright image in RGB (or L), decoded at the largest JPEG reduction that keeps ``scale`` of its size."""
    mode = "L" if channels == 1 else "RGB"
    try:
        if scale < 0.5 and image.format == "JPEG":
            raw_width, raw_height = image.size
            image.draft(mode, (math.ceil(raw_width * scale), math.ceil(raw_height * scale)))
        upright = image.convert(mode)
    except (OSError, ValueError, SyntaxError) as error:  # truncated data, a corrupt stream
        if is_system_error(error):
            raise os_failure(error, name) from None
        raise BadImage(name, str(error)) from None
    return upright.transpose(_UPRIGHT[header.orientation]) if header.orientation != 1 else upright


def _to_tensor(image: Image.Image) -> Tensor:
    array = np.array(image)  # a writable copy: PIL keeps its own buffer
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)


def cut_views(source: str | BinaryIO, name: str, boxes: Tensor, sizes: Sequence[int], channels: int) -> list[Tensor]:
    """uint8 views (C, size, size): box ``boxes[v]`` (x0, y0, w, h in the upright image's pixels) of the image at
    ``source`` (a path or open file, ``name`` in messages), resampled to ``sizes[v]`` with antialiased bicubic."""
    with _open(source, name) as image:
        header = _header(image, name)
        box_w, box_h = boxes[:, 2].tolist(), boxes[:, 3].tolist()
        # A JPEG decoded at 1/k keeps every view at or above its size as long as k <= every box side / view size.
        scale = 1 / max(1.0, min(min(w, h) / size for w, h, size in zip(box_w, box_h, sizes)))
        upright = _decode(image, header, name, channels, scale)
    fx, fy = upright.width / header.width, upright.height / header.height
    views = []
    for (x0, y0, w, h), size in zip(boxes.tolist(), sizes):
        box = (x0 * fx, y0 * fy, (x0 + w) * fx, (y0 + h) * fy)
        views.append(_to_tensor(upright.resize((size, size), Image.Resampling.BICUBIC, box=box)))
    return views


def eval_view(source: str | BinaryIO, name: str, size: int, crop_fraction: float, channels: int) -> Tensor:
    """uint8 (C, size, size): the shorter side resized to ``size / crop_fraction``, the central square kept."""
    with _open(source, name) as image:
        header = _header(image, name)
        # The central square must keep at least `size` pixels a side after decoding.
        upright = _decode(image, header, name, channels, scale=size / crop_fraction / min(header.width, header.height))
    shorter = min(upright.width, upright.height)
    side = shorter * crop_fraction  # the central square's side in the decoded image's pixels
    box = ((upright.width - side) / 2, (upright.height - side) / 2, (upright.width + side) / 2,
           (upright.height + side) / 2)
    return _to_tensor(upright.resize((size, size), Image.Resampling.BICUBIC, box=box))


class FolderDataset:
    """An image folder (``root/<class>/<image>``), decoded on demand.

    ``num_workers`` DataLoader processes decode for ``BatchLoader``; ``decode`` is ``cpu`` (PIL in the workers) or
    ``gpu`` (nvJPEG in the training process, ``ssl.data.gpu_decode``); with ``skip_bad_images`` a file that cannot
    be decoded is replaced by another sample and named in a notice instead of stopping the run.
    """

    def __init__(self, root: Path, image_size: int, channels: int, num_workers: int, name: str,
                 eval_crop_fraction: float = 0.875, decode: str = "cpu", skip_bad_images: bool = False) -> None:
        if not root.is_dir():
            raise UserError(
                f"image folder {root} not found: point data.root at a folder with train/ and val/ class folders, "
                "or set data.train_path / data.test_path"
            )
        if not 0 < eval_crop_fraction <= 1:
            raise UserError(f"data.eval_crop_fraction={eval_crop_fraction} must be in (0, 1]; 0.875 resizes to 256 "
                            "for a 224 crop")
        if decode not in DECODERS:
            raise UserError(f"data.decode={decode!r} is not one of {', '.join(DECODERS)}")
        try:
            classes, class_to_index = find_classes(str(root))
            samples = make_dataset(str(root), class_to_index, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as error:
            raise UserError(
                f"image folder {root}: {error}; it needs one sub-folder per class holding "
                f"{'/'.join(IMG_EXTENSIONS)} images"
            ) from None
        except OSError as error:
            raise os_failure(error) from None
        self.root = root
        self.paths = [path for path, _ in samples]
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.classes = classes
        self.num_classes = len(classes)
        self.image_size = image_size
        self.channels = channels
        self.num_workers = num_workers
        self.name = name
        self.eval_crop_fraction = eval_crop_fraction
        self.decode = decode
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.paths)

    def limit(self, count: int) -> None:
        """Keep only the first ``count`` images."""
        self.paths = self.paths[:count]
        self.labels = self.labels[:count]

    def eval_image(self, index: int) -> Tensor:
        """Image ``index``'s evaluation view, uint8 (C, image_size, image_size)."""
        path = self.paths[index]
        return eval_view(path, path, self.image_size, self.eval_crop_fraction, self.channels)
