"""Data-aware compression around batch norms: input means and covariances, batch-norm re-estimation, the batch-norm
output scales, the output-weighted SVDP optimum, the centred metric with its bias correction."""
import copy

import pytest
import torch
from torch import nn

from torch_sttp.calibration import Calibration, batchnorm_scales, calibrate, paired_statistics, reestimate_batchnorm
from torch_sttp.data_aware import project_whitened
from torch_sttp.layers import weight_matrix
from torch_sttp.whitening import layer_metric, project_layer, truncation_candidates

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → pool → Linear → BatchNorm1d → Linear (the last one feeds no batch
    norm; ``side`` feeds a batch norm only through a ReLU)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6)
        self.fc1, self.bn3 = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.side, self.bn4 = nn.Linear(5, 5), nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h))).mean((2, 3))
        h = torch.relu(self.bn3(self.fc1(h)))
        h = self.bn4(torch.relu(self.side(h)))
        return self.fc2(h)


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net().double()
    for bn in (net.bn1, net.bn2, net.bn3, net.bn4):  # trained-looking, and wrong for the data below
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(3, 2, 7, 7, generator=g, dtype=torch.float64) + 0.5 for _ in range(3)]
    return net, batches


def _moments(x: torch.Tensor):
    """Per-channel mean and unbiased variance of (B, C, ...) values."""
    flat = x.movedim(1, -1).reshape(-1, x.shape[1])
    return flat.mean(0), flat.var(0, unbiased=True)


def test_batchnorm_reestimation_is_the_exact_mean_and_variance_of_the_calibration_data():
    net, batches = _net()
    net.train()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    counts = reestimate_batchnorm(net, batches)
    assert net.training and all(m.training for m in net.modules())  # flags restored
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())  # no parameter moved
    x = torch.cat(batches)
    with torch.no_grad():  # each batch norm on the inputs of the model whose earlier ones are re-estimated
        net.eval()
        h1 = net.conv1(x)
        h2 = net.conv2(torch.relu(net.bn1(h1)))
        h3 = net.fc1(torch.relu(net.bn2(h2)).mean((2, 3)))
        h4 = torch.relu(net.side(torch.relu(net.bn3(h3))))
    for bn, h in ((net.bn1, h1), (net.bn2, h2), (net.bn3, h3), (net.bn4, h4)):
        mean, var = _moments(h)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert counts == {"bn1": 9 * 49, "bn2": 9 * 9, "bn3": 9, "bn4": 9}
    with pytest.raises(ValueError, match="re-iterable"):
        reestimate_batchnorm(net, iter(batches))
    with pytest.raises(ValueError, match="no batch norm"):
        reestimate_batchnorm(nn.Linear(2, 2), [torch.zeros(2, 2)])


def test_batchnorm_scales_are_those_of_the_batch_norm_each_layer_feeds():
    net, batches = _net(1)
    scales = batchnorm_scales(net, batches[0])
    assert set(scales) == {"conv1", "conv2", "fc1"}  # side feeds bn4 through a ReLU; fc2 feeds none
    for name, bn in (("conv1", net.bn1), ("conv2", net.bn2), ("fc1", net.bn3)):
        expected = bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(scales[name], expected, rtol=1e-15, atol=0)
    assert set(batchnorm_scales(net, batches[0], layers=["conv2", "fc2"])) == {"conv2"}


def _weighted_loss(w, approx, g, c):
    e = g[:, None] * (w - approx)
    return float((e @ c * e).sum())


