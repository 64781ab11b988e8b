"""More L-BFGS refinement of the whitened STTP projection (the setting the SmallCNN benchmark chooses on
validation) never raises the whitened loss and converges to a stationary point, ``project_whitened(refine_iters=...)``
is the layer projection with that many iterations, and the packed statistics round-trip exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_sttp.calibration import calibrate, pack_symmetric, unpack_symmetric
from torch_sttp.data_aware import project_whitened
from torch_sttp.layers import layout_shape, weight_matrix
from torch_sttp.tt import contract_train, contract_train_from_right, split_modes, tt_ranks, tt_svd
from torch_sttp.whitening import factored_loss, layer_metric, project_layer, refine_train

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_and_stats(seed=0):
    torch.manual_seed(seed)
    layer = nn.Conv2d(6, 8, 3, padding=1, bias=False).double()
    xs = [torch.randn(4, 6, 7, 7, dtype=torch.float64).cumsum(-1) for _ in range(2)]
    return layer, xs, calibrate(layer, xs)


@pytest.mark.parametrize("rank", [2, 4])
def test_more_refinement_iterations_never_raise_the_whitened_loss(rank):
    layer, _, stats = _conv_and_stats()
    metric = layer_metric(stats, "", layer)
    losses = [project_layer(layer, "sttp", rank, metric, refine_iters=k, compare=False).loss for k in (0, 2, 30)]
    assert losses[1] <= losses[0] * (1 + 1e-12) and losses[2] <= losses[1] * (1 + 1e-12)
    assert losses[2] < losses[0] * 0.999  # the refinement does move on correlated inputs
    w = weight_matrix(layer).detach()
    refined = project_layer(layer, "sttp", rank, metric, refine_iters=30, compare=False)
    assert metric.loss(w, weight_matrix(layer, refined.weight)) == pytest.approx(losses[2], rel=1e-8)


def test_project_whitened_passes_the_refinement_iterations_to_each_layer():
    layer, xs, _ = _conv_and_stats(seed=1)
    net = nn.Sequential(layer)
    stats = calibrate(net, xs)
    metric = layer_metric(stats, "0", layer)
    expected = project_layer(layer, "sttp", 3, metric, refine_iters=30)
    fewer = project_layer(layer, "sttp", 3, metric, refine_iters=2)
    result = project_whitened(net, "sttp", 3, stats, refine_iters=30)
    torch.testing.assert_close(net[0].weight.detach(), expected.weight, rtol=0, atol=1e-10)
    assert result.layers["0"].loss == pytest.approx(expected.loss, rel=1e-10)
    assert expected.loss < fewer.loss and not torch.allclose(expected.weight, fewer.weight, atol=1e-8)


def test_refinement_reaches_a_stationary_point_of_the_whitened_loss():
    """Enough L-BFGS iterations drive the gradient of ‖(M − train)·L‖² over the cores to (near) zero, and every
    iteration count gives a loss no higher than fewer iterations."""
    layer, _, stats = _conv_and_stats(seed=2)
    metric = layer_metric(stats, "", layer)
    w = weight_matrix(layer).detach()
    out_modes, in_modes = split_modes(layout_shape(layer), "sttp")
    cores = tt_svd(w.reshape(out_modes + in_modes), tt_ranks(out_modes + in_modes, 3))
    whitener = metric.whitener(out_modes).without_factor()
    split = len(out_modes)
    gram = whitener.gram_apply(w)
    energy = float((w * gram).sum())

    def loss_and_grad(train):
        params = [c.clone().requires_grad_(True) for c in train]
        left = contract_train(params[:split]).reshape(w.shape[0], -1)
        right = contract_train_from_right(params[split:]).reshape(left.shape[1], -1)
        loss = factored_loss(left, right, whitener, gram, energy)
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).norm()

    start_loss, start_grad = loss_and_grad(cores)
    losses = []
    for iters in (1, 5, 300):
        refined = refine_train(cores, w, whitener, split, iters=iters, tolerance=0.0, block=False)
        losses.append(loss_and_grad(refined))
    assert start_loss > losses[0][0] >= losses[1][0] >= losses[2][0]
    assert losses[2][1] < 1e-4 * start_grad


@pytest.mark.parametrize("d", [1, 2, 5, 33])
def test_packed_statistics_round_trip_in_row_major_upper_order(d):
    a = torch.randn(d, d, dtype=torch.float64)
    a = a + a.mT
    packed = pack_symmetric(a)
    rows, cols = torch.triu_indices(d, d)
    assert torch.equal(packed, a[rows, cols])
    assert torch.equal(unpack_symmetric(packed), a)
    with pytest.raises(ValueError, match="triangular number"):
        unpack_symmetric(torch.zeros(d * (d + 1) // 2 + 1, dtype=torch.float64))
