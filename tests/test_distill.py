"""Tests for torch_sttp.experiments.distill on small synthetic models."""
import copy
import math

import pytest
import torch
from torch import nn

from torch_sttp.experiments.distill import distill, first_tensor, schedule_factor
from torch_sttp.ranks import project


pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


def _inputs(n=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=gen) for _ in range(n)]


def _gap(student, teacher, batches):
    with torch.no_grad():
        return sum(float(((student(x) - teacher(x)) ** 2).mean()) for x in batches) / len(batches)


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_distillation_reduces_the_gap_and_leaves_the_teacher_alone(method):
    teacher = _teacher()
    before_teacher = copy.deepcopy(teacher.state_dict())
    student = project(copy.deepcopy(teacher), method, 3, progress=False)
    batches = _inputs()
    gap0 = _gap(student, teacher, batches)
    history = distill(student, teacher, batches, steps=60, lr=3e-3, loss="mse", progress=False)
    assert len(history["loss"]) == 60 and history["seconds"] > 0
    assert _gap(student, teacher, batches) < 0.7 * gap0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k])
    assert all(p.grad is None for p in teacher.parameters())


def test_hidden_targets_cosine_loss_and_modes_restored():
    teacher = _teacher()
    student = project(copy.deepcopy(teacher), "svdp", 2, progress=False)
    student.train()
    teacher.train()
    history = distill(student, teacher, _inputs(), steps=30, lr=3e-3, loss="cosine", on="hidden",
                      hidden_modules=["1", "3"], progress=False)
    assert history["loss"][-1] < history["loss"][0]
    assert student.training and teacher.training
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks


def test_one_shot_iterator_is_replayed_and_params_restrict_training():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[4].weight.mul_(0.5)
    frozen = student[0].weight.detach().clone()
    batches = _inputs(3)
    history = distill(student, teacher, iter(batches), steps=10, lr=1e-2, params=student[4].parameters(),
                      progress=False)
    assert len(history["loss"]) == 10
    assert torch.equal(student[0].weight, frozen)


def test_cosine_schedule_steps_with_the_decayed_rates():
    """With one parameter far from its target, each Adam step moves it by about that step's rate; the rates
    follow lr·½(1 + cos(π·k/steps)) for k = 0 … steps − 1."""
    teacher = nn.Linear(1, 1, bias=False)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(100.0)
    steps, lr = 8, 0.5
    seen = []
    student.register_forward_pre_hook(lambda m, a: seen.append(m.weight.item()))
    distill(student, teacher, [torch.ones(4, 1)], steps, lr, schedule="cosine", clip_grad=None, progress=False)
    moves = [a - b for a, b in zip(seen[:-1], seen[1:])] + [seen[-1] - student.weight.item()]
    expected = [lr * 0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)]
    assert moves == pytest.approx(expected, rel=1e-2)  # Adam: |step| ≈ rate while the gradient keeps its sign
    assert [schedule_factor("cosine", k, steps) for k in range(steps)] == pytest.approx([e / lr for e in expected])
    assert schedule_factor("constant", 5, steps) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        schedule_factor("linear", 0, steps)


def test_dict_batches_and_model_outputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            return {"last_hidden_state": self.lin(x) * scale}

    teacher, student = Net(), Net()
    batches = [{"x": torch.randn(5, 4), "scale": 2.0} for _ in range(2)]
    history = distill(student, teacher, batches, steps=5, lr=1e-2, progress=False)
    assert len(history["loss"]) == 5
    assert torch.equal(first_tensor((None, torch.ones(1))), torch.ones(1))


def test_errors():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="loss"):
        distill(student, teacher, _inputs(), 1, 1e-3, loss="kl")
    with pytest.raises(ValueError, match="target"):
        distill(student, teacher, _inputs(), 1, 1e-3, on="logits")
    with pytest.raises(ValueError, match="hidden_modules"):
        distill(student, teacher, _inputs(), 1, 1e-3, on="hidden")
    with pytest.raises(ValueError, match="not found"):
        distill(student, teacher, _inputs(), 1, 1e-3, on="hidden", hidden_modules=["nope"], progress=False)
    with pytest.raises(ValueError, match="same module"):
        distill(teacher, teacher, _inputs(), 1, 1e-3)
    with pytest.raises(ValueError, match="steps"):
        distill(student, teacher, _inputs(), -1, 1e-3)
    with pytest.raises(ValueError, match="lr"):
        distill(student, teacher, _inputs(), 1, 0.0)
    with pytest.raises(ValueError, match="schedule"):
        distill(student, teacher, _inputs(), 1, 1e-3, schedule="linear")
    with pytest.raises(ValueError, match="no batch"):
        distill(student, teacher, [], 2, 1e-3, progress=False)
    assert distill(student, teacher, _inputs(), 0, 1e-3)["loss"] == []
