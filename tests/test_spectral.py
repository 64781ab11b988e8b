"""Spectral inspection, regularizers, optimizer groups, SN/SR baselines and plots (:mod:`torch_sttp.spectral` and the
modules it re-exports: inspection, penalties, baselines, plots)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torch_sttp import baselines, inspection, penalties, plots, spectral
from torch_sttp.layers import select_layers, weight_matrix
from torch_sttp.surgery import convert, converted_layers

DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _set_s(layer: nn.Module, values) -> None:
    s = layer.parametrizations.weight.original2
    with torch.no_grad():
        s.copy_(torch.as_tensor(values, dtype=s.dtype))


def _converted(*layers, spectrum="free", rank=4, method="svdp", dtype=torch.float64, **kw):
    model = nn.Sequential(*layers).to(dtype)
    return convert(model, method=method, rank=rank, spectrum=spectrum, **kw)


def _d_opt(*normalized_spectra) -> float:
    vals = [v for s in normalized_spectra for v in s]
    return sum(-math.log(v) for v in vals) / len(vals)


def _div_layer(s, a) -> float:
    terms = [(1 - s[i + 1]) ** 2 / a ** 2 - math.log(s[i] - s[i + 1]) for i in range(len(s) - 1)]
    return sum(terms) / len(terms)


# -------------------------------------------------------------------------------------------------- regularizers
@pytest.mark.parametrize("spectrum", ["free", "normalized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_d_optimal_matches_hand_computation(spectrum, dtype):
    torch.manual_seed(0)
    model = _converted(nn.Linear(10, 6), nn.Linear(6, 5), spectrum=spectrum, dtype=dtype)
    _set_s(model[0], [2.0, 1.0, 0.5, -0.25])      # |σ|/σ_max = 1, 1/2, 1/4, 1/8
    _set_s(model[1], [0.3, 0.9, 0.6, 0.45])       # sorted 0.9, 0.6, 0.45, 0.3 → 1, 2/3, 1/2, 1/3
    expected = _d_opt([1, 0.5, 0.25, 0.125], [1, 2 / 3, 0.5, 1 / 3])
    value = spectral.penalty(model, "d_optimal")
    assert value.dtype == dtype and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert spectral.penalty(model, "d_optimal", weight=0.1).item() == pytest.approx(0.1 * expected, rel=1e-6)
    # selecting one layer
    one = spectral.penalty(model, "d_optimal", layers=["0"])
    assert one.item() == pytest.approx(_d_opt([1, 0.5, 0.25, 0.125]), rel=1e-6)
    assert 6 * math.log(2) / 4 == pytest.approx(one.item(), rel=1e-6)


@pytest.mark.parametrize("spectrum", ["free", "normalized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_divergence_matches_hand_computation(spectrum, dtype):
    model = _converted(nn.Linear(10, 6), nn.Linear(6, 5), nn.Linear(1, 3), spectrum=spectrum, dtype=dtype)
    _set_s(model[0], [2.0, 1.0, 0.5, -0.25])
    _set_s(model[1], [0.3, 0.9, 0.6, 0.45])
    _set_s(model[2], [0.7])  # a single singular value: left out of the average
    a = 0.5
    expected = (_div_layer([1, 0.5, 0.25, 0.125], a) + _div_layer([1, 2 / 3, 0.5, 1 / 3], a)) / 2
    value = spectral.penalty(model, "divergence", a=a)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # layer "0" alone, a = 0.1 (default)
    assert spectral.divergence_penalty(model, layers="0").item() == pytest.approx(
        _div_layer([1, 0.5, 0.25, 0.125], 0.1), rel=1e-6)


def test_penalty_on_dense_layers_uses_svdvals():
    torch.manual_seed(1)
    lin = nn.Linear(7, 5).double()
    sv = torch.linalg.svdvals(lin.weight.detach())
    s = (sv / sv[0]).tolist()
    assert spectral.penalty(lin, "d_optimal").item() == pytest.approx(_d_opt(s), rel=1e-10)
    assert spectral.penalty(lin, "divergence", a=0.3).item() == pytest.approx(_div_layer(s, 0.3), rel=1e-10)
    spectral.penalty(lin, "d_optimal").backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert lin.weight.grad.abs().sum() > 0


def test_penalty_mixes_converted_and_dense_layers():
    torch.manual_seed(2)
    model = _converted(nn.Linear(10, 6), nn.Linear(6, 4), include="0")
    _set_s(model[0], [2.0, 1.0, 0.5, -0.25])
    sv = torch.linalg.svdvals(model[1].weight.detach())
    expected = _d_opt([1, 0.5, 0.25, 0.125], (sv / sv[0]).tolist())
    assert spectral.penalty(model).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("kind", spectral.PENALTIES)
@pytest.mark.parametrize("spectrum", ["free", "normalized"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiny", [1e-30, 0.0])
def test_penalty_gradients_finite_at_tiny_and_zero_sigma(kind, spectrum, dtype, tiny):
    model = _converted(nn.Linear(10, 6), nn.Linear(6, 5), spectrum=spectrum, dtype=dtype)
    _set_s(model[0], [1.0, 0.5, tiny, tiny])
    _set_s(model[1], [tiny, tiny, tiny, tiny])  # the whole spectrum collapsed
    value = spectral.penalty(model, kind)
    assert torch.isfinite(value)
    value.backward()
    for _, layer in converted_layers(model):
        for p in layer.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all()
    s_grad = model[0].parametrizations.weight.original2.grad
    assert s_grad is not None and s_grad[:2].abs().sum() > 0  # differentiable w.r.t. S


@pytest.mark.parametrize("kind", spectral.PENALTIES)
def test_penalty_gradient_finite_for_singular_dense_weight(kind):
    lin = nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 0] = 1.0   # rank one: three zero singular values
    value = spectral.penalty(lin, kind)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(lin.weight.grad).all()


def test_penalty_gradient_reaches_s_and_decreases_d_optimal():
    torch.manual_seed(3)
    model = _converted(nn.Linear(10, 6), spectrum="free")
    _set_s(model[0], [1.0, 0.5, 0.2, 0.1])
    s = model[0].parametrizations.weight.original2
    before = spectral.penalty(model).item()
    spectral.penalty(model).backward()
    assert s.grad[1:].lt(0).all()  # raising small σ lowers −log σ̂
    with torch.no_grad():
        s -= 0.01 * s.grad
    assert spectral.penalty(model).item() < before


@pytest.mark.parametrize("kind", spectral.PENALTIES)
def test_identity_spectrum_penalty_is_constant(kind):
    model = _converted(nn.Linear(10, 6), spectrum="identity", init="random")
    value = spectral.penalty(model, kind, eps=1e-6)
    expected = 0.0 if kind == "d_optimal" else -math.log(1e-6) + 0.0
    assert value.item() == pytest.approx(expected, abs=1e-9)
    assert not value.requires_grad  # no path to the reflectors: zero gradient
    # together with a learned layer, the identity layer's reflectors get no gradient
    mixed = _converted(nn.Linear(10, 6), nn.Linear(6, 5), spectrum="identity", init="random")
    free = _converted(nn.Linear(5, 4), spectrum="free")
    both = nn.Sequential(mixed, free)
    spectral.penalty(both, kind).backward()
    for _, layer in converted_layers(mixed):
        for p in layer.parameters():
            assert p.grad is None or p.grad.abs().max() == 0


def test_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown penalty"):
        spectral.penalty(nn.Linear(3, 3), "nuclear")


def test_sigma_l2_penalty_is_frobenius_norm():
    torch.manual_seed(4)
    model = _converted(nn.Linear(10, 6), nn.Linear(6, 5), spectrum="normalized", init="random")
    _set_s(model[0], [2.0, 1.0, 0.5, -0.25])
    _set_s(model[1], [0.3, 0.9, 0.6, 0.45])
    expected = sum(float(model[i].weight.detach().pow(2).sum()) for i in range(2))
    value = spectral.sigma_l2_penalty(model)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    value.backward()
    assert torch.isfinite(model[0].parametrizations.weight.original2.grad).all()


# ---------------------------------------------------------------------------------------------------- inspection
@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_converted_singular_values_equal_svdvals_of_weight(method):
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 6, 3), nn.Linear(12, 16), nn.Embedding(9, 8), nn.Linear(24, 18)
    ).double()
    convert(model, method=method, rank=5, spectrum="free", init="random")
    for _, layer in converted_layers(model):
        n = layer.parametrizations.weight.original2.numel()
        _set_s(layer, torch.randn(n, dtype=torch.float64))
    sv = spectral.singular_values(model)
    assert list(sv) == [n for n, _ in converted_layers(model)]  # forward order
    for name, layer in converted_layers(model):
        w = layer.weight.detach()
        if isinstance(layer, nn.ConvTranspose2d):
            w = w.transpose(0, 1)
        ref = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
        r = sv[name].numel()
        assert torch.allclose(sv[name], ref[:r], atol=1e-10, rtol=0), name
        assert ref[r:].abs().sum() < 1e-10  # the rest of W's spectrum is zero
        assert torch.all(sv[name][:-1] >= sv[name][1:])
        assert not sv[name].requires_grad


def test_normalized_spectrum_has_unit_sigma_max_fp32():
    torch.manual_seed(6)
    model = convert(nn.Sequential(nn.Linear(20, 12), nn.Conv2d(4, 8, 3)), method="sttp", rank=6,
                    spectrum="normalized", init="random")
    for _, layer in converted_layers(model):
        _set_s(layer, torch.rand(layer.parametrizations.weight.original2.numel()) * 5 + 0.1)
    for name, s in spectral.singular_values(model).items():
        assert s.dtype == torch.float32
        assert abs(s.max().item() - 1.0) < 1e-5
    for _, layer in converted_layers(model):
        w = layer.weight.detach()
        assert abs(torch.linalg.svdvals(w.reshape(w.shape[0], -1)).max().item() - 1.0) < 1e-5


def test_dense_singular_values_and_order():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(2, 5, 3, groups=1), nn.ReLU(), nn.ConvTranspose1d(5, 3, 4),
                          nn.Sequential(nn.Linear(4, 3)), nn.Embedding(6, 2))
    sv = spectral.singular_values(model)
    assert list(sv) == ["0", "2", "3.0", "4"]
    assert torch.allclose(sv["0"], torch.linalg.svdvals(model[0].weight.detach().reshape(5, -1)))
    assert torch.allclose(sv["2"], torch.linalg.svdvals(model[2].weight.detach().transpose(0, 1).reshape(3, -1)))
    assert sv["2"].numel() == 3
    assert list(spectral.singular_values(model, layers=nn.Linear)) == ["3.0"]
    assert list(spectral.singular_values(model, layers=["0", "4"])) == ["0", "4"]
    assert list(spectral.singular_values(model[0])) == [""]
    with pytest.raises(ValueError, match="matches no"):
        spectral.singular_values(model, layers="nope.*")
    snap = spectral.snapshot_spectra(model)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in snap.values())
    grad = spectral.singular_values(model, grad=True)
    assert grad["0"].requires_grad


class _Zoo(nn.Module):
    """Every kind of supported layer the spectral tools read: converted, tied, inside MultiheadAttention, under
    spectral_norm, uninitialized (lazy)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.att = nn.MultiheadAttention(8, 2)
        self.sn = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(8, 5))
        self.lazy = nn.LazyLinear(3)
        self.head = nn.Linear(5, 2)
        convert(self, "svdp", rank=2, include="conv")


