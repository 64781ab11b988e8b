"""Tests for torch_sttp.tt: mode factorisation, bond ranks, exact DOF and TT-SVD."""
import math

import pytest
import torch

from torch_sttp.tt import (
    METHODS,
    SPECTRA,
    contract_train,
    contract_train_from_right,
    count_dof,
    matrix_shape,
    prime_factors,
    split_modes,
    tt_ranks,
    tt_svd,
)


# ----------------------------------------------------------------------------------------- reference helpers
def _is_prime(n):
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _ref_factors(n):
    """Prime factors by repeated division by the smallest divisor (a second, slower implementation)."""
    out = []
    while n > 1:
        d = next(d for d in range(2, n + 1) if n % d == 0)
        out.append(d)
        n //= d
    return out


def _ref_modes(shape, method):
    d_out, c_in, kernel = shape[0], shape[1], shape[2:]
    if method == "svdp":
        return [d_out], [c_in * math.prod(kernel)]
    in_modes = _ref_factors(c_in) + ([math.prod(kernel)] if kernel else [])
    return _ref_factors(d_out), in_modes


def _ref_ranks(modes, rank):
    """R_k = min(r, ∏_{j≤k} n_j, ∏_{j>k} n_j), k = 0..D."""
    return [min(rank, math.prod(modes[:k]), math.prod(modes[k:])) for k in range(len(modes) + 1)]


def _ref_dof(shape, method, rank, spectrum):
    """Paper eq. 9: Σ_k R_{k−1} n_k R_k − Σ_{k=1}^{D−1} R_k², minus R_mid(R_mid+1)/2 for the identity spectrum.

    With no modes at all (a 1×1 STTP weight) the weight is the single value Σ: one DOF, none for identity.
    """
    out_modes, in_modes = _ref_modes(shape, method)
    modes = out_modes + in_modes
    if not modes:
        return 0 if spectrum == "identity" else 1
    R = _ref_ranks(modes, rank)
    D = len(modes)
    dof = sum(R[k - 1] * modes[k - 1] * R[k] for k in range(1, D + 1)) - sum(R[k] ** 2 for k in range(1, D))
    if spectrum == "identity":
        r_mid = R[len(out_modes)]
        dof -= r_mid * (r_mid + 1) // 2
    return dof


def _svdp_closed_form(shape, rank, spectrum):
    d_out, d_in = shape[0], math.prod(shape[1:])
    r = min(rank, d_out, d_in)
    if spectrum == "identity":
        return r * (d_out + d_in) - r * (3 * r + 1) // 2
    return r * (d_out + d_in) - r * r


def _oseledets_bound(tensor, ranks):
    modes = list(tensor.shape)
    total = 0.0
    for k in range(1, len(modes)):
        unf = tensor.reshape(math.prod(modes[:k]), -1)
        s = torch.linalg.svdvals(unf)
        total += (s[ranks[k]:] ** 2).sum().item()
    return total


SHAPES = [
    (6, 10), (1, 20), (20, 1), (1, 1), (7, 5), (13, 13), (30, 3), (16, 72), (64, 32), (1009, 2),
    (12, 18, 3, 3), (16, 8, 3, 3), (8, 6, 3), (4, 6, 1, 1), (1, 1, 1, 1), (1, 5, 3), (5, 1, 2, 2),
    (7, 11, 5, 5), (32, 16, 1), (9, 4, 3, 3, 3),
]
RANKS = [1, 2, 3, 4, 8, 64, 10_000]


# -------------------------------------------------------------------------------------------- prime_factors
@pytest.mark.parametrize(
    "n, expected",
    [
        (1, []), (2, [2]), (3, [3]), (4, [2, 2]), (12, [2, 2, 3]), (72, [2, 2, 2, 3, 3]), (97, [97]),
        (1009, [1009]), (1024, [2] * 10), (2 * 1009, [2, 1009]), (1009 * 1009, [1009, 1009]),
        (360, [2, 2, 2, 3, 3, 5]), (2310, [2, 3, 5, 7, 11]), (49, [7, 7]),
    ],
)
def test_prime_factors_examples(n, expected):
    assert prime_factors(n) == expected


