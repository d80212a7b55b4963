"""`python -m ssl.export`: every format loads in a process outside this repository, with only the library its JSON
names, and gives the features `ssl.load_backbone` gives on the same batch, for any batch size."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir

import ssl
from ssl.errors import run_cli
from ssl.export import export
from ssl.models import build_backbone, save_export

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
BATCH = 3  # not the traced example's batch of 2: the batch dimension must really be dynamic
# name -> (backbone, kwargs, channels, input size): the ImageNet stem, the stride-2 stem on 1-channel 28 px
# images (both adaptation lines), the same at half width (byol_fmnist's backbone), and a ViT-Tiny small enough to
# trace in seconds.
CASES = {
    "resnet18_imagenet": ("resnet18", {"stem": "imagenet"}, 3, 64),
    "resnet18_stride2": ("resnet18", {"stem": "stride2", "in_channels": 1}, 1, 28),
    "resnet18_narrow": ("resnet18", {"stem": "stride2", "in_channels": 1, "width": 32}, 1, 28),
    "vit_tiny": ("vit_tiny", {"patch_size": 8, "image_size": 32}, 3, 32),
}
RESNETS = ["resnet18_imagenet", "resnet18_stride2"]


def installed(*modules: str) -> bool:
    """Whether the modules import (a broken install counts as missing, as it would for the exporter)."""
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


HAS_TIMM = installed("timm")
HAS_ONNX = installed("onnx", "onnxscript", "onnxruntime")
# (case, format) pairs converted and loaded outside; the optional ones only where their packages are installed.
RUNS = [(case, "torchvision") for case in RESNETS] + [(case, "torch.export") for case in CASES]
RUNS += [("vit_tiny", "torchvision")] if HAS_TIMM else []
RUNS += [(case, "onnx") for case in RESNETS] if HAS_ONNX else []
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install timm)")
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime")

# Runs in each export's directory with the stdlib's `ssl`: executes each JSON's `usage` and `call` lines as a user
# would, on the saved batch and its first image, and reports any module loaded from our package.
OUTSIDE = textwrap.dedent("""
    import json, os, ssl, sys
    import torch
    package, jsons = sys.argv[1], sys.argv[2:]
    for path in jsons:
        os.chdir(os.path.dirname(path))
        description = json.load(open(path))
        batch = torch.load("batch.pt", weights_only=True)
        namespace = {}
        exec("\\n".join(description["usage"]), namespace)
        outputs = []
        for images in (batch, batch[:1]):
            namespace["images"] = images.numpy() if description["format"] == "onnx" else images
            with torch.no_grad():
                exec(description["call"], namespace)
            outputs.append(torch.as_tensor(namespace["features"]))
        torch.save(outputs, path + ".outputs.pt")
    ours = sorted(name for name, module in sys.modules.items()
                  if (getattr(module, "__file__", None) or "").startswith(package + os.sep))
    print(json.dumps({"ssl": ssl.__file__, "ours": ours}))
""")


def randomised(backbone: torch.nn.Module) -> torch.nn.Module:
    """1-d tensors (norm scales and shifts, biases, BatchNorm statistics) are constants at initialisation, so a
    swapped or dropped one would go unnoticed; random values make every tensor's mapping count. Running variances
    above 1, as real ones of unnormalised activations are, keep the features near unit size, where the 1e-5
    tolerance is a tight bound in float32."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in backbone.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(1.0, 2.0, generator=generator)
            elif tensor.is_floating_point() and tensor.dim() == 1:
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return backbone


def write_export(directory: Path, case: str) -> Path:
    name, kwargs, channels, size = CASES[case]
    torch.manual_seed(0)
    backbone = randomised(build_backbone(name, **kwargs))
    path = directory / "teacher.pt"
    save_export(path, backbone, input_size=size, channels=channels, mean=[0.4] * channels, std=[0.2] * channels,
                dataset="cifar10", num_classes=10, method="dino", role="teacher", epoch=7)
    torch.save(torch.randn(BATCH, channels, size, size, generator=torch.Generator().manual_seed(2)),
               directory / "batch.pt")
    return path


def export_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("export", list(overrides))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """`teacher.pt` of every case, each in its own directory beside the batch the tests feed it."""
    tmp = tmp_path_factory.mktemp("export_formats")
    return {case: write_export(tmp / case, case) for case in CASES}


