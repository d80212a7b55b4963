"""`python -m ssl.pretrain +experiment=byol_cifar [key=value ...]`: self-supervised pretraining.

Writes to `run_dir`: config.yaml, metrics.jsonl, checkpoint.pt (full state, for resume=auto), teacher.pt and
student.pt (backbone exports that `ssl.load_backbone` and `python -m ssl.linear_eval` read).
"""

import hydra
from omegaconf import DictConfig

from ssl.errors import run_cli


@hydra.main(config_path="../configs", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    from ssl.train import train

    run_cli(lambda: train(cfg))


if __name__ == "__main__":
    main()
