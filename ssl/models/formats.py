"""An export (`teacher.pt`) in the formats other code reads without this repository.

    torchvision   ResNets: a state_dict that `torchvision.models.resnet18()` / `resnet50()` loads with strict=True
                  (after the JSON's adaptation lines for the cifar/stride2 stems or in_channels != 3;
                  torchvision's widths only);
                  ViTs: a state_dict for the matching timm model (needs the optional `timm`)
    torch.export  a `.pt2` ExportedProgram with a dynamic batch dimension: `torch.export.load(path).module()(x)`
    onnx          a `.onnx` graph with a dynamic batch axis (needs the exporter's `onnx` and `onnxscript`)

Every format takes what the backbone takes, float32 NCHW images already normalised with the export's mean/std, and
returns its pooled (B, feature_dim) embedding. Normalisation stays outside the model so that the weights are the
backbone's alone, as in torchvision and timm. A JSON beside each file records the normalisation, the input shape
and the Python lines that load the file (`usage`), so the two files and the named library are all a user needs.
"""

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torchvision
from torch import nn

from ssl.errors import UserError
from ssl.files import atomic_write_text
from ssl.models.backbones import TORCHVISION_WIDTH
from ssl.models.vit import VisionTransformer

# Our parameter names -> the library's (regex, replacement); names not matched are already the library's.
TORCHVISION_RENAMES = ((r"^stem\.0\.", "conv1."), (r"^stem\.1\.", "bn1."))
TIMM_RENAMES = ((r"^patch_embed\.", "patch_embed.proj."), (r"\.mlp\.0\.", ".mlp.fc1."), (r"\.mlp\.2\.", ".mlp.fc2."))
TORCHVISION_CONV1 = (3, (7, 7), (2, 2), (3, 3))  # torchvision's conv1: in_channels, kernel, stride, padding
TORCHVISION_CLASSES = 1000  # rows of the all-zero `fc` that lets `resnetNN()` load the state_dict strictly
ONNX_INPUT, ONNX_OUTPUT = "images", "features"


def torchvision_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A `ResNetBackbone`'s tensors under torchvision's names (stem.0 -> conv1, stem.1 -> bn1, layer1-4 as they are)
    plus an all-zero `fc`: torchvision's ResNet has a classifier our backbone lacks, and zeros rather than a random
    head make clear it holds nothing learned (`model.fc = nn.Identity()` gives the pooled features)."""
    state = _renamed(backbone.state_dict(), TORCHVISION_RENAMES)
    state["fc.weight"] = torch.zeros(TORCHVISION_CLASSES, backbone.feature_dim)
    state["fc.bias"] = torch.zeros(TORCHVISION_CLASSES)
    return state


def torchvision_setup(backbone: nn.Module) -> list[str]:
    """The lines that build the torchvision ResNet the state_dict fits: the constructor, then a replaced `conv1`
    when the stem or channel count differs from torchvision's and `maxpool = nn.Identity()` for stems without one."""
    conv, maxpool = backbone.stem[0], backbone.stem[3]
    lines = [f"model = torchvision.models.{backbone.export_meta['backbone']['name']}()"]
    if (conv.in_channels, conv.kernel_size, conv.stride, conv.padding) != TORCHVISION_CONV1:
        lines.append(f"model.conv1 = nn.Conv2d({conv.in_channels}, {conv.out_channels}, "
                     f"kernel_size={conv.kernel_size[0]}, stride={conv.stride[0]}, padding={conv.padding[0]}, "
                     "bias=False)")
    if isinstance(maxpool, nn.Identity):
        lines.append("model.maxpool = nn.Identity()")
    return lines


