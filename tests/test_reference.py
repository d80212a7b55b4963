"""Where this code must match the reference implementations (facebookresearch/dino main_dino.py and utils.py,
solo-learn's methods/base.py, utils/lr_scheduler.py and utils/momentum.py, deepmind-research byol/utils/schedules.py):
each expectation here is written from the papers' formulas and those sources' documented behaviour, independently
of the code under test."""

import pytest
import torch

from ssl.methods import build_method
from ssl.models.vit import VisionTransformer


@pytest.mark.parametrize("method_name", ["dino", "byol"])
def test_teacher_targets_are_deterministic_in_training_mode(method_name):
    # main_dino.py builds the teacher ViT without drop_path_rate (0) and the student with it; the method runs in
    # training mode, so a teacher that kept the student's stochastic depth would give random targets.
    torch.manual_seed(0)
    backbone = VisionTransformer(dim=32, depth=4, num_heads=2, patch_size=4, image_size=16, drop_path_rate=0.5)
    kwargs = {"dino": {"out_dim": 16, "hidden_dim": 32, "bottleneck_dim": 8},
              "byol": {"proj_hidden_dim": 32, "proj_output_dim": 8, "pred_hidden_dim": 32}}[method_name]
    method = build_method(method_name, backbone, epochs=1, **kwargs).train()
    images = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        first, second = method.teacher.backbone(images), method.teacher.backbone(images)
        assert torch.equal(first, second)
        # the student keeps its stochastic depth
        assert not torch.equal(method.student.backbone(images), method.student.backbone(images))
