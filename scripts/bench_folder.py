"""Image-folder loading side by side: our workers against the reference PIL pipeline, on the same JPEGs and workers.

    python -m scripts.bench_folder [--images 2000] [--measure-images 1024] [--workers 2] [--batch-size 64]
                                   [--device cpu] [--root bench/folder_data] [--json bench/folder.json]

Data: --images JPEGs (quality 90) written once under --root, ImageNet-like: the longer side 500 px for most and
300-1000 px for the rest, aspect ratios 1:1 to 16:9 in both orientations (mean about 500 x 390), with texture at
every scale (smooth fields, shapes, grain) so they compress like photos. They are reused while the recipe matches.

Pipelines, each over the first --measure-images images of a shuffled epoch of the folder, in batches of
--batch-size with --workers DataLoader workers:
  reference  torchvision.datasets.ImageFolder with the papers' PIL transforms (DINO's main_dino.py multi-crop:
             RandomResizedCrop bicubic, flip, colour jitter 0.4/0.4/0.2/0.1 at p 0.8, grayscale 0.2, PIL Gaussian
             blur, solarisation, ToTensor + Normalize; BYOL's table 6 pair), written here from those parameters
  loader     ours: ssl.data.BatchLoader cutting each view from the whole image in the workers (uint8 views of the
             final sizes, on --device); the colour work is left to the device
  end-to-end ours, loader + ssl.data.ViewAugmenter on --device (on a CPU the main process does the colour work,
             competing with the workers for the same cores)
  loader-gpu ours with data.decode=gpu (only with --device cuda)
Each loop step waits for the next batch, then does what the pipeline leaves to the step (end-to-end: the augment)
and sleeps for the time a training step at --step-images-per-s would take, so "wait" is the time such a step would
stand idle for data. images/s counts source images (with every view made) from the first batch to the last;
CPU-ms/image adds the CPU time of every process (the main process and its workers) over the whole epoch.
"""

import argparse
import json
import os
import platform
import random
import resource
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ssl.data import BatchLoader, ViewAugmenter, ViewRecipe
from ssl.data.folder import FolderDataset
from ssl.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as both papers normalise
DATA_VERSION = 2  # bump when the generated images change
CLASSES = 10
ASPECTS = [(1.0, 0.10), (4 / 3, 0.40), (3 / 2, 0.20), (16 / 9, 0.05), (None, 0.25)]  # (long / short, share)


# ------------------------------------------------------------------------------------------------------ data


