import math

import pytest
import torch
from torch import nn

from ssl.optim import LARS, build_optimizer, cosine_schedule, param_groups


def lars_step(weight, grad, exclude=False, clip_lr=False, lr=0.5, wd=0.1):
    param = nn.Parameter(torch.tensor(weight))
    param.grad = torch.tensor(grad)
    optimizer = LARS([{"params": [param], "lars_exclude": exclude}], lr=lr, weight_decay=0.0 if exclude else wd,
                     eta=0.02, clip_lr=clip_lr)
    optimizer.step()
    return param.detach()


def test_lars_matches_hand_computation():
    # |w| = 5, |g| = 1: trust = 0.02 * 5 / (1 + 0.1 * 5) = 1/15; d = trust * (g + 0.1 w) = [0.06, 0.08]
    assert torch.allclose(lars_step([3.0, 4.0], [0.6, 0.8]), torch.tensor([3 - 0.5 * 0.06, 4 - 0.5 * 0.08]))
    # clip_lr: trust = min((1/15) / 0.5, 1) = 2/15 -> d = [0.12, 0.16]
    assert torch.allclose(lars_step([3.0, 4.0], [0.6, 0.8], clip_lr=True), torch.tensor([3 - 0.06, 4 - 0.08]))
    # excluded (bias/norm) parameters: plain SGD, no decay, no adaptation
    assert torch.allclose(lars_step([3.0, 4.0], [0.6, 0.8], exclude=True), torch.tensor([3 - 0.3, 4 - 0.4]))
    # a zero weight keeps trust 1 instead of freezing the parameter
    assert torch.allclose(lars_step([0.0, 0.0], [0.6, 0.8]), torch.tensor([-0.3, -0.4]))


def test_lars_momentum_accumulates():
    param = nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([{"params": [param], "lars_exclude": True}], lr=1.0, momentum=0.9)
    for _ in range(2):
        param.grad = torch.tensor([1.0])
        optimizer.step()
    assert torch.allclose(param.detach(), torch.tensor([1.0 - 1.0 - 1.9]))


def test_cosine_schedule_end_points():
    values = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=2)
    assert len(values) == 10
    assert values[:2].tolist() == pytest.approx([0.0, 1.0])  # DINO's np.linspace(0, base, W)
    cosine = values[2:]
    assert cosine[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    assert cosine[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 8)))


def test_warmup_longer_than_the_run_is_cut_short():
    assert cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=10).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_bias_and_norm_are_excluded():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decayed, excluded = param_groups(model.named_parameters())
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert len(excluded["params"]) == 3 and excluded["wd_scale"] == 0.0 and excluded["lars_exclude"]


def test_unknown_optimizer_names_choices():
    with pytest.raises(Exception, match="lars, sgd, adamw"):
        build_optimizer("adam", [{"params": [nn.Parameter(torch.ones(1))]}], lr=0.1, weight_decay=0.0)
