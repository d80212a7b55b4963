"""The downstream entry points as users run them: tiny export, tiny Fashion-MNIST fixture. Their command lines run in
this process (`tests.fixtures.run_module`: the real `__main__` block, Hydra parsing and `run_cli`); one error case
runs in a fresh interpreter, where only one line may reach stderr."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import ssl
from ssl.device import resolve_device
from ssl.errors import UserError
from ssl.eval import cli
from ssl.linear_eval import linear_eval
from ssl.models import build_backbone, save_export
from ssl.models.export import FORMAT_VERSION, random_backbone
from ssl.segment import segment, segmentation_sets
from tests.fixtures import run_module, write_fmnist

ROOT = Path(__file__).resolve().parents[1]
FAST_PROBE = ["linear.lrs=[0.1]", "linear.weight_decays=[0.0,0.01]", "linear.epochs=3", "knn.ks=[5,20]"]
# `name=value (random x, +d)`: a score, the random backbone's, and their signed difference.
WITH_BASELINE = re.compile(r"(\w+)=(\d+\.\d\d) \(random (\d+\.\d\d), ([+-]\d+\.\d\d)\)")
# The fixture's test split holds each class equally often (write_fmnist), so a classifier that always answers the
# same class, as one whose head never trained does, scores exactly this top-1.
CHANCE = 10.0


def tiny_export(path: Path, channels: int = 1) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=channels)
    return save_export(path, backbone, input_size=28, channels=channels, mean=[0.3] * channels,
                       std=[0.35] * channels, dataset="fmnist", num_classes=10, method="byol", role="teacher",
                       epoch=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval_cli")
    return {"root": write_fmnist(tmp / "data", train=40, test=20), "ckpt": tiny_export(tmp / "run" / "teacher.pt"),
            "tmp": tmp}


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_linear_eval_follows_the_exports_dataset_and_writes_beside_it(workspace, capsys):
    assert run_module("ssl.linear_eval", f"ckpt={workspace['ckpt']}", f"data.root={workspace['root']}", "device=cpu",
                      *FAST_PROBE) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("linear_top1=") and "linear_top5=" in summary and "knn20_top1=" in summary
    report = json.loads((workspace["ckpt"].parent / "linear_eval_teacher" / "linear_eval.json").read_text())
    assert report["data"] == "fmnist" and report["num_train"] == 40 and report["num_test"] == 20
    assert 0 <= report["linear"]["top1"] <= report["linear"]["top5"] <= 100
    assert set(report["knn"]) == {"temperature", "k5_top1", "k20_top1"}
    # The class is the bright square's position, which even random features separate: far above chance (a probe
    # that never fitted, zero weights, answers class 0 for every image).
    assert report["linear"]["top1"] >= 5 * CHANCE and report["knn"]["k5_top1"] >= 5 * CHANCE


def test_augmented_protocol_in_process(workspace):
    # Two lrs, one of which cannot learn (lr 0 leaves the probe at zero: one class for every image), listed first
    # so that taking the first, the last or the worst would all be seen.
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("linear_eval", [f"ckpt={workspace['ckpt']}", "data=fmnist", f"data.root={workspace['root']}",
                                      "device=cpu", "protocol=augmented", f"run_dir={workspace['tmp'] / 'aug'}",
                                      *FAST_PROBE, "linear.lrs=[0.0,0.1]"])
    report = linear_eval(cfg)
    assert report["protocol"] == "augmented" and (workspace["tmp"] / "aug" / "linear_eval.json").is_file()
    held_out = {point["lr"]: point["val_top1"] for point in report["linear"]["lr_grid"]}
    assert held_out.keys() == {0.0, 0.1} and held_out[0.1] > held_out[0.0]
    assert report["linear"]["optimizer"] == "sgd" and report["linear"]["lr"] == 0.1
    # the final probe, trained at that lr on crops and flips (which blur this fixture's position code): above chance
    assert report["linear"]["top1"] >= 3 * CHANCE
    assert report["baseline"] is None  # off by default


def test_random_baseline_has_the_exports_architecture_and_seeded_weights(workspace):
    export = ssl.load_backbone(workspace["ckpt"])  # itself initialised from seed 0 (`tiny_export`)
    before = torch.get_rng_state()
    baseline = random_backbone(export.export_meta, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is left alone
    assert baseline.spec == export.spec and baseline.export_meta == export.export_meta
    assert not baseline.training and not any(p.requires_grad for p in baseline.parameters())
    weights, export_weights = baseline.state_dict(), export.state_dict()
    assert weights.keys() == export_weights.keys()
    assert all(weights[name].shape == tensor.shape for name, tensor in export_weights.items())
    assert not torch.equal(weights["stem.0.weight"], export_weights["stem.0.weight"])
    again, other = random_backbone(export.export_meta, seed=1), random_backbone(export.export_meta, seed=2)
    assert all(torch.equal(tensor, again.state_dict()[name]) for name, tensor in weights.items())
    assert not torch.equal(weights["stem.0.weight"], other.state_dict()["stem.0.weight"])


def test_one_device_rule_for_every_entry_point():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("gpu", "cuda1", "cuda:x", "cpu:0"):
        with pytest.raises(UserError, match="unknown device"):
            resolve_device(name)
    with pytest.raises(UserError, match=f"device=cuda:{torch.cuda.device_count()} but"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last visible GPU (cuda:0 without one)


def test_summary_line_puts_the_baseline_and_the_signed_difference_beside_each_score():
    scores = {"linear_top1": 85.1, "knn20_top1": 80.0}
    baseline = {"linear_top1": 82.16, "knn20_top1": 81.456}
    assert cli.summary_line(dict, scores) == "linear_top1=85.10 knn20_top1=80.00"
    assert (cli.summary_line(dict, scores, baseline, "random")
            == "linear_top1=85.10 (random 82.16, +2.94) knn20_top1=80.00 (random 81.46, -1.46)")


def test_linear_eval_with_a_random_baseline(workspace, capsys):
    out = workspace["tmp"] / "baseline"
    assert run_module("ssl.linear_eval", f"ckpt={workspace['ckpt']}", f"data.root={workspace['root']}", "device=cpu",
                      f"run_dir={out}", "baseline=random", "seed=1", *FAST_PROBE) == 0  # the export is seed 0's init
    stdout = capsys.readouterr().out
    report = json.loads((out / "linear_eval.json").read_text())
    random = report["baseline"]
    assert random["kind"] == "random" and random["seed"] == 1
    assert random.keys() >= {"linear", "knn", "seconds"} and random["knn"].keys() == report["knn"].keys()
    assert random["linear"].keys() == report["linear"].keys()
    printed = {name: (float(value), float(base), float(diff))
               for name, value, base, diff in WITH_BASELINE.findall(stdout.strip().splitlines()[-1])}
    assert list(printed) == ["linear_top1", "linear_top5", "knn5_top1", "knn20_top1"]
    assert printed["linear_top1"][:2] == (round(report["linear"]["top1"], 2), round(random["linear"]["top1"], 2))
    assert printed["knn20_top1"][:2] == (round(report["knn"]["k20_top1"], 2), round(random["knn"]["k20_top1"], 2))
    assert all(diff == pytest.approx(value - base, abs=1e-9) for value, base, diff in printed.values())


def fixture_split(root: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and labels of a split written by `write_fmnist`, read straight from its idx
    files (16- and 8-byte headers), not through the library's loaders."""
    raw = root / "FashionMNIST" / "raw"
    images = torch.frombuffer(bytearray((raw / f"{prefix}-images-idx3-ubyte").read_bytes()[16:]), dtype=torch.uint8)
    labels = torch.frombuffer(bytearray((raw / f"{prefix}-labels-idx1-ubyte").read_bytes()[8:]), dtype=torch.uint8)
    return images.view(-1, 1, 28, 28), labels.long()


