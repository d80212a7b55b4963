"""DINOv2's options in ssl.methods.dino (Sinkhorn-Knopp centring, KoLeo, iBOT), checked against their definitions:
Sinkhorn-Knopp's marginals and form, KoLeo and the iBOT loss computed by hand, and the step unchanged when off."""

import datetime
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import ssl.methods.dino as dino
from ssl.errors import UserError
from ssl.methods import build_method
from ssl.methods.dino import (
    DINO,
    backbone_by_resolution,
    dino_loss,
    ibot_loss,
    koleo_loss,
    random_patch_masks,
    sinkhorn_knopp,
    teacher_probabilities,
    updated_center,
)
from ssl.models import build_backbone
from ssl.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4


def tiny_dino(drop_path_rate: float = 0.0, **kwargs) -> DINO:
    torch.manual_seed(0)
    backbone = VisionTransformer(dim=16, depth=2, num_heads=2, patch_size=4, image_size=16,
                                 drop_path_rate=drop_path_rate)
    return DINO(backbone, **{"epochs": 4, "out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 8,
                             "freeze_last_layer": 0, **kwargs})


def multicrop(num_local: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return ([torch.randn(BATCH, 3, 16, 16, generator=generator) for _ in range(2)]
            + [torch.randn(BATCH, 3, 8, 8, generator=generator) for _ in range(num_local)])


# ---- Sinkhorn-Knopp


def teacher_logits(rows: int = 48, prototypes: int = 12, seed: int = 0) -> torch.Tensor:
    # cosine-like logits with a few dominant prototypes, as a teacher's early outputs
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, prototypes, generator=generator).tanh() + torch.linspace(0, 0.5, prototypes)


def test_sinkhorn_targets_have_unit_rows_and_converge_to_uniform_prototype_marginals():
    logits, temperature = teacher_logits(), 0.1
    rows, prototypes = logits.shape
    targets = sinkhorn_knopp(logits, temperature, iterations=3)
    assert targets.dtype == torch.float32 and (targets >= 0).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(rows), rtol=0, atol=1e-6)
    # each prototype carries rows / K of the batch's mass: close after 3 iterations, exact at convergence
    softmax_marginals = torch.softmax(logits / temperature, dim=1).sum(dim=0)
    marginals = targets.sum(dim=0)
    uniform = torch.full((prototypes,), rows / prototypes)
    assert (marginals - uniform).abs().max() < 0.2 * (softmax_marginals - uniform).abs().max()
    converged = sinkhorn_knopp(logits, temperature, iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), uniform, rtol=1e-4, atol=0)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(rows), rtol=0, atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 3, 200])
def test_sinkhorn_only_rescales_rows_and_columns_of_exp_logits_over_temperature(iterations):
    # The algorithm's form: Q = diag(a) exp(S / tau) diag(b), so log Q - S / tau is a sum of a row term and a
    # column term, which double-centring removes entirely (up to float32 rounding of scores ~20, over 2 x 200
    # rescalings; anything else, e.g. a softmax with a center, leaves residuals of order 1).
    logits, temperature = teacher_logits(seed=1).double(), 0.07
    residual = sinkhorn_knopp(logits, temperature, iterations).double().log() - logits / temperature
    residual = residual - residual.mean(dim=0, keepdim=True) - residual.mean(dim=1, keepdim=True) + residual.mean()
    assert residual.abs().max() < 1e-3


def test_sinkhorn_stays_finite_where_exp_of_the_scores_overflows():
    logits = teacher_logits() * 100  # scores up to ~3000 at tau 0.04: exp() overflows float32 past 88, and
    # underflows below -103
    targets = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(targets).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(len(logits)), rtol=0, atol=1e-5)


