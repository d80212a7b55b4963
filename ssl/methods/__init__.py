"""Methods: one file each (heads, loss, forward over views), each a `ssl.methods.base.Method`.
`build_method(name, backbone, **kwargs)`."""

import importlib
import inspect

from torch import nn

from ssl.errors import UserError, refuse_unknown_arguments
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
    parameters = inspect.signature(method_class).parameters
    # the backbone and the run's length come from the loop, not from method.kwargs
    refuse_unknown_arguments(f"method {name!r}", kwargs, set(parameters) - {"backbone", "epochs"},
                             settable_in="method.kwargs")
    if "epochs" in parameters:
        kwargs["epochs"] = epochs
    try:
        return method_class(backbone, **kwargs)
    except TypeError as error:  # a value of the wrong type (the names were checked above)
        raise UserError(f"method {name!r} cannot be built with {kwargs}: {error}") from None


__all__ = ["METHODS", "Method", "MethodOutput", "build_method"]
