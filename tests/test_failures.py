"""Failures from outside the code, injected where a user's machine would misbehave: each ends in one `error:` line
(the exit status of `ssl.errors.run_cli`, no traceback) and leaves the last good files byte-identical."""

import errno
import io
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import ssl.train
from ssl.data import build_dataset
from ssl.distributed import Process
from ssl.errors import run_cli
from ssl.eval import cli
from ssl.models import build_backbone, save_export
from ssl.run_lock import LOCK_NAME, run_lock
from tests.fixtures import run_module, write_fmnist

ROOT = Path(__file__).resolve().parents[1]
SAVED = ("checkpoint.pt", "teacher.pt", "student.pt")  # what a failure must leave as it was


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fmnist(tmp_path_factory.mktemp("data"), train=32, test=8)  # 2 steps per epoch at batch 16


def config(data_root: Path, run_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("pretrain", ["+experiment=byol_fmnist", "logger=none", "device=cpu", f"data.root={data_root}",
                                    f"run_dir={run_dir}", "data.batch_size=16", "trainer.epochs=1",
                                    "trainer.warmup_epochs=0", "trainer.log_every=1",
                                    "method.kwargs.proj_hidden_dim=32", "method.kwargs.pred_hidden_dim=32",
                                    "method.kwargs.proj_output_dim=16", *extra])


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """A run of one finished epoch, to copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    ssl.train.train(config(data_root, run_dir))
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A private copy of `finished`. The .pt files are hard links (they are large): every write replaces a file by
    renaming over it, so a run here never changes the originals."""
    def link_or_copy(source: str, target: str) -> None:
        (os.link if source.endswith(".pt") else shutil.copy2)(source, target)

    return Path(shutil.copytree(finished, tmp_path / "run", copy_function=link_or_copy))


def snapshot(run_dir: Path, names=SAVED) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in names}


def fails_in_one_line(capsys, main) -> str:
    """Run `main` as an entry point does; it must exit non-zero with exactly one `error:` line. Returns the line."""
    with pytest.raises(SystemExit, match="^2$"):
        run_cli(main)
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if not line.startswith("epoch ")]  # progress lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def assert_clean(run_dir: Path) -> None:
    """No temporary file and no lock left behind."""
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or p.name == LOCK_NAME]
    assert not leftovers


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            self.handle.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)


# ---- the file system


def test_run_dir_blocked_by_a_file(data_root, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    line = fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, blocker / "run")))
    assert f"{blocker / 'run'}: Not a directory (ENOTDIR); {blocker} stands where a folder is needed" in line
    assert "nothing was saved yet" in line and "resume=auto" in line
    assert blocker.read_text() == "not a folder"


def test_disk_full_while_saving_keeps_the_last_good_checkpoint_and_exports(run_dir, data_root, capsys, monkeypatch):
    before = snapshot(run_dir)
    real_save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, handle):
        saves.append(obj)
        # checkpoint.pt and teacher.pt are written in full; the disk fills up during student.pt
        real_save(obj, FullDisk(handle, room=1 << 20) if len(saves) == 3 else handle)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    line = fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, run_dir, "resume=auto",
                                                                    "trainer.epochs=2")))
    assert line.startswith(f"error: {run_dir / 'student.pt'}: No space left on device (ENOSPC); free space on")
    assert f"the last good {run_dir / 'checkpoint.pt'} is kept; continue with: " in line
    assert line.endswith(f"resume=auto run_dir={run_dir}")
    assert len(saves) == 3 and snapshot(run_dir) == before  # all three files, or none
    assert_clean(run_dir)


def test_metrics_write_failure_names_the_file(data_root, tmp_path, capsys, monkeypatch):
    real_open = pathlib.Path.open

    def open_on_a_full_disk(path, *args, **kwargs):
        if path.name != "metrics.jsonl":
            return real_open(path, *args, **kwargs)
        return io.TextIOWrapper(FullDisk(io.BytesIO(), room=0), write_through=True)

    monkeypatch.setattr(pathlib.Path, "open", open_on_a_full_disk)
    run_dir = tmp_path / "run"
    line = fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, run_dir)))
    assert line.startswith(f"error: {run_dir / 'metrics.jsonl'}: No space left on device (ENOSPC)")
    assert "nothing was saved yet; start again with: " in line
    assert_clean(run_dir)


