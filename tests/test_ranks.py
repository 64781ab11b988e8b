"""Tests for torch_sttp.ranks: rank selection under a DOF budget, projection and its error report."""
import math

import pytest
import torch
from torch import nn

from torch_sttp.ranks import (
    RankPlan,
    compressible_layers,
    layer_spectra,
    method_dof,
    project,
    projection_errors,
    select_ranks,
)
from torch_sttp.export import to_dense
from torch_sttp.surgery import convert, converted_layers
from torch_sttp.tt import count_dof

pytestmark = pytest.mark.usefixtures("one_thread")


# known spectra: fast decay, flat, slow decay, a few dominant directions
SPECTRA = {
    "fast": (48, 32, [0.5 ** i for i in range(32)]),
    "flat": (24, 40, [1.0] * 24),
    "slow": (36, 60, [1.0 / (1 + i) for i in range(36)]),
    "spiky": (30, 30, [10.0, 8.0, 6.0] + [0.05] * 27),
}


def _orthonormal(n, r, gen):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q


class Synthetic(nn.Module):
    """Linear layers whose weights are U·diag(σ)·Vᵀ with chosen σ."""

    def __init__(self, names=tuple(SPECTRA), seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for name in names:
            d_out, d_in, sigma = SPECTRA[name]
            layer = nn.Linear(d_in, d_out)
            r = len(sigma)
            w = _orthonormal(d_out, r, gen) @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) \
                @ _orthonormal(d_in, r, gen).T
            with torch.no_grad():
                layer.weight.copy_(w.float())
            setattr(self, name, layer)

    def forward(self, x):  # not used
        return x


def _energy(name, rank):
    sigma = torch.tensor(SPECTRA[name][2], dtype=torch.float64)
    return float((sigma[:rank] ** 2).sum())


def _total():
    return sum(_energy(n, 10 ** 6) for n in SPECTRA)


def _dense():
    return sum(d_out * d_in for d_out, d_in, _ in SPECTRA.values())


@pytest.fixture(scope="module")
def model():
    return Synthetic()


@pytest.mark.parametrize("method", ["svd", "svdp", "sttp"])
@pytest.mark.parametrize("spectrum", ["free", "identity"])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0])
def test_never_exceeds_budget_and_beats_uniform(model, method, spectrum, fraction):
    dense = _dense()
    budget = int(math.floor(fraction * dense))
    minimum = sum(method_dof((d_out, d_in), method, 1, spectrum) for d_out, d_in, _ in SPECTRA.values())
    if budget < minimum:
        with pytest.raises(ValueError, match=str(minimum)):
            select_ranks(model, fraction, method, spectrum)
        return
    plan = select_ranks(model, fraction, method, spectrum)
    uniform = select_ranks(model, fraction, method, spectrum, strategy="uniform")
    assert isinstance(plan, RankPlan) and set(plan) == set(SPECTRA)
    assert plan.budget == budget and uniform.budget == budget
    # exact DOF, recomputed independently
    dof = 0
    for name, r in plan.items():
        d_out, d_in, _ = SPECTRA[name]
        expected = r * (d_out + d_in) if method == "svd" else count_dof((d_out, d_in), method, r, spectrum)
        assert plan.layer_dof[name] == expected
        dof += expected
    assert plan.dof == dof <= budget
    assert uniform.dof <= budget
    assert len(set(uniform.values())) == 1 or any(uniform[n] == min(SPECTRA[n][:2]) for n in uniform)
    # retained energy from the known spectra
    kept = sum(_energy(n, r) for n, r in plan.items()) / _total()
    assert plan.energy_retained == pytest.approx(kept, rel=1e-5)
    assert plan.energy_retained >= uniform.energy_retained - 1e-12
    assert plan.strategy in ("greedy", "uniform")


def test_greedy_strictly_better_than_uniform_on_heterogeneous_spectra(model):
    plan = select_ranks(model, 0.2, "svdp")
    uniform = select_ranks(model, 0.2, "svdp", strategy="uniform")
    assert plan.strategy == "greedy"
    assert plan.energy_retained > uniform.energy_retained + 0.01
    # the dominant directions of "spiky" are bought first, "fast" stops early
    assert plan["spiky"] >= 3
    assert plan["fast"] < min(SPECTRA["fast"][:2])


