"""Learning quality on Fashion-MNIST: does the pretrained teacher beat random weights, and by how much?

    python -m scripts.bench_quality [--methods byol dino] [--device cpu] [--out bench/quality]
                                    [--json bench/quality.json] [--markdown bench/quality.md] [--reuse]
                                    [--pretrain-override KEY=VALUE ...] [--eval-override KEY=VALUE ...]
                                    [--segment-override KEY=VALUE ...]

For each method, `python -m ssl.pretrain +experiment=<method>_fmnist` runs at its defaults (plus any
--pretrain-override), then every model below goes through the same commands users run, on the full test set:
  teacher     the EMA teacher's export (teacher.pt)
  student     the student's export (student.pt)
  random      a randomly initialised backbone of the same architecture (seed 0, which is also the pretraining's
              initialisation): the bar to clear; one per architecture
  supervised  that random backbone trained with labels (`ssl.finetune`, crop + flip views) for as many epochs as
              the longest pretraining of that architecture: what the same data buys with labels
Each model is scored by `ssl.linear_eval` (linear top-1, weighted kNN top-1 at k = 20 and 200) and `ssl.segment`
(frozen backbone, linear head on Fashion-MNIST mosaics: mIoU). Pretraining minutes are wall time of the whole
command; images/s is the mean over the run's logged intervals (metrics.jsonl). Writes a markdown table and JSON.

This is a benchmark, not a test: at its defaults it runs for about an hour on a 2-core CPU. --reuse keeps what a
previous run under --out finished (pretraining runs, the supervised reference, evaluation reports newer than the
model they score) and redoes the rest.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ssl.eval.cli import save_downstream_export
from ssl.files import atomic_write_text
from ssl.models import load_backbone
from ssl.models.export import random_backbone

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("linear top-1", "kNN20", "kNN200", "mosaic mIoU")


def run(module: str, *args: str) -> float:
    """Run `python -m module args` from the repository root, streaming its output; return its wall seconds."""
    command = [sys.executable, "-m", module, *args]
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def pretrain(method: str, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain (or, with --reuse, keep a finished run) and return its epochs, minutes and images/s."""
    finished = run_dir / "bench_seconds.txt"  # written once the command has finished, unlike teacher.pt
    if not (args.reuse and finished.is_file()):
        seconds = run("ssl.pretrain", f"+experiment={method}_fmnist", f"device={args.device}", "logger=none",
                      f"run_dir={run_dir}", *args.pretrain_override)
        atomic_write_text(finished, f"{seconds}\n")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [record["images_per_s"] for record in records if "images_per_s" in record]
    epochs = max(record["epoch"] for record in records if record.get("type") == "epoch")
    return {"minutes": float(finished.read_text()) / 60,
            "images_per_s": sum(rates) / len(rates), "epochs": epochs}


def random_export(source: Path, path: Path, seed: int = 0) -> Path:
    """`source`'s architecture, input size and normalisation with weights drawn from `seed`, as an export file
    (what `baseline=random` evaluates in memory; the supervised reference starts from it)."""
    backbone = random_backbone(load_backbone(source).export_meta, seed)
    return save_downstream_export(path, backbone, backbone.export_meta, method="random", role="random", epoch=0)


def up_to_date(report: Path, ckpt: Path, args: argparse.Namespace) -> bool:
    """With --reuse, whether `report` exists and was written after `ckpt`: a model trained again (a rerun
    pretraining, a supervised reference for a new number of epochs) is evaluated again."""
    return args.reuse and report.is_file() and report.stat().st_mtime >= ckpt.stat().st_mtime


