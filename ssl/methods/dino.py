"""DINO (Caron et al., 2021): self-distillation with no labels, over multi-crop views.

student = backbone + DINOHead, trained by gradient descent on every crop: 2 global crops, then N local ones.
teacher = backbone + DINOHead, an exponential moving average of the student (`ssl.ema`, cosine momentum
0.996 -> 1), fed the 2 global crops only, never receiving gradients, without stochastic depth (as the official
code builds it: its targets depend on its weights alone).

With head outputs t_g (teacher, global view g) and s_v (student, any view v) in R^K, the center c, the teacher
temperature tau_t (warmed up per epoch) and the student temperature tau_s:

    P_t(g) = softmax((t_g - c) / tau_t),        log P_s(v) = log_softmax(s_v / tau_s)
    loss   = 1/|pairs| * sum_{(g, v) in pairs} mean_batch( -sum_k P_t(g)_k log P_s(v)_k )
    pairs  = {(g, v) : g a global view, v any view, v != g}        (2 (2 + N) - 2 of them)
    c     <- m c + (1 - m) mean_{batch, both globals, all processes}(t_g)     after the loss, m = 0.9

Centering stops one prototype from dominating and sharpening (tau_t < tau_s) stops the uniform solution; the
two together avoid collapse. Same-size views go through a backbone in one call (one call per resolution), so
BatchNorm backbones see both global crops in one batch, as in the paper.
"""

import itertools
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ssl.errors import UserError
from ssl.methods.base import Method, MethodOutput, teacher_copy


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU), L2 normalisation, then a weight-normalised linear layer
    onto `out_dim` prototypes: logit_k = g_k <v_k, x> / |v_k|, with every g_k initialised to 1.

    With `norm_last_layer` g stays frozen at 1, so the logits are cosine similarities to the prototypes.
    `use_bn` puts BatchNorm after each hidden linear layer (main_dino.py's --use_bn_in_head; dino_fmnist uses it).
    Width matters for the plain head: the initialisation shrinks the input by ~0.02 sqrt(width) per linear layer,
    so the bottleneck output starts at ~1.4 for ResNet-18 features through 2048-256 but ~0.03 for 64-d features
    through 256-64. The gradient through the L2 normalisation grows as 1/|output| and LARS leaves the bottleneck
    bias to plain SGD (as solo-learn does), so in a narrow head that bias dominates within a few steps, every
    output turns towards it and the centred teacher goes uniform; the 2048-wide head trains (tests/test_dino.py).
    `weight_norm`'s parametrisation keeps g and v as plain parameters with fixed names, so a deep copy (the
    teacher) has the same state-dict names and `ssl.ema` can average them.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()

        def hidden(width_in: int) -> list[nn.Module]:
            norm = [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            return [nn.Linear(width_in, hidden_dim), *norm, nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_temperature_schedule(epochs: int, warmup_teacher_temp: float, teacher_temp: float,
                                 warmup_epochs: int) -> torch.Tensor:
    """tau_t per epoch: linear from `warmup_teacher_temp` (epoch 0) to `teacher_temp` (epoch warmup_epochs - 1),
    then constant -- the paper's warm-up. Runs shorter than the warm-up stop part-way along it."""
    ramp = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)
    return torch.cat((ramp, torch.full((max(epochs - warmup_epochs, 0),), teacher_temp)))[:epochs]


def loss_pairs(num_views: int, num_global_views: int = 2) -> list[tuple[int, int]]:
    """The (teacher view g, student view v) cross-entropy terms of the loss: every global view g against every
    view v except itself, num_global_views * (num_views - 1) terms (2 (2 + N) - 2 with N local crops)."""
    return [(g, v) for g in range(num_global_views) for v in range(num_views) if v != g]


def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor,
                          temperature: float | torch.Tensor) -> torch.Tensor:
    """P_t = softmax((t - c) / tau_t) over the last dimension, in float32 (tau_t = 0.04 overflows half precision)."""
    return F.softmax((teacher_logits.float() - center) / temperature, dim=-1)


def dino_loss(student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor],
              student_temp: float) -> torch.Tensor:
    """The cross-entropy H(P_t(g), P_s(v)) averaged over the batch and over `loss_pairs`, in float32.

    student_logits: one (B, K) tensor per view, global views first; teacher_probs: one (B, K) per global view.
    """
    log_probs = [F.log_softmax(logits.float() / student_temp, dim=-1) for logits in student_logits]
    pairs = loss_pairs(len(student_logits), len(teacher_probs))
    return sum(-(teacher_probs[g] * log_probs[v]).sum(dim=-1).mean() for g, v in pairs) / len(pairs)


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """m c + (1 - m) mean(t), the mean over the rows of `teacher_logits` of every process when torch.distributed
    is initialised (so all ranks keep the same center)."""
    total = teacher_logits.float().sum(dim=0)
    count = len(teacher_logits)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        count *= dist.get_world_size()
    return momentum * center + (1 - momentum) * total / count