def test_spectral_tools_select_through_layers_select_layers():
    model = _Zoo()
    selected, skipped = select_layers(model, inspect=True)
    names = [n for n, _ in selected]
    assert names == ["conv", "a", "b", "att.out_proj", "sn", "head"]
    assert [(n, t) for n, t, _ in skipped] == [("lazy", "LazyLinear")]
    # convert's selection of the same model leaves the converted, tied, MHA and spectral_norm layers out
    convertible = [n for n, _ in select_layers(model)[0]]
    assert "head" in convertible and not (set(names) - {"head"}) & set(convertible)
    assert list(spectral.singular_values(model)) == names
    assert [n for n, _ in baselines.dense_layers(model)] == names[1:]
    assert list(spectral.singular_values(model, layers=nn.Linear)) == names[1:]
    assert list(spectral.singular_values(model, layers="a")) == ["a"]
    # one message for a pattern that matches nothing, the same as convert's
    for bad in ("nope.*", nn.LSTM):
        with pytest.raises(ValueError) as spectral_error:
            spectral.singular_values(model, layers=bad)
        with pytest.raises(ValueError) as convert_error:
            convert(nn.Sequential(nn.Linear(3, 3)), "svdp", rank=2, include=bad)
        assert "matches no module" in str(spectral_error.value)
        assert str(spectral_error.value).split(";")[0] == str(convert_error.value).split(";")[0]
    with pytest.raises(ValueError, match="exclude pattern 'zzz' matches no module"):
        spectral.apply_spectral_norm(model, exclude="zzz")


