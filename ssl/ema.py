"""Exponential moving averages of model weights: the BYOL/DINO teacher update, an ``EMA`` helper, decay schedules.

``ema_model(teacher, student, decay)`` updates every floating-point parameter (and, by default, buffer) of the
teacher in place::

    teacher = decay * teacher + (1 - decay) * student

computed as ``teacher.lerp_(student, 1 - decay)`` in the teacher's dtype on the teacher's device, with one
multi-tensor kernel per (device, dtype) group. Tensors are matched by name; ``module.`` (DDP) and ``_orig_mod.``
(``torch.compile``) wrappers are ignored on either side. The student is only read.

Schedules are plain functions of the 0-based update index ``step`` (keyword parameters bound by
``build_schedule``); ``EMA`` counts the steps and applies ``schedule(step)`` at each ``update``.
"""

from __future__ import annotations

import copy
import math
import numbers
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BUFFER_POLICIES",
    "EMA",
    "SCHEDULES",
    "build_schedule",
    "byol_cosine",
    "constant",
    "ema_model",
    "power_warmup",
    "running_mean",
    "tf_warmup",
]

BUFFER_POLICIES = ("average", "copy", "keep")
"""What ``ema_model`` does with the teacher's floating-point buffers (BatchNorm running statistics, ...):
``"average"`` them like parameters (as an update over the whole ``state_dict`` does), ``"copy"`` the student's, or
``"keep"`` the teacher's own (as in the original BYOL and DINO code). Integer buffers (``num_batches_tracked``) are
copied exactly under ``"average"`` and ``"copy"`` and left alone under ``"keep"``."""

_WRAPPER_NAMES = ("module", "_orig_mod")  # DistributedDataParallel / DataParallel, torch.compile's OptimizedModule
_NAMES_SHOWN = 5


# --------------------------------------------------------------------------------------------- the update


@torch.no_grad()
def ema_model(teacher: nn.Module, student: nn.Module, decay: float, buffers: str = "average") -> None:
    """Move ``teacher`` towards ``student`` in place: ``teacher = decay * teacher + (1 - decay) * student``.

    Touched tensors: every floating-point (or complex) parameter of the teacher, and its buffers according to
    ``buffers`` (see ``BUFFER_POLICIES``); a non-floating tensor is copied exactly instead of averaged. The
    student is never modified. ``decay`` must be a Python number in [0, 1]: 1 leaves the averaged tensors as
    they are, 0 copies the student.

    Teacher and student must have the same tensor names (after dropping ``module.``/``_orig_mod.`` wrappers)
    and shapes. Dtypes and devices may differ: the student is converted to the teacher's dtype and device first,
    so a float32 teacher accumulates a bfloat16 student in float32, and a CPU teacher can follow a GPU student
    (one device-to-host copy per call, which necessarily waits for the GPU). Otherwise nothing synchronises.

    The matching and grouping work is cached per (teacher, student) pair, held weakly. Every call checks the
    cache against the names in all parameter, buffer and submodule tables of both modules, the identities of
    their tensors and the data pointers of the matched ones (about 0.6 us per submodule: 0.25 ms for a pair of
    ResNet-50s, against 9 ms for the update on two CPU cores), so replacing a parameter or submodule, registering
    a tensor, or ``.to()``/``.half()``/``.data = ...`` all rebuild it. Not detected: re-viewing a tensor's own
    storage (``p.data = p.data.view(...)``), which keeps both the object and the data pointer; don't.
    """
    teacher, student = _check_modules(teacher, student)
    _check_policy(buffers)
    weight = 1.0 - _check_decay(decay)
    for group in _plan(teacher, student, buffers).groups:
        source = group.source()
        if group.average:
            torch._foreach_lerp_(group.teacher, source, weight)
        else:
            torch._foreach_copy_(group.teacher, source)


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


@dataclass(frozen=True)
class _Plan:
    policy: str
    structure: list[tuple]  # _structure(teacher) + _structure(student) when built
    tensors: tuple[Tensor, ...]  # every matched tensor; holding them keeps their ids unique while cached
    data_ptrs: tuple[int, ...]
    groups: tuple[_Group, ...]


_PLANS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary[nn.Module, _Plan]] = (
    weakref.WeakKeyDictionary()
)


def _plan(teacher: nn.Module, student: nn.Module, policy: str) -> _Plan:
    by_student = _PLANS.get(teacher)
    if by_student is None:
        by_student = _PLANS[teacher] = weakref.WeakKeyDictionary()
    structure = _structure(teacher) + _structure(student)
    plan = by_student.get(student)
    # Equal structures mean the plan's tensors are still the modules' tensors under the same names (their ids
    # cannot be reused: the plan keeps them alive); equal data pointers mean no .to()/.data changed their
    # storage, dtype or device.
    if (
        plan is None
        or plan.policy != policy
        or plan.structure != structure
        or plan.data_ptrs != tuple(t.data_ptr() for t in plan.tensors)
    ):
        plan = _build_plan(teacher, student, policy, structure)
        by_student[student] = plan
    return plan


