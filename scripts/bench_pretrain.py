"""Images/s of one BYOL / DINO pretraining step: our loop, eager and compiled, against the usual DataLoader loop.

    python -m scripts.bench_pretrain [--device cpu|cuda] [--steps 30] [--warmup 5] [--batch-size 256]
                                     [--workers N] [--setups byol_ours byol_reference ...] [--json bench/pretrain.json]
                                     [--data-root DIR] [--override [METHOD:]KEY=VALUE ...]

Set-ups, run one after the other in this process on the same images (BYOL: configs/experiment/byol_cifar.yaml,
ResNet-18 small stem, 32 px; DINO: dino_cifar_vit.yaml, ViT-Tiny/4, 2 x 32 px + 6 x 16 px views):
  *_ours       ssl.train.build_pretraining + ssl.train.train_step, the code that trains: uint8 images resident on
               the device, views made per batch by ssl.data.ViewAugmenter, bf16 autocast and channels_last on
               CUDA (fp32, NCHW on CPU), LARS (BYOL) / AdamW (DINO) from ssl.optim, ssl.ema's foreach lerp_
  *_compiled   the same with trainer.compile=true (the forward wrapped in torch.compile, as ssl.train does)
  *_reference  the loop of solo-learn / lightly: a torch DataLoader over PIL images making the same views with
               torchvision.transforms.v2 in --workers worker processes (pinned memory on CUDA), the per-tensor
               EMA loop `p_t.data = tau * p_t.data + (1 - tau) * p_s.data`, NCHW, and solo-learn's precision:
               its CIFAR BYOL recipe trains with `precision: 16` (fp16 autocast + GradScaler) on GPUs, Lightning's
               fp32 on the CPU (--reference-precision changes it). Same model (ssl.methods, with the same online
               linear probe), same optimiser object and schedules as ours, built by build_pretraining.

Data: --data-root holding cifar-10-batches-py (the real CIFAR-10), else a synthetic CIFAR-10 of random images
written in the real python-pickle format to a temporary folder, just large enough that the run stays in epoch 0
(so no epoch change recompiles the compiled forward). Every set-up runs --warmup untimed steps (compilation
included), a timed pass of --steps steps with no synchronisation inside (one at the end on CUDA), then a
profiling pass of --profile-steps steps that synchronises at each phase boundary (train_step's `mark` callback)
to split the step into data (fetch + augment), forward + backward, optimiser and EMA. images/s counts source
images (each image's views once). The table also shows the speed-up over the same method's reference loop.
"""

import argparse
import gc
import itertools
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL.Image import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from scripts.bench_augment import torchvision_view
from ssl.errors import UserError
from ssl.files import atomic_write_text
from ssl.train import Pretraining, build_pretraining, no_mark, train_step, wrap_forward

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENTS = {"byol": "byol_cifar", "dino": "dino_cifar_vit"}
VARIANTS = ("ours", "reference", "compiled")
SETUPS = [f"{method}_{variant}" for method in EXPERIMENTS for variant in VARIANTS]
PHASES = ("fetch", "augment", "forward_backward", "optimizer", "ema")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CIFAR_CLASSES = 10
CIFAR_BATCH_FILES = 5  # data_batch_1..5: ssl.data.datasets.load_cifar reads all five for the train split


# --------------------------------------------------------------------------------------------- data and config


