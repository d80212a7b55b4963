"""torchrun on the CPU with gloo: two processes train like one process with the same global batch."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.fixtures import run_module, write_fmnist
from tests.test_pretrain import ROOT, assert_same_end, tiny


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fmnist(tmp_path_factory.mktemp("data"), train=64, test=16)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def two_process_overrides(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    # A small lr: float-level differences between one and two processes (reduction order) stay float-level. The
    # crop scale is pinned (byol_fmnist's own [0.5, 1] happens to draw, on this fixture, a second batch that
    # amplifies them ~1000-fold within one step; 0.49 or 0.25 do not, so this is chaos, not a mismatch). So is the
    # network, to the full-width imagenet stem: on byol_fmnist's half-width stride2 one the stem's weights differ by
    # 1e-4 after two steps at lr 0.05 and by ~1e-7 at lr 0.005, a gap that scales with the lr like amplified noise.
    return tiny(data_root, run_dir, "trainer.epochs=1", "method.sync_batchnorm=true", "optim.lr=0.05",
                "augment.base.crop_scale=[0.25,1.0]", "backbone.kwargs.stem=imagenet", "backbone.kwargs.width=64",
                *extra)


def one_and_two_processes(tmp_path: Path, overrides: Callable[[Path, Path], list[str]]) -> tuple[dict, dict]:
    """The run `overrides(data_root, run_dir)` describes, in this process and under torchrun on two processes, on
    32 images (2 steps of the global batch 16): their checkpoints, which must hold the same model (weights and
    buffers) up to float reduction order.

    Two steps: the two runs differ only in float reduction order (~1e-7), which BatchNorm over tiny batches and the
    optimiser (LARS most) amplify several-fold per step, so a long run drifts apart while every step computes the
    same thing.
    """
    data_root = write_fmnist(tmp_path / "data", train=32, test=16)
    assert run_module("ssl.pretrain", *overrides(data_root, tmp_path / "one")) == 0  # in this process
    double = torchrun("-m", "ssl.pretrain", *overrides(data_root, tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert one["step"] == two["step"] == 2
    assert one["model"].keys() == two["model"].keys()
    for name, tensor in one["model"].items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, two["model"][name]), name
            continue
        # 1e-5 relative to the tensor's scale (elements near zero carry absolute float noise only)
        assert (two["model"][name] - tensor).abs().max() <= 1e-5 * tensor.abs().max() + 1e-8, name
    return one, two


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one, _ = one_and_two_processes(tmp_path, two_process_overrides)
    assert any(name.startswith("method.teacher.") for name in one["model"])
    assert any(name.startswith("method.predictor.") for name in one["model"])


def dino_overrides(data_root: Path, run_dir: Path) -> list[str]:
    # dino_fmnist (ResNet-18, BatchNorm head, multi-crop, per-parameter clipping) with small heads, two local crops
    # and SGD: AdamW's first steps are ~lr * sign(gradient), which would turn float noise on near-zero gradients
    # into whole-lr differences between the two runs.
    return ["+experiment=dino_fmnist", "logger=none", "device=cpu", f"data.root={data_root}", f"run_dir={run_dir}",
            "data.batch_size=16", "trainer.epochs=1", "trainer.warmup_epochs=0", "trainer.log_every=1",
            "trainer.knn_every_epochs=0", "augment.local_crops=2", "optim=sgd", "optim.lr=0.05",
            "method.kwargs.out_dim=64", "method.kwargs.hidden_dim=32", "method.kwargs.bottleneck_dim=16"]


def test_dino_on_two_processes_matches_one_process_centre_included(tmp_path):
    # The centre is a moving average of the teacher's outputs over the global batch. Each process holds half of the
    # batch, so only the all-reduce in `updated_center` gives both processes the one process's centre; the second
    # step's teacher targets, and so its gradients, depend on it.
    one, _ = one_and_two_processes(tmp_path, dino_overrides)
    center = one["model"]["method.center"]
    assert center.shape == (64,) and center.abs().min() > 0  # moved from its zero start in every prototype


@pytest.fixture(scope="module")
def worker_run(data_root, tmp_path_factory) -> tuple[Path, dict]:
    """Two epochs on two processes through tests/distributed_worker.py (a real `ssl.train.train` run): its folder
    (the first epoch's copy beside it, in epoch_1/) and what the ranks reported. Two torchrun starts cost most of a
    test here, so the resume test continues this run's first epoch."""
    tmp = tmp_path_factory.mktemp("worker")
    result = tmp / "result.json"
    run = torchrun("-m", "tests.distributed_worker", str(result),
                   *two_process_overrides(data_root, tmp / "run", "trainer.epochs=2"))
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "run", json.loads(result.read_text())


def test_ranks_end_with_identical_teachers_and_rank_zero_alone_writes(worker_run):
    run_dir, report = worker_run
    assert report == {"world_size": 2, "teachers_identical": True}
    written = sorted(p.name for p in run_dir.iterdir())
    assert written == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "student.pt", "teacher.pt"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("type") != "epoch"] == list(range(1, 9))  # one writer, no duplicates


def test_two_process_run_resumes_from_its_saved_step(data_root, worker_run, tmp_path):
    uninterrupted = worker_run[0]
    run_dir = Path(shutil.copytree(uninterrupted.parent / "epoch_1", tmp_path / "run"))  # as the first epoch left it
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    resumed = torchrun("-m", "ssl.pretrain", *two_process_overrides(data_root, run_dir, "trainer.epochs=2",
                                                                     "resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4 (epoch 1)" in resumed.stdout
    assert_same_end(run_dir, uninterrupted)  # bitwise: weights, optimiser, EMA, RNG and the exports


def test_a_global_batch_that_does_not_split_is_refused(data_root, tmp_path):
    result = torchrun("-m", "ssl.pretrain", *two_process_overrides(data_root, tmp_path / "run", "data.batch_size=15"))
    assert result.returncode != 0
    assert "does not split evenly over 2 processes" in result.stderr
