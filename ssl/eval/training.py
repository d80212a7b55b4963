"""What fine-tuning and segmentation training share: AdamW with its own lr for the backbone, on a cosine.

The head learns from scratch while the backbone should only drift from its pretrained weights, hence two
learning rates. Biases and normalisation parameters get no weight decay (`ssl.optim.param_groups`).
"""

from torch import nn
from torch.optim import AdamW

from ssl.optim import cosine_schedule, param_groups


class HeadAndBackboneAdamW:
    """AdamW over `head` (lr) and the trainable part of `backbone` (backbone_lr), both following one schedule:
    linear warm-up over `warmup_steps`, then cosine to 0 at `total_steps`. Call `step()` after `backward()`.
    """

    def __init__(self, head: nn.Module, backbone: nn.Module, lr: float, backbone_lr: float, weight_decay: float,
                 total_steps: int, warmup_steps: int = 0) -> None:
        groups = []
        for module, base_lr in ((head, lr), (backbone, backbone_lr)):
            for group in param_groups(module.named_parameters()):
                if group["params"]:
                    groups.append({"params": group["params"], "base_lr": base_lr,
                                   "weight_decay": weight_decay * group["wd_scale"]})
        self.optimizer = AdamW(groups, lr=lr, foreach=True)
        # Host floats: setting a group's lr never touches the device. A run shorter than its warm-up is all warm-up.
        self.factors = cosine_schedule(1.0, 0.0, total_steps, min(warmup_steps, total_steps)).tolist()
        self.step_count = 0

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.factors[self.step_count]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
