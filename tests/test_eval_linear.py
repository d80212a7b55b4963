"""Linear probes on cached features and the top-k metric, against synthetic data with a known answer."""

import pytest
import torch

from ssl.errors import UserError
from ssl.eval.linear import (
    LinearProbe,
    ProbeConfig,
    feature_statistics,
    fit_linear_probe,
    next_weight_decay,
    train_probe,
)
from ssl.eval.metrics import topk_accuracy

GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def probe_config(**changes) -> ProbeConfig:
    """configs/linear_eval.yaml's protocol, with a short SGD run for the augmented-only settings."""
    settings = {"weight_decays": GRID, "weight_decay_bounds": (1e-9, 1.0), "max_iter": 500, "tolerance": 1e-5,
                "val_fraction": 0.1, "lrs": (0.01, 0.1), "epochs": 10, "batch_size": 64}
    return ProbeConfig(**{**settings, **changes})


def separable(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes around far-apart centres in 16-d: linearly separable with a wide margin."""
    generator = torch.Generator().manual_seed(seed)
    centres = 6 * torch.eye(4, 16)
    labels = torch.arange(count) % 4
    return centres[labels] + 0.5 * torch.randn(count, 16, generator=generator), labels


def overlapping(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 Gaussian clusters in 64-d whose centres (fixed, 0.3 apart per dimension) overlap: ~75% is reachable,
    so where the optimiser stops matters."""
    centres = 0.3 * torch.randn(10, 64, generator=torch.Generator().manual_seed(123)) + 2.0
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return centres[labels] + torch.randn(count, 64, generator=generator), labels


def reference_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                                  weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent of the code under test: plain full-batch gradient descent in float64 on the same objective (mean
    cross-entropy on features standardised with their mean and std, plus weight_decay / 2 |W|^2, bias not
    decayed), with the fixed step 1/L (L bounds the curvature), run until the gradient vanishes.

    Returns the feature mean, std and the weights (D + 1, C), the bias in the last row.
    """
    mean, std = features.double().mean(0), features.double().std(0)
    inputs = torch.cat([(features.double() - mean) / std, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    targets = torch.nn.functional.one_hot(labels, num_classes).double()
    decay = torch.full((inputs.shape[1], 1), weight_decay, dtype=torch.float64)
    decay[-1] = 0
    # The softmax's curvature is at most 1/2, so the loss is (L = 1/2 |X^T X / N| + wd)-smooth.
    smoothness = 0.5 * torch.linalg.eigvalsh(inputs.T @ inputs / len(inputs)).max() + weight_decay
    weights = torch.zeros(inputs.shape[1], num_classes, dtype=torch.float64)
    for _ in range(20000):
        gradient = inputs.T @ (torch.softmax(inputs @ weights, 1) - targets) / len(inputs) + decay * weights
        if gradient.abs().max() < 1e-7:
            break
        weights -= gradient / smoothness
    else:
        raise AssertionError("the reference did not converge")
    return mean, std, weights


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
    probe, selection = fit_linear_probe(train, train_labels, 4, probe_config())
    assert topk_accuracy(probe(test)[0], test_labels, 1).item() == 1.0
    assert selection.weight_decay in [point["weight_decay"] for point in selection.grid]
    assert selection.final["optimizer"] == "lbfgs" and selection.final["iterations"] > 0


def test_probe_matches_an_independent_converged_logistic_regression():
    train, train_labels = overlapping(3000, seed=0)
    test, test_labels = overlapping(2000, seed=1)
    probe, selection = fit_linear_probe(train, train_labels, 10, probe_config())
    assert selection.final["converged"]
    probe_top1 = 100 * topk_accuracy(probe(test)[0], test_labels, 1).item()

    mean, std, weights = reference_logistic_regression(train, train_labels, 10, selection.weight_decay)
    logits = (test.double() - mean) / std @ weights[:-1] + weights[-1]
    reference_top1 = 100 * topk_accuracy(logits, test_labels, 1).item()
    assert reference_top1 > 60  # a problem where the probe has something to get right
    assert abs(probe_top1 - reference_top1) <= 0.5, (probe_top1, reference_top1, selection.weight_decay)


def test_augmented_protocol_picks_an_lr_at_the_chosen_weight_decay():
    train, train_labels = separable(200, seed=0)
    probe, selection = fit_linear_probe(train, train_labels, 4, probe_config(epochs=2), train.__getitem__)
    assert selection.final["optimizer"] == "sgd" and selection.final["lr"] in (0.01, 0.1)
    assert [point["lr"] for point in selection.lr_grid] == [0.01, 0.1]
    assert topk_accuracy(probe(train)[0], train_labels, 1).item() == 1.0


def test_next_weight_decay_grows_the_grid_past_a_winning_edge():
    bounds = (1e-9, 1.0)
    interior = {0.0: (70.0, 1.0), 1e-4: (71.0, 0.9), 1e-3: (72.0, 0.8), 1e-2: (71.0, 0.9)}
    assert next_weight_decay(interior, bounds) is None
    assert next_weight_decay({**interior, 1e-2: (73.0, 0.9)}, bounds) == 0.1  # 1e-2 * 10, not 0.09999999999999999
    assert next_weight_decay({**interior, 1e-4: (73.0, 0.9)}, bounds) == 1e-5  # the smallest beats 0
    assert next_weight_decay({**interior, 0.0: (73.0, 0.9)}, bounds) is None  # nothing is weaker than 0
    assert next_weight_decay({**interior, 1e-4: (72.0, 0.7)}, bounds) == 1e-5  # top-1 tie: the held-out loss decides
    assert next_weight_decay({1e-2: (73.0, 0.9), 1.0: (74.0, 0.8)}, bounds) is None  # at the bound
    assert next_weight_decay({1e-3: (73.0, 0.9)}, bounds) == 1e-2  # a lone value: up first


def test_an_edge_choice_grows_the_grid_until_the_optimum_is_inside():
    """300 samples in 64-d: far more L2 than the grid [0, 1e-6] offers is best, so the grid climbs by decades."""
    train, train_labels = overlapping(300, seed=0)
    _, selection = fit_linear_probe(train, train_labels, 10, probe_config(weight_decays=(0.0, 1e-6),
                                                                          val_fraction=0.3))
    tried = [point["weight_decay"] for point in selection.grid]
    assert tried[:3] == [0.0, 1e-6, 1e-5] and len(tried) > 3
    assert all(high == pytest.approx(10 * low) for low, high in zip(tried[1:], tried[2:]))  # decade steps
    assert selection.weight_decay > 1e-6
    assert selection.weight_decay < tried[-1] or tried[-1] == 1.0  # it stopped inside the grid or at the bound


def test_bad_probe_settings_are_user_errors():
    for changes in ({"weight_decays": ()}, {"weight_decays": (-1e-3,)}, {"weight_decay_bounds": (0.0, 1.0)},
                    {"val_fraction": 1.0}):
        (key,) = changes
        with pytest.raises(UserError, match=rf"^linear\.{key}="):
            probe_config(**changes)


def test_grid_heads_train_independently():
    """Head g of a batched probe ends where a probe trained alone with head g's (lr, wd) ends."""
    features, labels = separable(64, seed=2)
    together = train_probe(LinearProbe(*feature_statistics(features), 4, num_heads=2), labels, features.__getitem__,
                           [0.1, 0.01], [0.0, 0.01], epochs=3, batch_size=16, seed=0)
    alone = train_probe(LinearProbe(*feature_statistics(features), 4), labels, features.__getitem__,
                        [0.01], [0.01], epochs=3, batch_size=16, seed=0)
    torch.testing.assert_close(together.weight[:, 1], alone.weight[:, 0])
    torch.testing.assert_close(together.bias[1], alone.bias[0])
