"""Linear probes on cached features and the top-k metric, against synthetic data with a known answer."""

import torch

from ssl.eval.linear import LinearProbe, ProbeConfig, fit_linear_probe, train_probe
from ssl.eval.metrics import topk_accuracy


def separable(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes around far-apart centres in 16-d: linearly separable with a wide margin."""
    generator = torch.Generator().manual_seed(seed)
    centres = 6 * torch.eye(4, 16)
    labels = torch.arange(count) % 4
    return centres[labels] + 0.5 * torch.randn(count, 16, generator=generator), labels


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    labels = torch.tensor([1, 0])
    assert topk_accuracy(logits, labels, 1).item() == 0.0
    assert topk_accuracy(logits, labels, 2).item() == 0.5  # row 0's label is second; row 1's is last
    assert topk_accuracy(logits, labels, 5).item() == 1.0  # capped at the 3 classes
    assert topk_accuracy(torch.stack([logits, logits]), labels, 2).tolist() == [0.5, 0.5]  # per head


def test_probe_separates_separable_features():
    train, train_labels = separable(400, seed=0)
    test, test_labels = separable(200, seed=1)
    config = ProbeConfig(lrs=(0.01, 0.1), weight_decays=(0.0, 1e-3), epochs=10, batch_size=64, val_fraction=0.1)
    probe, selection = fit_linear_probe(train, train_labels, 4, config)
    assert topk_accuracy(probe(test)[0], test_labels, 1).item() == 1.0
    assert len(selection.grid) == 4 and (selection.lr, selection.weight_decay) in {(0.01, 0.0), (0.01, 1e-3),
                                                                                 (0.1, 0.0), (0.1, 1e-3)}


def test_grid_heads_train_independently():
    """Head g of a batched probe ends where a probe trained alone with head g's (lr, wd) ends."""
    features, labels = separable(64, seed=2)
    together = train_probe(LinearProbe.for_features(features, 4, num_heads=2), labels, features.__getitem__,
                           [0.1, 0.01], [0.0, 0.01], epochs=3, batch_size=16, seed=0)
    alone = train_probe(LinearProbe.for_features(features, 4), labels, features.__getitem__,
                        [0.01], [0.01], epochs=3, batch_size=16, seed=0)
    torch.testing.assert_close(together.weight[:, 1], alone.weight[:, 0])
    torch.testing.assert_close(together.bias[1], alone.bias[0])
