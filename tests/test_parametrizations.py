"""Tests for torch_sttp.parametrizations: SVDP/STTP maps, DOF, right_inverse, layer integration, checkpoints."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

import torch_sttp
from torch_sttp import parametrizations as P
from torch_sttp.parametrizations import SpectralParametrization, spectrum_warnings
from torch_sttp.tt import METHODS, SPECTRA, count_dof

F64 = torch.float64

# (weight shape, transposed): the weight as the layer stores it
SHAPES = [
    ((6, 10), False),
    ((12, 18, 3, 3), False),  # Conv2d weight
    ((8, 6, 3), True),  # ConvTranspose1d weight (C_in=8, C_out=6, k=3): layout (6, 8, 3)
    ((1, 20), False),
    ((20, 1), False),
    ((30, 3), False),
    ((7, 5), False),  # primes
    ((1, 1), False),
]
RANKS = [1, 3, 100]


def _id(shape_t):
    shape, transposed = shape_t
    return "x".join(map(str, shape)) + ("T" if transposed else "")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _clear_warned():
    spectrum_warnings.reset()
    yield
    spectrum_warnings.reset()


def random_point(p, seed=0, dtype=F64, noise=0.3):
    """Random reflectors (Haar frames plus noise) and, for learned spectra, distinct |S_i| in [0.5, 1] with signs."""
    gen = torch.Generator().manual_seed(seed)
    params = list(p.initial_parameters("random", generator=gen, dtype=F64))
    for i in (0, 1):
        params[i] = params[i] + noise * torch.randn(params[i].shape, generator=gen, dtype=F64)
    if p.has_spectrum:
        r = p.r_mid
        mags = torch.linspace(0.5, 1.0, r, dtype=F64)[torch.randperm(r, generator=gen)]
        signs = torch.where(torch.rand(r, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        params[2] = mags * signs
    return tuple(t.to(dtype) for t in params)


def layout(p, w):
    """A weight in the (d_out, C_in, *kernel) layout, as a (d_out, d_in) matrix."""
    if p.transposed:
        w = w.transpose(0, 1)
    return w.reshape(p.d_out, p.d_in)


def tt_bound(w_layout, modes, ranks):
    """Σ_k Σ_{i>R_k} σ_i(unfolding_k)² of w reshaped to the modes."""
    t = w_layout.reshape(modes) if modes else w_layout.reshape(1)
    total = 0.0
    for k in range(1, len(modes)):
        s = torch.linalg.svdvals(t.reshape(math.prod(modes[:k]), -1))
        total += (s[ranks[k]:] ** 2).sum().item()
    return total


# ------------------------------------------------------------------------------------------- core properties
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape_t", SHAPES, ids=_id)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
def test_map_properties(method, spectrum, shape_t, rank):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, rank, method, spectrum, transposed=transposed)
    assert p.layout_shape == ((shape[1], shape[0], *shape[2:]) if transposed else shape)
    assert p.dof == count_dof(p.layout_shape, method, rank, spectrum)

    params = random_point(p, seed=rank)
    w = p(*params)
    assert w.shape == shape and w.dtype == F64

    m = p.matrix(*params)
    assert m.shape == (p.d_out, p.d_in)
    torch.testing.assert_close(layout(p, w), m, rtol=0, atol=0)

    # exact singular values: |Σ|, no SVD needed
    sv = torch.linalg.svdvals(m)
    expected = p.singular_values(*params)
    assert expected.shape == (p.r_mid,)
    assert torch.all(expected[:-1] >= expected[1:])
    torch.testing.assert_close(sv[: p.r_mid], expected, rtol=0, atol=1e-12)
    assert torch.all(sv[p.r_mid:].abs() <= 1e-12)
    if spectrum == "identity":
        torch.testing.assert_close(expected, torch.ones(p.r_mid, dtype=F64))
    if spectrum == "normalized":
        assert abs(sv.max().item() - 1.0) <= 1e-12
    if spectrum == "free":
        torch.testing.assert_close(expected, params[2].abs().sort(descending=True).values)

    # orthonormal frames
    u, sigma, vt = p.factors(*params)
    assert u.shape == (p.d_out, p.r_mid) and vt.shape == (p.r_mid, p.d_in)
    eye = torch.eye(p.r_mid, dtype=F64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(vt @ vt.T, eye, rtol=0, atol=1e-12)
    assert (sigma is None) == (spectrum == "identity")
    rebuilt = u @ vt if sigma is None else (u * sigma) @ vt
    torch.testing.assert_close(rebuilt, m, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape_t", SHAPES, ids=_id)
@pytest.mark.parametrize("method", METHODS)
def test_normalized_float32(method, shape_t):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, 3, method, "normalized", transposed=transposed)
    params = random_point(p, seed=7, dtype=torch.float32)
    w = p(*params)
    assert w.dtype == torch.float32 and w.shape == shape
    sv = torch.linalg.svdvals(layout(p, w).double())
    assert abs(sv.max().item() - 1.0) <= 1e-5


def test_paper_example_frame_sizes():
    # supplement §8 in our convention: W 16 × 8·3·3, r = 4 → modes [2,2,2,2] | [2,2,2,9]
    p = SpectralParametrization((16, 8, 3, 3), 4, "sttp", "normalized")
    assert (p.out_modes, p.in_modes) == ([2, 2, 2, 2], [2, 2, 2, 9])
    assert p.ranks == [1, 2, 4, 4, 4, 4, 4, 4, 1]
    assert p.u_side.frame_shapes == [(2, 2), (4, 4), (8, 4), (8, 4)]
    assert p.v_side.frame_shapes == [(9, 4), (8, 4), (8, 4), (8, 4)]
    assert p.u_side.reduced == (True, True, True, False)
    assert p.v_side.reduced == (True, True, True, False)
    p_id = SpectralParametrization((16, 8, 3, 3), 4, "sttp", "identity")
    assert p_id.u_side.reduced == (True, True, True, True)


# ---------------------------------------------------------------- 1×1 convolutions (a kernel mode of size 1)
@pytest.mark.parametrize("shape", [(4, 6, 1, 1), (8, 4, 1), (32, 16, 1, 1)])
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_sttp_one_by_one_conv(shape, spectrum):
    p = SpectralParametrization(shape, 8, "sttp", spectrum)
    params = random_point(p, seed=3)
    w = p(*params)
    assert w.shape == shape
    u, _, vt = p.factors(*params)
    eye = torch.eye(p.r_mid, dtype=F64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(vt @ vt.T, eye, rtol=0, atol=1e-12)
    assert p.dof == count_dof(shape, "sttp", 8, spectrum)


def test_parametrize_one_by_one_conv_layer():
    layer = nn.Conv2d(6, 4, 1).double()
    torch_sttp.parametrize(layer, "sttp", rank=8, spectrum="free", init="pretrained")
    assert layer.weight.shape == (4, 6, 1, 1)


# ------------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape_t", [((4, 2, 3), False), ((2, 4, 3), True)], ids=_id)
def test_gradcheck(method, spectrum, shape_t):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, 2, method, spectrum, transposed=transposed)
    params = tuple(t.detach().requires_grad_() for t in random_point(p, seed=11))
    assert torch.autograd.gradcheck(p, params, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradgradcheck(method):
    p = SpectralParametrization((4, 2, 3), 2, method, "free")
    params = tuple(t.detach().requires_grad_() for t in random_point(p, seed=12))
    assert torch.autograd.gradgradcheck(p, params, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


# ------------------------------------------------------------------------------------------ non-redundancy
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(6, 4), (4, 6, 3), (8, 9), (1, 6), (12, 8), (6, 1)])
def test_jacobian_rank_equals_dof(method, spectrum, shape):
    p = SpectralParametrization(shape, 3, method, spectrum)
    params = random_point(p, seed=5)

    def vec_w(*xs):
        return p(*xs).reshape(-1)

    jac = torch.autograd.functional.jacobian(vec_w, params)
    j = torch.cat([block.reshape(block.shape[0], -1) for block in jac], dim=1)
    expected = p.dof - (1 if spectrum == "normalized" else 0)
    sv = torch.linalg.svdvals(j)
    tol = 1e-9 * sv[0].item()
    rank = int((sv > tol).sum().item())
    assert rank == expected, (rank, expected, sv[max(expected - 2, 0): expected + 2])
    # a clear gap, not a borderline count
    if expected > 0:
        assert sv[expected - 1].item() > 1e-5 * sv[0].item()
    if expected < len(sv):
        assert sv[expected].item() < 1e-12 * sv[0].item()
    # each counted entry moves W on its own; padding and masked-out entries do not move it at all
    used = int((j.abs().amax(0) > 0).sum().item())
    assert used == p.dof - (1 if spectrum == "normalized" and p.r_mid == 1 else 0)


# ---------------------------------------------------------------------------------------------- right_inverse
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape_t", SHAPES, ids=_id)
@pytest.mark.parametrize("method", METHODS)
def test_right_inverse_round_trip_free(method, shape_t, rank):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, rank, method, "free", transposed=transposed)
    w = p(*random_point(p, seed=21)).detach()
    back = p(*p.right_inverse(w))
    torch.testing.assert_close(back, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape_t", SHAPES, ids=_id)
@pytest.mark.parametrize("spectrum", ["normalized", "identity"])
@pytest.mark.parametrize("method", METHODS)
def test_right_inverse_round_trip_constrained(method, spectrum, shape_t, rank):
    # a weight produced by the parametrization itself already satisfies the constraint and comes back unchanged
    shape, transposed = shape_t
    p = SpectralParametrization(shape, rank, method, spectrum, transposed=transposed)
    w = p(*random_point(p, seed=22)).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = p(*p.right_inverse(w))
    torch.testing.assert_close(back, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape_t", SHAPES, ids=_id)
def test_right_inverse_svdp_is_truncated_svd(shape_t, rank):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, rank, "svdp", "free", transposed=transposed)
    gen = torch.Generator().manual_seed(31)
    w = torch.randn(shape, generator=gen, dtype=F64)
    approx = p(*p.right_inverse(w))
    err = (approx - w).pow(2).sum().item()
    s = torch.linalg.svdvals(layout(p, w))
    expected = (s[p.r_mid:] ** 2).sum().item()
    assert abs(err - expected) <= 1e-10 * expected + 1e-24 * w.pow(2).sum().item()


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape_t", SHAPES, ids=_id)
def test_right_inverse_sttp_oseledets_bound(shape_t, rank):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, rank, "sttp", "free", transposed=transposed)
    gen = torch.Generator().manual_seed(32)
    w = torch.randn(shape, generator=gen, dtype=F64)
    approx = p(*p.right_inverse(w))
    err = (approx - w).pow(2).sum().item()
    bound = tt_bound(layout(p, w), p.out_modes + p.in_modes, p.ranks)
    assert err <= bound * (1 + 1e-5) + 1e-24 * w.pow(2).sum().item()


@pytest.mark.parametrize("shape_t", SHAPES, ids=_id)
@pytest.mark.parametrize("method", METHODS)
def test_right_inverse_normalized_full_rank(method, shape_t):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, 10_000, method, "normalized", transposed=transposed)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(41), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = p(*p.right_inverse(w))
    smax = torch.linalg.svdvals(layout(p, w))[0]
    torch.testing.assert_close(loaded, w / smax, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape_t", [s for s in SHAPES if s[0] != (1, 1)], ids=_id)
@pytest.mark.parametrize("method", METHODS)
def test_right_inverse_identity_full_rank(method, shape_t):
    shape, transposed = shape_t
    p = SpectralParametrization(shape, 10_000, method, "identity", transposed=transposed)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(42), dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = p(*p.right_inverse(w))
    m = layout(p, loaded)
    torch.testing.assert_close(torch.linalg.svdvals(m), torch.ones(p.r_mid, dtype=F64), rtol=0, atol=1e-12)
    u, _, vh = torch.linalg.svd(layout(p, w), full_matrices=False)
    torch.testing.assert_close(m, u @ vh, rtol=1e-10, atol=1e-12)


def test_right_inverse_identity_square_v_frame():
    # W = −(0.6, 0.8, 0)ᵀ is produced by SVDP (3, 1) with the identity spectrum (U reflector h = (−2, 0), V = −1);
    # loading it must give it back, not its negative
    p = SpectralParametrization((3, 1), 1, "svdp", "identity")
    u_params = torch.tensor([-2.0, 0.0], dtype=F64)  # rows 1…2 of the reduced (3, 1) layout
    v_params = torch.zeros(1, dtype=F64)
    w = p(u_params, v_params)
    torch.testing.assert_close(w.flatten(), torch.tensor([-0.6, -0.8, 0.0], dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = p(*p.right_inverse(w))
    torch.testing.assert_close(loaded, w, rtol=1e-12, atol=1e-12)


def test_right_inverse_identity_one_by_one():
    # a 1×1 weight with the identity spectrum has no freedom: W = 1 whatever is loaded
    for method in METHODS:
        p = SpectralParametrization((1, 1), 4, method, "identity")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = p(*p.right_inverse(torch.tensor([[2.5]], dtype=F64)))
        torch.testing.assert_close(loaded.abs(), torch.ones(1, 1, dtype=F64))


@pytest.mark.parametrize("spectrum", ["normalized", "identity"])
def test_right_inverse_warns_once(spectrum):
    p = SpectralParametrization((6, 10), 3, "svdp", spectrum)
    w = torch.randn(6, 10, dtype=F64)
    with pytest.warns(UserWarning, match=spectrum):
        p.right_inverse(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.right_inverse(w)
        SpectralParametrization((4, 6, 3), 2, "sttp", spectrum).right_inverse(torch.randn(4, 6, 3, dtype=F64))


def test_right_inverse_free_does_not_warn():
    p = SpectralParametrization((6, 10), 3, "sttp", "free")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.right_inverse(torch.randn(6, 10, dtype=F64))
    assert "free" not in spectrum_warnings.given


@pytest.mark.parametrize("method", METHODS)
def test_right_inverse_rejects_bad_weights(method):
    p = SpectralParametrization((6, 10), 3, method, "free")
    with pytest.raises(ValueError, match=r"\(10, 6\)"):
        p.right_inverse(torch.randn(10, 6))
    w = torch.randn(6, 10)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"\(6, 10\)"):
        p.right_inverse(w)
    w[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"\(6, 10\)"):
        p.right_inverse(w)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, None])
def test_constructor_rejects_bad_rank(rank):
    with pytest.raises(ValueError):
        SpectralParametrization((6, 10), rank, "sttp", "free")


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError):
        SpectralParametrization((6, 10), 3, "tucker", "free")
    with pytest.raises(ValueError):
        SpectralParametrization((6, 10), 3, "sttp", "unit")
    with pytest.raises(ValueError):
        SpectralParametrization((6, 0), 3, "sttp", "free")
    with pytest.raises(ValueError):
        SpectralParametrization((6, 10), 3, "svdp", "free", transposed=True)


# ----------------------------------------------------------------------------------------- layer integration
def _layers():
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(10, 6).double(),
        "conv2d": nn.Conv2d(6, 12, 3).double(),
        "convT2d": nn.ConvTranspose2d(6, 8, 3).double(),
        "embedding": nn.Embedding(20, 6).double(),
    }


LAYER_NAMES = ["linear", "conv2d", "convT2d", "embedding"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_parametrize_pretrained_full_rank_keeps_weight(name, method):
    layer = _layers()[name]
    w0 = layer.weight.detach().clone()
    p = torch_sttp.parametrize(layer, method, rank=10_000, spectrum="free", init="pretrained")
    assert isinstance(p, SpectralParametrization)
    assert torch_parametrize.is_parametrized(layer, "weight")
    assert p.transposed == (name == "convT2d")
    assert layer.weight.shape == w0.shape and layer.weight.dtype == F64
    torch.testing.assert_close(layer.weight, w0, rtol=1e-10, atol=1e-12)
    # the parameters are the reflectors (and S)
    originals = layer.parametrizations.weight
    assert hasattr(originals, "original0") and hasattr(originals, "original1") and hasattr(originals, "original2")

    torch_parametrize.remove_parametrizations(layer, "weight")
    assert not torch_parametrize.is_parametrized(layer)
    assert isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight, w0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_parametrize_low_rank_shapes_and_forward(name, method):
    layer = _layers()[name]
    shape = tuple(layer.weight.shape)
    torch_sttp.parametrize(layer, method, rank=3, spectrum="normalized", init="random")
    assert tuple(layer.weight.shape) == shape
    p = layer.parametrizations.weight[0]
    assert abs(torch.linalg.svdvals(layout(p, layer.weight.detach()))[0].item() - 1) < 1e-12
    # gradients reach the reflectors
    if name == "embedding":
        out = layer(torch.tensor([0, 3, 5]))
    elif name == "linear":
        out = layer(torch.randn(2, 10, dtype=F64))
    else:
        out = layer(torch.randn(1, 6, 5, 5, dtype=F64))
    out.sum().backward()
    assert layer.parametrizations.weight.original0.grad is not None
    assert layer.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_assigning_weight_goes_through_right_inverse(name):
    layer = _layers()[name]
    torch_sttp.parametrize(layer, "sttp", rank=10_000, spectrum="free", init="random")
    new = torch.randn(layer.weight.shape, dtype=F64)
    with torch.no_grad():
        layer.weight = new
    torch.testing.assert_close(layer.weight, new, rtol=1e-10, atol=1e-12)
    # low rank: the assigned weight is projected (SVDP: truncated SVD)
    layer = _layers()[name]
    p = torch_sttp.parametrize(layer, "svdp", rank=2, spectrum="free", init="random")
    with torch.no_grad():
        layer.weight = new
    u, s, vh = torch.linalg.svd(layout(p, new), full_matrices=False)
    torch.testing.assert_close(layout(p, layer.weight.detach()), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_identity_init(name, method, spectrum):
    layer = _layers()[name]
    p = torch_sttp.parametrize(layer, method, rank=3, spectrum=spectrum, init="identity")
    params = _originals(layer)
    assert len(params) == (3 if p.has_spectrum else 2)
    assert all(torch.count_nonzero(t) == 0 for t in params[:2])
    if p.has_spectrum:
        torch.testing.assert_close(params[2], torch.ones(p.r_mid, dtype=F64))
    u, sigma, vt = p.factors(*params)
    trunc_u = torch.eye(p.d_out, p.r_mid, dtype=F64)
    trunc_v = torch.eye(p.r_mid, p.d_in, dtype=F64)
    m = layout(p, layer.weight.detach())
    torch.testing.assert_close(m, u @ vt, rtol=0, atol=1e-15)
    if method == "svdp":
        # U = −I, V = −I: W is the truncated identity
        torch.testing.assert_close(u, -trunc_u, rtol=0, atol=0)
        torch.testing.assert_close(vt, -trunc_v, rtol=0, atol=0)
        torch.testing.assert_close(m, trunc_u @ trunc_v, rtol=0, atol=0)
    else:
        # every core is −I: the U train contracts to (−1)^(#cores)·I; V is a signed partial permutation
        torch.testing.assert_close(u, (-1) ** len(p.out_modes) * trunc_u, rtol=0, atol=0)
        assert set(vt.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.equal(vt.abs().sum(1), torch.ones(p.r_mid, dtype=F64))
        assert torch.all(vt.abs().sum(0) <= 1)


@pytest.mark.parametrize("shape", [(6, 10), (6, 2, 3), (4, 12)])
def test_sttp_identity_init_is_truncated_identity(shape):
    # the "identity" init is the truncated identity frame I_{d×r} (supplement §9); for STTP the contracted U and V
    # should be that frame up to sign, so that W = ±(truncated identity) as for SVDP
    p = SpectralParametrization(shape, 100, "sttp", "identity")
    u, _, vt = p.factors(*p.initial_parameters("identity", dtype=F64))
    torch.testing.assert_close(u.abs(), torch.eye(p.d_out, p.r_mid, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(vt.abs(), torch.eye(p.r_mid, p.d_in, dtype=F64), rtol=0, atol=0)


def _originals(layer):
    pl = layer.parametrizations.weight
    return tuple(getattr(pl, f"original{i}") for i in range(3) if hasattr(pl, f"original{i}"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_noisy_identity_init(name, method):
    layer = _layers()[name]
    p = torch_sttp.parametrize(layer, method, rank=3, spectrum="normalized", init="noisy_identity",
                               generator=torch.Generator().manual_seed(0))
    params = _originals(layer)
    for t in params[:2]:
        assert 1e-6 < t.abs().max().item() < 1e-3  # O(alpha), alpha = 1e-4
    m = layout(p, layer.weight.detach())
    ident = SpectralParametrization(tuple(layer.weight.shape), 3, method, "normalized", p.transposed)
    m0 = ident.matrix(*ident.initial_parameters("identity", dtype=F64))
    assert (m - m0).abs().max().item() < 1e-2


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_parametrize_twice_and_unknown_init(name):
    layer = _layers()[name]
    with pytest.raises(ValueError):
        torch_sttp.parametrize(layer, "sttp", rank=3, init="orthogonal")
    assert not torch_parametrize.is_parametrized(layer)
    torch_sttp.parametrize(layer, "sttp", rank=3)
    with pytest.raises(ValueError):
        torch_sttp.parametrize(layer, "sttp", rank=3)
    with pytest.raises(ValueError):
        torch_sttp.parametrize(layer, "svdp", rank=3)


def test_layer_assignment_rejects_bad_weights():
    layer = nn.Linear(10, 6).double()
    torch_sttp.parametrize(layer, "sttp", rank=3, spectrum="free")
    with pytest.raises(ValueError, match=r"\(6, 9\)"):
        with torch.no_grad():
            layer.weight = torch.randn(6, 9, dtype=F64)
    bad = torch.randn(6, 10, dtype=F64)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\(6, 10\)"):
        with torch.no_grad():
            layer.weight = bad


def test_convenience_wrappers():
    a, b = nn.Linear(10, 6), nn.Linear(10, 6)
    pa = torch_sttp.svdp(a, rank=2, spectrum="free")
    pb = torch_sttp.sttp(b, rank=2, spectrum="identity")
    assert (pa.method, pa.spectrum, pa.rank) == ("svdp", "free", 2)
    assert (pb.method, pb.spectrum, pb.rank) == ("sttp", "identity", 2)


# ------------------------------------------------------------------------------------------------- state_dict
def _model(kind):
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Sequential(nn.Linear(10, 6)).double()
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(6, 12, 3)).double()
    return nn.Sequential(nn.ConvTranspose2d(6, 8, 3)).double()


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["linear", "conv", "convT"])
def test_state_dict_round_trip(kind, method, spectrum):
    a, b = _model(kind), _model(kind)
    torch_sttp.parametrize(a[0], method, rank=3, spectrum=spectrum, init="random",
                           generator=torch.Generator().manual_seed(1))
    torch_sttp.parametrize(b[0], method, rank=3, spectrum=spectrum, init="random",
                           generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a[0].weight, b[0].weight)
    sd = a.state_dict()
    assert any(k.endswith("_extra_state") for k in sd)
    b.load_state_dict(sd)
    assert torch.equal(a[0].weight, b[0].weight)
    assert torch.equal(a[0].bias, b[0].bias)


@pytest.mark.parametrize(
    "theirs, ours, setting",
    [
        (dict(method="sttp", rank=3), dict(method="sttp", rank=4), "rank"),
        (dict(method="sttp", rank=3), dict(method="svdp", rank=3), "method"),
        (dict(method="svdp", rank=2), dict(method="svdp", rank=5), "rank"),
        (dict(method="sttp", rank=3, spectrum="free"), dict(method="sttp", rank=3, spectrum="normalized"),
         "spectrum"),
    ],
)
def test_state_dict_mismatch_names_layer_and_setting(theirs, ours, setting):
    a, b = _model("conv"), _model("conv")
    torch_sttp.parametrize(a[0], init="random", **theirs)
    torch_sttp.parametrize(b[0], init="random", **ours)
    with pytest.raises(ValueError) as info:
        b.load_state_dict(a.state_dict())
    msg = str(info.value)
    assert "'0'" in msg
    assert setting in msg


# -------------------------------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bfloat16_layer(kind, method, spectrum):
    layer = (nn.Linear(10, 6) if kind == "linear" else nn.Conv2d(6, 12, 3)).to(torch.bfloat16)
    shape = tuple(layer.weight.shape)
    p = torch_sttp.parametrize(layer, method, rank=3, spectrum=spectrum, init="random",
                               generator=torch.Generator().manual_seed(3))
    w = layer.weight
    assert w.dtype == torch.bfloat16 and tuple(w.shape) == shape
    params = _originals(layer)
    assert all(t.dtype == torch.bfloat16 for t in params)
    ref = p(*(t.detach().float() for t in params))
    assert ref.dtype == torch.float32
    torch.testing.assert_close(w.detach().float(), ref, rtol=0, atol=2e-2)
    # pretrained init from a bfloat16 weight works as well
    layer2 = (nn.Linear(10, 6) if kind == "linear" else nn.Conv2d(6, 12, 3)).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_sttp.parametrize(layer2, method, rank=3, spectrum=spectrum, init="pretrained")
    assert layer2.weight.dtype == torch.bfloat16 and torch.isfinite(layer2.weight.float()).all()


# ------------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(384, 1536), (64, 32, 3, 3), (6, 10)], ids=str)
def test_storage_follows_dof(method, spectrum, shape):
    # stored entries = DOF + the ignored upper triangles of the full-form frames (at most two per layer)
    p = SpectralParametrization(shape, 48, method, spectrum)
    u, v, *s = p.initial_parameters("random", generator=torch.Generator().manual_seed(0))
    assert u.dim() == v.dim() == 1
    stored = u.numel() + v.numel() + sum(t.numel() for t in s)
    triangles = sum(r * (r + 1) // 2 for side in (p.u_side, p.v_side)
                    for (_, r), red in zip(side.frame_shapes, side.reduced) if not red)
    assert p.dof == count_dof(p.layout_shape, method, 48, spectrum)
    assert stored == p.dof + triangles


def _padded_format1(p: SpectralParametrization, side, flat: torch.Tensor) -> torch.Tensor:
    """The format-1 storage: every core's (n, r) LAPACK layout zero-padded into one (L, N, R) tensor."""
    padded = torch.zeros(side.padded_shape, dtype=flat.dtype)
    for k, (block, (n, r), red) in enumerate(zip(side.split(flat), side.frame_shapes, side.reduced)):
        padded[k, n - block.shape[0]:n, :r] = block
    return padded


