"""ssl.ema: the in-place EMA update, its cache, the EMA helper and the decay schedules (hand-computed values)."""

import copy
import gc
import math
import weakref

import pytest
import torch
from torch import nn

import ssl.ema as ema_module
from ssl.ema import (
    EMA,
    build_schedule,
    byol_cosine,
    constant,
    ema_model,
    power_warmup,
    running_mean,
    tf_warmup,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def filled(module: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                t.fill_(value)
    return module


def linear(value: float) -> nn.Linear:
    return filled(nn.Linear(3, 3, bias=False), value)


class Wrapper(nn.Module):
    """Holds its model as DDP (`module`) or torch.compile (`_orig_mod`) do."""

    def __init__(self, inner: nn.Module, attribute: str) -> None:
        super().__init__()
        setattr(self, attribute, inner)


def bn_model(value: float, batches: int) -> nn.Sequential:
    model = filled(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), value)
    model[1].num_batches_tracked.fill_(batches)
    return model


# --------------------------------------------------------------------------------------------- the update


def test_hand_computed_update_leaves_student_alone():
    teacher, student = linear(1.0), linear(2.0)
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher.weight, torch.full((3, 3), 1.5))
    assert torch.equal(student.weight, torch.full((3, 3), 2.0))


def test_decay_one_keeps_and_zero_copies():
    teacher, student = nn.Linear(4, 4), nn.Linear(4, 4)
    before = copy.deepcopy(teacher.state_dict())
    ema_model(teacher, student, 1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    ema_model(teacher, student, 0)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in teacher.state_dict().items())


def test_agrees_with_tensorflow_form():
    torch.manual_seed(0)
    teacher, student = nn.Linear(5, 4), nn.Linear(5, 4)
    shadow = {k: v.clone() for k, v in teacher.state_dict().items()}
    for d in (0.9, 0.99, 0.5):
        ema_model(teacher, student, d)
        for k, var in student.state_dict().items():
            shadow[k] -= (1 - d) * (shadow[k] - var)
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, shadow[k])


def test_equal_weight_schedule_gives_mean_of_snapshots():
    teacher, student = linear(123.0), linear(0.0)
    ema = EMA(teacher, running_mean)
    snapshots = [1.0, 2.0, 4.0, 9.0]
    for value in snapshots:
        filled(student, value)
        ema.update(student)
    assert torch.allclose(teacher.weight, torch.full((3, 3), sum(snapshots) / len(snapshots)))


def test_tied_weights_are_averaged_once():
    def tied(value):
        model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
        model[1].weight = model[0].weight
        return filled(model, value)

    teacher, student = tied(1.0), tied(2.0)
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher[1].weight, torch.full((3, 3), 1.5))


# --------------------------------------------------------------------------------------------- buffers


@pytest.mark.parametrize(
    ("policy", "running_mean_value", "batches"),
    [("average", 1.5, 2**40 + 3), ("copy", 2.0, 2**40 + 3), ("keep", 1.0, 7)],
)
def test_buffer_policies(policy, running_mean_value, batches):
    teacher, student = bn_model(1.0, 7), bn_model(2.0, 2**40 + 3)
    ema_model(teacher, student, 0.5, buffers=policy)
    bn = teacher[1]
    assert torch.equal(teacher[0].weight, torch.full((2, 2), 1.5))  # parameters are averaged under every policy
    assert torch.equal(bn.weight, torch.full((2,), 1.5))
    assert torch.equal(bn.running_mean, torch.full((2,), running_mean_value))
    assert torch.equal(bn.running_var, torch.full((2,), running_mean_value))
    assert bn.num_batches_tracked.dtype == torch.int64
    assert bn.num_batches_tracked.item() == batches  # exact: a float round trip would lose the +3
    assert student[1].num_batches_tracked.item() == 2**40 + 3


# --------------------------------------------------------------------------------------------- matching


class AB(nn.Module):
    def __init__(self, a_first: bool) -> None:
        super().__init__()
        if a_first:
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        else:
            self.b, self.a = nn.Linear(2, 2), nn.Linear(2, 2)


def test_matching_is_by_name_not_position():
    teacher, student = filled(AB(a_first=True), 0.0), filled(AB(a_first=False), 0.0)
    with torch.no_grad():
        student.a.weight.fill_(4.0)
        student.b.weight.fill_(8.0)
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher.a.weight, torch.full((2, 2), 2.0))
    assert torch.equal(teacher.b.weight, torch.full((2, 2), 4.0))


