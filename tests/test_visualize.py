"""`python -m ssl.visualize`: the pictures of a tiny ResNet and a tiny ViT export on a tiny Fashion-MNIST fixture."""

import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from matplotlib.image import imread

from ssl import visualize as viz
from ssl.errors import UserError
from ssl.models import build_backbone, save_export
from tests.fixtures import run_module, write_fmnist

ROOT = Path(__file__).resolve().parents[1]
FAST = ["device=cpu", "images=3", "retrieval.queries=3", "retrieval.k=4", "embedding.points=20"]


def export(path: Path, name: str, **kwargs) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone(name, in_channels=1, **kwargs)
    return save_export(path, backbone, input_size=28, channels=1, mean=[0.3], std=[0.35], dataset="fmnist",
                       num_classes=10, method="byol", role="teacher", epoch=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("visualize")
    return {"root": write_fmnist(tmp / "data", train=40, test=20), "tmp": tmp,
            "resnet": export(tmp / "resnet" / "teacher.pt", "resnet18"),
            "vit": export(tmp / "vit" / "teacher.pt", "vit_tiny", patch_size=4, image_size=28)}


def config(workspace: dict[str, Path], ckpt: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("visualize", [f"ckpt={workspace[ckpt]}", "data=fmnist", f"data.root={workspace['root']}",
                                     *FAST, *overrides])


def assert_picture(path: Path) -> None:
    """A real PNG of a sane size with something drawn on it."""
    assert path.is_file() and 5_000 < path.stat().st_size < 2_000_000, path
    pixels = imread(path)
    assert 150 <= pixels.shape[0] <= 3000 and 150 <= pixels.shape[1] <= 3000 and pixels.shape[2] in (3, 4)
    assert np.ptp(pixels[..., :3]) > 0.5  # not blank


def run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ssl.visualize", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_command_line_draws_a_resnet_export_beside_it(workspace, capsys):
    """Data from the export's dataset, pictures in <ckpt dir>/visualize_<stem>/, no attention for a ResNet; and
    a missing export is one error line, in a fresh interpreter started first, while the pictures are drawn by the
    same command line in this process."""
    missing = run(f"ckpt={workspace['tmp'] / 'nowhere' / 'teacher.pt'}", "device=cpu")
    returncode = run_module("ssl.visualize", f"ckpt={workspace['resnet']}", f"data.root={workspace['root']}",
                            "embedding.method=pca", *FAST)
    stdout, stderr = capsys.readouterr()
    assert returncode == 0, stderr
    folder = workspace["resnet"].parent / "visualize_teacher"
    assert sorted(path.name for path in folder.iterdir()) == ["dense_pca.png", "embedding.png", "retrieval.png"]
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("wrote embedding.png, retrieval.png, dense_pca.png to ") and str(folder) in summary
    assert "hint:" not in stdout  # PCA was asked for
    for path in folder.iterdir():
        assert_picture(path)

    _, stderr = missing.communicate(timeout=300)
    returncode = missing.returncode
    lines = stderr.strip().splitlines()
    assert returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no export at "), stderr
    assert not (workspace["tmp"] / "nowhere").exists()


def test_vit_export_draws_the_cls_attention_and_logs_to_wandb(workspace, monkeypatch, capsys):
    logged = {}
    fake_run = types.SimpleNamespace(log=logged.update, finish=lambda: logged.setdefault("finished", True))
    monkeypatch.setattr(viz, "start_wandb", lambda directory, logger_cfg, cfg: fake_run)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=lambda path: ("image", path)))
    out = workspace["tmp"] / "vit_pictures"
    result = viz.visualize(config(workspace, "vit", f"run_dir={out}", "logger=wandb", "embedding.method=pca"))
    names = ["embedding.png", "retrieval.png", "dense_pca.png", "attention.png"]
    assert [path.name for path in result["files"]] == names
    for name in names:
        assert_picture(out / name)
    assert result["dense_size"] == 28  # patch 4 at 28 px: a 7x7 grid already
    assert logged == {**{name[:-4]: ("image", str(out / name)) for name in names}, "finished": True}