def _structure(module: nn.Module) -> list[tuple]:
    """Per submodule, the names in its parameter, buffer and child tables and the ids of its tensors, in a fixed
    order: equal results mean the same name -> tensor object mapping. About 0.6 us per submodule."""
    out = []
    stack = [module]
    while stack:
        m = stack.pop()
        if m is None:  # an optional child left unset (ResNet's downsample=None)
            continue
        params, buffers, children = m._parameters, m._buffers, m._modules
        out.append((*params, *map(id, params.values()), *buffers, *map(id, buffers.values()), *children))
        stack += children.values()
    return out


def _build_plan(teacher: nn.Module, student: nn.Module, policy: str, structure: list[tuple]) -> _Plan:
    grouped: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for _, t, s, average in _match(teacher, student, policy):
        key = (average, t.device, t.dtype, s.device, s.dtype)
        ts, ss = grouped.setdefault(key, ([], []))
        ts.append(t)
        ss.append(s)
    groups = tuple(
        _Group(average, ts, ss, convert=(t_device, t_dtype) != (s_device, s_dtype))
        for (average, t_device, t_dtype, s_device, s_dtype), (ts, ss) in grouped.items()
    )
    tensors = tuple(x for g in groups for x in (*g.teacher, *g.student))
    return _Plan(policy, structure, tensors, tuple(x.data_ptr() for x in tensors), groups)


def _match(
    teacher: nn.Module, student: nn.Module, policy: str, roles: tuple[str, str] = ("teacher", "student")
) -> list[tuple[str, Tensor, Tensor, bool]]:
    """``(name, teacher tensor, student tensor, average)`` for every tensor the policy touches, in teacher order;
    ``average`` is False for tensors that are copied. Raises if names, shapes or memory don't fit."""
    with_buffers = policy != "keep"
    t_named = _named_tensors(teacher, with_buffers)
    s_named = _named_tensors(student, with_buffers)
    if t_named.keys() != s_named.keys():
        missing = [n for n in t_named if n not in s_named]
        unexpected = [n for n in s_named if n not in t_named]
        raise ValueError(
            f"{roles[0]} and {roles[1]} have different tensor names: "
            f"missing from the {roles[1]}: {_first(missing)}; unexpected in the {roles[1]}: {_first(unexpected)}"
        )
    matched = []
    for name, (t, is_buffer) in t_named.items():
        s = s_named[name][0]
        if t.shape != s.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: {roles[0]} {tuple(t.shape)}, {roles[1]} {tuple(s.shape)}"
            )
        if t.device == s.device and t.data_ptr() == s.data_ptr() and t.numel():
            raise ValueError(
                f"{roles[0]} and {roles[1]} share the memory of {name!r}; the {roles[0]} must be a separate copy"
            )
        floating = t.is_floating_point() or t.is_complex()
        matched.append((name, t, s, floating and (not is_buffer or policy == "average")))
    return matched


def _named_tensors(module: nn.Module, with_buffers: bool) -> dict[str, tuple[Tensor, bool]]:
    """``name -> (tensor, is_buffer)``, shared tensors once, with ``_orig_mod`` path components dropped."""
    named = {_clean(n): (p, False) for n, p in module.named_parameters()}
    if with_buffers:
        named.update((_clean(n), (b, True)) for n, b in module.named_buffers())
    return named


def _clean(name: str) -> str:
    # A compiled submodule (model.backbone = torch.compile(backbone)) puts _orig_mod inside the path.
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


# --------------------------------------------------------------------------------------------- schedules


def constant(step: int, *, decay: float) -> float:
    """``decay`` at every step."""
    return decay


def byol_cosine(step: int, *, base: float, end: float = 1.0, last_step: int) -> float:
    """BYOL: ``end - (end - base) * (cos(pi * k / K) + 1) / 2`` with ``k = step``, ``K = last_step``: ``base`` at
    step 0 rising to ``end`` at step ``K`` and after it (also when ``K`` is 0)."""
    if step >= last_step:
        return end
    return end - (end - base) * (math.cos(math.pi * step / last_step) + 1.0) / 2.0


def tf_warmup(step: int, *, decay: float) -> float:
    """TensorFlow's ``ExponentialMovingAverage(num_updates=n)``: ``min(decay, (1 + n) / (10 + n))``, 0.1 at step 0."""
    return min(decay, (1.0 + step) / (10.0 + step))