def evaluate(ckpt: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Linear probe, kNN and mosaic segmentation of one export, each by its entry point (kept with --reuse while
    newer than the export)."""
    common = [f"ckpt={ckpt}", f"device={args.device}"]
    linear_json, segment_json = out / "linear_eval" / "linear_eval.json", out / "segment" / "segment.json"
    if not up_to_date(linear_json, ckpt, args):
        run("ssl.linear_eval", *common, f"run_dir={linear_json.parent}", *args.eval_override)
    if not up_to_date(segment_json, ckpt, args):
        run("ssl.segment", *common, f"run_dir={segment_json.parent}", *args.eval_override, *args.segment_override)
    linear, segment = json.loads(linear_json.read_text()), json.loads(segment_json.read_text())
    return {"linear top-1": linear["linear"]["top1"], "kNN20": linear["knn"]["k20_top1"],
            "kNN200": linear["knn"]["k200_top1"], "mosaic mIoU": segment["miou"]}


def supervised(random: Path, epochs: int, out: Path, args: argparse.Namespace) -> Path:
    """The random export trained with labels for `epochs` (kept with --reuse when it ran that many epochs)."""
    report = out / "finetune.json"
    if not (args.reuse and report.is_file() and json.loads(report.read_text())["train"]["epochs"] == epochs):
        run("ssl.finetune", f"ckpt={random}", f"device={args.device}", f"run_dir={out}", f"train.epochs={epochs}",
            f"train.backbone_lr={args.supervised_lr}", f"train.lr={args.supervised_lr}", *args.eval_override)
    return out / "finetuned.pt"


def architecture(export: Path) -> str:
    """A folder name for an export's architecture, e.g. resnet18-in_channels1-stemstride2-width32."""
    spec = load_backbone(export).export_meta["backbone"]
    return "-".join([spec["name"], *(f"{key}{value}" for key, value in sorted(spec["kwargs"].items()))])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain every method, then score its teacher and student, and once per architecture random init and the
    supervised reference (trained for as many epochs as the longest pretraining of that architecture)."""
    out = Path(args.out)
    training = {method: pretrain(method, out / method, args) for method in args.methods}
    references: dict[str, list[str]] = {}
    for method in args.methods:
        references.setdefault(architecture(out / method / "teacher.pt"), []).append(method)
    rows: list[dict[str, Any]] = []
    for arch, methods in references.items():
        reference_dir = out / f"reference_{arch}"
        random = reference_dir / "random.pt"  # kept with --reuse: the folder names its architecture, seed 0 its weights
        if not (args.reuse and random.is_file()):
            random_export(out / methods[0] / "teacher.pt", random)
        epochs = max(training[method]["epochs"] for method in methods)
        scores = {("random", "reference"): evaluate(random, reference_dir / "eval_random", args),
                  (f"supervised, {epochs} epochs", "reference"): evaluate(
                      supervised(random, epochs, reference_dir / "supervised", args),
                      reference_dir / "eval_supervised", args)}
        for method in methods:
            for model in ("teacher", "student"):
                scores[model, method] = evaluate(out / method / f"{model}.pt", out / method / f"eval_{model}", args)
        baseline = scores["random", "reference"]
        for (model, method), score in scores.items():
            timing = training[method] if model == "teacher" else {}
            rows.append({"method": method, "model": model, "architecture": arch, **score,
                         "vs random": {column: score[column] - baseline[column] for column in COLUMNS},
                         **({"pretrain minutes": timing["minutes"], "images/s": timing["images_per_s"]}
                            if timing else {})})
    return {"rows": rows, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads, torch {torch.__version__}", "device": args.device, "command": " ".join(sys.argv),
            "pretrain_overrides": args.pretrain_override, "eval_overrides": args.eval_override}


def markdown(result: dict[str, Any]) -> str:
    header = ["method", "model", *COLUMNS, "pretrain min", "images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        cells = [row["method"], row["model"]]
        for column in COLUMNS:
            delta = "" if row["model"] == "random" else f" ({row['vs random'][column]:+.2f})"
            cells.append(f"{row[column]:.2f}{delta}")
        cells += [f"{row['pretrain minutes']:.1f}" if "pretrain minutes" in row else "",
                  f"{row['images/s']:.0f}" if "images/s" in row else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(in brackets: the difference to random init) machine: {result['machine']}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["byol", "dino"], choices=["byol", "dino"],
                        help="which <method>_fmnist recipes to pretrain and score")
    parser.add_argument("--device", default="cpu", help="device for pretraining and evaluation (cpu, cuda)")
    parser.add_argument("--out", default="bench/quality", help="folder for the runs and their evaluations")
    parser.add_argument("--json", default="bench/quality.json", help="where to write the results as JSON")
    parser.add_argument("--markdown", default="bench/quality.md", help="where to write the markdown table")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the pretraining runs, supervised reference and evaluations finished under --out")
    parser.add_argument("--supervised-lr", type=float, default=1e-3,
                        help="AdamW lr of backbone and head for the supervised reference (trained from scratch)")
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for every pretraining run (repeatable), e.g. data.limit=2000")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override (data.* keys) for linear_eval, segment and the supervised finetune")
    parser.add_argument("--segment-override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for ssl.segment only (repeatable), e.g. train.epochs=5")
    args = parser.parse_args()
    result = bench(args)
    table = markdown(result)
    print(table)
    for path, text in ((args.json, json.dumps(result, indent=2) + "\n"), (args.markdown, table)):
        atomic_write_text(path, text)
    print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
