"""Dataset loading from tiny fixtures in the real on-disk formats; nothing is downloaded."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ssl.data import datasets
from ssl.data.datasets import FolderDataset, ImageDataset, build_dataset
from ssl.errors import UserError

host_reachable = datasets.host_reachable.__wrapped__  # uncached, and before conftest makes every host unreachable
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
DATA_KEYS = {
    "name", "root", "download", "limit", "batch_size", "num_workers", "image_size", "local_size", "channels",
    "num_classes", "mean", "std", "pretrain_split", "train_split", "test_split",
}  # fmt: skip


def config(dataset: str, root: Path, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{dataset}.yaml"))
    return {**cfg, "root": str(root), **overrides}


def random_images(count: int, channels: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, channels, side, side), dtype=np.uint8)


# --- fixtures in the original formats -------------------------------------------------------------------


def write_cifar(root: Path, fine: bool) -> dict[str, np.ndarray]:
    """CIFAR python pickles: rows of 3072 bytes (R plane, G plane, B plane), labels as lists."""
    folder = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if fine else "labels"
    files = ["train", "test"] if fine else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for seed, name in enumerate(files):
        images = random_images(2, 3, 32, seed)
        batch = {"data": images.reshape(2, -1), label_key: [seed % 10, (seed + 1) % 10], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = images
    meta, names_key = ("meta", "fine_label_names") if fine else ("batches.meta", "label_names")
    (folder / meta).write_bytes(pickle.dumps({names_key: [f"class{i}" for i in range(100 if fine else 10)]}))
    return written


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_fmnist(folder: Path, compress: bool, count: int = 5) -> np.ndarray:
    images = random_images(count, 1, 28)[:, 0]
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8) % 10, compress)
    return images


def write_stl10(root: Path) -> dict[str, np.ndarray]:
    """STL-10 binaries: each image channel by channel, column-major; labels 1..10 as bytes."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    for seed, (split, count) in enumerate([("train", 2), ("test", 3), ("unlabeled", 4)]):
        images = random_images(count, 3, 96, seed)
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(bytes([10, 1, 5][:count]))
        written[split] = images
    return written