def test_layer_singular_values_is_sigma_of_the_weight_matrix():
    torch.manual_seed(17)
    model = _converted(nn.ConvTranspose2d(4, 6, 3), nn.Linear(12, 5), spectrum="free", init="random")
    dense = nn.ConvTranspose2d(5, 3, 2).double()
    for layer in (model[0], model[1], dense):
        ref = torch.linalg.svdvals(weight_matrix(layer).detach())
        s = inspection.layer_singular_values(layer).detach()
        assert torch.allclose(s, ref[: s.numel()], atol=1e-12, rtol=0)
    assert weight_matrix(dense).shape == (3, 5 * 2 * 2)


def test_spectral_stats_stable_rank_and_lipschitz_proxy():
    a, b = nn.Linear(3, 3, bias=False).double(), nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        a.weight.copy_(torch.diag(torch.tensor([3.0, 1.0, 1.0])))
        b.weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.5, 0.0]]))
    stats = spectral.spectral_stats(nn.Sequential(a, nn.ReLU(), b))
    assert stats["layers"]["0"]["sigma_max"] == pytest.approx(3.0)
    assert stats["layers"]["0"]["stable_rank"] == pytest.approx(11 / 9)
    assert stats["layers"]["2"]["stable_rank"] == pytest.approx(4.25 / 4)
    assert stats["layers"]["2"]["sigma_min"] == pytest.approx(0.5)
    assert stats["lipschitz_proxy"] == pytest.approx(6.0)


