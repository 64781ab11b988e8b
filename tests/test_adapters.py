"""Adapters (:mod:`torch_sttp.adapters`): exactness at init, equality with a dense reference W', orthogonality,
gradients, the lifecycle (merge, unload, disable, named adapters, files), bad input, batching through the planners,
torch.compile, activation checkpointing, bf16 autocast and the offline MiniLM."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_sttp
from torch_sttp import frames, weight_path
from test_adapters_frames import dense_product  # noqa: E402  (tests/ is on the path under pytest)
from torch_sttp.adapters import (
    AdapterLayer,
    RotationUpdate,
    SpectralUpdate,
    adapter_info,
    adapter_layers,
    adapter_names,
    adapter_record,
    active_adapter,
    delete_adapter,
    read_adapter_config,
)
from torch_sttp.adapters.ops import rotated_linear

F64 = torch.float64
KINDS = ["principal", "delta", "rotation"]
METHODS = ["svdp", "sttp"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def hf_conv1d(nf, nx):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


# (layer factory, input factory): every layer type, odd kernels, strides, paddings, dilation, groups
CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda g, dt: torch.randn(4, 6, generator=g, dtype=dt)),
    "linear_3d_input_no_bias": (lambda: nn.Linear(8, 3, bias=False),
                                lambda g, dt: torch.randn(2, 3, 8, generator=g, dtype=dt)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2),
               lambda g, dt: torch.randn(2, 3, 11, generator=g, dtype=dt)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 4, (2, 3), padding=(1, 2), dilation=(1, 2), padding_mode="reflect"),
                       lambda g, dt: torch.randn(2, 3, 6, 7, generator=g, dtype=dt)),
    "conv2d_same_replicate": (lambda: nn.Conv2d(2, 4, 3, padding="same", dilation=2, padding_mode="replicate"),
                              lambda g, dt: torch.randn(2, 2, 7, 6, generator=g, dtype=dt)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2, bias=False),
                      lambda g, dt: torch.randn(2, 4, 7, 7, generator=g, dtype=dt)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (1, 2, 2), stride=(1, 2, 1)),
               lambda g, dt: torch.randn(2, 2, 3, 5, 4, generator=g, dtype=dt)),
    "embedding": (lambda: nn.Embedding(9, 6, padding_idx=0),
                  lambda g, dt: torch.tensor([[0, 3, 8, 1], [2, 0, 5, 5]])),
    "hf_conv1d": (lambda: hf_conv1d(5, 6), lambda g, dt: torch.randn(2, 3, 6, generator=g, dtype=dt)),
}


def make(case, dtype=F64, seed=0):
    torch.manual_seed(seed)
    layer_fn, x_fn = CASES[case]
    model = nn.Sequential(layer_fn()).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen(seed + 1), dtype=dtype))
    return model, x_fn(gen(seed + 2), dtype)


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def perturb_adapters(model, scale=0.3, seed=7):
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def to_matrix(layer, w):
    return w.T if type(layer).__name__ == "Conv1D" else w.reshape(w.shape[0], -1)


def from_matrix(layer, m):
    return m.T if type(layer).__name__ == "Conv1D" else m.reshape(layer.weight.shape)


def reference_weight(wrapper: AdapterLayer, name="default"):
    """W' by hand: W + U·diag(s)·Vᵀ (− U₀·diag(s₀)·V₀ᵀ), or H_out·W·H with H formed as a dense product."""
    base, adapter = wrapper.base_layer, wrapper.adapters[name]
    m = to_matrix(base, base.weight.detach())
    if isinstance(adapter, RotationUpdate):
        m = m @ dense_product(adapter.reflectors_in.detach())
        if adapter.reflectors_out is not None:
            m = dense_product(adapter.reflectors_out.detach()) @ m
    else:
        u, s, vt = adapter.parametrization.factors(*[t.detach() for t in adapter.planner_tensors()])
        m = m + (u * s) @ vt
        if adapter.kind == "principal":
            m = m - (adapter.initial_u * adapter.initial_spectrum) @ adapter.initial_vt
    w = from_matrix(base, m)
    if isinstance(base, nn.Embedding) and base.padding_idx is not None:
        w = w.clone()
        w[base.padding_idx] = base.weight[base.padding_idx]
    return w


def reference_output(wrapper, x, name="default"):
    plain = copy.deepcopy(wrapper.base_layer)
    with torch.no_grad():
        plain.weight.copy_(reference_weight(wrapper, name))
    return plain(x)


