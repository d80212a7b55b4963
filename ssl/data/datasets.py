"""Datasets as uint8 tensors: small sets load once into memory, image folders decode per batch in workers.

Resident sets (CIFAR-10/100, STL-10, Fashion-MNIST) are read from their original on-disk formats into one
``ImageDataset``; image folders (custom data, ImageNet-style) become a ``FolderDataset`` (`ssl.data.folder`) that
cuts each view from the whole decoded image.
Missing or corrupt data raises ``UserError`` naming what was looked for, where, and how to get it.
"""

import functools
import gzip
import pickle
import socket
import sys
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets as tv_datasets

from ssl.data.folder import FolderDataset
from ssl.errors import UserError, is_system_error, os_failure

# Debian's dataset-fashion-mnist package (`make data`) installs the gzipped idx files here.
FMNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_SIDE = 96


@dataclass
class ImageDataset:
    """A dataset held in memory: ``images`` uint8 (N, C, H, W) on CPU, ``labels`` int64 (N,), -1 if unlabeled."""

    images: Tensor
    labels: Tensor
    num_classes: int
    name: str
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------------------
# On-disk formats. Each reader returns (images uint8 (N, C, H, W), labels int64 (N,)) and raises UserError
# naming the file and the fix when a file is missing or malformed.


def _corrupt(path: Path, problem: str, fix: str) -> UserError:
    return UserError(f"{path} is corrupt ({' '.join(problem.split())}); {fix}")  # one line, whatever the cause


def _unreadable(path: Path, error: Exception, fix: str) -> UserError:
    """A failed read of `path`: the machine's fault (permissions, I/O) or the file's (corrupt contents)."""
    if is_system_error(error):
        return os_failure(error, path)
    return _corrupt(path, f"{type(error).__name__}: {error}", fix)


def _read_cifar_pickle(path: Path, label_key: str, fix: str) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as file:
            # The official CIFAR python release is pickled numpy arrays; latin1 decodes its Python 2 strings.
            batch = pickle.load(file, encoding="latin1")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = torch.tensor(batch[label_key], dtype=torch.int64)
        images = torch.from_numpy(data).view(-1, 3, 32, 32)
    except Exception as error:  # unpickling garbage can raise almost anything
        raise _unreadable(path, error, fix) from None
    if len(images) != len(labels):
        raise _corrupt(path, f"{len(images)} images but {len(labels)} labels", fix)
    return images, labels


def _read_pickle_names(path: Path, key: str, fix: str) -> list[str]:
    try:
        with open(path, "rb") as file:
            return list(pickle.load(file, encoding="latin1")[key])
    except Exception as error:  # unpickling garbage can raise almost anything
        raise _unreadable(path, error, fix) from None


def _read_idx(path: Path, fix: str) -> Tensor:
    """An idx file (MNIST format: zero, zero, dtype 0x08 = uint8, rank, big-endian int32 dims, data), gzipped
    when the name ends in .gz."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError without errno
        raise _unreadable(path, error, fix) from None
    if len(raw) < 4 or raw[0:3] != b"\x00\x00\x08":
        raise _corrupt(path, "not a uint8 idx file", fix)
    rank = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(rank)]
    start = 4 + 4 * rank
    expected = int(np.prod(dims))
    if len(raw) - start != expected:
        raise _corrupt(path, f"{len(raw) - start} data bytes, header {dims} says {expected}", fix)
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).view(dims)


DOWNLOAD_SETTINGS = "auto, true or false"


def download_wanted(setting: bool | str, url: str) -> bool:
    """Whether a missing data set is fetched: ``data.download=true`` always tries, ``false`` never does, and
    ``auto`` (the default) tries when ``url``'s host answers, so an offline machine keeps its one-line error."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise UserError(f"data.download={setting!r} is not one of {DOWNLOAD_SETTINGS}; auto fetches missing "
                        "public data sets when the machine is online")
    return host_reachable(url)


@functools.cache
def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``url``'s host opens within ``timeout`` seconds (asked once per process)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _download(what: str, url: str, root: Path, fetch: Callable[[], Any]) -> None:
    """Run a torchvision downloader; it fetches, checks the md5 and extracts into torchvision's layout."""
    print(f"downloading {what} from {url} into {root} (data.download=false turns this off)", file=sys.stderr,
          flush=True)
    try:
        fetch()
    except Exception as error:  # network, checksum and archive failures each have their own types
        raise UserError(
            f"could not download {what} into {root} ({' '.join(str(error).split())}); fetch {url} by hand and "
            f"extract it into {root}"
        ) from None


