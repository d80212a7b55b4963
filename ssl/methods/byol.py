"""BYOL (Grill et al., 2020): predict the teacher's projection of one view from the student's of the other.

student = backbone + projector, trained by gradient descent, with a predictor on top.
teacher = backbone + projector, an exponential moving average of the student (`ssl.ema`, BYOL's cosine
schedule tau: base -> 1 over training), never receiving gradients, without stochastic depth.
loss = sum over the two orderings of  2 - 2 cos(predictor(student(v_i)), teacher(v_j)),  i != j,
averaged over the batch. Each view goes through the networks separately, as in the paper, so BatchNorm
statistics are per view.
"""


import torch
import torch.nn.functional as F
from torch import nn

from ssl.methods.base import Method, MethodOutput, teacher_copy


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear - BatchNorm - ReLU - Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 2 - 2 cos(prediction, target), computed in float32."""
    cosine = F.cosine_similarity(prediction.float(), target.float(), dim=-1)
    return (2 - 2 * cosine).mean()


class BYOL(Method):
    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 4096,
    ) -> None:
        super().__init__()
        self.student = nn.ModuleDict(
            {"backbone": backbone, "projector": mlp(backbone.feature_dim, proj_hidden_dim, proj_output_dim)}
        )
        self.predictor = mlp(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.teacher = teacher_copy(self.student)

    def forward(self, views: list[torch.Tensor], epoch: int) -> MethodOutput:
        first, second = views[:2]
        predictions = [self.predictor(self.student.projector(self.student.backbone(view))) for view in (first, second)]
        with torch.no_grad():
            teacher_features = [self.teacher.backbone(view) for view in (first, second)]
            targets = [self.teacher.projector(features) for features in teacher_features]
        loss = byol_loss(predictions[0], targets[1]) + byol_loss(predictions[1], targets[0])
        # The spread of normalised teacher projections falls towards 0 when the representation collapses.
        target_std = F.normalize(targets[0].float(), dim=-1).std(dim=0).mean()
        return MethodOutput(loss, teacher_features[0].detach(), {"target_std": target_std.detach()})
