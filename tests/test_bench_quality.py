"""A smoke run of the quality benchmark on a tiny Fashion-MNIST fixture: every model is scored, the table is written.

The script runs in this process, and so do the commands it starts (`python -m ssl.pretrain`, `ssl.linear_eval`,
`ssl.segment`, `ssl.finetune`): each through its real entry point (`tests.fixtures.run_module`), without the seconds
of interpreter start-up that ten processes would spend."""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

from scripts import bench_quality
from tests.fixtures import run_module, write_fmnist

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = "resnet18-in_channels1-stemstride2-width32"  # byol_fmnist's backbone, as scripts.bench_quality names it


def test_bench_quality_scores_every_model_against_random_init(tmp_path, monkeypatch):
    commands = []

    def in_process(command: list[str], cwd: Path, check: bool) -> None:
        """`subprocess.run` for scripts.bench_quality: the `python -m MODULE ...` it asks for, run here."""
        assert command[:2] == [sys.executable, "-m"] and cwd == ROOT and check
        commands.append(command[2])
        returncode = run_module(*command[2:])
        if returncode:
            raise subprocess.CalledProcessError(returncode, command)

    monkeypatch.setattr(bench_quality, "subprocess", types.SimpleNamespace(run=in_process))
    root = write_fmnist(tmp_path / "data", train=64, test=32)
    pretrain = [f"data.root={root}", "trainer.epochs=1", "trainer.warmup_epochs=0", "data.batch_size=32",
                "trainer.log_every=1", "trainer.knn_every_epochs=0", "method.kwargs.proj_hidden_dim=64",
                "method.kwargs.pred_hidden_dim=64"]
    segment = ["fmnist_mosaic.train_size=16", "fmnist_mosaic.test_size=8", "train.epochs=1"]
    monkeypatch.setattr(sys, "argv", [
        "bench_quality.py", "--methods", "byol", "--out", str(tmp_path / "runs"),
        "--json", str(tmp_path / "quality.json"), "--markdown", str(tmp_path / "quality.md"),
        "--eval-override", f"data.root={root}",
        *[arg for value in pretrain for arg in ("--pretrain-override", value)],
        *[arg for value in segment for arg in ("--segment-override", value)]])
    bench_quality.main()
    # the pretraining; then linear_eval and segment of each model: random init, the supervised reference (fine-tuned
    # first), the teacher and the student
    assert commands == ["ssl.pretrain", "ssl.linear_eval", "ssl.segment", "ssl.finetune",
                        *["ssl.linear_eval", "ssl.segment"] * 3]

    report = json.loads((tmp_path / "quality.json").read_text())
    rows = {(row["method"], row["model"]): row for row in report["rows"]}
    assert list(rows) == [("reference", "random"), ("reference", "supervised, 1 epochs"), ("byol", "teacher"),
                          ("byol", "student")]
    random = rows["reference", "random"]
    for row in rows.values():
        assert row["architecture"] == ARCHITECTURE
        for column in ("linear top-1", "kNN20", "kNN200", "mosaic mIoU"):
            assert 0 <= row[column] <= 100
            assert math.isclose(row["vs random"][column], row[column] - random[column], abs_tol=1e-9)
    assert random["vs random"] == {column: 0 for column in random["vs random"]}
    assert rows["byol", "teacher"]["pretrain minutes"] > 0 and rows["byol", "teacher"]["images/s"] > 0
    # The supervised reference starts from the random export and trains for as many epochs as the pretraining.
    reference = tmp_path / "runs" / f"reference_{ARCHITECTURE}"
    supervised = json.loads((reference / "supervised" / "finetune.json").read_text())
    assert supervised["train"]["epochs"] == 1 and supervised["ckpt"].endswith("random.pt")
    table = (tmp_path / "quality.md").read_text()
    assert table.startswith("| method | model | linear top-1 | kNN20 | kNN200 | mosaic mIoU |")
    assert table.count("| byol |") == 2 and table.count("| reference |") == 2


def test_reuse_evaluates_again_a_model_newer_than_its_reports(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench_quality, "run", lambda module, *args: calls.append(module))
    ckpt, out = tmp_path / "finetuned.pt", tmp_path / "eval"
    for folder, name, report in (("linear_eval", "linear_eval.json", {"linear": {"top1": 80.0},
                                                                       "knn": {"k20_top1": 79.0, "k200_top1": 78.0}}),
                                 ("segment", "segment.json", {"miou": 5.0})):
        (out / folder).mkdir(parents=True)
        (out / folder / name).write_text(json.dumps(report))
    ckpt.write_bytes(b"model")
    args = types.SimpleNamespace(reuse=True, device="cpu", eval_override=[], segment_override=[])
    old = ckpt.stat().st_mtime - 10
    for report in out.rglob("*.json"):  # reports from before the model was trained again
        os.utime(report, (old, old))
    bench_quality.evaluate(ckpt, out, args)
    assert calls == ["ssl.linear_eval", "ssl.segment"]

    calls.clear()
    for report in out.rglob("*.json"):  # reports written after the model: kept
        os.utime(report, (old + 20, old + 20))
    assert bench_quality.evaluate(ckpt, out, args) == {"linear top-1": 80.0, "kNN20": 79.0, "kNN200": 78.0,
                                                       "mosaic mIoU": 5.0}
    assert calls == []
