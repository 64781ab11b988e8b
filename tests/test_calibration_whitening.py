"""Whitened projections: the metric identity, the SVDP optimum, exact loading, STTP never worse than data-free,
row metrics, damping, candidates, errors and restoring the model."""
import copy
import math

import pytest
import torch
from torch import nn

from torch_sttp import conversion
from torch_sttp.calibration import calibrate
from torch_sttp.layers import layout_shape, weight_matrix
from torch_sttp.tt import count_dof, split_modes, tt_ranks
from torch_sttp.data_aware import project_whitened
from torch_sttp.whitening import (
    LayerMetric,
    Whitener,
    layer_metric,
    project_layer,
    truncation_candidates,
    whitened_svd,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix


def _layer_and_stats(d_out=12, d_in=10, n=200, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out).double()
    x = _correlated(n, d_in, seed)
    return layer, x, calibrate(layer, [x[: n // 2], x[n // 2:]])


def test_the_metric_is_the_output_error_on_the_calibration_data():
    layer, x, stats = _layer_and_stats()
    metric = layer_metric(stats, "", layer, damping=0.0)
    w = weight_matrix(layer).detach()
    other = torch.randn_like(w)
    out_err = float((((w - other) @ x.T) ** 2).sum()) / x.shape[0]
    assert metric.loss(w, other) == pytest.approx(out_err, rel=1e-10)
    wh = metric.whitener()
    assert float(((w - other) @ wh.factor).pow(2).sum()) == pytest.approx(out_err, rel=1e-10)
    torch.testing.assert_close(wh.solve(wh.apply(other)), other, rtol=1e-9, atol=1e-12)


def test_svdp_projection_is_the_rank_r_optimum():
    layer, x, stats = _layer_and_stats(seed=1)
    metric = layer_metric(stats, "", layer, damping=0.0)
    w = weight_matrix(layer).detach()
    proj = project_layer(layer, "svdp", 3, metric)
    approx, s = whitened_svd(w, metric.whitener(), 3)
    assert torch.linalg.matrix_rank(proj.weight).item() == 3
    assert proj.loss == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-10)
    assert metric.loss(w, proj.weight) == pytest.approx(proj.loss, rel=1e-9)
    assert proj.loss < proj.data_free_loss
    g = torch.Generator().manual_seed(0)
    # brute force: alternating least squares in the metric from random starts never beats it
    c = metric.gram
    for _ in range(5):
        a = torch.randn(12, 3, generator=g, dtype=torch.float64)
        for _ in range(300):
            b = torch.linalg.solve(a.T @ a, a.T @ w)  # rows of B: min ‖(W − AB)L‖ over B (for fixed A)
            a = w @ c @ b.T @ torch.linalg.inv(b @ c @ b.T)
        assert metric.loss(w, a @ b) >= proj.loss * (1 - 1e-9)
    best = min(metric.loss(w, torch.randn(12, 3, generator=g, dtype=torch.float64)
                           @ torch.randn(3, 10, generator=g, dtype=torch.float64)) for _ in range(50))
    assert best > proj.loss


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_projected_weights_load_exactly_for_the_free_spectrum(method):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 18), nn.Tanh(), nn.Linear(18, 8)).double()
    xs = [_correlated(40, 12, s) for s in range(3)]
    stats = calibrate(model, xs)
    expected = {n: project_layer(dict(model.named_modules())[n], method, 3,
                                 layer_metric(stats, n, dict(model.named_modules())[n])).weight for n in ("0", "2")}
    dense = copy.deepcopy(model)
    result = project_whitened(model, method, 3, stats)
    for n in ("0", "2"):
        layer = dict(model.named_modules())[n]
        torch.testing.assert_close(layer.weight.detach(), expected[n], rtol=0, atol=1e-10)
        w = dict(dense.named_modules())[n].weight.detach()
        assert result.errors[n] == pytest.approx(float((w - expected[n]).norm() / w.norm()), rel=1e-8)
    assert conversion(model).projection_errors == result.errors
    assert conversion(model).options["init"] == "pretrained"


def _unfolding_ranks(w, modes):
    t, out, left = w.reshape(modes), [], 1
    for k in range(len(modes) - 1):
        left *= modes[k]
        out.append(int(torch.linalg.matrix_rank(t.reshape(left, -1), rtol=1e-9)))
    return out


@pytest.mark.parametrize("make,rank", [
    (lambda: nn.Linear(24, 36), 5),
    (lambda: nn.Linear(36, 12), 4),
    (lambda: nn.Conv2d(6, 8, 3, padding=1), 6),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), 5),
])
def test_sttp_is_never_worse_than_data_free_and_keeps_the_train_ranks(make, rank):
    torch.manual_seed(3)
    layer = make().double()
    if isinstance(layer, nn.Linear):
        xs = [_correlated(64, layer.in_features, s) for s in range(2)]
    else:
        xs = [torch.randn(3, layer.in_channels, 7, 7, dtype=torch.float64).cumsum(-1) for _ in range(2)]
    stats = calibrate(layer, xs)
    metric = layer_metric(stats, "", layer)
    proj = project_layer(layer, "sttp", rank, metric, refine_iters=10)
    w = weight_matrix(layer).detach()
    approx = weight_matrix(layer, proj.weight)
    assert proj.loss <= proj.data_free_loss and proj.loss <= proj.tt_svd_loss
    assert proj.loss < proj.data_free_loss * 0.999  # the data helps on correlated inputs
    assert proj.loss >= proj.bound * (1 - 1e-9)  # a train is a rank-R matrix
    assert metric.loss(w, approx) == pytest.approx(proj.loss, rel=1e-8)
    out_modes, in_modes = split_modes(layout_shape(layer), "sttp")
    modes = out_modes + in_modes
    assert all(u <= b for u, b in zip(_unfolding_ranks(approx, modes), tt_ranks(modes, rank)[1:-1]))


