"""The public data-aware entry points: convert(calibration=), ranks.project(calibration=/sequential=) and
select_ranks(calibration=): equality with project_whitened, never worse than the uniform plan, bad input."""
import copy

import pytest
import torch
from torch import nn

from torch_sttp import conversion, convert, converted_layers, select_ranks
from torch_sttp.allocation import plan_loss, uniform_ranks
from torch_sttp.calibration import calibrate
from torch_sttp.data_aware import project_whitened
from torch_sttp.layers import weight_matrix
from torch_sttp.ranks import project, projection_errors
from torch_sttp.whitening import layer_metric, project_layer, truncation_candidates

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 18), nn.Tanh(), nn.Linear(18, 6)).double()


def _batches(seed=0, n=4, d=16):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return [torch.randn(32, d, generator=g, dtype=torch.float64) @ mix for _ in range(n)]


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in converted_layers(model)}


@pytest.mark.parametrize("method,rank", [("svdp", 4), ("sttp", 5)])
def test_convert_with_calibration_equals_project_whitened(method, rank):
    dense = _model()
    stats = calibrate(dense, _batches())
    a, b, free = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    before = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    convert(a, method, rank, "free", init="pretrained", calibration=stats)
    result = project_whitened(b, method, rank, stats)
    convert(free, method, rank, "free", init="pretrained")
    wa, wb, wf = _weights(a), _weights(b), _weights(free)
    for name, w in before.items():
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-10)
        metric = layer_metric(stats, name, dense.get_submodule(name))
        loss = metric.loss(w, weight_matrix(a.get_submodule(name)).detach())
        assert loss == pytest.approx(result.layers[name].loss, rel=1e-10, abs=1e-14)
        assert loss <= metric.loss(w, wf[name]) * (1 + 1e-9)  # data-aware: never worse than data-free here
    # the dense weights the conversion read were left untouched (no in-place write of Ŵ)
    assert all(torch.equal(dense.get_submodule(n).weight, w) for n, w in before.items())


def test_convert_with_a_projector_uses_its_settings():
    dense = _model(1)
    stats = calibrate(dense, _batches(1))
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    convert(a, "sttp", 4, "free", init="pretrained", calibration=stats.projector(damping=0.1, refine_iters=0))
    project_whitened(b, "sttp", 4, stats, damping=0.1, refine_iters=0)
    for (name, w), (_, v) in zip(_weights(a).items(), _weights(b).items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-10, msg=name)


def test_convert_with_calibration_and_the_normalized_spectrum_scales_the_whitened_weight():
    dense = _model(2)
    stats = calibrate(dense, _batches(2))
    a = copy.deepcopy(dense)
    with pytest.warns(UserWarning):
        convert(a, "svdp", 4, "normalized", init="pretrained", calibration=stats)
    for name, w in _weights(a).items():
        module = dense.get_submodule(name)
        w_hat = project_layer(module, "svdp", 4, layer_metric(stats, name, module), compare=False).weight
        torch.testing.assert_close(w, w_hat / torch.linalg.matrix_norm(w_hat, 2), rtol=0, atol=1e-10)


def test_convert_calibration_errors_leave_the_model_dense():
    dense = _model(3)
    stats = calibrate(dense, _batches(3), layers=["0", "2"])
    with pytest.raises(ValueError, match="init='pretrained'"):
        convert(copy.deepcopy(dense), "svdp", 3, "free", init="identity", calibration=stats)
    with pytest.raises(ValueError, match="project_weight"):
        convert(copy.deepcopy(dense), "svdp", 3, "free", init="pretrained", calibration={"0": 1})
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="'4'"):  # the last layer was not calibrated
        convert(model, "svdp", 3, "free", init="pretrained", calibration=stats)
    assert converted_layers(model) == [] and conversion(model) is None
    for (n, m), (_, d) in zip(model.named_parameters(), dense.named_parameters()):
        assert torch.equal(m, d), n


def test_project_with_calibration_delegates_and_records():
    dense = _model(4)
    batches = _batches(4)
    stats = calibrate(dense, batches)
    a, b, c = copy.deepcopy(dense), copy.deepcopy(dense), copy.deepcopy(dense)
    assert project(a, "sttp", 5, spectrum="free", progress=False, calibration=stats) is a
    result = project_whitened(b, "sttp", 5, stats)
    project(c, "sttp", 5, spectrum="free", progress=False, batches=batches)  # statistics computed from batches
    assert projection_errors(a) == pytest.approx(result.errors, rel=1e-9)
    assert projection_errors(c) == pytest.approx(result.errors, rel=1e-9)
    assert conversion(a).projection_seconds > 0
    for (n, w), (_, v) in zip(_weights(a).items(), _weights(b).items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-10, msg=n)
    # data-free is unchanged: the TT-SVD of convert(init="pretrained")
    d, e = copy.deepcopy(dense), copy.deepcopy(dense)
    project(d, "sttp", 5, spectrum="free", progress=False)
    convert(e, "sttp", 5, "free", init="pretrained")
    for (n, w), (_, v) in zip(_weights(d).items(), _weights(e).items()):
        assert torch.equal(w, v), n