@pytest.mark.parametrize("attribute", ["module", "_orig_mod"])
@pytest.mark.parametrize("wrapped", ["teacher", "student", "both"])
def test_wrappers_are_unwrapped(attribute, wrapped):
    teacher, student = linear(1.0), linear(2.0)
    t = Wrapper(teacher, attribute) if wrapped in ("teacher", "both") else teacher
    s = Wrapper(Wrapper(student, "_orig_mod"), attribute) if wrapped in ("student", "both") else student
    ema_model(t, s, 0.5)
    assert torch.equal(teacher.weight, torch.full((3, 3), 1.5))


def test_compiled_submodule_inside_the_tree():
    teacher = nn.Sequential(linear(1.0), linear(1.0))
    student = nn.Sequential(linear(2.0), Wrapper(linear(2.0), "_orig_mod"))  # model[1] = torch.compile(...)
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher[1].weight, torch.full((3, 3), 1.5))


# --------------------------------------------------------------------------------------------- dtypes, devices


def test_bfloat16_student_accumulates_in_float32_teacher():
    teacher = linear(1.0)
    student = linear(1.0 + 2**-7).to(torch.bfloat16)  # exactly representable in bfloat16
    ema_model(teacher, student, 0.999)
    assert teacher.weight.dtype == torch.float32
    # 1 + 0.001 * 2**-7 rounds to 1.0 in bfloat16; float32 keeps it.
    torch.testing.assert_close(teacher.weight, torch.full((3, 3), 1 + 0.001 * 2**-7), rtol=0, atol=1e-7)
    assert student.weight.dtype == torch.bfloat16


def test_float64_teacher_follows_float32_student_with_integer_buffers():
    teacher, student = bn_model(1.0, 1).double(), bn_model(2.0, 2**40 + 3)
    ema_model(teacher, student, 0.5)
    assert teacher[1].running_mean.dtype == torch.float64
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 1.5, dtype=torch.float64))
    assert teacher[1].num_batches_tracked.item() == 2**40 + 3


@cuda
def test_cpu_teacher_follows_cuda_student():
    teacher, student = bn_model(1.0, 1), bn_model(2.0, 2**40 + 3).cuda().to(torch.bfloat16)
    ema_model(teacher, student, 0.5)
    assert teacher[0].weight.device.type == "cpu"
    assert torch.equal(teacher[0].weight, torch.full((2, 2), 1.5))
    assert teacher[1].num_batches_tracked.item() == 2**40 + 3


@cuda
def test_cuda_teacher_and_student():
    teacher, student = linear(1.0).cuda(), linear(2.0).cuda()
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher.weight.cpu(), torch.full((3, 3), 1.5))


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("decay", [-0.1, 1.5, math.nan, math.inf])
def test_decay_out_of_range(decay):
    with pytest.raises(ValueError, match=r"decay must be a finite number in \[0, 1\]"):
        ema_model(linear(1.0), linear(2.0), decay)


def test_tensor_decay_is_refused():
    with pytest.raises(TypeError, match="decay must be a Python number, got Tensor"):
        ema_model(linear(1.0), linear(2.0), torch.tensor(0.5))


def test_different_names_are_listed():
    teacher = nn.Sequential(*[nn.Linear(1, 1) for _ in range(8)])
    student = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1))
    student.extra = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="different tensor names") as error:
        ema_model(teacher, student, 0.5)
    message = str(error.value)
    assert "missing from the student: ['2.weight', '2.bias', '3.weight', '3.bias', '4.weight'] and 7 more" in message
    assert "unexpected in the student: ['extra.weight', 'extra.bias']" in message


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match=r"shape mismatch for 'weight': teacher \(3, 3\), student \(3, 2\)"):
        ema_model(linear(1.0), nn.Linear(2, 3, bias=False), 0.5)


def test_same_module_twice():
    model = linear(1.0)
    for student in (model, Wrapper(model, "module")):
        with pytest.raises(ValueError, match="teacher and student are the same module"):
            ema_model(model, student, 0.5)


def test_shared_memory():
    teacher, student = nn.Sequential(linear(1.0)), nn.Sequential(linear(2.0))
    teacher[0] = student[0]
    with pytest.raises(ValueError, match="share the memory of '0.weight'"):
        ema_model(teacher, student, 0.5)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_non_modules(role):
    args = {"teacher": linear(1.0), "student": linear(2.0), role: {"weight": torch.ones(3, 3)}}
    with pytest.raises(TypeError, match=f"{role} must be a torch.nn.Module, got dict"):
        ema_model(args["teacher"], args["student"], 0.5)


