"""ssl.ema: the in-place EMA update (hand-computed values), the EMA class that owns its tensor groups, and the
teacher momentum from ssl.optim.cosine_schedule (equal to BYOL's and DINO's cosine)."""

import copy
import math

import pytest
import torch
from torch import nn

from ssl.ema import EMA, ema_model
from ssl.optim import cosine_schedule

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


def test_equal_weight_decays_give_mean_of_snapshots():
    teacher, student = linear(123.0), linear(0.0)
    snapshots = [1.0, 2.0, 4.0, 9.0]
    ema = EMA(teacher, student, [n / (n + 1) for n in range(len(snapshots))])  # step 0 copies the first one
    for value in snapshots:
        filled(student, value)
        ema.update()
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
        EMA(linear(1.0), linear(2.0), [0.5], buffers="ignore")


# --------------------------------------------------------------------------------------------- the EMA class


def test_update_applies_the_decays_in_order():
    teacher, student = linear(0.0), linear(4.0)
    ema = EMA(teacher, student, [0.5, 0.75])
    assert ema.step == 0
    assert ema.update() == 0.5
    assert torch.equal(teacher.weight, torch.full((3, 3), 2.0))
    filled(student, 6.0)  # in place: the groups see it
    assert ema.update() == 0.75
    assert torch.equal(teacher.weight, torch.full((3, 3), 0.75 * 2.0 + 0.25 * 6.0))
    assert ema.step == 2
    with pytest.raises(IndexError, match="EMA update 2 is past the end of its 2 decays"):
        ema.update()


def test_ema_owns_its_groups_and_rebinds_to_a_new_student():
    teacher, student = bn_model(0.0, 1), bn_model(4.0, 9)
    ema = EMA(teacher, student, [0.5] * 3, buffers="average")
    ema.update()  # no student argument: the groups were matched at construction
    assert torch.equal(teacher[0].weight, torch.full((2, 2), 2.0))
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 2.0))
    assert teacher[1].num_batches_tracked.item() == 9

    new_student = Wrapper(bn_model(10.0, 20), "module")
    ema.update()  # still the old student
    assert torch.equal(teacher[0].weight, torch.full((2, 2), 3.0))
    ema.rebind(new_student)
    assert ema.step == 2
    ema.update()
    assert torch.equal(teacher[0].weight, torch.full((2, 2), 6.5))
    assert torch.equal(teacher[1].running_var, torch.full((2,), 6.5))
    assert teacher[1].num_batches_tracked.item() == 20
    assert torch.equal(student[0].weight, torch.full((2, 2), 4.0))  # the old student was only read


def test_ema_takes_a_tensor_of_decays_and_checks_them():
    teacher, student = linear(0.0), linear(4.0)
    ema = EMA(teacher, student, torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert ema.decays == [0.5, 0.25] and all(type(d) is float for d in ema.decays)
    with pytest.raises(ValueError, match=r"decays must be finite numbers in \[0, 1\], got 1.5 at step 1"):
        EMA(teacher, student, [0.9, 1.5])
    with pytest.raises(ValueError, match=r"decays must be finite numbers in \[0, 1\], got nan at step 0"):
        EMA(teacher, student, [math.nan])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        EMA(teacher, student, [])
    with pytest.raises(TypeError, match="decays must be a sequence of per-step decays, got float"):
        EMA(teacher, student, 0.9)


def test_ema_construction_checks_the_modules():
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        EMA(None, linear(1.0), [0.9])
    with pytest.raises(ValueError, match=r"shape mismatch for 'weight'"):
        EMA(linear(1.0), nn.Linear(2, 3, bias=False), [0.9])
    model = linear(1.0)
    with pytest.raises(ValueError, match="teacher and student are the same module"):
        EMA(model, model, [0.9])
    ema = EMA(model, linear(2.0), [0.9])
    with pytest.raises(ValueError, match="different tensor names"):
        ema.rebind(nn.Linear(3, 3))


def test_ema_converts_dtype_like_ema_model():
    teacher = linear(1.0)
    student = linear(1.0 + 2**-7).to(torch.bfloat16)
    EMA(teacher, student, [0.999]).update()
    torch.testing.assert_close(teacher.weight, torch.full((3, 3), 1 + 0.001 * 2**-7), rtol=0, atol=1e-7)


def test_ema_update_equals_ema_model():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    student(torch.randn(8, 4))  # moves the running statistics
    teacher_a = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    teacher_b = copy.deepcopy(teacher_a)
    for policy in ("average", "copy", "keep"):
        ema = EMA(teacher_a, student, [0.9, 0.6], buffers=policy)
        for decay in ema.decays:
            ema.update()
            ema_model(teacher_b, student, decay, buffers=policy)
        for (name, a), b in zip(teacher_a.state_dict().items(), teacher_b.state_dict().values()):
            assert torch.equal(a, b), (policy, name)


def test_state_dict_keeps_the_step():
    ema = EMA(linear(1.0), linear(2.0), [0.9] * 20)
    for _ in range(3):
        ema.update()
    assert ema.state_dict() == {"step": 3}
    resumed = EMA(linear(1.0), linear(2.0), [0.9] * 20)
    resumed.load_state_dict({"step": 11})  # what checkpoints written before this API hold, too
    assert resumed.step == 11 and resumed.state_dict() == {"step": 11}


@cuda
def test_ema_cpu_teacher_follows_cuda_student():
    teacher, student = bn_model(1.0, 1), bn_model(2.0, 2**40 + 3).cuda()
    EMA(teacher, student, [0.5]).update()
    assert torch.equal(teacher[0].weight, torch.full((2, 2), 1.5))
    assert teacher[1].num_batches_tracked.item() == 2**40 + 3


# --------------------------------------------------------------------------------------------- the momentum


def byol_cosine(step: int, base: float, end: float, total_steps: int) -> float:
    """deepmind's byol/utils/schedules.py target_ema (and solo-learn's MomentumUpdater.update_tau): the cosine runs
    over all `total_steps`, so the last step stays just below `end`."""
    return end - (end - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


@pytest.mark.parametrize("total_steps", [1, 2, 3, 11, 100, 3907])
@pytest.mark.parametrize(("base", "end"), [(0.996, 1.0), (0.99, 1.0), (0.9995, 1.0), (0.5, 0.9)])
def test_momentum_array_equals_byol_cosine(total_steps, base, end):
    decays = cosine_schedule(base, end, total_steps).tolist()
    expected = [byol_cosine(k, base, end, total_steps) for k in range(total_steps)]
    assert decays == pytest.approx(expected, rel=0, abs=1e-15)
    assert decays[0] == base and decays[-1] < end


def test_momentum_hand_computed_values():
    decays = cosine_schedule(0.996, 1.0, 100).tolist()
    assert decays[0] == pytest.approx(0.996, abs=1e-15)
    assert decays[50] == pytest.approx(0.998, abs=1e-15)  # cos(pi / 2) = 0
    assert decays[25] == pytest.approx(1 - 0.004 * (1 + 0.5**0.5) / 2, abs=1e-15)
    assert decays[99] == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * 99 / 100)) / 2, abs=1e-15)
    assert cosine_schedule(0.99, 1.0, 1).tolist() == [0.99]
