"""`python -m ssl.finetune ckpt=PATH/teacher.pt [data=NAME] [key=value ...]`: full fine-tuning of an export.

The backbone (rebuilt from the export alone) and a linear head train end to end with AdamW: a separate, smaller
lr for the backbone, warm-up then cosine, random crop + flip views. Reports test top-1 / top-5 and writes
`<run_dir>/finetune.json` plus `<run_dir>/finetuned.pt`: an export in the `teacher.pt` format (role "finetuned",
`ssl.load_backbone` reads it) that also carries the head (`head = {"weight", "bias"}`) and the class names
(`classes`). `baseline=random` fine-tunes a randomly initialised backbone of the same architecture the same way and
prints its scores beside the export's.
"""

import functools
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssl.errors import run_cli
from ssl.eval import cli
from ssl.eval.finetuning import Classifier, predict, train_classifier
from ssl.eval.metrics import topk_accuracy


def finetune_backbone(backbone: nn.Module, cfg: DictConfig, train_images: torch.Tensor, train_labels: torch.Tensor,
                      test_images: torch.Tensor, test_labels: torch.Tensor,
                      num_classes: int) -> tuple[dict[str, Any], Classifier]:
    """Fine-tune one backbone (in place) with a new head and test it: the report's scores, and the trained model."""
    model = Classifier(backbone, num_classes, backbone.export_meta).to(train_images.device)
    start = time.perf_counter()
    losses = train_classifier(model, train_images, train_labels, cfg.train.epochs, cfg.train.batch_size,
                              cfg.train.lr, cfg.train.backbone_lr, cfg.train.weight_decay,
                              cfg.train.warmup_epochs, cfg.train.padding, cfg.seed,
                              on_epoch=lambda epoch, loss: print(f"epoch {epoch}/{cfg.train.epochs} loss={loss:.4f}",
                                                                 flush=True))
    train_seconds = cli.elapsed_since(start, train_images.device)
    logits = predict(model, test_images, cfg.data.batch_size)
    top1, top5 = (100 * topk_accuracy(logits, test_labels, k).item() for k in (1, 5))
    return {"top1": top1, "top5": top5, "train_loss": losses, "seconds": train_seconds}, model


def summary_scores(result: dict[str, Any]) -> dict[str, float]:
    """The scores of the summary line, by the names it prints."""
    return {"finetune_top1": result["top1"], "finetune_top5": result["top5"]}


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune the export `cfg.ckpt` on `cfg.data`; returns the report also written to finetune.json."""
    baseline = cli.baseline_kind(cfg)
    ckpt, device, backbone = cli.load_ckpt(cfg)
    meta = backbone.export_meta
    cli.require_data(cfg)
    train_images, train_labels, classes = cli.load_split(cfg.data, "train_split", meta, device)
    num_classes = len(classes)
    test_images, test_labels, _ = cli.load_split(cfg.data, "test_split", meta, device)

    evaluate = functools.partial(finetune_backbone, cfg=cfg, train_images=train_images, train_labels=train_labels,
                                 test_images=test_images, test_labels=test_labels, num_classes=num_classes)
    (result, model), random_run = cli.evaluate_with_baseline(baseline, backbone, cfg.seed, device, evaluate)
    random_result = None if random_run is None else random_run[0]

    out_dir = cli.results_dir(cfg, ckpt, "finetune")
    head = {name: tensor.detach().cpu() for name, tensor in model.head.state_dict().items()}
    export = cli.save_downstream_export(out_dir / "finetuned.pt", model.backbone, meta, role="finetuned",
                                        dataset=cfg.data.name, num_classes=num_classes, classes=classes,
                                        epoch=cfg.train.epochs, head=head, source=str(ckpt))
    report = {
        "ckpt": str(ckpt), "data": cfg.data.name, "num_train": len(train_labels), "num_test": len(test_labels),
        **result, "train": OmegaConf.to_container(cfg.train), "export": str(export),
        "baseline": cli.baseline_report(baseline, cfg.seed, random_result),
    }
    return cli.finish(out_dir, "finetune", report, cli.summary_line(summary_scores, result, random_result, baseline),
                      export)


@hydra.main(config_path="../configs", config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: finetune(cfg))


if __name__ == "__main__":
    run_cli(cli.select_data_from_export)
    main()