def test_prime_factors_agrees_with_reference():
    for n in range(1, 600):
        f = prime_factors(n)
        assert f == _ref_factors(n)
        assert f == sorted(f)
        assert math.prod(f) == n
        assert all(_is_prime(p) for p in f)


@pytest.mark.parametrize("n", [0, -1, -12])
def test_prime_factors_rejects_non_positive(n):
    with pytest.raises(ValueError):
        prime_factors(n)


# ---------------------------------------------------------------------------------------------- split_modes
def test_split_modes_linear():
    assert split_modes((6, 10), "sttp") == ([2, 3], [2, 5])
    assert split_modes((6, 10), "svdp") == ([6], [10])
    assert split_modes((64, 32), "sttp") == ([2] * 6, [2] * 5)
    assert split_modes((7, 5), "sttp") == ([7], [5])
    assert split_modes((1009, 2), "sttp") == ([1009], [2])


def test_split_modes_conv():
    assert split_modes((12, 18, 3, 3), "sttp") == ([2, 2, 3], [2, 3, 3, 9])
    assert split_modes((12, 18, 3, 3), "svdp") == ([12], [162])
    assert split_modes((16, 8, 3, 3), "sttp") == ([2, 2, 2, 2], [2, 2, 2, 9])
    assert split_modes((8, 6, 3), "sttp") == ([2, 2, 2], [2, 3, 3])
    assert split_modes((9, 4, 3, 3, 3), "sttp") == ([3, 3], [2, 2, 27])
    assert split_modes((7, 11, 5, 5), "svdp") == ([7], [275])


def test_split_modes_one_by_one_conv():
    # a 1×1 kernel still contributes one mode, of size 1
    assert split_modes((4, 6, 1, 1), "sttp") == ([2, 2], [2, 3, 1])
    assert split_modes((32, 16, 1), "sttp") == ([2] * 5, [2, 2, 2, 2, 1])
    assert split_modes((4, 6, 1, 1), "svdp") == ([4], [6])


def test_split_modes_dims_of_one():
    assert split_modes((1, 20), "sttp") == ([], [2, 2, 5])
    assert split_modes((20, 1), "sttp") == ([2, 2, 5], [])
    assert split_modes((1, 1), "sttp") == ([], [])
    assert split_modes((1, 1), "svdp") == ([1], [1])
    assert split_modes((1, 1, 1, 1), "sttp") == ([], [1])
    assert split_modes((1, 5, 3), "sttp") == ([], [5, 3])
    assert split_modes((5, 1, 2, 2), "sttp") == ([5], [4])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_split_modes_matches_reference(shape, method):
    out_modes, in_modes = split_modes(shape, method)
    assert (out_modes, in_modes) == _ref_modes(shape, method)
    d_out, d_in = matrix_shape(shape)
    assert (d_out, d_in) == (shape[0], math.prod(shape[1:]))
    assert math.prod(out_modes) == d_out
    assert math.prod(in_modes) == d_in


def test_split_modes_accepts_torch_size():
    assert split_modes(torch.Size([12, 18, 3, 3]), "sttp") == ([2, 2, 3], [2, 3, 3, 9])


# ------------------------------------------------------------------------------------------------- tt_ranks
def test_tt_ranks_paper_supplement_example():
    # Supplement §8: W ∈ R^{16 × 8·3·3}, r = 4, with 72 factorised as 2·2·2·3·3 and V's modes read from Σ
    # outwards: n = (2,2,2,2, 3,3,2,2,2), R = (1,2,4,4,4,4,4,4,2,1).
    n = [2, 2, 2, 2] + list(reversed([2, 2, 2, 3, 3]))
    assert n == [2, 2, 2, 2, 3, 3, 2, 2, 2]
    assert tt_ranks(n, 4) == [1, 2, 4, 4, 4, 4, 4, 4, 2, 1]
    # the matricized core sizes listed there: {(2×2)², (4×4)², (8×4)³, (12×4)²}
    R = tt_ranks(n, 4)
    d_u = 4
    sizes = [(R[k] * n[k], R[k + 1]) for k in range(d_u)]
    sizes += [(R[k + 1] * n[k], R[k]) for k in range(d_u, len(n))]
    assert sorted(sizes) == sorted([(2, 2)] * 2 + [(4, 4)] * 2 + [(8, 4)] * 3 + [(12, 4)] * 2)