def _dense_conv_matrix(conv: nn.Module, in_shape) -> torch.Tensor:
    """The matrix of x ↦ conv(x) − conv(0) on inputs of ``in_shape`` (C, *spatial), built from basis vectors."""
    n = math.prod(in_shape)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
        out = conv(basis) - conv(torch.zeros(1, *in_shape, dtype=torch.float64))
    return out.reshape(n, -1).T


@pytest.mark.parametrize("make, spatial", [
    (lambda: nn.Conv2d(3, 4, 3), (6, 6)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (7, 6)),
    (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (5, 5)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (5, 4)),
    (lambda: nn.Conv1d(3, 5, 4, stride=3, padding=2), (11,)),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (4, 4)),
    (lambda: nn.Conv3d(2, 2, 2), (3, 3, 3)),
])
def test_conv_operator_norm_matches_dense_reference(make, spatial):
    torch.manual_seed(8)
    conv = make().double()
    in_shape = (conv.in_channels, *spatial)
    ref = torch.linalg.svdvals(_dense_conv_matrix(conv, in_shape))[0].item()
    est = spectral.conv_operator_norm(conv, spatial, iters=5000, tol=1e-9)
    assert est == pytest.approx(ref, rel=1e-4)
    assert spectral.conv_operator_norm(conv, in_shape, iters=5000, tol=1e-9) == pytest.approx(ref, rel=1e-4)


