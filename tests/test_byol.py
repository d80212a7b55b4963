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


def test_loss_pairs_each_view_prediction_with_the_teachers_projection_of_the_other_view():
    # Rebuilt from the submodules in training mode (each view through the networks on its own, so BatchNorm uses
    # that view's statistics): prediction(view 1) against target(view 2), and prediction(view 2) against target(view 1).
    method = make_byol().train()
    with torch.no_grad():  # a teacher that is not the student, as after any EMA step
        for param in method.teacher.parameters():
            param.add_(0.05 * torch.randn_like(param))
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 1, 16, 16, generator=generator) for _ in range(2)]
    with torch.no_grad():
        out = method(views, epoch=0)
        predictions = [method.predictor(method.student.projector(method.student.backbone(v))) for v in views]
        teacher_features = [method.teacher.backbone(v) for v in views]
        targets = [method.teacher.projector(f) for f in teacher_features]

    def two_minus_two_cos(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))).mean()

    crossed = two_minus_two_cos(predictions[0], targets[1]) + two_minus_two_cos(predictions[1], targets[0])
    uncrossed = two_minus_two_cos(predictions[0], targets[0]) + two_minus_two_cos(predictions[1], targets[1])
    assert abs(crossed - uncrossed) > 1e-2  # the pairing is visible in the value
    torch.testing.assert_close(out.loss, crossed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.teacher_features, teacher_features[0])
