"""Methods: one file each (heads, loss, forward over views), each a `ssl.methods.base.Method`.
`build_method(name, backbone, **kwargs)`."""

import importlib
import inspect

from torch import nn

from ssl.errors import UserError
from ssl.methods.base import Method, MethodOutput

METHODS = {"byol": "ssl.methods.byol:BYOL", "dino": "ssl.methods.dino:DINO"}


def build_method(name: str, backbone: nn.Module, epochs: int, **kwargs) -> Method:
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


__all__ = ["METHODS", "Method", "MethodOutput", "build_method"]
