"""The exported-backbone format (`teacher.pt`, `student.pt`): plain tensors plus the metadata to rebuild them.

An export is a dict that `torch.load(path, weights_only=True)` reads, so no code can ride along:

    format          "ssl-backbone"
    format_version  FORMAT_VERSION (readers refuse newer versions)
    backbone        {"name": str, "kwargs": dict} -- `build_backbone(name, **kwargs)` rebuilds the module
    feature_dim     width of the pooled embedding
    input_size      training resolution (pixels); channels: input channels
    mean, std       per-channel normalisation the backbone was trained with
    dataset, num_classes, method, role ("teacher"/"student"), epoch
    state_dict      the backbone's tensors, on the CPU
"""

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl.errors import UserError, is_system_error, os_failure
from ssl.files import atomic_save
from ssl.models.backbones import build_backbone

FORMAT = "ssl-backbone"
FORMAT_VERSION = 1
META_KEYS = ("backbone", "feature_dim", "input_size", "channels", "mean", "std", "dataset", "num_classes",
             "method", "role", "epoch")


def input_meta(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a backbone trained on the `data` config takes as input: the export's metadata that
    `ssl.eval.preprocess.eval_inputs` turns uint8 images with."""
    return {"input_size": data["image_size"], "channels": data["channels"], "mean": list(data["mean"]),
            "std": list(data["std"])}


def export_payload(backbone: nn.Module, **meta: Any) -> dict[str, Any]:
    """The export of `backbone` (built by `build_backbone`, so it carries `.spec`) with `meta` (see `META_KEYS`)."""
    meta = {"backbone": backbone.spec, "feature_dim": backbone.feature_dim, **meta}
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"export metadata lacks {missing}")
    state = {name: tensor.detach().cpu().clone() for name, tensor in backbone.state_dict().items()}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "state_dict": state}


def save_export(path: str | os.PathLike, backbone: nn.Module, **meta: Any) -> Path:
    """Write the export of `backbone` and `meta` to `path` atomically (an `OSError` names `path`)."""
    atomic_save({path: export_payload(backbone, **meta)})
    return Path(path)


def load_export(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate an export with `weights_only=True`; every failure is a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no export at {path}: pretraining writes RUN_DIR/teacher.pt (and student.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():  # torch's refusal of anything beyond tensors and plain data
            raise UserError(f"{path} holds pickled objects or code, not plain tensors; refusing to load it "
                            "(only exports written by ssl.pretrain are read)") from None
        raise UserError(f"{path} is not a readable export (not a torch.save file)") from None
    except Exception as error:  # truncated or foreign files raise many types; name the file and the cause
        if is_system_error(error):  # the disk or a permission, not the file
            raise os_failure(error, path) from None
        raise UserError(f"{path} is not a readable export ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        if isinstance(payload, dict) and {"student", "teacher", "optimizer"} <= payload.keys():
            raise UserError(f"{path} is a full training checkpoint, not a backbone export; "
                            "pass the teacher.pt written beside it")
        raise UserError(f"{path} is not an ssl backbone export (no format={FORMAT!r} marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} has export format version {version}, newer than this code reads "
                        f"({FORMAT_VERSION}); update the ssl package")
    missing = [key for key in (*META_KEYS, "state_dict") if key not in payload]
    if missing:
        raise UserError(f"{path} is an incomplete export (missing {missing}); re-export it")
    return payload


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the backbone of an export, frozen and in eval mode; its metadata is `module.export_meta`."""
    payload = load_export(path)
    spec = payload["backbone"]
    backbone = build_backbone(spec["name"], **spec["kwargs"])
    try:
        backbone.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise UserError(f"{path}: tensors do not fit backbone {spec['name']}: {str(error).splitlines()[0]}") from None
    return _as_loaded(backbone, {key: value for key, value in payload.items() if key != "state_dict"}, device)


def random_backbone(meta: dict[str, Any], seed: int, device: str | torch.device = "cpu") -> nn.Module:
    """A randomly initialised backbone of the exact architecture an export's metadata `meta` records, as
    `load_backbone` returns backbones (frozen, eval mode, `export_meta` = `meta`): the baseline that says how much
    of a score the architecture and protocol give without any training.

    The weights depend on `seed` alone: the initialisation draws from the global RNG seeded with it inside
    `torch.random.fork_rng`, which restores the caller's RNG state afterwards.
    """
    spec = meta["backbone"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(spec["name"], **spec["kwargs"])
    return _as_loaded(backbone, meta, device)


def _as_loaded(backbone: nn.Module, meta: dict[str, Any], device: str | torch.device) -> nn.Module:
    """Frozen, in eval mode (BatchNorm running statistics, no dropout), on `device`, carrying its metadata."""
    backbone.export_meta = dict(meta)
    backbone.requires_grad_(False)
    return backbone.eval().to(device)
