"""More L-BFGS refinement of the whitened STTP projection (the setting the SmallCNN benchmark chooses on
validation) never raises the whitened loss, and ``project_whitened(refine_iters=...)`` is the layer projection
with that many iterations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_sttp.calibration import calibrate
from torch_sttp.data_aware import project_whitened
from torch_sttp.layers import weight_matrix
from torch_sttp.whitening import layer_metric, project_layer

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