@pytest.mark.parametrize("method", METHODS)
def test_loads_format1_padded_checkpoint(method):
    a, b = _model("conv"), _model("conv")
    pa = torch_sttp.parametrize(a[0], method, rank=5, init="random", generator=torch.Generator().manual_seed(4))
    torch_sttp.parametrize(b[0], method, rank=5, init="random", generator=torch.Generator().manual_seed(5))
    sd = a.state_dict()
    prefix = "0.parametrizations.weight."
    sd[prefix + "original0"] = _padded_format1(pa, pa.u_side, sd[prefix + "original0"])
    sd[prefix + "original1"] = _padded_format1(pa, pa.v_side, sd[prefix + "original1"])
    sd[prefix + "0._extra_state"] = dict(P.decode_config(sd[prefix + "0._extra_state"]), format_version=1)
    assert sd[prefix + "original0"].dim() == 3
    b.load_state_dict(sd)
    assert torch.equal(a[0].weight, b[0].weight)


@pytest.mark.filterwarnings("ignore:loading a dense weight")
@pytest.mark.parametrize("spectrum", ["free", "normalized", "identity"])
@pytest.mark.parametrize("method,shape,transposed", [("svdp", (6, 10), False), ("sttp", (8, 12), False),
                                                     ("sttp", (4, 2, 3, 3), False), ("svdp", (2, 4, 3, 3), True),
                                                     ("sttp", (2, 4, 3, 3), True)])
