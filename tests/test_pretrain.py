"""`python -m ssl.pretrain` end to end on a tiny Fashion-MNIST-format fixture, on the CPU: in a fresh interpreter where
that matters (the finished run the tests share, a Ctrl-C, nothing but one error line), else in this process through
the same entry point (`tests.fixtures.run_module`)."""

import json
import math
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

import ssl
import ssl.train
from ssl.models import backbones
from ssl.models.vit import VisionTransformer
from ssl.run_lock import LOCK_NAME
from ssl.train import Pretraining
from tests.fixtures import run_module, write_fmnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fmnist(tmp_path_factory.mktemp("data"), train=96, test=32)


def tiny(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["+experiment=byol_fmnist", "logger=none", "device=cpu", f"data.root={data_root}", f"run_dir={run_dir}",
            "data.batch_size=16", "trainer.epochs=3", "trainer.warmup_epochs=1", "trainer.log_every=1",
            "method.kwargs.proj_hidden_dim=32", "method.kwargs.pred_hidden_dim=32", "method.kwargs.proj_output_dim=16",
            *extra]


def pretrain(*args: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl.pretrain", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **popen)


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("type") != "epoch"}


def epoch_knn(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["knn20"] for r in records if r.get("type") == "epoch"]


def differing(got, expected, where: str = "") -> list[str]:
    """Where two saved structures (dicts, lists, tensors, numbers) are not bitwise the same."""
    if isinstance(expected, dict):
        if got.keys() != expected.keys():
            return [f"{where}: keys {sorted(got)} vs {sorted(expected)}"]
        return [d for key in expected for d in differing(got[key], expected[key], f"{where}.{key}")]
    if isinstance(expected, (list, tuple)):
        if len(got) != len(expected):
            return [f"{where}: length {len(got)} vs {len(expected)}"]
        return [d for i, (g, e) in enumerate(zip(got, expected)) for d in differing(g, e, f"{where}[{i}]")]
    if isinstance(expected, torch.Tensor):
        return [] if torch.equal(got, expected) else [where]
    return [] if got == expected else [f"{where}: {got!r} vs {expected!r}"]


def assert_same_end(run: Path, reference: Path) -> None:
    """A resumed run ended bitwise where the uninterrupted one did: student, teacher, probe and buffers, optimiser
    state, EMA step and RNG in checkpoint.pt, and the teacher.pt / student.pt exports."""
    got, expected = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (run, reference))
    assert any(name.startswith("method.teacher.") for name in expected["model"])
    assert expected["optimizer"]["state"], "the optimiser holds per-parameter state (momentum) to compare"
    for key in ("step", "epoch", "model", "optimizer", "ema", "rng"):
        assert differing(got[key], expected[key], key) == []
    for export in ("teacher.pt", "student.pt"):
        got, expected = (torch.load(d / export, weights_only=True)["state_dict"] for d in (run, reference))
        assert differing(got, expected, export) == []


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny run of 3 epochs (kNN monitor on), by `python -m ssl.pretrain`: its folder and the finished process."""
    run = tmp_path_factory.mktemp("finished") / "run"
    return run, pretrain(*tiny(data_root, run))


def test_run_writes_config_metrics_checkpoint_and_exports(data_root, finished, capsys):
    run, result = finished
    assert result.returncode == 0, result.stderr
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "teacher.pt",
                                               "student.pt"}
    assert f"python -m ssl.linear_eval ckpt={run / 'teacher.pt'}" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("type") != "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 19))  # 96 images / 16 = 6 steps x 3 epochs
    assert {"loss", "lr", "tau", "probe_acc", "images_per_s"} <= steps[0].keys()
    # BYOL's cosine over all 18 steps from byol_fmnist's 0.96: the last step is just short of 1
    assert steps[-1]["tau"] == pytest.approx(1 - 0.04 * (1 + math.cos(math.pi * 17 / 18)) / 2)
    assert [r["epoch"] for r in records if r.get("type") == "epoch"] == [1, 2, 3]

    export = torch.load(run / "teacher.pt", weights_only=True)
    assert export["role"] == "teacher" and export["method"] == "byol" and export["channels"] == 1
    assert export["dataset"] == "fmnist" and export["epoch"] == 3 and export["input_size"] == 28
    backbone = ssl.load_backbone(run / "teacher.pt")
    assert backbone(torch.zeros(2, 1, 28, 28)).shape == (2, backbone.feature_dim)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    teacher_backbone = {k.removeprefix("method.teacher.backbone."): v for k, v in state["model"].items()
                        if k.startswith("method.teacher.backbone.")}
    assert all(torch.equal(teacher_backbone[k], v) for k, v in export["state_dict"].items())
    assert state["step"] == 18 and state["ema"]["step"] == 18

    before = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert run_module("ssl.pretrain", *tiny(data_root, run)) == 2  # a fresh run must not overwrite a finished one
    stderr = capsys.readouterr().err
    assert "already holds a run" in stderr and "resume=auto" in stderr
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_after_sigint_reproduces_the_uninterrupted_losses(data_root, finished, tmp_path, capsys):
    reference, result = finished
    assert result.returncode == 0, result.stderr

    run = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "ssl.pretrain", *tiny(data_root, run)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert not (run / LOCK_NAME).exists()  # released on Ctrl-C too
    stopped_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < stopped_at < 18, "the signal must arrive mid-training"

    capsys.readouterr()
    assert run_module("ssl.pretrain", *tiny(data_root, run, "resume=auto")) == 0
    assert f"at step {stopped_at}" in capsys.readouterr().out
    expected, got = step_losses(reference), step_losses(run)
    assert sorted(got) == sorted(expected)
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(expected)], rel=1e-6)
    # the online kNN monitor draws no random number and changes nothing: its scores repeat too
    assert epoch_knn(run) == epoch_knn(reference) and len(epoch_knn(run)) == 3
    assert_same_end(run, reference)


def test_resume_with_drop_path_continues_the_random_stream(data_root, tmp_path, monkeypatch, capsys):
    # A ViT with stochastic depth draws its drop masks from the global RNG at every step (the augmentation is keyed
    # and draws nothing), so only a restored RNG state gives the uninterrupted run's masks after the resume. The ViT
    # is registered here 2 blocks deep and 32 wide (ViT-Tiny's 12 x 192 would cost most of a minute on this CPU);
    # the second block drops its branches with probability 0.5.
    monkeypatch.setitem(backbones.BACKBONES, "vit_micro", partial(VisionTransformer, dim=32, depth=2, num_heads=2))
    vit = ["backbone=vit_tiny", "backbone.name=vit_micro", "backbone.kwargs.patch_size=14",
           "backbone.kwargs.drop_path_rate=0.5", "data.limit=48", "trainer.epochs=2", "trainer.knn_every_epochs=0"]
    assert run_module("ssl.pretrain", *tiny(data_root, tmp_path / "reference", *vit)) == 0

    run = tmp_path / "interrupted"
    train_step = ssl.train.train_step

    def then_interrupt(run: Pretraining, forward, images, labels, indices, epoch: int, step: int, **kwargs):
        """Ctrl-C to this process as step 2 ends: the run's own handler takes it, as from a terminal."""
        result = train_step(run, forward, images, labels, indices, epoch, step, **kwargs)
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(ssl.train, "train_step", then_interrupt)
    assert run_module("ssl.pretrain", *tiny(data_root, run, *vit)) == 130
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2  # mid-epoch: 3 steps per epoch
    monkeypatch.setattr(ssl.train, "train_step", train_step)
    capsys.readouterr()
    assert run_module("ssl.pretrain", *tiny(data_root, run, *vit, "resume=auto")) == 0
    assert "at step 2" in capsys.readouterr().out
    assert_same_end(run, tmp_path / "reference")


