"""`python -m ssl.convert`: published weights (torchvision and timm state dicts, DINO and Lightning checkpoints), built
here offline from randomly initialised models in those files' layouts, become exports whose features equal the source
model's; bad files give one line and write nothing."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import ssl
from ssl.models import build_backbone, save_export
from ssl.models.formats import timm_state_dict, torchvision_state_dict
from tests.fixtures import run_module
from tests.test_eval_cli import RunsCode  # unpickling it runs os.system

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def convert(capsys, source: Path, *args: str) -> Path:
    """`python -m ssl.convert source=... out=...` in this process (`args` may set another out=); the export it
    wrote."""
    out = next((Path(arg[4:]) for arg in args if arg.startswith("out=")), source.with_name(f"{source.stem}.export.pt"))
    assert run_module("ssl.convert", f"source={source}", f"out={out}", *args) == 0, capsys.readouterr().err
    return out


def failure(capsys, source: Path, *args: str) -> str:
    """The one error line `python -m ssl.convert` prints for `source` (in this process), after checking that it
    wrote nothing."""
    out = source.with_name("never.pt")
    capsys.readouterr()
    assert run_module("ssl.convert", f"source={source}", f"out={out}", *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not out.exists() and not any(path.name.startswith(".never") for path in source.parent.iterdir())
    return lines[0]


def randomised_batchnorm(model: nn.Module) -> nn.Module:
    """Running statistics away from their (0, 1) initialisation, so that eval-mode BatchNorm matters."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def max_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(images)


# ---------------------------------------------------------------------------------------- each kind of source


def test_torchvision_resnet50_gives_torchvisions_features(tmp_path, capsys):
    torch.manual_seed(0)
    source_model = randomised_batchnorm(torchvision.models.resnet50()).eval()
    torch.save(source_model.state_dict(), tmp_path / "resnet50.pth")
    out = convert(capsys, tmp_path / "resnet50.pth")
    assert "left out 2 tensors: fc.*" in capsys.readouterr().out

    backbone = ssl.load_backbone(out)
    meta = backbone.export_meta
    assert meta["backbone"] == {"name": "resnet50", "kwargs": {"in_channels": 3, "stem": "imagenet", "width": 64}}
    assert (meta["input_size"], meta["channels"], meta["mean"], meta["std"]) == (224, 3, IMAGENET["mean"],
                                                                                 IMAGENET["std"])
    assert (meta["dataset"], meta["num_classes"], meta["role"], meta["method"]) == ("imagefolder", 1000,
                                                                                   "pretrained", "unknown")
    source_model.fc = nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    assert max_difference(features(backbone, images), features(source_model, images)) <= TOLERANCE


@pytest.fixture(scope="module")
def timm_vit_small():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


def test_timm_vit_small_gives_timms_features(tmp_path, capsys, timm_vit_small):
    torch.save(timm_vit_small.state_dict(), tmp_path / "vit_small.pth")
    backbone = ssl.load_backbone(convert(capsys, tmp_path / "vit_small.pth"))
    assert backbone.export_meta["backbone"] == {
        "name": "vit_small", "kwargs": {"in_channels": 3, "patch_size": 16, "image_size": 224}}
    assert backbone.export_meta["input_size"] == 224
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # timm's pooled pre-logits: the class token after the final norm
        expected = timm_vit_small.forward_head(timm_vit_small.forward_features(images), pre_logits=True)
    assert max_difference(features(backbone, images), expected) <= TOLERANCE


def test_safetensors_files_and_float16_weights_are_read(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    source_model = randomised_batchnorm(torchvision.models.resnet18()).eval()
    safetensors.save_file(source_model.half().state_dict(), tmp_path / "model.safetensors")
    backbone = ssl.load_backbone(convert(capsys, tmp_path / "model.safetensors"))
    assert all(tensor.dtype != torch.float16 for tensor in backbone.state_dict().values())
    source_model.float().fc = nn.Identity()  # the float16 weights, computed with in float32 as ours are
    images = torch.randn(2, 3, 32, 32)
    assert max_difference(features(backbone, images), features(source_model, images)) <= TOLERANCE


def torchvision_backbone_names(net: nn.Module) -> dict[str, torch.Tensor]:
    """A ResNet backbone's tensors under torchvision's names, without a classifier (DINO's ResNet has fc = Identity)."""
    return {k: v for k, v in torchvision_state_dict(net).items() if not k.startswith("fc.")}


def dino_checkpoint(path: Path, teacher: nn.Module, student: nn.Module, library_names, ddp_teacher: bool) -> Path:
    """main_dino.py's checkpoint.pth layout: the teacher's state dict (keys backbone.* and head.*, under module.
    when the teacher has BatchNorm and main_dino.py wraps it in DDP), the student's (always DDP: module.backbone.*,
    module.head.*), the optimiser, the epoch, the DINOLoss centre and its arguments as an argparse.Namespace."""
    head = {"head.mlp.0.weight": torch.randn(8, teacher.feature_dim), "head.last_layer.weight_g": torch.ones(16, 1),
            "head.last_layer.weight_v": torch.randn(16, 4)}
    teacher_state = {**{f"backbone.{k}": v for k, v in library_names(teacher).items()}, **head}
    student_state = {**{f"backbone.{k}": v for k, v in library_names(student).items()}, **head}
    torch.save({"teacher": {("module." if ddp_teacher else "") + k: v for k, v in teacher_state.items()},
                "student": {f"module.{k}": v for k, v in student_state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0]}]}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=16),
                "dino_loss": {"center": torch.zeros(1, 16)}}, path)
    return path