def test_conv_operator_norm_on_converted_conv():
    torch.manual_seed(9)
    model = convert(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)).double(), method="svdp", rank=4,
                    spectrum="free", init="random")
    ref = torch.linalg.svdvals(_dense_conv_matrix(model[0], (3, 5, 5)))[0].item()
    assert spectral.conv_operator_norm(model[0], (5, 5), iters=5000, tol=1e-9) == pytest.approx(ref, rel=1e-4)
    with pytest.raises(TypeError):
        spectral.conv_operator_norm(nn.Linear(3, 3), (3,))


# ----------------------------------------------------------------------------------------------- optimizer groups
def test_param_groups_split_and_weight_decay():
    torch.manual_seed(10)
    model = nn.Sequential(
        convert(nn.Sequential(nn.Linear(10, 6)), method="svdp", rank=4, spectrum="free"),
        convert(nn.Sequential(nn.Linear(6, 5)), method="svdp", rank=4, spectrum="normalized"),
        convert(nn.Sequential(nn.Linear(5, 4)), method="svdp", rank=4, spectrum="identity"),
        nn.LayerNorm(4),
    )
    groups = {g["name"]: g for g in spectral.param_groups(model, weight_decay=1e-3)}
    assert set(groups) == {"reflectors", "spectrum", "spectrum_normalized", "other"}
    assert len(groups["reflectors"]["params"]) == 6 and groups["reflectors"]["weight_decay"] == 0.0
    assert groups["spectrum"]["params"][0] is model[0][0].parametrizations.weight.original2
    assert groups["spectrum"]["weight_decay"] == 1e-3
    assert groups["spectrum_normalized"]["weight_decay"] == 0.0
    assert groups["other"]["weight_decay"] == 1e-3 and len(groups["other"]["params"]) == 5  # 3 biases + LN
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.AdamW(spectral.param_groups(model, weight_decay=1e-2), lr=1e-3)
        assert spectral.check_optimizer(opt, model) == []
    with pytest.warns(UserWarning, match="scale"):
        groups = spectral.param_groups(model, spectrum_weight_decay=1e-2)
    assert [g["weight_decay"] for g in groups if g["name"] == "spectrum"] == [1e-2]


def test_check_optimizer_warns_on_reflector_decay_and_missing_params():
    model = convert(nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 3)), method="sttp", rank=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)   # default weight_decay=0.01 on everything
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages = spectral.check_optimizer(opt, model)
    assert len(messages) == 2 and [str(w.message) for w in caught] == messages
    assert all(w.category is UserWarning for w in caught)
    assert "reflectors" in messages[0] and "normalized" in messages[1]
    dense = nn.Sequential(nn.Linear(10, 6))
    early = torch.optim.SGD(dense.parameters(), lr=0.1)
    convert(dense, method="svdp", rank=3)
    with pytest.warns(UserWarning, match="does not hold"):
        spectral.check_optimizer(early, dense)


# --------------------------------------------------------------------------------------------------- SN baseline
def test_spectral_norm_reaches_unit_sigma_max():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Conv1d(2, 3, 3), nn.Embedding(10, 7))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    spectral.apply_spectral_norm(model, exclude="3", n_power_iterations=1)
    assert not torch.nn.utils.parametrize.is_parametrized(model[3], "weight")
    model.train()
    x = torch.randn(4, 16)
    for _ in range(100):
        model[0](x)
        model[2](torch.randn(1, 2, 8))
    for i in (0, 2):
        w = model[i].weight.detach()
        assert torch.linalg.svdvals(w.reshape(w.shape[0], -1))[0].item() == pytest.approx(1.0, abs=1e-2)
    sv = spectral.singular_values(model.eval())
    assert sv["0"][0].item() == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(ValueError):
        spectral.apply_spectral_norm(convert(nn.Sequential(nn.Linear(4, 4)), method="svdp", rank=2))