def test_non_finite_loss_stops_and_keeps_the_last_good_files(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_module("ssl.pretrain", *tiny(data_root, run, "trainer.epochs=1", "trainer.knn_every_epochs=0")) == 0
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "teacher.pt", "student.pt")}
    capsys.readouterr()
    assert run_module("ssl.pretrain", *tiny(data_root, run, "resume=auto", "optim.lr=1e30", "trainer.epochs=4",
                                            "trainer.knn_every_epochs=0")) == 2
    stderr = capsys.readouterr().err
    last_line = stderr.strip().splitlines()[-1]  # after the progress lines
    assert last_line.startswith("error: loss became non-finite at step") and "is kept" in last_line
    assert stderr.count("error:") == 1 and "Traceback" not in stderr
    assert {name: (run / name).read_bytes() for name in before} == before


NO_DEVICE = "device=cuda" if not torch.cuda.is_available() else "device=tpu"


@pytest.mark.parametrize("override, message", [
    ("trainer.epochs=0", "trainer.epochs must be > 0"),
    ("method.ema.base=1.5", "method.ema.base is a decay and must lie in [0, 1]"),
    ("data.batch_size=512", "larger than the 96 images"),
    (NO_DEVICE, "device"),
])
def test_impossible_values_are_refused_in_one_line(data_root, tmp_path, capsys, override, message):
    args = tiny(data_root, tmp_path / "run", override)
    if override == NO_DEVICE:  # in a fresh interpreter, where a warning of the CUDA probe would reach stderr too
        result = pretrain(*args)
        returncode, stderr = result.returncode, result.stderr
    else:  # the same entry point in this process
        returncode, stderr = run_module("ssl.pretrain", *args), capsys.readouterr().err
    assert returncode == 2
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert stderr.startswith("error: ") and message in stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unknown_method_names_the_choices(data_root, tmp_path, capsys):
    assert run_module("ssl.pretrain", *tiny(data_root, tmp_path / "run", "method=simclr")) != 0
    stderr = capsys.readouterr().err
    assert "byol" in stderr and "dino" in stderr and "Traceback" not in stderr
