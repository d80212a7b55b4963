"""Swapping a recipe's network: `+experiment=X backbone=Y` replaces the recipe's network whole and trains, for every
experiment X and backbone config Y whose sizes fit; the pairs that cannot fit stop with one line naming the setting
to change. And the one-line errors about arguments a backbone or a method does not take."""

import re
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

import ssl.train
from ssl.data.datasets import ImageDataset
from ssl.errors import UserError
from ssl.methods import build_method
from ssl.models import backbones, build_backbone
from ssl.models.vit import VisionTransformer
from tests.fixtures import run_module, write_fmnist

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(path.stem for path in (CONFIGS / "experiment").glob("*.yaml"))
BACKBONE_CONFIGS = sorted(path.stem for path in (CONFIGS / "backbone").glob("*.yaml"))
# 28 px Fashion-MNIST has no 16 px patches; its divisors from 2 to 28 / 2 are 2, 4, 7 and 14.
FMNIST_VIT_16 = ("ViT patch_size 16 does not divide image_size 28: set backbone.kwargs.patch_size to one of "
                 "2, 4, 7, 14 (4 for 32 px, 16 for 224 px)")
REFUSED = {(experiment, vit): FMNIST_VIT_16 for experiment in ("byol_fmnist", "dino_fmnist")
           for vit in ("vit_tiny", "vit_small")}
# dino2_cifar_vit's iBOT loss needs patch tokens: ResNets are refused in one line (ssl/methods/dino.py)
IBOT_NEEDS_A_VIT = ("iBOT's masked-patch loss needs a ViT backbone (patch tokens), not ResNetBackbone; set "
                    "method.kwargs.ibot_weight=0 or use a ViT backbone")
REFUSED.update({("dino2_cifar_vit", resnet): IBOT_NEEDS_A_VIT
                for resnet in ("resnet18", "resnet18_cifar", "resnet18_fmnist", "resnet50")})
# Narrow networks and heads keep a step cheap. Whether a recipe's images, views and network fit is decided by the
# ResNet stems and the ViT patch and image sizes, which stay the configs' own.
SMALL_HEADS = {"proj_hidden_dim": 16, "proj_output_dim": 8, "pred_hidden_dim": 16, "out_dim": 16, "hidden_dim": 16,
               "bottleneck_dim": 8}
