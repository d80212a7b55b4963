"""`python -m ssl.segment ckpt=PATH/teacher.pt [seg_data=fmnist_mosaic|voc|folder] [key=value ...]`: segmentation.

A head (`linear`: BatchNorm + 1x1 conv, or a small `fcn`) on the export's dense features, its logits upsampled to
the mask size, trained with cross-entropy ignoring label 255; the backbone stays frozen unless `finetune=true`.
Reports mIoU (over the classes present in ground truth or prediction) and pixel accuracy, and writes
`<run_dir>/segment.json` (with per-class IoU) plus `<run_dir>/segmenter.pt`: an export (role "segmentation") that
also carries the head (`seg_head = {"name", "state_dict"}`) and the class names. Data options: configs/segment.yaml.
`baseline=random` trains the same head on a randomly initialised backbone of the same architecture and prints its
scores beside the export's.
"""

import functools
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from ssl.errors import UserError, run_cli
from ssl.eval import cli
from ssl.eval.mosaic import build_mosaics
from ssl.eval.preprocess import check_channels
from ssl.eval.seg_data import SegmentationSet, load_folder, load_voc
from ssl.eval.segmentation import Segmenter, evaluate_segmenter, train_segmenter

SEG_DATA = ("fmnist_mosaic", "voc", "folder")


def segmentation_sets(cfg: DictConfig, meta: dict[str, Any],
                      device: torch.device) -> tuple[SegmentationSet, SegmentationSet]:
    """The train and test sets `cfg.seg_data` names, on `device`, checked against the export's channel count."""
    if cfg.seg_data == "fmnist_mosaic":
        options = cfg.fmnist_mosaic
        check_channels(meta, cfg.data.channels, f"seg_data=fmnist_mosaic (built from data {cfg.data.name})")
        sets = []
        for split, size, seed in (("train_split", options.train_size, cfg.seed),
                                  ("test_split", options.test_size, cfg.seed + 1)):
            images, labels, classes = cli.load_split(cfg.data, split, meta, device)
            sets.append(build_mosaics(images, labels, classes, size, options.threshold, seed))
        return sets[0], sets[1]
    if cfg.seg_data == "voc":
        options = cfg.voc
        check_channels(meta, 3, "seg_data=voc")
        train, test = (load_voc(options.root, options[split], options.image_size, options.download)
                       for split in ("train_split", "test_split"))
    elif cfg.seg_data == "folder":
        options = cfg.folder
        if not options.root:
            raise UserError("seg_data=folder needs folder.root=PATH (holding <split>/images and <split>/masks)")
        # Images are decoded with the export's channel count (grayscale or RGB), so they always fit it.
        classes = list(options.classes) if options.classes else None
        train = load_folder(options.root, options.train_split, options.image_size, meta["channels"], classes)
        test = load_folder(options.root, options.test_split, options.image_size, meta["channels"], train.classes)
    else:
        raise UserError(f"unknown seg_data={cfg.seg_data}; choose one of: {', '.join(SEG_DATA)}")
    return train.to(device), test.to(device)


def segment_backbone(backbone: nn.Module, cfg: DictConfig, train_set: SegmentationSet,
                     test_set: SegmentationSet) -> tuple[dict[str, Any], Segmenter]:
    """Train a segmentation head on one backbone and test it: the report's scores, and the trained model."""
    model = Segmenter(backbone, cfg.head, train_set.num_classes, backbone.export_meta, cfg.finetune)
    model = model.to(train_set.images.device)
    start = time.perf_counter()
    losses = train_segmenter(model, train_set, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr,
                             cfg.train.backbone_lr, cfg.train.weight_decay, cfg.seed,
                             on_epoch=lambda epoch, loss: print(f"epoch {epoch}/{cfg.train.epochs} loss={loss:.4f}",
                                                                flush=True))
    train_seconds = cli.elapsed_since(start, train_set.images.device)
    confusion = evaluate_segmenter(model, test_set, cfg.train.batch_size)
    return {
        "miou": 100 * confusion.mean_iou(), "pixel_accuracy": 100 * confusion.pixel_accuracy(),
        "per_class_iou": {name: None if iou is None else 100 * iou
                          for name, iou in zip(test_set.classes, confusion.iou())},
        "train_loss": losses, "seconds": train_seconds,
    }, model


def summary_scores(result: dict[str, Any]) -> dict[str, float]:
    """The scores of the summary line, by the names it prints."""
    return {"miou": result["miou"], "pixel_acc": result["pixel_accuracy"]}


def segment(cfg: DictConfig) -> dict[str, Any]:
    """Train and evaluate a segmentation head on the export `cfg.ckpt`; returns the report in segment.json."""
    baseline = cli.baseline_kind(cfg)
    ckpt, device, backbone = cli.load_ckpt(cfg)
    meta = backbone.export_meta
    train_set, test_set = segmentation_sets(cfg, meta, device)

    evaluate = functools.partial(segment_backbone, cfg=cfg, train_set=train_set, test_set=test_set)
    (result, model), random_run = cli.evaluate_with_baseline(baseline, backbone, cfg.seed, device, evaluate)
    random_result = None if random_run is None else random_run[0]

    out_dir = cli.results_dir(cfg, ckpt, "segment")
    head = {"name": cfg.head, "state_dict": {name: t.detach().cpu() for name, t in model.head.state_dict().items()}}
    export = cli.save_downstream_export(out_dir / "segmenter.pt", model.backbone, meta, role="segmentation",
                                        dataset=train_set.name, num_classes=train_set.num_classes,
                                        classes=train_set.classes, seg_head=head, source=str(ckpt))
    report = {
        "ckpt": str(ckpt), "seg_data": train_set.name, "head": cfg.head, "finetune": cfg.finetune,
        "num_train": len(train_set.images), "num_test": len(test_set.images), **result, "export": str(export),
        "baseline": cli.baseline_report(baseline, cfg.seed, random_result),
    }
    return cli.finish(out_dir, "segment", report, cli.summary_line(summary_scores, result, random_result, baseline),
                      export)


@hydra.main(config_path="../configs", config_name="segment", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: segment(cfg))


if __name__ == "__main__":
    main()