def test_unknown_buffer_policy():
    with pytest.raises(ValueError, match="unknown buffer policy 'ignore'; expected one of average, copy, keep"):
        ema_model(linear(1.0), linear(2.0), 0.5, buffers="ignore")
    with pytest.raises(ValueError, match="unknown buffer policy"):
        EMA(linear(1.0), 0.5, buffers="ignore")


# --------------------------------------------------------------------------------------------- the cache


def test_plan_is_reused(monkeypatch):
    builds = []
    build = ema_module._build_plan
    monkeypatch.setattr(ema_module, "_build_plan", lambda *args: builds.append(1) or build(*args))
    teacher, student = bn_model(1.0, 1), bn_model(2.0, 2)
    for _ in range(3):
        ema_model(teacher, student, 0.5)
    assert len(builds) == 1
    ema_model(teacher, student, 0.5, buffers="keep")  # another policy, another plan
    assert len(builds) == 2


def test_replaced_teacher_parameter_is_updated():
    teacher, student = linear(1.0), linear(2.0)
    ema_model(teacher, student, 0.5)
    old = teacher.weight
    teacher.weight = nn.Parameter(torch.full((3, 3), 10.0))
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher.weight, torch.full((3, 3), 6.0))
    assert torch.equal(old, torch.full((3, 3), 1.5))


def test_replaced_student_parameter_and_submodule_are_followed():
    teacher, student = nn.Sequential(linear(1.0), linear(1.0)), nn.Sequential(linear(2.0), linear(2.0))
    ema_model(teacher, student, 0.5)
    student[0].weight = nn.Parameter(torch.full((3, 3), 5.5))
    teacher[1] = linear(0.0)
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher[0].weight, torch.full((3, 3), 3.5))
    assert torch.equal(teacher[1].weight, torch.full((3, 3), 1.0))


def test_teacher_converted_in_place_after_first_call():
    teacher, student = linear(1.0), linear(2.0)
    ema_model(teacher, student, 0.5)
    weight = teacher.weight
    teacher.double()  # same Parameter object, new float64 storage
    assert teacher.weight is weight
    ema_model(teacher, student, 0.5)
    assert torch.equal(teacher.weight, torch.full((3, 3), 1.75, dtype=torch.float64))


def test_cache_does_not_keep_modules_alive():
    teacher, student = linear(1.0), linear(2.0)
    ema_model(teacher, student, 0.5)
    refs = weakref.ref(teacher), weakref.ref(student)
    del teacher, student
    gc.collect()
    assert refs[0]() is None and refs[1]() is None


# --------------------------------------------------------------------------------------------- the EMA helper


def test_ema_update_follows_the_schedule():
    teacher = linear(0.0)
    ema = EMA(teacher, lambda step: [0.5, 0.75][step])
    assert ema.decay == 0.5
    assert ema.update(linear(4.0)) == 0.5
    assert (ema.step, ema.decay) == (1, 0.75)
    assert ema.update(linear(6.0)) == 0.75
    assert torch.equal(teacher.weight, torch.full((3, 3), 0.75 * 2.0 + 0.25 * 6.0))
    assert ema.step == 2


def test_ema_checks_decays_and_types():
    with pytest.raises(ValueError, match="decay must be"):
        EMA(linear(1.0), 1.5)
    with pytest.raises(ValueError, match="decay must be"):
        _ = EMA(linear(1.0), lambda step: 2.0).decay
    with pytest.raises(TypeError, match="schedule must be a decay or a function of the step"):
        EMA(linear(1.0), "0.9")
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        EMA(None, 0.9)


def test_from_model_copies_without_grad_and_unwraps():
    model = bn_model(2.0, 5)
    ema = EMA.from_model(Wrapper(model, "module"), 0.5, device="cpu")
    assert ema.module is not model and isinstance(ema.module, nn.Sequential)
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(isinstance(p, nn.Parameter) for p in ema.module.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ema.module.parameters(), model.parameters()))
    filled(model, 4.0)
    ema.update(model)
    assert torch.equal(ema.module[0].weight, torch.full((2, 2), 3.0))
    assert model[0].weight.requires_grad