def test_unreadable_checkpoint_names_the_file(run_dir, data_root, capsys, monkeypatch):
    def permission_denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(torch, "load", permission_denied)
    line = fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, run_dir, "resume=auto")))
    assert line.startswith(f"error: {run_dir / 'checkpoint.pt'}: Permission denied (EACCES); fix its permissions")
    assert_clean(run_dir)


def test_unreadable_data_is_not_called_corrupt(data_root, capsys, monkeypatch):
    def io_error(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(pathlib.Path, "read_bytes", io_error)
    data_cfg = config(data_root, Path("unused")).data
    line = fails_in_one_line(capsys, lambda: build_dataset(data_cfg, "train"))
    images = data_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert line == f"error: {images}: Input/output error (EIO); the disk reported an I/O error: check it"


def test_report_that_cannot_be_written_is_printed_instead(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file")
    with pytest.raises(SystemExit, match="^2$"):
        run_cli(lambda: cli.write_report(blocker, "linear_eval", {"linear": {"top1": 81.5}}))
    out, err = capsys.readouterr()
    assert err == (f"error: {blocker / 'linear_eval.json'}: File exists (EEXIST); {blocker} stands where a folder is "
                   "needed: move it away; the report is printed above; run_dir=DIR writes the results elsewhere\n")
    assert '"top1": 81.5' in out and blocker.read_text() == "a file"


def test_downstream_export_on_a_full_disk_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    backbone = build_backbone("resnet18", in_channels=1)
    meta = {"input_size": 28, "channels": 1, "mean": [0.3], "std": [0.35], "dataset": "fmnist", "num_classes": 10,
            "method": "byol", "role": "teacher", "epoch": 1}
    path = save_export(tmp_path / "finetuned.pt", backbone, **meta)
    before = path.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, handle: real_save(obj, FullDisk(handle, room=1 << 16)))
    line = fails_in_one_line(capsys, lambda: cli.save_downstream_export(path, backbone, meta, role="finetuned"))
    assert line == (f"error: {path}: No space left on device (ENOSPC); free space on that disk; run_dir=DIR writes "
                    "the results elsewhere")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["finetuned.pt"]


# ---- resuming under another config


@pytest.mark.parametrize("override, differs", [
    ("backbone=resnet50", "backbone.name resnet18 vs resnet50"),
    ("method.kwargs.proj_output_dim=32", "method.kwargs.proj_output_dim 16 vs 32"),
    ("data.image_size=32", "data.image_size 28 vs 32"),
    ("method=dino", "method.name byol vs dino"),
])
def test_resume_refuses_another_architecture(run_dir, data_root, capsys, override, differs):
    before = snapshot(run_dir, [p.name for p in run_dir.iterdir()])
    line = fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, run_dir, "resume=auto", override)))
    assert line.startswith(f"error: cannot resume {run_dir / 'checkpoint.pt'}: the model it holds differs "
                           "(checkpoint vs now: ")
    assert differs in line and "start a new run_dir" in line
    assert snapshot(run_dir, before) == before
    assert_clean(run_dir)


def test_resume_with_new_schedules_continues_with_a_notice(run_dir, data_root, capsys):
    ssl.train.train(config(data_root, run_dir, "resume=auto", "trainer.epochs=2", "data.batch_size=8", "optim.lr=0.5"))
    out = capsys.readouterr().out
    assert ("notice: changed since the checkpoint: data.batch_size 16 -> 8, optim.lr 1.0 -> 0.5, trainer.epochs "
            "1 -> 2; the weights and optimiser state carry over, the lr, weight-decay and EMA schedules are rebuilt "
            "from the new values") in out
    assert "notice: steps per epoch 2 -> 4: continuing at the start of epoch 2" in out
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == state["ema"]["step"] == 8 and state["steps_per_epoch"] == 4
    assert_clean(run_dir)


def as_written_by_an_older_version(run_dir: Path) -> None:
    """Drop what older checkpoints lack (a new file: the old one is a hard link to the fixture's)."""
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    path.unlink()
    torch.save({k: v for k, v in state.items() if k not in ("config", "steps_per_epoch")}, path)