def test_finetune_writes_a_finetuned_export_with_its_head(workspace, capsys):
    out = workspace["tmp"] / "finetune"
    # One epoch without warm-up, at lrs that move both parts within its 5 steps.
    assert run_module("ssl.finetune", f"ckpt={workspace['ckpt']}", f"data.root={workspace['root']}", "device=cpu",
                      f"run_dir={out}", "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=8",
                      "train.lr=0.01", "train.backbone_lr=0.001") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("finetune_top1=")
    backbone = ssl.load_backbone(out / "finetuned.pt")
    meta = backbone.export_meta
    assert meta["role"] == "finetuned" and meta["head"]["weight"].shape == (10, 512) and len(meta["classes"]) == 10
    report = json.loads((out / "finetune.json").read_text())

    # The backbone trained: every weight and BatchNorm statistic moved from the export's (the head starts at 0).
    tuned, start = backbone.state_dict(), ssl.load_backbone(workspace["ckpt"]).state_dict()
    floats = [name for name, tensor in start.items() if tensor.is_floating_point()]
    assert [name for name in floats if torch.equal(start[name], tuned[name])] == []
    assert meta["head"]["weight"].abs().sum() > 0
    # The score is the saved model's, recomputed here: the export's normalisation (28 px, no resize), backbone, head.
    images, labels = fixture_split(workspace["root"], "t10k")
    with torch.no_grad():
        logits = backbone((images / 255 - meta["mean"][0]) / meta["std"][0]) @ meta["head"]["weight"].T
        logits += meta["head"]["bias"]
    assert report["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item(), abs=1e-4)
    assert report["top1"] > CHANCE  # an untrained (zero) head answers one class: exactly chance


def test_segment_on_a_tiny_mosaic_set(workspace, capsys):
    out = workspace["tmp"] / "segment"
    # Threshold 0 makes every item pixel foreground: a mask is its mosaic's four item classes, one per quadrant, which
    # the 2x2 dense map of a 56 px mosaic (ResNet: /32) can tell apart.
    overrides = [f"ckpt={workspace['ckpt']}", f"data.root={workspace['root']}", "device=cpu", f"run_dir={out}",
                 "fmnist_mosaic.train_size=16", "fmnist_mosaic.test_size=8", "fmnist_mosaic.threshold=0",
                 "train.epochs=4", "train.batch_size=2", "train.lr=0.01", "head=linear"]
    torch.manual_seed(0)  # the head's initialisation draws from the global RNG, which earlier tests moved
    assert run_module("ssl.segment", *overrides) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("miou=")
    report = json.loads((out / "segment.json").read_text())
    assert len(report["per_class_iou"]) == 11 and 0 <= report["miou"] <= 100 and report["num_test"] == 8
    assert ssl.load_backbone(out / "segmenter.pt").export_meta["seg_head"]["name"] == "linear"
    # The baseline: the best constant answer, the test masks' most frequent class everywhere (18.5 % of the pixels
    # here; an untrained head, lr 0, scored 6 %). The trained head (29 %) beats it.
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("segment", overrides)
    _, test_set = segmentation_sets(cfg, ssl.load_backbone(workspace["ckpt"]).export_meta, torch.device("cpu"))
    majority = 100 * torch.bincount(test_set.masks.flatten().long()).max().item() / test_set.masks.numel()
    assert report["pixel_accuracy"] > majority + 5


def test_segment_with_a_random_baseline_in_process(workspace, capsys):
    out = workspace["tmp"] / "segment_baseline"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("segment", [f"ckpt={workspace['ckpt']}", f"data.root={workspace['root']}", "device=cpu",
                                  f"run_dir={out}", "fmnist_mosaic.train_size=8", "fmnist_mosaic.test_size=4",
                                  "train.epochs=1", "train.batch_size=4", "head=fcn", "baseline=random"])
    report = segment(cfg)
    random = report["baseline"]
    assert random["kind"] == "random" and random.keys() >= {"miou", "pixel_accuracy", "per_class_iou", "train_loss"}
    assert len(random["per_class_iou"]) == len(report["per_class_iou"])
    printed = WITH_BASELINE.findall(capsys.readouterr().out.strip().splitlines()[-1])
    assert [name for name, *_ in printed] == ["miou", "pixel_acc"]
    assert float(printed[0][2]) == round(random["miou"], 2)
    # segmenter.pt holds the export's frozen backbone, not the baseline's.
    saved, export = ssl.load_backbone(out / "segmenter.pt"), ssl.load_backbone(workspace["ckpt"])
    assert torch.equal(saved.state_dict()["stem.0.weight"], export.state_dict()["stem.0.weight"])


def test_unknown_baseline_is_one_error_line(workspace):
    """In a fresh interpreter: nothing but the one line reaches stderr (no warning at start-up, no traceback)."""
    result = run("ssl.linear_eval", f"ckpt={workspace['ckpt']}", f"data.root={workspace['root']}", "device=cpu",
                 f"run_dir={workspace['tmp'] / 'unknown_baseline'}", "baseline=imagenet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown baseline=imagenet; choose one of: random "
                                                  "(or null for none)"]
    assert not (workspace["tmp"] / "unknown_baseline").exists()


class RunsCode:
    """Unpickling this calls os.system: a checkpoint-shaped file carrying code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_input(kind: str, tmp: Path) -> Path:
    """A file of the given kind that is not a usable export for the 1-channel fixture data."""
    path = tmp / f"{kind}.pt"
    if kind == "full_checkpoint":
        torch.save({"student": {}, "teacher": {}, "optimizer": {}, "epoch": 1}, path)
    elif kind == "not_an_export":
        torch.save({"conv.weight": torch.zeros(1)}, path)
    elif kind == "newer_version":
        torch.save({**torch.load(tiny_export(path), weights_only=True), "format_version": FORMAT_VERSION + 1}, path)
    elif kind == "carries_code":
        torch.save({"format": "ssl-backbone", "epoch": RunsCode(tmp / "marker")}, path)
    elif kind == "three_channels":
        tiny_export(path, channels=3)
    return path


BAD_INPUTS = ["missing", "full_checkpoint", "not_an_export", "newer_version", "carries_code", "three_channels"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_error_line(kind, workspace, capsys):
    """`python -m ssl.linear_eval ckpt=<bad input>`, in this process (test_unknown_baseline_is_one_error_line runs
    the entry point in a fresh interpreter)."""
    folder = workspace["tmp"] / "bad" / kind
    folder.mkdir(parents=True)
    ckpt = bad_input(kind, folder)
    capsys.readouterr()
    returncode = run_module("ssl.linear_eval", f"ckpt={ckpt}", f"data.root={workspace['root']}", "device=cpu")
    stderr = capsys.readouterr().err
    assert returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert not (folder / "marker").exists()
    assert not (folder / f"linear_eval_{kind}").exists()  # nothing is written for rejected input