def write_synthetic_cifar10(root: Path, count: int, seed: int) -> Path:
    """`count` random 32x32 RGB images with random labels as CIFAR-10's python pickles under `root`; returns root.

    The real layout (cifar-10-batches-py/data_batch_1..5 and batches.meta, rows of 3072 channel-major bytes), so
    the configured data path loads it exactly as it loads CIFAR-10; only the pixel values are fake.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, CIFAR_CLASSES, size=count).tolist()
    # Every batch file must hold at least one image: an empty one cannot be reshaped to (-1, 3, 32, 32).
    bounds = np.linspace(0, count, CIFAR_BATCH_FILES + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        batch = {"batch_label": f"synthetic batch {number}", "data": data[start:stop], "labels": labels[start:stop],
                 "filenames": [f"synthetic_{i}.png" for i in range(start, stop)]}
        with open(folder / f"data_batch_{number}", "wb") as file:
            pickle.dump(batch, file, protocol=2)  # the official files are Python 2 pickles
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"class_{i}" for i in range(CIFAR_CLASSES)], "num_cases_per_batch": count,
                     "num_vis": 3 * 32 * 32}, file, protocol=2)
    return root


def compose_config(experiment: str, device: torch.device, data_root: Path, batch_size: int, compiled: bool,
                   overrides: list[str]) -> DictConfig:
    """The Hydra config `python -m ssl.pretrain +experiment=... ` would train with, for this benchmark."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("pretrain", overrides=[
            f"+experiment={experiment}", "logger=none", f"device={device.type}", f"data.root={data_root}",
            f"data.batch_size={batch_size}", f"trainer.compile={str(compiled).lower()}", *overrides,
        ])


# --------------------------------------------------------------------------------------------- the set-ups


class Setup:
    """One way of training: `step(mark)` takes the next batch and makes one optimiser step, calling `mark(phase)`
    as each of PHASES ends. `describe` says what the set-up does; `close()` releases workers and memory."""

    describe: dict[str, Any]

    def step(self, mark: Callable[[str], None]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _batches(run: Pretraining) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]]:
    """(images, labels, indices, epoch, step) forever, in the order ssl.train's loop takes them."""
    step = 0
    for epoch in itertools.count():
        for images, labels, indices in run.loader.epoch(epoch):
            yield images, labels, indices, epoch, step
            step += 1


