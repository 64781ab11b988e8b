"""Model surgery (torch_sttp.surgery): converted layers compute what their original class computes, selection,
caching under training patterns, batching, export, checkpoints, bad input, torch.compile and DDP."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from torch_sttp.export import to_dense, to_factorized
from torch_sttp.modules import layer_state, original_class
from torch_sttp.tt import split_modes
import torch_sttp
from torch_sttp import parametrizations as P
from torch_sttp import surgery as S

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes: intra-op threads only add overhead (and contention on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(actual, expected, dtype=F64, rtol=None):
    rtol = TOL[dtype] if rtol is None else rtol
    scale = expected.detach().abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-3))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randomize_spectrum(model: nn.Module, seed=5):
    """S = 1 after init; give it distinct values with mixed signs so Σ matters."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("parametrizations.weight.original2"):
                s = 0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype)
                s[::3] *= -1
                p.copy_(s)


def plain_twin(model: nn.Module) -> nn.Module:
    """A plain (dense) copy of a converted model; its weights are replaced in :func:`reference_call`."""
    return to_dense(copy.deepcopy(model))


def reference_call(model: nn.Module, twin: nn.Module, *args, **kwargs):
    """The plain model run with the converted model's live tensors: weights materialised through
    ``torch.nn.utils.parametrize`` (``layer.weight``, never the planner), other parameters as they are."""
    converted = {name for name, _ in S.converted_layers(model)}
    tensors = {}
    for name, _ in twin.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and owner in converted:
            tensors[name] = model.get_submodule(owner).weight
        else:
            tensors[name] = model.get_parameter(name)
    return torch.func.functional_call(twin, tensors, args, kwargs)


def grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def ref_grads(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def assert_grads(actual, expected, dtype=F64):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None or not a.any()
        else:
            assert_close(a, e, dtype)


# ================================================================================ 1. layer-by-layer equivalence
class MyLinear(nn.Linear):
    """A subclass without its own forward: converted with the spectral forward."""


class ScaledConv1d(nn.Conv1d):
    """A subclass with its own forward: it must keep it."""

    def forward(self, x):
        return 2.0 * super().forward(x) + 1.0


# (id, factory, input shape, forward kwargs)
LAYERS = [
    ("linear", lambda: nn.Linear(12, 6), (2, 3, 12), {}),
    ("linear-nobias-unbatched", lambda: nn.Linear(8, 10, bias=False), (8,), {}),
    ("linear-subclass", lambda: MyLinear(6, 4), (3, 6), {}),
    ("conv1d-stride-pad", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9), {}),
    ("conv1d-dil-groups-nobias", lambda: nn.Conv1d(4, 6, 3, dilation=2, groups=2, bias=False), (2, 4, 11), {}),
    ("conv1d-same-even", lambda: nn.Conv1d(3, 4, 4, padding="same"), (2, 3, 7), {}),
    ("conv1d-valid", lambda: nn.Conv1d(3, 4, 3, padding="valid", stride=2), (2, 3, 8), {}),
    ("conv1d-reflect", lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect"), (2, 3, 7), {}),
    ("conv1d-replicate-same", lambda: nn.Conv1d(3, 4, 4, padding="same", dilation=2, padding_mode="replicate"),
     (2, 3, 9), {}),
    ("conv1d-circular-stride", lambda: nn.Conv1d(4, 4, 3, stride=2, padding=1, padding_mode="circular", groups=2),
     (2, 4, 8), {}),
    ("conv1d-subclass-forward", lambda: ScaledConv1d(3, 4, 3, padding=1), (2, 3, 5), {}),
    ("conv2d", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 4, 7, 5), {}),
    ("conv2d-same-reflect-dil", lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
     (2, 3, 6, 7), {}),
    ("conv2d-circular-groups", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular", bias=False),
     (1, 4, 5, 5), {}),
    ("conv2d-unbatched", lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 5, 4), {}),
    ("conv3d", lambda: nn.Conv3d(2, 4, 3, stride=2, padding=1), (2, 2, 5, 4, 5), {}),
    ("conv3d-same-replicate", lambda: nn.Conv3d(2, 3, (2, 3, 1), padding="same", padding_mode="replicate"),
     (1, 2, 4, 4, 3), {}),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5), {}),
    ("convT1d-groups-dil", lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, dilation=2, bias=False), (2, 4, 5), {}),
    ("convT1d-output_size", lambda: nn.ConvTranspose1d(3, 4, 3, stride=3), (2, 3, 4), {"output_size": [12]}),
    ("convT2d", lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=2, padding=(1, 0), output_padding=(1, 0)),
     (2, 4, 3, 4), {}),
    ("convT2d-output_size", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), (2, 3, 4, 3),
     {"output_size": (8, 6)}),
    ("convT2d-unbatched", lambda: nn.ConvTranspose2d(2, 4, 3, stride=2), (2, 3, 3), {}),
    ("convT3d-groups", lambda: nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, groups=2, output_padding=1),
     (1, 4, 3, 2, 3), {}),
    ("embedding", lambda: nn.Embedding(10, 6), None, {}),
    ("embedding-padding", lambda: nn.Embedding(10, 6, padding_idx=2), None, {}),
    ("embedding-max_norm", lambda: nn.Embedding(10, 6, max_norm=0.5), None, {}),
    ("embedding-max_norm-l1-padding", lambda: nn.Embedding(10, 6, max_norm=1.0, norm_type=1.0, padding_idx=-1), None,
     {}),
    ("embedding-scale_grad", lambda: nn.Embedding(10, 6, scale_grad_by_freq=True), None, {}),
]
INDICES = torch.tensor([[1, 2, 3, 2], [9, 0, 2, 1], [2, 5, 9, 9]])
SPECTRA = ("identity", "normalized", "free")


def converted_layer(factory, method, path, spectrum, rank=3, dtype=F64):
    torch.manual_seed(0)
    layer = factory().to(dtype)
    S.convert(layer, method=method, rank=rank, spectrum=spectrum, init="random", path=path, generator=gen(1))
    randomize_spectrum(layer)
    return layer


