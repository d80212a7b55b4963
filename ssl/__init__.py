"""Teacher-student self-supervised learning (BYOL, DINO) for PyTorch.

This package shares its name with Python's standard-library ``ssl``. Run from the repository root (or with the
repository first on ``PYTHONPATH``), ``import ssl`` finds this package, so the package *is* also the standard
``ssl`` module: the first thing it does is execute the standard library's ``ssl.py`` in its own namespace. Every
stdlib name (``SSLContext``, ``create_default_context``, ``_create_default_https_context``, ...) is therefore the
genuine object, with ``__module__ == "ssl"``, and ``urllib``, ``http.client``, ``requests`` and wandb keep working
in the same process. Our subpackages are ordinary submodules (``ssl.ema``, ``ssl.pretrain``, ...); none of their
names may shadow a stdlib ``ssl`` global (``tests/test_ssl_name.py`` checks this).

Framework entry points are imported lazily (``ssl.load_backbone``) so that HTTPS users never pay for torch.
"""

import os as _os
import sysconfig as _sysconfig


def _exec_stdlib_ssl() -> None:
    path = _os.path.join(_sysconfig.get_paths()["stdlib"], "ssl.py")
    with open(path, "rb") as source:
        code = compile(source.read(), path, "exec")
    exec(code, globals())  # noqa: S102 - runs CPython's own ssl.py as this module's body


_DOC = __doc__
_exec_stdlib_ssl()
__doc__ = _DOC

_LAZY = {"load_backbone": "ssl.models.export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ssl' has no attribute {name!r}")