class Ours(Setup):
    """build_pretraining + train_step, the forward wrapped as ssl.train._train wraps it (one process: no DDP)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.run = build_pretraining(cfg, device)
        self.forward: nn.Module = wrap_forward(self.run.model, cfg, device)
        self.run.method.train()
        self.batches = _batches(self.run)
        self.describe = {
            "data": "uint8 images resident on the device, views by ssl.data.ViewAugmenter on the device",
            "precision": "bf16 autocast" if self.run.autocast._enabled else "fp32",  # ssl.device.autocast's rule
            "channels_last": self.run.channels_last,
            "ema": "ssl.ema (foreach lerp_)",
            "optimizer": cfg.optim.name,
            "compiled": bool(cfg.trainer.compile),
        }

    def step(self, mark: Callable[[str], None]) -> None:
        images, labels, indices, epoch, step = next(self.batches)
        mark("fetch")
        train_step(self.run, self.forward, images, labels, indices, epoch, step, mark)


class PILViews(Dataset):
    """PIL images and labels; an item is (every view of the recipe, label), made in the worker that loads it."""

    def __init__(self, images: list[Image], labels: list[int], views: list[v2.Compose]) -> None:
        self.images = images
        self.labels = labels
        self.views = views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        return [view(self.images[index]) for view in self.views], self.labels[index]


class Reference(Setup):
    """The solo-learn / lightly loop around the same model and optimiser: only data path, EMA, precision and
    memory format differ from ours."""

    def __init__(self, cfg: DictConfig, device: torch.device, workers: int, precision: str) -> None:
        self.run = build_pretraining(cfg, device)
        # It also built our loader, with the images on the device; the reference reads them from its DataLoader.
        self.run.loader = None
        self.device = device
        self.run.method.train()
        augmenter, data = self.run.augmenter, cfg.data
        views = [torchvision_view(recipe, list(data.mean), list(data.std), data.channels) for recipe in augmenter.views]
        pil = [v2.functional.to_pil_image(image) for image in self.run.dataset.images]
        loader = DataLoader(
            PILViews(pil, self.run.dataset.labels.tolist(), views),
            batch_size=cfg.data.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.loader = loader
        self.batches = self._batches()
        dtype = PRECISIONS[precision]
        self.autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        # fp16 needs loss scaling (Lightning's precision=16 uses a GradScaler); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.teacher_params = list(self.run.method.teacher.parameters())
        self.student_params = list(self.run.method.student.parameters())
        self.describe = {
            "data": f"DataLoader over PIL images, torchvision.transforms.v2 views in {workers} worker processes",
            "precision": f"{precision} autocast" if dtype is not None else "fp32",
            "channels_last": False,
            "ema": "per-tensor loop p_t.data = tau * p_t.data + (1 - tau) * p_s.data",
            "optimizer": cfg.optim.name,
            "compiled": False,
        }

    def _batches(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, int, int]]:
        step = 0
        for epoch in itertools.count():
            for views, labels in self.loader:
                yield views, labels, epoch, step
                step += 1

    def step(self, mark: Callable[[str], None]) -> None:
        run = self.run
        views, labels, epoch, step = next(self.batches)
        mark("fetch")  # the wait for the workers' views
        views = [view.to(self.device, non_blocking=True) for view in views]
        labels = labels.to(self.device, non_blocking=True)
        mark("augment")  # here only the copy to the device: the views were made in the workers
        for group in run.optimizer.param_groups:
            group["lr"] = run.lr_schedule[step] * group["lr_scale"]
            group["weight_decay"] = run.wd_schedule[step] * group["wd_scale"]
        with self.autocast:
            out, probe_logits = run.model(views, epoch)
        probe_loss = F.cross_entropy(probe_logits.float(), labels, ignore_index=-1)
        run.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss + probe_loss).backward()
        mark("forward_backward")
        self.scaler.unscale_(run.optimizer)  # Lightning unscales before clipping and gradient hooks
        run.method.before_optimizer_step(epoch)
        if run.grad_clip:
            nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], run.grad_clip)
        self.scaler.step(run.optimizer)
        self.scaler.update()
        mark("optimizer")
        tau = run.ema.decays[step]  # the same decay schedule as ours; only the update differs
        with torch.no_grad():
            for p_t, p_s in zip(self.teacher_params, self.student_params):
                p_t.data = tau * p_t.data + (1 - tau) * p_s.data
        mark("ema")

    def close(self) -> None:
        # Dropping the last iterator of a persistent-worker DataLoader ends its worker processes.
        self.batches.close()
        del self.batches, self.loader


# --------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseClock:
    """The profiling pass's `mark`: waits for the device, then charges the time since the last mark to `phase`."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    last: float = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


def measure(setup: Setup, device: torch.device, warmup: int, steps: int, profile_steps: int) -> dict[str, Any]:
    """Warm-up, the timed pass (no synchronisation inside it) and the profiling pass of one set-up."""
    start = time.perf_counter()
    for _ in range(warmup):
        setup.step(no_mark)
    synchronize(device)
    warmup_s = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(steps):
        setup.step(no_mark)
    synchronize(device)
    seconds = time.perf_counter() - start

    clock = PhaseClock(device)
    for _ in range(profile_steps):
        clock.start()  # time between steps (the loop itself) is nobody's phase
        setup.step(clock)
    split = {phase: 1e3 * s / profile_steps for phase, s in clock.seconds.items()} if profile_steps else {}
    return {"warmup_s": round(warmup_s, 3), "seconds": seconds, "split_ms": split}


