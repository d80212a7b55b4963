"""Scores: top-k classification accuracy, and the confusion matrix behind segmentation's mIoU / pixel accuracy."""

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of rows whose label is among the k highest logits; `logits` (..., N, C) -> (...), on the device.

    k is capped at the number of classes (top-5 of a 3-class problem is top-3, i.e. always right).
    """
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(dim=-1).float().mean(dim=-1)


class ConfusionMatrix:
    """Pixel counts `matrix[true, predicted]` accumulated on the device; pixels labelled `ignore_index` skip.

    IoU of class c = TP / (TP + FP + FN). mIoU averages it over the classes present in the ground truth or the
    prediction, so a class absent from both does not count as 0 or 1. Pixel accuracy = correct / counted pixels.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true class maps of the same shape."""
        keep = target != self.ignore_index
        pairs = target[keep].long() * self.num_classes + predicted[keep].long()
        self.matrix += torch.bincount(pairs, minlength=self.num_classes**2).view(self.num_classes, -1)

    def iou(self) -> list[float | None]:
        """IoU per class; None for a class in neither ground truth nor prediction."""
        matrix = self.matrix.cpu().double()
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        return [tp / u if u > 0 else None for tp, u in zip(true_positive.tolist(), union.tolist())]

    def mean_iou(self) -> float:
        present = [value for value in self.iou() if value is not None]
        return sum(present) / len(present) if present else 0.0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum().item()
        return self.matrix.diag().sum().item() / total if total else 0.0
