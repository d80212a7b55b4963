"""`python -m ssl.linear_eval ckpt=PATH/teacher.pt [data=NAME] [key=value ...]`: frozen-backbone evaluation.

Rebuilds the backbone from the export alone (eval mode: no dropout, BatchNorm running statistics frozen), runs it
once over the train and test splits without augmentation, then on those cached features
  * trains linear probes over an (lr, weight decay) grid, picks the best on a held-out part of train, retrains
    it on all of train and reports test top-1 / top-5 (`protocol=augmented`: the retraining sees random
    crop + flip views through the backbone at every step instead, as in the papers);
  * classifies test features by weighted kNN over the train features (k = 20 and 200, T = 0.07, as DINO).
Prints one summary line and writes `<run_dir>/linear_eval.json` (see configs/linear_eval.yaml).
"""

import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ssl.errors import UserError, run_cli
from ssl.eval import cli
from ssl.eval.features import AugmentedFeatures, extract_features
from ssl.eval.knn import knn_votes
from ssl.eval.linear import ProbeConfig, fit_linear_probe
from ssl.eval.metrics import topk_accuracy
from ssl.models.export import load_backbone

PROTOCOLS = ("cached", "augmented")


def linear_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the export `cfg.ckpt` on `cfg.data`; returns the report also written to linear_eval.json."""
    ckpt = cli.checkpoint(cfg)
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol={cfg.protocol}; choose one of: {', '.join(PROTOCOLS)}")
    device = cli.resolve_device(cfg.device)
    backbone = load_backbone(ckpt, device)
    meta = backbone.export_meta
    cli.require_data(cfg)
    train_images, train_labels, classes = cli.load_split(cfg.data, "train_split", meta, device)
    num_classes = len(classes)
    test_images, test_labels, _ = cli.load_split(cfg.data, "test_split", meta, device)

    start = time.perf_counter()
    train_features = extract_features(backbone, train_images, meta, device, cfg.data.batch_size)
    test_features = extract_features(backbone, test_images, meta, device, cfg.data.batch_size)
    extract_seconds = cli.elapsed_since(start, device)

    start = time.perf_counter()
    config = ProbeConfig(**OmegaConf.to_container(cfg.linear), seed=cfg.seed)
    augmented = None
    if cfg.protocol == "augmented":
        augmented = AugmentedFeatures(backbone, train_images, meta, cfg.padding, cfg.seed)
    probe, selection = fit_linear_probe(train_features, train_labels, num_classes, config, augmented)
    with torch.no_grad():
        logits = probe(test_features)[0]
    linear_top1, linear_top5 = (100 * topk_accuracy(logits, test_labels, k).item() for k in (1, 5))
    probe_seconds = cli.elapsed_since(start, device)

    start = time.perf_counter()
    votes = knn_votes(train_features, train_labels, test_features, num_classes, list(cfg.knn.ks),
                      cfg.knn.temperature)
    knn_top1 = {k: 100 * topk_accuracy(v, test_labels, 1).item() for k, v in votes.items()}
    knn_seconds = cli.elapsed_since(start, device)

    report = {
        "ckpt": str(ckpt),
        "role": meta["role"], "method": meta["method"], "pretrain_dataset": meta["dataset"], "epoch": meta["epoch"],
        "data": cfg.data.name, "num_train": len(train_labels), "num_test": len(test_labels),
        "protocol": cfg.protocol,
        "linear": {"top1": linear_top1, "top5": linear_top5, "lr": selection.lr,
                   "weight_decay": selection.weight_decay, "epochs": config.epochs, "grid": selection.grid},
        "knn": {"temperature": cfg.knn.temperature, **{f"k{k}_top1": top1 for k, top1 in knn_top1.items()}},
        "seconds": {"extract": extract_seconds, "linear": probe_seconds, "knn": knn_seconds},
    }
    path = cli.write_report(cli.results_dir(cfg, ckpt, "linear_eval"), "linear_eval", report)
    print(f"wrote {path}")
    print(f"linear_top1={linear_top1:.2f} linear_top5={linear_top5:.2f} "
          + " ".join(f"knn{k}_top1={top1:.2f}" for k, top1 in knn_top1.items()))
    return report


@hydra.main(config_path="../configs", config_name="linear_eval", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: linear_eval(cfg))


if __name__ == "__main__":
    run_cli(cli.select_data_from_export)
    main()