def two_process_worker(rank: int, init_file: str, logits: torch.Tensor, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        # unequal shares (30 + 18 rows), as the masked patches of two processes
        shard = logits[:30] if rank == 0 else logits[30:]
        results[rank] = (sinkhorn_knopp(shard, 0.1), updated_center(torch.ones(logits.shape[1]), shard, 0.9))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_center_over_two_processes_equal_one_process_with_all_rows(tmp_path):
    logits = teacher_logits()
    with mp.Manager() as manager:
        results = manager.dict()
        # spawn, not fork: forking the test process after other tests started threads (DataLoader, gloo, wandb)
        # can leave a child waiting on a lock no thread will release; CI hung here once
        mp.start_processes(two_process_worker, args=(str(tmp_path / "init"), logits, results), nprocs=2,
                           start_method="spawn")
        (targets_0, center_0), (targets_1, center_1) = results[0], results[1]
    torch.testing.assert_close(torch.cat([targets_0, targets_1]), sinkhorn_knopp(logits, 0.1), rtol=1e-5, atol=1e-7)
    expected_center = 0.9 + 0.1 * logits.mean(dim=0)  # the mean of all 48 rows, not of the two shards' means
    torch.testing.assert_close(center_0, expected_center)
    torch.testing.assert_close(center_1, expected_center)


def test_a_center_without_rows_stays_where_it_is():
    center = torch.randn(12)
    assert torch.equal(updated_center(center, torch.empty(0, 12), 0.9), center)


def test_sinkhorn_centering_spreads_the_targets_and_leaves_the_center_alone():
    method = tiny_dino(centering="sinkhorn")
    output = method(multicrop(), epoch=0)
    assert torch.equal(method.center, torch.zeros(32))
    # 2 x 4 samples: at most ln 8 of batch entropy if each picks one prototype; Sinkhorn spreads them evenly
    assert output.logs["teacher_batch_entropy"] > 0.9 * math.log(32)


# ---- KoLeo


def test_koleo_of_three_points_on_a_circle_equals_the_hand_computed_value():
    # Unit vectors at 0, 60 and 180 degrees (given at other lengths: KoLeo normalises them). Nearest neighbours:
    # 0 -> 60 and 60 -> 0 at chord 2 sin(30 deg) = 1, 180 -> 60 at 2 sin(60 deg) = sqrt(3).
    # KoLeo = -(ln 1 + ln 1 + ln sqrt(3)) / 3 = -ln(3) / 6.
    angles = torch.tensor([0.0, 60.0, 180.0]).deg2rad()
    points = torch.stack((angles.cos(), angles.sin()), dim=1) * torch.tensor([[5.0], [0.2], [1.0]])
    assert koleo_loss(points).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(16, 8, generator=generator).requires_grad_()
    koleo_loss(points).backward()
    with torch.no_grad():
        def nearest_distances(x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.normalize(x, dim=1)
            distances = torch.cdist(x, x) + torch.eye(len(x)) * 10
            return distances.min(dim=1).values

        moved = points - 0.01 * points.grad
        assert nearest_distances(moved).log().mean() > nearest_distances(points).log().mean()


def test_koleo_adds_its_weight_times_the_sum_over_the_two_global_views():
    views = multicrop()
    plain, regularised = tiny_dino(), tiny_dino(koleo_weight=0.1)
    with torch.no_grad():
        features = backbone_by_resolution(plain.student.backbone, views[:2])
    output = regularised(views, epoch=0)
    expected_koleo = koleo_loss(features[0]) + koleo_loss(features[1])
    torch.testing.assert_close(output.logs["koleo_loss"], expected_koleo)
    torch.testing.assert_close(output.logs["dino_loss"], plain(views, epoch=0).loss.detach())
    torch.testing.assert_close(output.loss, output.logs["dino_loss"] + 0.1 * expected_koleo)


def test_koleo_with_one_image_per_process_is_a_user_error():
    with pytest.raises(UserError, match="KoLeo needs at least 2 images"):
        tiny_dino(koleo_weight=0.1)([view[:1] for view in multicrop()], epoch=0)


# ---- iBOT


def cross_entropy(target: list[float], logits: list[float], temperature: float) -> float:
    scaled = [value / temperature for value in logits]
    log_norm = max(scaled) + math.log(sum(math.exp(value - max(scaled)) for value in scaled))
    return -sum(p * (value - log_norm) for p, value in zip(target, scaled))


def test_ibot_loss_equals_a_hand_computation_and_is_zero_without_masks():
    # Three images of 4 patches: image 0 masks patches 1 and 2, image 1 none, image 2 patch 3. Per image, the mean
    # cross-entropy over its masked patches; then the mean over the 3 images (image 1 adds 0).
    masks = torch.tensor([[False, True, True, False], [False] * 4, [False, False, False, True]])
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(3, 5, generator=generator, dtype=torch.float64), dim=1)
    terms = [cross_entropy(t, s, 0.1) for t, s in zip(teacher.tolist(), student.tolist())]
    expected = ((terms[0] + terms[1]) / 2 + 0 + terms[2]) / 3
    assert ibot_loss(student, teacher, masks, 0.1).item() == pytest.approx(expected, rel=1e-6)

    nothing = torch.zeros(3, 4, dtype=torch.bool)
    assert ibot_loss(student[:0], teacher[:0], nothing, 0.1).item() == 0.0


def test_the_mask_token_replaces_exactly_the_masked_patch_embeddings():
    torch.manual_seed(0)
    vit = VisionTransformer(dim=16, depth=1, num_heads=2, patch_size=4, image_size=16)
    images = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 5] = True
    with torch.no_grad():
        plain = vit.tokens(images)[0]
        own_embedding = vit.patch_embed(images[:1]).flatten(2)[0, :, 5]
        assert torch.equal(vit.tokens(images, masks, own_embedding)[0][0], plain[0])
        masked = vit.tokens(images, masks, torch.zeros(16))[0]
    assert not torch.equal(masked[0], plain[0]) and torch.equal(masked[1], plain[1])