def check_layer(factory, shape, fwd_kwargs, method, path, spectrum, dtype):
    layer = converted_layer(factory, method, path, spectrum, dtype=dtype)
    assert S.spectral_parametrization(layer) is not None
    torch.manual_seed(0)
    ref = factory().to(dtype)  # the plain layer, same type and options
    assert type(ref) is original_class(layer)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        if getattr(ref, "bias", None) is not None:
            ref.bias.copy_(layer.bias)
    twin = plain_twin(layer)
    g = gen(7)
    if isinstance(ref, nn.Embedding):
        idx = INDICES.clone()
        before = [p.detach().clone() for p in layer.parameters()]
        y = layer(idx)
        y_ref = ref(idx)  # a plain embedding renormalises its own weight in place: the reference is throwaway
        assert_close(y, y_ref, dtype)
        for p, b in zip(layer.parameters(), before):  # never modified in place
            assert torch.equal(p.detach(), b)
        if layer.max_norm is None:
            gy = torch.randn(y.shape, generator=g, dtype=dtype)
            (y * gy).sum().backward()
            expected = ref_grads(layer, (reference_call(layer, twin, idx) * gy).sum())
            assert_grads(grads(layer), expected, dtype)
        return layer
    x = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    y = layer(x, **fwd_kwargs)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref, **fwd_kwargs)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, dtype)
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    assert_close(x.grad, x_ref.grad, dtype)
    # gradients of the layer's own parameters equal those through the materialised weight
    expected = ref_grads(layer, (reference_call(layer, twin, x.detach(), **fwd_kwargs) * gy).sum())
    assert_grads(grads(layer), expected, dtype)
    return layer


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("path", ["dense", "lowrank", "auto"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_matches_original_float64(case, method, path, spectrum):
    _, factory, shape, fwd_kwargs = case
    layer = check_layer(factory, shape, fwd_kwargs, method, path, spectrum, F64)
    if path == "lowrank" and not isinstance(layer, ScaledConv1d):
        grouped = getattr(layer, "groups", 1) != 1
        expected = "dense" if grouped or getattr(layer, "scale_grad_by_freq", False) else "lowrank"
        assert layer_state(layer).last_path == expected


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("path", ["dense", "lowrank", "auto"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_matches_original_float32(case, method, path):
    _, factory, shape, fwd_kwargs = case
    check_layer(factory, shape, fwd_kwargs, method, path, "normalized", torch.float32)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("shape", [(12, 6), (6, 12), (30, 8), (1, 6), (7, 1)])
def test_sttp_linear_tt_path(shape, spectrum, dtype):
    d_in, d_out = shape
    modes = sum(map(len, split_modes((d_out, d_in), "sttp")))
    if modes <= 2:  # no train to contract: asking for the TT path is an error, not a silent dense forward
        with pytest.raises(ValueError, match=r"path='tt' applies to STTP Linear layers .*none of the selected"):
            S.convert(nn.Sequential(nn.Linear(d_in, d_out)), "sttp", 4, spectrum, path="tt")
        return
    layer = check_layer(lambda: nn.Linear(d_in, d_out), (2, 3, d_in), {}, "sttp", "tt", spectrum, dtype)
    assert layer_state(layer).last_path == "tt"


@pytest.mark.parametrize("shape, expected", [((6, 12), True), ((12, 6), True), ((8, 30), True), ((6, 1), False),
                                             ((1, 7), False), ((5, 3), False), ((4, 3), True)])
def test_has_tt_path_needs_sttp_and_more_than_two_modes(shape, expected):
    """One rule, used by the layer's forward, convert's path='tt' check and the fuzz tests."""
    from torch_sttp.cost import has_tt_path
    assert has_tt_path("sttp", *split_modes(shape, "sttp")) is expected
    assert has_tt_path("svdp", *split_modes(shape, "svdp")) is False
    if expected:
        model = S.convert(nn.Sequential(nn.Linear(shape[1], shape[0])), "sttp", 4, path="tt")
        model(torch.randn(2, shape[1]))
        assert layer_state(model[0]).last_path == "tt"


def test_tt_path_needs_sttp_and_other_layers_run_dense():
    with pytest.raises(ValueError, match=r"path='tt' contracts the input with STTP cores; it needs method='sttp'"):
        S.convert(nn.Sequential(nn.Linear(12, 6)), "svdp", 4, path="tt")
    model = S.convert(nn.Sequential(nn.Conv1d(3, 12, 3), nn.Flatten(), nn.Linear(12 * 6, 6)), "sttp", 4, path="tt")
    model(torch.randn(2, 3, 8))
    assert [layer_state(m).last_path for _, m in S.converted_layers(model)] == ["dense", "tt"]


def test_embedding_padding_rows_get_no_gradient():
    for path in ("dense", "lowrank"):
        for method in ("svdp", "sttp"):
            layer = converted_layer(lambda: nn.Embedding(10, 6, padding_idx=2), method, path, "free")
            result = []
            for weight in (1.0, -7.0):
                layer.zero_grad()
                y = layer(INDICES)
                w = torch.ones_like(y)
                w[INDICES == 2] = weight
                (y * w).sum().backward()
                result.append(grads(layer))
            assert layer_state(layer).last_path == path
            for a, b in zip(*result):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_embedding_max_norm_is_out_of_place():
    layer = converted_layer(lambda: nn.Embedding(10, 6, max_norm=0.3), "svdp", "lowrank", "free")
    state = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    y = layer(INDICES)
    norms = y.norm(dim=-1)
    assert (norms <= 0.3 + 1e-9).all()
    y.sum().backward()
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), k


# ========================================================================================== 2. selection
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4 * 4 * 4, 6)
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)

    def forward(self, x):
        a = self.head(self.features(x).flatten(1))
        return a, self.up(x)


def net(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return Net().to(dtype)


def net_input(seed=3, dtype=F64, batch=2):
    return torch.randn(batch, 3, 4, 4, generator=gen(seed), dtype=dtype)


def converted_names(model):
    return sorted(n for n, _ in S.converted_layers(model))


def test_include_exclude_by_glob_and_type():
    assert converted_names(S.convert(net(), rank=2, include="features.*")) == ["features.0", "features.2"]
    assert converted_names(S.convert(net(), rank=2, exclude=["features.*"])) == ["head", "up"]
    assert converted_names(S.convert(net(), rank=2, include=nn.Conv2d)) == ["features.0", "features.2"]
    assert converted_names(S.convert(net(), rank=2, exclude=(nn.Conv2d, "up"))) == ["head"]
    assert converted_names(S.convert(net(), rank=2, include=[nn.Linear, "up"])) == ["head", "up"]
    assert converted_names(S.convert(net(), rank=2)) == ["features.0", "features.2", "head", "up"]


def test_rank_mapping():
    model = S.convert(net(), method="svdp", rank={"features.2": 3, "head": 1})
    assert converted_names(model) == ["features.2", "head"]
    assert S.spectral_parametrization(model.features[2]).r_mid == 3
    assert S.spectral_parametrization(model.head).r_mid == 1
    assert type(model.features[0]) is nn.Conv2d


def test_tied_weights_and_multihead_attention_are_skipped():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.sparse = nn.Embedding(10, 6, sparse=True)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.mid = nn.Linear(6, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            h = self.emb(idx) + self.sparse(idx)
            h = self.attn(h, h, h, need_weights=False)[0]
            return self.out(self.mid(h))

    torch.manual_seed(0)
    model = Tied().double()
    idx = INDICES
    y0 = model(idx)
    mha_state = {k: v.clone() for k, v in model.attn.state_dict().items()}
    S.convert(model, rank=3)
    assert converted_names(model) == ["mid"]
    skipped = {name: (kind, reason) for name, kind, reason in S.skipped_layers(model)}
    assert {"emb", "out", "attn", "attn.out_proj", "sparse"} <= set(skipped)
    assert "sparse" in skipped["sparse"][1]
    assert "tied" in skipped["emb"][1] and "tied" in skipped["out"][1]
    assert "MultiheadAttention" in skipped["attn.out_proj"][1]
    assert skipped["attn"][0] == "MultiheadAttention"
    assert type(model.emb) is nn.Embedding and type(model.out) is nn.Linear
    assert model.out.weight is model.emb.weight
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    for k, v in model.attn.state_dict().items():
        assert torch.equal(v, mha_state[k])
    y = model(idx)
    assert y.shape == y0.shape
    y.sum().backward()


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_pretrained_free_full_rank_reproduces_model(method):
    model, x = net(), net_input()
    expected = model(x)
    S.convert(model, method=method, rank=10_000, spectrum="free", init="pretrained")
    for a, b in zip(model(x), expected):
        assert_close(a, b)

    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 6, padding_idx=0)
            self.fc = nn.Linear(6, 4)

        def forward(self, idx):
            return self.fc(self.emb(idx))

    torch.manual_seed(1)
    model = Emb().double()
    expected = model(INDICES)
    S.convert(model, method=method, rank=10_000, spectrum="free", init="pretrained")
    assert_close(model(INDICES), expected)


# ========================================================================================= 3. parameters
def test_parameters_are_named_and_per_layer_groups_work():
    model = S.convert(net(), method="sttp", rank=3, spectrum="free", init="random", generator=gen(0))
    names = dict(model.named_parameters())
    for name, layer in S.converted_layers(model):
        own = [n for n in names if n.startswith(name + ".")]
        assert f"{name}.parametrizations.weight.original0" in own
        assert f"{name}.parametrizations.weight.original1" in own
        assert f"{name}.parametrizations.weight.original2" in own
        assert {id(names[n]) for n in own} == {id(p) for p in layer.parameters()}
    frozen = model.features[0]
    groups = [{"params": layer.parameters(), "lr": 0.0 if layer is frozen else 0.1}
              for _, layer in S.converted_layers(model)]
    opt = torch.optim.SGD(groups, lr=0.1)
    assert len(opt.param_groups) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = net_input()
    y0 = [t.detach() for t in model(x)]
    sum(t.square().sum() for t in model(x)).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n.startswith("features.0.parametrizations"):
            assert torch.equal(p, before[n])
        elif "parametrizations" in n:
            assert not torch.equal(p, before[n]), n
    assert not torch.allclose(model(x)[0], y0[0])


# ============================================================================================= 4. caching
def cache_model(batching="shape", seed=0):
    model = net(seed)
    S.convert(model, method="sttp", rank=3, spectrum="free", init="random", generator=gen(seed), batching=batching)
    randomize_spectrum(model)
    return model


def total(out):
    return sum((t * t.detach().sin()).sum() for t in out)


def test_several_forwards_before_one_backward():
    model = cache_model()
    twin = plain_twin(model)
    real, fake = net_input(1), net_input(2)
    loss = total(model(real)) - 0.5 * total(model(fake))  # GAN: D(real) and D(fake), one backward
    loss.backward()
    expected = ref_grads(model, total(reference_call(model, twin, real)) - 0.5 * total(reference_call(model, twin,
                                                                                                        fake)))
    assert_grads(grads(model), expected)


def test_forward_backward_twice_and_two_separate_backwards():
    model = cache_model()
    twin = plain_twin(model)
    x1, x2 = net_input(1), net_input(2)
    expected = ref_grads(model, total(reference_call(model, twin, x1)))
    for _ in range(2):
        model.zero_grad()
        total(model(x1)).backward()
        assert_grads(grads(model), expected)
    model.zero_grad()
    y1, y2 = model(x1), model(x2)
    total(y1).backward()
    total(y2).backward()
    expected = ref_grads(model, total(reference_call(model, twin, x1)) + total(reference_call(model, twin, x2)))
    assert_grads(grads(model), expected)


def test_submodule_called_directly_between_backwards():
    model = cache_model()
    twin = plain_twin(model)
    x = torch.randn(3, 64, generator=gen(1), dtype=F64)
    head = {"weight": model.head.weight, "bias": model.head.bias}
    expected = ref_grads(model, torch.func.functional_call(twin.head, head, (x,)).sum())
    for _ in range(3):
        model.zero_grad()
        model.head(x).sum().backward()  # no root forward in between: the freed graph must not be reused
        assert_grads(grads(model), expected)
    # two direct calls, then two backwards
    model.zero_grad()
    a, b = model.head(x), model.head(2 * x)
    a.sum().backward()
    b.sum().backward()
    w = model.head.weight.detach()
    torch.testing.assert_close(model.head.bias.grad, torch.full((6,), 6.0, dtype=F64))
    assert_close(a, x @ w.T + model.head.bias)


def test_no_grad_eval_and_optimizer_steps():
    model = cache_model()
    twin = plain_twin(model)
    x = net_input(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(4):
        model.train()
        opt.zero_grad()
        out = model(x)
        for a, b in zip(out, reference_call(model, twin, x)):
            assert_close(a, b)
        total(out).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                ev = model(x)
                fresh = reference_call(model, twin, x)
                for a, b in zip(ev, fresh):
                    assert_close(a, b)
            assert not torch.allclose(ev[0], out[0].detach())
        with torch.inference_mode():
            for a, b in zip(model(x), ev):
                assert_close(a, b)


def test_gradient_accumulation_equals_single_batch():
    model = cache_model()
    x = net_input(1, batch=4)
    sum(t.mean() * 3 + t.square().mean() for t in model(x)).backward()
    single = grads(model)
    model.zero_grad()
    for part in (x[:2], x[2:]):
        (sum(t.mean() * 3 + t.square().mean() for t in model(part)) / 2).backward()
    assert_grads(grads(model), single)


def test_in_place_parameter_edits_are_seen():
    model = cache_model()
    twin = plain_twin(model)
    x = net_input(1)
    for mode in ("grad", "no_grad_eval"):
        model.train(mode == "grad")
        for step in range(2):
            ctx = torch.enable_grad() if mode == "grad" else torch.no_grad()
            with ctx:
                model(x)  # fills the cache
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01 * (step + 1))
                out = model(x)
                with torch.no_grad():
                    fresh = reference_call(model, twin, x)
            for a, b in zip(out, fresh):
                assert_close(a, b)
    # load_state_dict writes in place too
    other = cache_model(seed=1)
    model.eval()
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        for a, b in zip(model(x), other(x)):
            assert torch.equal(a, b)


def test_planner_reuses_factors_in_eval_only_inside_cached():
    model = cache_model().eval()
    planner = torch_sttp.conversion(model).planner
    start = planner.computations
    x = net_input(1)
    with torch.no_grad():
        model(x)
        model(x)
        assert planner.computations - start == 2  # outside cached(): one computation per forward pass
    start = planner.computations
    with torch_sttp.cached(model), torch.no_grad():
        y0 = model(x)
        model(x)
        model(net_input(2))
        assert planner.computations - start == 1  # all four layers in one computation, reused afterwards
        with torch.no_grad():
            model.head.parametrizations.weight.original1.add_(0.1)
        y1 = model(x)
        assert planner.computations - start == 2
        model(x)
        assert planner.computations - start == 2
        assert not torch.allclose(y0[0], y1[0])
        assert torch.equal(y0[1], y1[1])
        with torch.enable_grad():
            model(x)  # with grad: a new computation for every forward pass, cached() or not
            assert planner.computations - start == 3
            model(x)
            assert planner.computations - start == 4


def _changes(model, other):
    """Ways users change parameters in place (each multiplies or replaces every parameter)."""
    params = list(model.parameters())
    yield "data", lambda: [p.data.mul_(3) for p in params]
    yield "no_grad in-place", lambda: [p.mul_(0.5) for p in params]
    yield "foreach", lambda: torch._foreach_mul_(params, 1.5)
    yield "copy_", lambda: [p.copy_(q) for p, q in zip(params, other.parameters())]
    yield "ema through .data", lambda: [p.data.mul_(0.9).add_(q.data, alpha=0.1)
                                        for p, q in zip(params, other.parameters())]
    yield "load_state_dict", lambda: model.load_state_dict(cache_model(seed=3).state_dict())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_outputs_follow_parameters_however_they_change(mode):
    model = cache_model().eval()
    twin = plain_twin(model)
    other = cache_model(seed=2)
    x = net_input(1)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    for what, change in _changes(model, other):
        with ctx():
            model(x)  # would fill a cache
        with torch.no_grad():
            change()
        with ctx():
            out = model(x)
            layer_out = model.head(torch.randn(2, 64, generator=gen(0), dtype=F64))
        with torch.no_grad():
            fresh = reference_call(model, twin, x)
            head_ref = torch.nn.functional.linear(torch.randn(2, 64, generator=gen(0), dtype=F64),
                                                  model.head.weight, model.head.bias)
        for a, b in zip(out, fresh):
            assert_close(a, b), what
        assert_close(layer_out, head_ref), what


def test_averaged_model_and_optimizer_follow_parameters():
    from torch.optim.swa_utils import AveragedModel

    model = cache_model().eval()
    swa = AveragedModel(model)
    x = net_input(1)
    twin = plain_twin(model)
    for _ in range(2):
        with torch.no_grad():
            swa(x)
            for p in model.parameters():
                p.add_(0.05)
        swa.update_parameters(model)
    with torch.no_grad():
        out = swa.module(x)
        fresh = reference_call(swa.module, twin, x)
    for a, b in zip(out, fresh):
        assert_close(a, b)


def test_dtype_change_and_removed_parametrization():
    model = cache_model().float().eval()
    x = net_input(1)
    with torch.no_grad():
        model(x.float())
        model.double()  # swaps every parameter's data: the cached float32 factors must go
        twin = plain_twin(model)
        for a, b in zip(model(x), reference_call(model, twin, x)):
            assert a.dtype == F64
            assert_close(a, b)
    expected = [t.detach() for t in model(x)]
    torch_parametrize.remove_parametrizations(model.head, "weight")
    assert converted_names(model) == ["features.0", "features.2", "up"]
    for a, b in zip(model(x), expected):
        assert_close(a, b)


# ============================================================================================= 5. batching
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_batching_modes_agree(method):
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 6, 3, padding=1)
            self.c2 = nn.Conv2d(6, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 16, 10)
            self.fc2 = nn.Linear(10, 10)
            self.emb = nn.Embedding(12, 10)

        def forward(self, x, idx):
            h = self.c2(torch.tanh(self.c1(x))).flatten(1)
            return self.fc2(torch.tanh(self.fc(h))) + self.emb(idx).sum(1)

    x, idx = net_input(1), INDICES[:2]
    results = []
    state = None
    for batching in ("shape", "padded", "none"):
        torch.manual_seed(0)
        model = Deep().double()
        S.convert(model, method=method, rank=4, spectrum="free", init="random", generator=gen(1), batching=batching)
        randomize_spectrum(model)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        xi = x.clone().requires_grad_(True)
        y = model(xi, idx)
        (y * y.detach().cos()).sum().backward()
        results.append((y.detach(), xi.grad, grads(model)))
    (y0, gx0, g0) = results[0]
    for y, gx, g in results[1:]:
        assert_close(y, y0, rtol=1e-12)
        assert_close(gx, gx0, rtol=1e-12)
        for a, b in zip(g, g0):
            assert_close(a, b, rtol=1e-12)


# =============================================================================================== 6. export
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 12, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv1d(12, 12, 3, padding=1, groups=3)
        self.up = nn.ConvTranspose1d(12, 6, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(6 * 8, 10)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2)
        h = torch.tanh(self.grouped(torch.tanh(self.conv(h))))
        return self.fc(self.up(h).flatten(1))


def mixed(method="sttp", rank=2, seed=0):
    torch.manual_seed(seed)
    model = Mixed().double()
    S.convert(model, method=method, rank=rank, spectrum="free", init="random", generator=gen(seed))
    randomize_spectrum(model)
    return model


IDX4 = torch.tensor([[1, 0, 3, 4], [5, 11, 0, 2]])


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_to_dense_and_remove_parametrizations(method):
    model = mixed(method)
    expected = model(IDX4).detach()
    originals = {n: original_class(m) for n, m in S.converted_layers(model)}
    dense = to_dense(copy.deepcopy(model))
    for name, cls in originals.items():
        assert type(dense.get_submodule(name)) is cls
    for m in dense.modules():
        assert not torch_parametrize.is_parametrized(m)
    assert S.converted_layers(dense) == []
    assert_close(dense(IDX4), expected)
    assert not dense._forward_pre_hooks
    # a dense model can be converted again
    S.convert(dense, rank=2)

    assert_close(model(IDX4), expected)  # exporting a deep copy leaves the original intact

    # (remove_parametrizations on a deep copy would edit the class it shares with the original: use a twin)
    other = mixed(method)
    for name, _ in S.converted_layers(other):
        torch_parametrize.remove_parametrizations(other.get_submodule(name), "weight")
    assert_close(other(IDX4), expected)
    for name in originals:
        assert "weight" in dict(other.get_submodule(name).named_parameters())

    partial = mixed(method)
    torch_parametrize.remove_parametrizations(partial.conv, "weight")
    assert_close(partial(IDX4), expected)
    to_dense(partial)
    assert type(partial.conv) is nn.Conv1d
    assert_close(partial(IDX4), expected)


def test_to_dense_keeps_user_load_hooks():
    model = mixed()
    seen = []
    model.fc._register_load_state_dict_pre_hook(lambda *a, **k: seen.append(1))
    to_dense(model)
    model.load_state_dict(model.state_dict())
    assert seen == [1]


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_to_factorized(method):
    model = mixed(method)
    expected = model(IDX4).detach()
    dense_count = sum(p.numel() for p in to_dense(copy.deepcopy(model)).parameters())
    fact = to_factorized(copy.deepcopy(model))
    for m in fact.modules():
        assert type(m).__module__.startswith("torch.nn.modules") or type(m) is Mixed, type(m)
        assert not torch_parametrize.is_parametrized(m)
    assert type(fact.grouped) is nn.Conv1d  # grouped convs become dense
    assert isinstance(fact.fc, nn.Sequential) and isinstance(fact.conv, nn.Sequential)
    assert_close(fact(IDX4), expected)
    assert sum(p.numel() for p in fact.parameters()) < dense_count
    exported = torch.export.export(fact, (IDX4,))
    assert_close(exported.module()(IDX4), expected)


def test_to_factorized_inside_sequential():
    model, x = cache_model(), net_input(1)
    expected = [t.detach() for t in model(x)]
    fact = to_factorized(model)
    assert [type(m) for m in fact.features[0]] == [nn.Conv2d, nn.Conv2d]
    assert [type(m) for m in fact.up] == [nn.ConvTranspose2d, nn.Conv2d]
    for a, b in zip(fact(x), expected):
        assert_close(a, b)


def test_to_factorized_root_layer():
    layer = converted_layer(lambda: nn.Linear(12, 6), "sttp", "auto", "free", rank=2)
    x = torch.randn(3, 12, generator=gen(1), dtype=F64)
    expected = layer(x).detach()
    fact = to_factorized(layer)
    assert isinstance(fact, nn.Sequential)
    assert_close(fact(x), expected)


# ========================================================================================== 7. state_dict
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_state_dict_round_trip(method, tmp_path):
    a, b = mixed(method, seed=0), mixed(method, seed=1)
    assert not torch.equal(a(IDX4), b(IDX4))
    path = tmp_path / "ckpt.pt"
    torch.save(a.state_dict(), path)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(a(IDX4), b(IDX4))
    with torch.no_grad():
        assert torch.equal(a.eval()(IDX4), b.eval()(IDX4))


def test_state_dict_mismatch_raises():
    state = mixed("sttp", rank=2).state_dict()
    with pytest.raises(ValueError, match=r"layer 'emb'.*rank: checkpoint 2 vs layer 3"):
        mixed("sttp", rank=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"layer 'emb'.*method: checkpoint 'sttp' vs layer 'svdp'"):
        mixed("svdp", rank=2).load_state_dict(state)
    torch.manual_seed(0)
    model = Mixed().double()
    S.convert(model, method="sttp", rank=2, spectrum="normalized")
    with pytest.raises(ValueError, match=r"layer 'emb'.*spectrum"):
        model.load_state_dict(state)


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_load_dense_checkpoint(method):
    torch.manual_seed(3)
    dense = Mixed().double()
    expected = dense(IDX4)
    model = mixed(method, rank=1000)
    assert not torch.allclose(model(IDX4), expected)
    model.load_state_dict(dense.state_dict())
    assert_close(model(IDX4), expected)
    for name, layer in S.converted_layers(model):
        assert_close(layer.weight, dense.get_submodule(name).weight)


# =========================================================================================== 8. bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"method": "tucker"}, "unknown method 'tucker'"),
    ({"spectrum": "unit"}, "unknown spectrum 'unit'"),
    ({"init": "orthogonal"}, "unknown init 'orthogonal'"),
    ({"path": "fast"}, "unknown path 'fast'"),
    ({"batching": "all"}, "unknown batching 'all'"),
    ({"include": "feature.*"}, "include pattern 'feature.\\*' matches no module"),
    ({"exclude": ["head", "tail"]}, "exclude pattern 'tail' matches no module"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"rank": {"head": 2, "up": 0}}, "layer 'up'.*rank must be a positive integer"),
    ({"rank": {"heads": 2}}, "not in the model"),
    ({"include": nn.Embedding}, "include pattern Embedding matches no module"),
    ({"exclude": [nn.Linear, nn.Conv3d]}, "exclude pattern Conv3d matches no module"),
    ({"rank": {"features.1": 2}}, r"not supported layers: 'features.1' \(ReLU\)"),
    ({"include": "features.1"}, "no layer was selected"),
])
def test_bad_input(kwargs, message):
    model = net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        S.convert(model, **{"rank": 2, **kwargs})
    assert S.converted_layers(model) == []
    assert model.state_dict().keys() == state.keys()


