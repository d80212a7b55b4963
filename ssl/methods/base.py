"""What every method is to the shared training loop, and what it returns to it."""

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.ops import StochasticDepth


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


def teacher_copy(student: nn.ModuleDict) -> nn.ModuleDict:
    """The teacher: a deep copy of `student` without gradients and without stochastic depth.

    The teacher's outputs are targets, so they must be a function of its weights alone. The official DINO code
    builds its teacher ViT with drop path 0 while the student keeps its rate; a plain deep copy would keep the
    student's DropPath layers, which stay active because the whole method runs in training mode.
    """
    teacher = copy.deepcopy(student).requires_grad_(False)
    for module in teacher.modules():
        if isinstance(module, StochasticDepth):
            module.p = 0.0
    return teacher
