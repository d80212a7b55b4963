"""Image folders: views cut from the whole image with torchvision's crop statistics, keyed like resident data,
antialiased, from every kind of file ImageNet holds; evaluation views; the GPU path's resampling."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ssl.data import BatchLoader, ViewRecipe
from ssl.data.augment import crop_boxes
from ssl.data.folder import FolderDataset, cut_views, eval_view, read_header
from ssl.data.gpu_decode import cut_views_from_tensor
from ssl.errors import UserError
from tests.fixtures import run_module

GLOBAL = ViewRecipe(24, crop_scale=(0.4, 1.0), crop_ratio=(0.75, 4 / 3))
LOCAL = ViewRecipe(12, crop_scale=(0.05, 0.4), crop_ratio=(0.75, 4 / 3))


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colour fields, bicubically upsampled: detail at a known scale, nothing flat."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def write_folder(root, sizes: list[tuple[int, int]]) -> FolderDataset:
    for i, (width, height) in enumerate(sizes):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        smooth_image(width, height, seed=i).save(root / f"c{i % 2}" / f"{i:02d}.JPEG", quality=90)
    return FolderDataset(root, 24, 3, 0, "toy")


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov distance: the largest gap between the two empirical CDFs."""
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), points, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.4, 1.0), (0.05, 0.4)])
@pytest.mark.parametrize("width, height", [(500, 375), (300, 800)])
def test_crop_area_and_aspect_follow_torchvision_relative_to_the_whole_image(scale, width, height):
    count = 4000
    recipe = ViewRecipe(224, crop_scale=scale, crop_ratio=(0.75, 4 / 3))
    ours = crop_boxes(recipe, 0, 0, 0, torch.arange(count), torch.full((count,), height),
                      torch.full((count,), width)).numpy()
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    theirs = np.array([transforms.RandomResizedCrop.get_params(image, list(scale), [0.75, 4 / 3])
                       for _ in range(count)], dtype=np.float64)  # (top, left, h, w)
    ours = ours.astype(np.float64)
    # Rounded to 3 decimals: torchvision's boxes are whole pixels, ours continuous, and the central fallback (most
    # draws for a 3:8 image at scale 0.4-1) must count as one value in both.
    ours_area = np.round(ours[:, 2] * ours[:, 3] / (width * height), 3)
    theirs_area = np.round(theirs[:, 2] * theirs[:, 3] / (width * height), 3)
    ours_aspect = np.round(np.log(ours[:, 2] / ours[:, 3]), 3)
    theirs_aspect = np.round(np.log(theirs[:, 3] / theirs[:, 2]), 3)
    # KS critical value at alpha = 0.001 for two samples of 4000: 1.95 * sqrt(2 / 4000) = 0.044
    assert ks_statistic(ours_area, theirs_area) < 0.044
    assert ks_statistic(ours_aspect, theirs_aspect) < 0.044
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= width + 1e-3).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= height + 1e-3).all()


def test_every_corner_of_a_wide_photo_appears_in_some_view():
    """A centre square pre-crop would never show the left and right thirds of a 3:1 image."""
    width, height = 300, 100
    image = np.full((height, width, 3), 128, np.uint8)
    corners = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 0)}
    for (bottom, right), colour in corners.items():
        rows = slice(height - 15, height) if bottom else slice(0, 15)
        cols = slice(width - 15, width) if right else slice(0, 15)
        image[rows, cols] = colour
    draws = 200
    boxes = crop_boxes(LOCAL, 0, 0, 0, torch.arange(draws), height, width)
    views = torch.stack(cut_views(_jpeg_free(Image.fromarray(image)), "wide", boxes, [LOCAL.size] * draws, 3))
    pixels = views.permute(0, 2, 3, 1).reshape(-1, 3).int()
    for colour in corners.values():
        assert (pixels - torch.tensor(colour)).abs().amax(dim=1).min() < 40


