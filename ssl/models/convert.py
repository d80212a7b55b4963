"""Published weights as exports: what `python -m ssl.convert` reads, and how it finds the backbone in it.

Layouts, recognised by their keys (the file is read with `torch.load(weights_only=True)`, or as safetensors):

    DINO checkpoint   main_dino.py's `checkpoint.pth`: {"teacher": {...}, "student": {...}, "args": Namespace, ...};
                      `role=teacher` (the default: DINO evaluates its teacher) or `student`. The `module.` (DDP) and
                      `backbone.` (MultiCropWrapper) prefixes are stripped and the `head.` dropped. The only object
                      besides tensors and plain data it may hold is its `args` (an `argparse.Namespace`).
    Lightning         solo-learn's (and other BYOL) checkpoints: {"state_dict": {...}, ...}; `backbone.` is the
                      online network (`role=student`, the default: the one solo-learn evaluates),
                      `momentum_backbone.` the teacher (`role=teacher`); projector, predictor, classifier dropped.
    state dict        {name: tensor}: a torchvision ResNet (`fc.` dropped) or a timm / DINO ViT (`head.` dropped),
                      e.g. torchvision's resnet50 weights, DINO's dino_deitsmall16_pretrain.pth or
                      dino_resnet50_pretrain.pth, timm's vit_small_patch16_224 weights.

The architecture comes from the tensor shapes: a ResNet's depth (blocks per stage, basic or bottleneck), width and
input channels from its convolutions; a ViT's width, depth, patch size, input channels and training resolution from
its patch embedding and position embeddings (heads from the variant of that width, as timm and DINO build them).
What the shapes cannot say is asked for: the stride and padding of a 3x3 first convolution (`stem=`).
"""

import argparse
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl.errors import UserError, is_system_error, os_failure
from ssl.models.backbones import SMALL_STEMS, build_backbone
from ssl.models.export import FORMAT
from ssl.models.formats import _renamed
from ssl.models.vit import VARIANTS

# Library names -> ours (regex, replacement): the inverse of ssl/models/formats.py's TORCHVISION_RENAMES and
# TIMM_RENAMES (tests/test_convert.py checks the round trip).
FROM_TORCHVISION = ((r"^conv1\.", "stem.0."), (r"^bn1\.", "stem.1."))
FROM_TIMM = ((r"^patch_embed\.proj\.", "patch_embed."), (r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.2."))
CLASSIFIERS = {"resnet": "fc.", "vit": "head."}  # a library model's classifier, not part of the backbone
RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), True): "resnet50"}  # (blocks per stage, bottleneck)
VITS = {variant["dim"]: f"vit_{name}" for name, variant in VARIANTS.items()}
VIT_DEPTH = 12
SAFE_OBJECTS = [argparse.Namespace]  # main_dino.py saves its arguments as one


@dataclass
class Converted:
    """A published backbone in our modules: `backbone` (built by `build_backbone`, weights loaded), where its
    tensors came from (`layout`, `role`, `epoch`) and the tensors of the file left out (`dropped`)."""

    backbone: nn.Module
    layout: str
    role: str
    epoch: int | None
    dropped: list[str] = field(default_factory=list)


