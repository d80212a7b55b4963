"""Draw a run's curves (loss, lr, tau, online-probe accuracy) from RUN_DIR/metrics.jsonl into a PNG.

    python -m scripts.plot_metrics runs/byol_fmnist [--out runs/byol_fmnist/metrics.png]
"""

import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure  # a figure without pyplot needs no GUI backend

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tau", "teacher decay tau"), ("probe_acc", "online probe acc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args()
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        sys.exit(f"error: no {metrics}; pass the run_dir of a pretraining run")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("type") != "epoch"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    figure = Figure(figsize=(4 * len(PANELS), 3.2))
    axes = figure.subplots(1, len(PANELS))
    for axis, (key, title) in zip(axes, PANELS):
        points = [(r["step"], r[key]) for r in steps if key in r]
        if points:
            axis.plot(*zip(*points), label="per log step", linewidth=1)
        epoch_points = [(r["step"], r[key]) for r in epochs if key in r]
        if epoch_points:
            axis.plot(*zip(*epoch_points), "o-", label="epoch mean", markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    out = args.out or args.run_dir / "metrics.png"
    figure.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
