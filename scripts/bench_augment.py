"""Images/s of the batched augmentation against torchvision.transforms.v2 on PIL images in a DataLoader.

    python -m scripts.bench_augment [--data cifar10] [--augment byol_cifar] [--images 4096] [--batch-size 256]
                                    [--workers 2] [--device cpu cuda] [--json bench/augment.json]

Both pipelines make every view of the recipe configs/augment/<augment>.yaml (sizes from configs/data/<data>.yaml)
for --images random uint8 images, in batches of --batch-size, with the same worker budget:
  DataLoader   torchvision.transforms.v2 on PIL images (the usual recipe code), --workers worker processes
  batched      ssl.data.ViewAugmenter on the whole uint8 batch: --workers intra-op threads on CPU, or the GPU
Each pipeline runs one untimed epoch (workers start, caches warm), then one timed epoch; images/s counts source
images, each turned into all of the recipe's views. On CUDA the timed epoch ends with a synchronisation.
"""

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL.Image import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ssl.data import ViewAugmenter, ViewRecipe
from ssl.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def torchvision_view(recipe: ViewRecipe, mean: list[float], std: list[float], channels: int) -> v2.Compose:
    """The same view recipe as torchvision.transforms.v2 on PIL images (colour ops need 3 channels)."""
    colour = channels == 3
    ops = [
        v2.RandomResizedCrop(recipe.size, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(recipe.flip_prob),
    ]
    if recipe.jitter_prob > 0:
        jitter = v2.ColorJitter(
            recipe.brightness, recipe.contrast, recipe.saturation if colour else 0, recipe.hue if colour else 0
        )
        ops.append(v2.RandomApply([jitter], p=recipe.jitter_prob))
    if colour and recipe.grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(recipe.grayscale_prob))
    if recipe.blur_prob > 0:
        radius = min(math.ceil(3 * recipe.blur_sigma[1]), recipe.size - 1)  # the batched pipeline's kernel
        ops.append(v2.RandomApply([v2.GaussianBlur(2 * radius + 1, recipe.blur_sigma)], p=recipe.blur_prob))
    if recipe.solarize_prob > 0:  # PIL solarises on the 0..255 scale
        ops.append(v2.RandomSolarize(round(255 * recipe.solarize_threshold), p=recipe.solarize_prob))
    ops += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


class PILViews(Dataset):
    def __init__(self, images: list[Image], views: list[v2.Compose]) -> None:
        self.images = images
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return [view(self.images[index]) for view in self.views]


def timed_epoch(run_epoch: Callable[[], None]) -> float:
    run_epoch()  # warm-up
    start = time.perf_counter()
    run_epoch()
    return time.perf_counter() - start


def bench_dataloader(images: torch.Tensor, augmenter: ViewAugmenter, cfg, batch_size: int, workers: int) -> float:
    views = [torchvision_view(r, list(cfg.data.mean), list(cfg.data.std), cfg.data.channels) for r in augmenter.views]
    pil = [v2.functional.to_pil_image(image) for image in images]
    loader = DataLoader(
        PILViews(pil, views),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def run_epoch() -> None:
        for _ in loader:
            pass

    return timed_epoch(run_epoch)


def bench_batched(images: torch.Tensor, augmenter: ViewAugmenter, batch_size: int, device: torch.device) -> float:
    images = images.to(device)
    epochs = iter(range(2))

    def run_epoch() -> None:
        epoch = next(epochs)
        order = torch.randperm(len(images), device=device)
        for start in range(0, len(images), batch_size):
            indices = order[start : start + batch_size]
            augmenter(images[indices], indices, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return timed_epoch(run_epoch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="cifar10", help="configs/data/<name>.yaml: image size, channels, mean")
    parser.add_argument("--augment", default="byol_cifar", help="configs/augment/<name>.yaml: the view recipe")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes = batched CPU threads")
    parser.add_argument("--device", nargs="+", default=["auto"], help="cpu, cuda; auto: cpu and cuda if present")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    devices = args.device
    if devices == ["auto"]:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cfg = OmegaConf.create(
        {
            "data": OmegaConf.load(ROOT / "configs" / "data" / f"{args.data}.yaml"),
            "augment": OmegaConf.load(ROOT / "configs" / "augment" / f"{args.augment}.yaml"),
        }
    )
    augmenter = ViewAugmenter.from_config(cfg.augment, cfg.data.mean, cfg.data.std, cfg.data.channels, seed=0)
    side, channels = cfg.data.image_size, cfg.data.channels
    images = torch.randint(0, 256, (args.images, channels, side, side), dtype=torch.uint8)

    torch.set_num_threads(args.workers)
    rows = [("torchvision.v2 PIL + DataLoader", f"cpu, {args.workers} workers", "dataloader", "cpu")]
    seconds = [bench_dataloader(images, augmenter, cfg, args.batch_size, args.workers)]
    for device in devices:
        where = f"cpu, {args.workers} threads" if device == "cpu" else torch.cuda.get_device_name(device)
        rows.append(("ssl.data.ViewAugmenter batched", where, "batched", device))
        seconds.append(bench_batched(images, augmenter, args.batch_size, torch.device(device)))

    baseline = args.images / seconds[0]
    results = [
        {
            "pipeline": pipeline,
            "device": device,
            "where": where,
            "images_per_s": round(args.images / s, 1),
            "speedup": round(args.images / s / baseline, 2),
        }
        for (_, where, pipeline, device), s in zip(rows, seconds)
    ]
    views = ", ".join(str(r.size) for r in augmenter.views)
    print(f"{args.augment} on {args.data}: {args.images} images {channels}x{side}x{side}, views [{views}] px, "
          f"batch {args.batch_size}, torch {torch.__version__}")  # fmt: skip
    print(f"{'pipeline':<34}{'where':<28}{'images/s':>10}{'speedup':>9}")
    for (name, where, *_), result in zip(rows, results):
        print(f"{name:<34}{where:<28}{result['images_per_s']:>10.0f}{result['speedup']:>8.1f}x")
    if args.json:
        setup = {k: getattr(args, k) for k in ("data", "augment", "images", "batch_size", "workers")}
        report = {"setup": setup, "torch": torch.__version__, "platform": platform.platform(), "results": results}
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
