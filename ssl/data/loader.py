"""Per-epoch, per-rank batches of uint8 images, labels and sample indices on the training device.

The order of epoch e is a permutation keyed by (seed, e) alone. Global batch b is ``perm[b*G:(b+1)*G]`` with
G = batch_size * world_size, and rank r takes the r-th of ``world_size`` equal slices of it (a last, short
batch kept with ``drop_last=False`` is split as evenly as possible). Together with augmentation keyed by sample
index, a run sees the same data whatever the number of processes.

Resident datasets move to the device once and batches are gathered there; image folders decode each batch in
DataLoader workers (pinned memory, non-blocking copies to the device).
"""

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl.data.datasets import FolderDataset, ImageDataset
from ssl.data.random import permutation
from ssl.errors import UserError

Batch = tuple[Tensor, Tensor, Tensor]


class _EpochBatches(Sampler[Tensor]):
    """The index batches of the current epoch; the loader swaps them in before each epoch, so persistent
    workers survive across epochs."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _DecodeBatches(Dataset):
    """Decodes a whole batch per item in a worker. A bad image comes back as an error message, raised as a
    `UserError` in the main process: raised in a worker it would arrive wrapped in a multi-line traceback."""

    def __init__(self, folder: FolderDataset) -> None:
        self.folder = folder

    def __getitem__(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, str]:
        try:
            images = torch.stack([self.folder.decode(int(index)) for index in batch])
        except UserError as error:
            return torch.empty(0, dtype=torch.uint8), self.folder.labels[batch], batch, str(error)
        return images, self.folder.labels[batch], batch, ""


class BatchLoader:
    """``loader.epoch(e)`` yields ``(images uint8 (B, C, H, W), labels int64 (B,), indices int64 (B,))`` on
    ``device``; ``len(loader)`` is the number of steps per epoch."""

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
            self._decoder = DataLoader(
                _DecodeBatches(dataset),
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
        self._sampler.batches = self.batch_indices(epoch)
        for images, labels, indices, error in self._decoder:
            if error:
                raise UserError(error)
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
                indices.to(self.device, non_blocking=True),
            )
