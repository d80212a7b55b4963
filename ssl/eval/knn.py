"""Weighted k-nearest-neighbour classification on L2-normalised features (the DINO / InstDisc protocol).

Each test sample takes its k most cosine-similar training samples; neighbour i votes for its label with weight
exp(similarity_i / T). The class with the largest summed vote wins. No training, so it measures the feature
geometry itself, complementing the linear probe.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_votes(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
              num_classes: int, ks: Sequence[int] = (20, 200), temperature: float = 0.07,
              chunk_size: int = 1024) -> dict[int, torch.Tensor]:
    """Summed neighbour votes (N_test, num_classes) for every k in `ks`, from one similarity search.

    k is capped at the training-set size. Test samples go through in chunks so the similarity matrix stays
    (chunk_size, N_train).
    """
    train = F.normalize(train_features.float(), dim=1)
    num_neighbours = min(max(ks), len(train))
    votes: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for chunk in test_features.float().split(chunk_size):
        similarity, neighbours = (F.normalize(chunk, dim=1) @ train.T).topk(num_neighbours, dim=1)
        weights = (similarity / temperature).exp()
        labels = train_labels[neighbours]
        for k in ks:
            chunk_votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
            votes[k].append(chunk_votes.scatter_add_(1, labels[:, :k], weights[:, :k]))
    return {k: torch.cat(chunks) for k, chunks in votes.items()}
