"""`python -m ssl.export ckpt=RUN/teacher.pt format=torchvision|torch.export|onnx [out=DIR] [device=cpu]`.

Converts an export into a file other code loads without this repository (see ssl/models/formats.py): torchvision
(ResNet) or timm (ViT) weights, a `torch.export` program (.pt2) or an ONNX graph, each with a JSON beside it that
records the input normalisation and the lines that load it. Files go beside the export unless `out=DIR`
(configs/export.yaml); every file written is printed.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssl.errors import run_cli
from ssl.eval import cli
from ssl.models.formats import writer


def export(cfg: DictConfig) -> list[Path]:
    """Write `cfg.ckpt` in format `cfg.format`; returns the files written (the converted model, then its JSON)."""
    write = writer(cfg.format)
    ckpt, _, backbone = cli.load_ckpt(cfg)
    directory = Path(cfg.out) if cfg.out else ckpt.parent
    directory.mkdir(parents=True, exist_ok=True)
    paths = write(backbone, ckpt, directory)
    for path in paths:
        print(f"wrote {path}")
    return paths


@hydra.main(config_path="../configs", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    run_cli(lambda: export(cfg))


if __name__ == "__main__":
    main()
