"""BatchLoader: per-epoch order from (seed, epoch), rank slices of global batches, resident and folder data."""

import pytest
import torch
from PIL import Image

from ssl.data.datasets import FolderDataset, ImageDataset
from ssl.data.loader import BatchLoader
from ssl.errors import UserError


def resident(count: int) -> ImageDataset:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 4, 4).contiguous()
    return ImageDataset(images, torch.arange(count) % 10, 10, "toy", [str(i) for i in range(10)])


def folder(tmp_path, count: int, num_workers: int = 0) -> FolderDataset:
    for i in range(count):
        (tmp_path / f"class{i % 2}").mkdir(exist_ok=True)
        Image.new("RGB", (6, 5), (i, 2 * i, 3 * i)).save(tmp_path / f"class{i % 2}" / f"{i:03d}.png")
    return FolderDataset(tmp_path, image_size=4, channels=3, num_workers=num_workers, name="toy")


def collect(loader: BatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch))


def test_steps_per_epoch_follow_drop_last():
    assert len(BatchLoader(resident(10), 4, "cpu", True, True, 0)) == 2
    assert len(BatchLoader(resident(10), 4, "cpu", True, False, 0)) == 3
    assert len(BatchLoader(resident(10), 2, "cpu", True, True, 0, rank=1, world_size=2)) == 2


def test_batch_larger_than_dataset_with_drop_last_names_both_numbers():
    with pytest.raises(UserError, match=r"batch of 12 images .* larger than the 10 images"):
        BatchLoader(resident(10), 6, "cpu", True, True, 0, rank=0, world_size=2)
    assert len(BatchLoader(resident(10), 12, "cpu", True, False, 0)) == 1


def test_batches_gather_images_labels_and_indices():
    dataset = resident(10)
    loader = BatchLoader(dataset, 4, "cpu", True, False, seed=3)
    batches = collect(loader, 0)
    assert [len(indices) for _, _, indices in batches] == [4, 4, 2]
    assert sorted(torch.cat([indices for _, _, indices in batches]).tolist()) == list(range(10))
    for images, labels, indices in batches:
        assert images.dtype == torch.uint8 and indices.dtype == torch.int64
        assert torch.equal(images, dataset.images[indices]) and torch.equal(labels, dataset.labels[indices])


def test_order_depends_on_seed_and_epoch_only():
    def order(seed: int, epoch: int, batch_size: int = 4) -> list[int]:
        loader = BatchLoader(resident(40), batch_size, "cpu", True, False, seed)
        return torch.cat([indices for _, _, indices in loader.epoch(epoch)]).tolist()

    assert order(0, 1) == order(0, 1) == order(0, 1, batch_size=7)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert order(0, 1) != list(range(40))
    unshuffled = BatchLoader(resident(40), 8, "cpu", False, True, 0)
    assert torch.cat([i for _, _, i in unshuffled.epoch(5)]).tolist() == list(range(40))


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_take_their_slices_of_the_global_batches(drop_last):
    single = collect(BatchLoader(resident(23), 6, "cpu", True, drop_last, 9), 2)
    ranks = [collect(BatchLoader(resident(23), 3, "cpu", True, drop_last, 9, rank, 2), 2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (_, _, indices) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][2], ranks[1][step][2]]), indices)
    if not drop_last:  # the short last global batch of 5 is split 3 + 2
        assert [len(ranks[r][-1][2]) for r in (0, 1)] == [3, 2]


def test_folder_batches_follow_the_same_rule_as_resident_ones(tmp_path):
    dataset = folder(tmp_path, 7)
    loader = BatchLoader(dataset, 3, "cpu", True, True, seed=4)
    expected = collect(BatchLoader(resident(7), 3, "cpu", True, True, seed=4), 1)
    batches = collect(loader, 1)
    assert len(batches) == len(loader) == 2
    for (images, labels, indices), (_, _, expected_indices) in zip(batches, expected):
        assert torch.equal(indices, expected_indices)
        assert images.shape == (3, 3, 4, 4) and images.dtype == torch.uint8
        assert torch.equal(labels, dataset.labels[indices])
        assert torch.equal(images, torch.stack([dataset.eval_image(int(i)) for i in indices]))


def test_folder_workers_decode_across_epochs_and_report_bad_images_in_one_line(tmp_path):
    dataset = folder(tmp_path, 6, num_workers=1)
    loader = BatchLoader(dataset, 2, "cpu", True, True, seed=0)
    first, second = collect(loader, 0), collect(loader, 1)
    assert [i.tolist() for *_, i in first] != [i.tolist() for *_, i in second]
    assert sorted(torch.cat([i for *_, i in second]).tolist()) == list(range(6))
    (tmp_path / "class1" / "003.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="003.png") as error:
        collect(loader, 2)
    assert "003.png" in str(error.value) and "\n" not in str(error.value)
