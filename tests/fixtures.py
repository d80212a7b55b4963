"""Tiny datasets written in the real on-disk formats, so tests exercise the real loaders and never download; and
`run_module`, an entry point's `python -m` run inside the test process."""

import gzip
import runpy
import struct
import sys
import warnings
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An idx file (the MNIST / Fashion-MNIST format): magic (0, 0, dtype 0x08, ndim), big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def class_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright square whose position encodes the class: learnable, but not trivially."""
    images = rng.integers(0, 60, size=(len(labels), size, size))
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        top, left = 2 + row * (size // 4), 2 + col * (size // 4)
        images[i, top : top + size // 5, left : left + size // 5] = 230
    return images.astype(np.uint8)


def write_fmnist(root: Path, train: int = 96, test: int = 48, seed: int = 0) -> Path:
    """Fashion-MNIST-format idx files under ROOT/FashionMNIST/raw (28 px, 10 classes); returns ROOT."""
    rng = np.random.default_rng(seed)
    raw = root / "FashionMNIST" / "raw"
    for prefix, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", class_images(labels, 28, rng))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def run_module(module: str, *args: str) -> int:
    """`python -m MODULE ARGS...` inside this process; returns its exit status.

    The module runs as `__main__` (runpy, as `-m` does) with `sys.argv` set, so its `__main__` block, Hydra's parsing
    of the command line and `ssl.errors.run_cli` are the real ones: only the interpreter's start-up (seconds of
    importing torch) is skipped. What it prints goes to pytest's capture: read it with `capsys`. An exception other
    than SystemExit propagates, as a traceback would end a real run. What only a fresh interpreter shows (nothing
    but the one error line on stderr: no warning at start-up, no traceback) keeps a real subprocess test for each
    entry point that has one-line errors tested (ssl.pretrain, ssl.linear_eval, ssl.export, ssl.visualize).
    """
    argv = sys.argv
    sys.argv = [module, *args]  # runpy puts the module's file in argv[0]
    try:
        with warnings.catch_warnings():
            # a module a test imported already runs again, fresh, as __main__: what -m does, so nothing to warn of
            warnings.filterwarnings("ignore", message=".* found in sys.modules after import of package",
                                    category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)  # sys.exit("message"): printed, status 1
        return 1
    finally:
        sys.argv = argv
    return 0