# --------------------------------------------------------------------------------------------------- SR baseline
def _collapse_step(model, gen, shrink=0.7):
    """A fake training update: noise, and the lower half of each spectrum shrinks (spectral collapse)."""
    with torch.no_grad():
        for m in (mod for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))):
            w = spectral.sr_target(m)
            mat = w.reshape(w.shape[0], -1)
            u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            s = s.clone()
            s[s.numel() // 2:] *= shrink
            new = (u * s) @ vh + 0.01 * torch.randn(mat.shape, generator=gen, dtype=mat.dtype)
            w.copy_(new.reshape(w.shape))


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_spectral_regularization_compensates_and_leaves_weights_alone_otherwise(spectral_norm):
    torch.manual_seed(12)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Conv2d(3, 6, 3)).double()
    reg = spectral.apply_spectral_regularization(model, every=3, spectral_norm=spectral_norm)
    assert torch.nn.utils.parametrize.is_parametrized(model[0], "weight") == spectral_norm
    changed = 0
    for it in range(12):
        _collapse_step(model, gen)
        before = {n: spectral.sr_target(m).detach().clone() for n, m in reg.layers}
        compensated = reg.step()
        assert compensated == ((it + 1) % 3 == 0)
        for name, m in reg.layers:
            after = spectral.sr_target(m).detach()
            if not compensated:
                assert torch.equal(after, before[name])  # bit-identical between compensation steps
                continue
            changed += int(not torch.equal(after, before[name]))
            s = torch.linalg.svdvals(after.reshape(after.shape[0], -1))
            assert torch.all(s / s[0] >= reg.running_max[name] - 1e-10)
            s_before = torch.linalg.svdvals(before[name].reshape(after.shape[0], -1))
            assert s[0].item() == pytest.approx(s_before[0].item(), rel=1e-10)  # σ_max kept
    assert changed > 0
    state = reg.state_dict()
    other = spectral.SpectralRegularizer(model, every=3)
    other.load_state_dict(state)
    assert other.num_steps == 12 and torch.equal(other.running_max["0"], reg.running_max["0"])


def test_spectral_regularization_attaches_to_optimizer():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = spectral.apply_spectral_regularization(model, every=2, optimizer=opt)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(3, 6)).pow(2).sum().backward()
        opt.step()
    assert reg.num_steps == 4
    reg.detach()
    opt.step()
    assert reg.num_steps == 4
    with pytest.raises(ValueError):
        spectral.SpectralRegularizer(model, every=0)


def test_spectral_regularization_of_a_transposed_conv_keeps_its_layout():
    torch.manual_seed(18)
    layer = nn.ConvTranspose2d(6, 4, 3).double()            # W = (C_out, C_in·∏kernel) = (4, 54)
    reg = spectral.SpectralRegularizer(nn.Sequential(layer))
    reg.step()
    u, s, vh = torch.linalg.svd(weight_matrix(layer).detach(), full_matrices=False)
    shrink = torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=s.dtype)
    collapsed = (u * (s * shrink)) @ vh                     # the spectrum collapsed in the matrix view
    with torch.no_grad():                                   # written back in the layer's own (C_in, C_out, k, k)
        layer.weight.copy_(collapsed.reshape(4, 6, 3, 3).transpose(0, 1))
    assert torch.allclose(torch.linalg.svdvals(weight_matrix(layer).detach()), s * shrink)
    assert reg.step()
    after = torch.linalg.svdvals(weight_matrix(layer).detach())
    assert torch.allclose(after, s, rtol=1e-10)             # lifted back to the running maximum
    u2, _, vh2 = torch.linalg.svd(weight_matrix(layer).detach(), full_matrices=False)
    assert torch.allclose((u2.T @ u).abs(), torch.eye(4, dtype=s.dtype), atol=1e-8)  # same singular vectors
    assert baselines.sr_target(layer) is layer.weight