@pytest.fixture(scope="module")
def runs(exports) -> dict:
    """Every pair of `RUNS` converted in process, then all loaded in one process outside the repository (its
    start-up is most of the cost): per pair the files, the JSON, the outputs and the reference features."""
    written = {(case, kind): export(export_config(f"ckpt={exports[case]}", f"format={kind}", "device=cpu"))
               for case, kind in RUNS}
    jsons = [str(paths[1]) for paths in written.values()]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    outside = exports["vit_tiny"].parents[1]  # the tests' temporary directory
    result = subprocess.run([sys.executable, "-c", OUTSIDE, str(ROOT / "ssl"), *jsons], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    pairs = {}
    for (case, kind), (path, json_path) in written.items():
        backbone = ssl.load_backbone(exports[case])
        batch = torch.load(exports[case].parent / "batch.pt", weights_only=True)
        with torch.no_grad():
            references = [backbone(batch), backbone(batch[:1])]
        pairs[case, kind] = {"path": path, "json": json.loads(json_path.read_text()), "references": references,
                             "outputs": torch.load(f"{json_path}.outputs.pt", weights_only=True)}
    return {"pairs": pairs, "outside": report}


def assert_same_features(run: dict) -> None:
    """The converted model's features of the batch and of its first image are the export's, within `TOLERANCE`."""
    for output, reference in zip(run["outputs"], run["references"]):
        assert output.shape == reference.shape
        assert (output - reference).abs().max().item() <= TOLERANCE


def test_the_files_load_without_this_repository(runs):
    assert runs["outside"]["ours"] == []
    assert not runs["outside"]["ssl"].startswith(str(ROOT / "ssl"))  # `import ssl` there is the standard library's


@pytest.mark.parametrize("case", RESNETS)
def test_torchvision_resnet_loads_strictly_and_matches(runs, case):
    run = runs["pairs"][case, "torchvision"]
    assert_same_features(run)  # the JSON's usage lines load the weights with strict=True
    assert run["path"].name == "teacher.torchvision.pt"
    state = torch.load(run["path"], weights_only=True)
    assert state.keys() == torchvision.models.resnet18().state_dict().keys()
    assert state["fc.weight"].shape == (1000, 512) and not state["fc.weight"].any() and not state["fc.bias"].any()
    description = run["json"]
    assert description["constructor"] == "model = torchvision.models.resnet18()"
    assert description["input"]["mean"] == [0.4] * CASES[case][2] and description["input"]["size"] == CASES[case][3]
    if case == "resnet18_imagenet":
        assert description["adaptation"] == []  # torchvision's own ResNet-18, unchanged
    else:
        assert description["adaptation"] == [
            "model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=2, padding=1, bias=False)",
            "model.maxpool = nn.Identity()"]


@needs_timm
def test_timm_vit_matches(runs):
    run = runs["pairs"]["vit_tiny", "torchvision"]
    assert_same_features(run)
    assert run["path"].name == "teacher.timm.pt"
    assert run["json"]["timm_model"] == "vit_tiny_patch16_224"
    assert run["json"]["timm_kwargs"] == {"img_size": 32, "patch_size": 8, "in_chans": 3, "num_classes": 0}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_export_matches_for_any_batch_size(runs, case):
    run = runs["pairs"][case, "torch.export"]
    assert_same_features(run)
    assert run["path"].name == "teacher.pt2"
    assert run["json"]["input_shape"] == ["batch", CASES[case][2], CASES[case][3], CASES[case][3]]
    if case == "vit_tiny":  # the JSON also travels inside the .pt2
        extra = {"ssl_export.json": ""}
        torch.export.load(run["path"], extra_files=extra)
        assert json.loads(extra["ssl_export.json"]) == run["json"]


@needs_onnx
@pytest.mark.parametrize("case", RESNETS)
def test_onnx_matches_for_any_batch_size(runs, case):
    import onnx

    run = runs["pairs"][case, "onnx"]
    assert_same_features(run)
    model = onnx.load(str(run["path"]))
    assert {prop.key: json.loads(prop.value) for prop in model.metadata_props} == {"ssl_export": run["json"]}
    assert [value.name for value in model.graph.input] == ["images"]
    assert not (run["path"].parent / "teacher.onnx.data").exists()  # the weights are inside the one file


def test_unknown_format_is_one_error_line(exports):
    ckpt = exports["resnet18_stride2"]
    before = sorted(ckpt.parent.iterdir())
    result = subprocess.run([sys.executable, "-m", "ssl.export", f"ckpt={ckpt}", "format=tflite"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown format=tflite; choose one of: torchvision, torch.export, onnx"]
    assert sorted(ckpt.parent.iterdir()) == before


def test_torchvision_format_refuses_a_narrow_resnet_in_one_line(exports, tmp_path, capsys):
    cfg = export_config(f"ckpt={exports['resnet18_narrow']}", "format=torchvision", f"out={tmp_path / 'out'}")
    with pytest.raises(SystemExit, match="^2$"):
        run_cli(lambda: export(cfg))
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: format=torchvision needs torchvision's channel widths (64 after the stem); this export has width=32: "
        "use format=torch.export or format=onnx; nothing written"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(("case", "kind", "module"), [("resnet18_stride2", "onnx", "onnxscript"),
                                                      ("vit_tiny", "torchvision", "timm")])
def test_missing_optional_dependency_is_one_error_line(exports, tmp_path, monkeypatch, capsys, case, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    cfg = export_config(f"ckpt={exports[case]}", f"format={kind}", f"out={tmp_path / 'out'}")
    with pytest.raises(SystemExit, match="^2$"):
        run_cli(lambda: export(cfg))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pip install" in lines[0], lines
    assert module in lines[0]
    assert not any((tmp_path / "out").iterdir())  # nothing written