def test_converting_twice_raises():
    model = S.convert(net(), rank=2)
    with pytest.raises(ValueError, match="already converted"):
        S.convert(model, rank=2)
    with pytest.raises(ValueError, match="already converted"):
        S.convert(model.features, rank=2)


def snapshot(model):
    return {
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.detach().clone()) for n, p in model.named_parameters()],
        "buffers": [n for n, _ in model.named_buffers()],
        "hooks": [(n, len(m._forward_pre_hooks), len(m._load_state_dict_pre_hooks)) for n, m in model.named_modules()],
        "attrs": sorted(k for k in vars(model) if k.startswith("_sttp")),
    }


def assert_untouched(model, before, x, expected):
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert [(n, i) for n, i, _ in after["params"]] == [(n, i) for n, i, _ in before["params"]]
    for (_, _, a), (_, _, b) in zip(after["params"], before["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert after["buffers"] == before["buffers"] and after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"]
    for m in model.modules():
        assert "_sttp" not in vars(m) and not torch_parametrize.is_parametrized(m)
    for a, b in zip(model(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("init", ["random", "pretrained"])
def test_failure_midway_leaves_model_untouched(monkeypatch, init):
    model, x = net(), net_input()
    expected, before = model(x), snapshot(model)
    original = P.SpectralParametrization.__init__
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure")
        original(self, *args, **kwargs)

    monkeypatch.setattr(P.SpectralParametrization, "__init__", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        S.convert(model, rank=2, init=init, spectrum="free")
    monkeypatch.setattr(P.SpectralParametrization, "__init__", original)
    assert_untouched(model, before, x, expected)

    # a failure inside register_parametrization (right_inverse of a NaN weight) on the third layer
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    expected, before = model(x), snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        S.convert(model, rank=2, init="pretrained", spectrum="free")
    assert_untouched(model, before, x, expected)
    # the model still converts once the problem is gone
    with torch.no_grad():
        model.head.weight[0, 0] = 0.0
    S.convert(model, rank=2)
    assert converted_names(model) == ["features.0", "features.2", "head", "up"]


# ============================================================================================ 9. compile
def compile_model(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(24, 6)).double()
    S.convert(model, method="sttp", rank=3, spectrum="free", init="random", path=path, generator=gen(0))
    randomize_spectrum(model)
    return model, torch.randn(2, 2, 6, generator=gen(1), dtype=F64)


@pytest.mark.parametrize("backend, path", [("eager", "auto"), ("aot_eager", "lowrank")])
def test_torch_compile_matches_eager(backend, path):
    """Default inductor needs minutes for its first C++ build here: aot_eager stands in (see the opt-in test)."""
    model, x = compile_model(path)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = grads(model)
    model.zero_grad()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend)
        out = compiled(x)
        assert_close(out, expected)
        out.square().sum().backward()
        assert_grads(grads(model), expected_grads)
        with torch.no_grad():
            assert_close(compiled.eval()(x), expected)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(os.environ.get("STTP_TEST_INDUCTOR") != "1",
                    reason="inductor's first C++ build takes minutes on 2 CPU cores; set STTP_TEST_INDUCTOR=1")
def test_torch_compile_inductor():
    model, x = compile_model("auto")
    expected = model(x)
    torch._dynamo.reset()
    try:
        assert_close(torch.compile(model)(x), expected)
    finally:
        torch._dynamo.reset()


# ================================================================================================= 10. DDP
def test_ddp_matches_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    for attempt in range(3):  # the standalone rendezvous can lose a race for its port, or stall, on a busy machine
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                 str(ROOT / "tests" / "ddp_worker.py"), str(out)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
            )
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise
            continue
        if proc.returncode == 0 or "rendezvous" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    spec = importlib.util.spec_from_file_location("ddp_worker", ROOT / "tests" / "ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    for case in ("one_forward", "two_forwards", "sngan_d_reduced"):
        initial = worker.flat_params(worker.build_model(case))
        r0, r1 = results[f"{case}/rank0"], results[f"{case}/rank1"]
        assert torch.equal(r0, r1), case
        single = worker.train_single(case)
        assert not torch.allclose(single, initial)
        assert_close(r0, single)


# ------------------------------------------------------------------------------------------- non-finite parameters
def test_check_finite_names_the_first_bad_layer():
    from torch_sttp.surgery import NonFiniteParameterError

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 2))
    S.convert(model, "sttp", 3, check_finite=True)
    x = torch.randn(5, 6)
    model(x)  # finite: no error
    with torch.no_grad():
        model[2].parametrizations.weight.original1.view(-1)[0] = float("nan")
        model[3].parametrizations.weight.original0.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteParameterError, match=r"layer '2'.*V reflectors"):
        model(x)
    with pytest.raises(NonFiniteParameterError, match=r"layer '2'"):
        model[2](torch.randn(1, 8))  # a layer called on its own is checked too


