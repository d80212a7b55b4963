"""What every method is to the shared training loop, and what it returns to it."""

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MethodOutput:
    """One training step's result.

    loss: the scalar the student is trained on.
    teacher_features: detached pooled teacher-backbone features of the first global view; the loop trains the
        online linear probe on them.
    logs: 0-dim tensors to log (kept on the device: the loop reads them only every `log_every` steps).
    """

    loss: torch.Tensor
    teacher_features: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """A method: `student` (an `nn.ModuleDict` holding `backbone` and the heads the teacher mirrors), `teacher` (same
    names and shapes, no gradients, moved by `ssl.ema`), optional student-only modules (BYOL's predictor), and
    `forward(views, epoch) -> MethodOutput`."""

    student: nn.ModuleDict
    teacher: nn.ModuleDict

    def before_optimizer_step(self, epoch: int) -> None:
        """Called by the loop after `backward()`, before the optimiser step (DINO: freeze, clip); nothing here."""