def test_embedding_rows_are_weighted_by_token_frequency():
    torch.manual_seed(4)
    emb = nn.Embedding(30, 12).double()
    g = torch.Generator().manual_seed(4)
    ids = [torch.multinomial(torch.logspace(0, -3, 30), 80, replacement=True, generator=g).reshape(8, 10)
           for _ in range(3)]
    stats = calibrate(emb, ids)
    metric = layer_metric(stats, "", emb)
    assert metric.rows
    w = emb.weight.detach()
    freq = stats.moment("")
    torch.testing.assert_close(metric.gram, freq + 1e-3 * freq.mean(), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="use damping > 0"):
        project_layer(emb, "svdp", 3, layer_metric(stats, "", emb, damping=0.0))
    freq = metric.gram
    for method in ("svdp", "sttp"):
        proj = project_layer(emb, method, 3, metric)
        assert metric.loss(w, proj.weight) == pytest.approx(
            float((freq[:, None] * (w - proj.weight) ** 2).sum()), rel=1e-10)
        assert proj.loss <= proj.data_free_loss and proj.loss < 0.999 * proj.data_free_loss
    p = project_layer(emb, "svdp", 3, metric)
    a = torch.randn(30, 3, generator=g, dtype=torch.float64)
    assert metric.loss(w, a @ torch.linalg.lstsq(a, w).solution) >= p.loss


def test_damping_handles_rank_deficient_statistics_and_tends_to_data_free():
    torch.manual_seed(5)
    layer = nn.Linear(16, 10).double()
    stats = calibrate(layer, [torch.randn(5, 16, dtype=torch.float64)])  # rank 5 < 16
    with pytest.raises(ValueError, match="not positive definite: the statistic is singular"):
        Whitener(stats.moment(""))
    proj = project_layer(layer, "svdp", 4, layer_metric(stats, "", layer))
    assert torch.isfinite(proj.weight).all()
    far = project_layer(layer, "svdp", 4, layer_metric(stats, "", layer, damping=1e9)).weight
    w = layer.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(far, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-6)
    data_free = project_layer(layer, "svdp", 4, LayerMetric.identity(16)).weight
    torch.testing.assert_close(data_free, (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-10)


def test_candidates_are_the_measured_losses_and_dof():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 18), nn.Tanh(), nn.Linear(18, 8)).double()
    stats = calibrate(model, [_correlated(50, 12, s) for s in range(2)])
    modules = dict(model.named_modules())
    svdp = truncation_candidates(model, "svdp", stats)
    assert svdp["0"].ranks == tuple(range(1, 13))
    for r in (1, 4, 9):
        m = layer_metric(stats, "0", modules["0"])
        assert svdp["0"].loss[r - 1] == pytest.approx(project_layer(modules["0"], "svdp", r, m).loss, rel=1e-9)
        assert svdp["0"].dof[r - 1] == count_dof((18, 12), "svdp", r, "free")
    assert truncation_candidates(model, "svd", stats)["2"].dof[2] == 3 * (8 + 18)
    sttp = truncation_candidates(model, "sttp", stats, grid=6)
    for r in sttp["2"].ranks[:-1]:
        p = project_layer(modules["2"], "sttp", r, layer_metric(stats, "2", modules["2"]), refine_iters=0)
        assert sttp["2"].loss[sttp["2"].index(r)] == pytest.approx(p.tt_svd_loss, rel=1e-9)
    assert sttp["2"].loss[-1] == pytest.approx(0.0, abs=1e-9)
    rel = truncation_candidates(model, "svdp", stats, normalize=True, weights={"0": 2.0, "2": 1.0})
    w0 = modules["0"].weight.detach()
    energy = layer_metric(stats, "0", modules["0"]).loss(w0, torch.zeros_like(w0))
    assert rel["0"].loss[3] == pytest.approx(2.0 * svdp["0"].loss[3] / energy, rel=1e-9)