def run_setup(name: str, args: argparse.Namespace, device: torch.device, data_root: Path) -> dict[str, Any]:
    method, variant = name.split("_")
    overrides = [override.removeprefix(f"{method}:") for override in args.override
                 if not override.startswith(tuple(f"{other}:" for other in EXPERIMENTS if other != method))]
    if variant == "reference":
        overrides.append("trainer.channels_last=false")  # the anchors train NCHW
    cfg = compose_config(EXPERIMENTS[method], device, data_root, args.batch_size, variant == "compiled", overrides)
    cpu_name = platform.processor() or platform.machine()
    record: dict[str, Any] = {
        "name": name, "experiment": EXPERIMENTS[method], "variant": variant, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
        "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
        "profile_steps": args.profile_steps, "images_per_s": None, "error": None,
    }
    # The first calls of a compiled forward compile it: at least one warm-up step keeps that out of the timing.
    warmup = max(args.warmup, 1) if variant == "compiled" else args.warmup
    record["warmup"] = warmup
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup: Setup | None = None
    try:
        if variant == "reference":
            setup = Reference(cfg, device, args.workers, args.reference_precision)
        else:
            setup = Ours(cfg, device)
        record.update(setup.describe)
        record["views"] = [recipe.size for recipe in setup.run.augmenter.views]
        timing = measure(setup, device, warmup, args.steps, args.profile_steps)
    except Exception as error:
        if variant != "compiled" or isinstance(error, UserError):
            raise
        # torch.compile can fail for reasons outside this code (no C++ compiler, an unsupported op): keep going.
        record["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"[:2000]
        timing = None
    finally:
        if setup is not None:
            setup.close()
        del setup
        gc.collect()
        if variant == "compiled":
            torch._dynamo.reset()  # compiled graphs of one set-up must not serve (or evict) the next
    if timing is not None:
        step_s = timing["seconds"] / args.steps
        split = timing["split_ms"]
        profiled = sum(split.values())
        data_ms = split.get("fetch", 0.0) + split.get("augment", 0.0)
        record.update({
            "images_per_s": round(args.batch_size / step_s, 1),
            "step_ms": round(1e3 * step_s, 3),
            "warmup_s": timing["warmup_s"],
            "split_ms": {phase: round(ms, 3) for phase, ms in split.items()},
            "profiled_step_ms": round(profiled, 3) if split else None,
            "data_ms": round(data_ms, 3) if split else None,
            # shares of the profiled (synchronised) step: data is what the device waits for or spends on views
            "share": {"data": data_ms / profiled, **{p: split[p] / profiled for p in PHASES[2:]}} if split else None,
        })
    if device.type == "cuda":
        record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.empty_cache()
    return record


# --------------------------------------------------------------------------------------------- report


def print_table(records: list[dict[str, Any]], cuda: bool) -> None:
    header = f"{'setup':<16}{'images/s':>10}{'vs ref':>8}{'step ms':>10} | {'data':>13}{'fwd+bwd':>15}" \
             f"{'optimiser':>14}{'EMA':>14}"
    header += f" | {'peak GPU MiB':>12}" if cuda else ""
    print(header)
    print("-" * len(header))
    for r in records:
        if r["error"]:
            print(f"{r['name']:<16}  failed: {r['error'][:150]}")
            continue
        speedup = f"{r['vs_reference']:.2f}x" if r.get("vs_reference") else "-"
        row = f"{r['name']:<16}{r['images_per_s']:>10.1f}{speedup:>8}{r['step_ms']:>10.1f} |"
        if r["share"]:
            parts = [(r["data_ms"], r["share"]["data"])]
            parts += [(r["split_ms"][p], r["share"][p]) for p in ("forward_backward", "optimizer", "ema")]
            row += "".join(f"{ms:>8.1f} {100 * share:>3.0f}%" for ms, share in parts)
        else:
            row += f"{'(no profiling pass)':>56}"
        row += f" | {r['peak_gpu_memory_mib']:>12.0f}" if cuda else ""
        print(row)
    print("split: ms per step and share of the synchronised profiling step; data = fetch + augment "
          "(reference: the wait for DataLoader workers + the copy to the device)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="training device (default: cuda when present, else cpu)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per set-up (default: 30)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first; they include torch.compile's compilation (default: 5, at least "
                             "1 for compiled set-ups)")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help="steps of the synchronised profiling pass that splits the step (default: --steps; "
                             "0 skips it)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (default: 256)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader worker processes of the reference loops (default: os.cpu_count())")
    parser.add_argument("--reference-precision", choices=["auto", *PRECISIONS], default="auto",
                        help="the reference loops' precision; auto: fp16 autocast + GradScaler on CUDA "
                             "(solo-learn's CIFAR recipe, precision: 16), fp32 on the CPU (default: auto)")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=SETUPS, metavar="SETUP",
                        help=f"set-ups to run, in this order (default: all: {' '.join(SETUPS)})")
    parser.add_argument("--data-root", type=Path,
                        help="folder holding cifar-10-batches-py (real CIFAR-10); default: synthetic CIFAR-10 "
                             "in a temporary folder")
    parser.add_argument("--override", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="extra Hydra override of every set-up's config, or with a byol: or dino: prefix of "
                             "that method's set-ups only (repeatable), e.g. byol:backbone.kwargs.stem=imagenet")
    parser.add_argument("--json", type=Path, default=Path("bench/pretrain.json"),
                        help="write the records here (default: bench/pretrain.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default: 0)")
    args = parser.parse_args(argv)
    if args.profile_steps is None:
        args.profile_steps = args.steps
    problems = [f"--{name.replace('_', '-')} must be >= {low}" for name, low in
                (("steps", 1), ("warmup", 0), ("profile_steps", 0), ("batch_size", 1), ("workers", 0))
                if getattr(args, name) < low]
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda but no CUDA device is visible")
    if problems:
        parser.error("; ".join(problems))
    if args.reference_precision == "auto":
        args.reference_precision = "fp16" if args.device == "cuda" else "fp32"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as scratch:
        if args.data_root is not None:
            data_root, data = args.data_root, f"CIFAR-10 from {args.data_root}"
            per_epoch = 50_000 // args.batch_size
            if max(args.warmup, 1) + args.steps + args.profile_steps > per_epoch:
                print(f"warning: more steps than the {per_epoch} of an epoch; compiled set-ups recompile for the "
                      "next epoch, inside the measurement", file=sys.stderr)
        else:
            # One epoch covers warm-up, timed and profiling steps: an epoch change would recompile (the epoch is an
            # argument of the compiled forward) and restart the reference's DataLoader pipeline mid-measurement.
            count = args.batch_size * (max(args.warmup, 1) + args.steps + args.profile_steps)
            data_root = write_synthetic_cifar10(Path(scratch), count, args.seed)
            data = f"synthetic CIFAR-10, {count} random images"
        print(f"{data}; device {device.type}; batch {args.batch_size}; {args.warmup} warm-up + {args.steps} timed "
              f"+ {args.profile_steps} profiled steps; reference: {args.workers} workers, "
              f"{args.reference_precision}; torch {torch.__version__}", flush=True)
        records = []
        for name in args.setups:
            started = time.perf_counter()
            try:
                record = run_setup(name, args, device, data_root)
            except UserError as error:
                sys.exit(f"error: {error}")
            records.append(record)
            status = f"failed ({record['error'][:100]})" if record["error"] else f"{record['images_per_s']} images/s"
            print(f"  {name}: {status} [{time.perf_counter() - started:.0f} s]", flush=True)

    for record in records:
        method = record["name"].split("_")[0]
        reference = next((r for r in records if r["name"] == f"{method}_reference" and r["images_per_s"]), None)
        ok = reference is not None and record["images_per_s"]
        record["vs_reference"] = round(record["images_per_s"] / reference["images_per_s"], 3) if ok else None
    print()
    print_table(records, device.type == "cuda")
    environment = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "data": data, "workers": args.workers,
        "reference_precision": args.reference_precision, "overrides": args.override,
    }
    atomic_write_text(args.json, json.dumps({"environment": environment, "results": records}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
