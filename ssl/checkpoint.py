"""Saving a run so that failures cannot damage it, and resuming only what fits the config.

The checkpoint and the two exports of the same epoch are written together through `ssl.files.atomic_save`: all
three are replaced or none is, and an OS error names the file.

Resuming reads the checkpoint's config first: values that decide what its tensors are (method, backbone, heads, data
channels, image size, optimiser) must not change; everything else may, with a notice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ssl.ema import EMA
from ssl.errors import UserError, is_system_error, os_failure
from ssl.files import atomic_save
from ssl.models.export import export_payload, input_meta


def kept_note(checkpoint_path: Path) -> str:
    """What a failed run leaves to continue from."""
    return f"the last good {checkpoint_path} is kept" if checkpoint_path.exists() else "nothing was saved yet"


# ---------------------------------------------------------------------------------------------------------
# Saving and resuming


class SavedRun(Protocol):
    """What `save_checkpoint` reads of a run: an `ssl.train.Pretraining`, described here rather than imported
    because the training loop imports this module."""

    dataset: Any
    method: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    steps_per_epoch: int


def save_checkpoint(run_dir: Path, run: SavedRun, config: dict[str, Any], step: int, epoch: int,
                    device: torch.device, wandb_id: str | None = None) -> None:
    """RUN_DIR/checkpoint.pt (weights, optimiser, EMA, RNG and step: all a bit-identical continuation needs, and the
    run's wandb id, which a resumed run continues) and the teacher and student exports of the same `epoch`: the
    three files are replaced together or not at all."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
    checkpoint = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "ema": run.ema.state_dict(),
                  "rng": rng, "step": step, "epoch": epoch, "steps_per_epoch": run.steps_per_epoch, "config": config,
                  "wandb_id": wandb_id}
    data = config["data"]
    meta = {**input_meta(data), "dataset": data["name"], "num_classes": run.dataset.num_classes,
            "method": config["method"]["name"], "epoch": epoch}
    atomic_save({run_dir / "checkpoint.pt": checkpoint,
                 run_dir / "teacher.pt": export_payload(run.method.teacher.backbone, role="teacher", **meta),
                 run_dir / "student.pt": export_payload(run.method.student.backbone, role="student", **meta)})


# What the checkpoint's tensors (and the optimiser's state) are made of: a resumed run must keep these values.
STRUCTURE_KEYS = ("method.name", "method.kwargs", "backbone.name", "backbone.kwargs", "data.channels",
                  "data.image_size", "data.num_classes", "optim.name")
# Where and how a session runs, not what it learns: free to differ between sessions, not worth a notice.
SESSION_KEYS = ("name", "run_dir", "resume", "device", "logger", "data.root", "data.download", "data.num_workers",
                "trainer.log_every", "trainer.compile", "trainer.knn_every_epochs", "trainer.knn_train_images",
                "trainer.knn_test_images")


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None or resume is False:
        return None
    if resume == "auto":
        path = run_dir / "checkpoint.pt"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"resume={resume}: no such checkpoint; pass resume=auto or the path of a checkpoint.pt")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if is_system_error(error):  # the disk or a permission, not the file
            raise os_failure(error, path) from None
        raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}); pass another resume path") from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} is not a training checkpoint (an export? resume takes RUN_DIR/checkpoint.pt)")
    return state


@dataclass
class Resume:
    """A checkpoint checked against the config it is resumed under; `notices` say what differs."""

    path: Path
    state: dict[str, Any]
    notices: list[str] = field(default_factory=list)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, steps_per_epoch: int,
                device: torch.device) -> int:
        """Load the state into a freshly built run (bit-identical continuation when nothing changed); returns the
        step to continue from."""
        state = self.state
        check_tensors_fit(self.path, model.state_dict(), state["model"])
        model.load_state_dict(state["model"])
        fresh = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(optimizer.param_groups, fresh):
            group.update(settings)  # hyperparameters come from the config (a new batch size rescales the probe's lr)
        ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step, saved_steps = state["step"], state.get("steps_per_epoch", steps_per_epoch)
        if saved_steps != steps_per_epoch:  # a new batch size or data.limit: steps count in other units
            epoch, done = divmod(step, saved_steps)
            self.notices.append(f"steps per epoch {saved_steps} -> {steps_per_epoch}: continuing at the start of "
                                f"epoch {epoch + 1}" + (f", whose {done} finished steps are redone" if done else ""))
            step = ema.step = epoch * steps_per_epoch
        return step


def resume_state(config: Mapping[str, Any], run_dir: Path) -> Resume | None:
    """The checkpoint this run continues (None for a fresh run), refused in one line before anything is built or
    loaded when it cannot continue under `config` (the run's resolved config)."""
    path = find_resume_checkpoint(config["resume"], run_dir)
    if path is None:
        if (run_dir / "checkpoint.pt").exists():
            raise UserError(f"{run_dir} already holds a run (checkpoint.pt); continue it with resume=auto, "
                            "or start a new one with another run_dir")
        return None
    state = load_checkpoint(path)
    if "config" not in state:
        return Resume(path, state, [f"{path} records no config (an older version wrote it): resuming without "
                                    "checking that it fits this one"])
    saved, now = _flatten(state["config"]), _flatten(config)
    differing = [key for key in sorted(saved.keys() | now.keys())
                 if saved.get(key, _UNSET) != now.get(key, _UNSET) and not _under(key, SESSION_KEYS)]
    refused = ", ".join(f"{key} {_show(saved.get(key, _UNSET))} vs {_show(now.get(key, _UNSET))}"
                        for key in differing if _under(key, STRUCTURE_KEYS))
    if refused:
        raise UserError(f"cannot resume {path}: the model it holds differs (checkpoint vs now: {refused}); resume "
                        f"with the checkpoint's values (see {path.parent / 'config.yaml'}) or start a new run_dir")
    if not differing:
        return Resume(path, state)
    changes = ", ".join(f"{key} {_show(saved.get(key, _UNSET))} -> {_show(now.get(key, _UNSET))}" for key in differing)
    return Resume(path, state, [f"changed since the checkpoint: {changes}; the weights and optimiser state carry "
                                "over, the lr, weight-decay and EMA schedules are rebuilt from the new values"])


def check_tensors_fit(path: Path, expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Refuse in one line a checkpoint whose tensors do not fit the model (`load_state_dict` would fail in many)."""
    differences = [f"{key} missing from the checkpoint" for key in sorted(expected.keys() - saved.keys())]
    differences += [f"{key} only in the checkpoint" for key in sorted(saved.keys() - expected.keys())]
    differences += [f"{key} {tuple(saved[key].shape)} vs {tuple(expected[key].shape)}"
                    for key in sorted(expected.keys() & saved.keys()) if saved[key].shape != expected[key].shape]
    if differences:
        raise UserError(f"cannot resume {path}: {len(differences)} of its tensors do not fit the model this config "
                        f"builds (first: {differences[0]}); resume with the config it was trained with or start a "
                        "new run_dir")


_UNSET = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else str(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"dotted.key": leaf value}; lists stay whole."""
    if isinstance(tree, Mapping):
        return {key: leaf for name, value in tree.items() for key, leaf in _flatten(value, f"{prefix}{name}.").items()}
    return {prefix.removesuffix("."): tree}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)