# --------------------------------------------------------------------------------------------------------- plots
def _read_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_plot_spectra_one_column_per_layer(tmp_path):
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(40, 12))
    convert(model, method="svdp", rank=6, include=["2"], spectrum="free")
    out = spectral.plot_spectra(model, tmp_path / "spectra.png", top_k=16, title="test")
    assert out == str(tmp_path / "spectra.png") and (tmp_path / "spectra.png").exists()
    img = _read_png(out)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert out.matrix.shape == (12, 3)  # one column per layer; rows: min(top_k, largest rank)
    assert out.layers == ["0", "2", "4"]
    assert out.matrix[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert math.isnan(out.matrix[6, 1]) and not math.isnan(out.matrix[5, 1])  # rank 6 column
    assert math.isnan(out.matrix[8, 0]) and not math.isnan(out.matrix[7, 0])  # Conv2d(3, 8, 3): rank 8
    assert not np.isnan(out.matrix[:, 2]).any()  # Linear(40, 12): rank 12
    raw = spectral.plot_spectra(spectral.snapshot_spectra(model), tmp_path / "raw.png", top_k=4, normalize=False)
    assert raw.matrix.shape == (4, 3) and (tmp_path / "raw.png").exists()


def test_plot_spectra_over_training(tmp_path):
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snapshots = []
    for _ in range(5):
        snapshots.append(spectral.snapshot_spectra(model))
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
    out = spectral.plot_spectra(snapshots, tmp_path / "history.png")
    _read_png(out)
    assert out.kind == "history" and out.matrix.shape == (2, 5) and out.steps == [0, 1, 2, 3, 4]
    expected = snapshots[3]["2"].min() / snapshots[3]["2"].max()
    assert out.matrix[1, 3] == pytest.approx(expected.item(), rel=1e-6)
    by_step = spectral.plot_spectra({10 * i: s for i, s in enumerate(snapshots)}, tmp_path / "by_step.png")
    assert by_step.steps == [0, 10, 20, 30, 40] and (tmp_path / "by_step.png").exists()
    pairs = spectral.plot_spectra([(7, snapshots[0]), (9, snapshots[1])], tmp_path / "pairs.png", layers=["2"])
    assert pairs.matrix.shape == (1, 2) and pairs.layers == ["2"]


def test_figure_functions_return_what_they_drew(tmp_path):
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    fig = plots.plot_layer_spectra(model, tmp_path / "spectra.png", top_k=5)
    assert isinstance(fig, plots.SpectraFigure) and not isinstance(fig, str)
    assert fig.path == str(tmp_path / "spectra.png") and fig.steps is None and fig.layers == ["0", "2"]
    _read_png(fig.path)
    s = spectral.singular_values(model)
    assert fig.matrix[:, 0].tolist() == pytest.approx((s["0"][:5] / s["0"][0]).tolist(), rel=1e-6)
    assert fig.matrix[:4, 1].tolist() == pytest.approx((s["2"] / s["2"][0]).tolist(), rel=1e-6)
    assert math.isnan(fig.matrix[4, 1])
    snapshots = {3: spectral.snapshot_spectra(model), 1: spectral.snapshot_spectra(model)}
    hist = plots.plot_spectra_history(snapshots, tmp_path / "history.png", layers="2")
    assert hist.steps == [1, 3] and hist.layers == ["2"] and hist.matrix.shape == (1, 2)
    assert hist.matrix[0, 0] == pytest.approx((s["2"].min() / s["2"].max()).item(), rel=1e-6)
    _read_png(hist.path)
    with pytest.raises(ValueError, match="no layers to plot"):
        plots.plot_spectra_history(snapshots, tmp_path / "none.png", layers="nope")
    with pytest.raises(TypeError, match="mappings"):
        plots.plot_spectra_history({0: s["0"]}, tmp_path / "bad.png")


def test_plot_spectra_wraps_the_figure_functions_with_the_same_files(tmp_path):
    torch.manual_seed(20)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Linear(6, 4))
    snapshots = [spectral.snapshot_spectra(model) for _ in range(3)]
    for name, arg, figure in (("spectra", model, plots.plot_layer_spectra),
                              ("history", snapshots, plots.plot_spectra_history)):
        old = spectral.plot_spectra(arg, tmp_path / f"old_{name}.png", title="t")
        new = figure(arg, tmp_path / f"new_{name}.png", title="t")
        assert isinstance(old, spectral.SpectraPlot) and old == str(tmp_path / f"old_{name}.png")
        assert old.kind == name and old.layers == new.layers and old.steps == new.steps
        assert np.array_equal(old.matrix, new.matrix, equal_nan=True)
        assert (tmp_path / f"old_{name}.png").read_bytes() == (tmp_path / f"new_{name}.png").read_bytes()