def write_image_folder(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> None:
    for label, (name, class_sizes) in enumerate(sizes.items()):
        (root / name).mkdir(parents=True)
        for i, (width, height) in enumerate(class_sizes):
            Image.new("RGB", (width, height), (40 * label, 100, 200)).save(root / name / f"{i}.png")


# --- resident datasets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fine", [False, True])
def test_cifar_pickles_load_in_order_with_labels_and_classes(tmp_path, fine):
    written = write_cifar(tmp_path, fine)
    name = "cifar100" if fine else "cifar10"
    train = build_dataset(config(name, tmp_path), "train_split")
    first = written["train" if fine else "data_batch_1"]
    assert isinstance(train, ImageDataset) and train.images.dtype == torch.uint8
    assert train.images.shape == ((2 if fine else 10), 3, 32, 32)
    assert torch.equal(train.images[:2], torch.from_numpy(first))
    assert train.labels.dtype == torch.int64 and train.labels[:2].tolist() == [0, 1]
    assert train.num_classes == len(train.classes) == (100 if fine else 10)
    test = build_dataset(config(name, tmp_path), "test")
    assert len(test) == 2


def test_limit_keeps_the_first_images_without_the_rest(tmp_path):
    written = write_cifar(tmp_path, fine=False)
    train = build_dataset(config("cifar10", tmp_path, limit=3), "train")
    assert len(train) == 3
    assert torch.equal(train.images[2], torch.from_numpy(written["data_batch_2"][0]))
    assert train.images.untyped_storage().nbytes() == 3 * 3 * 32 * 32


def test_missing_cifar_names_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py") as error:
        build_dataset(config("cifar10", tmp_path), "train")
    message = str(error.value)
    assert "cifar-10-batches-py" in message and str(tmp_path) in message
    assert "data.download=true" in message and datasets.CIFAR10_URL in message
    assert "\n" not in message


def test_failed_download_says_where_to_fetch_by_hand(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3]\n Temporary failure in name resolution>")

    monkeypatch.setattr(datasets.tv_datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="could not download CIFAR-10") as error:
        build_dataset(config("cifar10", tmp_path, download=True), "train")
    message = str(error.value)
    assert "could not download CIFAR-10" in message and datasets.CIFAR10_URL in message and "\n" not in message


@pytest.mark.parametrize(("setting", "online", "fetched"), [
    ("auto", True, True), ("auto", False, False), (True, False, True), (False, True, False),
])  # fmt: skip
def test_missing_data_is_fetched_by_default_only_when_online(tmp_path, monkeypatch, capsys, setting, online,
                                                             fetched):
    calls = []

    def fake_cifar10(root, train, download):  # torchvision's downloader, writing what the real one extracts
        calls.append((root, train, download))
        write_cifar(Path(root), fine=False)

    monkeypatch.setattr(datasets, "host_reachable", lambda url: online)
    monkeypatch.setattr(datasets.tv_datasets, "CIFAR10", fake_cifar10)
    cfg = config("cifar10", tmp_path, download=setting)
    if fetched:
        assert len(build_dataset(cfg, "train")) == 10
        assert calls == [(str(tmp_path), True, True)]
        notice = capsys.readouterr().err.strip()
        assert notice == f"downloading CIFAR-10 from {datasets.CIFAR10_URL} into {tmp_path} (data.download=false " \
                         "turns this off)"
    else:
        with pytest.raises(UserError, match="data_batch_1; run with data.download=true"):
            build_dataset(cfg, "train")
        assert calls == []


def test_present_data_never_asks_the_network(tmp_path, monkeypatch):
    write_cifar(tmp_path, fine=False)
    monkeypatch.setattr(datasets, "host_reachable", lambda url: pytest.fail("asked the network"))
    assert len(build_dataset(config("cifar10", tmp_path), "test")) == 2


def test_unknown_download_setting_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"data.download='sometimes' is not one of auto, true or false"):
        build_dataset(config("cifar10", tmp_path, download="sometimes"), "train")


def test_host_reachable_is_false_for_a_closed_port():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]  # bound but not listening: the connection is refused at once
        assert host_reachable(f"http://127.0.0.1:{port}/x", timeout=1.0) is False
        server.listen()
        assert host_reachable(f"http://127.0.0.1:{port}/x", timeout=1.0) is True


