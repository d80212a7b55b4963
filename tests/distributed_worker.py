"""Run by torchrun from tests/test_distributed.py: a real `ssl.train.train` run whose ranks then compare teachers.

The loop itself never communicates teacher weights; this worker checks afterwards that every rank ended with the
bitwise-same teacher. It keeps the process group alive past `train` and captures the run's objects. As each epoch's
checkpoint is written, it copies the run folder to `epoch_<N>/` beside RESULT_JSON: what a run interrupted there
would leave, for a resumed run to continue.
Usage, from the repo root (so `ssl` is this package):
    torchrun --standalone --nproc_per_node=N -m tests.distributed_worker RESULT_JSON OVERRIDE...
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

import ssl.train
from ssl.run_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    result_path, overrides = Path(sys.argv[1]), sys.argv[2:]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("pretrain", overrides=overrides)
    captured = {}
    build = ssl.train.build_pretraining

    def capture(*args, **kwargs):
        captured["run"] = build(*args, **kwargs)
        return captured["run"]

    ssl.train.build_pretraining = capture
    save = ssl.train.save_checkpoint

    def save_and_keep(run_dir: Path, run, config, step: int, epoch: int, *args, **kwargs) -> None:
        save(run_dir, run, config, step, epoch, *args, **kwargs)
        shutil.copytree(run_dir, result_path.parent / f"epoch_{epoch}", ignore=shutil.ignore_patterns(LOCK_NAME))

    ssl.train.save_checkpoint = save_and_keep
    ssl.train.shutdown = lambda: None
    ssl.train.train(cfg)

    teacher = torch.cat([t.detach().flatten().double() for t in captured["run"].method.teacher.state_dict().values()])
    gathered = [torch.empty_like(teacher) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, teacher)
    if dist.get_rank() == 0:
        identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
        result_path.write_text(json.dumps({"world_size": dist.get_world_size(), "teachers_identical": identical}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
