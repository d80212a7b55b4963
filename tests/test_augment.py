"""Batched augmentation: behaviour of each op, per-sample keyed randomness, recipes from the configs."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import DictConfig, OmegaConf

from ssl.data import augment
from ssl.data.augment import (
    ViewAugmenter,
    ViewRecipe,
    color_jitter,
    gaussian_blur,
    resized_crop,
    shift_hue,
    solarize,
)
from ssl.data.random import counter_keys, mix64, permutation, uniform
from ssl.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FULL = ViewRecipe(
    size=16,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip_prob=0.5,
    jitter_prob=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    grayscale_prob=0.2,
    blur_prob=0.5,
    solarize_prob=0.2,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second intra-op thread only adds hand-offs, which stall badly on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def augmenter(*views: ViewRecipe, channels: int = 3, seed: int = 0) -> ViewAugmenter:
    """Identity normalisation, so outputs are the augmented images in [0, 1]."""
    return ViewAugmenter(list(views), 1, [0.0] * channels, [1.0] * channels, channels, seed)


def images(batch: int, channels: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, side, side), dtype=torch.uint8, generator=generator)


# --- counter-based random numbers -----------------------------------------------------------------------


def _splitmix_reference(x: int) -> int:
    mask = (1 << 64) - 1
    x &= mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_mix64_matches_unsigned_reference_despite_signed_shifts():
    values = [0, 1, 12345, -1, -(1 << 63), (1 << 63) - 1, -987654321987]
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [_splitmix_reference(v) for v in values]


def test_uniform_is_in_unit_interval_and_well_spread():
    u = uniform(counter_keys(torch.arange(20000), 0, 0), count=2)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(torch.corrcoef(u.T)[0, 1].item()) < 0.03  # draws of a stream are uncorrelated


def test_keys_depend_on_every_counter():
    indices = torch.arange(100)
    base = counter_keys(indices, 1, 2, 3)
    assert len(base.unique()) == 100
    for other in [(0, 2, 3), (1, 0, 3), (1, 2, 0), (1, 2)]:
        assert not torch.isin(counter_keys(indices, *other), base).any()
    assert sorted(permutation(50, 7, 1).tolist()) == list(range(50))


# --- ops ------------------------------------------------------------------------------------------------


def test_resized_crop_of_an_aligned_box_is_the_pixel_slice_and_flip_mirrors_it():
    x = images(2).float() / 255
    boxes = torch.tensor([[4.0, 2.0, 8.0, 8.0], [0.0, 0.0, 16.0, 16.0]])
    out = resized_crop(x, boxes, torch.tensor([False, True]), size=8)
    torch.testing.assert_close(out[0], x[0, :, 2:10, 4:12], atol=1e-5, rtol=0)
    full = resized_crop(x, boxes, torch.tensor([False, False]), size=16)
    flipped = resized_crop(x, boxes, torch.tensor([True, True]), size=16)
    torch.testing.assert_close(full[1], x[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[1], x[1].flip(-1), atol=1e-5, rtol=0)


def test_jitter_identity_factors_change_nothing_in_any_order():
    x = images(64).float() / 255
    jitter = torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(64, 4)
    order = torch.rand(64, 4)
    assert torch.equal(color_jitter(x, jitter, order), x)
    torch.testing.assert_close(shift_hue(x, torch.zeros(64)), x, atol=1e-6, rtol=0)


def test_each_jitter_op_does_what_its_name_says():
    x = images(8).float() / 255
    order = torch.arange(4.0).expand(8, 4)  # brightness, contrast, saturation, hue

    def jitter(b=1.0, c=1.0, s=1.0, h=0.0):
        return color_jitter(x, torch.tensor([b, c, s, h]).expand(8, 4), order)

    torch.testing.assert_close(jitter(b=0.5), x * 0.5)
    gray = jitter(s=0.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    flat = jitter(c=0.0)  # every pixel becomes the image's mean gray
    assert torch.allclose(flat, flat.mean(dim=(1, 2, 3), keepdim=True).expand_as(flat), atol=1e-6)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    torch.testing.assert_close(shift_hue(red, torch.tensor([1 / 3]))[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))


def test_jitter_matches_torchvision_functional_ops_in_the_same_order():
    x = images(4).float() / 255
    b, c, s, h = 1.3, 0.7, 1.5, -0.08
    order = torch.arange(4.0).expand(4, 4)
    ours = color_jitter(x, torch.tensor([b, c, s, h]).expand(4, 4), order)
    ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b), c), s), h)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)  # luma weights differ in the 4th decimal
    reverse = torch.arange(3.0, -1.0, -1.0).expand(4, 4)  # hue, saturation, contrast, brightness
    ours = color_jitter(x, torch.tensor([b, c, s, h]).expand(4, 4), reverse)
    ref = TF.adjust_brightness(TF.adjust_contrast(TF.adjust_saturation(TF.adjust_hue(x, h), s), c), b)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


def test_blur_matches_torchvision_per_sample_and_sigma_zero_is_identity():
    x = images(3, side=20).float() / 255
    sigma = torch.tensor([0.0, 0.7, 1.9])
    out = gaussian_blur(x, sigma, radius=6)
    assert torch.equal(out[0], x[0])
    for i in (1, 2):
        ref = TF.gaussian_blur(x[i : i + 1], kernel_size=[13, 13], sigma=[sigma[i].item()] * 2)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)


def test_solarize_inverts_exactly_the_bright_pixels_of_flagged_samples():
    x = images(2).float() / 255
    out = solarize(x, torch.tensor([True, False]), 0.5)
    bright = x[0] >= 0.5
    assert torch.equal(out[0][bright], 1 - x[0][bright])
    assert torch.equal(out[0][~bright], x[0][~bright])
    assert torch.equal(out[1], x[1])


# --- sampled parameters ---------------------------------------------------------------------------------


def test_flip_only_recipe_flips_about_half_and_flips_exactly():
    aug = augmenter(ViewRecipe(size=16, flip_prob=0.5))
    batch = images(2000)
    flips = aug.sample_params(torch.arange(2000), 0, 0, 16, 16).flip
    assert 0.45 < flips.float().mean().item() < 0.55
    (view,) = aug(batch[:64], torch.arange(64), 0)
    expected = torch.where(flips[:64, None, None, None], batch[:64].flip(-1), batch[:64]).float() / 255
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
def test_crop_boxes_respect_area_and_aspect_ranges(height, width):
    aug = augmenter(ViewRecipe(size=16, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3)))
    x0, y0, w, h = aug.sample_params(torch.arange(4096), 3, 0, height, width).boxes.unbind(1)
    area = w * h / (height * width)
    aspect = w / h
    assert area.min() >= 0.08 - 1e-5 and area.max() <= 1 + 1e-5
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert x0.min() >= 0 and y0.min() >= 0 and (x0 + w).max() <= width + 1e-4 and (y0 + h).max() <= height + 1e-4
    largest = min(width, height * 4 / 3) * min(height, width * 4 / 3) / (height * width)  # widest box that fits
    assert area.min() < 0.1 and area.max() > 0.9 * largest  # the whole range is used
    log_aspect = aspect.log()
    assert log_aspect.min() < math.log(3 / 4) + 0.02 and log_aspect.max() > math.log(4 / 3) - 0.02


def test_grayscale_views_have_equal_channels():
    (view,) = augmenter(ViewRecipe(size=16, grayscale_prob=1.0))(images(8), torch.arange(8), 0)
    assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 1], view[:, 2])


def test_solarize_recipe_at_half_inverts_exactly_the_bright_pixels():
    batch = images(8)
    (view,) = augmenter(ViewRecipe(size=16, solarize_prob=1.0))(batch, torch.arange(8), 0)
    x = batch.float() / 255
    torch.testing.assert_close(view, torch.where(batch >= 128, 1 - x, x), atol=1e-5, rtol=0)


def test_parameters_differ_across_samples_epochs_and_views():
    aug = augmenter(FULL, FULL)
    indices = torch.arange(256)
    params = aug.sample_params(indices, 0, 0, 32, 32)
    assert len(params.boxes.unique(dim=0)) == 256
    assert len(params.jitter_order.unique(dim=0)) == 256
    for epoch, view in [(1, 0), (0, 1)]:
        other = aug.sample_params(indices, epoch, view, 32, 32)
        assert not torch.isclose(other.boxes, params.boxes).all(dim=1).any()


def test_same_seed_same_views_other_seed_other_views():
    batch, indices = images(32), torch.arange(32)
    first = augmenter(FULL, seed=5)(batch, indices, 2)[0]
    assert torch.equal(first, augmenter(FULL, seed=5)(batch, indices, 2)[0])
    assert not torch.allclose(first, augmenter(FULL, seed=6)(batch, indices, 2)[0])


def test_a_sample_gets_the_same_views_alone_and_anywhere_in_any_batch():
    aug = augmenter(FULL, replace(FULL, size=8))
    batch, indices = images(16), torch.arange(100, 116)
    together = aug(batch, indices, 1)
    alone = aug(batch[5:6], indices[5:6], 1)
    shuffled = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    elsewhere = aug(batch[shuffled], indices[shuffled], 1)
    position = (shuffled == 5).nonzero().item()
    for view in range(2):
        torch.testing.assert_close(alone[view][0], together[view][5], atol=1e-5, rtol=0)
        torch.testing.assert_close(elsewhere[view][position], together[view][5], atol=1e-5, rtol=0)


def test_cpu_chunks_change_no_result(monkeypatch):
    aug = augmenter(FULL, replace(FULL, size=8))
    batch, indices = images(20), torch.arange(20)
    whole = aug(batch, indices, 0)
    monkeypatch.setattr(augment, "CPU_CHUNK_VALUES", 3 * 16 * 16 * 6)  # chunks of 6, 6, 6, 2 samples
    for chunked, expected in zip(aug(batch, indices, 0), whole):
        assert chunked.shape == expected.shape and chunked.is_contiguous()
        torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=0)


def test_one_channel_skips_colour_ops_and_keeps_one_channel():
    aug = augmenter(FULL, channels=1)
    params = aug.sample_params(torch.arange(500), 0, 0, 28, 28)
    assert (params.jitter[:, 2] == 1).all() and (params.jitter[:, 3] == 0).all()
    assert not params.grayscale.any()
    assert (params.jitter[:, 0] != 1).any() and (params.blur_sigma > 0).any() and params.solarize.any()
    (view,) = aug(images(8, channels=1, side=28), torch.arange(8), 0)
    assert view.shape == (8, 1, 16, 16)


def test_bad_input_is_refused():
    aug = augmenter(FULL)
    with pytest.raises(ValueError, match="uint8"):
        aug(images(2).float(), torch.arange(2), 0)
    with pytest.raises(ValueError, match="uint8"):
        aug(images(2, channels=1), torch.arange(2), 0)


# --- recipes from configs -------------------------------------------------------------------------------


def compose(data: str, recipe: str, **augment_overrides) -> DictConfig:
    cfg = OmegaConf.create(
        {
            "data": OmegaConf.load(CONFIGS / "data" / f"{data}.yaml"),
            "augment": OmegaConf.load(CONFIGS / "augment" / f"{recipe}.yaml"),
        }
    )
    for key, value in augment_overrides.items():
        cfg.augment[key] = value
    return cfg


@pytest.mark.parametrize("data", ["cifar10", "fmnist", "stl10"])
@pytest.mark.parametrize("recipe", ["byol", "byol_cifar", "multicrop"])
def test_config_recipes_make_normalised_views_at_data_sizes(data, recipe):
    cfg = compose(data, recipe)
    aug = ViewAugmenter.from_config(cfg.augment, cfg.data.mean, cfg.data.std, cfg.data.channels, seed=0)
    side = cfg.data.image_size
    views = aug(images(4, cfg.data.channels, side), torch.arange(4), 0)
    assert aug.num_global_views == 2
    expected = [side, side] + ([cfg.data.local_size] * 6 if recipe == "multicrop" else [])
    assert [v.shape[-1] for v in views] == expected
    for view in views:
        assert view.dtype == torch.float32 and view.is_contiguous() and view.shape[:2] == (4, cfg.data.channels)
        assert torch.isfinite(view).all()

    # The same views with every random op off and the crop the whole image: the images normalised with the data
    # config's statistics, (x / 255 - mean) / std per channel; at the data size pixel for pixel, and at any size
    # for a flat image (resampling keeps it flat).
    aug.views = [replace(view, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                         grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0) for view in aug.views]
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    known = images(4, cfg.data.channels, side, seed=1)
    for view in aug(known, torch.arange(4), 0)[:2]:
        torch.testing.assert_close(view, (known / 255 - mean) / std, rtol=0, atol=1e-4)
    levels = torch.tensor([40, 128, 250][: cfg.data.channels], dtype=torch.uint8).view(1, -1, 1, 1)
    flat = levels.expand(4, -1, side, side).contiguous()
    for view in aug(flat, torch.arange(4), 0):
        torch.testing.assert_close(view, ((levels / 255 - mean) / std).expand_as(view), rtol=0, atol=1e-4)


def test_recipes_match_the_papers():
    byol = ViewAugmenter.from_config(compose("cifar10", "byol").augment, [0] * 3, [1] * 3, 3, 0)
    assert [v.blur_prob for v in byol.views] == [1.0, 0.1]
    assert [v.solarize_prob for v in byol.views] == [0.0, 0.2]
    assert byol.views[0].crop_scale == (0.08, 1.0) and byol.views[0].jitter_prob == 0.8
    small = ViewAugmenter.from_config(compose("cifar10", "byol_cifar").augment, [0] * 3, [1] * 3, 3, 0)
    assert [v.blur_prob for v in small.views] == [0.0, 0.0]
    dino = ViewAugmenter.from_config(compose("stl10", "multicrop", local_crops=3).augment, [0] * 3, [1] * 3, 3, 0)
    assert len(dino.views) == 5 and dino.num_global_views == 2
    assert [v.blur_prob for v in dino.views] == [1.0, 0.1, 0.5, 0.5, 0.5]
    assert dino.views[2].crop_scale == (0.05, 0.4) and dino.views[2].size == 48


def test_bad_recipe_keys_and_values_are_user_errors():
    cfg = compose("cifar10", "byol")
    cfg.augment.base.blur_sigmas = [0.1, 2.0]
    with pytest.raises(UserError, match="blur_sigmas"):
        ViewAugmenter.from_config(cfg.augment, [0] * 3, [1] * 3, 3, 0)
    cfg = compose("cifar10", "byol")
    cfg.augment.base.crop_scale = [0.5, 0.1]
    with pytest.raises(UserError, match="crop_scale"):
        ViewAugmenter.from_config(cfg.augment, [0] * 3, [1] * 3, 3, 0)
    with pytest.raises(UserError, match="data.channels"):
        ViewAugmenter.from_config(compose("cifar10", "byol").augment, [0], [1], 3, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_parameters_and_views():
    aug = augmenter(FULL, FULL)
    batch, indices = images(64), torch.arange(64)
    cpu = aug(batch, indices, 4)
    cuda = aug(batch.cuda(), indices.cuda(), 4)
    on_cpu, on_cuda = aug.sample_params(indices, 4, 1, 16, 16), aug.sample_params(indices.cuda(), 4, 1, 16, 16)
    assert torch.equal(on_cpu.jitter_order, on_cuda.jitter_order.cpu())  # raw uniforms: bit-identical
    torch.testing.assert_close(on_cpu.boxes, on_cuda.boxes.cpu())
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=0)
