"""Methods: one file each (heads, loss, forward over views). `build_method(name, backbone, **kwargs)`.

A method is an `nn.Module` with `student` (an `nn.ModuleDict` holding `backbone` and the heads the teacher
mirrors), `teacher` (same names and shapes, no gradients, moved by `ssl.ema`), optional student-only modules
(BYOL's predictor), and `forward(views, epoch) -> MethodOutput`. Optional hook the loop calls after
`backward()`: `before_optimizer_step(epoch)`.
"""

import importlib
import inspect

from torch import nn

from ssl.errors import UserError
from ssl.methods.base import MethodOutput

METHODS = {"byol": "ssl.methods.byol:BYOL", "dino": "ssl.methods.dino:DINO"}


def build_method(name: str, backbone: nn.Module, epochs: int, **kwargs) -> nn.Module:
    """Build method `name` (one of `METHODS`) around `backbone`; `kwargs` are the method's own arguments.

    `epochs` (the run's length) is passed on to methods whose schedules need it (DINO's teacher temperature).
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    module_name, class_name = METHODS[name].split(":")
    method_class = getattr(importlib.import_module(module_name), class_name)
    if "epochs" in inspect.signature(method_class).parameters:
        kwargs["epochs"] = epochs
    try:
        return method_class(backbone, **kwargs)
    except TypeError as error:
        raise UserError(f"method {name!r} does not take these arguments {sorted(kwargs)}: {error}") from None


__all__ = ["METHODS", "MethodOutput", "build_method"]