# ============================================================================================ exactness at init
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_outputs_equal_the_pretrained_model_at_init(case, kind, dtype, tol):
    for method in METHODS if kind != "rotation" else ["svdp"]:
        model, x = make(case, dtype)
        expected = model(x)
        torch_sttp.add_adapters(model, kind, method, rank=4, two_sided=kind == "rotation")
        assert isinstance(model[0], AdapterLayer)
        out = model(x)
        assert rel(out, expected) <= tol, (method, rel(out, expected))
        if kind != "rotation":  # the update's factors are exactly zero at init
            assert torch.equal(out, expected)


# ==================================================================================== dense reference W'
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind, method", [("principal", "svdp"), ("principal", "sttp"), ("delta", "svdp"),
                                          ("delta", "sttp"), ("rotation", "svdp")])
def test_adapted_layer_equals_dense_reference(case, kind, method):
    model, x = make(case)
    torch_sttp.add_adapters(model, kind, method, rank=4, two_sided=kind == "rotation")
    perturb_adapters(model)
    wrapper = model[0]
    expected = reference_output(wrapper, x)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(wrapper.adapted_weight("default"), reference_weight(wrapper), rtol=1e-10,
                                   atol=1e-10)


def dense_rotated_output(wrapper, x, ys):
    """x·(H_out·W·H)ᵀ + b with every H a dense product of the reflectors ``ys`` (differentiable in x and ys)."""
    base = wrapper.base_layer
    m = to_matrix(base, base.weight.detach()) @ dense_product(ys[0])
    if len(ys) > 1:
        m = dense_product(ys[1]) @ m
    return x @ m.T + (0 if base.bias is None else base.bias.detach())