SMALL_RESNET_WIDTH = 4
SMALL_VIT = partial(VisionTransformer, dim=8, depth=1, num_heads=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On tensors this small, a second thread on a shared 2-core machine costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def swapped_recipe(experiment: str) -> DictConfig:
    """`+experiment=EXPERIMENT backbone=vit_tiny` as Hydra composes it."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("pretrain", overrides=[f"+experiment={experiment}", "backbone=vit_tiny", "device=cpu",
                                              "logger=none", "data.batch_size=2"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_backbone_override_replaces_the_recipes_network_whole(experiment):
    # vit_tiny's kwargs differ from every recipe's network (ResNet stem and width; patch 4, drop path 0.1): any
    # backbone setting an experiment makes itself would show here, following the swap
    chosen = OmegaConf.load(CONFIGS / "backbone" / "vit_tiny.yaml")
    assert OmegaConf.to_container(swapped_recipe(experiment).backbone) == OmegaConf.to_container(chosen)


def random_dataset(data_cfg: DictConfig, split: str) -> ImageDataset:
    """Two random images at the data config's size and channels, in place of reading the data set."""
    shape = (2, data_cfg.channels, data_cfg.image_size, data_cfg.image_size)
    classes = data_cfg.num_classes or 10
    return ImageDataset(torch.randint(0, 256, shape, dtype=torch.uint8), torch.tensor([0, 1]), classes,
                        data_cfg.name, [str(label) for label in range(classes)])


def built_on_meta(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """torchvision's full-width ResNet without initialising it: at a width other than 64, ResNetBackbone rebuilds
    every layer that holds weights (`_narrow`), so the full-width initialisation is only time."""
    def build_on_meta(**kwargs) -> nn.Module:
        with torch.device("meta"):
            return build(**kwargs)

    return build_on_meta


@pytest.mark.parametrize("backbone", BACKBONE_CONFIGS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_trains_a_step_with_every_network_that_fits(experiment, backbone, monkeypatch):
    # the recipe as `backbone=BACKBONE` composes it: the backbone config whole (the test above shows that Hydra
    # replaces the recipe's network whole), everything else the recipe's
    cfg = swapped_recipe(experiment).copy()
    chosen = OmegaConf.load(CONFIGS / "backbone" / f"{backbone}.yaml")
    cfg.backbone = chosen.copy()
    for key in SMALL_HEADS.keys() & cfg.method.kwargs.keys():
        cfg.method.kwargs[key] = SMALL_HEADS[key]
    if "width" in cfg.backbone.kwargs:
        cfg.backbone.kwargs.width = SMALL_RESNET_WIDTH
    for name in ("vit_tiny", "vit_small"):
        monkeypatch.setitem(backbones.BACKBONES, name, SMALL_VIT)
    for name in ("resnet18", "resnet50"):
        monkeypatch.setattr(torchvision.models, name, built_on_meta(getattr(torchvision.models, name)))
    monkeypatch.setattr(ssl.train, "build_dataset", random_dataset)

    if (experiment, backbone) in REFUSED:
        with pytest.raises(UserError, match=f"^{re.escape(REFUSED[experiment, backbone])}$"):
            ssl.train.build_pretraining(cfg, torch.device("cpu"))
        return
    run = ssl.train.build_pretraining(cfg, torch.device("cpu"))
    assert run.method.student.backbone.spec == {
        "name": chosen.name, "kwargs": {"in_channels": cfg.data.channels, **OmegaConf.to_container(
            cfg.backbone.kwargs, resolve=True)}}
    run.method.train()
    images, labels, indices = next(iter(run.loader.epoch(0)))
    values, _ = ssl.train.train_step(run, run.model, images, labels, indices, epoch=0, step=0)
    assert torch.isfinite(values["loss"]) and torch.isfinite(values["probe_loss"])


def test_the_issues_command_stops_in_one_line_naming_the_patch_size(tmp_path, capsys):
    root = write_fmnist(tmp_path / "data", train=8, test=8)
    status = run_module("ssl.pretrain", "+experiment=byol_fmnist", "backbone=vit_tiny", "device=cpu", "logger=none",
                        f"data.root={root}", "data.batch_size=4", f"run_dir={tmp_path / 'run'}")
    assert status == 2
    assert capsys.readouterr().err == f"error: {FMNIST_VIT_16}\n"


def test_a_backbone_names_exactly_the_arguments_it_refuses():
    expected = ("backbone 'vit_tiny' does not take stem, width; backbone.kwargs may set drop_path_rate, image_size, "
                "in_channels, patch_size")
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        build_backbone("vit_tiny", patch_size=4, image_size=28, in_channels=1, drop_path_rate=0.0, stem="stride2",
                       width=32)
    # what the name fixes (depth, the ViT width) is no argument either
    with pytest.raises(UserError, match=r"^backbone 'vit_small' does not take depth, dim; "):
        build_backbone("vit_small", dim=12, depth=1)


def test_a_misspelt_argument_gets_the_close_name():
    expected = ("backbone 'resnet18' does not take in_chanels (did you mean in_channels?), widht (did you mean width?);"
                " backbone.kwargs may set in_channels, stem, width")
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        build_backbone("resnet18", widht=32, in_chanels=1)


def test_a_method_names_exactly_the_arguments_it_refuses():
    backbone = build_backbone("resnet18", width=SMALL_RESNET_WIDTH)
    expected = ("method 'byol' does not take out_dim, proj_hiden_dim (did you mean proj_hidden_dim?); method.kwargs "
                "may set pred_hidden_dim, proj_hidden_dim, proj_output_dim")
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        build_method("byol", backbone, epochs=1, proj_hiden_dim=16, proj_output_dim=8, out_dim=16)
    # DINO's epochs come from trainer.epochs, so method.kwargs does not list them
    with pytest.raises(UserError, match=r"^method 'dino' does not take out_dims \(did you mean out_dim\?\); "
                                        r"method.kwargs may set bottleneck_dim, center_momentum, centering, "
                                        r"clip_grad, "):
        build_method("dino", backbone, epochs=1, out_dims=16)