def test_loaded_weight_is_what_the_parametrization_holds_and_loads_back(method, shape, transposed, spectrum):
    torch.manual_seed(0)
    p = SpectralParametrization(shape, 3, method, spectrum, transposed).double()
    weight = torch.randn(shape, dtype=torch.float64)
    held = p.loaded(weight)
    torch.testing.assert_close(held, p(*p.right_inverse(weight)), rtol=0, atol=0)
    torch.testing.assert_close(p.loaded(held), held, rtol=1e-10, atol=1e-12)  # loading it again changes nothing
    matrix = held.transpose(0, 1) if transposed else held  # the (d_out, C_in·k…) layout of a transposed conv
    sv = torch.linalg.svdvals(matrix.reshape(matrix.shape[0], -1))
    if spectrum == "normalized":
        assert float(sv[0]) == pytest.approx(1.0, rel=1e-12)
    elif spectrum == "identity":
        torch.testing.assert_close(sv[: p.r_mid], torch.ones(p.r_mid, dtype=torch.float64))


@pytest.mark.parametrize("spectrum", ["normalized", "identity"])
def test_a_nonzero_padding_row_below_a_bounded_spectrum_warns_and_is_kept(spectrum):
    """The fixed padding row lies outside the spectrum: kept (it never trains) and announced, since σ_max(W) may
    then exceed 1; a zero row (nn.Embedding's own init) and the free spectrum stay silent."""
    import warnings

    from torch_sttp.parametrizations import spectrum_warnings

    torch.manual_seed(0)
    layer = nn.Embedding(12, 6, padding_idx=2)
    with torch.no_grad():
        layer.weight.mul_(4.0)
        layer.weight[2] = 3.0
    row = layer.weight.detach()[2].clone()
    spectrum_warnings.reset()
    with pytest.warns(UserWarning, match=r"padding row \(index 2\) .*\(norm 7.35\).* can exceed 1"):
        torch_sttp.parametrize(layer, "svdp", rank=3, spectrum=spectrum, init="pretrained")
    assert torch.equal(layer.weight[2], row) and torch.linalg.matrix_norm(layer.weight.detach(), 2) > 7
    spectrum_warnings.reset()
    with pytest.warns(UserWarning, match="padding row"):  # a dense weight set later: its row is kept too
        layer.weight = torch.full((12, 6), 0.5)
    for other, value in ((spectrum, 0.0), ("free", 3.0)):
        fresh = nn.Embedding(12, 6, padding_idx=2)
        with torch.no_grad():
            fresh.weight[2] = value
        spectrum_warnings.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch_sttp.parametrize(fresh, "svdp", rank=3, spectrum=other, init="pretrained")
        assert not [w for w in caught if "padding row" in str(w.message)]
    spectrum_warnings.reset()


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.LayerNorm(4)])
def test_a_one_dimensional_weight_is_refused_naming_the_layer(layer):
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}.weight has shape \(4,\): a low-rank weight needs"):
        torch_sttp.parametrize(layer, "svdp", rank=2)