def test_without_the_viz_extra_the_map_is_pca_with_a_hint(workspace, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now fails as if not installed
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    out = workspace["tmp"] / "fallback"
    result = viz.visualize(config(workspace, "resnet", f"run_dir={out}"))
    assert result["embedding"] == "pca" and (out / "embedding.png").is_file()
    assert result["dense_size"] == 28 * 7  # ResNet's /32 leaves 1x1 at 28 px; 196 px gives 7x7
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"hint: embedding.png is a PCA map; for t-SNE install the viz extra: {viz.VIZ_HINT}"
    assert lines[-1].startswith("wrote ") and "(embedding=pca," in lines[-1]
    with pytest.raises(UserError, match=r"embedding.method=tsne needs scikit-learn: `pip install -e \.\[viz\]`"):
        viz.visualize(config(workspace, "resnet", f"run_dir={out}", "embedding.method=tsne"))


def test_tsne_with_the_viz_extra(workspace, capsys):
    pytest.importorskip("sklearn.manifold")
    out = workspace["tmp"] / "tsne"
    assert viz.visualize(config(workspace, "resnet", f"run_dir={out}"))["embedding"] == "tsne"
    assert "hint:" not in capsys.readouterr().out
    assert_picture(out / "embedding.png")


@pytest.mark.parametrize("override, message", [
    ("ckpt=null", "no checkpoint given; pass ckpt="),
    ("retrieval.k=0", "retrieval.k=0 must be a positive whole number"),
    ("images=-1", "images=-1 must be a positive whole number"),
    ("embedding.points=many", "embedding.points=many must be a positive whole number"),
    ("embedding.perplexity=0", "embedding.perplexity=0 must be a positive number"),
    ("embedding.method=umap", "unknown embedding.method=umap; choose one of"),
    ("logger=none", "unknown logger 'tensorboard'; choose one of"),
    ("device=tpu", "unknown device 'tpu'"),
])
def test_bad_options_are_user_errors(workspace, override, message):
    if override == "logger=none":  # a known logger, with a name no logger has
        cfg = config(workspace, "resnet", "run_dir=unused")
        cfg.logger.name = "tensorboard"
    else:
        cfg = config(workspace, "resnet", "run_dir=unused", override)
    with pytest.raises(UserError, match=re.escape(message)):
        viz.visualize(cfg)
    assert not Path("unused").exists()


def test_cls_attention_is_what_the_block_computes():
    """The recomputed CLS weights (plus the CLS-to-CLS weight they leave out) reproduce the fused attention's CLS
    output exactly: they are the weights the model uses."""
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=4, image_size=16, in_channels=1).eval()
    attention = vit.blocks[-1].attn
    tokens = torch.randn(2, 1 + 16, vit.feature_dim)
    maps = viz.cls_attention(attention, tokens, (4, 4))
    assert maps.shape == (2, attention.num_heads, 4, 4)
    weights = torch.cat((1 - maps.flatten(2).sum(-1, keepdim=True), maps.flatten(2)), dim=-1)  # (B, heads, N)
    assert (weights > 0).all()
    head_dim = vit.feature_dim // attention.num_heads
    values = attention.qkv(tokens).reshape(2, 17, 3, attention.num_heads, head_dim)[:, :, 2].transpose(1, 2)
    mixed = (weights[:, :, None] @ values)[:, :, 0].reshape(2, vit.feature_dim)  # heads concatenated
    torch.testing.assert_close(attention.proj(mixed), attention(tokens)[:, 0], atol=1e-5, rtol=1e-5)


def test_queries_cover_the_classes_first():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1, 2, 3])
    picked = viz.spread_over_classes(labels, 4, torch.Generator().manual_seed(0))
    assert sorted(labels[picked].tolist()) == [0, 1, 2, 3]
    everything = viz.spread_over_classes(labels, 100, torch.Generator().manual_seed(1))
    assert sorted(everything.tolist()) == list(range(10))


def test_dense_pca_is_rgb_in_unit_range():
    rgb = viz.dense_pca_rgb(torch.randn(3, 16, 2, 2), size=8)
    assert rgb.shape == (3, 8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # each colour spans [0, 1] over the batch; a corner pixel is its cell's value (bilinear, align_corners=False)
    torch.testing.assert_close(rgb.flatten(0, 2).aminmax(dim=0).min, torch.zeros(3))
    torch.testing.assert_close(rgb.flatten(0, 2).aminmax(dim=0).max, torch.ones(3))
    single = viz.dense_pca_rgb(torch.randn(1, 16, 1, 1), size=4)  # one cell: fewer axes than colours
    assert single.shape == (1, 4, 4, 3)


def test_dense_pca_colours_are_the_cells_coordinates_on_known_principal_axes():
    # 8 cells (two 2x2 maps) of 16-d features varying along three orthonormal directions with spreads 3 > 2 > 1:
    # the principal axes are those directions, so red, green and blue are each cell's coordinate along them,
    # signed so the largest-magnitude coordinate is positive, then scaled to [0, 1] over the batch.
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    # orthonormal columns spanning centred vectors are centred too
    coords = torch.linalg.qr(draws - draws.mean(dim=0))[0] * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    directions = torch.linalg.qr(torch.randn(16, 3, generator=generator, dtype=torch.float64))[0]
    cells = coords @ directions.T + torch.randn(16, generator=generator, dtype=torch.float64)
    dense = cells.reshape(2, 2, 2, 16).permute(0, 3, 1, 2).float()
    signs = coords.gather(0, coords.abs().argmax(dim=0, keepdim=True)).sign()
    signed = coords * signs
    expected = (signed - signed.min(dim=0).values) / (signed.max(dim=0).values - signed.min(dim=0).values)
    rgb = viz.dense_pca_rgb(dense, size=2)  # the maps' own size: no interpolation
    torch.testing.assert_close(rgb.double(), expected.reshape(2, 2, 2, 3), atol=1e-4, rtol=0)