# DINO's ViT (a ViT-Tiny/8 at 32 px, quick to run: its teacher) and ResNet (teacher DDP-wrapped: both networks;
# a quarter-width ResNet-18, as the layout does not depend on the width)
@pytest.mark.parametrize("arch, roles", [("vit", ["teacher"]), ("resnet", ["teacher", "student"])])
def test_dino_checkpoint_gives_its_teacher_or_student(tmp_path, capsys, arch, roles):
    torch.manual_seed(0)
    if arch == "vit":
        nets = [build_backbone("vit_tiny", patch_size=8, image_size=32).eval()] * 2
        source = dino_checkpoint(tmp_path / "checkpoint.pth", *nets, timm_state_dict, ddp_teacher=False)
    else:
        nets = [randomised_batchnorm(build_backbone("resnet18", width=16)).eval() for _ in range(2)]
        source = dino_checkpoint(tmp_path / "checkpoint.pth", *nets, torchvision_backbone_names, ddp_teacher=True)
    images = torch.randn(2, 3, 32, 32)
    for role, net in zip(roles, nets):
        out = convert(capsys, source, f"role={role}", f"out={tmp_path / role}.pt")
        assert "left out 3 tensors: head.*" in capsys.readouterr().out
        converted = ssl.load_backbone(out)
        assert torch.equal(features(converted, images), features(net, images))
        meta = converted.export_meta
        assert (meta["method"], meta["role"], meta["epoch"]) == ("dino", role, 100)
    if arch == "vit":
        assert meta["input_size"] == 32 and meta["backbone"]["kwargs"]["image_size"] == 32


