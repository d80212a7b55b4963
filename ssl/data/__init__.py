"""Data as uint8 tensors and batched augmentation on the training device.

``build_dataset`` loads a split, ``BatchLoader`` yields per-rank uint8 batches on the device, and
``ViewAugmenter`` turns them into normalised views keyed by (seed, epoch, view, sample index).
"""

from ssl.data.augment import ViewAugmenter, ViewRecipe
from ssl.data.datasets import DATASETS, FolderDataset, ImageDataset, build_dataset
from ssl.data.loader import BatchLoader

__all__ = ["DATASETS", "BatchLoader", "FolderDataset", "ImageDataset", "ViewAugmenter", "ViewRecipe", "build_dataset"]
