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

DINOv2's changes (Oquab et al., 2023; facebookresearch/dinov2), each off by default so the step above is unchanged:
- centering=sinkhorn: P_t from 3 Sinkhorn-Knopp iterations on exp(t / tau_t) (SwAV; dinov2/loss/
  dino_clstoken_loss.py) instead of the moving-average center: every batch spreads its targets evenly over the
  prototypes. The center is then not updated.
- koleo_weight w: + w * sum over the 2 global views of KoLeo(student backbone features of that view), KoLeo(x) =
  -mean_i log |x_i - x_nn(i)| on L2-normalised rows, per process (dinov2/loss/koleo_loss.py, train/ssl_meta_arch.py).
- ibot_weight w (ViT backbones): the student sees its global views with some patches replaced by a mask token and
  predicts, through the DINO head (or a separate one), the teacher's targets for those patches from the unmasked
  views: + w * mean over the global images of the cross-entropy averaged over each image's masked patches (images
  without masks count as 0; dinov2/loss/ibot_patch_loss.py). The teacher's patch targets are centred like its CLS
  targets (their own center, or Sinkhorn-Knopp over all masked patches).
"""

import itertools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ssl.errors import UserError
from ssl.methods.base import Method, MethodOutput, teacher_copy
from ssl.models.vit import VisionTransformer

CENTERINGS = ("mean", "sinkhorn")
MASKINGS = ("block", "patch")


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


def _logsumexp_over_rows(values: torch.Tensor) -> torch.Tensor:
    """log sum_i exp(values[i, k]) for every column k, the rows of every process included under torchrun (each
    process's own logsumexp, combined through the largest of them so that nothing overflows)."""
    local = torch.logsumexp(values, dim=0)  # -inf for a process without rows
    if not (dist.is_available() and dist.is_initialized()):
        return local
    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total = torch.exp(local - peak)
    dist.all_reduce(total)
    return peak + total.log()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float | torch.Tensor, iterations: int = 3
                   ) -> torch.Tensor:
    """Teacher targets (N, K) by Sinkhorn-Knopp on Q = exp(t / tau_t), in float32 (SwAV; DINOv2's
    `sinkhorn_knopp_teacher`, 3 iterations).

    Each iteration scales every prototype's column of Q to the same total, summed over the rows of all processes
    under torchrun, then every sample's row to total 1, so each target is a distribution and the prototypes are
    used equally at convergence (each column totals N / K) and nearly so after 3 iterations. DINOv2 scales the
    columns to 1/K and the rows to 1/N, then multiplies by N: the same matrix. Done on log Q, so no exp() overflows
    or underflows whatever tau_t and the logits' range (e.g. with prototypes of free norm).
    """
    log_q = teacher_logits.float() / temperature
    for _ in range(iterations):
        log_q = log_q - _logsumexp_over_rows(log_q)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., 2019; DINOv2's `KoLeoLoss`):
    -mean_i log(|x_i - x_j(i)| + eps), x the L2-normalised rows of `features` (B, D) and j(i) the nearest other row,
    in float32. Minimising it pushes each feature away from its nearest neighbour in the batch."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():  # which row is nearest is a choice, not differentiated (as DINOv2's argmax)
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)  # below any cosine: a row is not its own neighbour
        nearest = similarity.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()


