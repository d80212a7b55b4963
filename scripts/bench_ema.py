"""Time ssl.ema's EMA.update and ema_model against their practical limit and the per-tensor state_dict loop.

    python -m scripts.bench_ema [--device cpu cuda] [--repeats 7] [--models resnet50] [--json bench/ema.json]

For each torchvision model (weights=None, default buffers="average" so every floating-point tensor moves):
  limit            one lerp_ over a single contiguous buffer with as many elements as the model's
                   floating-point parameters and buffers (same bytes read and written as any EMA update)
  EMA.update       ssl.ema.EMA(teacher, student, decays).update(): tensors matched and grouped once, at
                   construction (the training loop's path); target <= 1.25x the limit on ResNet-50
  ema_model        ssl.ema.ema_model(teacher, student, decay): matches and groups on every call (uncached);
                   target <= 1.6x the limit on ResNet-50
  state_dict loop  the blog-post update: per tensor v.copy_(v * d + (1 - d) * student_sd[k].detach()),
                   student_sd = student.state_dict() rebuilt each call
Each variant runs WARMUP untimed calls, then --repeats timed ones back to back (steady state: caches and clocks
settle over the first few calls); the table shows the median. On CUDA each call is bracketed by synchronisations.
"""

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from ssl.ema import EMA, ema_model
from ssl.files import atomic_write_text

MODELS = ("resnet18", "resnet50", "vit_b_16")
DECAY = 0.996
WARMUP = 5


def state_dict_loop(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    student_sd = student.state_dict()
    for k, v in teacher.state_dict().items():
        if v.dtype.is_floating_point:
            v.copy_(v * decay + (1 - decay) * student_sd[k].detach())


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def bench(name: str, device: torch.device, repeats: int) -> dict:
    student = getattr(torchvision.models, name)(weights=None).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    elements = sum(t.numel() for t in (*teacher.parameters(), *teacher.buffers()) if t.is_floating_point())
    flat_teacher = torch.zeros(elements, device=device)
    flat_student = torch.ones(elements, device=device)
    ema = EMA(teacher, student, [DECAY] * (WARMUP + repeats))
    variants = {
        "limit": lambda: flat_teacher.lerp_(flat_student, 1 - DECAY),
        "ema_update": ema.update,
        "ema_model": lambda: ema_model(teacher, student, DECAY),
        "state_dict_loop": lambda: state_dict_loop(teacher, student, DECAY),
    }
    seconds: dict[str, list[float]] = {}
    for key, fn in variants.items():
        for _ in range(WARMUP):
            fn()
        seconds[key] = [timed(fn, device) for _ in range(repeats)]
    ms = {key: 1e3 * statistics.median(values) for key, values in seconds.items()}
    return {
        "model": name,
        "device": str(device),
        "elements": elements,
        "limit_ms": ms["limit"],
        "ema_update_ms": ms["ema_update"],
        "ema_update_ratio_to_limit": ms["ema_update"] / ms["limit"],
        "ema_model_ms": ms["ema_model"],
        "ratio_to_limit": ms["ema_model"] / ms["limit"],
        "state_dict_loop_ms": ms["state_dict_loop"],
        "speedup": ms["state_dict_loop"] / ms["ema_model"],
        "all_ms": {key: [round(1e3 * s, 3) for s in values] for key, values in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=devices,
                        help=f"devices to time (default: {' '.join(devices)})")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant (default: 7)")
    parser.add_argument("--json", type=Path, default=Path("bench/ema.json"), help="default: bench/ema.json")
    args = parser.parse_args()
    if args.repeats < 1:
        sys.exit("error: --repeats must be >= 1")
    if "cuda" in args.device and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")

    header = f"{'device':<6} {'model':<9} {'elements':>11} {'limit ms':>9} {'EMA.update ms':>13} {'ratio':>6} " \
             f"{'ema_model ms':>12} {'ratio':>6} {'state_dict loop ms':>18} {'speedup':>8}"
    print(header)
    rows = []
    for device in map(torch.device, args.device):
        for name in args.models:
            row = bench(name, device, args.repeats)
            rows.append(row)
            print(f"{device.type:<6} {name:<9} {row['elements']:>11,} {row['limit_ms']:>9.2f} "
                  f"{row['ema_update_ms']:>13.2f} {row['ema_update_ratio_to_limit']:>5.2f}x "
                  f"{row['ema_model_ms']:>12.2f} {row['ratio_to_limit']:>5.2f}x {row['state_dict_loop_ms']:>18.2f} "
                  f"{row['speedup']:>7.1f}x", flush=True)
    environment = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if "cuda" in args.device else None,
        "decay": DECAY,
        "warmup": WARMUP,
        "repeats": args.repeats,
    }
    atomic_write_text(args.json, json.dumps({"environment": environment, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