def test_corrupt_cifar_is_a_user_error_naming_the_file(tmp_path):
    write_cifar(tmp_path, fine=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3 is corrupt"):
        build_dataset(config("cifar10", tmp_path), "train")


@pytest.mark.parametrize("compress", [True, False])
def test_fmnist_idx_files_in_root_gz_or_raw(tmp_path, compress):
    images = write_fmnist(tmp_path / "FashionMNIST" / "raw", compress)
    dataset = build_dataset(config("fmnist", tmp_path), "test_split")
    assert dataset.images.shape == (5, 1, 28, 28) and dataset.num_classes == 10
    assert torch.equal(dataset.images[:, 0], torch.from_numpy(images))
    assert dataset.labels.tolist() == [0, 1, 2, 3, 4]


def test_fmnist_falls_back_to_debians_location(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FMNIST_DEBIAN_DIR", tmp_path / "debian")
    images = write_fmnist(tmp_path / "debian", compress=True, count=3)
    dataset = build_dataset(config("fmnist", tmp_path / "empty"), "train")
    assert torch.equal(dataset.images[:, 0], torch.from_numpy(images))


def test_fmnist_missing_everywhere_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FMNIST_DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(UserError, match="FashionMNIST/raw") as error:
        build_dataset(config("fmnist", tmp_path), "train")
    message = str(error.value)
    assert "FashionMNIST/raw" in message and "debian" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message


def test_corrupt_idx_files_are_user_errors(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fmnist(raw, compress=False)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-7])
    with pytest.raises(UserError, match="train-images-idx3-ubyte is corrupt"):
        build_dataset(config("fmnist", tmp_path), "train")
    images.write_bytes(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(UserError, match="not a uint8 idx file"):
        build_dataset(config("fmnist", tmp_path), "train")


@pytest.mark.skipif(not datasets.FMNIST_DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_installed_debian_fmnist_loads(tmp_path):
    dataset = build_dataset(config("fmnist", tmp_path, limit=100), "test")
    assert dataset.images.shape == (100, 1, 28, 28) and set(dataset.labels.tolist()) <= set(range(10))
    assert dataset.images.float().mean() > 10  # real pictures, not zeros


def test_stl10_binaries_transpose_and_unlabeled_gets_minus_one(tmp_path):
    written = write_stl10(tmp_path)
    train = build_dataset(config("stl10", tmp_path), "train")
    assert torch.equal(train.images, torch.from_numpy(written["train"]))
    assert train.labels.tolist() == [9, 0]
    pretrain = build_dataset(config("stl10", tmp_path), "pretrain_split")
    assert len(pretrain) == 6 and pretrain.labels.tolist() == [9, 0, -1, -1, -1, -1]
    assert torch.equal(pretrain.images[2:], torch.from_numpy(written["unlabeled"]))
    limited = build_dataset(config("stl10", tmp_path, limit=3), "train+unlabeled")
    assert limited.labels.tolist() == [9, 0, -1]
    assert torch.equal(limited.images[2], torch.from_numpy(written["unlabeled"][0]))


def test_truncated_stl10_is_a_user_error(tmp_path):
    write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="test_X.bin is corrupt"):
        build_dataset(config("stl10", tmp_path), "test")


def test_unknown_names_and_splits_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="known"):
        build_dataset(config("cifar10", tmp_path, name="mnist3d"), "train")
    write_cifar(tmp_path, fine=False)
    with pytest.raises(UserError, match="unlabeled"):
        build_dataset(config("cifar10", tmp_path), "unlabeled")


# --- image folders --------------------------------------------------------------------------------------


def test_image_folder_decodes_to_fixed_size_with_class_labels(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": [(40, 30), (20, 50)], "dog": [(16, 16)]})
    write_image_folder(tmp_path / "val", {"cat": [(30, 30)], "dog": [(30, 30)]})
    train = build_dataset(config("imagefolder", tmp_path, image_size=24), "train")
    assert isinstance(train, FolderDataset) and len(train) == 3
    assert train.classes == ["cat", "dog"] and train.num_classes == 2 and train.labels.tolist() == [0, 0, 1]
    image = train.eval_image(2)
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8
    assert image[:, 12, 12].tolist() == [40, 100, 200]
    test = build_dataset(config("imagefolder", tmp_path, image_size=24), "test_split")
    assert test.root == tmp_path / "val" and len(test) == 2
    explicit = build_dataset(config("imagefolder", tmp_path, test_path=str(tmp_path / "train"), limit=2), "test")
    assert len(explicit) == 2


def test_image_folder_problems_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        build_dataset(config("imagefolder", tmp_path), "train")
    write_image_folder(tmp_path / "train", {"cat": [(8, 8)], "dog": [(8, 8)]})
    with pytest.raises(UserError, match="2 class folders but data.num_classes=1000"):
        build_dataset(config("imagefolder", tmp_path, num_classes=1000), "train")
    (tmp_path / "train" / "dog" / "0.png").write_bytes(b"truncated")
    dataset = build_dataset(config("imagefolder", tmp_path), "train")
    with pytest.raises(UserError, match=r"cannot decode image .*dog/0\.png"):
        dataset.eval_image(1)


# --- configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.stem)
def test_data_configs_have_the_keys_the_loop_reads(path):
    cfg = OmegaConf.load(path)
    assert DATA_KEYS <= set(cfg), DATA_KEYS - set(cfg)
    assert cfg.name == path.stem and cfg.root.startswith("data") and cfg.limit is None
    assert cfg.download == ("auto" if cfg.name != "imagefolder" else False)
    assert len(cfg.mean) == len(cfg.std) == cfg.channels
    assert cfg.local_size < cfg.image_size
