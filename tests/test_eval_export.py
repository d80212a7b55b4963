"""Exports as downstream tools read them: a faithful round trip, and one clear error for each bad file."""

import os

import pytest
import torch

import ssl
from ssl.errors import UserError
from ssl.eval.preprocess import check_channels
from ssl.models import build_backbone, save_export
from ssl.models.export import FORMAT, FORMAT_VERSION

META = {"input_size": 28, "channels": 1, "mean": [0.5], "std": [0.25], "dataset": "fmnist", "num_classes": 10,
        "method": "byol", "role": "teacher", "epoch": 3}


def trained_backbone() -> torch.nn.Module:
    """A backbone after an SGD step, so weights and BatchNorm running statistics are not the init."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", in_channels=1)
    backbone(torch.randn(4, 1, 28, 28)).square().mean().backward()
    torch.optim.SGD(backbone.parameters(), lr=0.1).step()
    return backbone.eval()


def test_load_backbone_round_trip_is_exact(tmp_path):
    backbone = trained_backbone()
    save_export(tmp_path / "teacher.pt", backbone, **META)
    loaded = ssl.load_backbone(tmp_path / "teacher.pt")
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(images), backbone(images))
        assert torch.equal(loaded.forward_dense(images), backbone.forward_dense(images))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.export_meta["role"] == "teacher" and loaded.export_meta["feature_dim"] == 512


@pytest.fixture
def export_payload() -> dict:
    backbone = build_backbone("resnet18", in_channels=1)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "backbone": backbone.spec,
            "feature_dim": backbone.feature_dim, **META, "state_dict": backbone.state_dict()}


def bad_files(tmp_path, payload) -> dict:
    """Each kind of file a user might pass instead of an export, and a word its error message must contain."""
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"student": {}, "teacher": {}, "optimizer": {}, "epoch": 1}, checkpoint)
    foreign = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, foreign)
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "format_version": FORMAT_VERSION + 1}, newer)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    return {tmp_path / "missing.pt": "no export", checkpoint: "training checkpoint", foreign: "not an ssl",
            newer: "newer", text: "notes.txt"}


def test_bad_files_are_one_line_user_errors(tmp_path, export_payload):
    for path, words in bad_files(tmp_path, export_payload).items():
        with pytest.raises(UserError, match=words) as error:
            ssl.load_backbone(path)
        assert "\n" not in str(error.value)


class RunsCode:
    """Unpickling this calls os.system: a checkpoint-shaped file carrying code."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path, export_payload):
    marker = tmp_path / "marker"
    torch.save({**export_payload, "epoch": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing") as error:
        ssl.load_backbone(tmp_path / "evil.pt")
    assert not marker.exists() and "\n" not in str(error.value)


def test_channel_mismatch_names_both_counts():
    with pytest.raises(UserError, match="3-channel images but data x has 1"):
        check_channels({"channels": 3}, 1, "data x")