def _require_files(what: str, url: str, root: Path, files: list[Path], download: bool | str,
                   fetch: Callable[[], Any], size: str = "") -> None:
    """Fetch `what` with `fetch` when any of `files` is missing and `download_wanted`; then refuse, in one line
    naming the first missing file and both fixes, if any is still missing."""
    if not all(path.is_file() for path in files) and download_wanted(download, url):
        _download(what, url, root, fetch)
    missing = [path for path in files if not path.is_file()]
    if missing:
        raise UserError(f"{what} not found: looked for {missing[0]}; run with data.download=true (online{size}) "
                        f"or extract {url} into {root}")


def load_cifar(root: Path, split: str, download: bool | str, num_classes: int) -> tuple[Tensor, Tensor, list[str]]:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) python pickles under ``root``."""
    if num_classes == 10:
        what, folder, url, tv_class = "CIFAR-10", root / "cifar-10-batches-py", CIFAR10_URL, tv_datasets.CIFAR10
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key, meta, names_key = "labels", "batches.meta", "label_names"
    else:
        what, folder, url, tv_class = "CIFAR-100", root / "cifar-100-python", CIFAR100_URL, tv_datasets.CIFAR100
        names = {"train": ["train"], "test": ["test"]}
        label_key, meta, names_key = "fine_labels", "meta", "fine_label_names"
    if split not in names:
        raise UserError(f"{what} has splits {sorted(names)}, not {split!r}; fix data.*_split")
    files = [folder / name for name in names[split]] + [folder / meta]
    _require_files(what, url, root, files, download,
                   lambda: tv_class(str(root), train=split == "train", download=True))
    fix = f"delete {folder} and run with data.download=true, or extract {url} into {root}"
    parts = [_read_cifar_pickle(path, label_key, fix) for path in files[:-1]]
    classes = _read_pickle_names(files[-1], names_key, fix)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), classes


def _find_fmnist(root: Path, stem: str) -> Path | None:
    for folder in (root / "FashionMNIST" / "raw", FMNIST_DEBIAN_DIR):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fmnist(root: Path, split: str, download: bool | str) -> tuple[Tensor, Tensor, list[str]]:
    """Fashion-MNIST idx files (raw or .gz): ``root/FashionMNIST/raw``, else Debian's location, else downloaded."""
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise UserError(f"Fashion-MNIST has splits {sorted(prefixes)}, not {split!r}; fix data.*_split")
    stems = [f"{prefixes[split]}-images-idx3-ubyte", f"{prefixes[split]}-labels-idx1-ubyte"]
    if any(_find_fmnist(root, stem) is None for stem in stems) and download_wanted(download, FMNIST_URL):
        _download(
            "Fashion-MNIST", FMNIST_URL, root / "FashionMNIST" / "raw",
            lambda: tv_datasets.FashionMNIST(str(root), train=split == "train", download=True),
        )  # fmt: skip
    paths = [_find_fmnist(root, stem) for stem in stems]
    if None in paths:
        raise UserError(
            f"Fashion-MNIST not found: looked for {stems[0]}[.gz] in {root / 'FashionMNIST' / 'raw'} and "
            f"{FMNIST_DEBIAN_DIR}; run 'sudo apt-get install dataset-fashion-mnist' (or 'make data'), "
            "or set data.download=true (online)"
        )
    fix = f"delete {paths[0].parent} or run with data.download=true; files are at {FMNIST_URL}"
    images, labels = (_read_idx(path, fix) for path in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise _corrupt(paths[0], f"images {tuple(images.shape)} do not match labels {tuple(labels.shape)}", fix)
    return images.unsqueeze(1), labels.to(torch.int64), FMNIST_CLASSES


def _read_stl_images(path: Path, limit: int | None, fix: str) -> Tensor:
    record = 3 * STL10_SIDE * STL10_SIDE
    count = -1 if limit is None else limit * record
    data = np.fromfile(path, dtype=np.uint8, count=count)
    if len(data) % record:
        raise _corrupt(path, f"{len(data)} bytes is not a whole number of {record}-byte images", fix)
    # Each image is stored channel by channel, column-major: transpose to rows first.
    return torch.from_numpy(data).view(-1, 3, STL10_SIDE, STL10_SIDE).transpose(2, 3).contiguous()


def load_stl10(root: Path, split: str, download: bool | str, limit: int | None) -> tuple[Tensor, Tensor, list[str]]:
    """STL-10 binaries in ``root/stl10_binary``: train and test (labelled), unlabeled (labels -1)."""
    if split not in ("train", "test", "unlabeled"):
        raise UserError(f"STL-10 has splits ['test', 'train', 'unlabeled'], not {split!r}; fix data.*_split")
    folder = root / "stl10_binary"
    files = [folder / f"{split}_X.bin"] + ([] if split == "unlabeled" else [folder / f"{split}_y.bin"])
    _require_files("STL-10", STL10_URL, root, files, download,
                   lambda: tv_datasets.STL10(str(root), split=split, download=True), size=", 2.5 GB")
    fix = f"delete {folder} and run with data.download=true, or extract {STL10_URL} into {root}"
    images = _read_stl_images(files[0], limit, fix)
    if split == "unlabeled":
        return images, torch.full((len(images),), -1, dtype=torch.int64), STL10_CLASSES
    labels = torch.from_numpy(np.fromfile(files[1], dtype=np.uint8, count=len(images))).to(torch.int64) - 1
    if len(labels) != len(images) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10):
        raise _corrupt(files[1], f"{len(labels)} labels in 1..10 expected for {len(images)} images", fix)
    return images, labels, STL10_CLASSES