def test_check_finite_is_off_by_default_and_costs_one_check(monkeypatch):
    import torch_sttp.surgery as surgery

    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    S.convert(model, "svdp", 3)
    assert torch_sttp.conversion(model).planner.check_finite is False
    with torch.no_grad():
        model[1].parametrizations.weight.original2[0] = float("nan")
    assert torch.isnan(model(torch.randn(2, 6))).all()  # unchecked: the NaN spreads, as documented
    torch_sttp.set_check_finite(model, True)
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(surgery.torch, "isfinite", lambda t: calls.append(t.numel()) or real(t))
    with torch.no_grad():
        model[1].parametrizations.weight.original2[0] = 1.0
    model(torch.randn(2, 6))
    assert len(calls) == 1  # one fused test over every layer's parameters


# ================================================================================= activation checkpointing
class _Segmented(nn.Module):
    """conv → linear model whose two halves may run under torch.utils.checkpoint."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 6, 3, stride=2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 3 * 3, 10), nn.Tanh(), nn.Linear(10, 4))
        self.mode = None  # None: plain; True / False: checkpoint each half with use_reentrant=mode; "whole"

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if self.mode is None:
            return self.head(self.features(x))
        if self.mode == "whole":
            return checkpoint(lambda t: self.head(self.features(t)), x, use_reentrant=False)
        h = checkpoint(self.features, x, use_reentrant=self.mode)
        return checkpoint(self.head, h, use_reentrant=self.mode)


@pytest.mark.parametrize("mode", [False, True, "whole"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_activation_checkpointing_matches_plain_training(method, mode):
    # gradients and two SGD steps under checkpointing equal those of the same model without it
    torch.manual_seed(0)
    plain = _Segmented().double()
    S.convert(plain, method=method, rank=3, init="random", generator=torch.Generator().manual_seed(1))
    ckpt = copy.deepcopy(plain)
    ckpt.mode = mode
    x = torch.randn(5, 3, 7, 7, dtype=F64, requires_grad=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, ckpt)]
    for _ in range(2):
        grads = []
        for model, opt in zip((plain, ckpt), opts):
            opt.zero_grad()
            x.grad = None
            model(x).square().sum().backward()
            grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
            opt.step()
        for a, b in zip(*grads):
            assert_close(b, a)


def test_a_copy_made_inside_cached_or_a_forward_pass_starts_outside_them():
    """A deep copy taken inside cached() (a best-model snapshot) follows .data updates once the context is left, and
    one taken during a forward pass (a forward hook) computes fresh factors for direct layer calls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 3)).double()
    S.convert(model, "svdp", rank=3, spectrum="free", init="random", generator=gen(0))
    x = torch.randn(2, 4, dtype=F64)
    with S.cached(model), torch.no_grad():
        model(x)
        best = copy.deepcopy(model)
    with torch.no_grad():
        best(x)
        for p in best.parameters():
            p.data.mul_(2.0)
        assert_close(best(x), torch.tanh(x @ best[0].weight.T) @ best[2].weight.T + best[2].bias)
    copies = []
    handle = model[2].register_forward_hook(lambda *_: copies.append(copy.deepcopy(model)))
    model(x)
    handle.remove()
    layer = copies[0][0]
    with torch.no_grad():
        layer(x)
        for p in layer.parameters():
            p.mul_(1.5)
        assert_close(layer(x), x @ layer.weight.T)
    for _ in range(2):  # a direct call, twice: fresh factors each time
        layer(x).sum().backward()