@pytest.mark.parametrize("method", ["svd", "svdp", "sttp"])
def test_greedy_stops_only_when_no_move_fits(model, method):
    plan = select_ranks(model, 0.3, method, strategy="greedy")
    left = plan.budget - plan.dof
    for name, r in plan.items():
        d_out, d_in, sigma = SPECTRA[name]
        for r2 in range(r + 1, min(d_out, d_in) + 1):
            gain = _energy(name, r2) - _energy(name, r)
            cost = method_dof((d_out, d_in), method, r2, "free") - method_dof((d_out, d_in), method, r, "free")
            assert gain <= 1e-12 or cost > left, (name, r, r2)


def test_greedy_matches_brute_force_on_a_tiny_model():
    model = Synthetic(names=("fast", "spiky"))
    for budget in (2000, 3000, 4500):
        plan = select_ranks(model, budget, "svdp")
        best = 0.0
        for ra in range(1, 33):
            for rb in range(1, 31):
                if count_dof((48, 32), "svdp", ra, "free") + count_dof((30, 30), "svdp", rb, "free") <= budget:
                    best = max(best, _energy("fast", ra) + _energy("spiky", rb))
        kept = plan.energy_retained * (_energy("fast", 99) + _energy("spiky", 99))
        assert kept <= best + 1e-9
        assert kept >= 0.995 * best


def test_int_budget_and_fraction_agree(model):
    dense = _dense()
    by_fraction = select_ranks(model, 0.25, "svdp")
    by_int = select_ranks(model, int(0.25 * dense), "svdp")
    assert by_fraction.budget == by_int.budget
    assert dict(by_fraction) == dict(by_int)
    small = select_ranks(model, 5000, "sttp")
    assert small.budget == 5000 and small.dof <= 5000


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), 0, -3, True, "0.3", None])
def test_bad_budgets(model, bad):
    with pytest.raises(ValueError):
        select_ranks(model, bad)


def test_impossible_budget_names_the_minimum(model):
    minimum = sum(count_dof((d_out, d_in), "svdp", 1, "free") for d_out, d_in, _ in SPECTRA.values())
    with pytest.raises(ValueError, match=f"minimum {minimum}"):
        select_ranks(model, minimum - 1, "svdp")
    assert select_ranks(model, minimum, "svdp").dof == minimum


def test_other_errors(model):
    with pytest.raises(ValueError, match="method"):
        select_ranks(model, 0.3, "tucker")
    with pytest.raises(ValueError, match="objective"):
        select_ranks(model, 0.3, "svdp", objective="tt")
    with pytest.raises(ValueError, match="strategy"):
        select_ranks(model, 0.3, strategy="best")
    with pytest.raises(ValueError, match="not in the model"):
        select_ranks(model, 0.3, layers=["nope"])
    with pytest.raises(ValueError, match="matches no module"):
        select_ranks(model, 0.3, include="enc.*")


def test_selection_filters(model):
    plan = select_ranks(model, 0.3, include="f*")
    assert set(plan) == {"fast", "flat"}
    assert plan.dense == 48 * 32 + 24 * 40
    plan = select_ranks(model, 0.3, exclude=["fast"], layers=["fast", "slow", "spiky"])
    assert set(plan) == {"slow", "spiky"}


def test_tied_and_mha_layers_are_left_out():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.c = nn.Linear(8, 4)
            self.att = nn.MultiheadAttention(8, 2)

    names = [n for n, _ in compressible_layers(Tied())]
    assert names == ["c"]


def test_tt_objective_and_bounds(model):
    plan = select_ranks(model, 0.3, "sttp", objective="tt")
    assert plan.dof <= plan.budget and plan.objective == "tt"
    for name in plan:
        assert plan.svd_error[name] <= plan.predicted_error[name] + 1e-9 <= 1.0 + 1e-9