def power_warmup(step: int, *, gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0) -> float:
    """``max(min_value, 1 - (1 + n / gamma) ** -power)``: 0 (so ``min_value``) at step 0, tending to 1; with
    gamma 1, power 2/3 it reaches 0.999 after about 31 600 steps (power 3/4: about 10 000)."""
    return max(min_value, 1.0 - (1.0 + step / gamma) ** -power)


def running_mean(step: int) -> float:
    """``n / (n + 1)``: after n updates the average holds the mean of the n student snapshots, equally weighted
    (step 0 copies the first one)."""
    return step / (step + 1.0)


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "byol_cosine": byol_cosine,
    "tf_warmup": tf_warmup,
    "power_warmup": power_warmup,
    "running_mean": running_mean,
}


def build_schedule(name: str, total_steps: int, **kwargs: float) -> Callable[[int], float]:
    """The schedule ``name`` as a function of the step, for a run of ``total_steps`` optimiser steps.

    ``kwargs`` are the schedule's keyword parameters (``decay=``, ``base=``, ...). ``byol_cosine`` ends at the
    last step, ``total_steps - 1``; the others don't depend on the run length.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown EMA schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if name == "byol_cosine":
        kwargs = {"last_step": total_steps - 1, **kwargs}
    schedule = partial(SCHEDULES[name], **kwargs)
    schedule(0)  # wrong keyword arguments fail here, not at the first update
    return schedule


# --------------------------------------------------------------------------------------------- the helper


class EMA:
    """A moving average that owns its decay schedule and step count.

    ``EMA(teacher, schedule)`` averages into ``teacher`` in place (the BYOL/DINO teacher, which its method owns
    and checkpoints); ``EMA.from_model(model, schedule)`` averages into a private copy of ``model``. ``schedule``
    is a decay or a function of the step (``build_schedule``); step k is the (k+1)-th ``update``.

    Typical use::

        ema = EMA.from_model(model, build_schedule("byol_cosine", total_steps, base=0.996), device="cpu")
        for batch in loader:
            train_step(model, batch)
            ema.update(model)
        with ema.swapped_into(model):
            evaluate(model)
    """

    def __init__(
        self, teacher: nn.Module, schedule: float | Callable[[int], float], buffers: str = "average"
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        _check_policy(buffers)
        if isinstance(schedule, numbers.Real):
            schedule = partial(constant, decay=_check_decay(schedule))
        elif not callable(schedule):
            raise TypeError(f"schedule must be a decay or a function of the step, got {type(schedule).__name__}")
        self.module = teacher
        self.schedule = schedule
        self.buffers = buffers
        self.step = 0
        self._owns_module = False

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        schedule: float | Callable[[int], float],
        device: torch.device | str | None = None,
        buffers: str = "average",
    ) -> EMA:
        """An EMA of ``model`` in a deep copy of it (wrappers removed; on ``device`` if given, e.g. ``"cpu"`` to
        keep the average off the GPU), with ``requires_grad`` off. Its weights are part of ``state_dict()``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = _unwrap(model)
        # Seeding deepcopy's memo with the copied tensors puts them straight on `device`: no transient second
        # copy on the model's (GPU) device.
        memo: dict[int, Any] = {}
        for t in (*model.parameters(), *model.buffers()):
            data = t.detach().to(device if device is not None else t.device, copy=True)
            memo[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
        ema = cls(copy.deepcopy(model, memo), schedule, buffers)
        ema._owns_module = True
        return ema

    @property
    def decay(self) -> float:
        """The decay the next ``update`` applies."""
        return _check_decay(self.schedule(self.step))

    def update(self, student: nn.Module) -> float:
        """Average ``student`` in with the current decay, advance the step and return that decay."""
        decay = self.decay
        ema_model(self.module, student, decay, self.buffers)
        self.step += 1
        return decay

    def state_dict(self) -> dict[str, Any]:
        """``{"step": ...}``, plus ``"module"`` (the averaged weights) when the EMA made its own copy."""
        state: dict[str, Any] = {"step": self.step}
        if self._owns_module:
            state["module"] = self.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step (and the averaged weights) saved by ``state_dict()``; the schedule comes from the
        constructor, as in a fresh run."""
        if self._owns_module != ("module" in state):
            raise ValueError(
                "EMA state does not fit: a state with averaged weights comes from EMA.from_model and loads only "
                "into one (EMA(teacher, ...) leaves checkpointing the teacher to its owner)"
            )
        if "module" in state:
            self.module.load_state_dict(state["module"])
        self.step = int(state["step"])

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Copy the averaged parameters and buffers into ``model`` for the body, then restore ``model``'s own,
        also when the body raises. Yields ``model``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        matched = _match(_unwrap(self.module), _unwrap(model), "copy", roles=("EMA", "model"))
        targets = [m for _, _, m, _ in matched]
        originals = [m.detach().clone() for m in targets]
        with torch.no_grad():
            torch._foreach_copy_(targets, [a for _, a, _, _ in matched])
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, originals)