def solo_learn_resnet18() -> nn.Module:
    """solo-learn's CIFAR ResNet-18 (solo/methods/base.py): torchvision's with a 3x3 stride-1 conv1 padded by 2, no
    max-pool, no classifier."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return randomised_batchnorm(net).eval()


def test_solo_learn_lightning_checkpoint_gives_its_online_or_momentum_backbone(tmp_path, capsys):
    torch.manual_seed(0)
    online, momentum = solo_learn_resnet18(), solo_learn_resnet18()
    state = {**{f"backbone.{k}": v for k, v in online.state_dict().items()},
             **{f"momentum_backbone.{k}": v for k, v in momentum.state_dict().items()},
             "projector.0.weight": torch.randn(32, 512), "momentum_projector.0.weight": torch.randn(32, 512),
             "predictor.0.weight": torch.randn(32, 32), "classifier.weight": torch.randn(10, 512),
             "classifier.bias": torch.zeros(10)}
    source = tmp_path / "byol-cifar10.ckpt"
    torch.save({"epoch": 999, "global_step": 195000, "pytorch-lightning_version": "2.0.0", "state_dict": state,
                "optimizer_states": [], "lr_schedulers": []}, source)

    assert "stem=cifar_pad2 (solo-learn's CIFAR ResNets" in failure(capsys, source)
    images = torch.randn(2, 3, 32, 32)
    student = ssl.load_backbone(convert(capsys, source, "stem=cifar_pad2", "mean=[0.4914,0.4822,0.4465]",
                                        "std=[0.247,0.2435,0.2616]", "input_size=32", "dataset=cifar10",
                                        "num_classes=10"))
    assert max_difference(features(student, images), features(online, images)) <= TOLERANCE
    assert student.export_meta["role"] == "student" and student.export_meta["dataset"] == "cifar10"
    assert student.export_meta["input_size"] == 32 and student.export_meta["mean"] == [0.4914, 0.4822, 0.4465]
    teacher_out = tmp_path / "teacher.pt"
    convert(capsys, source, "stem=cifar_pad2", "role=teacher", f"out={teacher_out}")
    teacher = ssl.load_backbone(teacher_out)
    assert max_difference(features(teacher, images), features(momentum, images)) <= TOLERANCE


# ---------------------------------------------------------------------------------- round trip with ssl.export

META = {"input_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "dataset": "cifar10",
        "num_classes": 10, "method": "byol", "role": "teacher", "epoch": 1}


def test_ssl_export_torchvision_format_converts_back_to_the_same_tensors(tmp_path, capsys):
    # (ViTs: ssl.export's timm names are checked against timm in test_export_formats.py, timm's back into ours above)
    torch.manual_seed(0)
    backbone = randomised_batchnorm(build_backbone("resnet18", in_channels=3, stem="imagenet"))
    export = save_export(tmp_path / "teacher.pt", backbone, **META)
    assert run_module("ssl.export", f"ckpt={export}", "format=torchvision") == 0
    library_file = next(path for path in tmp_path.glob("teacher.*.pt"))
    converted = ssl.load_backbone(convert(capsys, library_file))
    assert converted.export_meta["backbone"]["name"] == "resnet18"
    original = backbone.state_dict()
    assert converted.state_dict().keys() == original.keys()
    assert all(torch.equal(tensor, original[key]) for key, tensor in converted.state_dict().items())


# ------------------------------------------------------------------------------------------------- bad files


def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def bad_file(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pth"
    if kind == "missing_keys":
        torch.save({k: v for k, v in resnet18_state().items() if k != "layer4.1.conv2.weight"}, path)
    elif kind == "wrong_shape":
        torch.save({**resnet18_state(), "layer3.0.conv1.weight": torch.zeros(256, 64, 3, 3)}, path)
    elif kind == "carries_code":
        torch.save({"state_dict": RunsCode(folder / "marker")}, path)
    elif kind == "not_torch":
        path.write_text("not a checkpoint\n")
    elif kind == "no_backbone":
        torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    elif kind == "an_export":
        save_export(path, build_backbone("resnet18"), **META)
    elif kind == "unknown_depth":
        torch.save(torchvision.models.resnet34().state_dict(), path)
    return path


BAD_FILES = {
    "missing_keys": "do not fit resnet18 with in_channels=3, stem=imagenet, width=64 (first: layer4.1.conv2.weight "
                    "missing",
    "wrong_shape": "layer3.0.conv1.weight (256, 64, 3, 3) where resnet18 has (256, 128, 3, 3)",
    "carries_code": "holds pickled objects other than tensors (posix.system); refusing to load it",
    "not_torch": "is not a",
    "no_backbone": "no ResNet (conv1.weight, layer1.*) or ViT",
    "an_export": "is already an ssl export",
    "unknown_depth": "holds a ResNet with 3-4-6-3 basic blocks; ssl builds resnet18 and resnet50 only",
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_one_error_line_and_writes_nothing(tmp_path, capsys, kind):
    line = failure(capsys, bad_file(kind, tmp_path))
    assert BAD_FILES[kind] in line, line
    assert not (tmp_path / "marker").exists()


def test_backbone_name_is_checked_against_the_shapes(tmp_path, capsys):
    torch.save(resnet18_state(), tmp_path / "resnet18.pth")
    line = failure(capsys, tmp_path / "resnet18.pth", "backbone=resnet50")
    assert "holds a resnet18 (resnet18 with in_channels=3, stem=imagenet, width=64), not a resnet50" in line
    assert convert(capsys, tmp_path / "resnet18.pth", "backbone=resnet18").exists()


def test_existing_out_is_kept(tmp_path, capsys):
    torch.save(resnet18_state(), tmp_path / "resnet18.pth")
    (tmp_path / "teacher.pt").write_bytes(b"a run's export")
    capsys.readouterr()
    assert run_module("ssl.convert", f"source={tmp_path / 'resnet18.pth'}", f"out={tmp_path / 'teacher.pt'}") == 2
    assert "teacher.pt exists and is kept" in capsys.readouterr().err
    assert (tmp_path / "teacher.pt").read_bytes() == b"a run's export"


def test_code_in_the_file_is_one_line_in_a_fresh_interpreter(tmp_path):
    source = bad_file("carries_code", tmp_path)
    result = subprocess.run([sys.executable, "-m", "ssl.convert", f"source={source}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {source} holds pickled objects"), result.stderr
    assert not (tmp_path / "marker").exists() and not (tmp_path / "carries_code.ssl.pt").exists()