def test_plan_is_accepted_by_convert_and_roundtrips_as_dict(model):
    m = Synthetic()
    plan = select_ranks(m, 0.3, "sttp")
    convert(m, "sttp", rank=plan, spectrum="free", init="pretrained")
    assert {n for n, _ in converted_layers(m)} == set(plan)
    again = RankPlan.from_dict(plan.to_dict())
    assert dict(again) == dict(plan) and again.dof == plan.dof and again.strategy == plan.strategy
    assert "energy retained" in plan.summary()
    with pytest.raises(ValueError, match="already has SVDP/STTP"):
        select_ranks(m, 0.3)
    to_dense(m)


def test_projection_error_equals_truncated_svd_error_for_svdp():
    m = Synthetic()
    dense = {k: v.clone() for k, v in m.state_dict().items()}
    plan = select_ranks(m, 0.3, "svdp")
    project(m, "svdp", plan, progress=False)
    errors = projection_errors(m)
    assert set(errors) == set(plan)
    for name, r in plan.items():
        sigma = torch.tensor(SPECTRA[name][2], dtype=torch.float64)
        exact = float((sigma[r:] ** 2).sum().sqrt() / sigma.norm())
        assert errors[name] == pytest.approx(exact, abs=2e-5)
        assert plan.predicted_error[name] == pytest.approx(exact, abs=2e-5)
    again = projection_errors(m, originals=dense)
    for name in plan:
        assert again[name] == pytest.approx(errors[name], abs=1e-6)


def test_projection_error_for_sttp_lies_between_its_bounds():
    m = Synthetic()
    plan = select_ranks(m, 0.3, "sttp")
    project(m, "sttp", rank_or_plan=plan, progress=False)
    errors = projection_errors(m)
    for name in plan:
        assert plan.svd_error[name] - 1e-5 <= errors[name] <= plan.predicted_error[name] + 1e-5


def test_svd_plan_projects_with_svdp_and_full_budget_is_lossless():
    m = Synthetic()
    plan = select_ranks(m, 1.0, "svd")
    with pytest.raises(ValueError, match="method='svdp'"):
        project(Synthetic(), "sttp", plan, progress=False)
    project(m, "svdp", plan, progress=False)
    full = select_ranks(Synthetic(), 1.0, "svdp")
    assert full.dof <= _dense()
    assert all(e < 1e-5 for e in full.predicted_error.values())


def test_projection_errors_without_a_record():
    m = Synthetic()
    convert(m, "svdp", rank=4, spectrum="free", init="pretrained")
    with pytest.raises(ValueError, match="no projection errors"):
        projection_errors(m)


def test_conv_and_conv_transpose_layout():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(6, 10, 3), nn.ConvTranspose2d(10, 4, 3), nn.Conv1d(5, 7, 2))
    with torch.no_grad():
        for m in model:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    spectra = {s.name: s for s in layer_spectra(compressible_layers(model))}
    assert spectra["1"].shape == (4, 10, 3, 3)  # ConvTranspose: axes 0 and 1 swapped
    w = model[1].weight.detach().transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(torch.tensor(spectra["1"].sv), torch.linalg.svdvals(w))
    plan = select_ranks(model, 0.5, "svdp")
    project(model, "svdp", plan, progress=False)
    for name, err in projection_errors(model).items():
        assert err == pytest.approx(plan.predicted_error[name], abs=1e-5)


def test_randomized_projection_matches_exact():
    exact, rand = Synthetic(), Synthetic()
    plan = select_ranks(exact, 0.2, "svdp")
    project(exact, "svdp", plan, progress=False)
    project(rand, "svdp", plan, progress=False, randomized=True, niter=4)
    e_exact, e_rand = projection_errors(exact), projection_errors(rand)
    for name in plan:
        assert e_rand[name] == pytest.approx(e_exact[name], abs=2e-3)
    with torch.no_grad():
        for name in ("fast", "slow", "spiky"):  # "flat" has no spectral gap: its truncation is not unique
            w_exact, w_rand = getattr(exact, name).weight, getattr(rand, name).weight
            assert torch.allclose(w_exact, w_rand, atol=2e-3 * float(w_exact.norm()))
    with pytest.raises(ValueError, match="svdp"):
        project(Synthetic(), "sttp", 4, randomized=True, progress=False)
    with pytest.raises(ValueError, match="spectrum"):
        project(Synthetic(), "svdp", 4, spectrum="identity", randomized=True, progress=False)