@pytest.mark.parametrize("masking", ["block", "patch"])
def test_masks_follow_dinov2s_share_of_images_and_range_of_ratios(masking):
    torch.manual_seed(0)
    masks = random_patch_masks(64, 8, 8, probability=0.5, ratio_range=(0.1, 0.5), masking=masking)
    counts = masks.sum(dim=1)
    assert masks.shape == (64, 64) and masks.dtype == torch.bool
    assert (counts > 0).sum() == 32
    # the i-th smallest of the 32 masks has int(64 f) patches, f drawn from the i-th of 32 equal slices of [0.1, 0.5]
    edges = torch.linspace(0.1, 0.5, 33) * 64
    assert ((masked := counts[counts > 0].sort().values) >= edges[:-1].floor()).all()
    assert (masked <= edges[1:].floor()).all()


def test_block_masks_are_contiguous_where_patch_masks_are_scattered():
    torch.manual_seed(0)

    def masked_neighbour_share(masks: torch.Tensor) -> float:
        grid = masks.view(-1, 8, 8).float()
        right = (grid[:, :, 1:] * grid[:, :, :-1]).sum()
        down = (grid[:, 1:, :] * grid[:, :-1, :]).sum()
        return ((right + down) / grid.sum()).item()

    block = random_patch_masks(256, 8, 8, 1.0, (0.1, 0.5), "block")
    patch = random_patch_masks(256, 8, 8, 1.0, (0.1, 0.5), "patch")
    assert masked_neighbour_share(block) > masked_neighbour_share(patch) + 0.5


@pytest.mark.parametrize("separate_head", [False, True])
def test_ibot_term_matches_a_direct_computation_on_fixed_masks(monkeypatch, separate_head):
    masks = torch.zeros(2 * BATCH, 16, dtype=torch.bool)
    masks[0, [0, 5, 6]] = True
    masks[3, 15] = True
    masks[6, [2, 3]] = True
    monkeypatch.setattr(dino, "random_patch_masks", lambda *args: masks)
    method = tiny_dino(ibot_weight=0.5, ibot_separate_head=separate_head)
    with torch.no_grad():
        method.mask_token.normal_()
        method.patch_center.normal_()
    views = multicrop()
    center_before = method.patch_center.clone()
    output = method(views, epoch=0)

    globals_ = torch.cat(views[:2])
    student_head = method.student.ibot_head if separate_head else method.student.head
    teacher_head = method.teacher.ibot_head if separate_head else method.teacher.head
    with torch.no_grad():
        student_tokens = method.student.backbone.tokens(globals_, masks, method.mask_token)[0][:, 1:]
        teacher_tokens = method.teacher.backbone.tokens(globals_)[0][:, 1:]
        per_image, teacher_rows = [], []
        for image in range(len(masks)):
            patches = masks[image].nonzero().flatten().tolist()
            terms = []
            for patch in patches:
                teacher_row = teacher_head(teacher_tokens[image, patch][None])[0]
                teacher_rows.append(teacher_row)
                target = torch.softmax((teacher_row - center_before) / 0.04, dim=0)
                student_row = student_head(student_tokens[image, patch][None])[0]
                terms.append(cross_entropy(target.tolist(), student_row.tolist(), 0.1))
            per_image.append(sum(terms) / len(terms) if terms else 0.0)
    expected = sum(per_image) / len(per_image)
    assert output.logs["ibot_loss"].item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(output.loss, output.logs["dino_loss"] + 0.5 * output.logs["ibot_loss"])
    # the patch targets' own center moves towards the masked teacher patches' mean, as the CLS center does
    torch.testing.assert_close(method.patch_center, 0.9 * center_before + 0.1 * torch.stack(teacher_rows).mean(0),
                               rtol=1e-5, atol=1e-6)