def read_weights(path: Path) -> Any:
    """The file's contents, read without running any code it holds; every failure is one `UserError` line."""
    if not path.is_file():
        raise UserError(f"no file at {path}; pass source=PATH of the downloaded weights")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{path} is a safetensors file, which needs the safetensors package; "
                            "pip install safetensors") from None
        try:
            return load_file(path)
        except Exception as error:
            raise UserError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from None
    try:
        with torch.serialization.safe_globals(SAFE_OBJECTS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the first class or function the file would have to import; anything else is not a pickle
        found = re.search(r"\bGLOBAL ([\w.]+)", str(error))
        if found is None:
            raise UserError(f"{path} is not a readable torch.save file (not a pickle of tensors)") from None
        raise UserError(f"{path} holds pickled objects other than tensors ({found.group(1)}); refusing to load it, "
                        "as it could run code. If you trust the file, load it in your own code, torch.save its "
                        "state dict alone and convert that file") from None
    except Exception as error:  # truncated or foreign files raise many types; name the file and the cause
        if is_system_error(error):
            raise os_failure(error, path) from None
        raise UserError(f"{path} is not a readable torch.save file ({type(error).__name__}: {error})") from None


def find_backbone(payload: Any, path: Path, role: str | None) -> tuple[dict[str, torch.Tensor], str, str, list[str]]:
    """The backbone's tensors under library names (torchvision / timm), the layout, the role and the names of the
    tensors left out (heads, the other network, the classifier)."""
    if not isinstance(payload, Mapping):
        raise UserError(f"{path} holds a {type(payload).__name__}, not a dict of weights")
    if payload.get("format") == FORMAT:
        raise UserError(f"{path} is already an ssl export; every tool reads it as it is")
    if {"model", "optimizer", "step"} <= payload.keys():
        raise UserError(f"{path} is an ssl.pretrain checkpoint; use the teacher.pt its run wrote beside it")
    if "teacher" in payload or "student" in payload:
        layout, role = "DINO checkpoint", role or "teacher"
        if role not in ("teacher", "student") or role not in payload:
            held = " and ".join(f"role={r}" for r in ("teacher", "student") if r in payload)
            raise UserError(f"{path}: this DINO checkpoint holds {held}, not role={role}")
        state, prefix = _tensors(payload[role], path), "backbone."
    elif "state_dict" in payload:
        layout, role = "Lightning checkpoint", role or "student"
        if role not in ("student", "teacher"):
            raise UserError(f"role={role}: a Lightning checkpoint holds role=student (backbone.*) and, for methods "
                            "with a momentum network, role=teacher (momentum_backbone.*)")
        state, prefix = _tensors(payload["state_dict"], path), f"{'' if role == 'student' else 'momentum_'}backbone."
    else:
        layout, role = "state dict", role or "pretrained"
        state = _tensors(payload, path)
        prefix = "backbone." if any(name.startswith(("backbone.", "module.backbone.")) for name in state) else ""
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    backbone = {name.removeprefix(prefix): tensor for name, tensor in state.items() if name.startswith(prefix)}
    if not backbone:
        advice = "pass role=student" if role == "teacher" else "it holds no backbone"
        raise UserError(f"{path}: the {layout}'s {role} has no {prefix}* tensors (first keys: {sorted(state)[:4]}); "
                        f"{advice}")
    classifier = CLASSIFIERS[_kind(backbone, path)]
    dropped = [name for name in state if not name.startswith(prefix)]
    dropped += [prefix + name for name in backbone if name.startswith(classifier)]
    return {k: v for k, v in backbone.items() if not k.startswith(classifier)}, layout, role, sorted(dropped)


def architecture(state: Mapping[str, torch.Tensor], path: Path, stem: str | None) -> tuple[str, dict[str, Any]]:
    """`build_backbone`'s name and keyword arguments for library-named `state`, read from its shapes."""
    if _kind(state, path) == "vit":
        return _vit_architecture(state, path)
    return _resnet_architecture(state, path, stem)


def convert(path: Path, role: str | None = None, backbone: str | None = None, stem: str | None = None) -> Converted:
    """Read published weights at `path` into our backbone; `backbone` (a name) must agree with the shapes when
    given; `stem` is needed for ResNets with a 3x3 first convolution."""
    payload = read_weights(path)
    state, layout, role, dropped = find_backbone(payload, path, role)
    name, kwargs = architecture(state, path, stem)
    if backbone is not None and backbone != name:
        raise UserError(f"{path} holds a {name} ({_describe(name, kwargs)}), not a {backbone}; drop backbone= "
                        "or pass the weights of a " + backbone)
    kind = _kind(state, path)
    module = build_backbone(name, **kwargs)
    expected = module.state_dict()
    ours = _renamed(state, FROM_TIMM if kind == "vit" else FROM_TORCHVISION)
    # BatchNorm's batch counter does not change what the network computes; some releases leave it out
    ours.update({key: expected[key] for key in expected if key.endswith("num_batches_tracked") and key not in ours})
    problems = [f"{key} missing" for key in expected if key not in ours]
    problems += [f"{key} unexpected" for key in ours if key not in expected]
    problems += [f"{key} {tuple(ours[key].shape)} where {name} has {tuple(expected[key].shape)}"
                 for key in expected if key in ours and ours[key].shape != expected[key].shape]
    if problems:
        raise UserError(f"{path}: {len(problems)} of its tensors do not fit {_describe(name, kwargs)} (first: "
                        f"{problems[0]}, under our names); the file is not one of the layouts ssl.convert reads")
    module.load_state_dict(ours)  # copied into the module's float32 tensors (releases in float16 included)
    epoch = payload.get("epoch") if isinstance(payload, Mapping) else None
    return Converted(module.eval(), layout, role, epoch if isinstance(epoch, int) else None, dropped)


def _tensors(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} has no dict of tensors where its layout keeps the weights; ssl.convert reads "
                        "state dicts, DINO checkpoints (teacher/student) and Lightning checkpoints (state_dict)")
    return dict(state)


