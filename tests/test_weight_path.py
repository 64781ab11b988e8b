"""The batched weight path (torch_sttp.weight_path through the planner): equal to the layer-by-layer computation,
padding inert, operator calls bounded and independent of the number of cores, no host synchronisation, CUDA-graph
capture, torch.compile of paper models, and the GPU check's CPU smoke run."""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_sttp
from torch_sttp import cost
from torch_sttp.frames import compact_wy
from torch_sttp.parametrizations import parametrization_tensors, spectral_parametrization
from torch_sttp.planner import member_parametrization, member_tensors
from torch_sttp.weight_path import WeightPlan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness  # noqa: E402  (benchmarks/harness.py: the operator counts the benchmark prints)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def close(actual, expected, tol=1e-12):
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


class Zoo(nn.Module):
    """Every layer kind, shapes repeated (batched products), ranks mixed inside one shape, sides without cores."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6, padding_idx=2)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)  # same shape as c2, another rank (see RANKS)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 12, 1)  # a 1×1 kernel: a mode of size 1
        self.up = nn.ConvTranspose2d(12, 6, 3, stride=2, padding=1, output_padding=1)
        self.conv1d = nn.Conv1d(6, 10, 3)
        self.big1 = nn.Linear(300, 300)  # large: formed layer by layer on a CPU
        self.big2 = nn.Linear(300, 300)
        self.fc = nn.Linear(6 * 16 * 16, 300)
        self.to1 = nn.Linear(300, 1)  # d_out = 1: no U cores
        self.from1 = nn.Linear(1, 10)  # d_in = 1: no V cores
        self.scalar = nn.Linear(1, 1)  # no cores at all

    def forward(self, x, idx):
        h = torch.tanh(self.c4(torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x))))))))
        h = self.up(torch.tanh(self.pw(h))).flatten(1)
        h = self.big2(torch.tanh(self.big1(torch.tanh(self.fc(h)))))
        s = self.scalar(self.to1(h))
        e = self.conv1d(self.emb(idx).transpose(1, 2)).mean(-1)
        return self.from1(s) + e


RANKS = {"emb": 3, "c1": 4, "c2": 4, "c3": 3, "c4": 4, "pw": 5, "up": 4, "conv1d": 3, "big1": 6, "big2": 6, "fc": 5,
         "to1": 4, "from1": 4, "scalar": 1}


def zoo(method, spectrum, batching="shape", seed=0):
    torch.manual_seed(seed)
    model = Zoo().double()
    torch_sttp.convert(model, method, RANKS, spectrum=spectrum, init="random", batching=batching,
                       generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # S with distinct values and signs, reflectors off the identity
        for name, p in model.named_parameters():
            if name.endswith("original2"):
                p.copy_((0.5 + torch.rand(p.shape, generator=gen, dtype=F64)) * torch.where(
                    torch.arange(p.numel()) % 3 == 0, -1.0, 1.0).to(F64))
    return model


def same_gradients(model, got, want):
    """Gradients of ``model``'s parameters (None where unused) equal, parameter by parameter."""
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            close(a, b)


def reference_weight(module):
    """W from the layer's own parametrization chain, one layer at a time (no planner)."""
    p = spectral_parametrization(module)
    w = p(*parametrization_tensors(module))
    chain = list(module.parametrizations["weight"])
    for later in chain[chain.index(p) + 1:]:
        w = later(w)
    return w