def test_output_scaled_svdp_is_the_optimum_of_the_weighted_output_error():
    torch.manual_seed(2)
    layer = nn.Linear(8, 9).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen,
                                                                               dtype=torch.float64)
    stats = calibrate(layer, [x])
    g = torch.rand(9, generator=gen, dtype=torch.float64) * 3 + 0.05
    g[2] = -g[2]  # a negative γ weighs like |γ|
    w, c = weight_matrix(layer).detach(), x.T @ x / len(x)
    metric = layer_metric(stats, "", layer, damping=0.0, output_scale=g)
    proj = project_layer(layer, "svdp", 3, metric)
    # the optimum over all rank-3 matrices: Eckart–Young on diag(|g|)·W·L, attained by Ŵ
    s = torch.linalg.svdvals(g.abs()[:, None] * w @ torch.linalg.cholesky(c))
    bound = float((s[3:] ** 2).sum())
    assert torch.linalg.matrix_rank(proj.weight).item() == 3
    assert _weighted_loss(w, proj.weight, g, c) == pytest.approx(bound, rel=1e-9)
    assert proj.loss == pytest.approx(bound, rel=1e-9) and metric.loss(w, proj.weight) == pytest.approx(bound, 1e-9)
    plain = project_layer(layer, "svdp", 3, layer_metric(stats, "", layer, damping=0.0)).weight
    assert _weighted_loss(w, plain, g, c) > bound * 1.01  # the unweighted optimum is not the weighted one
    for _ in range(4):  # brute force: alternating least squares in the weighted metric never beats it
        a = torch.randn(9, 3, generator=gen, dtype=torch.float64)
        for _ in range(200):
            g2a = g[:, None] ** 2 * a
            b = torch.linalg.solve(a.T @ g2a, g2a.T @ w)
            a = w @ c @ b.T @ torch.linalg.inv(b @ c @ b.T)
        assert _weighted_loss(w, a @ b, g, c) >= bound * (1 - 1e-9)
    # through the model-level projection: the converted layer's weight is this optimum
    model = nn.Sequential(copy.deepcopy(layer))
    project_whitened(model, "svdp", 3, calibrate(model, [x]), damping=0.0, output_scales={"0": g})
    torch.testing.assert_close(weight_matrix(model[0]).detach(), proj.weight, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="sttp.*output_scale"):
        project_layer(layer, "sttp", 3, metric)
    with pytest.raises(ValueError, match="output_scale needs 9"):
        layer_metric(stats, "", layer, output_scale=torch.ones(4))
    fresh = nn.Sequential(copy.deepcopy(layer))
    cands = truncation_candidates(fresh, "svdp", calibrate(fresh, [x]), damping=0.0, output_scales={"0": g})
    assert cands["0"].loss[2] == pytest.approx(bound, rel=1e-9)


def test_centred_metric_keeps_the_output_mean_through_the_bias():
    torch.manual_seed(3)
    layer = nn.Linear(6, 7).double()
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(50, 6, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, 6, dtype=torch.float64)
          + torch.linspace(-3, 3, 6, dtype=torch.float64) for _ in range(2)]
    x = torch.cat(xs)
    model = nn.Sequential(copy.deepcopy(layer))
    stats = calibrate(model, xs, means=True)
    torch.testing.assert_close(stats.mean("0"), x.mean(0), rtol=1e-12, atol=1e-13)
    cov = torch.cov(x.T, correction=0)
    torch.testing.assert_close(stats.covariance("0"), cov, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(layer_metric(stats, "0", model[0], damping=0.0, centered=True).gram, cov,
                               rtol=1e-11, atol=1e-12)
    dense_out = layer(x).detach()
    result = project_whitened(model, "svdp", 2, stats, damping=0.0, centered=True)
    assert result.bias_corrected == ["0"]
    out = model(x).detach()
    torch.testing.assert_close(out.mean(0), dense_out.mean(0), rtol=1e-10, atol=1e-10)  # the mean is exact
    s = torch.linalg.svdvals(weight_matrix(layer).detach() @ torch.linalg.cholesky(cov))
    centred = out - dense_out  # its mean is zero: what is left is the centred error, at its rank-2 optimum
    assert float((centred ** 2).sum()) / len(x) == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-9)
    plain = nn.Sequential(copy.deepcopy(layer))
    project_whitened(plain, "svdp", 2, stats, damping=0.0)
    assert float(((plain(x).detach() - dense_out) ** 2).sum()) > float((centred ** 2).sum())
    fresh = nn.Sequential(copy.deepcopy(layer))
    with pytest.raises(ValueError, match="means=True"):
        project_whitened(fresh, "svdp", 2, calibrate(fresh, xs), centered=True)
    torch.testing.assert_close(fresh[0].weight, layer.weight, rtol=0, atol=0)  # restored: nothing changed