# ---------------------------------------------------------------------------------------------------------

_RESIDENT: dict[str, Callable[[Path, str, bool | str, int | None], tuple[Tensor, Tensor, list[str]]]] = {
    "cifar10": lambda root, split, download, limit: load_cifar(root, split, download, num_classes=10),
    "cifar100": lambda root, split, download, limit: load_cifar(root, split, download, num_classes=100),
    "stl10": load_stl10,
    "fmnist": lambda root, split, download, limit: load_fmnist(root, split, download),
}
DATASETS = sorted([*_RESIDENT, "imagefolder"])


def _folder_path(data_cfg: Mapping[str, Any], split: str) -> Path:
    explicit = data_cfg.get(f"{split}_path")
    if explicit:
        return Path(explicit)
    root = Path(data_cfg["root"])
    candidates = ["train"] if split == "train" else ["val", "test"]
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    return root / candidates[0]


def build_dataset(data_cfg: Mapping[str, Any], split: str) -> ImageDataset | FolderDataset:
    """The dataset a ``data`` config describes, for ``split``: a split name (``train``, ``test``, ``unlabeled``,
    joined with ``+`` to concatenate) or the config key holding one (``pretrain_split``, ``train_split``,
    ``test_split``). ``data.limit`` keeps the first N images."""
    name = data_cfg["name"]
    split = data_cfg[split] if split.endswith("_split") else split
    limit = data_cfg.get("limit")
    if limit is not None and limit < 1:
        raise UserError(f"data.limit={limit} must be a positive number of images or null")
    if name == "imagefolder":
        if "+" in split or split not in ("train", "test"):
            raise UserError(f"image folders have splits 'train' and 'test', not {split!r}; fix data.*_split")
        dataset = FolderDataset(
            _folder_path(data_cfg, split), data_cfg["image_size"], data_cfg["channels"], data_cfg["num_workers"],
            name, eval_crop_fraction=data_cfg.get("eval_crop_fraction", 0.875), decode=data_cfg.get("decode", "cpu"),
            skip_bad_images=data_cfg.get("skip_bad_images", False),
        )  # fmt: skip
        expected = data_cfg.get("num_classes")
        if expected is not None and expected != dataset.num_classes:
            raise UserError(
                f"{dataset.root} has {dataset.num_classes} class folders but data.num_classes={expected}; "
                "set data.num_classes to match (or null)"
            )
        if limit is not None:
            dataset.limit(limit)
        return dataset
    if name not in _RESIDENT:
        raise UserError(f"unknown dataset data.name={name!r}; known: {DATASETS}")

    root = Path(data_cfg["root"])
    images, labels, classes = [], [], []
    remaining = limit
    for part in split.split("+"):
        if remaining == 0:
            break
        part_images, part_labels, classes = _RESIDENT[name](root, part, data_cfg.get("download", "auto"), remaining)
        if remaining is not None and remaining < len(part_labels):
            # clone() so the kept slice does not hold the whole split in memory.
            part_images, part_labels = part_images[:remaining].clone(), part_labels[:remaining].clone()
            remaining = 0
        elif remaining is not None:
            remaining -= len(part_labels)
        images.append(part_images)
        labels.append(part_labels)
    if len(images) > 1:
        images, labels = [torch.cat(images)], [torch.cat(labels)]
    return ImageDataset(images[0], labels[0], len(classes), name, classes)