def test_tt_ranks_our_convention_for_the_paper_example():
    # our convention keeps one kernel mode: (16, 8, 3, 3) → [2,2,2,2] | [2,2,2,9]
    out_modes, in_modes = split_modes((16, 8, 3, 3), "sttp")
    assert tt_ranks(out_modes + in_modes, 4) == [1, 2, 4, 4, 4, 4, 4, 4, 1]
    assert tt_ranks(out_modes + in_modes, 100) == [1, 2, 4, 8, 16, 32, 18, 9, 1]


@pytest.mark.parametrize(
    "modes, rank, expected",
    [
        ([2, 3], 100, [1, 2, 1]),
        ([6], 3, [1, 1]),
        ([], 5, [1]),
        ([2, 2, 2, 2], 100, [1, 2, 4, 2, 1]),
        ([2, 2, 2, 2], 3, [1, 2, 3, 2, 1]),
        ([2, 2, 2, 2], 1, [1, 1, 1, 1, 1]),
        ([2, 2, 3, 2, 3, 3, 9], 8, [1, 2, 4, 8, 8, 8, 8, 1]),
        ([2, 3, 1], 8, [1, 2, 1, 1]),
        ([2, 2, 2, 3, 1], 8, [1, 2, 4, 3, 1, 1]),
        ([5, 1009], 7, [1, 5, 1]),
    ],
)
def test_tt_ranks_examples(modes, rank, expected):
    assert tt_ranks(modes, rank) == expected


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
def test_tt_ranks_properties(shape, rank):
    out_modes, in_modes = split_modes(shape, "sttp")
    modes = out_modes + in_modes
    R = tt_ranks(modes, rank)
    assert R == _ref_ranks(modes, rank)
    assert len(R) == len(modes) + 1
    assert R[0] == 1 and R[-1] == 1
    assert all(1 <= x <= rank for x in R)
    # TT ranks of a matrix's tensorisation: the middle bond is the matrix rank bound
    assert R[len(out_modes)] == min(rank, matrix_shape(shape)[0], matrix_shape(shape)[1])
    # neighbouring ranks are consistent: R_k ≤ R_{k−1}·n_k and R_{k−1} ≤ n_k·R_k
    for k, n in enumerate(modes):
        assert R[k + 1] <= R[k] * n and R[k] <= n * R[k + 1]


def test_tt_ranks_equal_generic_unfolding_ranks():
    # without a cap, R_k is the rank of the k-th unfolding of a generic tensor
    gen = torch.Generator().manual_seed(0)
    for modes in ([2, 3, 2], [2, 2, 2, 3], [3, 1, 4], [5, 2, 2], [2, 2, 2, 2, 2]):
        t = torch.randn(modes, generator=gen, dtype=torch.float64)
        R = tt_ranks(modes, 10_000)
        for k in range(len(modes) + 1):
            unf = t.reshape(math.prod(modes[:k]), -1)
            assert torch.linalg.matrix_rank(unf).item() == R[k]


# ------------------------------------------------------------------------------------------------ count_dof
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_count_dof_svdp_closed_form(shape, rank, spectrum):
    assert count_dof(shape, "svdp", rank, spectrum) == _svdp_closed_form(shape, rank, spectrum)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("spectrum", SPECTRA)
def test_count_dof_sttp_matches_eq9(shape, rank, spectrum):
    assert count_dof(shape, "sttp", rank, spectrum) == _ref_dof(shape, "sttp", rank, spectrum)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
def test_count_dof_relations(shape, rank):
    for method in METHODS:
        free = count_dof(shape, method, rank, "free")
        assert free == count_dof(shape, method, rank, "normalized")
        ident = count_dof(shape, method, rank, "identity")
        assert 0 <= ident < free
        # never more than the dense weight
        assert free <= math.prod(shape)
    # STTP with one U mode and one V mode is SVDP
    out_modes, in_modes = split_modes(shape, "sttp")
    if len(out_modes) == 1 and len(in_modes) == 1:
        for spectrum in SPECTRA:
            assert count_dof(shape, "sttp", rank, spectrum) == count_dof(shape, "svdp", rank, spectrum)