def test_means_are_saved_and_loaded_bit_exactly(tmp_path):
    net, batches = _net(4)
    stats = calibrate(net, batches, means=True)
    plain = calibrate(net, batches)
    assert stats.has_means and not plain.has_means
    assert stats.nbytes == plain.nbytes + 8 * sum(stats.mean(n).numel() for n in stats.names)
    stats.save(tmp_path / "s.safetensors")
    back = Calibration.load(tmp_path / "s.safetensors")
    assert back.names == stats.names
    for n in stats.names:
        assert torch.equal(back.mean(n), stats.mean(n)) and torch.equal(back.total(n), stats.total(n))
    plain.save(tmp_path / "p.safetensors")
    assert not Calibration.load(tmp_path / "p.safetensors").has_means


def _mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(60, 6, generator=gen, dtype=torch.float64) + 1.0 for _ in range(2)]
    return model, xs


def test_paired_statistics_are_the_cross_moments_of_the_two_models():
    model, xs = _mlp(5)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(0.7)
    paired = paired_statistics(model, other, xs, ["2"])
    x = torch.cat(xs)
    ref, own = torch.tanh(model[0](x)).detach(), torch.tanh(other[0](x)).detach()
    n = len(x)
    torch.testing.assert_close(paired.cross_moment("2"), ref.T @ own / n, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(paired.model.moment("2"), own.T @ own / n, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(paired.reference_mean("2"), ref.mean(0), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(paired.cross_covariance("2"), (ref - ref.mean(0)).T @ (own - own.mean(0)) / n,
                               rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="embedding"):
        paired_statistics(nn.Embedding(3, 2), nn.Embedding(3, 2), [torch.tensor([1, 2])], [""])


@pytest.mark.parametrize("centered", [False, True])
def test_compensated_sequential_projection_fits_the_dense_outputs_optimally(centered):
    model, xs = _mlp(6)
    dense = copy.deepcopy(model)
    x = torch.cat(xs)
    result = project_whitened(model, "svdp", {"0": 2, "2": 3}, batches=xs, sequential=True, compensate=True,
                              centered=centered, damping=0.0)
    with torch.no_grad():
        target = dense(x)                            # W·X (+ b) of the last layer: the dense model's output
        inputs = torch.tanh(model[0](x))             # X̂: what the last layer now gets
        out = model(x)
    # reference optimum: the least-squares W' (with an intercept when centred), then Eckart–Young on W'·X̂
    if centered:
        mean_in, mean_out = inputs.mean(0), target.mean(0)
        a, b = inputs - mean_in, target - mean_out
    else:
        a, b = inputs, target - dense[2].bias.detach()
    w_ls = torch.linalg.lstsq(a, b).solution.T       # (5 × 8): min ‖b − a·Wᵀ‖
    s = torch.linalg.svdvals(w_ls @ a.T)
    best = float(((b - a @ w_ls.T) ** 2).sum() + (s[3:] ** 2).sum())
    got = out - mean_out if centered else out - dense[2].bias.detach()
    assert float(((b - got) ** 2).sum()) == pytest.approx(best, rel=1e-8)
    assert torch.linalg.matrix_rank(weight_matrix(model[2]).detach()).item() == 3
    if centered:
        assert result.bias_corrected == ["0", "2"]
        torch.testing.assert_close(out.mean(0), target.mean(0), rtol=1e-10, atol=1e-10)  # the output mean is exact
    plain = copy.deepcopy(dense)
    project_whitened(plain, "svdp", {"0": 2, "2": 3}, batches=xs, sequential=True, centered=centered, damping=0.0)
    with torch.no_grad():
        assert float(((plain(x) - target) ** 2).sum()) > float(((out - target) ** 2).sum())


def test_sequential_batchnorm_reestimation_and_restoring_on_an_error():
    net, batches = _net(7)
    layers = {"conv2": 2, "fc1": 2}
    project_whitened(net, "svdp", layers, batches=batches, sequential=True, compensate=True, batchnorm=True,
                     centered=True)
    stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    reestimate_batchnorm(net, batches)  # already the exact statistics of the final model: nothing moves
    for k, v in net.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, stats[k], rtol=1e-9, atol=1e-11)
    fresh, _ = _net(7)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="unknown path"):
        project_whitened(fresh, "svdp", layers, batches=batches, sequential=True, compensate=True, batchnorm=True,
                         centered=True, path="nowhere")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # weights, biases, BN restored
    with pytest.raises(ValueError, match="sequential=True"):
        project_whitened(fresh, "svdp", layers, batches=batches, compensate=True)