def test_every_public_name_is_still_importable_from_spectral():
    for module in (inspection, penalties, baselines, plots):
        for name in module.__all__:
            assert getattr(spectral, name) is getattr(module, name), name
    import torch_sttp

    for name in ("SpectralRegularizer", "apply_spectral_norm", "apply_spectral_regularization", "check_optimizer",
                 "conv_operator_norm", "param_groups", "penalty", "plot_spectra", "sigma_l2_penalty",
                 "singular_values", "snapshot_spectra", "spectral_stats"):
        assert getattr(torch_sttp, name) is getattr(spectral, name)


# ------------------------------------------------------------------------------------------------------ devices
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_and_dtype_agnostic(device, dtype):
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Linear(4, 3)).to(device, dtype)
    convert(model, method="sttp", rank=4, spectrum="free", include=["0", "2"])
    for kind in spectral.PENALTIES:
        value = spectral.penalty(model, kind)
        assert value.device.type == device and value.dtype == dtype
        value.backward()
    for s in spectral.singular_values(model).values():
        assert s.device.type == device and s.dtype == dtype
    assert spectral.conv_operator_norm(model[2], (5, 5)) > 0
    dense = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(2, 3, 3)).to(device, dtype)
    reg = spectral.apply_spectral_regularization(dense, every=1)
    reg.step()
    assert all(v.device.type == device for v in reg.running_max.values())


@pytest.mark.parametrize("method", ["svdp", "sttp"])
def test_a_padded_embedding_reports_the_spectrum_of_the_weight_it_uses(method):
    # the fixed padding row replaces a row of U·Σ·Vᵀ: |Σ| is not the spectrum of the layer's weight
    padded, plain = _converted(nn.Embedding(9, 6, padding_idx=1), nn.Embedding(9, 6), spectrum="normalized",
                               rank=3, method=method, init="random").children()
    for layer in (padded, plain):
        _set_s(layer, [0.3, -1.0, 0.7])
    sigma = inspection.singular_values(padded)[""]
    assert torch.allclose(sigma, torch.linalg.svdvals(padded.weight)[:3], atol=1e-12)
    assert not torch.allclose(sigma, torch.tensor([1.0, 0.7, 0.3], dtype=sigma.dtype))
    assert torch.allclose(inspection.singular_values(plain)[""], torch.tensor([1.0, 0.7, 0.3], dtype=sigma.dtype))
    stats = inspection.spectral_stats(nn.Sequential(padded))["layers"]["0"]
    assert stats["sigma_max"] == pytest.approx(float(torch.linalg.svdvals(padded.weight)[0]), abs=1e-12)
    assert stats["sigma_max"] <= 1.0  # a zero row only lowers the singular values (interlacing)