def test_randomized_projection_of_a_big_layer_uses_the_low_rank_route():
    gen = torch.Generator().manual_seed(3)
    layer = nn.Linear(300, 200)
    u, v = _orthonormal(200, 200, gen), _orthonormal(300, 200, gen)
    sigma = torch.tensor([0.8 ** i for i in range(200)], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_((u * sigma) @ v.T)
    model = nn.Sequential(layer)
    project(model, "svdp", {"0": 20}, progress=False, randomized=True, niter=3)
    exact = float((sigma[20:] ** 2).sum().sqrt() / sigma.norm())
    assert projection_errors(model)["0"] == pytest.approx(exact, abs=1e-3)


def test_layer_matrix_is_a_deprecated_alias_of_weight_matrix():
    import torch_sttp.ranks as ranks
    from torch_sttp.layers import weight_matrix

    assert "layer_matrix" not in ranks.__all__
    with pytest.warns(DeprecationWarning, match="torch_sttp.layers.weight_matrix"):
        alias = ranks.layer_matrix
    assert alias is weight_matrix
    with pytest.warns(DeprecationWarning):
        from torch_sttp.ranks import layer_matrix  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute"):
        ranks.no_such_name


def test_unfolding_bonds_follow_the_holtz_bound():
    from torch_sttp.tt import split_modes, tt_ranks

    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.ConvTranspose2d(6, 12, 3), nn.Linear(20, 12))
    with torch.no_grad():
        for m in model:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
    for spec, (_, layer) in zip(layer_spectra(compressible_layers(model), unfoldings=True), model.named_children()):
        out_modes, in_modes = split_modes(spec.shape, "sttp")
        modes = out_modes + in_modes
        w = (layer.weight.detach().transpose(0, 1) if isinstance(layer, nn.ConvTranspose2d)
             else layer.weight.detach()).reshape(spec.d_out, -1).double()
        expected = [(min(math.prod(modes[:k]), math.prod(modes[k:])), math.prod(modes[:k]))
                    for k in range(1, len(modes))]
        expected = [(cap, left) for cap, left in expected if cap > 1]
        assert [cap for cap, _ in spec.unfolding_sv] == [cap for cap, _ in expected]
        assert [cap for cap, _ in spec.unfolding_sv] == [c for c in tt_ranks(modes, 10 ** 9)[1:-1] if c > 1]
        for (_, sv), (_, left) in zip(spec.unfolding_sv, expected):
            ref = torch.linalg.svdvals(w.reshape(left, -1))
            assert torch.allclose(torch.tensor(sv), ref, rtol=1e-10, atol=1e-12)


def test_randomized_projection_of_a_transposed_conv_and_the_recorded_errors():
    from torch_sttp.surgery import conversion

    gen = torch.Generator().manual_seed(5)
    exact, rand = (nn.Sequential(nn.ConvTranspose2d(8, 6, 3)) for _ in range(2))
    w = torch.randn(exact[0].weight.shape, generator=gen)
    with torch.no_grad():
        exact[0].weight.copy_(w)
        rand[0].weight.copy_(w)
    project(exact, "svdp", 4, progress=False)
    project(rand, "svdp", 4, progress=False, randomized=True, niter=6)
    sigma = torch.linalg.svdvals(w.transpose(0, 1).reshape(6, -1).double())
    truncated = float((sigma[4:] ** 2).sum().sqrt() / sigma.norm())
    assert projection_errors(exact)["0"] == pytest.approx(truncated, abs=1e-5)
    assert projection_errors(rand)["0"] == pytest.approx(truncated, abs=1e-4)
    record = conversion(rand)
    assert projection_errors(rand) == record.projection_errors and record.projection_seconds > 0


