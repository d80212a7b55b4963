import torch

from ssl.methods import build_method
from ssl.methods.byol import byol_loss
from ssl.models import build_backbone


def test_byol_loss_hand_computed():
    prediction = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 3.0], [2.0, 0.0], [-1.0, 0.0]])  # cos = 0, 1, -1 -> 2, 0, 4
    assert byol_loss(prediction, target).item() == 2.0


def make_byol():
    backbone = build_backbone("resnet18", in_channels=1, stem="cifar")
    return build_method("byol", backbone, epochs=1, proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=32)


def test_teacher_mirrors_student_and_gets_no_gradients():
    method = make_byol()
    assert method.teacher.state_dict().keys() == method.student.state_dict().keys()
    views = [torch.randn(4, 1, 16, 16) for _ in range(2)]
    out = method(views, epoch=0)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())
    assert out.teacher_features.shape == (4, 512) and not out.teacher_features.requires_grad


def test_loss_is_symmetric_in_the_views():
    method = make_byol().eval()
    views = [torch.randn(4, 1, 16, 16) for _ in range(2)]
    with torch.no_grad():
        assert torch.allclose(method(views, 0).loss, method(views[::-1], 0).loss, atol=1e-6)
