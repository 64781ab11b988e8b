"""The MiniLM study's own pieces, on small models: the whitened-SVD baseline agrees with the library's SVDP
projection (two independent implementations of the same optimum), uniform ranks are the largest common rank."""
import copy

import pytest
import torch
from torch import nn

from torch_sttp.calibration import calibrate
from torch_sttp.experiments.minilm_calibrated import layer_dof, study_ranks, whitened_svd_baseline
from torch_sttp.data_aware import project_whitened

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([nn.ModuleDict({"a": nn.Linear(16, 24), "b": nn.Linear(24, 16)}) for _ in range(2)])

    def forward(self, x):
        for blk in self.layer:
            x = x + blk["b"](torch.tanh(blk["a"](x)))
        return x


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    return [torch.randn(30, 16, generator=g, dtype=torch.float64) @ mix for _ in range(3)]


@pytest.mark.parametrize("sequential", [False, True])
def test_baseline_factors_equal_the_svdp_projection(sequential):
    torch.manual_seed(0)
    model = Block().double()
    xs = _data()
    ranks = {"layer.0.a": 5, "layer.0.b": 4, "layer.1.a": 6, "layer.1.b": 3}
    ours, base = copy.deepcopy(model), copy.deepcopy(model)
    stats = None if sequential else calibrate(model, xs)
    project_whitened(ours, "svdp", ranks, stats, batches=xs, sequential=sequential)
    errors = whitened_svd_baseline(base, ranks, stats, xs, sequential=sequential)
    for name, r in ranks.items():
        pair = base.get_submodule(name)
        assert isinstance(pair, nn.Sequential) and pair[0].weight.shape == (r, pair[0].in_features)
        torch.testing.assert_close(pair[1].weight @ pair[0].weight, ours.get_submodule(name).weight,
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(pair[1].bias, model.get_submodule(name).bias, rtol=0, atol=0)
        assert errors[name] > 0
    x = xs[0]
    torch.testing.assert_close(base(x), ours(x), rtol=1e-6, atol=1e-7)


def test_uniform_ranks_are_the_largest_common_rank():
    model = Block()
    layers = ["layer.0.a", "layer.0.b", "layer.1.a", "layer.1.b"]
    for method in ("wsvd", "svdp", "sttp"):
        budget = 1500
        ranks = study_ranks(model, layers, method, budget, "uniform")
        assert len(set(ranks.values())) == 1
        r = next(iter(ranks.values()))
        cost = sum(layer_dof(model.get_submodule(n), method, r) for n in layers)
        more = sum(layer_dof(model.get_submodule(n), method, r + 1) for n in layers)
        assert cost <= budget < more
    assert layer_dof(model.layer[0]["a"], "wsvd", 5) == 5 * (24 + 16)


def test_study_plot_draws_the_non_sequential_rows(tmp_path, monkeypatch):
    from torch_sttp.experiments import minilm_calibrated as study
    fields = ["method", "data", "strategy", "sequential", "kept_fraction", "mean_cosine_before", "mean_cosine_after"]
    rows = [["svdp", "aware", "loss", "False", "0.3", "0.7", "0.8"], ["svdp", "aware", "loss", "False", "0.45", "0.8", "0.9"],
            ["sttp", "free", "uniform", "False", "0.45", "0.4", "0.5"], ["svdp", "aware", "loss", "True", "0.45", "0.1", "0.2"]]
    path = tmp_path / "study.csv"
    path.write_text("\n".join(",".join(r) for r in [fields] + rows) + "\n")
    drawn = []
    real_plot = __import__("matplotlib.axes", fromlist=["Axes"]).Axes.plot
    monkeypatch.setattr("matplotlib.axes.Axes.plot", lambda ax, x, y, **kw: drawn.append((kw["label"], x, y))
                        or real_plot(ax, x, y, **kw))
    png = study.plot_study(path, tmp_path / "study.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # two panels × two (method, data, strategy) series; the sequential row is left out
    assert sorted(drawn) == sorted([("sttp free uniform", (0.45,), (0.4,)), ("svdp aware loss", (0.3, 0.45), (0.7, 0.8)),
                                    ("sttp free uniform", (0.45,), (0.5,)), ("svdp aware loss", (0.3, 0.45), (0.8, 0.9))])


def test_loss_strategies_allocate_within_roles_or_across_layers():
    """"loss" compares losses only between layers of one role; "sensitivity" allocates across all layers, so a
    role whose (weighted) losses dominate draws DOF away from the other role."""
    from torch_sttp.allocation import RankCandidates, plan_dof, plan_loss
    layers = ["layer.0.a", "layer.0.b", "layer.1.a", "layer.1.b"]
    ranks = tuple(range(1, 9))
    dof = tuple(40 * r for r in ranks)

    def table(scale):
        return RankCandidates(ranks, dof, tuple(scale * 0.5 ** r for r in ranks))

    cands = {n: table(100.0 if n.endswith(".a") else 1.0) for n in layers}
    model, budget = Block(), 4 * 40 * 4
    within = study_ranks(model, layers, "wsvd", budget, "loss", cands)
    across = study_ranks(model, layers, "wsvd", budget, "sensitivity", cands)
    assert within == {n: 4 for n in layers}  # each role keeps its uniform share
    assert all(across[n] > 4 for n in layers if n.endswith(".a")) and all(across[n] < 4 for n in layers
                                                                           if n.endswith(".b"))
    assert plan_dof(cands, across) <= budget and plan_loss(cands, across) < plan_loss(cands, within)


def test_sensitivity_configurations_are_data_aware_only():
    from torch_sttp.experiments import minilm_calibrated as study
    configs = study.study_configs((0.45,), ("svdp",), ("free", "aware"), study.RANK_STRATEGIES, (False,), (0.45,))
    assert {(c["data"], c["strategy"]) for c in configs} == {("free", "uniform"), ("free", "loss"),
                                                             ("aware", "uniform"), ("aware", "loss"),
                                                             ("aware", "sensitivity")}
