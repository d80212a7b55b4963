"""Per-epoch, per-rank batches of uint8 images, labels and sample indices on the training device.

The order of epoch e is a permutation keyed by (seed, e) alone. Global batch b is ``perm[b*G:(b+1)*G]`` with
G = batch_size * world_size, and rank r takes the r-th of ``world_size`` equal slices of it (a last, short
batch kept with ``drop_last=False`` is split as evenly as possible). Together with augmentation keyed by sample
index, a run sees the same data whatever the number of processes.

Resident datasets move to the device once and batches are gathered there. Image folders decode each batch in
DataLoader workers (pinned memory, non-blocking copies to the device): for training, every view is cut from the
whole image there (`ssl.data.folder`) and a batch is a list of uint8 views, one (B, C, size, size) per view; for
evaluation it is the images' evaluation views.
"""

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl.data.augment import ViewRecipe, crop_boxes
from ssl.data.datasets import FolderDataset, ImageDataset
from ssl.data.folder import BadImage, Header, cut_views, read_header
from ssl.data.random import permutation
from ssl.errors import UserError, os_failure

# (images uint8 (B, C, H, W), or one uint8 view (B, C, s, s) per view of an image folder; labels; indices)
Batch = tuple[Tensor | list[Tensor], Tensor, Tensor]


