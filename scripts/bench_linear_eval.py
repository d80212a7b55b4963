"""Wall time of the cached linear protocol against a probe that runs the frozen backbone every epoch.

    python -m scripts.bench_linear_eval [--ckpt PATH/teacher.pt] [--limit 2000] [--epochs 100]
                                        [--json bench/linear_eval.json] [--device auto] [--data-root data]

Same export, same data (the export's dataset, first --limit images of train and of test), the probe settings of
configs/linear_eval.yaml (--epochs replaces `linear.epochs`, the SGD epochs of the augmented protocol):
  cached     ssl.linear_eval's default: one backbone pass over train and test, then L-BFGS logistic regression on
             the cached features for each weight decay of the grid, chosen on held-out train, refitted on all of train
  per-epoch  ssl.linear_eval protocol=augmented, as solo-learn's main_linear: a clean pass over train (standardisation
             statistics; weight decay and SGD lr chosen on those cached features), then the frozen backbone on random
             crop + flip views of every batch of every epoch, training the final probe; and one pass over test
Without --ckpt, a randomly initialised ResNet-18 for Fashion-MNIST is exported to a temporary file. Fashion-MNIST
is read from --data-root, else Debian's /usr/share/datasets/fashion-mnist. Wall times on CUDA include
synchronisation at the end of each protocol.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ssl.device import resolve_device
from ssl.errors import run_cli
from ssl.eval import cli
from ssl.eval.features import AugmentedFeatures, extract_features
from ssl.eval.linear import LinearProbe, ProbeConfig, fit_linear_probe
from ssl.eval.metrics import topk_accuracy
from ssl.files import atomic_write_text
from ssl.models import build_backbone, load_backbone, save_export


def random_export(path: Path) -> Path:
    """An untrained ResNet-18 export for Fashion-MNIST (28 px, one channel)."""
    data = OmegaConf.load(cli.CONFIG_DIR / "data" / "fmnist.yaml")
    torch.manual_seed(0)
    return save_export(path, build_backbone("resnet18", in_channels=1), input_size=data.image_size, channels=1,
                       mean=list(data.mean), std=list(data.std), dataset="fmnist", num_classes=10, method="random",
                       role="teacher", epoch=0)


def accuracies(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = probe(features)[0]
    return tuple(100 * topk_accuracy(logits, labels, k).item() for k in (1, 5))


def bench(args: argparse.Namespace, ckpt: Path) -> dict:
    device = resolve_device(args.device)
    backbone = load_backbone(ckpt, device)
    meta = backbone.export_meta
    data = OmegaConf.load(cli.CONFIG_DIR / "data" / f"{meta['dataset']}.yaml")
    data.limit = args.limit
    if args.data_root:
        data.root = args.data_root
    train_images, train_labels, classes = cli.load_split(data, "train_split", meta, device)
    test_images, test_labels, _ = cli.load_split(data, "test_split", meta, device)
    protocol = OmegaConf.load(cli.CONFIG_DIR / "linear_eval.yaml")
    config = ProbeConfig(**{**OmegaConf.to_container(protocol.linear), "epochs": args.epochs})

    start = time.perf_counter()
    train_features = extract_features(backbone, train_images, meta, device, data.batch_size)
    test_features = extract_features(backbone, test_images, meta, device, data.batch_size)
    extract_seconds = cli.elapsed_since(start, device)
    probe, selection = fit_linear_probe(train_features, train_labels, len(classes), config)
    cached_top1, cached_top5 = accuracies(probe, test_features, test_labels)
    cached_seconds = cli.elapsed_since(start, device)

    start = time.perf_counter()
    train_features = extract_features(backbone, train_images, meta, device, data.batch_size)
    views = AugmentedFeatures(backbone, train_images, meta, protocol.padding, seed=0)
    probe, augmented = fit_linear_probe(train_features, train_labels, len(classes), config, views)
    test_features = extract_features(backbone, test_images, meta, device, data.batch_size)
    per_epoch_top1, per_epoch_top5 = accuracies(probe, test_features, test_labels)
    per_epoch_seconds = cli.elapsed_since(start, device)

    return {
        "ckpt": str(ckpt) if args.ckpt else "random resnet18", "backbone": meta["backbone"], "data": data.name,
        "num_train": len(train_labels), "num_test": len(test_labels), "epochs": config.epochs,
        "batch_size": config.batch_size, "grid_size": len(selection.grid), "weight_decay": selection.weight_decay,
        "lbfgs_iterations": selection.final["iterations"], "augmented_lr": augmented.final["lr"],
        "device": str(device), "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
        "cached": {"seconds": cached_seconds, "extract_seconds": extract_seconds,
                   "probe_seconds": cached_seconds - extract_seconds, "backbone_passes": 2, "top1": cached_top1,
                   "top5": cached_top5},
        "per_epoch": {"seconds": per_epoch_seconds, "backbone_passes": config.epochs + 2, "top1": per_epoch_top1,
                      "top5": per_epoch_top5},
        "speedup": per_epoch_seconds / cached_seconds,
    }


def print_table(result: dict) -> None:
    print(f"{result['data']}: {result['num_train']} train / {result['num_test']} test images, {result['epochs']} "
          f"epochs, {result['device']}, backbone {result['backbone']['name']}")
    print(f"{'protocol':<52} {'backbone passes':>15} {'wall s':>8} {'top1':>6} {'top5':>6}")
    rows = ((f"cached (features once, {result['grid_size']}-point L-BFGS grid + refit)", result["cached"]),
            ("per-epoch (backbone on crop+flip every step)", result["per_epoch"]))
    for name, row in rows:
        print(f"{name:<52} {row['backbone_passes']:>15} {row['seconds']:>8.1f} {row['top1']:>6.2f} {row['top5']:>6.2f}")
    cached = result["cached"]
    print(f"cached: {cached['extract_seconds']:.1f} s extracting features, {cached['probe_seconds']:.1f} s for the "
          f"probe grid + refit; cached is {result['speedup']:.1f}x faster overall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="an export (teacher.pt); default: a random ResNet-18 for Fashion-MNIST")
    parser.add_argument("--limit", type=int, default=2000, help="first N images of train and of test")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--json", default="bench/linear_eval.json", help="where to write the results")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--data-root", help="data.root for the dataset config (default: the config's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else random_export(Path(tmp) / "teacher.pt")
        result = bench(args, ckpt)
    print_table(result)
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