def backbone_by_resolution(backbone: nn.Module, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Pooled features of each view, with one backbone call per run of consecutive same-size views (the views
    concatenated along the batch, then split back)."""
    features = []
    for _, group in itertools.groupby(views, key=lambda view: view.shape[-2:]):
        group = list(group)
        features.extend(backbone(torch.cat(group)).split([len(view) for view in group]))
    return features


def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale each gradient separately to norm <= `max_norm`: g <- g * min(1, max_norm / (|g| + 1e-6)), as DINO's
    `clip_gradients` (not one global norm). Runs on the device, without reading norms back to the host."""
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_((max_norm / (param.grad.norm() + 1e-6)).clamp(max=1.0))


class DINO(Method):
    """DINO around `backbone`; the loop calls `forward(views, epoch)`, then `before_optimizer_step(epoch)`.

    epochs: length of training, for the per-epoch teacher-temperature schedule.
    out_dim: prototypes K (65536 for ImageNet, a few thousand for small datasets).
    warmup_teacher_temp -> teacher_temp over warmup_teacher_temp_epochs; student_temp: tau_s.
    center_momentum: m of the center's moving average.
    use_bn_in_head: BatchNorm in the head's hidden layers (see DINOHead).
    freeze_last_layer: epochs during which the prototypes get no update (stabilises the start of training).
    clip_grad: per-parameter gradient-norm bound for the student; 0 disables clipping.
    """

    def __init__(
        self,
        backbone: nn.Module,
        epochs: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        freeze_last_layer: int = 1,
        clip_grad: float = 3.0,
    ) -> None:
        super().__init__()
        if epochs < 1:
            raise UserError(f"DINO needs at least one epoch to train, got epochs={epochs}")
        if min(warmup_teacher_temp, teacher_temp, student_temp) <= 0:
            raise UserError("DINO temperatures must be positive; check method.kwargs.*_temp")
        head = DINOHead(backbone.feature_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer, use_bn_in_head)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = teacher_copy(self.student)
        self.register_buffer("center", torch.zeros(out_dim))
        # Not persistent: it is rebuilt from the configuration, and a resumed run may train for longer.
        self.register_buffer("teacher_temps", teacher_temperature_schedule(
            epochs, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs), persistent=False)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.freeze_last_layer = freeze_last_layer
        self.clip_grad = clip_grad

    def forward(self, views: list[torch.Tensor], epoch: int) -> MethodOutput:
        """Loss over `views` (2 global crops, then any local crops); updates the center when training.

        logs: teacher_temp (tau_t in use); teacher_batch_entropy, the entropy of the batch-mean P_t, and
        teacher_sample_entropy, the mean entropy of each P_t. Collapse onto one prototype drives both to 0,
        collapse to the uniform distribution drives both to log K; healthy training keeps the first high and the
        second low.
        """
        if len(views) < 2 or views[0].shape != views[1].shape:
            raise UserError("DINO needs 2 global crops of one size first in its views; use an augmentation "
                            "recipe with num_global_views: 2 (e.g. augment=multicrop)")
        student_features = backbone_by_resolution(self.student.backbone, views)
        student_logits = self.student.head(torch.cat(student_features)).chunk(len(views))
        with torch.no_grad():
            teacher_features = self.teacher.backbone(torch.cat(views[:2]))
            teacher_logits = self.teacher.head(teacher_features)
            temperature = self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)]
            probs = teacher_probabilities(teacher_logits, self.center, temperature)
        loss = dino_loss(student_logits, probs.chunk(2), self.student_temp)
        if self.training:
            self.center.copy_(updated_center(self.center, teacher_logits, self.center_momentum))
        logs = {
            "teacher_temp": temperature.clone(),  # a view of the buffer otherwise
            "teacher_batch_entropy": torch.special.entr(probs.mean(dim=0)).sum(),
            "teacher_sample_entropy": torch.special.entr(probs).sum(dim=-1).mean(),
        }
        return MethodOutput(loss, teacher_features[: len(views[0])].detach(), logs)

    def before_optimizer_step(self, epoch: int) -> None:
        """After backward: drop the prototypes' gradients while epoch < freeze_last_layer, then clip per parameter."""
        if epoch < self.freeze_last_layer:
            for param in self.student.head.last_layer.parameters():
                param.grad = None
        if self.clip_grad > 0:
            clip_gradients_per_parameter(self.student.parameters(), self.clip_grad)