def test_ibot_trains_the_mask_token_and_never_the_teacher():
    method = tiny_dino(ibot_weight=1.0, koleo_weight=0.1, centering="sinkhorn")
    output = method(multicrop(), epoch=0)
    output.loss.backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    assert all(param.grad is None for param in method.teacher.parameters())
    assert {"dino_loss", "koleo_loss", "ibot_loss"} <= output.logs.keys()
    assert "mask_token" not in dict(method.student.backbone.named_parameters())


def test_ibot_on_a_resnet_and_unknown_options_are_user_errors():
    resnet = build_backbone("resnet18", in_channels=1)
    with pytest.raises(UserError, match="needs a ViT backbone"):
        DINO(resnet, epochs=1, ibot_weight=1.0)
    for bad, message in (({"centering": "median"}, "unknown method.kwargs.centering='median'"),
                         ({"koleo_weight": -1.0}, "koleo_weight (-1.0) and ibot_weight (0.0) must be >= 0"),
                         ({"ibot_weight": 1.0, "ibot_masking": "grid"}, "(got 'grid')"),
                         ({"ibot_weight": 1.0, "ibot_mask_ratio": (0.6, 0.2)}, "(got [0.6, 0.2])"),
                         ({"ibot_weight": 1.0, "ibot_mask_probability": 0}, "ibot_mask_probability <= 1 (got 0)")):
        with pytest.raises(UserError, match=re.escape(message)):
            tiny_dino(**bad)


# ---- off: today's step, bit for bit


def todays_step(method: DINO, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
    """DINO's step as it was before the options, composed from the module's pieces in the same order."""
    student_features = backbone_by_resolution(method.student.backbone, views)
    student_logits = method.student.head(torch.cat(student_features)).chunk(len(views))
    with torch.no_grad():
        teacher_logits = method.teacher.head(method.teacher.backbone(torch.cat(views[:2])))
        probs = teacher_probabilities(teacher_logits, method.center, method.teacher_temps[epoch])
    loss = dino_loss(student_logits, probs.chunk(2), method.student_temp)
    method.center.copy_(updated_center(method.center, teacher_logits, method.center_momentum))
    return loss


@pytest.mark.parametrize("use_bn_in_head", [False, True])
def test_options_off_leave_the_step_bit_identical(use_bn_in_head):
    views = multicrop()
    results = []
    for build, step in ((lambda: tiny_dino(0.1, use_bn_in_head=use_bn_in_head), todays_step),
                        (lambda: tiny_dino(0.1, use_bn_in_head=use_bn_in_head, centering="mean", koleo_weight=0.0,
                                           ibot_weight=0.0), lambda m, v, e: m(v, e).loss)):
        method = build()
        torch.manual_seed(5)  # drop path draws from the default generator
        loss = step(method, views, 1)
        loss.backward()
        results.append((loss, method.center.clone(), [p.grad for p in method.student.parameters() if p.requires_grad]))
    (loss_a, center_a, grads_a), (loss_b, center_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(center_a, center_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert "mask_token" not in dict(tiny_dino().named_parameters())


def test_dino2_cifar_vit_builds_with_all_three_options_and_takes_a_step():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("pretrain", overrides=["+experiment=dino2_cifar_vit", "method.kwargs.out_dim=256",
                                              "augment.local_crops=2"])
    kwargs = OmegaConf.to_container(cfg.method.kwargs, resolve=True)
    assert (kwargs["centering"], kwargs["koleo_weight"], kwargs["ibot_weight"]) == ("sinkhorn", 0.1, 1.0)
    torch.manual_seed(0)
    backbone = build_backbone(cfg.backbone.name, **OmegaConf.to_container(cfg.backbone.kwargs, resolve=True))
    method = build_method(cfg.method.name, backbone, epochs=cfg.trainer.epochs, **kwargs)
    views = ([torch.randn(BATCH, 3, 32, 32) for _ in range(2)]
             + [torch.randn(BATCH, 3, 16, 16) for _ in range(cfg.augment.local_crops)])
    output = method(views, epoch=0)
    output.loss.backward()
    assert torch.isfinite(output.loss) and {"koleo_loss", "ibot_loss"} <= output.logs.keys()
    assert method.mask_token.grad is not None