def test_views_are_the_same_with_0_1_2_workers_and_1_or_2_processes(tmp_path):
    sizes = [(60, 45), (45, 60), (80, 40), (50, 50), (64, 48), (33, 70), (90, 60), (48, 64)]
    write_folder(tmp_path, sizes)
    views = [GLOBAL, GLOBAL, LOCAL, LOCAL]

    def views_by_index(workers: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[int, list]:
        folder = FolderDataset(tmp_path, 24, 3, workers, "toy")
        loader = BatchLoader(folder, batch_size, "cpu", True, True, seed=5, rank=rank, world_size=world_size,
                             views=views)
        found = {}
        for crops, labels, indices in loader.epoch(3):
            for position, index in enumerate(indices.tolist()):
                found[index] = [crop[position] for crop in crops] + [labels[position]]
        return found

    single = views_by_index(0, 4)
    assert sorted(single) == list(range(8))
    two_processes = {**views_by_index(0, 2, rank=0, world_size=2), **views_by_index(0, 2, rank=1, world_size=2)}
    for other in (views_by_index(1, 4), views_by_index(2, 8), two_processes):
        assert sorted(other) == list(range(8))
        for index, expected in single.items():
            assert all(torch.equal(a, b) for a, b in zip(other[index], expected))
    assert not torch.equal(single[0][0], single[0][1])  # two views of one image differ


def test_a_view_is_one_antialiased_resize_of_its_box_in_the_whole_image():
    image = smooth_image(200, 150)
    whole = torch.tensor([[0.0, 0.0, 200.0, 150.0], [50.0, 30.0, 64.0, 48.0]])
    full, part = cut_views(_jpeg_free(image), "x", whole, [40, 16], 3)
    assert torch.equal(full, _tensor(image.resize((40, 40), Image.Resampling.BICUBIC)))
    assert torch.equal(part, _tensor(image.resize((16, 16), Image.Resampling.BICUBIC, box=(50, 30, 114, 78))))
    stripes = Image.fromarray(np.tile(np.array([0, 255], np.uint8).repeat(1), 100)[None].repeat(50, 0))
    view = cut_views(_jpeg_free(stripes), "x", torch.tensor([[0.0, 0.0, 200.0, 50.0]]), [20], 1)[0]
    assert (view.float() - 127.5).abs().max() < 5  # 1-pixel stripes shrunk 10x average to gray: no aliasing


def test_large_jpegs_decode_reduced_only_as_far_as_the_smallest_box_allows():
    image = smooth_image(1600, 1200, seed=3)
    data = io.BytesIO()
    image.save(data, "JPEG", quality=95)
    data.seek(0)
    decoded = Image.open(data).convert("RGB")  # at full size
    boxes = torch.tensor([[100.0, 100.0, 1200.0, 900.0], [0.0, 0.0, 1600.0, 1200.0]])
    exact = [_tensor(decoded.resize((96, 96), Image.Resampling.BICUBIC, box=(100, 100, 1300, 1000))),
             _tensor(decoded.resize((96, 96), Image.Resampling.BICUBIC))]
    data.seek(0)
    made = cut_views(data, "big.jpg", boxes, [96, 96], 3)  # boxes 9x the view: decoded at 1/8
    for view, expected in zip(made, exact):
        # libjpeg's 1/8 scaling is not a bicubic filter, but the same box: a box off by 10 px differs by ~30
        assert (view.float() - expected.float()).abs().mean() < 4.0
    data.seek(0)
    with Image.open(data) as opened:
        assert opened.draft("RGB", (200, 150)) is not None  # the file does allow 1/8, so the test reaches draft


def test_evaluation_view_resizes_the_shorter_side_to_size_over_the_crop_fraction_then_takes_the_centre():
    image = smooth_image(500, 375, seed=1)
    ours = eval_view(_jpeg_free(image), "x", 224, 0.875, 3)
    reference = transforms.Compose([transforms.Resize(256, transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(224), transforms.PILToTensor()])(image)
    side = 375 * 0.875  # the central square that becomes 224 px, in the image's own pixels: 256 -> 224
    box = ((500 - side) / 2, (375 - side) / 2, (500 + side) / 2, (375 + side) / 2)
    assert torch.equal(ours, _tensor(image.resize((224, 224), Image.Resampling.BICUBIC, box=box)))
    # torchvision rounds the resized width (341.33 -> 341) and the crop offset (58.5 -> 58): 0.6 px off ours
    assert (ours.float() - reference.float()).abs().mean() < 5.0


def test_odd_files_of_imagenet_train(tmp_path, capsys):
    """Grayscale and CMYK JPEGs, a PNG named .JPEG and a photo stored rotated (EXIF orientation 6) all pretrain."""
    top_red = np.zeros((40, 60, 3), np.uint8)
    top_red[:20] = (255, 0, 0)
    top_red[20:] = (0, 0, 255)
    rotated = Image.fromarray(top_red).transpose(Image.Transpose.ROTATE_90)  # stored on its side: 40 x 60
    exif = Image.Exif()
    exif[0x0112] = 6  # shown upright by rotating 270 degrees counter-clockwise
    for split in ("train", "val"):
        root = tmp_path / split
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        smooth_image(64, 48).convert("L").save(root / "a" / "gray.JPEG")
        smooth_image(48, 64).convert("CMYK").save(root / "a" / "cmyk.JPEG")
        smooth_image(50, 50).save(root / "b" / "png.JPEG", format="PNG")
        rotated.save(root / "b" / "rotated.JPEG", exif=exif, quality=95)
    header = read_header(str(tmp_path / "train" / "b" / "rotated.JPEG"))
    assert (header.width, header.height, header.orientation) == (60, 40, 6)
    upright = eval_view(str(tmp_path / "train" / "b" / "rotated.JPEG"), "x", 20, 1.0, 3)
    assert upright[0, 2, 10] > 200 and upright[2, 2, 10] < 60  # red on top once upright
    assert upright[2, 17, 10] > 200 and upright[0, 17, 10] < 60
    folder = FolderDataset(tmp_path / "train", 24, 3, 0, "odd")
    assert [tuple(folder.eval_image(i).shape) for i in range(4)] == [(3, 24, 24)] * 4
    code = run_module("ssl.pretrain", "+experiment=dino_imagenet", "backbone=vit_tiny", "backbone.kwargs.patch_size=8",
                      "backbone.kwargs.drop_path_rate=0", "method.kwargs.out_dim=64", "data.image_size=32",
                      "data.local_size=16", "augment.local_crops=2", f"data.root={tmp_path}", "data.num_workers=1",
                      "data.batch_size=4", "trainer.epochs=1", "trainer.warmup_epochs=0",
                      "trainer.knn_every_epochs=0", "logger=none", "device=cpu", f"run_dir={tmp_path / 'run'}")
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "teacher.pt").is_file()


def test_a_bad_file_stops_the_run_in_one_line_or_is_skipped_with_a_notice(tmp_path, capsys):
    write_folder(tmp_path, [(40, 30)] * 5)
    (tmp_path / "c1" / "03.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    for workers in (0, 1):
        folder = FolderDataset(tmp_path, 24, 3, workers, "toy")
        loader = BatchLoader(folder, 5, "cpu", True, True, seed=0, views=[GLOBAL])
        with pytest.raises(UserError, match=r"^cannot decode image .*03\.JPEG .*skip_bad_images=true") as error:
            list(loader.epoch(0))
        assert "\n" not in str(error.value)
    folder = FolderDataset(tmp_path, 24, 3, 1, "toy", skip_bad_images=True)
    loader = BatchLoader(folder, 5, "cpu", True, True, seed=0, views=[GLOBAL])
    for epoch in range(2):
        ((views,), labels, indices), = loader.epoch(epoch)
        assert views.shape == (5, 3, 24, 24) and sorted(indices.tolist()) == list(range(5))
        assert labels.tolist().count(1) == 1  # the bad file (class c1) was replaced by the next one, of class c0
    assert loader.skipped == {str(tmp_path / "c1" / "03.JPEG"): 2}  # once an epoch
    assert capsys.readouterr().err.count("notice: skipping") == 1


def test_views_cut_by_the_gpu_path_resampler_match_pils_on_the_cpu():
    image = smooth_image(320, 240, seed=2)
    boxes = torch.tensor([[10.5, 20.25, 200.0, 150.0], [100.0, 60.0, 40.0, 30.0], [0.0, 0.0, 320.0, 240.0]])
    sizes = [64, 32, 64]
    ours = cut_views_from_tensor(_tensor(image), boxes, sizes)
    pil = cut_views(_jpeg_free(image), "x", boxes, sizes, 3)
    for a, b in zip(ours, pil):
        assert a.shape == b.shape
        difference = (a.int() - b.int()).abs()
        assert difference.max() <= 2 and difference.float().mean() < 0.3  # PIL rounds between its two passes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_gives_the_cpu_views(tmp_path):
    write_folder(tmp_path, [(80, 60), (60, 80), (64, 64), (100, 50)])
    Image.open(tmp_path / "c1" / "01.JPEG").convert("CMYK").save(tmp_path / "c1" / "01.JPEG")  # falls back to PIL

    def views(decode: str) -> list[torch.Tensor]:
        folder = FolderDataset(tmp_path, 24, 3, 1, "toy", decode=decode)
        loader = BatchLoader(folder, 4, "cuda", True, True, seed=0, views=[GLOBAL, LOCAL])
        return next(loader.epoch(0))[0]

    for gpu, cpu in zip(views("gpu"), views("cpu")):
        assert gpu.device.type == "cuda"
        assert (gpu.cpu().int() - cpu.cpu().int()).abs().float().mean() < 2.0  # nvJPEG's IDCT is not libjpeg's


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1) if image.mode != "L" else \
        torch.from_numpy(np.array(image))[None]


def _jpeg_free(image: Image.Image) -> io.BytesIO:
    """The image as a PNG file in memory: lossless, so views compare with PIL's pixel for pixel."""
    data = io.BytesIO()
    image.save(data, "PNG")
    data.seek(0)
    return data

