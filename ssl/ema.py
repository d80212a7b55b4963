"""The BYOL/DINO teacher update: an exponential moving average of the student's weights, in place.

For every matched pair of tensors, teacher ``t`` and student ``s``::

    t = decay * t + (1 - decay) * s          (computed as t.lerp_(s, 1 - decay))

in the teacher's dtype on the teacher's device. The student is only read. Which tensors:

- parameters: every floating-point (or complex) one is averaged; any other is copied exactly;
- buffers, by the ``buffers`` policy (``BUFFER_POLICIES``): ``"average"``: floating-point ones averaged like the
  parameters; ``"copy"``: the student's copied; ``"keep"``: left alone. Integer buffers (``num_batches_tracked``)
  are copied exactly under ``"average"`` and ``"copy"``, left alone under ``"keep"``.

Tensors are matched by name; ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) wrappers are ignored on either
side, and a tensor tied under two names counts once. Matched tensors are grouped by (averaged or copied, device,
dtype) and each group is one multi-tensor kernel, ``torch._foreach_lerp_`` or ``torch._foreach_copy_``.

Two ways in, like timm's ``ModelEmaV3`` and DINO's loop:

- ``ema_model(teacher, student, decay)`` matches and groups on every call (nothing is cached);
- ``EMA(teacher, student, decays)`` matches once, keeps the groups and applies ``decays[step]`` at each
  ``update()``. The decays are an array precomputed per step, like the lr and weight decay:
  ``ssl.optim.cosine_schedule(base, end, total_steps)`` is DINO's, BYOL's and solo-learn's teacher momentum,
  ``end - (end - base) * (cos(pi * k / T) + 1) / 2`` at step k of T.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BUFFER_POLICIES", "EMA", "ema_model"]

BUFFER_POLICIES = ("average", "copy", "keep")
"""What happens to the teacher's buffers (BatchNorm running statistics, ...): ``"average"`` the floating-point ones
like parameters (as an update over the whole ``state_dict`` does), ``"copy"`` the student's, or ``"keep"`` the
teacher's own (as in the original BYOL and DINO code). Integer buffers are copied exactly under ``"average"`` and
``"copy"`` and left alone under ``"keep"``."""

_WRAPPER_NAMES = ("module", "_orig_mod")  # DistributedDataParallel / DataParallel, torch.compile's OptimizedModule
_NAMES_SHOWN = 5


@torch.no_grad()
def ema_model(teacher: nn.Module, student: nn.Module, decay: float, buffers: str = "average") -> None:
    """Move ``teacher`` towards ``student`` in place: ``teacher = decay * teacher + (1 - decay) * student``.

    Touches the teacher's parameters and, per ``buffers``, its buffers (see the module docstring); never the
    student. ``decay`` must be a Python number in [0, 1]: 1 leaves the averaged tensors as they are, 0 copies the
    student.

    Teacher and student must have the same tensor names (after dropping ``module.``/``_orig_mod.`` wrappers) and
    shapes, and must not share memory. Dtypes and devices may differ: each group of student tensors is converted to
    the teacher's dtype and device in one flat transfer, so a float32 teacher accumulates a bfloat16 student in
    float32, and a CPU teacher can follow a GPU student (one device-to-host copy per group, which waits for the GPU).
    Otherwise nothing synchronises.

    Matching and grouping are redone on every call (a walk over both modules' names); ``EMA`` does them once.
    """
    groups = _groups(teacher, student, buffers)
    _apply(groups, 1.0 - _check_decay(decay))


class EMA:
    """A teacher that follows a student with precomputed per-step decays; it owns the matched tensor groups.

    ``EMA(teacher, student, decays, buffers)`` matches the two modules once (the same checks and tensors as
    ``ema_model``); each ``update()`` then applies ``decays[step]`` to those tensors with one multi-tensor kernel per
    group, advances ``step`` and returns the decay. ``step`` counts the updates done: the k-th ``update()`` (from 0)
    applies ``decays[k]``, and an update past the end of ``decays`` raises ``IndexError``.

    The groups hold the tensors themselves, not the modules: after replacing the student (or any parameter, buffer
    or submodule of either module), or moving or converting either with ``.to()``/``.half()``, call
    ``rebind(student)``. Loading weights in place (``load_state_dict``, ``copy_``) needs nothing.

    Typical use (``ssl.train``)::

        decays = cosine_schedule(0.996, 1.0, total_steps).tolist()
        ema = EMA(method.teacher, method.student, decays, buffers="keep")
        for batch in loader:
            train_step(...)
            tau = ema.update()

    ``state_dict()`` is ``{"step": step}``; the teacher's weights belong to (and are checkpointed with) its owner.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        decays: Sequence[float] | Tensor,
        buffers: str = "average",
    ) -> None:
        _check_policy(buffers)
        self.teacher = teacher
        self.buffers = buffers
        self.decays: list[float] = _check_decays(decays)
        self.step = 0
        self._groups: list[_Group] = []
        self.rebind(student)

    def rebind(self, student: nn.Module) -> None:
        """Match the teacher against ``student`` again and keep the new groups (the step is unchanged)."""
        self._groups = _groups(self.teacher, student, self.buffers)

    @torch.no_grad()
    def update(self) -> float:
        """Apply ``decays[step]`` to the teacher, advance ``step`` and return that decay."""
        if self.step >= len(self.decays):
            raise IndexError(f"EMA update {self.step} is past the end of its {len(self.decays)} decays")
        decay = self.decays[self.step]
        _apply(self._groups, 1.0 - decay)
        self.step += 1
        return decay

    def state_dict(self) -> dict[str, Any]:
        """``{"step": step}``: the decays come from the config, the teacher's weights from its owner."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step saved by ``state_dict()``."""
        self.step = int(state["step"])