@pytest.mark.parametrize("case", ["linear", "linear_3d_input_no_bias", "hf_conv1d"])
@pytest.mark.parametrize("two_sided", [False, True])
def test_rotation_input_and_weight_paths_agree(case, two_sided):
    """The three paths of a Linear / Conv1D rotation: outputs and gradients (x and every Y) equal, and equal to
    x·(H_out·W·H)ᵀ + b with dense H (fp64)."""
    model, x = make(case)
    torch_sttp.add_adapters(model, "rotation", rank=4, two_sided=two_sided)
    perturb_adapters(model)
    wrapper = model[0]
    x.requires_grad_(True)
    ys = wrapper.adapters["default"].reflectors()
    probe = torch.randn(dense_rotated_output(wrapper, x, ys).shape, generator=gen(5), dtype=F64)
    expected = torch.autograd.grad((dense_rotated_output(wrapper, x, ys) * probe).sum(), (x, *ys))
    outs = {}
    for path in ("input", "lowrank", "weight"):
        wrapper.path = path
        outs[path] = model(x)
        assert wrapper.last_path == path
        for got, want in zip(torch.autograd.grad((outs[path] * probe).sum(), (x, *ys)), expected):
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(outs["input"], outs["weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs["lowrank"], outs["weight"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs["input"], reference_output(wrapper, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown rotation path 'cols'"):
        wrapper.path = "cols"


def test_rotated_linear_equals_the_dense_product_and_passes_gradcheck():
    g = gen(11)
    x = torch.randn(2, 5, 7, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(4, 7, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(7, 3, generator=g, dtype=F64, requires_grad=True)
    t = frames.householder_t(y.detach()).requires_grad_()
    h = torch.eye(7, dtype=F64) - y @ t @ y.T
    ops = (x, w, b, y, t)
    probe = torch.randn(2, 5, 4, generator=g, dtype=F64)
    expected = x @ (w @ h).T + b
    torch.testing.assert_close(rotated_linear(*ops), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(rotated_linear(x, w, None, y, t), expected - b, rtol=0, atol=1e-13)
    torch.testing.assert_close(rotated_linear(x, w, b, y, frames.householder_t(y)), x @ (w @ dense_product(y)).T + b,
                               rtol=0, atol=1e-13)
    for got, want in zip(torch.autograd.grad((rotated_linear(*ops) * probe).sum(), ops),
                         torch.autograd.grad((expected * probe).sum(), ops)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(rotated_linear, ops)
    assert torch.autograd.gradgradcheck(rotated_linear, ops)
    assert torch.autograd.gradcheck(lambda a, c: rotated_linear(a, w.detach(), None, c, frames.householder_t(c)),
                                    (x, y))
    with pytest.raises(ValueError, match=r"rotated_linear: x \(2, 5, 7\), weight \(4, 6\)"):
        rotated_linear(x, w[:, :6], b, y, t)


class RowProducts(TorchDispatchMode):
    """(operator, output shape) of every matrix product with an operand that has ``rows`` rows or columns."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.calls = rows, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "bmm", "matmul", "linear") and any(
                isinstance(a, torch.Tensor) and self.rows in a.shape for a in args):
            self.calls.append((name, tuple(out.shape)))
        return out


@pytest.mark.parametrize("x_grad", [False, True])
def test_rotation_lowrank_path_operator_counts(x_grad):
    model = nn.Sequential(nn.Linear(12, 5)).to(F64)  # d_in 12, d_out 5, rank 4, 7 rows
    torch_sttp.add_adapters(model, "rotation", rank=4)
    model[0].path = "lowrank"
    x = torch.randn(7, 12, dtype=F64, requires_grad=x_grad)
    model(x).sum().backward()  # warm-up
    with RowProducts(7) as products:
        model(x).sum().backward()
    forward = [("mm", (7, 4)), ("mm", (7, 4)), ("addmm", (7, 5)), ("addmm_", (7, 5))]  # P, C = P·Tᵀ, x·Wᵀ + b, − C·Qᵀ
    backward = [("mm", (7, 4)), ("mm", (7, 4)), ("mm", (5, 4))]  # G·Q, A = (G·Q)·T, Gᵀ·C
    backward += [("mm", (7, 12)), ("addmm_", (7, 12))] if x_grad else []  # ∂x = G·W − A·Yᵀ, only when asked for
    backward += [("mm", (12, 4)), ("mm", (4, 4))]  # xᵀ·A (then + Wᵀ·(Gᵀ·C) in place), (G·Q)ᵀ·P
    assert products.calls == forward + backward
    assert model[0].last_path == "lowrank"


def test_rotation_auto_path_follows_the_costs():
    model = nn.Sequential(nn.Linear(64, 16))
    torch_sttp.add_adapters(model, "rotation", rank=8)
    model(torch.randn(4, 64, requires_grad=True))
    assert model[0].last_path == "input"  # training: the weight path would also form a dense gradient of W'
    model(torch.randn(4, 64))
    assert model[0].last_path == "lowrank"  # an input without gradient: no G·W at all on the low-rank path
    square = nn.Sequential(nn.Linear(64, 64))
    torch_sttp.add_adapters(square, "rotation", rank=8)
    square(torch.randn(256, 16, 64, requires_grad=True))
    assert square[0].last_path == "lowrank"  # many rows: no new (rows, 64) tensors for x·Hᵀ and its gradient
    with torch.no_grad():
        model(torch.randn(512, 64))
    assert model[0].last_path == "weight"  # inference with many rows: rotating the 16 × 64 weight is cheaper


def test_rotation_keeps_singular_values_and_is_orthogonal():
    model, x = make("conv2d_reflect")
    torch_sttp.add_adapters(model, "rotation", rank=6, two_sided=True)
    perturb_adapters(model, scale=1.0)
    wrapper = model[0]
    w = to_matrix(wrapper.base_layer, wrapper.base_layer.weight.detach())
    w_new = to_matrix(wrapper.base_layer, wrapper.adapted_weight("default").detach())
    torch.testing.assert_close(torch.linalg.svdvals(w_new), torch.linalg.svdvals(w), rtol=0, atol=1e-12)
    for y in wrapper.adapters["default"].reflectors():
        h = frames.apply_householder(torch.eye(y.shape[0], dtype=F64), y.detach())
        torch.testing.assert_close(h.T @ h, torch.eye(y.shape[0], dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["principal", "delta"])
def test_frames_are_orthonormal_float32(method, kind):
    model, x = make("conv2d_reflect", torch.float32)
    torch_sttp.add_adapters(model, kind, method, rank=5)
    perturb_adapters(model, scale=1.0)
    adapter = model[0].adapters["default"]
    u, _, vt = adapter.parametrization.factors(*adapter.planner_tensors())
    r = u.shape[1]
    torch.testing.assert_close(u.T @ u, torch.eye(r), rtol=0, atol=1e-6)
    torch.testing.assert_close(vt @ vt.T, torch.eye(r), rtol=0, atol=1e-6)


def test_principal_projects_the_pretrained_weight():
    # SVDP: U₀Σ₀V₀ᵀ is the best rank-r approximation of W (the top singular values); W_res holds the rest
    model, _ = make("linear")
    w = model[0].weight.detach().clone()
    torch_sttp.add_adapters(model, "principal", "svdp", rank=3)
    adapter = model[0].adapters["default"]
    top = (adapter.initial_u * adapter.initial_spectrum) @ adapter.initial_vt
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(top, (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-12)
    torch.testing.assert_close(adapter.spectrum.detach().abs().sort(descending=True).values, s[:3], rtol=0,
                               atol=1e-12)


def test_delta_starts_with_random_orthonormal_frames_and_zero_spectrum():
    model, _ = make("linear")
    torch_sttp.add_adapters(model, "delta", rank=3, seed=5)
    adapter = model[0].adapters["default"]
    assert torch.equal(adapter.spectrum.detach(), torch.zeros(3, dtype=F64))
    u, _, vt = adapter.parametrization.factors(*adapter.planner_tensors())
    assert u.abs().min() > 0 and vt.abs().min() > 0  # not a truncated identity
    other, _ = make("linear")
    torch_sttp.add_adapters(other, "delta", rank=3, seed=5)
    assert torch.equal(other[0].adapters["default"].u_reflectors, adapter.u_reflectors)  # seeded


# ============================================================================================= gradients
@pytest.mark.parametrize("case", ["linear", "conv2d_groups", "conv1d", "embedding", "hf_conv1d"])
@pytest.mark.parametrize("kind, method", [("principal", "svdp"), ("principal", "sttp"), ("delta", "svdp"),
                                          ("delta", "sttp"), ("rotation", "svdp")])
def test_every_adapter_parameter_gets_a_gradient_within_two_steps(case, kind, method):
    model, x = make(case)
    torch_sttp.add_adapters(model, kind, method, rank=4, two_sided=kind == "rotation")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".adapters.default." in n for n in params)
    target = torch.randn(model(x).shape, generator=gen(9), dtype=F64)
    opt = torch.optim.SGD(params.values(), lr=0.05)
    seen = {n: False for n in params}
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        for n, p in params.items():
            # entries that never move W (ignored upper triangles of full frames) may stay at zero gradient
            seen[n] |= bool(p.grad is not None and p.grad.abs().max() > 0)
        opt.step()
    assert all(seen.values()), [n for n, v in seen.items() if not v]
    if kind == "delta":  # s = 0: the frames get their first gradient only at step 2
        assert torch.count_nonzero(model[0].adapters["default"].spectrum.detach()) > 0


def test_only_adapters_and_trainable_modules_train():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    model[1].weight.requires_grad_(False)
    flags_before = [p.requires_grad for p in model.parameters()]
    assert flags_before.count(False) == 1
    torch_sttp.add_adapters(model, "delta", target="0", trainable=["2"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.adapters.default.spectrum", "0.adapters.default.u_reflectors",
                         "0.adapters.default.v_reflectors", "2.copies.default.bias", "2.copies.default.weight"]
    counts = torch_sttp.parameter_counts(model)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch_sttp.unload_adapters(model)
    assert [p.requires_grad for p in model.parameters()] == flags_before


# ============================================================================================= lifecycle
@pytest.mark.parametrize("case", ["linear", "conv2d_same_replicate", "conv2d_groups", "embedding", "hf_conv1d"])
@pytest.mark.parametrize("kind, method", [("principal", "sttp"), ("delta", "svdp"), ("rotation", "svdp")])
def test_merge_float32_and_unload_bit_exact(case, kind, method):
    model, x = make(case, torch.float32)
    base_out = model(x)
    originals = [(type(m), m.weight, m.weight.detach().clone()) for m in model]
    torch_sttp.add_adapters(model, kind, method, rank=4, two_sided=kind == "rotation")
    perturb_adapters(model, scale=0.2)
    adapted = model(x)
    assert rel(adapted, base_out) > 1e-3
    merged = torch_sttp.merge_adapters(copy.deepcopy(model))
    assert type(merged[0]) is originals[0][0] and adapter_record(merged) is None
    assert rel(merged(x), adapted) <= 1e-6
    record = adapter_record(model)
    torch_sttp.unload_adapters(model)
    assert type(model[0]) is originals[0][0] and model[0].weight is originals[0][1]
    assert torch.equal(model[0].weight, originals[0][2])
    computations = (record.frame_planner.computations, record.reflector_planner.computations)
    assert torch.equal(model(x), base_out)
    assert adapter_record(model) is None  # and the root hooks are gone: no planner runs any more
    assert (record.frame_planner.computations, record.reflector_planner.computations) == computations


def test_merge_leaves_the_pretrained_tensor_alone_and_restores_flags():
    model, x = make("linear")
    weight = model[0].weight
    snapshot = weight.detach().clone()
    torch_sttp.add_adapters(model, "rotation", rank=2)
    perturb_adapters(model)
    torch_sttp.merge_adapters(model)
    assert model[0].weight is not weight and torch.equal(weight, snapshot)
    assert model[0].weight.requires_grad and model[0].bias.requires_grad


def test_adapters_disabled_gives_base_outputs():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 6, dtype=F64)
    base = model(x)
    torch_sttp.add_adapters(model, "delta", target="0", trainable="2")
    perturb_adapters(model)
    adapted = model(x)
    with torch_sttp.adapters_disabled(model):
        assert torch.equal(model(x), base)
        with torch_sttp.adapters_disabled(model):
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), adapted)


def test_several_named_adapters():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    x = torch.randn(4, 6, dtype=F64)
    torch_sttp.add_adapters(model, "principal", "sttp", rank=3, name="a", target=["0", "2"])
    perturb_adapters(model, seed=1)
    out_a = model(x)
    with pytest.raises(ValueError, match="module '2' holds adapter layers"):
        torch_sttp.add_adapters(model, "rotation", rank=2, name="b", target="4", trainable="2")
    torch_sttp.add_adapters(model, "rotation", rank=2, name="b", target="2", trainable="4")
    assert active_adapter(model) == "b" and adapter_names(model) == ["a", "b"]
    perturb_adapters(model, seed=2)
    out_b = model(x)
    hidden = torch.tanh(model[2](torch.tanh(model[0](x))))
    ref_b = model[4].copies["b"](torch.tanh(reference_output(model[2], torch.tanh(model[0](x)), "b")))
    torch.testing.assert_close(out_b, ref_b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(model[4].copies["b"](hidden), model[4].original(hidden))
    a_params = [p for n, p in model.named_parameters() if ".a." in n]
    assert len(a_params) == 6 and not any(p.requires_grad for p in a_params)
    torch_sttp.set_active_adapter(model, "a")
    assert torch.equal(model(x), out_a) and all(p.requires_grad for p in a_params)
    torch_sttp.set_active_adapter(model, "b")
    torch.testing.assert_close(model(x), out_b, rtol=0, atol=0)
    merged = torch_sttp.merge_adapters(copy.deepcopy(model), "a")
    assert rel(merged(x), out_a) <= 1e-12
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"] and active_adapter(model) == "a"
    assert isinstance(model[4], nn.Linear) and list(model[2].adapters) == ["a"]
    assert torch.equal(model(x), out_a)
    with pytest.raises(ValueError, match=r"no adapter named 'c'; the model has \['a'\]"):
        torch_sttp.set_active_adapter(model, "c")


def test_deepcopy_gets_its_own_record_and_planners():
    model, x = make("linear")
    torch_sttp.add_adapters(model, "principal", rank=3)
    twin = copy.deepcopy(model)
    mine, theirs = adapter_record(model), adapter_record(twin)
    assert theirs is not mine and theirs.frame_planner is not mine.frame_planner
    assert twin[0].frame_planner is theirs.frame_planner
    assert theirs.frame_planner.layers[0] is twin[0].adapters["default"]
    perturb_adapters(twin)
    assert not torch.equal(twin(x), model(x))
    torch.testing.assert_close(twin(x), reference_output(twin[0], x), rtol=1e-12, atol=1e-12)


# ================================================================================================= files
@pytest.mark.parametrize("kind, method", [("principal", "sttp"), ("delta", "svdp"), ("rotation", "svdp")])
def test_save_and_load_round_trip_bit_exact(kind, method, tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 9, 5), nn.Linear(5, 3))

    model = build()
    x = torch.randn(2, 2, 5, 5)
    torch_sttp.add_adapters(model, kind, method, rank=4, target=["0", "2"], trainable="3", name="task",
                            two_sided=kind == "rotation")
    perturb_adapters(model)
    expected = model(x)
    state = torch_sttp.adapter_state_dict(model)
    assert all(k.split(".")[0] in ("0", "2", "3") for k in state)
    assert not any(k.endswith("base_layer.weight") or ".original." in k for k in state)
    torch_sttp.save_adapters(model, tmp_path / "adapter")
    config = read_adapter_config(tmp_path / "adapter")
    assert config["kind"] == kind and set(config["layers"]) == {"0", "2"} and config["trainable"] == ["3"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["layers"]["0"]["weight_shape"] == [
        4, 2, 3, 3]
    fresh = build()
    torch_sttp.load_adapters(fresh, tmp_path / "adapter")
    assert active_adapter(fresh) == "task"
    assert torch.equal(fresh(x), expected)
    loaded = torch_sttp.adapter_state_dict(fresh)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch_sttp.load_adapters(fresh, tmp_path / "adapter", name="again")
    assert adapter_names(fresh) == ["task", "again"] and torch.equal(fresh(x), expected)


def test_load_checks_the_config_against_the_model(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    torch_sttp.add_adapters(model, "delta", rank=2)
    torch_sttp.save_adapters(model, tmp_path)
    other = nn.Sequential(nn.Linear(6, 4), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"layer '1': the saved adapter was made for a Linear with weight shape "
                                         r"\(3, 4\), but the model has a Linear with weight shape \(3, 5\)"):
        torch_sttp.load_adapters(other, tmp_path)
    assert adapter_record(other) is None and isinstance(other[0], nn.Linear)
    with pytest.raises(ValueError, match="layer '1' of the saved adapter is not in the model"):
        torch_sttp.load_adapters(nn.Sequential(nn.Linear(6, 4)), tmp_path)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        torch_sttp.load_adapters(model, tmp_path)


def test_load_names_a_tensor_shape_mismatch_and_leaves_the_model_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    torch_sttp.add_adapters(model, "delta", rank=2)
    torch_sttp.save_adapters(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["1.spectrum"] = torch.zeros(5)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    fresh = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"layer '1': tensor 'spectrum' has shape \(5,\) in the file but \(2,\)"):
        torch_sttp.load_adapters(fresh, tmp_path)
    assert adapter_record(fresh) is None and isinstance(fresh[1], nn.Linear)


# ============================================================================================= bad input
def test_rank_above_the_dims_is_clamped_and_reported():
    model = nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 40))
    torch_sttp.add_adapters(model, "delta", rank=5)
    info = adapter_info(model)
    assert info.clamped == [("0", 5, 3), ("1", 5, 3)]
    assert info.layers["0"].rank == 3 and model[0].adapters["default"].rank == 3
    rot = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    torch_sttp.add_adapters(rot, "rotation", rank=8)
    assert adapter_info(rot).clamped == [("0", 8, 4), ("1", 8, 2)]


def test_target_matching_nothing_lists_candidates():
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Conv1d(1, 2, 3))
    with pytest.raises(ValueError, match=r"target pattern 'query' matches no module; the layers that can carry "
                                         r"adapters are \['0', '2'\]"):
        torch_sttp.add_adapters(model, "delta", target="query")
    with pytest.raises(ValueError, match=r"exclude pattern 'x\.\*' matches no module"):
        torch_sttp.add_adapters(model, "delta", exclude="x.*")
    assert adapter_record(model) is None and isinstance(model[0], nn.Linear)


def test_bad_settings():
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="rank must be even; got rank=3"):
        torch_sttp.add_adapters(model, "rotation", rank=3)
    with pytest.raises(ValueError, match="unknown adapter kind 'lora'"):
        torch_sttp.add_adapters(model, "lora")
    with pytest.raises(ValueError, match="unknown method 'tt'"):
        torch_sttp.add_adapters(model, "delta", method="tt")
    with pytest.raises(ValueError, match="adapter name must be"):
        torch_sttp.add_adapters(model, "delta", name="a.b")
    with pytest.raises(ValueError, match="method='sttp' does not apply to rotation adapters"):
        torch_sttp.add_adapters(model, "rotation", "sttp", rank=2)
    assert adapter_record(model) is None  # nothing was added by the refused calls
    torch_sttp.add_adapters(model, "delta")
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        torch_sttp.add_adapters(model, "rotation", rank=2)


def test_unsupported_targets_are_listed_as_skipped():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False),
                           "up": nn.ConvTranspose1d(2, 2, 3), "attn": nn.MultiheadAttention(4, 2),
                           "norm": nn.LayerNorm(4), "fc": nn.Linear(4, 4)})
    model["head"].weight = model["emb"].weight  # tied
    torch_sttp.add_adapters(model, "delta", rank=2, target=["emb", "head", "up", "attn.*", "norm", "fc"])
    skipped = {n: reason for n, _, reason in adapter_info(model).skipped}
    assert set(skipped) == {"emb", "head", "up", "attn.out_proj", "norm"}
    assert "tied" in skipped["emb"] and "transposed" in skipped["up"]
    assert "MultiheadAttention" in skipped["attn.out_proj"] and "LayerNorm" in skipped["norm"]
    assert [n for n, _ in adapter_layers(model)] == ["fc"]


def test_layers_that_cannot_carry_adapters_are_named_with_the_reason_under_the_default_target():
    converted = torch_sttp.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), "svdp", 4)
    with pytest.raises(ValueError, match=r"no layer can carry the adapter \(skipped: '0': weight has a "
                                         r"parametrization .*to_dense first; '2': "):
        torch_sttp.add_adapters(converted, "delta", rank=2)
    with pytest.raises(ValueError, match=r"skipped: '0': transposed convolutions are not supported"):
        torch_sttp.add_adapters(nn.Sequential(nn.ConvTranspose2d(4, 6, 3)), "delta", rank=2)
    mixed = nn.Sequential(nn.Linear(6, 6), nn.ConvTranspose1d(6, 2, 3))
    torch_sttp.add_adapters(mixed, "delta", rank=2)
    assert [(n, why) for n, _, why in adapter_info(mixed).skipped] == [
        ("1", "transposed convolutions are not supported by adapters")]


@pytest.mark.parametrize("trainable", [(), ("2",)])
def test_convert_refuses_a_model_with_adapters_and_changes_nothing(trainable):
    # converting the base layer inside an adapter layer would lose the adapter at merge or export
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    torch_sttp.add_adapters(model, "delta", rank=2, target=["0"], trainable=trainable)
    with torch.no_grad():
        model[0].adapters["default"].spectrum.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inside = "'0.base_layer': it is inside '0', which carries adapters; merge them"
    for call in (lambda: torch_sttp.convert(model, "svdp", 4),
                 lambda: torch_sttp.project(model, "svdp", 4)):
        with pytest.raises(ValueError, match=f"cannot convert layer {inside}"):
            call()
    if trainable:
        with pytest.raises(ValueError, match="cannot convert layer '2.original': it is inside '2', which holds the "
                                             "trainable copies"):
            torch_sttp.convert(model, "svdp", 4, include="2*")
    assert torch_sttp.converted_layers(model) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()
    x = torch.randn(3, 8, generator=gen(1))
    adapted = model(x)
    torch_sttp.merge_adapters(model)
    torch_sttp.convert(model, "svdp", 8, spectrum="free", init="pretrained")  # merged: plain layers again
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


def test_nan_at_merge_raises_and_leaves_the_model_untouched():
    model, x = make("linear")
    weight = model[0].base_layer.weight if isinstance(model[0], AdapterLayer) else model[0].weight
    snapshot = weight.detach().clone()
    torch_sttp.add_adapters(model, "principal", rank=3)
    for tensor in ("u_reflectors", "spectrum"):
        good = getattr(model[0].adapters["default"], tensor).detach().clone()
        with torch.no_grad():
            getattr(model[0].adapters["default"], tensor).view(-1)[-1] = float("nan")
        with pytest.raises(ValueError, match=r"layer '0': adapter 'default' holds NaN or inf"):
            torch_sttp.merge_adapters(model)
        assert isinstance(model[0], AdapterLayer) and torch.equal(model[0].base_layer.weight, snapshot)
        assert model[0].base_layer.weight is weight
        with torch.no_grad():
            getattr(model[0].adapters["default"], tensor).copy_(good)
    torch_sttp.merge_adapters(model)
    assert torch.equal(weight, snapshot)


# ============================================================================================== batching
def test_all_frames_of_a_model_in_a_few_batched_calls(monkeypatch):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)], nn.Linear(8, 4))
    x = torch.randn(3, 8)
    torch_sttp.add_adapters(model, "delta", "svdp", rank=2)
    perturb_adapters(model)
    record = adapter_record(model)
    calls = []
    real = weight_path.compact_wy
    monkeypatch.setattr(weight_path, "compact_wy", lambda y, *a, **k: calls.append(tuple(y.shape)) or real(y, *a, **k))
    before = record.frame_planner.computations
    out = model(x)
    assert record.frame_planner.computations == before + 1
    # six layers, twelve frames of two shapes ((8, 2): the U of the first five and every V; (4, 2): the last U),
    # zero-padded into one compact-WY call
    assert calls == [(12, 8, 2)]
    out.sum().backward()
    for _, layer in adapter_layers(model):
        torch.testing.assert_close(layer(torch.ones(1, 8)), reference_output(layer, torch.ones(1, 8)))


def test_rotation_t_factors_in_one_call_per_shape(monkeypatch):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)], nn.Linear(8, 6))
    torch_sttp.add_adapters(model, "rotation", rank=4, two_sided=True)
    record = adapter_record(model)
    calls = []
    real = frames.householder_t
    monkeypatch.setattr(frames, "householder_t", lambda y: calls.append(tuple(y.shape)) or real(y))
    model(torch.randn(3, 8)).sum().backward()
    assert record.reflector_planner.computations == 1
    assert sorted(calls) == [(6, 4), (9, 8, 4)]  # every (8, 4) input and output side together; one (6, 4)


# ===================================================================== compile, checkpointing, autocast
@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_aot_eager_matches_eager(kind):
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(24, 6)).double()
    torch_sttp.add_adapters(model, kind, "svdp" if kind == "rotation" else "sttp", rank=2)
    perturb_adapters(model)
    x = torch.randn(3, 2, 6, dtype=F64)
    expected = model(x)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        out = compiled(x)
        torch.testing.assert_close(out, expected)
        out.square().sum().backward()
        for a, b in zip([p.grad for p in model.parameters() if p.requires_grad], grads):
            torch.testing.assert_close(a, b)
    finally:
        torch._dynamo.reset()


class _Segmented(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3, stride=2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 9, 8), nn.Tanh(), nn.Linear(8, 3))
        self.mode = None

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if self.mode is None:
            return self.head(self.features(x))
        return checkpoint(self.head, checkpoint(self.features, x, use_reentrant=self.mode), use_reentrant=self.mode)


@pytest.mark.parametrize("mode", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_matches_plain_training(kind, mode):
    torch.manual_seed(0)
    plain = _Segmented().double()
    torch_sttp.add_adapters(plain, kind, "svdp" if kind == "rotation" else "sttp", rank=2)
    perturb_adapters(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.mode = mode
    x = torch.randn(4, 3, 7, 7, dtype=F64, requires_grad=True)

    def step(model, opt):
        """One SGD step; returns the input's and the trainable parameters' gradients."""
        opt.zero_grad()
        x.grad = None
        model(x).square().sum().backward()
        opt.step()
        return [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (plain, ckpt)]
    for _ in range(2):  # the second step starts from parameters that the first one moved
        for a, b in zip(step(plain, opts[0]), step(ckpt, opts[1])):
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_on_cpu(kind):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    torch_sttp.add_adapters(model, kind, "svdp", rank=4)
    perturb_adapters(model, scale=0.1)
    x = torch.randn(4, 3, 6, 6)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and rel(out.float(), expected) < 3e-2
    out.float().square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# ================================================================================================ MiniLM
@pytest.fixture(scope="module")
def minilm():
    from torch_sttp.experiments.minilm import load_minilm

    model, tokenizer = load_minilm()
    batch = tokenizer(["Adapters fine-tune a frozen encoder.", "A second, somewhat longer sentence here."],
                      padding=True, return_tensors="pt")
    return model, dict(batch)


@pytest.mark.parametrize("kind, method", [("principal", "svdp"), ("delta", "sttp"), ("rotation", "svdp")])
def test_minilm_adapters(minilm, kind, method):
    base, batch = minilm
    model = copy.deepcopy(base).train()
    for m in model.modules():  # deterministic forward (no dropout) to compare outputs
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    expected = model(**batch).last_hidden_state
    torch_sttp.add_adapters(model, kind, method, rank=8, target=nn.Linear, exclude="pooler.*")
    layers = adapter_layers(model)
    assert len(layers) == 36 and torch.equal(model.encoder.layer[0].attention.self.query.weight,
                                             layers[0][1].base_layer.weight)
    out = model(**batch).last_hidden_state
    # float32: six layers deep, two float32 evaluations of one function differ by about the float32 error of the
    # model itself (its distance to float64, 7–8e-7 here): at init the adapters add no more than that (a rotation's
    # paired reflectors are the identity only up to rounding: 1.1e-6 on an AVX-512 CPU); each layer alone is held
    # to 1e-6 (test_outputs_equal_the_pretrained_model_at_init), the float64 model to 1e-12 below
    floor = rel(expected.double(), copy.deepcopy(base).double().eval()(**batch).last_hidden_state)
    assert rel(out, expected) <= max(1e-6, 2.0 * floor)
    with torch.no_grad():
        wide_base = copy.deepcopy(base).double().train()
        for m in wide_base.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        wide_expected = wide_base(**batch).last_hidden_state
        torch_sttp.add_adapters(wide_base, kind, method, rank=8, target=nn.Linear, exclude="pooler.*")
        assert rel(wide_base(**batch).last_hidden_state, wide_expected) <= 1e-12
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    direction = torch.randn(expected.shape, generator=gen(0))
    for _ in range(2):
        opt.zero_grad()
        (model(**batch).last_hidden_state * direction).mean().backward()
        opt.step()
    with torch.no_grad():
        adapted = model(**batch).last_hidden_state
        assert rel(adapted, expected) > 1e-5
        merged = torch_sttp.merge_adapters(copy.deepcopy(model))
        # merging adds no more than the float32 error of the model itself either (the floor above)
        assert rel(merged(**batch).last_hidden_state, adapted) <= max(1e-6, 2.0 * floor)
        wide = copy.deepcopy(model).double()
        wide_adapted = wide(**batch).last_hidden_state
        assert rel(torch_sttp.merge_adapters(wide)(**batch).last_hidden_state, wide_adapted) <= 1e-12
    torch_sttp.unload_adapters(model)
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


def test_spectral_update_is_a_planner_member():
    model, _ = make("linear")
    torch_sttp.add_adapters(model, "delta", rank=2)
    adapter = model[0].adapters["default"]
    assert isinstance(adapter, SpectralUpdate)
    assert adapter.planner_parametrization() is adapter.parametrization
    assert adapter.parametrization.spectrum == "free" and adapter.parametrization.weight_shape == (5, 6)
    with torch_sttp.adapters_disabled(model):
        assert adapter.planner_parametrization() is None


def test_parameter_counts_name_an_uninitialised_lazy_layer():
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="'0.weight' is not initialized"):
        torch_sttp.parameter_counts(model)
    model(torch.randn(2, 5))
    assert torch_sttp.parameter_counts(model) == (5 * 3 + 3 + 3 * 3 + 3, 5 * 3 + 3 + 3 * 3 + 3)