def test_sequential_projection_calibrates_on_the_compressed_prefix():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(12, 18), nn.Tanh(), nn.Linear(18, 8)).double()
    xs = [_correlated(40, 12, s) for s in range(3)]
    reference = copy.deepcopy(model)
    result = project_whitened(model, "svdp", 3, batches=xs, sequential=True)
    # layer 2 was fitted on the inputs the projected layer 0 produces
    first = copy.deepcopy(reference)
    first[0].weight.data.copy_(model[0].weight.detach())
    stats = calibrate(first, xs, layers=["2"])
    expected = project_layer(first[2], "svdp", 3, layer_metric(stats, "2", first[2])).weight
    torch.testing.assert_close(model[2].weight.detach(), expected, rtol=0, atol=1e-10)
    assert set(result.whitened_errors) == {"0", "2"}


def test_errors_name_the_fix_and_a_failure_restores_the_dense_weights():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(12, 18), nn.Tanh(), nn.Linear(18, 8)).double()
    stats = calibrate(model, [_correlated(40, 12, 0)], layers=["0"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['2'\] have no calibration statistic"):
        project_whitened(model, "svdp", 3, stats)
    with pytest.raises(ValueError, match="unknown path"):
        project_whitened(model, "svdp", {"0": 3}, stats, path="nowhere")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="needs calibration statistics or batches"):
        project_whitened(model, "svdp", 3)
    with pytest.raises(ValueError, match="is a conv layer but its statistic is of a linear layer"):
        layer_metric(stats, "0", nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match="does not fit its weight matrix"):
        layer_metric(stats, "0", nn.Linear(5, 3))
    assert math.isfinite(project_layer(model[0], "sttp", 2, layer_metric(None, "0", model[0])).loss)


def test_row_block_update_is_the_best_row_side_given_the_column_side():
    from torch_sttp.tt import contract_train, contract_train_from_right
    from torch_sttp.whitening import row_block_update, whitened_train

    layer, x, stats = _layer_and_stats(d_out=24, d_in=36, n=400, seed=5)
    metric = layer_metric(stats, "", layer)
    w = weight_matrix(layer).detach()
    out_modes, in_modes = split_modes(layout_shape(layer), "sttp")
    ranks = tt_ranks(out_modes + in_modes, 5)
    wh, k = metric.whitener(), len(out_modes)
    cores = whitened_train(w, out_modes, in_modes, ranks, wh)
    updated = row_block_update(cores, w, wh, k)
    assert [c.shape for c in updated] == [c.shape for c in cores]  # same train ranks
    a = contract_train(cores[:k]).reshape(-1, ranks[k])
    b = contract_train_from_right(cores[k:]).reshape(ranks[k], -1)
    c = wh.gram
    best = torch.linalg.solve(b @ c @ b.T, (w @ c @ b.T).T).T  # A* over all d_out × R matrices
    loss = lambda a_, b_: wh.loss(w - a_ @ b_)  # noqa: E731
    new_a = contract_train(updated[:k]).reshape(-1, ranks[k])
    new_b = contract_train_from_right(updated[k:]).reshape(ranks[k], -1)
    assert loss(best, b) <= loss(new_a, new_b) * (1 + 1e-9) <= loss(a, b) * (1 + 1e-9)
    assert loss(new_a, new_b) < loss(a, b) * 0.999  # the whitened TT-SVD's row side was not optimal for this B
    # with the row cores able to hold any A (full bonds on the d_out side), one step reaches A* exactly
    full = tt_ranks(out_modes + in_modes, 24)
    cores = whitened_train(w, out_modes, in_modes, [f if i < k else min(f, 5) for i, f in enumerate(full)], wh)
    b = contract_train_from_right(cores[k:]).reshape(cores[k].shape[0], -1)
    best = torch.linalg.solve(b @ c @ b.T, (w @ c @ b.T).T).T
    updated = row_block_update(cores, w, wh, k)
    got = contract_train(updated[:k]).reshape(24, -1) @ contract_train_from_right(updated[k:]).reshape(-1, 36)
    assert wh.loss(w - got) == pytest.approx(wh.loss(w - best @ b), rel=1e-9)


def test_factored_loss_is_the_whitened_loss_with_its_exact_gradient():
    from torch_sttp.whitening import factored_loss

    layer, x, stats = _layer_and_stats(d_out=12, d_in=10, n=300, seed=7)
    wh = layer_metric(stats, "", layer).whitener()
    w = weight_matrix(layer).detach()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    mc, energy = wh.gram_apply(w), wh.loss(w)
    value = factored_loss(a, b, wh, mc, energy)
    explicit = ((w - a @ b) @ wh.factor).square().sum()
    assert float(value) == pytest.approx(float(explicit), rel=1e-12)
    grads = torch.autograd.grad(value, (a, b))
    reference = torch.autograd.grad(explicit, (a, b))
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a_, b_: factored_loss(a_, b_, wh, mc, energy), (a, b))