# --------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class _Group:
    """Matched tensors that share the teacher's and the student's (device, dtype): one kernel updates them."""

    average: bool  # lerp_ towards the student; otherwise copy_ it
    teacher: list[Tensor]
    student: list[Tensor]
    convert: bool  # the student is on another device or in another dtype

    def source(self) -> list[Tensor]:
        if not self.convert:
            return self.student
        # One flat transfer/cast instead of one per tensor: a device-to-host copy of each tensor would wait on
        # the GPU hundreds of times per call.
        head = self.teacher[0]
        flat = torch.cat([s.reshape(-1) for s in self.student]).to(device=head.device, dtype=head.dtype)
        return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in self.teacher]), self.teacher)]


def _apply(groups: list[_Group], weight: float) -> None:
    for group in groups:
        if group.average:
            torch._foreach_lerp_(group.teacher, group.source(), weight)
        else:
            torch._foreach_copy_(group.teacher, group.source())


def _groups(teacher: nn.Module, student: nn.Module, policy: str) -> list[_Group]:
    teacher, student = _check_modules(teacher, student)
    _check_policy(policy)
    grouped: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for t, s, average in _match(teacher, student, policy):
        ts, ss = grouped.setdefault((average, t.device, t.dtype, s.device, s.dtype), ([], []))
        ts.append(t)
        ss.append(s)
    return [
        _Group(average, ts, ss, convert=(t_device, t_dtype) != (s_device, s_dtype))
        for (average, t_device, t_dtype, s_device, s_dtype), (ts, ss) in grouped.items()
    ]


def _match(teacher: nn.Module, student: nn.Module, policy: str) -> list[tuple[Tensor, Tensor, bool]]:
    """``(teacher tensor, student tensor, average)`` for every tensor the policy touches, in teacher order;
    ``average`` is False for tensors that are copied. Raises if names, shapes or memory don't fit."""
    with_buffers = policy != "keep"
    t_named = _named_tensors(teacher, with_buffers)
    s_named = _named_tensors(student, with_buffers)
    if t_named.keys() != s_named.keys():
        missing = [n for n in t_named if n not in s_named]
        unexpected = [n for n in s_named if n not in t_named]
        raise ValueError(
            "teacher and student have different tensor names: "
            f"missing from the student: {_first(missing)}; unexpected in the student: {_first(unexpected)}"
        )
    matched = []
    for name, (t, is_buffer) in t_named.items():
        s = s_named[name][0]
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch for {name!r}: teacher {tuple(t.shape)}, student {tuple(s.shape)}")
        if t.device == s.device and t.data_ptr() == s.data_ptr() and t.numel():
            raise ValueError(f"teacher and student share the memory of {name!r}; the teacher must be a separate copy")
        floating = t.is_floating_point() or t.is_complex()
        matched.append((t, s, floating and (not is_buffer or policy == "average")))
    return matched


def _named_tensors(module: nn.Module, with_buffers: bool) -> dict[str, tuple[Tensor, bool]]:
    """``name -> (tensor, is_buffer)``, shared tensors once, with ``_orig_mod`` path components dropped."""
    named = {_clean(n): (p, False) for n, p in module.named_parameters()}
    if with_buffers:
        named.update((_clean(n), (b, True)) for n, b in module.named_buffers())
    return named


def _clean(name: str) -> str:
    # A compiled submodule (model.backbone = torch.compile(backbone)) puts _orig_mod inside the path.
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _first(names: list[str]) -> str:
    more = len(names) - _NAMES_SHOWN
    return f"{names[:_NAMES_SHOWN]}" + (f" and {more} more" if more > 0 else "")


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel/torch.compile wrappers: a module whose only state is one child named
    ``module`` or ``_orig_mod``."""
    while not module._parameters and not module._buffers and len(module._modules) == 1:
        ((name, child),) = module._modules.items()
        if name not in _WRAPPER_NAMES or child is None:
            break
        module = child
    return module


# --------------------------------------------------------------------------------------------- checks


def _check_modules(teacher: Any, student: Any) -> tuple[nn.Module, nn.Module]:
    for role, module in (("teacher", teacher), ("student", student)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{role} must be a torch.nn.Module, got {type(module).__name__}")
    teacher, student = _unwrap(teacher), _unwrap(student)
    if teacher is student:
        raise ValueError(
            "teacher and student are the same module; the teacher must be a separate copy "
            "(e.g. copy.deepcopy(student))"
        )
    return teacher, student


def _check_policy(policy: Any) -> None:
    if policy not in BUFFER_POLICIES:
        raise ValueError(f"unknown buffer policy {policy!r}; expected one of {', '.join(BUFFER_POLICIES)}")


def _check_decay(decay: Any) -> float:
    # A tensor decay would need .item() (a host sync on the GPU) or a device-side scalar per call.
    if not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a Python number, got {type(decay).__name__}")
    decay = float(decay)
    if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise ValueError(f"decay must be a finite number in [0, 1], got {decay}")
    return decay


def _check_decays(decays: Any) -> list[float]:
    """The per-step decays as Python floats (indexing them never touches a device), all checked at once."""
    if isinstance(decays, (str, bytes, numbers.Number)):
        raise TypeError(f"decays must be a sequence of per-step decays, got {type(decays).__name__}")
    values = torch.as_tensor(decays, dtype=torch.float64, device="cpu")
    if values.ndim != 1 or not len(values):
        raise ValueError(f"decays must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    bad = ~(torch.isfinite(values) & (values >= 0) & (values <= 1))
    if bad.any():
        step = int(bad.nonzero()[0])
        raise ValueError(f"decays must be finite numbers in [0, 1], got {values[step].item()} at step {step}")
    return values.tolist()
