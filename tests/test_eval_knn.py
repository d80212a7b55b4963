"""Weighted kNN against votes computed by hand."""

import math

import torch

from ssl.eval.knn import knn_votes

# Unit-circle points (one scaled by 5: features are L2-normalised first). Cosine similarity to the test point
# (1, 0): a 1.0 (class 0), b 0.8 (class 1), c 0.8 (class 1), d 0.0 (class 0).
TRAIN = torch.tensor([[5.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.0, 1.0]])
LABELS = torch.tensor([0, 1, 1, 0])
TEST = torch.tensor([[1.0, 0.0]])


def test_votes_by_hand():
    votes = knn_votes(TRAIN, LABELS, TEST, num_classes=3, ks=(1, 3, 10), temperature=1.0)
    torch.testing.assert_close(votes[1][0], torch.tensor([math.e, 0.0, 0.0]))
    # k=3: a votes e^1 for class 0; b and c vote e^0.8 each for class 1, which wins.
    torch.testing.assert_close(votes[3][0], torch.tensor([math.e, 2 * math.exp(0.8), 0.0]))
    assert votes[3].argmax(1).item() == 1
    # k=10 is capped at the 4 training points: d adds e^0 to class 0.
    torch.testing.assert_close(votes[10][0], torch.tensor([math.e + 1, 2 * math.exp(0.8), 0.0]))


def test_low_temperature_favours_the_nearest():
    votes = knn_votes(TRAIN, LABELS, TEST, num_classes=3, ks=(3,), temperature=0.1)
    # e^10 = 22026 for class 0 against 2 e^8 = 5962 for class 1.
    assert votes[3].argmax(1).item() == 0
    torch.testing.assert_close(votes[3][0, :2], torch.tensor([math.exp(10), 2 * math.exp(8)]))