def test_state_dict_round_trip_keeps_step_and_weights():
    model = linear(2.0)
    ema = EMA.from_model(model, running_mean)
    for value in (2.0, 4.0, 6.0):
        ema.update(filled(model, value))
    state = ema.state_dict()
    resumed = EMA.from_model(linear(0.0), running_mean)
    resumed.load_state_dict(state)
    assert resumed.step == 3 and resumed.decay == 0.75
    assert torch.equal(resumed.module.weight, torch.full((3, 3), 4.0))

    teacher_only = EMA(linear(1.0), 0.9)
    teacher_only.step = 11
    assert teacher_only.state_dict() == {"step": 11}
    fresh = EMA(linear(1.0), 0.9)
    fresh.load_state_dict({"step": 11})
    assert fresh.step == 11
    with pytest.raises(ValueError, match="EMA state does not fit"):
        fresh.load_state_dict(state)


@cuda
def test_from_model_on_cpu_follows_cuda_model():
    model = linear(2.0).cuda()
    ema = EMA.from_model(model, 0.5, device="cpu")
    assert ema.module.weight.device.type == "cpu"
    ema.update(filled(model, 4.0))
    assert torch.equal(ema.module.weight, torch.full((3, 3), 3.0))


def test_swapped_into_restores_the_model():
    model = bn_model(2.0, 5)
    ema = EMA.from_model(model, 0.5)
    filled(ema.module, 7.0)
    with ema.swapped_into(model) as swapped:
        assert swapped is model
        assert torch.equal(model[0].weight, torch.full((2, 2), 7.0))
        assert torch.equal(model[1].running_var, torch.full((2,), 7.0))
    assert torch.equal(model[0].weight, torch.full((2, 2), 2.0))
    assert torch.equal(model[1].running_var, torch.full((2,), 2.0))
    assert model[0].weight.requires_grad

    with pytest.raises(RuntimeError, match="evaluation failed"), ema.swapped_into(model):
        raise RuntimeError("evaluation failed")
    assert torch.equal(model[0].weight, torch.full((2, 2), 2.0))


# --------------------------------------------------------------------------------------------- schedules


def test_constant():
    assert constant(0, decay=0.99) == constant(10**6, decay=0.99) == 0.99


def test_byol_cosine():
    assert byol_cosine(0, base=0.996, last_step=100) == 0.996
    assert byol_cosine(50, base=0.996, last_step=100) == pytest.approx(0.998)  # cos(pi / 2) = 0
    assert byol_cosine(25, base=0.99, end=1.0, last_step=100) == pytest.approx(1 - 0.01 * (1 + 0.5**0.5) / 2)
    assert byol_cosine(100, base=0.996, last_step=100) == 1.0
    assert byol_cosine(150, base=0.996, last_step=100) == 1.0
    assert byol_cosine(0, base=0.996, last_step=0) == 1.0


def test_tf_warmup():
    assert tf_warmup(0, decay=0.999) == pytest.approx(0.1)
    assert tf_warmup(10, decay=0.999) == pytest.approx(11 / 20)
    assert tf_warmup(10**6, decay=0.999) == 0.999


def test_power_warmup():
    assert power_warmup(0, gamma=1.0, power=1.0) == 0.0
    assert power_warmup(1, gamma=1.0, power=1.0) == 0.5
    assert power_warmup(3, gamma=1.0, power=1.0) == 0.75
    assert power_warmup(6, gamma=2.0, power=2.0) == pytest.approx(1 - 1 / 16)
    assert power_warmup(0, min_value=0.9) == 0.9
    assert power_warmup(10**6) == pytest.approx(1 - 1e-4, rel=1e-6)  # default power 2/3: (10**6) ** -(2/3)


def test_running_mean():
    assert [running_mean(n) for n in range(4)] == [0.0, 0.5, 2 / 3, 0.75]


def test_build_schedule():
    cosine = build_schedule("byol_cosine", 11, base=0.99)
    assert cosine(0) == 0.99 and cosine(5) == pytest.approx(0.995) and cosine(10) == 1.0  # ends at the last step
    assert build_schedule("constant", 5, decay=0.9)(3) == 0.9
    assert build_schedule("tf_warmup", 5, decay=0.9)(0) == pytest.approx(0.1)
    assert build_schedule("power_warmup", 5, min_value=0.5)(0) == 0.5
    assert build_schedule("running_mean", 5)(1) == 0.5


def test_build_schedule_bad_input():
    with pytest.raises(ValueError, match="unknown EMA schedule 'cosine'; expected one of constant, byol_cosine"):
        build_schedule("cosine", 10)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        build_schedule("constant", 10, decay=0.9, base=0.5)
    with pytest.raises(TypeError, match="decay"):
        build_schedule("constant", 10)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        build_schedule("running_mean", 0)
