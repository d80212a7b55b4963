"""ResNet stems and widths: the resolution each stem leaves for layer4, the layers it is made of, the channels a
width gives each stage, and the export round trip."""

import pytest
import torch
from torch import nn

import ssl
from ssl.errors import UserError
from ssl.models import build_backbone, save_export

META = {"input_size": 28, "channels": 1, "mean": [0.5], "std": [0.25], "dataset": "fmnist", "num_classes": 10,
        "method": "byol", "role": "teacher", "epoch": 1}


# Output stride of the stems (2**5 = 32 for imagenet: conv /2, pool /2, three stride-2 stages) -> layer4 map size.
@pytest.mark.parametrize("stem, size, dense_size", [
    ("imagenet", 28, 1), ("stride2", 28, 2), ("cifar", 28, 4),
    ("imagenet", 32, 1), ("stride2", 32, 2), ("cifar", 32, 4),
])
def test_stem_sets_the_resolution_of_the_last_stage(stem, size, dense_size):
    backbone = build_backbone("resnet18", in_channels=1, stem=stem).eval()
    images = torch.randn(2, 1, size, size)
    with torch.no_grad():
        dense, pooled = backbone.forward_dense(images), backbone(images)
    assert dense.shape == (2, 512, dense_size, dense_size)
    assert pooled.shape == (2, 512) and torch.allclose(pooled, dense.mean(dim=(2, 3)))


@pytest.mark.parametrize("stem, kernel, stride, pooled", [
    ("imagenet", 7, 2, True), ("stride2", 3, 2, False), ("cifar", 3, 1, False),
])
def test_stem_layers(stem, kernel, stride, pooled):
    conv, norm, _, pool = build_backbone("resnet50", in_channels=3, stem=stem).stem
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (3, 64, (kernel,) * 2, (stride,) * 2)
    assert isinstance(norm, nn.BatchNorm2d) and isinstance(pool, nn.MaxPool2d) == pooled


def test_stem_is_recorded_in_the_export_and_rebuilt_exactly(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=1, stem="stride2")
    backbone(torch.randn(4, 1, 28, 28))  # train-mode pass: BatchNorm running statistics move off their init
    backbone.eval()
    save_export(tmp_path / "teacher.pt", backbone, **META)
    loaded = ssl.load_backbone(tmp_path / "teacher.pt")
    assert loaded.export_meta["backbone"] == {"name": "resnet18", "kwargs": {"in_channels": 1, "stem": "stride2"}}
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.forward_dense(images), backbone.forward_dense(images))


@pytest.mark.parametrize("depth, width, stage_channels", [
    (18, 32, [32, 64, 128, 256]), (18, 16, [16, 32, 64, 128]), (50, 16, [64, 128, 256, 512]),  # Bottleneck: 4x
])
def test_width_sets_the_channels_of_every_stage(depth, width, stage_channels):
    backbone = build_backbone(f"resnet{depth}", in_channels=1, stem="stride2", width=width).eval()
    assert backbone.stem[0].out_channels == width and backbone.stem[1].num_features == width
    x = backbone.stem(torch.randn(2, 1, 28, 28))
    for stage, channels, size in zip((backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4),
                                     stage_channels, (14, 7, 4, 2)):
        x = stage(x)
        assert x.shape == (2, channels, size, size)
    assert backbone.feature_dim == stage_channels[-1] and backbone(torch.randn(2, 1, 28, 28)).shape == (2, channels)


def test_narrow_resnet_is_initialised_as_torchvision_initialises():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=1, stem="stride2", width=32)
    conv = backbone.layer3[1].conv2  # fan_out = 128 channels x 3 x 3: Kaiming-normal std sqrt(2 / fan_out)
    assert conv.weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)


def test_width_is_recorded_in_the_export_and_rebuilt_exactly(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=1, stem="stride2", width=32)
    backbone(torch.randn(4, 1, 28, 28))
    backbone.eval()
    save_export(tmp_path / "teacher.pt", backbone, **META)
    loaded = ssl.load_backbone(tmp_path / "teacher.pt")
    assert loaded.export_meta["backbone"]["kwargs"] == {"in_channels": 1, "stem": "stride2", "width": 32}
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.forward_dense(images), backbone.forward_dense(images))


@pytest.mark.parametrize("width", [0, 2.5])
def test_bad_width_is_one_clear_error(width):
    with pytest.raises(UserError, match=f"ResNet width={width} must be a positive whole number"):
        build_backbone("resnet18", width=width)


def test_unknown_stem_is_one_clear_error():
    with pytest.raises(UserError, match="unknown ResNet stem 'tiny'; choose one of: imagenet, cifar, stride2"):
        build_backbone("resnet18", stem="tiny")
