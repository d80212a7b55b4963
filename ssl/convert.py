"""`python -m ssl.convert source=FILE [out=teacher.pt] [stem=...] [role=...] [input_size=...] [mean=[...]] [std=[...]]`.

Turns weights downloaded from elsewhere (torchvision, timm, DINO, solo-learn) into an export in the `teacher.pt`
format, so a published model is scored with the same protocol as a run of this repository (ssl/models/convert.py
for the layouts it reads; configs/convert.yaml for the options). Nothing is written unless the whole file converts,
and an existing `out` is never replaced.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssl.errors import UserError, os_failure, run_cli
from ssl.models.convert import convert
from ssl.models.export import save_export

DEFAULT_INPUT_SIZE = 224


def convert_source(cfg: DictConfig) -> Path:
    """Write the export of `cfg.source` to `cfg.out` (or beside the source) and return its path."""
    if not cfg.source:
        raise UserError("no source given; pass source=PATH of the downloaded weights")
    source = Path(cfg.source)
    out = Path(cfg.out) if cfg.out else source.with_name(f"{source.stem}.ssl.pt")
    if out.exists():
        raise UserError(f"{out} exists and is kept; pass another out= or remove it")
    backbone_name = cfg.backbone.name if cfg.get("backbone") else None
    converted = convert(source, cfg.role, backbone_name, cfg.stem)
    backbone = converted.backbone
    channels = backbone.spec["kwargs"]["in_channels"]
    if len(cfg.mean) != channels or len(cfg.std) != channels:
        raise UserError(f"the backbone takes {channels}-channel images but mean={list(cfg.mean)} and "
                        f"std={list(cfg.std)}; pass {channels} values each")
    input_size = cfg.input_size or backbone.spec["kwargs"].get("image_size", DEFAULT_INPUT_SIZE)
    method = cfg.method or ("dino" if converted.layout == "DINO checkpoint" else "unknown")
    try:
        save_export(out, backbone, input_size=input_size, channels=channels, mean=list(cfg.mean), std=list(cfg.std),
                    dataset=cfg.dataset, num_classes=cfg.num_classes, method=method, role=converted.role,
                    epoch=converted.epoch)
    except OSError as error:
        raise os_failure(error, then="pass another out=") from None
    spec = backbone.spec
    arguments = ", ".join(f"{key}={value}" for key, value in spec["kwargs"].items())
    dropped = sorted({name.split(".")[0] + ".*" for name in converted.dropped})
    left_out = f"; left out {len(converted.dropped)} tensors: {', '.join(dropped)}" if dropped else ""
    print(f"wrote {out}: {spec['name']} ({arguments}; {backbone.feature_dim}-d features), the {converted.role} "
          f"network of the {converted.layout} {source}{left_out}")
    print(f"inputs: {input_size} px, mean {list(cfg.mean)}, std {list(cfg.std)}; evaluate it as a run's export, "
          f"e.g. python -m ssl.linear_eval ckpt={out} data.root=DIR")
    return out


@hydra.main(config_path="../configs", config_name="convert", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: convert_source(cfg))


if __name__ == "__main__":
    main()