def image_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) spread like ImageNet's: most photos have a 500 px longer side, a quarter are portrait."""
    long_side = 500 if rng.random() < 0.7 else rng.randint(300, 1000)
    aspect = rng.choices([a for a, _ in ASPECTS], weights=[w for _, w in ASPECTS])[0] or rng.uniform(1.0, 2.0)
    short_side = max(64, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def textured_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """Smooth colour fields at three scales, a few shapes and pixel grain: compresses like a photo, not flat."""
    np_rng = np.random.default_rng(rng.getrandbits(32))
    canvas = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (24, 40.0), (96, 20.0)):
        field = np_rng.normal(0, amplitude, (max(2, height * cells // 500), max(2, width * cells // 500), 3))
        layer = Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
        canvas += np.asarray(layer, np.float32) - 128
    image = Image.fromarray(np.clip(canvas + 128, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randint(10, width // 2), y0 + rng.randint(10, height // 2)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour, outline=(0, 0, 0))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)), np.float32)
    return Image.fromarray(np.clip(pixels + np_rng.normal(0, 14, pixels.shape), 0, 255).astype(np.uint8))


def write_folder(root: Path, count: int, seed: int = 0) -> dict[str, Any]:
    """``count`` JPEGs in CLASSES class folders under ``root`` (kept when a previous call wrote the same)."""
    recipe = {"version": DATA_VERSION, "count": count, "seed": seed}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text())["recipe"] == recipe:
        return json.loads(manifest.read_text())
    rng = random.Random(seed)
    sizes, nbytes = [], 0
    for index in range(count):
        folder = root / f"class{index % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = image_size(rng)
        path = folder / f"{index:06d}.JPEG"
        textured_image(rng, width, height).save(path, quality=90)
        sizes.append((width, height))
        nbytes += path.stat().st_size
    widths, heights = zip(*sizes)
    info = {"recipe": recipe, "mean_width": float(np.mean(widths)), "mean_height": float(np.mean(heights)),
            "min_side": min(min(widths), min(heights)), "max_side": max(max(widths), max(heights)),
            "mean_kb": nbytes / count / 1024}
    atomic_write_text(manifest, json.dumps(info, indent=2) + "\n")
    return info


# ------------------------------------------------------------------------------------------ the reference


class PILGaussianBlur:
    """With probability p, PIL's Gaussian blur of radius uniform in (0.1, 2) (DINO's utils.GaussianBlur)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class PILSolarize:
    """With probability p, PIL's solarisation at 128 (DINO's utils.Solarization)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


def reference_view(size: int, scale: tuple[float, float], blur: float, solarize: float) -> transforms.Compose:
    """One view of the papers' PIL pipeline (DINO's DataAugmentationDINO; BYOL's table 6 with the same ops)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        PILGaussianBlur(blur),
        PILSolarize(solarize),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


class MultiView:
    def __init__(self, views: list[transforms.Compose]) -> None:
        self.views = views

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view(image) for view in self.views]


def reference_views(method: str, local_crops: int) -> MultiView:
    if method == "dino":  # main_dino.py: global (0.4, 1) blur 1.0 / 0.1 + solarise 0.2; local (0.05, 0.4) blur 0.5
        return MultiView([reference_view(224, (0.4, 1.0), 1.0, 0.0), reference_view(224, (0.4, 1.0), 0.1, 0.2)]
                         + [reference_view(96, (0.05, 0.4), 0.5, 0.0)] * local_crops)
    return MultiView([reference_view(224, (0.08, 1.0), 1.0, 0.0), reference_view(224, (0.08, 1.0), 0.1, 0.2)])


def our_views(method: str, local_crops: int) -> list[ViewRecipe]:
    """The same recipes as configs/augment/multicrop.yaml (DINO) and byol.yaml (BYOL) at ImageNet sizes."""
    colour = {"flip_prob": 0.5, "jitter_prob": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2,
              "hue": 0.1, "grayscale_prob": 0.2, "crop_ratio": (0.75, 4 / 3)}
    if method == "dino":
        return ([ViewRecipe(224, crop_scale=(0.4, 1.0), blur_prob=1.0, **colour),
                 ViewRecipe(224, crop_scale=(0.4, 1.0), blur_prob=0.1, solarize_prob=0.2, **colour)]
                + [ViewRecipe(96, crop_scale=(0.05, 0.4), blur_prob=0.5, **colour)] * local_crops)
    return [ViewRecipe(224, crop_scale=(0.08, 1.0), blur_prob=1.0, **colour),
            ViewRecipe(224, crop_scale=(0.08, 1.0), blur_prob=0.1, solarize_prob=0.2, **colour)]


# ---------------------------------------------------------------------------------------------- measuring


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's live child processes (the DataLoader workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(batches: Iterable[Any], count_of: Callable[[Any], int], step: Callable[[Any], None],
            step_seconds: float, device: torch.device, limit: int) -> dict[str, float]:
    """Consume ``batches`` as a training loop would, up to ``limit`` images; returns images/s, CPU-ms per image and
    the wait per step."""
    cpu_start = self_cpu_seconds()
    start = time.perf_counter()
    iterator = iter(batches)
    waits, images, first_arrival, first_count = [], 0, None, 0
    while True:
        ask = time.perf_counter()
        batch = next(iterator, None) if images < limit else None
        if batch is None:
            break
        arrival = time.perf_counter()
        if first_arrival is None:
            first_arrival, first_count = arrival, count_of(batch)
        else:
            waits.append(arrival - ask)
        images += count_of(batch)
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        time.sleep(step_seconds)
    end = time.perf_counter()
    cpu = self_cpu_seconds() - cpu_start + children_cpu_seconds()
    return {"images": images, "images_per_s": (images - first_count) / (end - first_arrival),
            "cpu_ms_per_image": 1000 * cpu / images, "wait_ms_per_step": 1000 * float(np.mean(waits)),
            "first_batch_s": first_arrival - start}


def run_reference(root: Path, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    dataset = datasets.ImageFolder(str(root), transform=reference_views(method, args.local_crops))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))

    def to_device(batch: Any) -> None:
        for view in batch[0]:
            view.to(device, non_blocking=True)

    result = measure(loader, lambda batch: len(batch[1]), to_device, args.batch_size / args.step_images_per_s,
                     device, args.measure_images)
    del loader
    return result


def run_ours(root: Path, method: str, args: argparse.Namespace, device: torch.device, augment: bool,
             decode: str = "cpu") -> dict[str, float]:
    views = our_views(method, args.local_crops)
    folder = FolderDataset(root, 224, 3, args.workers, "bench", decode=decode)
    loader = BatchLoader(folder, args.batch_size, device, shuffle=True, drop_last=True, seed=0, views=views)
    augmenter = ViewAugmenter(views, 2, MEAN, STD, 3, seed=0)

    def step(batch: Any) -> None:
        if augment:
            augmenter(batch[0], batch[2], 0)

    result = measure(loader.epoch(0), lambda batch: len(batch[2]), step, args.batch_size / args.step_images_per_s,
                     device, args.measure_images)
    del loader
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the generated folder")
    parser.add_argument("--measure-images", type=int, default=1024,
                        help="images each pipeline loads (the first batches of a shuffled epoch)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for every pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=10, help="DINO's local views (dino_imagenet: 10)")
    parser.add_argument("--step-images-per-s", type=float, default=1500.0,
                        help="the training step's own speed, simulated by a sleep (a GPU's ViT-S/16 DINO)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=["dino", "byol"], choices=["dino", "byol"])
    parser.add_argument("--root", type=Path, default=ROOT / "bench" / "folder_data")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "folder.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the cores the workers leave: more intra-op threads would only fight them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))

    data = write_folder(args.root, args.images)
    print(f"{args.images} JPEGs in {args.root}: mean {data['mean_width']:.0f} x {data['mean_height']:.0f} px, "
          f"sides {data['min_side']}-{data['max_side']}, {data['mean_kb']:.0f} KB on average")
    pipelines: list[tuple[str, Callable[[str], dict[str, float]]]] = [
        ("reference", lambda m: run_reference(args.root, m, args, device)),
        ("loader", lambda m: run_ours(args.root, m, args, device, augment=False)),
        ("end-to-end", lambda m: run_ours(args.root, m, args, device, augment=True)),
    ]
    if device.type == "cuda":
        pipelines.append(("loader-gpu", lambda m: run_ours(args.root, m, args, device, augment=False, decode="gpu")))
    rows = []
    for method in args.methods:
        for name, run in pipelines:
            rows.append({"method": method, "pipeline": name, **run(method)})
            reference = next(row for row in rows if row["method"] == method and row["pipeline"] == "reference")
            rows[-1]["speedup"] = rows[-1]["images_per_s"] / reference["images_per_s"]
            rows[-1]["cores_for_step_rate"] = rows[-1]["cpu_ms_per_image"] * args.step_images_per_s / 1000

    header = (f"| method | pipeline | images/s | x reference | CPU-ms/image | cores for {args.step_images_per_s:.0f}/s "
              "| wait/step ms |")
    print(header)
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['pipeline']} | {row['images_per_s']:.1f} | {row['speedup']:.2f} | "
              f"{row['cpu_ms_per_image']:.1f} | {row['cores_for_step_rate']:.1f} | {row['wait_ms_per_step']:.0f} |")
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "device": str(device)},
              "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
              "data": data, "rows": rows}
    atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
