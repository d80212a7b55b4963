"""A smoke run of the quality benchmark on a tiny Fashion-MNIST fixture: every model is scored, the table is written."""

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.fixtures import write_fmnist

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quality_scores_every_model_against_random_init(tmp_path):
    root = write_fmnist(tmp_path / "data", train=64, test=32)
    pretrain = [f"data.root={root}", "trainer.epochs=1", "trainer.warmup_epochs=0", "data.batch_size=32",
                "trainer.log_every=1", "method.kwargs.proj_hidden_dim=64", "method.kwargs.pred_hidden_dim=64"]
    segment = ["fmnist_mosaic.train_size=16", "fmnist_mosaic.test_size=8", "train.epochs=1"]
    command = [sys.executable, "-m", "scripts.bench_quality", "--methods", "byol", "--out", str(tmp_path / "runs"),
               "--json", str(tmp_path / "quality.json"), "--markdown", str(tmp_path / "quality.md"),
               "--eval-override", f"data.root={root}",
               *[arg for value in pretrain for arg in ("--pretrain-override", value)],
               *[arg for value in segment for arg in ("--segment-override", value)]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]

    report = json.loads((tmp_path / "quality.json").read_text())
    rows = {(row["method"], row["model"]): row for row in report["rows"]}
    assert list(rows) == [("reference", "random"), ("reference", "supervised, 1 epochs"), ("byol", "teacher"),
                          ("byol", "student")]
    random = rows["reference", "random"]
    for row in rows.values():
        assert row["architecture"] == "resnet18-in_channels1-stemimagenet"
        for column in ("linear top-1", "kNN20", "kNN200", "mosaic mIoU"):
            assert 0 <= row[column] <= 100
            assert math.isclose(row["vs random"][column], row[column] - random[column], abs_tol=1e-9)
    assert random["vs random"] == {column: 0 for column in random["vs random"]}
    assert rows["byol", "teacher"]["pretrain minutes"] > 0 and rows["byol", "teacher"]["images/s"] > 0
    # The supervised reference starts from the random export and trains for as many epochs as the pretraining.
    reference = tmp_path / "runs" / "reference_resnet18-in_channels1-stemimagenet"
    supervised = json.loads((reference / "supervised" / "finetune.json").read_text())
    assert supervised["train"]["epochs"] == 1 and supervised["ckpt"].endswith("random.pt")
    table = (tmp_path / "quality.md").read_text()
    assert table.startswith("| method | model | linear top-1 | kNN20 | kNN200 | mosaic mIoU |")
    assert table.count("| byol |") == 2 and table.count("| reference |") == 2