def test_checkpoint_without_config_resumes_with_a_notice(run_dir, data_root, capsys):
    as_written_by_an_older_version(run_dir)
    ssl.train.train(config(data_root, run_dir, "resume=auto", "trainer.epochs=2"))
    assert "records no config (an older version wrote it): resuming without checking" in capsys.readouterr().out
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_checkpoint_without_config_that_does_not_fit_is_one_line(run_dir, data_root, capsys):
    as_written_by_an_older_version(run_dir)
    line = fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, run_dir, "resume=auto",
                                                                    "method.kwargs.proj_output_dim=32")))
    assert line.startswith(f"error: cannot resume {run_dir / 'checkpoint.pt'}: 7 of its tensors do not fit the "
                           "model this config builds (first: method.predictor.0.weight (32, 16) vs (32, 32)); ")


# ---- one run per folder


def test_second_run_on_a_live_folder_refuses(run_dir, data_root, capsys):
    before = snapshot(run_dir)
    with run_lock(run_dir):  # this process is the live run
        # `python -m ssl.pretrain` in this process: its lock opens the file anew, and flock refuses a second open
        # file as it refuses another process (the killed-run test below holds the lock in a real other process)
        returncode = run_module("ssl.pretrain", "+experiment=byol_fmnist", "logger=none", "device=cpu",
                                f"data.root={data_root}", f"run_dir={run_dir}", "resume=auto")
    assert returncode == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: run_dir {run_dir} is in use by a live run (pid {os.getpid()} on "
                           f"{os.uname().nodename} since ")
    assert line.endswith("); wait for it to end or stop it, or choose another run_dir")
    assert snapshot(run_dir) == before
    assert_clean(run_dir)


def test_lock_of_a_killed_run_is_taken_over_with_a_notice(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ssl.run_lock import run_lock\n"
                               f"with run_lock(Path({str(tmp_path)!r})): print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (tmp_path / LOCK_NAME).exists()  # killed: nothing removed it
    with run_lock(tmp_path):
        pass
    assert f"notice: taking over the lock of {tmp_path} from a run that is gone (pid {holder.pid} on " in \
        capsys.readouterr().out
    assert not (tmp_path / LOCK_NAME).exists()


def test_only_rank_zero_takes_the_lock(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ssl.train, "_train", lambda *args: "trained")
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        monkeypatch.setattr(ssl.train, "init_process", lambda device_type: Process(rank=1, world_size=2))
        assert ssl.train.train(config(data_root, run_dir)) == "trained"
        monkeypatch.setattr(ssl.train, "init_process", lambda device_type: Process())
        assert "in use by a live run" in fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, run_dir)))


# ---- failures inside the loop


def fail_at_first_step(monkeypatch, error: Exception) -> None:
    def step(*args, **kwargs):
        raise error

    monkeypatch.setattr(ssl.train, "train_step", step)


def test_out_of_memory_names_the_batch_and_keeps_the_last_epoch(run_dir, data_root, capsys, monkeypatch):
    before = snapshot(run_dir)
    fail_at_first_step(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    line = fails_in_one_line(capsys, lambda: ssl.train.train(config(data_root, run_dir, "resume=auto",
                                                                    "trainer.epochs=2")))
    assert line.startswith("error: out of GPU memory with 16 images per process (data.batch_size=16 on 1 process): "
                           f"try data.batch_size=8; the last good {run_dir / 'checkpoint.pt'} is kept; continue with: ")
    assert line.endswith(f"data.batch_size=8 resume=auto run_dir={run_dir}")
    assert snapshot(run_dir) == before
    assert_clean(run_dir)


def test_unexpected_error_keeps_the_checkpoint_and_prints_the_resume_command(run_dir, data_root, capsys, monkeypatch):
    before = snapshot(run_dir)
    fail_at_first_step(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError, match="^a bug$"):  # re-raised: its traceback is what fixes the bug
        ssl.train.train(config(data_root, run_dir, "resume=auto", "trainer.epochs=2"))
    assert capsys.readouterr().err.splitlines() == [
        f"error: unexpected ZeroDivisionError (the traceback follows); the last good {run_dir / 'checkpoint.pt'} is "
        f"kept; continue with: python -m ssl.pretrain ... resume=auto run_dir={run_dir}"]
    assert snapshot(run_dir) == before
    assert_clean(run_dir)