# =================================================================================== equal to the per-layer path
@pytest.mark.parametrize("spectrum", ["identity", "normalized", "free"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_weights_factors_and_gradients_equal_the_layer_by_layer_computation(method, spectrum):
    model = zoo(method, spectrum)
    layers = [m for _, m in torch_sttp.converted_layers(model)]
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(7)
    dw = [torch.randn(m.weight.shape, generator=gen, dtype=F64) for m in layers]
    with torch_sttp.forward_pass(model):
        weights = [m.spectral_weight() for m in layers]
        factors = [m.spectral_factors() for m in layers]
    expected = [reference_weight(m) for m in layers]
    for m, w, e in zip(layers, weights, expected):
        close(w, e)
    for m, (u, sigma, vt) in zip(layers, factors):
        ru, rs, rvt = spectral_parametrization(m).factors(*parametrization_tensors(m))
        close(u, ru), close(vt, rvt)
        assert (sigma is None) == (rs is None)
        if sigma is not None:
            close(sigma, rs)
    loss = sum((w * g).sum() for w, g in zip(weights, dw))
    loss = loss + sum((u.sum() + vt.square().sum() + (0 if s is None else s.cos().sum())) for u, s, vt in factors)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    ref_factors = [spectral_parametrization(m).factors(*parametrization_tensors(m)) for m in layers]
    ref_loss = sum((w * g).sum() for w, g in zip(expected, dw))
    ref_loss = ref_loss + sum((u.sum() + vt.square().sum() + (0 if s is None else s.cos().sum()))
                              for u, s, vt in ref_factors)
    want = torch.autograd.grad(ref_loss, params, allow_unused=True)
    same_gradients(model, got, want)


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_frames_equal_the_layer_by_layer_frames(method):
    model = zoo(method, "normalized")
    with torch_sttp.forward_pass(model):
        for _, m in torch_sttp.converted_layers(model):
            u, v = torch_sttp.conversion(model).planner.frames(m)
            ru, rv = spectral_parametrization(m).frames(*parametrization_tensors(m)[:2])
            assert len(u) == len(ru) and len(v) == len(rv)
            for a, b in zip(u + v, ru + rv):
                close(a, b)


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_training_outputs_equal_across_batchings(method):
    """One family per shape, everything padded into one family, or each layer alone: the same outputs and
    gradients (the padded computations equal the unpadded one)."""
    x = torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    idx = torch.tensor([[0, 2, 5, 11], [2, 2, 7, 1]])
    results = []
    for batching in ("shape", "padded", "none"):
        model = zoo(method, "normalized", batching)
        y = model(x, idx)
        (y * y.detach().sin()).sum().backward()
        results.append([y.detach()] + [p.grad for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            close(a, b)


@pytest.mark.parametrize("spectrum", ["identity", "normalized"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_unpadded_families_are_read_in_place(method, spectrum):
    """With no family padded (each frame shape its own family), the frames of U cores and of first V cores are
    split into their steps' operands instead of gathered: factors, weights and gradients equal the per-layer
    computation, and an SVDP plan gathers only its parameters (one index_select forward, one backward)."""
    model = zoo(method, spectrum)
    layers = [m for _, m in torch_sttp.converted_layers(model)]
    costs = cost.weight_path_costs(torch.device("cpu"))._replace(frame_call=0.0)  # never pad to save a call
    plan = WeightPlan([member_parametrization(m) for m in layers], F64, torch.device("cpu"), costs)
    direct = [s for s, d in zip(plan.steps, plan.step_direct) if d]
    assert {s.side for s in direct} == {0, 1}
    if method == "sttp":
        assert any(s.side == 0 and s.parent is not None for s in direct)  # a U core inside a train: a view
    if spectrum == "normalized":  # Σ in the order of the U blocks: every block's and shape's rows are one range
        rows = [b.sigma_rows for b in plan.blocks] + [g.sigma_rows for g in plan.shapes]
        assert all(isinstance(r, tuple) for r in rows if r is not None) and any(r is not None for r in rows)
    tensors = [member_tensors(m) for m in layers]
    result = plan.run(tensors)
    weights = [result.weight(i) for i in range(len(layers))]
    factors = [result.factors(i) for i in range(len(layers))]
    loss = sum((w * w.detach().cos()).sum() + u.sum() + vt.square().sum() for w, (u, _, vt) in zip(weights, factors))
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    reference = [spectral_parametrization(m) for m in layers]
    ref_weights = [p(*t) for p, t in zip(reference, tensors)]
    ref_factors = [p.factors(*t) for p, t in zip(reference, tensors)]
    for w, rw, (u, sigma, vt), (ru, rs, rvt) in zip(weights, ref_weights, factors, ref_factors):
        close(w, rw), close(u, ru), close(vt, rvt)
        assert (sigma is None) == (rs is None)
    ref_loss = sum((w * w.detach().cos()).sum() + u.sum() + vt.square().sum()
                   for w, (u, _, vt) in zip(ref_weights, ref_factors))
    want = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    same_gradients(model, got, want)


@pytest.mark.parametrize("spectrum", ["identity", "normalized"])
def test_an_svdp_plan_forms_unpadded_families_from_their_parameters(spectrum):
    """Two layers of one shape, one of another, one rank, no padding: every family is read in place. A family of
    whole reflector tensors of one form is formed from them without a gather; one that mixes reduced U frames
    (identity spectrum) with full V frames gathers its Y, and nothing else goes through a gather but the spectra."""
    torch.manual_seed(0)
    model = torch_sttp.convert(nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 16)), "svdp", 4,
                               spectrum=spectrum, init="random")
    layers = [m for _, m in torch_sttp.converted_layers(model)]
    costs = cost.weight_path_costs(torch.device("cpu"))._replace(frame_call=0.0)
    plan = WeightPlan([member_parametrization(m) for m in layers], torch.float32, torch.device("cpu"), costs)
    assert all(plan.direct) and all(plan.step_direct)
    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.index_select.default:
                reads.append(out.numel())
            return out

    with Reads():
        tensors = [member_tensors(m) for m in layers]
        result = plan.run(tensors)
        loss = sum(result.weight(i).square().sum() for i in range(len(layers)))
        grads = torch.autograd.grad(loss, [t for ts in tensors for t in ts])
    if spectrum == "identity":
        assert plan.formed_reduced == [None, False] and plan.y_sizes == [5 * 16 * 4]
        gathered = sum(t.numel() for t in tensors[0][:1] + tensors[1] + tensors[2])  # not layer 0's V: formed
        assert sorted(reads) == sorted([plan.y_sizes[0] + 1, gathered]), reads  # forward and backward
    else:
        assert plan.formed_reduced == [False, False] and plan.y_sizes == []
        assert max(reads) <= 3 * 4 + 1, reads  # the spectra (and the constant 1), no reflector entry
    got = iter(grads)
    for m in layers:  # every tensor's gradient equals the per-layer computation's
        own = member_tensors(m)
        wants = torch.autograd.grad(spectral_parametrization(m)(*own).square().sum(), own)
        for want in wants:
            close(next(got), want, 1e-5)


class _DropsGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return None


def test_a_backward_that_reaches_the_weight_path_without_gradients_gives_none_or_zeros():
    """When every gradient arriving at the weight path is None (a custom backward that returns None), the
    parameters get no gradient (None or zeros), not an error."""
    model = zoo("svdp", "normalized")
    layers = [m for _, m in torch_sttp.converted_layers(model)]
    tensors = [member_tensors(m) for m in layers]
    plan = WeightPlan([member_parametrization(m) for m in layers], F64, torch.device("cpu"),
                      cost.weight_path_costs(torch.device("cpu")))
    result = plan.run(tensors)
    other = torch.ones(1, dtype=F64, requires_grad=True)
    loss = sum(_DropsGradient.apply(result.weight(i)).sum() for i in range(len(layers))) + other.sum()
    grads = torch.autograd.grad(loss, [t for ts in tensors for t in ts] + [other], allow_unused=True)
    assert all(g is None or not g.any() for g in grads[:-1]) and torch.equal(grads[-1], torch.ones(1, dtype=F64))


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_bfloat16_weights_equal_the_per_layer_computation(method):
    """bfloat16 parameters: frames in float32, cores cast once per family before the gather; the weights equal the
    per-layer path's to bfloat16 rounding, and every tensor gets a bfloat16 gradient."""
    model = zoo(method, "normalized").to(torch.bfloat16)
    layers = [m for _, m in torch_sttp.converted_layers(model)]
    tensors = [member_tensors(m) for m in layers]
    plan = WeightPlan([member_parametrization(m) for m in layers], torch.bfloat16, torch.device("cpu"),
                      cost.weight_path_costs(torch.device("cpu")))
    result = plan.run(tensors)
    for i, m in enumerate(layers):
        want = spectral_parametrization(m)(*tensors[i]).float()
        torch.testing.assert_close(result.weight(i).float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    grads = torch.autograd.grad(sum(result.weight(i).float().sum() for i in range(len(layers))),
                                [t for ts in tensors for t in ts], allow_unused=True)
    assert all(g is None or g.dtype == torch.bfloat16 for g in grads) and any(g is not None for g in grads)


def test_zero_padding_of_frames_is_exactly_inert():
    gen = torch.Generator().manual_seed(0)
    n, r, n_pad, r_pad = 7, 3, 10, 5
    free = torch.randn(2, n, r, generator=gen, dtype=F64)
    y = free.tril(-1) + torch.eye(n, r, dtype=F64)
    y.requires_grad_(True)
    padded = torch.zeros(2, n_pad, r_pad, dtype=F64)
    padded[:, :n, :r] = y
    pad = torch.zeros(2, r_pad, dtype=F64)
    pad[:, r:] = 1.0
    q = compact_wy(y)
    qp = compact_wy(padded, pad)
    close(qp[:, :n, :r], q)
    assert torch.equal(qp[:, n:, :r], torch.zeros_like(qp[:, n:, :r]))  # padded rows: exactly zero
    g = torch.randn(2, n, r, generator=gen, dtype=F64)
    (gy,) = torch.autograd.grad((q * g).sum(), y)
    gp = torch.zeros(2, n_pad, r_pad, dtype=F64)
    gp[:, :n, :r] = g
    leaf = padded.detach().requires_grad_(True)
    (gpad,) = torch.autograd.grad((compact_wy(leaf, pad) * gp).sum(), leaf)
    close(gpad[:, :n, :r], gy)
    assert gpad[:, n:].abs().max() == 0 and gpad[:, :, r:].abs().max() == 0


# ================================================================================================== FLOP model
@pytest.mark.parametrize("shape, rank", [((96, 40), 8), ((64, 16, 3, 3), 64), ((27, 128), 16), ((1, 30), 4)])
def test_train_flops_are_the_flops_of_the_contraction(shape, rank):
    """cost.train_flops counts exactly the GEMM FLOPs of contracting each side from its outer end, and the
    backward exactly twice as many (what benchmarks/weights.py's FLOP bound adds for STTP)."""
    from torch.utils.flop_counter import FlopCounterMode

    from torch_sttp.parametrizations import SpectralParametrization
    from torch_sttp.tt import contract_train

    p = SpectralParametrization(shape, rank, method="sttp")
    for side in (p.u_side, p.v_side):
        if not side.modes:
            assert cost.train_flops(side) == 0
            continue
        cores = [torch.randn(side.ranks[k], n, side.ranks[k + 1], dtype=F64, requires_grad=True)
                 for k, n in enumerate(side.modes)]
        with FlopCounterMode(display=False) as forward:
            train = contract_train(cores)
        with FlopCounterMode(display=False) as backward:
            train.backward(torch.randn_like(train))
        assert forward.get_total_flops() == cost.train_flops(side)
        assert cost.train_flops(side) > 0 or len(side.modes) == 1
        assert backward.get_total_flops() == 2 * cost.train_flops(side)


def test_weight_path_flops_of_svdp_are_the_floor_plus_two_frames():
    from torch_sttp.frames import frame_flops
    from torch_sttp.parametrizations import SpectralParametrization

    p = SpectralParametrization((64, 16, 3, 3), 32, method="svdp")
    floor, ours = cost.weight_path_flops(p)
    assert floor == 6 * 64 * 144 * 32
    assert ours == floor + frame_flops(64, 32) + frame_flops(144, 32)


# ============================================================================================== operator calls
@functools.lru_cache(maxsize=None)
def _dense_calls(name):
    model = harness.build(name)
    counter = harness.step_calls(model, harness.model_input(name, model))
    return counter.calls, counter.non_view


COUNT_CASES = [(name, method, rank) for name in harness.PAPER_MODELS for method, rank in
               (("sttp", 16), ("sttp", 64), ("svdp", 64))]


@pytest.mark.parametrize("name, method, rank", COUNT_CASES)
def test_operator_calls_of_a_training_step_are_bounded(name, method, rank):
    """What the weight path adds to one training step (batch 1, path="dense", after a warm-up step): ≤ 800 calls
    for the SNGAN models, ≤ 1600 for WRN-28-10 (benchmarks/weights.py prints the table)."""
    model = harness.build(name, method, rank, init="identity")
    counter = harness.step_calls(model, harness.model_input(name, model))
    calls, non_view = counter.calls - _dense_calls(name)[0], counter.non_view - _dense_calls(name)[1]
    assert 0 < non_view < calls <= (1600 if name == "wrn28-10" else 800), (calls, non_view)


def _stack(k: int, method: str, extra: bool = False) -> nn.Module:
    """conv → k convs of one shape → (a linear of a shape already present) → linear."""
    layers = [nn.Conv2d(3, 16, 3, padding=1)] + [nn.Conv2d(16, 16, 3, padding=1) for _ in range(k)]
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 64)] + ([nn.Linear(64, 64)] if extra else [])
    torch.manual_seed(0)
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    return torch_sttp.convert(model, method, 8, path="dense", init="identity")


def _added_calls(model) -> int:
    x = torch.randn(1, 3, 8, 8)
    return harness.step_calls(model, x).calls - harness.step_calls(torch_sttp.to_dense(copy.deepcopy(model)), x).calls


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_calls_do_not_grow_with_layers_of_present_shapes(method):
    """A layer of a shape already present adds the same few calls however many layers of that shape there are —
    two per parameter tensor (its slice of the concatenated gradient, its accumulation): nothing in the weight path
    is repeated per core or per layer of a known shape (the second layer of a shape turns its product into a
    batched one, a few calls once)."""
    counts = [_added_calls(_stack(k, method)) for k in (1, 2, 3, 4, 6)]
    steps = [b - a for a, b in zip(counts, counts[1:])]
    assert steps[1] == steps[2] and counts[-1] - counts[-2] == 2 * steps[1], counts
    assert 0 < steps[1] <= 2 * 3 and steps[0] <= 40, counts  # U reflectors, V reflectors, S
    assert 0 < _added_calls(_stack(2, method, extra=True)) - counts[1] <= 40


# ==================================================================================== no host synchronisation
SYNCING = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "is_nonzero", "masked_select", "equal",
           "_unique2", "unique_dim", "unique_consecutive", "bincount", "repeat_interleave", "allclose"}


class NoSync(TorchDispatchMode):
    """Raises on every operator that reads device data on the host (``.item()``, ``.tolist()``, ``bool(t)``,
    data-dependent shapes)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8, padding_idx=0)
        self.conv = nn.Conv1d(8, 12, 3, padding=1)
        self.up = nn.ConvTranspose1d(12, 6, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(6 * 10, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, idx):
        h = torch.tanh(self.conv(self.emb(idx).transpose(1, 2)))
        return self.head(torch.tanh(self.fc(self.up(h).flatten(1))))


@pytest.mark.parametrize("path", ["auto", "dense", "lowrank"])
@pytest.mark.parametrize("spectrum", ["identity", "normalized", "free"])
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_a_training_step_never_synchronises_with_the_host(method, spectrum, path):
    torch.manual_seed(0)
    model = torch_sttp.convert(Mixed(), method, 4, spectrum=spectrum, path=path)
    idx = torch.randint(0, 10, (3, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):  # the first step builds the plan (host work on host index maps), the others reuse it
        with NoSync() if step else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            model(idx).square().mean().backward()
            opt.step()
    with torch.no_grad(), NoSync():
        model.eval()(idx)
        with torch_sttp.cached(model):
            model(idx)
            model(idx)


@pytest.mark.parametrize("name, method, rank", [("wrn28-10", "sttp", 16), ("wrn28-10", "svdp", 64),
                                                ("sngan32-d", "sttp", 64), ("sngan32-g", "sttp", 16)])
def test_a_paper_model_training_step_never_synchronises_with_the_host(name, method, rank):
    """A converted paper model's step (forward paths chosen per layer, as in training) after the warm-up step that
    builds the plan: forward, ``loss.backward()`` and an SGD update read nothing back to the host."""
    model = harness.build(name, method, rank, path="auto", init="identity")
    x = harness.model_input(name, model, batch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        with NoSync() if step else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            opt.step()
    assert all(p.grad is not None for p in model.parameters())


def test_the_finite_check_synchronises_and_is_opt_in():
    model = torch_sttp.convert(Mixed(), "sttp", 4, check_finite=True)
    with pytest.raises(AssertionError, match="host synchronisation"), NoSync():
        model(torch.randint(0, 10, (3, 5)))


# ============================================================================================ CUDA graph capture
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_a_training_step_is_captured_and_replayed_as_a_cuda_graph(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).cuda()
    torch_sttp.convert(model, method, 8)
    eager = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, eager)]
    data = [(torch.randn(4, 3, 8, 8, device="cuda"), torch.randint(0, 10, (4,), device="cuda")) for _ in range(4)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    def step(m, opt, x, y):
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream (plans, autograd state), as capture requires
        for x, y in data[:2]:
            static_x.copy_(x), static_y.copy_(y)
            step(model, opts[0], static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opts[0], static_x, static_y)
    for x, y in data[:2]:
        step(eager, opts[1], x, y)
    for x, y in data[2:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        expected = step(eager, opts[1], x, y)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ================================================================================================ torch.compile
@pytest.mark.skipif(os.environ.get("STTP_TEST_INDUCTOR") != "1",
                    reason="inductor compiles paper models for minutes on 2 CPU cores; set STTP_TEST_INDUCTOR=1")
@pytest.mark.parametrize("name", ["wrn28-10", "sngan32-d"])
def test_paper_models_train_under_inductor(name):
    model = harness.build(name, "sttp", 16, path="auto")
    twin = copy.deepcopy(model)
    x = harness.model_input(name, model, batch=2)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, twin)]
    compiled = torch.compile(model)
    torch._dynamo.reset()
    try:
        for _ in range(2):
            losses = []
            for m, opt in zip((compiled, twin), opts):
                opt.zero_grad()
                loss = m(x).float().square().mean()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=1e-5)
    finally:
        torch._dynamo.reset()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# ============================================================================================== the GPU check
def test_the_gpu_check_runs_on_a_cpu_and_writes_its_report(tmp_path):
    """CI's smoke run of benchmarks/gpu_check.sh (--device cpu --quick): every section runs and reports."""
    report = tmp_path / "report.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--report", str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for section in ("== environment", "== tests marked cuda", "== frames float32", "== frames bfloat16",
                    "== weights", "== training steps", "== kernels of one converted step", "== summary"):
        assert section in text, section
    assert "TARGET frames_fwd_bwd_B64_n128_r64" in text and "TARGET calls_sngan32-d_sttp_r16" in text
    assert "wrn28-10 sttp: step" in text and "sngan32-d+g sttp: step" in text
    assert re.search(r"sngan32-d r=64 one training step .*dense \d+ calls .*sttp \d+ calls", text)
    assert "failed sections: none" in text
