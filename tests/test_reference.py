"""Where this code must match the reference implementations (facebookresearch/dino main_dino.py and utils.py,
solo-learn's methods/base.py, utils/lr_scheduler.py and utils/momentum.py, deepmind-research byol/utils/schedules.py):
each expectation here is written from the papers' formulas and those sources' documented behaviour, independently
of the code under test."""

import copy
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from ssl.methods import build_method
from ssl.models import build_backbone
from ssl.models.backbones import BACKBONES
from ssl.models.formats import torchvision_state_dict
from ssl.models.vit import VisionTransformer
from ssl.optim import cosine_schedule
from ssl.train import base_learning_rate, build_pretraining, step_schedules, train_step
from tests.fixtures import write_fmnist

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


def test_solo_learn_recipes_build_solo_learns_cifar_resnet():
    names = ("byol_cifar", "byol_cifar100", "dino_cifar")
    backbones = [OmegaConf.to_container(recipe(name).backbone) for name in names]
    assert backbones[0] == backbones[1] == backbones[2]  # one backbone, built once here
    torch.manual_seed(0)
    ours = build_backbone(backbones[0]["name"], in_channels=3, **backbones[0]["kwargs"]).eval()
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


# ------------------------------------------------------------------------------------------ one training step
# Our loop's step (ssl.train.train_step on a run built from a recipe) against one iteration of the reference, written
# here from its documented behaviour: the same weights and views in, then loss, gradients, optimiser step, EMA and
# (DINO) centre compared tensor by tensor. The backbones are run as given modules (their architecture is checked
# elsewhere: against torchvision and timm); heads, loss, clipping, optimiser, EMA and schedules are re-implemented.
BATCH, STEPS_PER_EPOCH, EPOCHS = 4, 4, 3


def our_step(tmp_path: Path, name: str, overrides: list[str], views: list[torch.Tensor], epoch: int, step: int):
    """The run `name` builds, its method as it was before the step, and what train_step returned, after one
    `train_step` at (`epoch`, `step`) on `views` (the augmentation is replaced by the given views)."""
    root = write_fmnist(tmp_path / "data", train=BATCH * STEPS_PER_EPOCH, test=8)
    cfg = recipe(name, f"data.root={root}", f"data.batch_size={BATCH}", f"trainer.epochs={EPOCHS}",
                 "trainer.warmup_epochs=1", "device=cpu", "logger=none", *overrides)
    run = build_pretraining(cfg, torch.device("cpu"))
    assert run.steps_per_epoch == STEPS_PER_EPOCH
    run.augmenter = lambda images, indices, epoch: views
    run.ema.step = step
    before = copy.deepcopy(run.method)
    torch.manual_seed(1)  # the student's stochastic depth draws from here, in the reference too
    values, tau = train_step(run, run.model, None, torch.zeros(BATCH, dtype=torch.long), None, epoch, step)
    return cfg, run, before, values, tau


def leaf_copies(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone().requires_grad_(tensor.requires_grad) for name, tensor in named.items()}


def under(named: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): tensor for name, tensor in named.items() if name.startswith(prefix)}