def random_patch_masks(num_images: int, height: int, width: int, probability: float,
                       ratio_range: Sequence[float], masking: str = "block") -> torch.Tensor:
    """(num_images, height * width) booleans, True = masked, drawn on the CPU from torch's default generator.

    As DINOv2's `collate_data_and_cast`: int(num_images * probability) images, in random places, get masks; their
    masked fractions are spread over `ratio_range` (image i of n draws from the i-th of n equal sub-ranges) and
    each masks int(height * width * fraction) patches. `masking="patch"` picks the patches uniformly (iBOT's random
    masks); "block" fills rectangles (DINOv2's `MaskingGenerator`: area 4 to half the grid, aspect 0.3 to 3.3)
    one after another and masks their patches in that order, the last rectangle in part, then random patches if
    the rectangles do not cover enough.
    """
    num_patches = height * width
    num_masked_images = int(num_images * probability)
    low, high = ratio_range
    edges = torch.linspace(low, high, num_masked_images + 1)
    fractions = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(num_masked_images)
    counts = torch.zeros(num_images, dtype=torch.long)
    counts[torch.randperm(num_images)[:num_masked_images]] = (fractions * num_patches).long()
    if masking == "patch":
        scores = torch.rand(num_images, num_patches)
    else:
        rectangles = 16  # enough to cover half the grid in nearly every draw; any shortfall is random patches
        area = 4 + (0.5 * num_patches - 4) * torch.rand(num_images, rectangles)
        aspect = torch.exp(math.log(0.3) + 2 * math.log(1 / 0.3) * torch.rand(num_images, rectangles))
        rect_h = torch.sqrt(area * aspect).round().clamp(1, height)
        rect_w = torch.sqrt(area / aspect).round().clamp(1, width)
        top = (torch.rand(num_images, rectangles) * (height - rect_h + 1)).floor()
        left = (torch.rand(num_images, rectangles) * (width - rect_w + 1)).floor()
        rows = torch.arange(height).view(1, 1, -1, 1)
        cols = torch.arange(width).view(1, 1, 1, -1)
        inside = ((rows >= top[..., None, None]) & (rows < (top + rect_h)[..., None, None])
                  & (cols >= left[..., None, None]) & (cols < (left + rect_w)[..., None, None]))
        # priority: rectangles - index of the first rectangle covering the patch (0 if none), ties broken at random
        order = torch.arange(rectangles, 0, -1).view(1, -1, 1, 1)
        scores = (inside * order).amax(dim=1).flatten(1) + torch.rand(num_images, num_patches)
    ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)
    return ranks < counts[:, None]


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """iBOT's masked-patch loss, in float32: for each image the cross-entropy H(P_t, P_s) averaged over its masked
    patches, then the mean over all images (an image without masks adds 0, as in DINOv2's `forward_masked`).

    student_logits, teacher_probs: (M, K), one row per masked patch in the order of `masks.flatten().nonzero()`;
    masks: (N, P) booleans for the N images.
    """
    per_image = masks.sum(dim=1)
    weights = (1 / per_image.clamp(min=1)).repeat_interleave(per_image).to(student_logits.device)
    cross_entropy = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    return (cross_entropy * weights).sum() / len(masks)


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """m c + (1 - m) mean(t), the mean over the rows of `teacher_logits` of every process when torch.distributed
    is initialised (so all ranks keep the same center). Processes may hold different numbers of rows (iBOT's masked
    patches), so the row count is summed with the rows, in the same all-reduce; with no rows anywhere c stays."""
    sums = torch.cat((teacher_logits.float().sum(dim=0), center.new_tensor([len(teacher_logits)])))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    total, count = sums[:-1], sums[-1]
    return torch.where(count > 0, momentum * center + (1 - momentum) * total / count, center)


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
    centering: "mean" (DINO's moving-average center) or "sinkhorn" (DINOv2's Sinkhorn-Knopp targets).
    koleo_weight: weight of the KoLeo regulariser on the student's global-view features; 0 = off.
    ibot_weight: weight of iBOT's masked-patch loss (ViT backbones only); 0 = off. ibot_separate_head: a head of
    its own for the patches (as DINOv2's ViT-L/g recipes) instead of the DINO head. ibot_mask_probability: the
    share of global images masked; ibot_mask_ratio: the range of their masked fractions; ibot_masking: "block" or
    "patch" (see `random_patch_masks`).
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
        centering: str = "mean",
        koleo_weight: float = 0.0,
        ibot_weight: float = 0.0,
        ibot_separate_head: bool = False,
        ibot_mask_probability: float = 0.5,
        ibot_mask_ratio: Sequence[float] = (0.1, 0.5),
        ibot_masking: str = "block",
    ) -> None:
        super().__init__()
        if epochs < 1:
            raise UserError(f"DINO needs at least one epoch to train, got epochs={epochs}")
        if min(warmup_teacher_temp, teacher_temp, student_temp) <= 0:
            raise UserError("DINO temperatures must be positive; check method.kwargs.*_temp")
        if centering not in CENTERINGS:
            raise UserError(f"unknown method.kwargs.centering={centering!r}; choose one of: {', '.join(CENTERINGS)}")
        if koleo_weight < 0 or ibot_weight < 0:
            raise UserError(f"method.kwargs.koleo_weight ({koleo_weight}) and ibot_weight ({ibot_weight}) must be "
                            ">= 0 (0 turns the term off)")
        if ibot_weight > 0:
            if not isinstance(backbone, VisionTransformer):
                raise UserError(f"iBOT's masked-patch loss needs a ViT backbone (patch tokens), not "
                                f"{type(backbone).__name__}; set method.kwargs.ibot_weight=0 or use a ViT backbone")
            low, high = ibot_mask_ratio
            if not (0 < ibot_mask_probability <= 1 and 0 <= low <= high <= 1) or ibot_masking not in MASKINGS:
                raise UserError(f"iBOT masks need 0 < method.kwargs.ibot_mask_probability <= 1 (got "
                                f"{ibot_mask_probability}), 0 <= ibot_mask_ratio[0] <= [1] <= 1 (got "
                                f"{list(ibot_mask_ratio)}) and ibot_masking one of {', '.join(MASKINGS)} (got "
                                f"{ibot_masking!r})")
        head = DINOHead(backbone.feature_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer, use_bn_in_head)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        if ibot_weight > 0 and ibot_separate_head:
            self.student["ibot_head"] = DINOHead(backbone.feature_dim, out_dim, hidden_dim, bottleneck_dim,
                                                 norm_last_layer, use_bn_in_head)
        self.teacher = teacher_copy(self.student)
        self.register_buffer("center", torch.zeros(out_dim))
        if ibot_weight > 0:
            # Student only, like DINOv2's (zero-initialised) token, but kept out of the backbone so that its exports
            # and checkpoints converted from other code keep the same tensors.
            self.mask_token = nn.Parameter(torch.zeros(backbone.feature_dim))
            self.register_buffer("patch_center", torch.zeros(out_dim))
        # Not persistent: it is rebuilt from the configuration, and a resumed run may train for longer.
        self.register_buffer("teacher_temps", teacher_temperature_schedule(
            epochs, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs), persistent=False)
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.freeze_last_layer = freeze_last_layer
        self.clip_grad = clip_grad
        self.centering = centering
        self.koleo_weight = koleo_weight
        self.ibot_weight = ibot_weight
        self.ibot_mask_probability = ibot_mask_probability
        self.ibot_mask_ratio = tuple(ibot_mask_ratio)
        self.ibot_masking = ibot_masking

    def forward(self, views: list[torch.Tensor], epoch: int) -> MethodOutput:
        """Loss over `views` (2 global crops, then any local crops); updates the center when training.

        logs: teacher_temp (tau_t in use); teacher_batch_entropy, the entropy of the batch-mean P_t, and
        teacher_sample_entropy, the mean entropy of each P_t. Collapse onto one prototype drives both to 0,
        collapse to the uniform distribution drives both to log K; healthy training keeps the first high and the
        second low. With KoLeo or iBOT on, also dino_loss and koleo_loss / ibot_loss (unweighted).
        """
        if len(views) < 2 or views[0].shape != views[1].shape:
            raise UserError("DINO needs 2 global crops of one size first in its views; use an augmentation "
                            "recipe with num_global_views: 2 (e.g. augment=multicrop)")
        if self.koleo_weight > 0 and len(views[0]) < 2:
            raise UserError("KoLeo needs at least 2 images per process to find nearest neighbours; raise "
                            "data.batch_size or set method.kwargs.koleo_weight=0")
        temperature = self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)]
        if self.ibot_weight > 0:
            return self.forward_with_ibot(views, temperature)
        student_features = backbone_by_resolution(self.student.backbone, views)
        student_logits = self.student.head(torch.cat(student_features)).chunk(len(views))
        with torch.no_grad():
            teacher_features = self.teacher.backbone(torch.cat(views[:2]))
            teacher_logits = self.teacher.head(teacher_features)
            probs = self.teacher_targets(teacher_logits, temperature, "center")
        loss = dino_loss(student_logits, probs.chunk(2), self.student_temp)
        loss, logs = self.loss_with_koleo_and_logs(loss, student_features[:2], temperature, probs)
        return MethodOutput(loss, teacher_features[: len(views[0])].detach(), logs)

    def forward_with_ibot(self, views: list[torch.Tensor], temperature: torch.Tensor) -> MethodOutput:
        """`forward` with iBOT: the student's global views are masked, and their masked patches are scored too."""
        global_views = torch.cat(views[:2])
        backbone = self.student.backbone
        masks = random_patch_masks(len(global_views), global_views.shape[-2] // backbone.patch_size,
                                   global_views.shape[-1] // backbone.patch_size, self.ibot_mask_probability,
                                   self.ibot_mask_ratio, self.ibot_masking)
        # indices found on the CPU, where the masks were drawn: no device-to-host wait for their count
        masked = masks.flatten().nonzero().squeeze(1).to(global_views.device, non_blocking=True)
        tokens = backbone.tokens(global_views, masks.to(global_views.device, non_blocking=True), self.mask_token)[0]
        student_features = [*tokens[:, 0].chunk(2), *backbone_by_resolution(backbone, views[2:])]
        student_patches = tokens[:, 1:].flatten(0, 1)[masked]
        student_logits, student_patch_logits = self.heads(self.student, torch.cat(student_features), student_patches)
        with torch.no_grad():
            teacher_tokens = self.teacher.backbone.tokens(global_views)[0]
            teacher_features = teacher_tokens[:, 0]
            teacher_logits, teacher_patch_logits = self.heads(
                self.teacher, teacher_features, teacher_tokens[:, 1:].flatten(0, 1)[masked])
            probs = self.teacher_targets(teacher_logits, temperature, "center")
            patch_probs = self.teacher_targets(teacher_patch_logits, temperature, "patch_center")
        loss = dino_loss(student_logits.chunk(len(views)), probs.chunk(2), self.student_temp)
        loss, logs = self.loss_with_koleo_and_logs(loss, student_features[:2], temperature, probs)
        patch_loss = ibot_loss(student_patch_logits, patch_probs, masks, self.student_temp)
        logs["ibot_loss"] = patch_loss.detach()
        return MethodOutput(loss + self.ibot_weight * patch_loss, teacher_features[: len(views[0])].detach(), logs)

    def heads(self, model: nn.ModuleDict, features: torch.Tensor, patches: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """`model`'s head on the pooled `features` and on the masked `patches`: one call through the DINO head when
        it is shared (as DINOv2, which batches CLS and patch tokens through it together), else the iBOT head's."""
        if "ibot_head" in model:
            return model.head(features), model.ibot_head(patches)
        return model.head(torch.cat((features, patches))).split([len(features), len(patches)])

    def teacher_targets(self, logits: torch.Tensor, temperature: torch.Tensor, center_name: str) -> torch.Tensor:
        """P_t for `logits`: softmax centred by the buffer `center_name` (then moved towards these logits' mean when
        training), or Sinkhorn-Knopp, which needs no center."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temperature)
        center = getattr(self, center_name)
        probs = teacher_probabilities(logits, center, temperature)
        if self.training:
            center.copy_(updated_center(center, logits, self.center_momentum))
        return probs

    def loss_with_koleo_and_logs(self, loss: torch.Tensor, global_features: Sequence[torch.Tensor],
                                 temperature: torch.Tensor, probs: torch.Tensor
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss plus KoLeo on each global view's student features when it is on, summed over the two views as
        DINOv2 does (never across views: the two views of an image are not neighbours to push apart); the logs."""
        logs = {
            "teacher_temp": temperature.clone(),  # a view of the buffer otherwise
            "teacher_batch_entropy": torch.special.entr(probs.mean(dim=0)).sum(),
            "teacher_sample_entropy": torch.special.entr(probs).sum(dim=-1).mean(),
        }
        if self.koleo_weight > 0 or self.ibot_weight > 0:
            logs["dino_loss"] = loss.detach()
        if self.koleo_weight > 0:
            regulariser = sum(koleo_loss(features) for features in global_features)
            logs["koleo_loss"] = regulariser.detach()
            loss = loss + self.koleo_weight * regulariser
        return loss, logs

    def before_optimizer_step(self, epoch: int) -> None:
        """After backward: drop the prototypes' gradients while epoch < freeze_last_layer, then clip per parameter."""
        if epoch < self.freeze_last_layer:
            for param in self.student.head.last_layer.parameters():
                param.grad = None
        if self.clip_grad > 0:
            clip_gradients_per_parameter(self.student.parameters(), self.clip_grad)