def test_project_defaults_need_no_tqdm_and_asking_for_a_bar_without_it_says_how(monkeypatch):
    # tqdm is an optional extra: the defaults never import it; progress=True without it names the fix
    import sys

    from torch_sttp.calibration import calibrate

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    plan = select_ranks(Synthetic(), 0.3, "svdp")
    quiet = project(Synthetic(), "svdp", plan)
    reference = Synthetic()
    monkeypatch.undo()
    project(reference, "svdp", plan, progress=False)
    assert projection_errors(quiet) == pytest.approx(projection_errors(reference), abs=0)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    for call in (lambda: project(Synthetic(), "svdp", plan, progress=True),
                 lambda: project(Synthetic(), "svdp", plan, progress=True, randomized=True),
                 lambda: convert(Synthetic(), "svdp", 4, progress=True),
                 lambda: calibrate(nn.Sequential(nn.Linear(6, 4)), [torch.randn(2, 6)], progress=True)):
        with pytest.raises(ImportError, match=r"progress=True needs tqdm \(pip install tqdm"):
            call()


def test_a_plan_is_used_with_its_own_method_by_every_entry_point():
    # the plan's ranks fit the budget in its method's DOF: convert, project and project_whitened all refuse
    # another method (project_whitened took it and overshot the budget)
    from torch_sttp.calibration import calibrate
    from torch_sttp.data_aware import project_whitened

    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    batches = [torch.randn(16, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plan = select_ranks(model, 0.3, "sttp")
    calls = {"convert": lambda: convert(copy_of(model), "svdp", plan),
             "project": lambda: project(copy_of(model), "svdp", plan),
             "project_whitened": lambda: project_whitened(copy_of(model), "svdp", plan, batches=batches)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"plan was made for method='sttp'.*use it with method='sttp'"):
            call()
    svd_plan = select_ranks(model, 0.3, "svd")
    stats = calibrate(model, batches)
    whitened = project_whitened(copy_of(model), "svdp", svd_plan, stats)  # a two-factor plan: same weights
    assert set(whitened.errors) == set(svd_plan)
    with pytest.raises(ValueError, match="use it with method='svdp'"):
        project_whitened(copy_of(model), "sttp", svd_plan, stats)


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_a_plan_used_with_a_spectrum_of_other_dof_warns_and_a_planned_layer_is_never_dropped():
    """convert(rank=plan) with a spectrum whose DOF differ from the plan's warns (the budget would be exceeded);
    include/exclude that leave out a layer the plan ranks are refused, not applied silently."""
    import copy
    import warnings

    import torch_sttp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    plan = torch_sttp.select_ranks(model, 0.3, "svdp", spectrum="identity")
    with pytest.warns(UserWarning, match="spectrum='identity'; converting with spectrum='free' exceeds the budget"):
        torch_sttp.convert(copy.deepcopy(model), "svdp", rank=plan, spectrum="free", init="pretrained")
    with pytest.warns(UserWarning, match="spectrum='identity'; converting with spectrum='free' exceeds the budget"):
        torch_sttp.project(copy.deepcopy(model), "svdp", plan, spectrum="free")
    free_plan = torch_sttp.select_ranks(model, 0.3, "svdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # free and normalized count the same DOF: silent
        torch_sttp.convert(copy.deepcopy(model), "svdp", rank=free_plan, spectrum="normalized")
    for patterns in ({"exclude": ["0"]}, {"include": ["3"]}):
        target = copy.deepcopy(model)
        with pytest.raises(ValueError, match=r"layer '0' has a rank in the mapping \(or plan\), but the patterns"):
            torch_sttp.project(target, "svdp", free_plan, **patterns)
        assert not torch_sttp.converted_layers(target)


def test_an_sttp_plan_on_the_svd_objective_says_its_energy_is_a_proxy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 36), nn.ReLU(), nn.Linear(36, 12))
    sttp = select_ranks(model, 1.0, "sttp")
    assert "SVD energy: inner TT bonds not counted" in sttp.summary()
    assert sttp.energy_retained == pytest.approx(1.0) and max(sttp.predicted_error.values()) > 0
    assert "SVD energy" not in select_ranks(model, 1.0, "sttp", objective="tt").summary()
    assert "SVD energy" not in select_ranks(model, 1.0, "svdp").summary()