def dino_head(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """DINO's DINOHead without BatchNorm: 3-layer GELU MLP, L2 normalisation, weight-normalised prototypes
    (weight = g v / |v| row by row)."""
    x = F.gelu(F.linear(x, p["mlp.0.weight"], p["mlp.0.bias"]))
    x = F.gelu(F.linear(x, p["mlp.2.weight"], p["mlp.2.bias"]))
    x = F.normalize(F.linear(x, p["mlp.4.weight"], p["mlp.4.bias"]), dim=-1, p=2)
    g, v = p["last_layer.parametrizations.weight.original0"], p["last_layer.parametrizations.weight.original1"]
    return F.linear(x, g * v / v.norm(dim=1, keepdim=True))


def reference_dino_step(cfg, before, views: list[torch.Tensor], epoch: int, step: int) -> dict:
    """One iteration of main_dino.py's train_one_epoch: lr and wd from their schedules (wd on weights only: not on
    biases or 1-d tensors), the teacher (built with drop path 0) and the student through the multi-crop wrapper
    (same-size crops concatenated), DINOLoss (centre and sharpen the teacher, cross-entropy over every pair of
    teacher global view and other student view, centre updated after), backward, clip each gradient to norm
    clip_grad, cancel the last layer's gradients during the first freeze_last_layer epochs, AdamW, EMA of the
    parameters with the momentum schedule."""
    kw, total = cfg.method.kwargs, EPOCHS * STEPS_PER_EPOCH
    lr = dino_schedule(2e-3 * BATCH / 256, 1e-6, total, STEPS_PER_EPOCH)[step]  # dino_fmnist's lr x bs/256, min_lr
    wd = dino_schedule(0.04, 0.4, total)[step]
    momentum = dino_schedule(cfg.method.ema.base, 1.0, total)[step]
    temps = torch.linspace(kw.warmup_teacher_temp, kw.teacher_temp, kw.warmup_teacher_temp_epochs).tolist()
    temperature = (temps + [kw.teacher_temp] * EPOCHS)[epoch]

    params = leaf_copies(dict(before.student.named_parameters()))
    backbone = copy.deepcopy(before.student.backbone)
    kwargs = OmegaConf.to_container(cfg.backbone.kwargs, resolve=True)
    if "drop_path_rate" in kwargs:  # the ViT teacher is built without stochastic depth
        kwargs["drop_path_rate"] = 0.0
    teacher = build_backbone(cfg.backbone.name, in_channels=1, **kwargs)
    teacher.load_state_dict(before.teacher.backbone.state_dict())
    teacher_head = dict(before.teacher.head.named_parameters())

    torch.manual_seed(1)
    features = [functional_call(backbone, under(params, "backbone."), (torch.cat(group),))
                for group in (views[:2], views[2:])]
    student_out = dino_head(under(params, "head."), torch.cat(features)) / kw.student_temp
    with torch.no_grad():
        teacher_out = dino_head(teacher_head, teacher.train()(torch.cat(views[:2])))
    targets = F.softmax((teacher_out - before.center) / temperature, dim=-1).chunk(2)
    log_probs = F.log_softmax(student_out, dim=-1).chunk(len(views))
    terms = [(-targets[t] * log_probs[v]).sum(dim=-1).mean() for t in range(2) for v in range(len(views)) if v != t]
    loss = sum(terms) / len(terms)
    loss.backward()

    grads = {}
    for name, param in params.items():
        if param.grad is None or (epoch < kw.freeze_last_layer and "last_layer" in name):
            continue
        grads[name] = param.grad * min(1.0, kw.clip_grad / (param.grad.norm().item() + 1e-6))
    student = {}
    for name, param in params.items():
        grad = grads.get(name)
        if grad is None:  # AdamW skips parameters without a gradient
            student[name] = param.detach()
            continue
        decay = 0.0 if name.endswith(".bias") or param.ndim == 1 else wd
        # AdamW's first step from zero moments: m_hat = g, v_hat = g^2
        student[name] = param.detach() * (1 - lr * decay) - lr * grad / (grad.abs() + 1e-8)
    teacher_params = {name: momentum * t + (1 - momentum) * student[name]
                      for name, t in before.teacher.named_parameters()}
    center = 0.9 * before.center + 0.1 * teacher_out.mean(dim=0)
    return {"loss": loss.detach(), "grads": grads, "student": student, "teacher": teacher_params, "center": center,
            "momentum": momentum, "student_buffers": dict(backbone.named_buffers()),
            "teacher_buffers": dict(teacher.named_buffers())}


# A ViT (stochastic depth in the student; ViT-Tiny shrunk to 2 blocks 48 wide, as the backbone is run as given)
# after the warm-ups, prototypes trained; a quarter-width ResNet-18 (BatchNorm over each resolution's crops) in the
# warm-ups, prototypes frozen.
DINO_BACKBONES = {"vit": ["backbone=vit_tiny", "backbone.kwargs.patch_size=7", "backbone.kwargs.drop_path_rate=0.1"],
                  "resnet": ["backbone.kwargs.width=16", "backbone.kwargs.stem=stride2"]}


@pytest.mark.parametrize("arch, epoch, step", [("vit", 1, 6), ("resnet", 0, 2)])
def test_one_dino_step_equals_main_dino(tmp_path, monkeypatch, arch, epoch, step):
    monkeypatch.setitem(BACKBONES, "vit_tiny", partial(VisionTransformer, dim=48, depth=2, num_heads=3))
    overrides = [*DINO_BACKBONES[arch], "augment.local_crops=2", "method.kwargs.out_dim=64",
                 "method.kwargs.hidden_dim=32", "method.kwargs.bottleneck_dim=16", "method.kwargs.use_bn_in_head=false",
                 "method.kwargs.norm_last_layer=false", "method.kwargs.freeze_last_layer=1",
                 "method.kwargs.clip_grad=0.05", "method.kwargs.teacher_temp=0.07",
                 "method.kwargs.warmup_teacher_temp_epochs=2"]
    generator = torch.Generator().manual_seed(step)
    views = [torch.randn(BATCH, 1, size, size, generator=generator) for size in (28, 28, 12, 12)]
    cfg, run, before, values, tau = our_step(tmp_path, "dino_fmnist", overrides, views, epoch, step)
    expected = reference_dino_step(cfg, before, views, epoch, step)

    torch.testing.assert_close(values["loss"], expected["loss"])
    assert tau == pytest.approx(expected["momentum"], rel=1e-12)
    student = dict(run.method.student.named_parameters())
    assert {name for name, param in student.items() if param.grad is not None} == set(expected["grads"])
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(student[name].grad, grad, msg=name)
    for name, param in student.items():
        torch.testing.assert_close(param.detach(), expected["student"][name], msg=name)
    for name, param in run.method.teacher.named_parameters():
        torch.testing.assert_close(param, expected["teacher"][name], msg=name)
    torch.testing.assert_close(run.method.center, expected["center"])
    for network in ("student", "teacher"):  # BatchNorm statistics (the ResNet's), moved by the forward passes
        buffers = dict(getattr(run.method, network).backbone.named_buffers())
        assert buffers.keys() == expected[f"{network}_buffers"].keys()
        for name, buffer in expected[f"{network}_buffers"].items():
            torch.testing.assert_close(buffers[name], buffer, msg=name)


def byol_mlp(p: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """BYOL's projector / predictor: Linear, BatchNorm on the batch's statistics (its running ones updated in
    `buffers`), ReLU, Linear."""
    x = F.linear(x, p["0.weight"], p["0.bias"])
    x = F.batch_norm(x, buffers["1.running_mean"], buffers["1.running_var"], p["1.weight"], p["1.bias"], training=True)
    return F.linear(F.relu(x), p["3.weight"], p["3.bias"])


def running_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers() if not name.endswith("num_batches_tracked")}


def reference_byol_step(cfg, before, views: list[torch.Tensor], step: int) -> dict:
    """One step of solo-learn's BYOL (methods/byol.py, methods/base.py, utils/lars.py, utils/momentum.py): each view
    through the online network and the momentum network separately (per-view BatchNorm, both in training mode),
    loss = sum over the two orderings of the batch mean of 2 - 2 cos(prediction, target), backward, LARS (trust
    eta |p| / (|g| + wd |p| + 1e-8), divided by the lr and clipped at 1, applied to g + wd p; 1-d tensors
    excluded from both) with momentum 0.9 (first step: buffer = update), then the momentum networks' parameters
    move by tau from deepmind's / solo-learn's cosine over all steps. The lr follows the warm-up cosine with
    warmup_start_lr 0 (solo-learn's default is 3e-5: the README's stated difference)."""
    total = EPOCHS * STEPS_PER_EPOCH
    lr = dino_schedule(1.0 * BATCH / 256, 0.0, total, STEPS_PER_EPOCH)[step]  # byol_fmnist: LARS lr 1.0 x bs/256
    wd, eta = 1e-5, 0.02
    tau = 1 - (1 - cfg.method.ema.base) * (1 + math.cos(math.pi * step / total)) / 2

    online = copy.deepcopy(before.student)
    # the heads' running statistics (their batch counters do not matter: BatchNorm's momentum is set)
    predictor_buffers = running_statistics(before.predictor)
    projector_buffers = running_statistics(online.projector)
    params = leaf_copies({**dict(online.named_parameters()),
                          **{f"predictor.{n}": p for n, p in before.predictor.named_parameters()}})
    target = copy.deepcopy(before.teacher)
    target_buffers = running_statistics(target.projector)

    def predict(view: torch.Tensor) -> torch.Tensor:
        features = functional_call(online.backbone, under(params, "backbone."), (view,))
        projection = byol_mlp(under(params, "projector."), projector_buffers, features)
        return byol_mlp(under(params, "predictor."), predictor_buffers, projection)

    predictions = [predict(view) for view in views]
    with torch.no_grad():
        targets = [byol_mlp(dict(target.projector.named_parameters()), target_buffers, target.backbone(view))
                   for view in views]
    loss = sum((2 - 2 * F.cosine_similarity(predictions[i], targets[j], dim=-1)).mean() for i, j in ((0, 1), (1, 0)))
    loss.backward()

    student = {}
    for name, param in params.items():
        grad, update = param.grad, param.grad
        p_norm, g_norm = param.detach().norm(), grad.norm()
        if param.ndim != 1 and p_norm > 0 and g_norm > 0:
            trust = min(eta * p_norm / (g_norm + p_norm * wd + 1e-8) / lr, 1.0)
            update = (grad + wd * param.detach()) * trust
        student[name] = param.detach() - lr * update
    teacher = {name: tau * t + (1 - tau) * student[name] for name, t in before.teacher.named_parameters()}
    buffers = {**{f"backbone.{n}": b for n, b in online.backbone.named_buffers()},
               **{f"projector.{n}": b for n, b in projector_buffers.items()},
               **{f"predictor.{n}": b for n, b in predictor_buffers.items()}}
    teacher_buffers = {**{f"backbone.{n}": b for n, b in target.backbone.named_buffers()},
                       **{f"projector.{n}": b for n, b in target_buffers.items()}}
    return {"loss": loss.detach(), "grads": {name: param.grad for name, param in params.items()}, "tau": tau,
            "student": student, "teacher": teacher, "buffers": buffers, "teacher_buffers": teacher_buffers}


def test_one_byol_step_equals_solo_learns(tmp_path):
    overrides = ["backbone.kwargs.width=16", "method.kwargs.proj_hidden_dim=32", "method.kwargs.proj_output_dim=16",
                 "method.kwargs.pred_hidden_dim=32"]
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(BATCH, 1, 28, 28, generator=generator) for _ in range(2)]
    step = 6  # after the warm-up: LARS's clipped trust ratio is below 1 for some weights, 1 for others
    cfg, run, before, values, tau = our_step(tmp_path, "byol_fmnist", overrides, views, step // STEPS_PER_EPOCH, step)
    expected = reference_byol_step(cfg, before, views, step)

    torch.testing.assert_close(values["loss"], expected["loss"])
    assert tau == pytest.approx(expected["tau"], rel=1e-12)
    student = {**dict(run.method.student.named_parameters()),
               **{f"predictor.{n}": p for n, p in run.method.predictor.named_parameters()}}
    assert student.keys() == expected["student"].keys()
    for name, param in student.items():
        torch.testing.assert_close(param.grad, expected["grads"][name], msg=name)
        torch.testing.assert_close(param.detach(), expected["student"][name], msg=name)
    for name, param in run.method.teacher.named_parameters():
        torch.testing.assert_close(param, expected["teacher"][name], msg=name)
    buffers = {**dict(run.method.student.named_buffers()),
               **{f"predictor.{n}": b for n, b in run.method.predictor.named_buffers()}}
    for name, buffer in expected["buffers"].items():
        torch.testing.assert_close(buffers[name], buffer, msg=name)
    teacher_buffers = dict(run.method.teacher.named_buffers())
    for name, buffer in expected["teacher_buffers"].items():
        torch.testing.assert_close(teacher_buffers[name], buffer, msg=name)
