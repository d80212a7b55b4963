"""What every method returns to the shared training loop."""

from dataclasses import dataclass, field

import torch


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
