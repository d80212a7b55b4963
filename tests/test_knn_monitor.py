"""The online kNN monitor: knn20 in each epoch record, equal to a brute-force kNN of the exported teacher on the same
images; off with trainer.knn_every_epochs=0; skipped with one notice when there are no labels or no test split."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssl
import ssl.train
from ssl.data import ImageDataset, build_dataset, datasets
from ssl.device import autocast
from ssl.eval.knn_monitor import build_knn_monitor, labelled_slice
from tests.fixtures import write_fmnist, write_idx
from tests.test_failures import config
from tests.test_pretrain import step_losses


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """96 train / 32 test images; the test labels are shuffled, so kNN scores somewhere between 0 and 1."""
    root = write_fmnist(tmp_path_factory.mktemp("data"), train=96, test=32)
    labels = np.random.default_rng(0).permutation(np.arange(32) % 10)
    write_idx(root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", labels)
    return root


def epoch_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("type") == "epoch"]


def brute_force_knn20(run_dir: Path, data_root: Path) -> float:
    """Top-1 of weighted 20-NN (T = 0.07) with the exported teacher on all train and test images."""
    backbone = ssl.load_backbone(run_dir / "teacher.pt")
    data = config(data_root, run_dir).data
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    with torch.no_grad():
        train_features, test_features = (
            F.normalize(backbone((split.images.float() / 255 - data.mean[0]) / data.std[0]), dim=1)
            for split in (train, test))
    similarity, neighbours = (test_features @ train_features.T).topk(20, dim=1)
    votes = torch.zeros(len(test), 10).scatter_add_(1, train.labels[neighbours], (similarity / 0.07).exp())
    return (votes.argmax(1) == test.labels).float().mean().item()


def test_knn20_is_logged_each_epoch_and_matches_a_brute_force_knn(data_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    ssl.train.train(config(data_root, run_dir, "trainer.epochs=2"))  # defaults: every epoch, all 96 + 32 images
    knn = [record["knn20"] for record in epoch_records(run_dir)]
    assert len(knn) == 2 and all(0.0 <= value <= 1.0 for value in knn)
    assert knn[-1] == pytest.approx(brute_force_knn20(run_dir, data_root), abs=1e-6)
    assert 0.0 < knn[-1] < 1.0  # shuffled test labels: a number that says something
    out = capsys.readouterr().out
    assert "epoch 2/2: loss=" in out and f"knn20={knn[-1]:.4f}\n" in out

    # off, the run trains exactly the same
    ssl.train.train(config(data_root, tmp_path / "off", "trainer.epochs=2", "trainer.knn_every_epochs=0"))
    assert not any("knn20" in record for record in epoch_records(tmp_path / "off"))
    assert "knn20=" not in capsys.readouterr().out
    assert step_losses(tmp_path / "off") == step_losses(run_dir)
    on, off = (torch.load(path / "checkpoint.pt", weights_only=True)["model"] for path in (run_dir, tmp_path / "off"))
    assert all(torch.equal(on[name], off[name]) for name in on)


def test_every_second_epoch(data_root, tmp_path):
    ssl.train.train(config(data_root, tmp_path / "run", "trainer.epochs=2", "trainer.knn_every_epochs=2"))
    assert ["knn20" in record for record in epoch_records(tmp_path / "run")] == [False, True]


def test_a_measurement_draws_no_random_number_and_changes_nothing(data_root, tmp_path):
    cfg = config(data_root, tmp_path)
    run = ssl.train.build_pretraining(cfg, torch.device("cpu"))
    monitor = build_knn_monitor(cfg, run.dataset, 16, torch.device("cpu"), run.autocast, print)
    run.method.train()
    rng, state = torch.get_rng_state(), {k: v.clone() for k, v in run.model.state_dict().items()}
    assert "knn20" in monitor(run.method.teacher.backbone, 1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(value, state[name]) for name, value in run.model.state_dict().items())
    assert all(module.training for module in run.method.teacher.backbone.modules())


def test_without_a_test_split_the_run_goes_on_with_one_notice(tmp_path, capsys, monkeypatch):
    root = write_fmnist(tmp_path / "data", train=32, test=8)
    for path in (root / "FashionMNIST" / "raw").glob("t10k-*"):
        path.unlink()
    monkeypatch.setattr(datasets, "FMNIST_DEBIAN_DIR", tmp_path / "absent")  # where the real test split may be
    ssl.train.train(config(root, tmp_path / "run", "trainer.epochs=2"))
    out = capsys.readouterr().out
    assert out.count("notice: no online kNN monitor (Fashion-MNIST not found: ") == 1
    assert out.count("notice:") == 1 and "trainer.knn_every_epochs=0 turns it off" in out
    assert not any("knn20" in record for record in epoch_records(tmp_path / "run"))


def test_unlabelled_data_is_skipped_with_a_notice(data_root, tmp_path):
    unlabelled = ImageDataset(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.full((8,), -1), 10, "fmnist", [])
    notices = []
    monitor = build_knn_monitor(config(data_root, tmp_path), unlabelled, 16, torch.device("cpu"),
                                autocast(torch.device("cpu")), notices.append)
    assert monitor is None
    assert notices == ["notice: no online kNN monitor (the pretraining data (fmnist train) has no labels); "
                       "trainer.knn_every_epochs=0 turns it off"]


def test_the_slice_is_spread_evenly_over_the_labelled_images():
    labels = torch.tensor([-1] * 4 + [0] * 4 + [1] * 4 + [2] * 4)  # unlabelled first, then class by class
    dataset = ImageDataset(torch.arange(16, dtype=torch.uint8).view(16, 1, 1, 1), labels, 3, "toy", [])
    images, kept = labelled_slice(dataset, 6, "toy")
    assert images.flatten().tolist() == [4, 6, 8, 10, 12, 14] and kept.tolist() == [0, 0, 1, 1, 2, 2]
    assert labelled_slice(dataset, 100, "toy")[0].flatten().tolist() == list(range(4, 16))
