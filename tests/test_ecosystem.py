"""Converted models inside the PyTorch ecosystem: torch.func transforms, autocast, the meta device, safetensors
and transformers' save_pretrained."""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import torch_sttp
from torch_sttp.frames import householder_frame_free

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(seed: int, method: str = "sttp", spectrum: str = "free") -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.Tanh(),
                          nn.Linear(6, 1)).double()
    return torch_sttp.convert(model, method, 3, spectrum=spectrum, init="random",
                              generator=torch.Generator().manual_seed(seed))


# ======================================================================================================= torch.func
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_func_grad_over_functional_call_equals_backward(method):
    model = small_net(0, method, "normalized")
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    params = dict(model.named_parameters())
    g = grad(lambda p: functional_call(model, p, (x,)).square().sum())(params)
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-12, atol=1e-12)


def test_func_vmap_ensemble_equals_loop():
    models = [small_net(seed) for seed in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)
    # and gradients of the ensemble, per member
    per_member = vmap(grad(lambda p, b: functional_call(base, (p, b), (x,)).sum()))(params, buffers)
    for i, m in enumerate(models):
        m.zero_grad()
        m(x).sum().backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(per_member[name][i], p.grad, rtol=1e-10, atol=1e-12)


def test_func_vmap_of_frames_equals_loop():
    blocks = torch.randn(4, 7, 3, dtype=F64)
    batched = vmap(lambda b: householder_frame_free(b, 7))(blocks)
    for b, q in zip(blocks, batched):
        torch.testing.assert_close(q, householder_frame_free(b, 7), rtol=1e-14, atol=1e-14)