def _kind(state: Mapping[str, torch.Tensor], path: Path) -> str:
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "resnet"
    if {"pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= state.keys():
        return "vit"
    raise UserError(f"{path}: no ResNet (conv1.weight, layer1.*) or ViT (pos_embed, patch_embed.proj.weight, "
                    f"blocks.*) weights found; first keys: {sorted(state)[:4]}")


def _resnet_architecture(state: Mapping[str, torch.Tensor], path: Path, stem: str | None
                         ) -> tuple[str, dict[str, Any]]:
    blocks = tuple(len({match.group(1) for key in state if (match := re.match(rf"layer{stage}\.(\d+)\.", key))})
                   for stage in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    if (blocks, bottleneck) not in RESNETS:
        kind = "bottleneck" if bottleneck else "basic"
        raise UserError(f"{path} holds a ResNet with {'-'.join(map(str, blocks))} {kind} blocks; ssl builds "
                        f"{' and '.join(RESNETS.values())} only")
    conv1 = state["conv1.weight"]
    width, in_channels, kernel = conv1.shape[0], conv1.shape[1], conv1.shape[-1]
    if kernel == 7:
        if stem not in (None, "imagenet"):
            raise UserError(f"{path}: conv1 is 7x7, torchvision's ImageNet stem; stem={stem} does not fit it "
                            "(drop stem=)")
        stem = "imagenet"
    elif kernel == 3:
        if stem not in SMALL_STEMS:
            given = "no stem given" if stem is None else f"stem={stem} is not a 3x3 stem"
            raise UserError(f"{path}: conv1 is 3x3, and its stride and padding are not in the file ({given}); pass "
                            "stem=cifar_pad2 (solo-learn's CIFAR ResNets: stride 1, padding 2), stem=cifar (stride 1, "
                            "padding 1) or stem=stride2 (stride 2, padding 1)")
    else:
        raise UserError(f"{path}: conv1 is {kernel}x{kernel}; ssl's ResNet stems are 7x7 (imagenet) or 3x3")
    return RESNETS[blocks, bottleneck], {"in_channels": in_channels, "stem": stem, "width": width}


def _vit_architecture(state: Mapping[str, torch.Tensor], path: Path) -> tuple[str, dict[str, Any]]:
    patch_weight, pos_embed = state["patch_embed.proj.weight"], state["pos_embed"]
    dim, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    depth = len({match.group(1) for key in state if (match := re.match(r"blocks\.(\d+)\.", key))})
    grid = round((pos_embed.shape[1] - 1) ** 0.5)
    if dim not in VITS or depth != VIT_DEPTH:
        raise UserError(f"{path} holds a ViT {dim} wide and {depth} blocks deep; ssl builds "
                        f"{', '.join(f'{name} ({width} wide)' for width, name in VITS.items())}, {VIT_DEPTH} deep")
    if pos_embed.shape[1] != 1 + grid**2:
        raise UserError(f"{path}: its position embeddings hold {pos_embed.shape[1]} tokens, not a class token and a "
                        "square grid (register tokens?); ssl's ViT has exactly those")
    return VITS[dim], {"in_channels": in_channels, "patch_size": patch, "image_size": grid * patch}


def _describe(name: str, kwargs: Mapping[str, Any]) -> str:
    return f"{name} with " + ", ".join(f"{key}={value}" for key, value in kwargs.items())
