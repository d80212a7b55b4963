"""`python -m ssl.linear_eval ckpt=PATH/teacher.pt [data=NAME] [key=value ...]`: frozen-backbone evaluation.

Rebuilds the backbone from the export alone (eval mode: no dropout, BatchNorm running statistics frozen), runs it
once over the train and test splits without augmentation, then on those cached features
  * fits a linear probe (multinomial logistic regression, full-batch L-BFGS to convergence) for each weight decay
    of a log grid, picks the best on a held-out part of train (growing the grid while its edge wins), refits it on
    all of train and reports test top-1 / top-5 (`protocol=augmented`: the final probe trains with SGD on random
    crop + flip views through the backbone at every step instead, as in the papers; see ssl/eval/linear.py);
  * classifies test features by weighted kNN over the train features (k = 20 and 200, T = 0.07, as DINO).
`baseline=random` runs all of it again on a randomly initialised backbone of the same architecture and prints its
scores beside the export's. Prints one summary line and writes `<run_dir>/linear_eval.json` (see
configs/linear_eval.yaml).
"""

import functools
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssl.errors import UserError, run_cli
from ssl.eval import cli
from ssl.eval.features import AugmentedFeatures, extract_features
from ssl.eval.knn import knn_votes
from ssl.eval.linear import ProbeConfig, fit_linear_probe
from ssl.eval.metrics import topk_accuracy

PROTOCOLS = ("cached", "augmented")


def evaluate_backbone(backbone: nn.Module, cfg: DictConfig, config: ProbeConfig, train_images: torch.Tensor,
                      train_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
                      num_classes: int, device: torch.device) -> dict[str, Any]:
    """Features, linear probe and kNN of one frozen backbone: the `linear`, `knn` and `seconds` report blocks."""
    meta = backbone.export_meta
    start = time.perf_counter()
    train_features = extract_features(backbone, train_images, meta, device, cfg.data.batch_size)
    test_features = extract_features(backbone, test_images, meta, device, cfg.data.batch_size)
    extract_seconds = cli.elapsed_since(start, device)

    start = time.perf_counter()
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
    knn_top1 = {f"k{k}_top1": 100 * topk_accuracy(v, test_labels, 1).item() for k, v in votes.items()}
    knn_seconds = cli.elapsed_since(start, device)
    return {
        "linear": {"top1": linear_top1, "top5": linear_top5, **selection.report()},
        "knn": {"temperature": cfg.knn.temperature, **knn_top1},
        "seconds": {"extract": extract_seconds, "linear": probe_seconds, "knn": knn_seconds},
    }


def summary_scores(result: dict[str, Any], ks: list[int]) -> dict[str, float]:
    """The scores of the summary line, by the names it prints."""
    return {"linear_top1": result["linear"]["top1"], "linear_top5": result["linear"]["top5"],
            **{f"knn{k}_top1": result["knn"][f"k{k}_top1"] for k in ks}}


def linear_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the export `cfg.ckpt` on `cfg.data`; returns the report also written to linear_eval.json."""
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol={cfg.protocol}; choose one of: {', '.join(PROTOCOLS)}")
    baseline = cli.baseline_kind(cfg)
    config = ProbeConfig(**OmegaConf.to_container(cfg.linear), seed=cfg.seed)
    ckpt, device, backbone = cli.load_ckpt(cfg)
    meta = backbone.export_meta
    cli.require_data(cfg)
    train_images, train_labels, classes = cli.load_split(cfg.data, "train_split", meta, device)
    test_images, test_labels, _ = cli.load_split(cfg.data, "test_split", meta, device)

    evaluate = functools.partial(evaluate_backbone, cfg=cfg, config=config, train_images=train_images,
                                 train_labels=train_labels, test_images=test_images, test_labels=test_labels,
                                 num_classes=len(classes), device=device)
    result, random_result = cli.evaluate_with_baseline(baseline, backbone, cfg.seed, device, evaluate)
    report = {
        "ckpt": str(ckpt),
        "role": meta["role"], "method": meta["method"], "pretrain_dataset": meta["dataset"], "epoch": meta["epoch"],
        "data": cfg.data.name, "num_train": len(train_labels), "num_test": len(test_labels),
        "protocol": cfg.protocol, **result, "baseline": cli.baseline_report(baseline, cfg.seed, random_result),
    }
    summary = cli.summary_line(functools.partial(summary_scores, ks=list(cfg.knn.ks)), result, random_result, baseline)
    return cli.finish(cli.results_dir(cfg, ckpt, "linear_eval"), "linear_eval", report, summary)


@hydra.main(config_path="../configs", config_name="linear_eval", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: linear_eval(cfg))


if __name__ == "__main__":
    run_cli(cli.select_data_from_export)
    main()