def test_project_sequential_equals_project_whitened_sequential():
    dense = _model(5)
    batches = _batches(5)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    project(a, "svdp", 3, spectrum="free", progress=False, sequential=True, batches=batches)
    project_whitened(b, "svdp", 3, batches=batches, sequential=True)
    for (n, w), (_, v) in zip(_weights(a).items(), _weights(b).items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-10, msg=n)
    nonseq = copy.deepcopy(dense)
    project(nonseq, "svdp", 3, spectrum="free", progress=False, batches=batches)
    assert any(not torch.allclose(w, v) for w, v in zip(_weights(a).values(), _weights(nonseq).values()))


def test_project_data_aware_bad_input():
    dense = _model(6)
    batches = _batches(6)
    stats = calibrate(dense, batches)
    with pytest.raises(ValueError, match="randomized"):
        project(copy.deepcopy(dense), "svdp", 3, progress=False, randomized=True, calibration=stats)
    with pytest.raises(ValueError, match="drop calibration"):
        project(copy.deepcopy(dense), "svdp", 3, progress=False, sequential=True, batches=batches, calibration=stats)
    with pytest.raises(ValueError, match="batches"):
        project(copy.deepcopy(dense), "svdp", 3, progress=False, sequential=True)


def _skewed():
    """A wide layer fed a nearly one-dimensional input next to two layers fed rich inputs: a common rank wastes
    DOF on the first."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20)).double()
    g = torch.Generator().manual_seed(7)
    low = torch.randn(256, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 20, generator=g, dtype=torch.float64)
    x = low + 1e-3 * torch.randn(256, 20, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model[2].weight.copy_(torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0] * 3)
    return model, list(x.split(64))


@pytest.mark.parametrize("method", ["svdp", "svd", "sttp"])
def test_select_ranks_with_calibration_never_worse_than_uniform(method):
    model, batches = _skewed()
    stats = calibrate(model, batches)
    cands = truncation_candidates(model, method, stats, normalize=True)
    for budget in (0.2, 0.35, 0.6):
        plan = select_ranks(model, budget, method, calibration=stats)
        assert plan.dof <= plan.budget and plan.objective == "whitened" and plan.strategy in ("loss", "uniform")
        uniform = uniform_ranks(cands, plan.budget)
        assert plan_loss(cands, dict(plan)) <= plan_loss(cands, uniform) + 1e-12
        floors = [max(1, -(-uniform[n] // 2)) for n in plan]
        assert all(plan[n] >= f for n, f in zip(plan, floors))
    if method == "svdp":  # here the loss-aware plan is strictly better and moves rank off the low-rank input
        plan = select_ranks(model, 0.35, method, calibration=stats)
        uniform = uniform_ranks(cands, plan.budget)
        assert plan.strategy == "loss" and plan_loss(cands, dict(plan)) < 0.9 * plan_loss(cands, uniform)
        assert plan["0"] < uniform["0"]
    # energy-greedy and uniform plans are unchanged by the new arguments' existence
    assert dict(select_ranks(model, 0.35, method, strategy="uniform")) == dict(select_ranks(model, 0.35, method,
                                                                                                 strategy="uniform"))


def test_select_ranks_with_calibration_bad_input():
    model, batches = _skewed()
    stats = calibrate(model, batches, layers=["0", "2"])
    with pytest.raises(ValueError, match="strategy='auto'"):
        select_ranks(model, 0.3, "svdp", strategy="greedy", calibration=stats)
    with pytest.raises(ValueError, match="objective='svd'"):
        select_ranks(model, 0.3, "sttp", objective="tt", calibration=stats)
    with pytest.raises(ValueError, match=r"\['4'\].*no calibration statistic"):
        select_ranks(model, 0.3, "svdp", calibration=stats)
    with pytest.raises(ValueError, match="floor"):
        select_ranks(model, 0.3, "svdp", calibration=stats, layers=["0", "2"], floor=1.5)
