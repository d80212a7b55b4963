"""The online kNN monitor (solo-learn's online kNN): how well the teacher's features classify, during pretraining.

After every `trainer.knn_every_epochs`-th epoch the teacher backbone embeds two fixed slices of clean images through
the export's own preprocessing (`eval_inputs`, as `ssl.linear_eval` does): up to `trainer.knn_train_images` labelled
pretraining images and up to `trainer.knn_test_images` images of the test split, evenly spaced over each set. Each
test image is classified by weighted kNN (k=20, T=0.07, DINO's protocol: `knn_votes`) among the training slice;
the top-1 accuracy is logged as `knn20`, a fraction like the online probe's `probe_acc`.

The slices are chosen once, without randomness, and the backbone runs in eval mode without gradients (BatchNorm
reads its running statistics, dropout is off): no random number is drawn and nothing the run trains changes, so a
resumed run stays bit-identical to an uninterrupted one.
"""

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ssl.data import FolderDataset, ImageDataset, build_dataset
from ssl.errors import UserError
from ssl.eval.features import extract_features
from ssl.eval.knn import knn_votes
from ssl.eval.metrics import topk_accuracy
from ssl.models.export import input_meta

K, TEMPERATURE = 20, 0.07


class KnnMonitor:
    """`monitor(backbone, epoch)`: `{"knn20": top-1}` when `epoch` (counted from 1) is one it is due after, else {}.

    Images stay on the CPU (uint8, moved a batch at a time), labels on `device`.
    """

    def __init__(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int,
                 meta: dict[str, Any], every_epochs: int, batch_size: int, device: torch.device,
                 precision: torch.autocast) -> None:
        (self.train_images, train_labels), (self.test_images, test_labels) = train, test
        self.train_labels, self.test_labels = train_labels.to(device), test_labels.to(device)
        self.num_classes, self.meta, self.every_epochs = num_classes, meta, every_epochs
        self.batch_size, self.device, self.precision = batch_size, device, precision

    def __call__(self, backbone: nn.Module, epoch: int) -> dict[str, float]:
        if epoch % self.every_epochs:
            return {}
        training = backbone.training
        backbone.eval()
        train_features, test_features = (
            extract_features(backbone, images, self.meta, self.device, self.batch_size, self.precision)
            for images in (self.train_images, self.test_images))
        backbone.train(training)
        votes = knn_votes(train_features, self.train_labels, test_features, self.num_classes, ks=(K,),
                          temperature=TEMPERATURE)[K]
        return {f"knn{K}": topk_accuracy(votes, self.test_labels, 1).item()}


def labelled_slice(dataset: ImageDataset | FolderDataset, count: int, what: str) -> tuple[Tensor, Tensor]:
    """uint8 images (CPU) and labels of up to `count` labelled samples spread evenly over `dataset`, so a set stored
    class by class gives every class its share. Image folders decode them here, once."""
    labelled = (dataset.labels >= 0).nonzero().squeeze(1)
    if len(labelled) == 0:
        raise UserError(f"{what} has no labels")
    count = min(count, len(labelled))
    indices = labelled[torch.arange(count) * len(labelled) // count]
    if isinstance(dataset, FolderDataset):
        images = torch.stack([dataset.eval_image(int(index)) for index in indices])
    else:
        images = dataset.images[indices]
    return images, dataset.labels[indices]


def build_knn_monitor(cfg: DictConfig, dataset: ImageDataset | FolderDataset, batch_size: int, device: torch.device,
                      precision: torch.autocast, notice: Callable[[str], None]) -> KnnMonitor | None:
    """The monitor `cfg.trainer` asks for, on the pretraining `dataset` and `cfg.data`'s test split, embedding
    `batch_size` images at a time under `precision` (the run's autocast). None when `trainer.knn_every_epochs=0`,
    or when the data has no labels or the test split cannot be loaded: that is no error, `notice` says it once."""
    if not cfg.trainer.knn_every_epochs:
        return None
    try:
        train = labelled_slice(dataset, cfg.trainer.knn_train_images, f"the pretraining data ({cfg.data.name} "
                                                                      f"{cfg.data.pretrain_split})")
        test = labelled_slice(build_dataset(cfg.data, "test_split"), cfg.trainer.knn_test_images,
                              f"the test split ({cfg.data.name} {cfg.data.test_split})")
    except UserError as reason:
        notice(f"notice: no online kNN monitor ({reason}); trainer.knn_every_epochs=0 turns it off")
        return None
    return KnnMonitor(train, test, dataset.num_classes, input_meta(cfg.data), cfg.trainer.knn_every_epochs,
                      batch_size, device, precision)