def test_count_dof_full_rank_equals_dense_size():
    # at full rank a learned spectrum spans every matrix (SVDP) and every tensor (STTP): d_out·d_in
    for shape in [(6, 10), (12, 18, 3, 3), (1, 20), (7, 5), (4, 6, 1, 1), (1, 1)]:
        for method in METHODS:
            assert count_dof(shape, method, 10_000, "free") == math.prod(shape)


def test_count_dof_examples():
    # SVDP 6×10, r = 3: 3·16 − 9 = 39 learned; 48 − 15 = 33 identity
    assert count_dof((6, 10), "svdp", 3, "normalized") == 39
    assert count_dof((6, 10), "svdp", 3, "identity") == 33
    # STTP 6×10 → modes 2,3 | 2,5, r = 3: R = (1,2,3,3,1) → 4 + 18 + 18 + 15 − (4+9+9) = 33; identity − 6
    assert count_dof((6, 10), "sttp", 3, "free") == 33
    assert count_dof((6, 10), "sttp", 3, "identity") == 27
    # 1×1 weight: the single singular value
    assert count_dof((1, 1), "sttp", 5, "free") == 1
    assert count_dof((1, 1), "svdp", 5, "free") == 1
    assert count_dof((1, 1), "sttp", 5, "identity") == 0
    assert count_dof((1, 1), "svdp", 5, "identity") == 0


def test_count_dof_defaults():
    assert count_dof((64, 32)) == count_dof((64, 32), "sttp", 64, "normalized")


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, False, "3", None])
def test_count_dof_rejects_bad_rank(rank):
    with pytest.raises(ValueError):
        count_dof((6, 10), "sttp", rank, "free")
    with pytest.raises(ValueError):
        count_dof((6, 10), "svdp", rank, "free")


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (4, 6, 0, 3), (5,), (), (2.0, 3), (True, 3), (4, -2)])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        count_dof(shape, "sttp", 3, "free")
    with pytest.raises(ValueError):
        count_dof(shape, "svdp", 3, "free")
    with pytest.raises(ValueError):
        split_modes(shape, "sttp")
    with pytest.raises(ValueError):
        matrix_shape(shape)


def test_unknown_method_or_spectrum_raises():
    with pytest.raises(ValueError):
        count_dof((6, 10), "tt", 3, "free")
    with pytest.raises(ValueError):
        count_dof((6, 10), "SVDP", 3, "free")
    with pytest.raises(ValueError):
        split_modes((6, 10), "svd")
    with pytest.raises(ValueError):
        count_dof((6, 10), "sttp", 3, "learned")
    with pytest.raises(ValueError):
        count_dof((6, 10), "svdp", 3, None)


