"""mIoU and pixel accuracy against hand-made masks."""

import pytest
import torch

from ssl.eval.metrics import ConfusionMatrix


def test_miou_and_pixel_accuracy_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    predicted = torch.tensor([[0, 1, 1], [1, 1, 0]])
    confusion = ConfusionMatrix(num_classes=4)
    confusion.update(predicted, target)
    # The 255 pixel is ignored: 5 pixels count, 3 are right.
    assert confusion.pixel_accuracy() == pytest.approx(3 / 5)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 2 -> 2/4; class 2: FN 1 -> 0; class 3 in neither -> None.
    assert confusion.iou() == [pytest.approx(0.5), pytest.approx(0.5), 0.0, None]
    assert confusion.mean_iou() == pytest.approx(1 / 3)


def test_updates_accumulate():
    confusion = ConfusionMatrix(num_classes=2)
    confusion.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    confusion.update(torch.tensor([1]), torch.tensor([0]))
    assert confusion.matrix.tolist() == [[1, 1], [0, 1]]
    assert confusion.pixel_accuracy() == pytest.approx(2 / 3)
    assert confusion.iou() == [pytest.approx(1 / 2), pytest.approx(1 / 2)]
