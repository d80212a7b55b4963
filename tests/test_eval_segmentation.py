"""Segmentation pieces: the mosaic set, heads on dense features, a frozen backbone that stays frozen."""

import pytest
import torch
from torchvision.io import write_png

from ssl.errors import UserError
from ssl.eval.mosaic import build_mosaics
from ssl.eval.preprocess import random_crop_flip, resize_center_crop
from ssl.eval.seg_data import IGNORE_INDEX, SegmentationSet, load_folder, load_voc, resize_pair
from ssl.eval.segmentation import Segmenter, evaluate_segmenter, train_segmenter
from ssl.models import build_backbone

META = {"input_size": 28, "channels": 1, "mean": [0.5], "std": [0.25]}


def items() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 4x4 one-channel items: item i has value 100 * i on its top-left 2x2, 10 elsewhere."""
    images = torch.full((3, 1, 4, 4), 10, dtype=torch.uint8)
    for index in range(3):
        images[index, :, :2, :2] = 100 * index
    return images, torch.tensor([5, 6, 7])


def test_mosaic_masks_follow_item_pixels_and_the_seed():
    images, labels = items()
    mosaics = build_mosaics(images, labels, [str(c) for c in range(10)], count=6, threshold=50, seed=3)
    assert mosaics.images.shape == (6, 1, 8, 8) and mosaics.masks.shape == (6, 8, 8)
    assert mosaics.num_classes == 11 and mosaics.classes[0] == "background"
    for image, mask in zip(mosaics.images, mosaics.masks):
        for row in (0, 4):
            for col in (0, 4):
                tile, tile_mask = image[0, row:row + 4, col:col + 4], mask[row:row + 4, col:col + 4]
                item = int(tile[0, 0]) // 100  # the item under this tile, from its corner value
                assert torch.equal(tile, images[item, 0])
                expected = torch.where(images[item, 0] > 50, labels[item] + 1, 0)
                assert torch.equal(tile_mask.long(), expected)
    again = build_mosaics(images, labels, [str(c) for c in range(10)], count=6, threshold=50, seed=3)
    assert torch.equal(again.images, mosaics.images) and torch.equal(again.masks, mosaics.masks)


def test_resizing_keeps_labels_unblended():
    image = torch.randint(0, 255, (3, 10, 20), dtype=torch.uint8)
    mask = torch.zeros(10, 20, dtype=torch.uint8)
    mask[:, 10:] = IGNORE_INDEX
    image, mask = resize_pair(image, mask, 6)
    assert image.shape == (3, 6, 6) and mask.shape == (6, 6)
    assert set(mask.unique().tolist()) <= {0, IGNORE_INDEX}
    assert resize_center_crop(torch.zeros(2, 1, 32, 48), 16).shape == (2, 1, 16, 16)


def test_random_crop_flip_without_padding_only_mirrors():
    images = torch.arange(4 * 2 * 3 * 3, dtype=torch.uint8).view(4, 2, 3, 3)
    views = random_crop_flip(images, padding=0, generator=torch.Generator().manual_seed(0))
    for image, view in zip(images, views):
        assert torch.equal(view, image) or torch.equal(view, image.flip(-1))


def test_frozen_backbone_stays_frozen_and_logits_match_the_mask_size():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=1).eval().requires_grad_(False)
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    data = SegmentationSet(torch.randint(0, 255, (4, 1, 20, 20), dtype=torch.uint8),
                           torch.randint(0, 3, (4, 20, 20), dtype=torch.uint8), ["a", "b", "c"], "random")
    for head in ("linear", "fcn"):
        model = Segmenter(backbone, head, data.num_classes, META)
        assert model(data.images[:2]).shape == (2, 3, 20, 20)
        head_before = [p.clone() for p in model.head.parameters()]
        train_segmenter(model, data, epochs=1, batch_size=2, lr=0.01, backbone_lr=0.01, weight_decay=0.0, seed=0)
        assert not backbone.training
        assert all(torch.equal(before[name], tensor) for name, tensor in backbone.state_dict().items())
        assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
        confusion = evaluate_segmenter(model, data, batch_size=3)
        assert confusion.matrix.sum().item() == 4 * 20 * 20


def test_image_mask_folder(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        for index in range(count):
            (tmp_path / split / "images").mkdir(parents=True, exist_ok=True)
            (tmp_path / split / "masks").mkdir(parents=True, exist_ok=True)
            image = torch.randint(0, 255, (3, 12, 16), dtype=torch.uint8)
            write_png(image, str(tmp_path / split / "images" / f"{index}.png"))
            mask = torch.full((1, 12, 16), index + 1, dtype=torch.uint8)
            mask[:, 0] = IGNORE_INDEX
            write_png(mask, str(tmp_path / split / "masks" / f"{index}.png"))
    train = load_folder(str(tmp_path), "train", image_size=8, channels=1, classes=None)
    assert train.images.shape == (2, 1, 8, 8) and train.masks.shape == (2, 8, 8)
    assert train.classes == ["0", "1", "2"]  # largest label 2 (255 is ignored)
    test = load_folder(str(tmp_path), "val", image_size=8, channels=3, classes=train.classes)
    assert test.images.shape == (1, 3, 8, 8) and test.num_classes == 3


def test_missing_data_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="VOC 2012 not found"):
        load_voc(str(tmp_path), "train", image_size=8, download=False)
    (tmp_path / "train" / "images").mkdir(parents=True)
    write_png(torch.zeros(3, 4, 4, dtype=torch.uint8), str(tmp_path / "train" / "images" / "a.png"))
    with pytest.raises(UserError, match="has no mask"):
        load_folder(str(tmp_path), "train", image_size=4, channels=3, classes=None)