# --------------------------------------------------------------------------------------------------- tt_svd
def _check_cores(cores, modes, ranks):
    assert len(cores) == len(modes)
    for k, core in enumerate(cores):
        assert tuple(core.shape) == (ranks[k], modes[k], ranks[k + 1])
    # all cores but the last are left-orthonormal
    for core in cores[:-1]:
        m = core.reshape(-1, core.shape[-1])
        torch.testing.assert_close(m.T @ m, torch.eye(m.shape[1], dtype=m.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "modes", [[2, 3], [2, 3, 2, 5], [2, 2, 3, 2, 3, 3, 9], [4, 1, 3], [2, 3, 1], [7], [1, 5], [3, 3, 3, 3]]
)
def test_tt_svd_exact_at_holtz_ranks(modes):
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(modes, generator=gen, dtype=torch.float64)
    ranks = tt_ranks(modes, 10_000)
    cores = tt_svd(t, ranks)
    _check_cores(cores, modes, ranks)
    rec = contract_train(cores).reshape(modes)
    torch.testing.assert_close(rec, t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "modes, rank", [([2, 3, 2, 5], 2), ([2, 2, 3, 2, 3, 3, 9], 4), ([3, 3, 3, 3], 1), ([2, 2, 2, 2, 2, 2], 3)]
)
def test_tt_svd_oseledets_bound(modes, rank):
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        t = torch.randn(modes, generator=gen, dtype=torch.float64)
        ranks = tt_ranks(modes, rank)
        cores = tt_svd(t, ranks)
        _check_cores(cores, modes, ranks)
        err = (contract_train(cores).reshape(modes) - t).pow(2).sum().item()
        bound = _oseledets_bound(t, ranks)
        assert bound > 0
        assert err <= bound * (1 + 1e-10)


def test_tt_svd_low_rank_tensor_is_recovered_exactly():
    # a tensor built from a train of small ranks is recovered by TT-SVD at those ranks
    gen = torch.Generator().manual_seed(3)
    modes, ranks = [2, 3, 4, 3, 2], [1, 2, 2, 2, 2, 1]
    cores = [torch.randn(ranks[k], n, ranks[k + 1], generator=gen, dtype=torch.float64) for k, n in enumerate(modes)]
    t = contract_train(cores).reshape(modes)
    rec = contract_train(tt_svd(t, ranks)).reshape(modes)
    torch.testing.assert_close(rec, t, rtol=1e-11, atol=1e-11)


def test_tt_svd_matrix_case_is_truncated_svd():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    cores = tt_svd(a, [1, 3, 1])
    err = (contract_train(cores).reshape(6, 9) - a).pow(2).sum()
    s = torch.linalg.svdvals(a)
    torch.testing.assert_close(err, (s[3:] ** 2).sum(), rtol=1e-10, atol=0)


def test_contract_train_row_major():
    gen = torch.Generator().manual_seed(5)
    c1 = torch.randn(1, 2, 3, generator=gen, dtype=torch.float64)
    c2 = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    c3 = torch.randn(2, 5, 1, generator=gen, dtype=torch.float64)
    out = contract_train([c1, c2, c3])
    ref = torch.einsum("aib,bjc,ckd->aijkd", c1, c2, c3).reshape(-1, 1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("modes, rank", [([2, 3, 4], 3), ([5], 2), ([2, 2, 2, 2, 3], 4), ([7, 1, 3], 5)])
def test_contract_train_from_right_equals_left_to_right(modes, rank):
    ranks = [rank] + tt_ranks(modes, rank)[1:]  # an outer rank > 1 on the left, as for the V side of a train
    g = torch.Generator().manual_seed(3)
    cores = [torch.randn(ranks[k], n, ranks[k + 1], generator=g, dtype=torch.float64) for k, n in enumerate(modes)]
    left = contract_train(cores).reshape(ranks[0], -1)
    torch.testing.assert_close(contract_train_from_right(cores), left, rtol=1e-12, atol=1e-12)


def test_tt_svd_exact_leading_bonds_get_identity_cores():
    # bonds whose Holtz rank equals the left product cannot truncate: their cores are identities (no SVD of the
    # very wide unfolding), and the train still meets the TT-SVD error bound
    modes, rank = [2, 2, 2, 3, 2, 2], 6
    ranks = tt_ranks(modes, rank)
    t = torch.randn(modes, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cores = tt_svd(t, ranks)
    assert ranks[:3] == [1, 2, 4]
    for k in (0, 1):
        torch.testing.assert_close(cores[k].reshape(-1, ranks[k + 1]), torch.eye(ranks[k + 1], dtype=t.dtype))
    for core in cores[:-1]:
        mat = core.reshape(-1, core.shape[-1])
        torch.testing.assert_close(mat.mT @ mat, torch.eye(mat.shape[1], dtype=t.dtype), rtol=0, atol=1e-12)
    bound = 0.0
    for k in range(1, len(modes)):
        s = torch.linalg.svdvals(t.reshape(math.prod(modes[:k]), -1))
        bound += (s[ranks[k]:] ** 2).sum().item()
    err = (contract_train(cores).reshape(modes) - t).pow(2).sum().item()
    assert err <= bound * (1 + 1e-9) + 1e-20
