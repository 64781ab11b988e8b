"""Numerical drift: long training keeps the frames orthonormal and the normalized spectrum at σ_max = 1.

A small converted model (a Conv1d and a Linear with STTP, a Linear with SVDP, all with the normalized spectrum,
under 10 000 parameters) is trained in float32 for 10 000 steps on random data — once with SGD at learning rate 0.1,
once with Adam at 1e-3. Householder frames are orthonormal by construction, whatever the reflector parameters, so
nothing should drift: every U and Vᵀ must satisfy max |QᵀQ − I| ≤ 1e-5 and every σ_max(W) must be 1 ± 1e-5 at
checkpoints along the run, even as the parameters themselves wander far from their initial values.
"""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from torch_sttp.surgery import convert, converted_layers, spectral_parametrization

STEPS = 10_000
CHECK_EVERY = 2_000
ORTHO_TOL = 1e-5
SIGMA_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(3, 12, 5), nn.Tanh(), nn.Flatten(), nn.Linear(12 * 8, 30), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(30, 10))

    def forward(self, x):
        return self.head(self.features(x))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    convert(model.features, "sttp", 6, "normalized", "random")
    convert(model.head, "svdp", 6, "normalized", "random")
    return model


def frame_report(model: nn.Module) -> dict[str, tuple[float, float, float]]:
    """Per converted layer: (max |UᵀU − I|, max |VᵀV − I|, |σ_max(W) − 1|), all measured in float64."""
    out = {}
    for name, layer in converted_layers(model):
        p = spectral_parametrization(layer)
        plist = layer.parametrizations.weight
        originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
        with torch.no_grad():
            u, sigma, vt = p.factors(*originals)
            u, vt = u.double(), vt.double()
            eye = torch.eye(u.shape[1], dtype=torch.float64)
            ortho_u = (u.mT @ u - eye).abs().max().item()
            ortho_v = (vt @ vt.mT - eye).abs().max().item()
            w = (u * sigma.double()) @ vt
            sigma_err = abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0)
            assert abs(sigma.abs().max().item() - 1.0) <= SIGMA_TOL, (name, sigma)
            # the materialised weight the layer uses agrees with the factors
            w_layer = layer.weight.double()
            w_layer = (w_layer.transpose(0, 1) if p.transposed else w_layer).reshape(p.d_out, p.d_in)
            assert torch.allclose(w_layer, w, atol=1e-5), name
        out[name] = (ortho_u, ortho_v, sigma_err)
    return out


def reflector_size(model: nn.Module) -> float:
    return max(t.abs().max().item() for n, t in model.named_parameters() if n.endswith(("original0", "original1")))


def train_and_check(optimizer: str, steps: int, check_every: int) -> None:
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params <= 10_000, n_params
    assert len(converted_layers(model)) == 3
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(64, 3, 12, generator=gen)  # a fixed random data set and random targets (memorisation)
    targets = torch.randn(64, 10, generator=gen)
    start_params = [p.detach().clone() for p in model.parameters()]
    worst = {"ortho": 0.0, "sigma": 0.0}
    t0 = time.perf_counter()
    t_cpu = time.process_time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, 64, (4,), generator=gen)
        loss = (model(data[idx]) - targets[idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % check_every == 0:
            assert math.isfinite(loss.item()), f"step {step}: loss {loss.item()}"
            for name, (ou, ov, se) in frame_report(model).items():
                assert max(ou, ov) <= ORTHO_TOL, f"step {step}, {name}: |UᵀU−I| {ou:.2e}, |VᵀV−I| {ov:.2e}"
                assert se <= SIGMA_TOL, f"step {step}, {name}: |σ_max − 1| = {se:.2e}"
                worst["ortho"] = max(worst["ortho"], ou, ov)
                worst["sigma"] = max(worst["sigma"], se)
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(model.parameters(), start_params))
    assert moved > 1e-2, "training did not move the parameters: the check would be vacuous"
    wall, cpu = time.perf_counter() - t0, time.process_time() - t_cpu
    print(f"\n{optimizer}: {steps} steps in {wall:.1f} s ({cpu:.1f} s CPU), {n_params} parameters, "
          f"max |QᵀQ − I| = {worst['ortho']:.2e}, max |σ_max − 1| = {worst['sigma']:.2e}, "
          f"largest parameter change {moved:.3g}, largest reflector entry {reflector_size(model):.3g}")


@pytest.mark.slow  # about 60 s of CPU time per optimizer (≈ 5.5 ms a step, mostly autograd and frame overhead)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_long_training_keeps_frames_orthonormal_and_spectrum_normalized(optimizer):
    train_and_check(optimizer, STEPS, CHECK_EVERY)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_short_training_keeps_frames_orthonormal_and_spectrum_normalized(optimizer):
    """The same checks over 300 steps, for runs that deselect ``slow`` tests."""
    train_and_check(optimizer, 300, 100)
