"""What the downstream entry points share: the export and the device, its default data config, the report, and the
`baseline=random` comparison (the same evaluation of a randomly initialised backbone, printed beside every score)."""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig
from torch import nn

from ssl.data import BatchLoader, build_dataset
from ssl.device import resolve_device
from ssl.errors import UserError, os_failure
from ssl.eval.preprocess import check_channels
from ssl.files import atomic_write_text
from ssl.models.export import META_KEYS, load_backbone, load_export, random_backbone, save_export

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
ELSEWHERE = "run_dir=DIR writes the results elsewhere"
BASELINES = ("random",)
T = TypeVar("T")


def select_data_from_export() -> None:
    """Before Hydra parses the command line: without `data=...`, choose configs/data/<export's dataset>.yaml.

    Appending `data=<name>` to the arguments (rather than filling the config in later) keeps `data.root=...`
    and every other `data.*` override working exactly as with an explicit `data=<name>`.
    """
    args = sys.argv[1:]
    if any(arg.split("=", 1)[0].lstrip("+~") == "data" for arg in args):
        return
    position = next((i for i, arg in enumerate(sys.argv) if arg.startswith("ckpt=")), None)
    if position is None or sys.argv[position] == "ckpt=":
        return  # the entry point itself reports the missing ckpt
    dataset = load_export(sys.argv[position].split("=", 1)[1])["dataset"]
    if not (CONFIG_DIR / "data" / f"{dataset}.yaml").is_file():
        raise UserError(f"the export was trained on {dataset!r}, which has no configs/data/{dataset}.yaml; "
                        "pass data=<name> to choose the evaluation data")
    # Right after ckpt=, among the other overrides: Hydra's parser wants them in one run, not after --cfg etc.
    sys.argv.insert(position + 1, f"data={dataset}")


def checkpoint(cfg: DictConfig) -> Path:
    """The export named by `ckpt=`, which every downstream tool requires."""
    if not cfg.get("ckpt"):
        raise UserError("no checkpoint given; pass ckpt=PATH/teacher.pt (an export written by ssl.pretrain)")
    return Path(cfg.ckpt)


def load_ckpt(cfg: DictConfig) -> tuple[Path, torch.device, nn.Module]:
    """The export `ckpt=` names, the device `device=` names, and the export's backbone on it (in eval mode; its
    metadata in `backbone.export_meta`)."""
    ckpt = checkpoint(cfg)
    device = resolve_device(cfg.device)
    return ckpt, device, load_backbone(ckpt, device)


def require_data(cfg: DictConfig) -> None:
    """The `data` group must be chosen (by `data=...` or, on the command line, by the export's dataset)."""
    if cfg.get("data") is None:
        raise UserError("no data config chosen; pass data=<name> (a file in configs/data/)")


def results_dir(cfg: DictConfig, ckpt: Path, tool: str) -> Path:
    """`run_dir=` if given, else `<ckpt dir>/<tool>_<ckpt stem>/`: results stay beside the model they describe."""
    return Path(cfg.run_dir) if cfg.get("run_dir") else ckpt.parent / f"{tool}_{ckpt.stem}"


def write_report(directory: Path, name: str, report: dict[str, Any]) -> Path:
    """Write `report` as `<directory>/<name>.json` (atomically) and return the path.

    When it cannot be written the report goes to stdout before the error line: the evaluation is not lost.
    """
    path = directory / f"{name}.json"
    text = json.dumps(report, indent=2) + "\n"
    try:
        return atomic_write_text(path, text)
    except OSError as error:
        print(text, end="", flush=True)
        raise os_failure(error, then=f"the report is printed above; {ELSEWHERE}") from None


def finish(directory: Path, name: str, report: dict[str, Any], summary: str, *written: Path) -> dict[str, Any]:
    """Write `report` (`write_report`), name every file the run wrote and print its summary line; returns `report`."""
    path = write_report(directory, name, report)
    print("wrote " + " and ".join(str(p) for p in (path, *written)))
    print(summary)
    return report


def load_split(data_cfg: DictConfig, split: str, meta: dict[str, Any],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images and labels (both on `device`) of a data split (`train_split`, ...), and the class names.

    Image folders are decoded once into memory (in `data.num_workers` processes): downstream sets are expected
    to fit. Data whose channel count differs from the export's is refused.
    """
    dataset = build_dataset(data_cfg, split)
    loader = BatchLoader(dataset, data_cfg.batch_size, device, shuffle=False, drop_last=False, seed=0)
    batches = list(loader.epoch(0))
    images = torch.cat([images for images, _, _ in batches])
    labels = torch.cat([labels for _, labels, _ in batches])
    check_channels(meta, images.shape[1], f"data {data_cfg.name}")
    return images, labels, list(dataset.classes)


def save_downstream_export(path: Path, backbone: nn.Module, meta: dict[str, Any], **changes: Any) -> Path:
    """Export a trained-further backbone in the `teacher.pt` format, keeping the source export's metadata
    except `changes` (role, dataset, extra tensors such as a head)."""
    kept = {key: meta[key] for key in META_KEYS if key not in ("backbone", "feature_dim")}
    try:
        return save_export(path, backbone, **{**kept, **changes})
    except OSError as error:
        raise os_failure(error, then=ELSEWHERE) from None


def elapsed_since(start: float, device: torch.device) -> float:
    """Seconds since `start` (a `time.perf_counter()`), after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def baseline_kind(cfg: DictConfig) -> str | None:
    """`baseline=` checked before any work: None (off, the default) or one of `BASELINES`."""
    kind = cfg.get("baseline")
    if kind is not None and kind not in BASELINES:
        raise UserError(f"unknown baseline={kind}; choose one of: {', '.join(BASELINES)} (or null for none)")
    return kind


def evaluate_with_baseline(kind: str | None, backbone: nn.Module, seed: int, device: torch.device,
                           evaluate: Callable[[nn.Module], T]) -> tuple[T, T | None]:
    """`evaluate(backbone)`, and with a baseline also `evaluate` of a backbone of the same architecture, input size,
    channels and normalisation, randomly initialised from `seed` (`ssl.models.export.random_backbone`).

    A score alone does not say what pretraining bought: a random network's features already score well above
    chance, so every entry point runs the identical protocol on both and reports the difference.
    """
    result = evaluate(backbone)
    if kind is None:
        return result, None
    print(f"baseline={kind}: the same evaluation of a randomly initialised {backbone.export_meta['backbone']['name']}"
          f" (seed {seed})", flush=True)
    return result, evaluate(random_backbone(backbone.export_meta, seed, device))


def baseline_report(kind: str | None, seed: int, result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report's `baseline` block: the baseline's results in the export's structure, with its kind and seed."""
    return None if result is None else {"kind": kind, "seed": seed, **result}


def summary_line(scores_of: Callable[[dict[str, Any]], dict[str, float]], result: dict[str, Any],
                 baseline_result: dict[str, Any] | None = None, kind: str | None = None) -> str:
    """`name=value ...` for the scores `scores_of(result)` names, each followed by `(random x, +d)` with a baseline.

    The difference is taken between the printed (2-decimal) values, so the line's arithmetic checks out.
    """
    scores = scores_of(result)
    baseline = None if baseline_result is None else scores_of(baseline_result)
    parts = []
    for name, value in scores.items():
        part = f"{name}={value:.2f}"
        if baseline is not None:
            part += f" ({kind} {baseline[name]:.2f}, {round(value, 2) - round(baseline[name], 2):+.2f})"
        parts.append(part)
    return " ".join(parts)