class _EpochBatches(Sampler[tuple[int, Tensor]]):
    """The (epoch, index batch) items of the current epoch; the loader swaps them in before each epoch, so
    persistent workers survive across epochs."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches: list[Tensor] = []

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        return ((self.epoch, batch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _FolderBatches(Dataset):
    """Decodes a whole batch per item ``(epoch, indices)`` in a worker: the training views of each image (``views``
    given; `ssl.data.folder`) or its evaluation view. Files nvJPEG takes come back as bytes with ``data.decode=gpu``.

    A bad image comes back as an error message, raised as a `UserError` in the main process: raised in a worker it
    would arrive wrapped in a multi-line traceback. With ``skip_bad_images`` it is replaced by the next image of the
    folder that decodes (drawn with the replaced sample's random numbers) and named in ``skipped``.
    """

    def __init__(self, folder: FolderDataset, views: Sequence[ViewRecipe] | None, seed: int) -> None:
        self.folder = folder
        self.views = list(views) if views is not None else None
        self.seed = seed

    def __getitem__(self, item: tuple[int, Tensor]) -> dict[str, Any]:
        epoch, batch = item
        skipped: list[str] = []
        try:
            if self.views is None:
                folder = self.folder
                images = torch.empty(0, folder.channels, folder.image_size, folder.image_size, dtype=torch.uint8)
                if len(batch):
                    images = torch.stack([folder.eval_image(int(index)) for index in batch])
                return {"images": images, "labels": folder.labels[batch], "indices": batch, "error": ""}
            return self._views(epoch, batch, skipped)
        except UserError as error:
            return {"error": str(error)}

    def _readable(self, candidate: int, skipped: list[str]) -> tuple[int, Header]:
        """The first image from ``candidate`` on (wrapping around) whose header reads, and its header."""
        for _ in range(len(self.folder)):
            path = self.folder.paths[candidate]
            try:
                return candidate, read_header(path)
            except BadImage as error:
                if not self.folder.skip_bad_images:
                    raise
                skipped.append(error.path)
                candidate = (candidate + 1) % len(self.folder)
        raise UserError(f"no image of {self.folder.root} can be decoded; check the folder")

    def _boxes(self, epoch: int, indices: Tensor, headers: Sequence[Header]) -> Tensor:
        """(B, V, 4) crop boxes of every view, drawn with the samples' keys from their own image sizes."""
        heights = torch.tensor([header.height for header in headers])
        widths = torch.tensor([header.width for header in headers])
        return torch.stack([crop_boxes(recipe, self.seed, epoch, view, indices, heights, widths)
                            for view, recipe in enumerate(self.views)], dim=1)

    def _views(self, epoch: int, batch: Tensor, skipped: list[str]) -> dict[str, Any]:
        folder, sizes = self.folder, [recipe.size for recipe in self.views]
        sources, headers = map(list, zip(*(self._readable(int(index), skipped) for index in batch)))
        boxes = self._boxes(epoch, batch, headers)
        views = [torch.zeros(len(batch), folder.channels, size, size, dtype=torch.uint8) for size in sizes]
        gpu: dict[str, Any] = {"positions": [], "encoded": [], "names": []}
        for position in range(len(batch)):
            path = folder.paths[sources[position]]
            if folder.decode == "gpu" and nvjpeg_takes(headers[position]):
                gpu["positions"].append(position)
                gpu["encoded"].append(torch.frombuffer(bytearray(_read_bytes(path)), dtype=torch.uint8))
                gpu["names"].append(path)
                continue
            for view, crop in zip(views, self._cut(epoch, batch, position, sources, boxes, skipped)):
                view[position] = crop
        gpu["boxes"] = boxes[gpu["positions"]]
        return {"views": views, "labels": folder.labels[sources], "indices": batch, "error": "", "skipped": skipped,
                "gpu": gpu}

    def _cut(self, epoch: int, batch: Tensor, position: int, sources: list[int], boxes: Tensor,
             skipped: list[str]) -> list[Tensor]:
        """The views of batch position ``position``; a file that fails to decode is replaced (``sources`` and
        ``boxes`` updated) when ``skip_bad_images``."""
        sizes = [recipe.size for recipe in self.views]
        for _ in range(len(self.folder)):
            path = self.folder.paths[sources[position]]
            try:
                return cut_views(path, path, boxes[position], sizes, self.folder.channels)
            except BadImage as error:
                if not self.folder.skip_bad_images:
                    raise
                skipped.append(error.path)
                sources[position], header = self._readable((sources[position] + 1) % len(self.folder), skipped)
                boxes[position] = self._boxes(epoch, batch[position : position + 1], [header])[0]
        raise UserError(f"no image of {self.folder.root} can be decoded; check the folder")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise os_failure(error, path) from None


def nvjpeg_takes(header: Header) -> bool:
    """Whether nvJPEG decodes the file as PIL would: a JPEG in YCbCr or grayscale, stored upright."""
    return header.format == "JPEG" and header.mode in ("RGB", "L") and header.orientation == 1


class BatchLoader:
    """``loader.epoch(e)`` yields ``(images, labels int64 (B,), indices int64 (B,))`` on ``device``; ``len(loader)``
    is the number of steps per epoch. ``images`` is uint8 (B, C, H, W), or, for an image folder given the training
    ``views`` (and the ``seed`` that keys their crops), a list of uint8 (B, C, size, size), one per view."""

    def __init__(
        self,
        dataset: ImageDataset | FolderDataset,
        batch_size: int,
        device: torch.device | str,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        views: Sequence[ViewRecipe] | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}; fix data.batch_size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        count, global_batch = len(dataset), batch_size * world_size
        if count == 0:
            raise UserError(f"dataset {dataset.name} has no images; check data.root and data.limit")
        if drop_last and global_batch > count:
            raise UserError(
                f"a batch of {global_batch} images ({batch_size} x {world_size} processes) is larger than the "
                f"{count} images of {dataset.name}, so drop_last leaves no batch; lower data.batch_size or "
                "raise data.limit"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        if isinstance(dataset, ImageDataset):
            self._images = dataset.images.to(self.device)
            self._labels = dataset.labels.to(self.device)
        else:
            self._sampler = _EpochBatches()
            self.skipped: dict[str, int] = {}  # data.skip_bad_images: times each file was replaced
            self._decoder = DataLoader(
                _FolderBatches(dataset, views, seed),
                batch_size=None,  # each item is already a whole batch
                sampler=self._sampler,
                num_workers=dataset.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=dataset.num_workers > 0,
            )

    def __len__(self) -> int:
        count, global_batch = len(self.dataset), self.batch_size * self.world_size
        return count // global_batch if self.drop_last else -(-count // global_batch)

    def batch_indices(self, epoch: int, device: torch.device | str = "cpu") -> list[Tensor]:
        """This rank's sample indices (int64) for each step of ``epoch``."""
        count, global_batch = len(self.dataset), self.batch_size * self.world_size
        if self.shuffle:
            order = permutation(count, self.seed, epoch, device=device)
        else:
            order = torch.arange(count, device=device)
        return [
            order[step * global_batch : (step + 1) * global_batch].tensor_split(self.world_size)[self.rank]
            for step in range(len(self))
        ]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch`` for this rank."""
        if isinstance(self.dataset, ImageDataset):
            # The permutation is computed on the device too: no host-to-device copy per step.
            for indices in self.batch_indices(epoch, self.device):
                yield self._images[indices], self._labels[indices], indices
            return
        self._sampler.epoch, self._sampler.batches = epoch, self.batch_indices(epoch)
        for item in self._decoder:
            if item["error"]:
                raise UserError(item["error"])
            labels = item["labels"].to(self.device, non_blocking=True)
            indices = item["indices"].to(self.device, non_blocking=True)
            if "images" in item:
                yield item["images"].to(self.device, non_blocking=True), labels, indices
                continue
            views = [view.to(self.device, non_blocking=True) for view in item["views"]]
            skipped = item["skipped"] + self._cut_on_device(views, item["gpu"])
            for path in skipped:
                self._notice_skipped(path)
            yield views, labels, indices

    def _cut_on_device(self, views: list[Tensor], gpu: dict[str, Any]) -> list[str]:
        """``data.decode=gpu``: decode the batch's JPEG bytes and cut their views on the device; a file no decoder
        takes is replaced by another image of the batch (``data.skip_bad_images``) or stops the run."""
        if not gpu["positions"]:
            return []
        from ssl.data.gpu_decode import cut_encoded_views

        refused = cut_encoded_views(views, gpu["positions"], gpu["encoded"], gpu["boxes"], gpu["names"],
                                    self.dataset.channels)
        names = [gpu["names"][i] for i in refused]
        if refused and not self.dataset.skip_bad_images:
            raise BadImage(names[0], "nvJPEG and PIL both refuse it")
        bad = {gpu["positions"][i] for i in refused}
        good = [position for position in range(len(views[0])) if position not in bad]
        if not good:
            raise UserError(f"no image of a batch could be decoded (first: {names[0]}); check {self.dataset.root}")
        for position in bad:
            for view in views:
                view[position] = view[good[position % len(good)]]
        return names

    def _notice_skipped(self, path: str) -> None:
        if path not in self.skipped:
            print(f"notice: skipping {path}, which cannot be decoded (data.skip_bad_images=true); "
                  f"{len(self.skipped) + 1} file(s) skipped so far", file=sys.stderr, flush=True)
        self.skipped[path] = self.skipped.get(path, 0) + 1
