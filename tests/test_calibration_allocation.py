"""Loss-aware rank allocation: optimality on small problems, the budget, the floor, role groups."""
import itertools

import pytest

from torch_sttp.allocation import (
    RankCandidates,
    allocate_ranks,
    floor_ranks,
    plan_dof,
    plan_loss,
    role,
    uniform_ranks,
)


def _svdp_like(d_out, d_in, sv):
    """Candidates of an SVDP layer with singular values ``sv``: DOF r(d_out + d_in) − r², loss Σ_{i>r} σ_i²."""
    ranks = list(range(1, len(sv) + 1))
    return RankCandidates(ranks, [r * (d_out + d_in) - r * r for r in ranks],
                          [sum(s * s for s in sv[r:]) for r in ranks])


LAYERS = {
    "a": _svdp_like(8, 6, [5, 4, 1, 0.5, 0.2, 0.1]),
    "b": _svdp_like(6, 6, [3, 2.5, 2, 1.5, 1, 0.5]),
    "c": _svdp_like(10, 4, [9, 0.3, 0.2, 0.1]),
}


def _brute(candidates, budget, floors=None):
    names = list(candidates)
    best = None
    for pick in itertools.product(*[range(len(candidates[n].ranks)) for n in names]):
        plan = {n: candidates[n].ranks[i] for n, i in zip(names, pick)}
        if floors and any(plan[n] < floors[n] for n in names):
            continue
        if plan_dof(candidates, plan) <= budget:
            loss = plan_loss(candidates, plan)
            if best is None or loss < best[0] - 1e-12:
                best = (loss, plan)
    return best


@pytest.mark.parametrize("budget", [40, 60, 85, 110, 140])
def test_allocation_fits_the_budget_and_matches_the_brute_force_optimum(budget):
    plan = allocate_ranks(LAYERS, budget, floor=0.0)
    assert plan_dof(LAYERS, plan) <= budget
    optimum, _ = _brute(LAYERS, budget)
    assert plan_loss(LAYERS, plan) == pytest.approx(optimum, rel=1e-12, abs=1e-12)
    assert plan_loss(LAYERS, plan) <= plan_loss(LAYERS, uniform_ranks(LAYERS, budget)) + 1e-12


def test_convex_losses_are_allocated_optimally():
    # losses convex in DOF (geometric spectra): the Lagrangian plan plus the fill is the optimum
    layers = {k: _svdp_like(6, 6, [2.0 * q ** i for i in range(6)]) for k, q in (("x", 0.5), ("y", 0.8), ("z", 0.3))}
    for budget in (33, 50, 70, 90):
        plan = allocate_ranks(layers, budget, floor=0.0)
        assert plan_loss(layers, plan) == pytest.approx(_brute(layers, budget)[0], rel=1e-9)


def test_the_floor_keeps_a_steep_small_layer_from_starving():
    # a 10-way classifier: few DOF per rank but, measured in units of its own output, a small loss per rank
    layers = {"features": _svdp_like(64, 64, [10.0 / (1 + i) for i in range(64)]),
              "classifier": _svdp_like(10, 64, [0.1] * 10)}
    budget = 2000
    starved = allocate_ranks(layers, budget, floor=0.0)
    assert starved["classifier"] == 1
    uniform = uniform_ranks(layers, budget)
    plan = allocate_ranks(layers, budget, floor=0.5)
    assert plan["classifier"] >= -(-uniform["classifier"] // 2) > 1
    assert plan_dof(layers, plan) <= budget
    assert floor_ranks(layers, budget, 0.5)["classifier"] == -(-uniform["classifier"] // 2)


def test_groups_allocate_within_roles_only():
    names = [f"enc.layer.{i}.{kind}" for i in range(3) for kind in ("q", "ffn")]
    assert role("enc.layer.2.q") == "enc.layer.*.q"
    spectra = {"q": [4, 2, 1, 0.5, 0.25, 0.1], "ffn": [40, 30, 20, 10, 5, 1]}
    layers = {n: _svdp_like(6, 6, [s * (1 + 0.5 * int(n.split(".")[2])) for s in spectra[n.split(".")[-1]]])
              for n in names}
    budget = 150
    plan = allocate_ranks(layers, budget, floor=0.0, groups={n: role(n) for n in names})
    assert plan_dof(layers, plan) <= budget
    for kind in ("q", "ffn"):
        members = {n: c for n, c in layers.items() if n.endswith(kind)}
        # within a role the plan is the best one for the DOF the role spends
        optimum, _ = _brute(members, plan_dof(members, plan))
        assert plan_loss(members, plan) == pytest.approx(optimum, rel=1e-12)
    # compared across roles, the large FFN losses would take the budget from the query layers
    across = allocate_ranks(layers, budget, floor=0.0)
    assert across["enc.layer.0.q"] == 1 < plan["enc.layer.0.q"]
    assert plan["enc.layer.2.ffn"] >= plan["enc.layer.0.ffn"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="below the minimum"):
        allocate_ranks(LAYERS, 10)
    with pytest.raises(ValueError, match="floor must lie in"):
        allocate_ranks(LAYERS, 100, floor=2)
    with pytest.raises(ValueError, match="strictly ascending"):
        RankCandidates((2, 1), (1, 2), (0.0, 0.0))
    with pytest.raises(ValueError, match="groups do not name"):
        allocate_ranks(LAYERS, 100, groups={"a": "x"})
