"""`python -m ssl.finetune ckpt=PATH/teacher.pt [data=NAME] [key=value ...]`: full fine-tuning of an export.

The backbone (rebuilt from the export alone) and a linear head train end to end with AdamW: a separate, smaller
lr for the backbone, warm-up then cosine, random crop + flip views. Reports test top-1 / top-5 and writes
`<run_dir>/finetune.json` plus `<run_dir>/finetuned.pt`: an export in the `teacher.pt` format (role "finetuned",
`ssl.load_backbone` reads it) that also carries the head (`head = {"weight", "bias"}`) and the class names
(`classes`).
"""

import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ssl.errors import run_cli
from ssl.eval import cli
from ssl.eval.finetuning import Classifier, predict, train_classifier
from ssl.eval.metrics import topk_accuracy
from ssl.models.export import load_backbone


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune the export `cfg.ckpt` on `cfg.data`; returns the report also written to finetune.json."""
    ckpt = cli.checkpoint(cfg)
    device = cli.resolve_device(cfg.device)
    backbone = load_backbone(ckpt, device)
    meta = backbone.export_meta
    cli.require_data(cfg)
    train_images, train_labels, classes = cli.load_split(cfg.data, "train_split", meta, device)
    num_classes = len(classes)
    test_images, test_labels, _ = cli.load_split(cfg.data, "test_split", meta, device)

    model = Classifier(backbone, num_classes, meta).to(device)
    start = time.perf_counter()
    losses = train_classifier(model, train_images, train_labels, cfg.train.epochs, cfg.train.batch_size,
                              cfg.train.lr, cfg.train.backbone_lr, cfg.train.weight_decay,
                              cfg.train.warmup_epochs, cfg.train.padding, cfg.seed,
                              on_epoch=lambda epoch, loss: print(f"epoch {epoch}/{cfg.train.epochs} loss={loss:.4f}",
                                                                 flush=True))
    train_seconds = cli.elapsed_since(start, device)
    logits = predict(model, test_images, cfg.data.batch_size)
    top1, top5 = (100 * topk_accuracy(logits, test_labels, k).item() for k in (1, 5))

    out_dir = cli.results_dir(cfg, ckpt, "finetune")
    head = {name: tensor.detach().cpu() for name, tensor in model.head.state_dict().items()}
    export = cli.save_downstream_export(out_dir / "finetuned.pt", model.backbone, meta, role="finetuned",
                                        dataset=cfg.data.name, num_classes=num_classes, classes=classes,
                                        epoch=cfg.train.epochs, head=head, source=str(ckpt))
    report = {
        "ckpt": str(ckpt), "data": cfg.data.name, "num_train": len(train_labels), "num_test": len(test_labels),
        "top1": top1, "top5": top5, "train_loss": losses, "seconds": train_seconds,
        "train": OmegaConf.to_container(cfg.train), "export": str(export),
    }
    path = cli.write_report(out_dir, "finetune", report)
    print(f"wrote {path} and {export}")
    print(f"finetune_top1={top1:.2f} finetune_top5={top5:.2f}")
    return report


@hydra.main(config_path="../configs", config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: finetune(cfg))


if __name__ == "__main__":
    run_cli(cli.select_data_from_export)
    main()
