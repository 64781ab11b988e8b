"""Properties of the Householder frames in :mod:`torch_sttp.frames`."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_sttp.frames import (
    INITS,
    frame_dof,
    frame_mask,
    frame_to_params,
    frame_to_params_exact,
    free_block_shape,
    householder_frame,
    householder_frame_free,
    householder_frame_batches,
    householder_frames_grouped,
    householder_frame_masked,
    init_frame_params,
    padded_householder_frames,
)

ORTHO_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
# (n, r): tall, square, single column, small n
SHAPES = [(9, 4), (6, 6), (7, 1), (12, 5), (3, 2)]
BOTH_FORMS = [False, True]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orth_error(q: torch.Tensor) -> float:
    r = q.shape[-1]
    eye = torch.eye(r, dtype=q.dtype, device=q.device)
    return (q.mT @ q - eye).abs().max().item()


def _random_params(n, r, reduced, batch=(), scale=1.0, dtype=torch.float64, seed=0):
    """Random reflector parameters with only the free entries non-zero."""
    p = scale * torch.randn(*batch, n, r, generator=_gen(seed), dtype=torch.float64)
    return (p * frame_mask(n, r, reduced, dtype=torch.float64)).to(dtype)


def _reference_frame(params: torch.Tensor, reduced: bool) -> torch.Tensor:
    """H₁…H_r I_{n×r} from torch.linalg.householder_product on the same reflectors."""
    n, r = params.shape[-2:]
    mask = frame_mask(n, r, reduced, dtype=params.dtype)
    y = params * mask + torch.eye(n, r, dtype=params.dtype)  # unit diagonal, zeros above it
    tau = 2.0 / (y * y).sum(dim=-2)
    return torch.linalg.householder_product(y, tau)


def _positive_q(matrix: torch.Tensor) -> torch.Tensor:
    """Q of matrix = Q·R with diag(R) > 0."""
    q, r = torch.linalg.qr(matrix)
    d = torch.sign(r.diagonal(dim1=-2, dim2=-1))
    return q * d.unsqueeze(-2)


# ---------------------------------------------------------------------------------------------------------------------
# Orthonormality
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_orthonormal_at_init(n, r, init, reduced, dtype):
    params = init_frame_params(n, r, init, reduced, batch=(3,), generator=_gen(7), dtype=dtype)
    assert params.shape == (3, n, r) and params.dtype == dtype
    q = householder_frame(params, reduced)
    assert q.shape == (3, n, r) and q.dtype == dtype
    assert torch.isfinite(q).all()
    assert _orth_error(q) <= ORTHO_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_orthonormal_after_large_perturbation(n, r, reduced, dtype):
    # Unmasked parameters on purpose: the entries outside the mask must be ignored.
    params = 10.0 * torch.randn(4, n, r, generator=_gen(n * 31 + r), dtype=dtype)
    q = householder_frame(params, reduced)
    assert torch.isfinite(q).all()
    assert _orth_error(q) <= ORTHO_TOL[dtype]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 14),
    data=st.data(),
    reduced=st.booleans(),
    log_scale=st.floats(-3.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_orthonormal_and_matches_reference_property(n, data, reduced, log_scale, seed):
    r = data.draw(st.integers(1, n))
    params = _random_params(n, r, reduced, batch=(2,), scale=10.0**log_scale, seed=seed)
    q = householder_frame(params, reduced)
    assert _orth_error(q) <= ORTHO_TOL[torch.float64]
    torch.testing.assert_close(q, _reference_frame(params, reduced), rtol=0, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with LAPACK's product of reflectors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_matches_householder_product_float64(n, r, reduced):
    # Dense random parameters: entries outside the mask must not matter.
    params = torch.randn(2, n, r, generator=_gen(3), dtype=torch.float64)
    ours = householder_frame(params, reduced)
    ref = _reference_frame(params, reduced)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_matches_householder_product_float32(n, r, reduced):
    params = torch.randn(2, n, r, generator=_gen(4), dtype=torch.float32)
    ours = householder_frame(params, reduced)
    ref = _reference_frame(params.double(), reduced).float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("reduced", BOTH_FORMS)
def test_masked_entries_are_ignored(reduced):
    n, r = 8, 3
    params = torch.randn(n, r, generator=_gen(5), dtype=torch.float64)
    mask = frame_mask(n, r, reduced, dtype=torch.float64)
    junk = torch.randn(n, r, generator=_gen(6), dtype=torch.float64) * (1 - mask)
    torch.testing.assert_close(
        householder_frame(params + 100.0 * junk, reduced), householder_frame(params, reduced), rtol=0, atol=0
    )
    # the masked form multiplies the whole Y; householder_frame splits its rows (same products, other rounding)
    torch.testing.assert_close(
        householder_frame_masked(params, mask), householder_frame(params, reduced), rtol=0, atol=1e-15
    )


# ---------------------------------------------------------------------------------------------------------------------
# Structure and special values
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,r", SHAPES)
def test_reduced_frame_has_upper_triangular_top_block(n, r, dtype):
    params = 3.0 * torch.randn(3, n, r, generator=_gen(8), dtype=dtype)
    q = householder_frame(params, reduced=True)
    below = q[..., :r, :].tril(-1)
    assert below.abs().max().item() <= 1e-7
    # The full form is not triangular in general.
    if r >= 2:
        q_full = householder_frame(params, reduced=False)
        assert q_full[..., :r, :].tril(-1).abs().max().item() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_identity_init_gives_minus_truncated_identity(n, r, reduced, dtype):
    params = init_frame_params(n, r, "identity", reduced, batch=(2,), dtype=dtype)
    assert (params == 0).all()
    q = householder_frame(params, reduced)
    expected = -torch.eye(n, r, dtype=dtype).expand(2, n, r)
    torch.testing.assert_close(q, expected, rtol=0, atol=0)


@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("alpha", [1e-2, 1e-4, 1e-6])
def test_noisy_identity_params_are_order_alpha(alpha, reduced):
    n, r = 12, 5
    params = init_frame_params(
        n, r, "noisy_identity", reduced, batch=(4,), alpha=alpha, generator=_gen(9), dtype=torch.float64
    )
    biggest = params.abs().max().item()
    assert 0 < biggest <= 10 * alpha
    # Entries outside the mask are zero.
    assert (params * (1 - frame_mask(n, r, reduced, dtype=params.dtype))).abs().max().item() == 0
    # The frame is −I_{n×r} up to O(alpha).
    q = householder_frame(params, reduced)
    assert (q + torch.eye(n, r, dtype=q.dtype)).abs().max().item() <= 20 * alpha


def test_noisy_identity_scales_linearly_with_alpha():
    n, r = 10, 4
    small = init_frame_params(n, r, "noisy_identity", alpha=1e-6, generator=_gen(10), dtype=torch.float64)
    large = init_frame_params(n, r, "noisy_identity", alpha=1e-3, generator=_gen(10), dtype=torch.float64)
    # Same noise, so the parameters scale (to first order) with alpha.
    torch.testing.assert_close(large, small * 1e3, rtol=1e-2, atol=1e-6)


def test_random_init_is_not_degenerate():
    n, r = 9, 4
    a = init_frame_params(n, r, "random", generator=_gen(11), dtype=torch.float64)
    b = init_frame_params(n, r, "random", generator=_gen(12), dtype=torch.float64)
    assert not torch.allclose(a, b)
    a2 = init_frame_params(n, r, "random", generator=_gen(11), dtype=torch.float64)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Inverse maps
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_exact_round_trip_params_frame_params(n, r, reduced):
    params = _random_params(n, r, reduced, batch=(3,), seed=13)
    frame = householder_frame(params, reduced)
    recovered = frame_to_params_exact(frame, reduced)
    assert recovered.shape == params.shape and recovered.dtype == params.dtype
    torch.testing.assert_close(recovered, params, rtol=0, atol=1e-9)
    torch.testing.assert_close(householder_frame(recovered, reduced), frame, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduced", BOTH_FORMS)
def test_exact_round_trip_float32(reduced):
    n, r = 12, 5
    params = _random_params(n, r, reduced, batch=(2,), dtype=torch.float32, seed=14)
    frame = householder_frame(params, reduced)
    recovered = frame_to_params_exact(frame, reduced)
    assert recovered.dtype == torch.float32
    torch.testing.assert_close(recovered, params, rtol=0, atol=1e-4)
    torch.testing.assert_close(householder_frame(recovered, reduced), frame, rtol=0, atol=1e-5)


def _reachable_sign_flips(n: int, r: int, reduced: bool) -> torch.Tensor:
    """Column signs (+, −, +, …) that keep a frame inside the chart.

    For n > r every frame whose columns avoid +e_j is reachable. For n = r the product of n reflectors has
    determinant (−1)ⁿ, so only an even number of flips stays reachable; the reduced square chart is {−I} alone.
    """
    flips = [(-1.0) ** j for j in range(r)]
    if n == r:
        if reduced:
            flips = [1.0] * r
        elif math.prod(flips) < 0:
            flips[-1] = -flips[-1]
    return torch.tensor(flips, dtype=torch.float64)


@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_exact_inverse_reproduces_any_reachable_frame(n, r, init, reduced):
    # Start from frames produced some other way than by these parameters: flip column signs. (−I is reachable,
    # but flipping its columns would give +e_j, the one direction the chart cannot reach.)
    params = init_frame_params(n, r, init, reduced, batch=(2,), generator=_gen(15), dtype=torch.float64)
    frame = householder_frame(params, reduced)
    if init != "identity":
        frame = frame * _reachable_sign_flips(n, r, reduced)
    recovered = frame_to_params_exact(frame, reduced)
    assert (recovered * (1 - frame_mask(n, r, reduced, dtype=recovered.dtype))).abs().max().item() == 0
    torch.testing.assert_close(householder_frame(recovered, reduced), frame, rtol=0, atol=1e-12)


def test_exact_inverse_of_square_orthogonal_matrix_with_det_of_chart():
    n = 5
    q = _positive_q(torch.randn(n, n, generator=_gen(26), dtype=torch.float64))
    if torch.linalg.det(q) * (-1) ** n < 0:
        q[:, 0] = -q[:, 0]
    recovered = frame_to_params_exact(q)
    torch.testing.assert_close(householder_frame(recovered), q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("n,r", SHAPES)
def test_frame_to_params_reproduces_frame_up_to_signs(n, r, reduced, dtype):
    params = _random_params(n, r, reduced, batch=(3,), scale=2.0, dtype=dtype, seed=16)
    frame = householder_frame(params, reduced)
    # Flip some columns so that the signs returned are not all +1.
    flips = torch.tensor([1.0 if j % 2 == 0 else -1.0 for j in range(r)], dtype=dtype)
    target = frame * flips
    new_params, signs = frame_to_params(target, reduced)
    assert new_params.shape == params.shape and signs.shape == (3, r)
    assert new_params.dtype == dtype and signs.dtype == dtype
    assert ((signs == 1) | (signs == -1)).all()
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    rebuilt = householder_frame(new_params, reduced) * signs.unsqueeze(-2)
    torch.testing.assert_close(rebuilt, target, rtol=0, atol=atol)


@pytest.mark.parametrize("n,r", [(9, 4), (6, 6), (7, 1), (12, 5)])
def test_frame_to_params_of_general_matrix_gives_positive_qr_factor(n, r):
    matrix = torch.randn(2, n, r, generator=_gen(17), dtype=torch.float64)
    params, signs = frame_to_params(matrix)
    rebuilt = householder_frame(params) * signs.unsqueeze(-2)
    q_pos = _positive_q(matrix)
    torch.testing.assert_close(rebuilt, q_pos, rtol=0, atol=1e-12)
    # R = Qᵀ·matrix is upper triangular with a positive diagonal.
    r_factor = rebuilt.mT @ matrix
    assert (r_factor.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert r_factor.tril(-1).abs().max().item() <= 1e-12


@pytest.mark.parametrize("n,r", [(9, 4), (6, 6), (12, 5)])
def test_frame_to_params_reduced_general_matrix(n, r):
    # matrix = F·R with F ∈ St_U(n, r) and R upper triangular with positive diagonal: its Q factor is F.
    frame = householder_frame(_random_params(n, r, True, seed=18), reduced=True)
    upper = torch.randn(r, r, generator=_gen(19), dtype=torch.float64).triu(1) + torch.diag(
        torch.rand(r, generator=_gen(20), dtype=torch.float64) + 0.5
    )
    matrix = frame @ upper
    params, signs = frame_to_params(matrix, reduced=True)
    assert (params * (1 - frame_mask(n, r, True, dtype=params.dtype))).abs().max().item() == 0
    rebuilt = householder_frame(params, reduced=True) * signs
    torch.testing.assert_close(rebuilt, frame, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("shape", [(2, 4, 3), (3, 3), (3, 1), (2, 1, 4, 2), (7, 3), (1, 9, 4)])
def test_gradcheck(shape, reduced):
    """Batches (Y formed, one compact-WY call) and single frames (Q's halves written from the block in place)."""
    params = torch.randn(*shape, generator=_gen(21), dtype=torch.float64).requires_grad_()
    fn = lambda p: householder_frame(p, reduced)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (params,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, (params,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduced", BOTH_FORMS)
def test_a_single_frame_equals_the_same_frame_in_a_batch(reduced):
    """The two evaluation paths of householder_frame_free (one frame: from the block in place; a batch: Y formed)
    agree: the values exactly, the gradients to rounding (also for an expanded ∂Q, the gradient of a sum)."""
    n, r = 9, 4
    block = torch.randn(n - r if reduced else n, r, generator=_gen(24), dtype=torch.float64).requires_grad_()
    single = householder_frame_free(block, n, reduced)
    pair = householder_frame_free(torch.stack([block, block]), n, reduced)
    assert torch.equal(single, pair[0])  # summed in the same order: a frame's value does not depend on its batch
    grad_single, = torch.autograd.grad(single.sum(), block)
    grad_pair, = torch.autograd.grad(pair[0].sum(), block)
    torch.testing.assert_close(grad_single, grad_pair, rtol=0, atol=1e-14)


def test_gradcheck_masked():
    n, r = 6, 3
    params = torch.randn(2, n, r, generator=_gen(22), dtype=torch.float64).requires_grad_()
    mask = torch.rand(2, n, r, generator=_gen(23), dtype=torch.float64).gt(0.4).double() * frame_mask(
        n, r, dtype=torch.float64
    )
    fn = lambda p: householder_frame_masked(p, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (params,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduced", BOTH_FORMS)
def test_gradient_matches_reference_autograd(reduced):
    n, r = 8, 3
    params = torch.randn(2, n, r, generator=_gen(24), dtype=torch.float64)
    weight = torch.randn(2, n, r, generator=_gen(25), dtype=torch.float64)
    p1 = params.clone().requires_grad_()
    (householder_frame(p1, reduced) * weight).sum().backward()
    p2 = params.clone().requires_grad_()
    (_reference_frame(p2, reduced) * weight).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=1e-10)
    masked_out = p1.grad * (1 - frame_mask(n, r, reduced, dtype=p1.dtype))
    assert masked_out.abs().max().item() == 0


# ---------------------------------------------------------------------------------------------------------------------
# Padded batches of mixed shapes
# ---------------------------------------------------------------------------------------------------------------------

MIXED = [((6, 2), False), ((4, 4), False), ((7, 3), True), ((5, 1), False), ((3, 3), True), ((8, 5), True)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_frames_match_individual_frames(dtype):
    params = [torch.randn(*s, generator=_gen(30 + i), dtype=dtype) for i, (s, _) in enumerate(MIXED)]
    flags = [red for _, red in MIXED]
    frames = padded_householder_frames(params, flags)
    assert len(frames) == len(params)
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    for p, red, q in zip(params, flags, frames):
        assert q.shape == p.shape and q.dtype == dtype
        torch.testing.assert_close(q, householder_frame(p, red), rtol=0, atol=atol)
        assert _orth_error(q) <= ORTHO_TOL[dtype]


def test_padded_frames_single_flag_and_empty():
    params = [
        torch.randn(5, 2, generator=_gen(40), dtype=torch.float64),
        torch.randn(3, 3, generator=_gen(41), dtype=torch.float64),
    ]
    for flag in (False, True):
        frames = padded_householder_frames(params, flag)
        for p, q in zip(params, frames):
            torch.testing.assert_close(q, householder_frame(p, flag), rtol=0, atol=1e-12)
    assert padded_householder_frames([]) == []


def test_padded_frames_reject_mismatched_flags():
    params = [torch.randn(5, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    with pytest.raises(ValueError):
        padded_householder_frames(params, [False])


def test_padded_frames_gradients_flow_to_each_input():
    flags = [red for _, red in MIXED]
    base = [torch.randn(*s, generator=_gen(50 + i), dtype=torch.float64) for i, (s, _) in enumerate(MIXED)]
    weights = [torch.randn(*s, generator=_gen(60 + i), dtype=torch.float64) for i, (s, _) in enumerate(MIXED)]

    padded_inputs = [b.clone().requires_grad_() for b in base]
    frames = padded_householder_frames(padded_inputs, flags)
    sum((q * w).sum() for q, w in zip(frames, weights)).backward()

    for b, w, red, p in zip(base, weights, flags, padded_inputs):
        single = b.clone().requires_grad_()
        (householder_frame(single, red) * w).sum().backward()
        assert p.grad is not None
        torch.testing.assert_close(p.grad, single.grad, rtol=0, atol=1e-12)
        n, r = b.shape
        if frame_dof(n, r, red) > 0:
            assert p.grad.abs().max().item() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Low precision
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced", BOTH_FORMS)
def test_bfloat16_returns_bfloat16_close_to_float32(reduced):
    n, r = 10, 4
    params = torch.randn(3, n, r, generator=_gen(70)).to(torch.bfloat16).requires_grad_()
    q = householder_frame(params, reduced)
    assert q.dtype == torch.bfloat16 and q.shape == (3, n, r)
    q32 = householder_frame(params.detach().float(), reduced)
    torch.testing.assert_close(q.float(), q32, rtol=0, atol=1e-2)
    q.float().sum().backward()
    assert params.grad is not None and params.grad.dtype == torch.bfloat16
    assert torch.isfinite(params.grad.float()).all()


# ---------------------------------------------------------------------------------------------------------------------
# Degrees of freedom
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,r", SHAPES + [(1, 1), (20, 7), (5, 5)])
def test_frame_dof_matches_mask_and_formula(n, r):
    full_mask = frame_mask(n, r)
    red_mask = frame_mask(n, r, reduced=True)
    assert full_mask.dtype == torch.bool and full_mask.shape == (n, r)
    assert frame_dof(n, r) == int(full_mask.sum()) == n * r - r * (r + 1) // 2
    assert frame_dof(n, r, reduced=True) == int(red_mask.sum()) == n * r - r * r
    # St_U(n, r) ⊂ St(n, r): the reduced mask is a subset of the full one.
    assert not (red_mask & ~full_mask).any()
    # The free entries are strictly below the diagonal (and below row r for the reduced form).
    rows, cols = torch.nonzero(full_mask, as_tuple=True)
    assert (rows > cols).all()
    rows, _ = torch.nonzero(red_mask, as_tuple=True)
    assert (rows >= r).all()


def test_frame_dof_matches_stiefel_dimension():
    # dim St(n, r) = n·r − r(r+1)/2.
    for n, r in [(10, 3), (64, 64), (100, 1)]:
        assert frame_dof(n, r) == n * r - math.comb(r + 1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,r", [(2, 3), (3, 0), (0, 0), (4, -1)])
def test_bad_shapes_raise(n, r):
    with pytest.raises(ValueError):
        frame_mask(n, r)
    with pytest.raises(ValueError):
        frame_dof(n, r)
    with pytest.raises(ValueError):
        frame_dof(n, r, reduced=True)
    with pytest.raises(ValueError):
        init_frame_params(n, r)


def test_bad_param_shapes_raise():
    with pytest.raises(ValueError):
        householder_frame(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        householder_frame(torch.zeros(4, 0))
    with pytest.raises(ValueError):
        householder_frame_masked(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError):
        frame_to_params(torch.randn(2, 3))
    with pytest.raises(ValueError):
        frame_to_params_exact(torch.randn(2, 3))
    with pytest.raises(ValueError):
        padded_householder_frames([torch.zeros(4, 2), torch.zeros(2, 3)])


def test_unknown_init_raises():
    with pytest.raises(ValueError):
        init_frame_params(5, 2, "orthogonal")
    with pytest.raises(ValueError):
        init_frame_params(5, 2, "")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_matrix_raises(bad):
    matrix = torch.randn(6, 3, generator=_gen(80), dtype=torch.float64)
    matrix[2, 1] = bad
    with pytest.raises(ValueError):
        frame_to_params(matrix)
    with pytest.raises(ValueError):
        frame_to_params(matrix.float(), reduced=True)


# ----------------------------------------------------------------------------------------- free-block storage
@pytest.mark.parametrize("reduced", BOTH_FORMS)
@pytest.mark.parametrize("n, r", SHAPES)
def test_free_block_frame_equals_layout_frame(n, r, reduced):
    layout = _random_params(n, r, reduced, batch=(3,), seed=31)
    rows, cols = free_block_shape(n, r, reduced)
    block = layout[..., n - rows:, :]
    assert block.shape == (3, rows, cols)
    torch.testing.assert_close(householder_frame_free(block, n, reduced), householder_frame(layout, reduced),
                               rtol=0, atol=1e-14)


def test_free_block_gradients_match_layout_gradients():
    n, r = 9, 4
    for reduced in BOTH_FORMS:
        layout = _random_params(n, r, reduced, seed=32).requires_grad_()
        block = layout.detach()[r:].clone().requires_grad_() if reduced else layout.detach().clone().requires_grad_()
        weight = torch.randn(n, r, generator=_gen(33), dtype=torch.float64)
        (householder_frame(layout, reduced) * weight).sum().backward()
        (householder_frame_free(block, n, reduced) * weight).sum().backward()
        expected = layout.grad[r:] if reduced else layout.grad * frame_mask(n, r, dtype=torch.float64)
        got = block.grad if reduced else block.grad * frame_mask(n, r, dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_grouped_frames_match_individual_frames():
    specs = [(9, 4, False), (9, 4, True), (9, 4, False), (6, 6, True), (7, 1, False), (9, 4, True)]
    blocks = [_random_params(n, r, red, seed=40 + i)[n - free_block_shape(n, r, red)[0]:]
              for i, (n, r, red) in enumerate(specs)]
    frames = householder_frames_grouped(blocks, [n for n, _, _ in specs], [red for _, _, red in specs])
    for q, b, (n, _, red) in zip(frames, blocks, specs):
        torch.testing.assert_close(q, householder_frame_free(b, n, red), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="one of each"):
        householder_frames_grouped(blocks, [9], [False])


def test_frame_batches_match_individual_frames():
    specs = [(9, 4, False, 3), (9, 4, True, 1), (9, 4, False, 2), (6, 6, True, 1), (7, 1, False, 4)]
    batches = [[_random_params(n, r, red, seed=60 + 10 * i + j)[n - free_block_shape(n, r, red)[0]:]
                for j in range(b)] for i, (n, r, red, b) in enumerate(specs)]
    frames = householder_frame_batches(batches, [n for n, *_ in specs], [red for _, _, red, _ in specs])
    for q, blocks, (n, r, red, b) in zip(frames, batches, specs):
        assert q.shape == (b, n, r)
        for qi, block in zip(q, blocks):
            torch.testing.assert_close(qi, householder_frame_free(block, n, red), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="mixes block shapes"):
        householder_frame_batches([[batches[0][0], batches[3][0]]], [9], [False])
    with pytest.raises(ValueError, match="one of each"):
        householder_frame_batches(batches, [9], [False])


def test_blocked_inverse_choice_is_measured_once_and_not_under_a_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    import torch_sttp.frames as frames

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    key = (64, torch.get_num_threads())
    frames._BLOCKED_FASTER.pop(key, None)
    with Count():
        assert frames.blocked_inverse_pays(64, "cpu") is False  # the solve, and no timing runs to be counted
    assert Count.calls == 0 and key not in frames._BLOCKED_FASTER
    first = frames.blocked_inverse_pays(64, "cpu")
    assert frames._BLOCKED_FASTER[key] is first and frames.blocked_inverse_pays(64, "cpu") is first


def test_free_block_rejects_wrong_shape():
    with pytest.raises(ValueError, match="reduced frame of shape"):
        householder_frame_free(torch.zeros(9, 4), 9, reduced=True)


@pytest.mark.parametrize("r", [32, 64, 128])
def test_blocked_triangular_inverse_equals_the_solve(r):
    from torch_sttp.frames import blocked_inverse_pays, compact_wy, triangular_inverse, wy_constants

    gen = torch.Generator().manual_seed(r)
    y = torch.randn(3, 2 * r, r, generator=gen, dtype=torch.float64)
    a = (y.mT @ y).triu(1) + torch.diag_embed(0.5 * (y * y).sum(-2))
    torch.testing.assert_close(triangular_inverse(a, blocked=True), triangular_inverse(a), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(triangular_inverse(a, blocked=True) @ a, torch.eye(r, dtype=a.dtype).expand_as(a),
                               rtol=0, atol=1e-12)
    assert not blocked_inverse_pays(r, "cuda") and not blocked_inverse_pays(48, "cpu")
    unit = y.tril(-1) + torch.eye(2 * r, r, dtype=y.dtype)
    blocked = compact_wy(unit, constants=wy_constants(2 * r, r, dtype=y.dtype, blocked=True))
    plain = compact_wy(unit, constants=wy_constants(2 * r, r, dtype=y.dtype, blocked=False))
    torch.testing.assert_close(blocked, plain, rtol=1e-12, atol=1e-13)