@pytest.mark.parametrize("how", ["sequential", "layer"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_checkpointing_segments_outside_a_pass_of_the_root_matches_plain_training(method, how):
    """checkpoint_sequential(model, ...) and checkpoint(model[i], ...) run converted layers outside a forward pass of
    the converted root: their own factors are computed inside the segment (non-reentrant checkpoint), and the
    gradients equal those of the plain model (before: 'a different number of tensors was saved')."""
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    S.convert(plain, method=method, rank=3, init="random", generator=torch.Generator().manual_seed(1))
    ckpt = copy.deepcopy(plain)
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    grads = []
    for model, segmented in ((plain, False), (ckpt, True)):
        x.grad = None
        if not segmented:
            out = model(x)
        elif how == "sequential":
            out = checkpoint_sequential(model, 2, x, use_reentrant=False)
        else:
            h = checkpoint(model[0], x, use_reentrant=False)
            out = model[4](model[3](checkpoint(model[2], model[1](h), use_reentrant=False)))
        out.square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert_close(b, a)


@pytest.mark.parametrize("path", ["auto", "tt", "lowrank", "dense"])
def test_torch_compile_fullgraph_without_graph_breaks(path):
    # a fresh STTP model (no eager call first, so no cached contraction plan) compiles into one graph; the TT path
    # runs opt_einsum's order as plain torch.einsum steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 32)).double()
    S.convert(model, method="sttp", rank=8, path=path, init="random", generator=gen(2))
    x = torch.randn(3, 64, dtype=F64, generator=gen(3))
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend="eager", fullgraph=True)(x)  # raises on any graph break
    finally:
        torch._dynamo.reset()
    assert_close(out, model(x))
    if path == "tt":
        assert {layer_state(m).last_path for _, m in S.converted_layers(model)} == {"tt"}


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_torch_compile_fullgraph_at_ranks_of_the_blocked_inverse(method):
    """At r = 32 the frames ask whether the blocked triangular inverse pays (it reads the thread count): while
    compiling that question must not be traced (it broke the graph at every layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 64))
    S.convert(model, method=method, rank=32, spectrum="free", init="random", generator=gen(2))
    x = torch.randn(3, 64, generator=gen(3))
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend="eager", fullgraph=True)(x)  # raises on any graph break
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_when_every_layer_is_skipped_the_error_gives_their_reasons():
    tied = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    tied[1].weight = tied[0].weight
    cases = [(nn.Sequential(nn.Embedding(10, 6, sparse=True)),
              r"\(skipped: '0' \(Embedding\): sparse embedding gradients are not supported\); check include"),
             (tied, r"\(skipped: '0' \(Embedding\): .*tied.*; '1' \(Linear\): .*tied")]
    for model, message in cases:
        with pytest.raises(ValueError, match="no layer was selected for conversion " + message):
            S.convert(model, "svdp", 4)


def test_tt_contraction_carries_the_flag_torch_compiler_sets():
    # cost marks the contraction plan constant for dynamo without importing torch._dynamo; if torch changes how
    # assume_constant_result marks a function, this fails instead of the TT path silently graph-breaking
    from torch_sttp import cost

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    flags = {k: v for k, v in vars(marked).items()}
    assert flags and all(getattr(cost.tt_contraction, k, None) == v for k, v in flags.items())


def test_import_does_not_load_dynamo():
    code = "import sys, torch_sttp; print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name, owner", [("to_dense", "export"), ("to_factorized", "export"),
                                         ("SpectralLinear", "modules"), ("SpectralEmbedding", "modules")])
def test_names_moved_out_of_surgery_still_resolve_with_a_deprecation_warning(name, owner):
    with pytest.warns(DeprecationWarning, match=f"torch_sttp.{owner}.{name}"):
        found = getattr(S, name)
    assert found is getattr(importlib.import_module(f"torch_sttp.{owner}"), name)
    assert name not in S.__all__


# ================================================================================= conversion record
def test_conversion_record_is_public_and_deepcopy_gets_its_own():
    import copy

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.MultiheadAttention(4, 2))
    S.convert(model, "sttp", 3, include=nn.Linear)
    record = torch_sttp.conversion(model)
    assert record.options["method"] == "sttp" and record.options["rank"] == 3
    assert [m for m in record.planner.layers] == [model[0], model[2]]
    twin = copy.deepcopy(model)
    twin_record = torch_sttp.conversion(twin)
    assert twin_record is not record and twin_record.planner is not record.planner
    assert twin_record.planner.layers == [twin[0], twin[2]]
    x = torch.randn(5, 6)
    torch.testing.assert_close(twin[:3](x), model[:3](x))
    with torch.no_grad():  # an EMA-style in-place change of the copy does not touch the original
        for p in twin.parameters():
            p.mul_(0.5)
    y_model = model[:3](x)
    assert not torch.allclose(twin[:3](x), y_model)
    torch.testing.assert_close(model[:3](x), y_model)
    to_dense(twin)
    assert torch_sttp.conversion(twin) is None and torch_sttp.conversion(model) is record


def test_forward_pass_context_computes_all_frames_once():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    S.convert(model, "svdp", 3)
    planner = torch_sttp.conversion(model).planner
    start = planner.computations
    with torch_sttp.forward_pass(model):
        weights = [m.spectral_weight() for m in model]
    assert planner.computations - start == 1
    for m, w in zip(model, weights):
        torch.testing.assert_close(w, m.weight)
    with pytest.raises(ValueError, match="not converted"):
        with torch_sttp.forward_pass(nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("batching", ["shape", "padded", "none"])
@pytest.mark.parametrize("spectrum", ["identity", "normalized"])
def test_every_parameter_takes_part_in_the_graph(batching, spectrum):
    """Layers with d_out = 1 or d_in = 1 have an empty STTP side; its (empty) tensor still gets a gradient."""
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1), nn.Conv1d(1, 1, 1))
    S.convert(model, "sttp", 4, spectrum=spectrum, batching=batching)
    assert any(p.numel() == 0 for p in model.parameters())
    # a root pass, and layers called on their own
    for call, used in ((lambda x: model(x), ("0", "2", "3")), (lambda x: model[2](model[0](x)), ("0", "2"))):
        model.zero_grad(set_to_none=True)
        call(torch.randn(3, 1, 1)).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None and n.split(".")[0] in used]
        assert not missing


# ================================================================================= layers convert leaves alone
def _awkward_model():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation, zero-element init
        return nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 5)), nn.utils.weight_norm(nn.Linear(5, 5)),
                             nn.Linear(5, 0), nn.LazyLinear(3), nn.LSTM(3, 4), nn.GRU(3, 4), nn.RNN(3, 4),
                             nn.Linear(3, 3))


def test_unconvertible_layers_are_skipped_with_their_reason():
    model = _awkward_model()
    S.convert(model, "sttp", 2)
    assert [n for n, _ in S.converted_layers(model)] == ["7"]
    reasons = {name: reason for name, _, reason in S.skipped_layers(model)}
    assert "remove_spectral_norm" in reasons["0"] and "remove_weight_norm" in reasons["1"]
    assert "(0, 5) is empty" in reasons["2"]
    assert "lazy" in reasons["3"] and "forward pass" in reasons["3"]
    assert all("recurrent" in reasons[n] for n in ("4", "5", "6"))
    model[0](torch.randn(2, 4))  # the hooked layers still work as before
    model[3](torch.randn(1, 3))  # initialise the lazy layer so that Z can count it
    rep = str(torch_sttp.report(model))
    assert "LSTM" in rep and "remove_spectral_norm" in rep


@pytest.mark.parametrize("name, reason", [("0", "remove_spectral_norm"), ("2", "empty"), ("3", "lazy"),
                                          ("4", "recurrent")])
def test_layer_named_exactly_is_an_error_not_a_skip(name, reason):
    model = _awkward_model()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=rf"layer '{name}' .*{reason}"):
        S.convert(model, "sttp", 2, include=[name, "7"])
    with pytest.raises(ValueError, match=rf"'{name}'"):
        S.convert(model, "sttp", {name: 2, "7": 2})
    assert [type(m) for m in model.modules()] == before and torch_sttp.conversion(model) is None


def test_report_refuses_uninitialized_lazy_layers():
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 3))
    S.convert(model, "svdp", 2)
    with pytest.raises(ValueError, match="'0.weight' is not initialized"):
        torch_sttp.report(model)


# ================================================================================= rank values
@pytest.mark.parametrize("rank", [4, np.int64(4), np.int32(4), torch.tensor(4), torch.tensor(4, dtype=torch.int16)])
def test_any_integer_scalar_is_a_rank(rank):
    model = nn.Sequential(nn.Linear(12, 10), nn.Conv2d(3, 6, 3))
    S.convert(model, "sttp", rank)
    plain = S.convert(nn.Sequential(nn.Linear(12, 10), nn.Conv2d(3, 6, 3)), "sttp", 4)
    assert [P.spectral_parametrization(m).ranks for m in model] == [P.spectral_parametrization(m).ranks
                                                                    for m in plain]
    assert type(torch_sttp.conversion(model).options["rank"]) is int
    assert torch_sttp.count_dof((10, 12), "sttp", rank) == torch_sttp.count_dof((10, 12), "sttp", 4)
    by_name = S.convert(nn.Sequential(nn.Linear(12, 10)), "svdp", {"0": rank})
    assert P.spectral_parametrization(by_name[0]).r_mid == 4
    assert torch_sttp.count_model_dof(nn.Sequential(nn.Linear(12, 10)), "svdp", rank).z > 0


@pytest.mark.parametrize("rank", [2.5, 4.0, np.float64(4.0), torch.tensor(4.0), True, "4", 0, -3, None])
def test_non_integer_ranks_are_refused_with_one_message(rank):
    message = r"rank must be a positive integer, got .*; pass e.g. rank=64"
    with pytest.raises(ValueError, match=message):
        S.convert(nn.Sequential(nn.Linear(12, 10)), "sttp", rank)
    with pytest.raises(ValueError, match="layer '0': " + message):
        S.convert(nn.Sequential(nn.Linear(12, 10)), "sttp", {"0": rank})
    with pytest.raises(ValueError, match=message):
        torch_sttp.parametrize(nn.Linear(12, 10), "svdp", rank)
    with pytest.raises(ValueError, match=message):
        torch_sttp.count_dof((10, 12), "sttp", rank)
    with pytest.raises(ValueError, match=message):
        torch_sttp.count_model_dof(nn.Sequential(nn.Linear(12, 10)), "svdp", rank)


# ================================================================================= embedding padding rows
@pytest.mark.parametrize("method", ["svdp", "sttp"])
@pytest.mark.parametrize("init", ["noisy_identity", "random", "pretrained"])
def test_embedding_padding_row_is_kept_and_never_changes(method, init):
    torch.manual_seed(0)
    emb = nn.Embedding(12, 6, padding_idx=3, dtype=F64)
    with torch.no_grad():
        emb.weight[3] = torch.arange(6, dtype=F64) if init == "pretrained" else 0.0
    expected_row = emb.weight.detach()[3].clone()
    model = nn.Sequential(emb)
    twin_dof = torch_sttp.count_model_dof(nn.Sequential(nn.Embedding(12, 6, padding_idx=3)), method, 4, "free")
    S.convert(model, method, 4, spectrum="free", init=init, generator=gen(1))
    assert torch_sttp.report(model).z == pytest.approx(twin_dof.z)
    assert torch.equal(emb.weight.detach()[3], expected_row)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for path in ("dense", "lowrank", "auto"):
        torch_sttp.modules.layer_state(emb).path = path
        for _ in range(2):  # the padding token is never seen; the row must not move anyway
            opt.zero_grad()
            model(torch.tensor([[0, 1, 2, 4, 5, 11]])).square().sum().backward()
            opt.step()
        out = model(torch.tensor([[3, 3, 0]]))
        assert torch.equal(out[0, 0], expected_row) and torch.equal(out[0, 1], expected_row)
        assert torch.equal(emb.weight.detach()[3], expected_row)
    x = torch.tensor([[3, 1, 7]])
    y = model(x).detach()
    factorized = to_factorized(copy.deepcopy(model))
    torch.testing.assert_close(factorized(x), y, rtol=1e-12, atol=1e-12)
    dense = to_dense(model)[0]
    assert type(dense) is nn.Embedding and dense.padding_idx == 3
    assert torch.equal(dense.weight.detach()[3], expected_row)
    torch.testing.assert_close(dense(x), y, rtol=1e-12, atol=1e-12)


def test_dense_checkpoint_sets_the_padding_row():
    source = nn.Sequential(nn.Embedding(8, 4, padding_idx=0))
    with torch.no_grad():
        source[0].weight[0] = 1.5
    model = S.convert(nn.Sequential(nn.Embedding(8, 4, padding_idx=0)), "svdp", 4, spectrum="free")
    model.load_state_dict(source.state_dict())
    torch.testing.assert_close(model(torch.tensor([0, 5])), source(torch.tensor([0, 5])))


@pytest.mark.parametrize("path", ["auto", "dense", "lowrank"])
def test_a_converted_embedding_under_autocast_returns_what_a_plain_one_does(path):
    """nn.Embedding is not an autocast op: its rows keep the weight's dtype under bf16 autocast, on every path."""
    torch.manual_seed(0)
    plain = nn.Embedding(2000, 16, padding_idx=0)
    layer = S.convert(nn.Sequential(copy.deepcopy(plain)), "svdp", 4, spectrum="free", init="pretrained",
                      path=path)[0]
    idx = torch.tensor([[0, 5, 1999], [7, 0, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows, reference = layer(idx), plain(idx)
    assert rows.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(rows, layer.weight.detach()[idx], rtol=1e-5, atol=1e-6)


def test_convert_inside_autocast_equals_convert_outside_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 6))
    outside = S.convert(copy.deepcopy(net), "svdp", 4, spectrum="free", init="pretrained")
    inside = copy.deepcopy(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        S.convert(inside, "svdp", 4, spectrum="free", init="pretrained")
    a, b = outside.state_dict(), inside.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_converted_embedding_resized_in_place_refuses_to_run():
    """Resizing by hand (as transformers' resize_token_embeddings does) cannot reach the SVDP/STTP weight: the next
    forward says so instead of an index error deep inside."""
    layer = S.convert(nn.Sequential(nn.Embedding(10, 8)), "svdp", 4)[0]
    layer.num_embeddings = 12
    with pytest.raises(ValueError, match="says 12 × 8 but its SVDP/STTP weight is 10 × 8: a converted layer cannot "
                                         "be resized in place"):
        layer(torch.tensor([11]))
