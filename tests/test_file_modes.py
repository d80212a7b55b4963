"""Files the project writes get the mode any other program would give them (0666 less the umask), and a replaced
file keeps its mode: exports must be readable by a teammate or a serving process running as another user."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from scripts import plot_metrics
from ssl.eval.cli import write_report
from ssl.files import atomic_save, atomic_write, atomic_write_text
from ssl.loggers import RunLogger
from ssl.models import build_backbone, load_backbone, save_export
from ssl.run_lock import LOCK_NAME, run_lock
from ssl.visualize import write_figures

# What `touch`, `open()` or a shell redirection give a new file under each umask (002: a team sharing a group).
NEW_FILE_MODE = {0o022: 0o644, 0o077: 0o600, 0o002: 0o664}


@pytest.fixture(params=sorted(NEW_FILE_MODE), ids=lambda umask: f"umask{umask:03o}")
def umask(request) -> int:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_what_open_gives_it(tmp_path, umask):
    atomic_write({tmp_path / "bytes.bin": lambda handle: handle.write(b"\x00\x01")})
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    with open(tmp_path / "by_open.txt", "w") as handle:  # the reference: what any other program gets
        handle.write("x")
    assert mode(tmp_path / "by_open.txt") == NEW_FILE_MODE[umask]
    assert mode(tmp_path / "bytes.bin") == mode(tmp_path / "config.yaml") == NEW_FILE_MODE[umask]
    assert (tmp_path / "bytes.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_open.txt", "bytes.bin", "config.yaml"]  # no .tmp


def test_checkpoint_and_export_modes(tmp_path, umask):
    backbone = build_backbone("resnet18", in_channels=1, width=4)
    export = save_export(tmp_path / "teacher.pt", backbone, input_size=8, channels=1, mean=[0.5], std=[0.25],
                         dataset="fmnist", num_classes=10, method="byol", role="teacher", epoch=1)
    atomic_save({tmp_path / "checkpoint.pt": {"step": 3, "model": backbone.state_dict()}})
    assert mode(export) == mode(tmp_path / "checkpoint.pt") == NEW_FILE_MODE[umask]
    assert load_backbone(export).export_meta["epoch"] == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3


def test_report_metrics_and_picture_modes(tmp_path, umask):
    report = write_report(tmp_path, "linear_eval", {"top1": 0.5})
    logger = RunLogger(tmp_path, {"name": "none"}, {})
    logger.log({"step": 1, "loss": 2.0})
    logger.close()
    [picture] = write_figures(tmp_path, {"embedding": Figure(figsize=(1, 1))})
    assert json.loads(report.read_text()) == {"top1": 0.5}
    assert picture.read_bytes().startswith(b"\x89PNG")
    for path in (report, tmp_path / "metrics.jsonl", picture):
        assert mode(path) == NEW_FILE_MODE[umask], path.name


def test_plotted_metrics_and_run_lock_modes(tmp_path, umask, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    monkeypatch.setattr(sys, "argv", ["plot_metrics", str(tmp_path)])
    plot_metrics.main()  # matplotlib writes the PNG itself
    assert mode(tmp_path / "metrics.png") == NEW_FILE_MODE[umask]
    with run_lock(tmp_path):
        assert mode(tmp_path / LOCK_NAME) == NEW_FILE_MODE[umask]


@pytest.mark.parametrize("kept", [0o600, 0o640, 0o664, 0o444], ids=lambda kept: f"mode{kept:o}")
def test_a_replaced_file_keeps_its_mode(tmp_path, umask, kept):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"old")
    path.chmod(kept)  # 0o664 under umask 022: the umask alone would take the group's write bit off
    seen_while_writing = []

    def write(handle):
        seen_while_writing.append(stat.S_IMODE(os.fstat(handle.fileno()).st_mode))
        handle.write(b"new")

    atomic_write({path: write})
    assert path.read_bytes() == b"new" and mode(path) == kept
    assert seen_while_writing[0] & ~kept == 0  # the new contents were never more readable than the file they became


def test_resuming_rewrites_metrics_with_their_mode(tmp_path, umask):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3)))
    metrics.chmod(0o640)
    RunLogger(tmp_path, {"name": "none"}, {}, resumed_at=2).close()  # drops step 3, rewriting the file
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert mode(metrics) == 0o640
