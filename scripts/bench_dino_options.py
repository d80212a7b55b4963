"""Step-time cost of DINOv2's options in ssl.methods.dino (Sinkhorn-Knopp centring, KoLeo, iBOT) on a DINO recipe.

    python -m scripts.bench_dino_options [--experiment dino_fmnist] [--device cpu] [--steps 3] [--rounds 5]
                                         [--variant NAME=KEY=VALUE,KEY=VALUE ...] [--override KEY=VALUE ...]
                                         [--json bench/dino_options.json]

Every variant (the recipe as it is, then the recipe with one option on) is built in this process on the same data
with `ssl.train.build_pretraining` and stepped with `ssl.train.train_step`, the code that trains. The variants take
turns: each round times --steps steps of every variant in turn, so a machine that gets busier or quieter slows them
alike, and the cost of a variant is the median over rounds of its time per step divided by the baseline's in that
round. Two clocks: wall time, and (on the CPU) this process's CPU time, which other jobs on a shared machine disturb
far less (run with OMP_NUM_THREADS=1 there, so that threads spinning in OpenMP barriers count as nothing). One
untimed step per variant first. The default variants fit `dino_fmnist` (a ResNet: iBOT needs a ViT, e.g.
--override backbone=vit_tiny --override backbone.kwargs.patch_size=4 --variant ibot=method.kwargs.ibot_weight=1).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ssl.errors import UserError
from ssl.train import build_pretraining, train_step, wrap_forward

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["sinkhorn=method.kwargs.centering=sinkhorn", "koleo=method.kwargs.koleo_weight=0.1"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="dino_fmnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variant", action="append", metavar="NAME=KEY=VALUE,KEY=VALUE",
                        help=f"an option set to compare with the recipe (repeatable); default: {DEFAULT_VARIANTS}")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for every variant, the baseline included (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    return args


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    named = {"off": []}
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, overrides = spec.partition("=")
        if not name or not overrides:
            raise UserError(f"--variant {spec!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
        named[name] = overrides.split(",")
    return named


class Stepper:
    """One variant: its pretraining objects and an endless supply of its own batches of epoch 0."""

    def __init__(self, overrides: list[str], device: torch.device) -> None:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            self.cfg = compose("pretrain", overrides=overrides)
        self.run = build_pretraining(self.cfg, device)
        self.forward = wrap_forward(self.run.model, self.cfg, device)
        self.device, self.step_index, self.batches = device, 0, iter(())

    def seconds(self, steps: int) -> tuple[float, float]:
        """Wall and process CPU seconds of `steps` training steps (the device synchronised at both ends)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(self.batches, None)
            if batch is None:
                self.batches = iter(self.run.loader.epoch(0))
                batch = next(self.batches)
            train_step(self.run, self.forward, *batch, 0, self.step_index % self.run.steps_per_epoch)
            self.step_index += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start, time.process_time() - start_cpu


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        base = [f"+experiment={args.experiment}", f"device={args.device}", "logger=none", *args.override]
        steppers = {name: Stepper(base + extra, device) for name, extra in variants(args).items()}
    except UserError as error:
        sys.exit(f"error: {error}")
    for stepper in steppers.values():
        stepper.seconds(1)
    clocks = ("wall", "cpu")
    per_step = {name: {clock: [] for clock in clocks} for name in steppers}
    for round_index in range(args.rounds):
        for name, stepper in steppers.items():
            for clock, seconds in zip(clocks, stepper.seconds(args.steps)):
                per_step[name][clock].append(seconds / args.steps)
        print(f"round {round_index + 1}/{args.rounds}: " + " ".join(
            f"{name}={times['wall'][-1]:.3f}s (cpu {times['cpu'][-1]:.3f}s)" for name, times in per_step.items()),
            flush=True)

    rows = []
    for name, times in per_step.items():
        row = {"variant": name, "overrides": variants(args)[name]}
        for clock in clocks:
            ratios = [value / baseline for value, baseline in zip(times[clock], per_step["off"][clock])]
            row[clock] = {"median_s_per_step": statistics.median(times[clock]),
                          "median_ratio_to_off": statistics.median(ratios), "ratios": ratios}
        rows.append(row)
    print(f"\n{args.experiment} on {device.type}, {args.rounds} rounds of {args.steps} steps, interleaved, "
          f"{torch.get_num_threads()} threads")
    print("| variant | wall s/step | wall cost vs off | cpu s/step | cpu cost vs off |\n|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[clock]['median_s_per_step']:.3f} | {100 * (row[clock]['median_ratio_to_off'] - 1):+.1f} %"
                 for clock in clocks]
        print(f"| {row['variant']} | {' | '.join(cells)} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        environment = {"command": " ".join(["bench_dino_options.py", *(sys.argv[1:] if argv is None else argv)]),
                       "torch": torch.__version__, "platform": platform.platform(),
                       "torch_threads": torch.get_num_threads()}
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
