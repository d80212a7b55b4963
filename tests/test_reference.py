"""Where this code must match the reference implementations (facebookresearch/dino main_dino.py and utils.py,
solo-learn's methods/base.py, utils/lr_scheduler.py and utils/momentum.py, deepmind-research byol/utils/schedules.py):
each expectation here is written from the papers' formulas and those sources' documented behaviour, independently
of the code under test."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from ssl.methods import build_method
from ssl.models import build_backbone
from ssl.models.formats import torchvision_state_dict
from ssl.models.vit import VisionTransformer
from ssl.optim import cosine_schedule
from ssl.train import base_learning_rate, step_schedules

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(path.stem for path in (ROOT / "configs" / "experiment").glob("*.yaml"))


def recipe(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("pretrain", overrides=[f"+experiment={name}", *overrides])


def dino_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                  warmup_start: float = 0.0) -> list[float]:
    """main_dino.py's schedules (utils.cosine_scheduler), one step at a time: the warm-up is np.linspace(start, base,
    W), i.e. start + (base - start) k / (W - 1), then final + (base - final) (1 + cos(pi k / n)) / 2 over the n steps
    after it. solo-learn's LinearWarmupCosineAnnealingLR stepped per optimiser step has the same closed form."""
    values = []
    for step in range(total_steps):
        if step < warmup_steps:
            values.append(warmup_start + (base - warmup_start) * (step / (warmup_steps - 1) if warmup_steps > 1 else 0))
        else:
            k, n = step - warmup_steps, total_steps - warmup_steps
            values.append(final + (base - final) * (1 + math.cos(math.pi * k / n)) / 2)
    return values


@pytest.mark.parametrize("method_name", ["dino", "byol"])
def test_teacher_targets_are_deterministic_in_training_mode(method_name):
    # main_dino.py builds the teacher ViT without drop_path_rate (0) and the student with it; the method runs in
    # training mode, so a teacher that kept the student's stochastic depth would give random targets.
    torch.manual_seed(0)
    backbone = VisionTransformer(dim=32, depth=4, num_heads=2, patch_size=4, image_size=16, drop_path_rate=0.5)
    kwargs = {"dino": {"out_dim": 16, "hidden_dim": 32, "bottleneck_dim": 8},
              "byol": {"proj_hidden_dim": 32, "proj_output_dim": 8, "pred_hidden_dim": 32}}[method_name]
    method = build_method(method_name, backbone, epochs=1, **kwargs).train()
    images = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        first, second = method.teacher.backbone(images), method.teacher.backbone(images)
        assert torch.equal(first, second)
        # the student keeps its stochastic depth
        assert not torch.equal(method.student.backbone(images), method.student.backbone(images))


@pytest.mark.parametrize("total_steps, warmup_steps", [(91, 26), (40, 0), (7, 1), (12, 11)])
@pytest.mark.parametrize("warmup_start", [0.0, 3e-5])  # DINO's start, solo-learn's default warmup_start_lr
def test_cosine_schedule_is_dinos_and_solo_learns(total_steps, warmup_steps, warmup_start):
    ours = cosine_schedule(2e-3, 1e-6, total_steps, warmup_steps, warmup_start).tolist()
    assert ours == pytest.approx(dino_schedule(2e-3, 1e-6, total_steps, warmup_steps, warmup_start), rel=1e-12)


def test_dino_imagenet_schedules_are_the_papers_run():
    # main_dino.py for ViT-S/16 at batch 1024: lr 5e-4 x 1024 / 256 warmed up over 10 epochs, cosine to --min_lr 1e-6
    # (not scaled by the batch), weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1, 100 epochs. The recipe's
    # comment says the same; its lr used to end at 4e-6 because final_lr was scaled like lr.
    steps_per_epoch = 3
    lr, wd, momentum = step_schedules(recipe("dino_imagenet"), steps_per_epoch)
    total = 100 * steps_per_epoch
    assert lr == pytest.approx(dino_schedule(5e-4 * 1024 / 256, 1e-6, total, 10 * steps_per_epoch), rel=1e-12)
    assert wd == pytest.approx(dino_schedule(0.04, 0.4, total), rel=1e-12)
    assert momentum == pytest.approx(dino_schedule(0.996, 1.0, total), rel=1e-12)
    assert 1e-6 < lr[-1] < 1.1e-6  # the last cosine step, just short of min_lr (4.1e-6 when it was scaled)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_recipe_ends_its_lr_at_its_final_lr_whatever_the_batch(name):
    for batch_size in (64, 512):
        cfg = recipe(name, f"data.batch_size={batch_size}", "trainer.epochs=20", "trainer.warmup_epochs=2")
        lr = step_schedules(cfg, steps_per_epoch=4)[0]
        expected = dino_schedule(base_learning_rate(cfg), cfg.optim.final_lr, 80, 8)
        assert lr == pytest.approx(expected, rel=1e-12)


def solo_learn_cifar_resnet18() -> nn.Module:
    """solo-learn's CIFAR backbone as its solo/methods/base.py documents it: torchvision's resnet18 with conv1 replaced
    by a 3x3 stride-1 convolution padded by 2 (no bias), the max-pool and the classifier removed."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return net


@pytest.mark.parametrize("name", ["byol_cifar", "byol_cifar100", "dino_cifar"])
def test_solo_learn_recipes_build_solo_learns_cifar_resnet(name):
    cfg = recipe(name)
    torch.manual_seed(0)
    ours = build_backbone(cfg.backbone.name, in_channels=3, **OmegaConf.to_container(cfg.backbone.kwargs)).eval()
    theirs = solo_learn_cifar_resnet18().eval()
    theirs.load_state_dict({k: v for k, v in torchvision_state_dict(ours).items() if not k.startswith("fc.")})
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=1e-5)
        assert ours.forward_dense(images).shape == (2, 512, 5, 5)  # 32 px -> 34 x 34 after the stem


def dino_position_embedding(pos_embed: torch.Tensor, grid: int, height: int, width: int) -> torch.Tensor:
    """DINO's vision_transformer.py interpolate_pos_encoding: the learned embeddings unchanged at the training grid,
    else the patch part resized bicubically by the scale factors (h + 0.1) / grid and (w + 0.1) / grid."""
    if (height, width) == (grid, grid):
        return pos_embed
    patch = pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((height + 0.1) / grid, (width + 0.1) / grid), mode="bicubic")
    return torch.cat((pos_embed[:, :1], patch.flatten(2).transpose(1, 2)), dim=1)


def test_position_embeddings_are_dinos_at_the_training_grid_only():
    # The deliberate difference the README and ssl/models/vit.py state: off the training grid we resize to the exact
    # grid, DINO by a scale factor with a +0.1 offset (the same output size, other sampling positions).
    torch.manual_seed(0)
    vit = VisionTransformer(dim=32, depth=1, num_heads=2, patch_size=16, image_size=224)
    with torch.no_grad():
        assert torch.equal(vit.position_embedding(14, 14), dino_position_embedding(vit.pos_embed, 14, 14, 14))
        ours, dinos = vit.position_embedding(6, 6), dino_position_embedding(vit.pos_embed, 14, 6, 6)
    assert ours.shape == dinos.shape == (1, 1 + 36, 32) and not torch.allclose(ours, dinos, atol=1e-4)