def timm_state_dict(backbone: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our ViT's tensors under timm's `VisionTransformer` names. The layouts already agree: fused qkv as (q, k, v)
    rows, pos_embed (1, 1 + grid^2, D) with the CLS position first, LayerNorm eps 1e-6 and exact GELU on both sides."""
    return _renamed(backbone.state_dict(), TIMM_RENAMES)


def timm_kwargs(backbone: VisionTransformer) -> dict[str, Any]:
    """Keyword arguments that turn timm's `vit_<variant>_patch16_224` into our ViT: its width, depth and heads are
    the variant's, these set the patch size, resolution and channels, and `num_classes=0` makes timm's head an
    identity over the CLS token after the final norm, which is our pooled embedding."""
    patch = backbone.patch_embed.kernel_size[0]
    return {"img_size": backbone.grid * patch, "patch_size": patch, "in_chans": backbone.patch_embed.in_channels,
            "num_classes": 0}


def write_torchvision(backbone: nn.Module, source: Path, directory: Path) -> list[Path]:
    """ResNets as torchvision weights (`<stem>.torchvision.pt`), ViTs as timm weights (`<stem>.timm.pt`): the
    standard classes of each architecture. The JSON's setup lines are run here and the state_dict loaded into
    their model with strict=True before anything is written, so what the JSON says is what was checked."""
    if isinstance(backbone, VisionTransformer):
        library = _require(("timm",), "format=torchvision of a ViT (weights for timm's VisionTransformer)")[0]
        name = f"{backbone.export_meta['backbone']['name']}_patch16_224"
        kwargs = timm_kwargs(backbone)
        arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        kind, state, imports = "timm", timm_state_dict(backbone), ["import timm", "import torch"]
        setup = [f"model = timm.create_model({name!r}, pretrained=False, {arguments})"]
        finish = ["model.eval()"]
        extra = {"timm_model": name, "timm_kwargs": kwargs,
                 "other_sizes": "add dynamic_img_size=True: timm then resizes the position embeddings itself "
                                "(bicubic with antialiasing, so slightly unlike ssl when shrinking them)"}
    else:
        width = backbone.stem[0].out_channels
        if width != TORCHVISION_WIDTH:
            raise UserError(f"format=torchvision needs torchvision's channel widths (64 after the stem); this export "
                            f"has width={width}: use format=torch.export or format=onnx; nothing written")
        library, kind, state = torchvision, "torchvision", torchvision_state_dict(backbone)
        imports = ["import torch", "import torchvision", "from torch import nn"]
        setup = torchvision_setup(backbone)
        finish = [f"model.fc = nn.Identity()  # fc is all zeros (not part of the backbone); this gives the pooled "
                  f"(B, {backbone.feature_dim}) features", "model.eval()"]
        extra = {"constructor": setup[0], "adaptation": setup[1:],
                 "fc": f"all zeros ({TORCHVISION_CLASSES} x {backbone.feature_dim}), there only so that the "
                       "torchvision model loads the state_dict with strict=True"}
    namespace: dict[str, Any] = {}
    exec("\n".join(imports + setup), namespace)  # noqa: S102 - our own setup lines, checked as users will run them
    try:
        namespace["model"].load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"the installed {library.__name__} {library.__version__} does not take the converted "
                        f"weights ({str(error).splitlines()[0]}); nothing written") from None
    path = directory / f"{source.stem}.{kind}.pt"
    torch.save(state, path)
    usage = [*imports, *setup, f"model.load_state_dict(torch.load({path.name!r}, weights_only=True))", *finish]
    description = _description(backbone, source, kind, path, usage, "features = model(images)", **extra)
    return [path, _write_json(directory / f"{source.stem}.{kind}.json", description)]


def exported_program(backbone: nn.Module) -> torch.export.ExportedProgram:
    """The backbone traced by `torch.export` for inputs of its export's size, with a dynamic batch dimension.

    Traced by dynamo (strict=True): the default non-strict tracing turns the ViT's `len(x)` into the example's
    batch size and then refuses the dynamic batch. The example batch is 2 because tracing a batch of 1 specialises
    the size to 1. Eval mode is baked in (BatchNorm running statistics, no stochastic depth).
    """
    meta = backbone.export_meta
    device = next(backbone.parameters()).device
    example = torch.zeros(2, meta["channels"], meta["input_size"], meta["input_size"], device=device)
    return torch.export.export(backbone, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=True)


def write_torch_export(backbone: nn.Module, source: Path, directory: Path) -> list[Path]:
    """`<stem>.pt2`: runs with torch alone (`torch.export.load(path).module()`); the JSON is also stored inside it
    as the extra file `ssl_export.json`. The program holds the tensors on the device it was traced on."""
    path = directory / f"{source.stem}.pt2"
    usage = ["import torch", f"model = torch.export.load({path.name!r}).module()"]
    description = _description(backbone, source, "torch.export", path, usage, "features = model(images)",
                               input_shape=_input_shape(backbone))
    torch.export.save(exported_program(backbone), path, extra_files={"ssl_export.json": json.dumps(description)})
    return [path, _write_json(directory / f"{source.stem}.pt2.json", description)]


def write_onnx(backbone: nn.Module, source: Path, directory: Path) -> list[Path]:
    """`<stem>.onnx` from the same ExportedProgram as format=torch.export, so its batch axis is dynamic too (the
    exporter's own tracing of the module silently fixes the ViT's batch). One file with the weights inside (ONNX's
    2 GB limit is far above our backbones); the JSON is also stored in the model's `metadata_props`."""
    _require(("onnx", "onnxscript"), "format=onnx (the torch.onnx exporter)")
    path = directory / f"{source.stem}.onnx"
    usage = ["import onnxruntime", f"session = onnxruntime.InferenceSession({path.name!r})"]
    call = f"features = session.run([{ONNX_OUTPUT!r}], {{{ONNX_INPUT!r}: images}})[0]  # images: float32 numpy"
    description = _description(backbone, source, "onnx", path, usage, call, input_shape=_input_shape(backbone),
                               input_name=ONNX_INPUT, output_name=ONNX_OUTPUT)
    program = torch.onnx.export(exported_program(backbone), dynamo=True, input_names=[ONNX_INPUT],
                                output_names=[ONNX_OUTPUT], verbose=False)
    program.model.metadata_props["ssl_export"] = json.dumps(description)
    program.save(path, external_data=False)
    return [path, _write_json(directory / f"{source.stem}.onnx.json", description)]


WRITERS: dict[str, Callable[[nn.Module, Path, Path], list[Path]]] = {
    "torchvision": write_torchvision,
    "torch.export": write_torch_export,
    "onnx": write_onnx,
}


def writer(name: str | None) -> Callable[[nn.Module, Path, Path], list[Path]]:
    """The writer of format `name`, `writer(backbone, source export path, output directory) -> files written`;
    looked up before the export is read, so a mistyped format costs nothing."""
    if name not in WRITERS:
        given = "no format given" if name is None else f"unknown format={name}"
        raise UserError(f"{given}; choose one of: {', '.join(WRITERS)}")
    return WRITERS[name]


def _renamed(state: dict[str, torch.Tensor], rules: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    renamed = {}
    for name, tensor in state.items():
        for pattern, replacement in rules:
            name = re.sub(pattern, replacement, name)
        renamed[name] = tensor.detach().cpu().clone()
    return renamed


def _require(modules: tuple[str, ...], purpose: str) -> list[ModuleType]:
    """Import optional dependencies, or stop with one line naming the pip command (before anything is written)."""
    found, missing = [], []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{purpose} needs {' and '.join(missing)}, not installed; pip install {' '.join(missing)}")
    return found


def _input_shape(backbone: nn.Module) -> list[str | int]:
    meta = backbone.export_meta
    return ["batch", meta["channels"], meta["input_size"], meta["input_size"]]


def _description(backbone: nn.Module, source: Path, kind: str, path: Path, usage: list[str], call: str,
                 **extra: Any) -> dict[str, Any]:
    """What a user of the converted file needs: its inputs (normalisation, size), output, provenance and the lines
    that load it (`usage`, run in the file's directory) and call it (`call`)."""
    meta = backbone.export_meta
    return {
        "format": kind, "file": path.name, "source": str(source),
        **{key: meta[key] for key in ("backbone", "feature_dim", "method", "role", "dataset", "epoch")},
        "input": {"channels": meta["channels"], "size": meta["input_size"], "dtype": "float32",
                  "mean": meta["mean"], "std": meta["std"],
                  "normalisation": "NCHW, per channel (pixels / 255 - mean) / std, as in training"},
        "output": f"(batch, {meta['feature_dim']}) pooled embedding (ssl.load_backbone(...)(images))",
        **extra,
        "usage": usage,
        "call": call,
    }


def _write_json(path: Path, description: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(description, indent=2) + "\n")
