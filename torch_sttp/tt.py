"""Tensor-train arithmetic for spectral parametrizations: mode factorisation, bond ranks, DOF, TT-SVD.

A weight is viewed as a matrix W (d_out × d_in) in the layout (d_out, C_in, *kernel): d_in = C_in·∏kernel.
For STTP the modes, from the U end to the V end, are the prime factors of d_out ascending, the prime factors of
C_in ascending, then one mode of size ∏kernel for a convolution (a 1×1 kernel gives a mode of size 1). Σ sits
after the last d_out mode. For SVDP the modes are simply (d_out) and (d_in).

Bond ranks follow the Holtz bound (paper eq. 3), with r as a cap: R_k = min(r, ∏_{j≤k} n_j, ∏_{j>k} n_j).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .options import METHODS, SPECTRA, check_method, check_rank, check_spectrum

__all__ = [
    "METHODS",
    "SPECTRA",
    "prime_factors",
    "matrix_shape",
    "layout_view",
    "transposed_layout_shape",
    "split_modes",
    "tt_ranks",
    "count_dof",
    "tt_svd",
    "contract_train",
    "contract_train_from_right",
]

def _check_weight_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"weight shape must be integers (d_out, C_in, *kernel), got {shape!r}")
    if any(s < 1 for s in shape):
        raise ValueError(f"weight shape {shape} has an empty dimension; every dimension must be ≥ 1")
    return shape


def prime_factors(n: int) -> list[int]:
    """Prime factors of n with repetition, ascending; [] for n = 1."""
    if n < 1:
        raise ValueError(f"prime_factors needs n ≥ 1, got {n}")
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(d_out, d_in) of a weight in the (d_out, C_in, *kernel) layout."""
    shape = _check_weight_shape(shape)
    return shape[0], math.prod(shape[1:])


def transposed_layout_shape(shape: Sequence[int], transposed: bool) -> tuple[int, ...]:
    """A weight shape in the (d_out, C_in, *kernel) layout: a transposed conv's (C_in, C_out, *kernel) has its
    first two axes swapped; any other shape is returned as it is."""
    shape = tuple(int(s) for s in shape)
    return (shape[1], shape[0], *shape[2:]) if transposed else shape


def layout_view(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``weight`` in the (d_out, C_in, *kernel) layout (a view); its own inverse: applied to a layout tensor it
    gives back a transposed conv's weight."""
    return weight.transpose(0, 1) if transposed else weight


def split_modes(shape: Sequence[int], method: str) -> tuple[list[int], list[int]]:
    """Modes of the U side (d_out) and of the V side (d_in), both listed from the U end towards the V end."""
    shape = _check_weight_shape(shape)
    check_method(method)
    d_out, d_in = matrix_shape(shape)
    if method == "svdp":
        return [d_out], [d_in]
    in_modes = prime_factors(shape[1])
    if len(shape) > 2:
        in_modes.append(math.prod(shape[2:]))
    return prime_factors(d_out), in_modes


def tt_ranks(modes: Sequence[int], rank: int) -> list[int]:
    """Bond ranks R_0…R_D = min(rank, ∏_{j≤k} n_j, ∏_{j>k} n_j) (paper eq. 3)."""
    total = math.prod(modes)
    ranks, left = [], 1
    for k in range(len(modes) + 1):
        ranks.append(min(rank, left, total // left))
        if k < len(modes):
            left *= modes[k]
    return ranks


def count_dof(shape: Sequence[int], method: str = "sttp", rank: int = 64, spectrum: str = "normalized") -> int:
    """Exact number of free parameters of an SVDP/STTP weight (paper eq. 9).

    ``shape`` is in the (d_out, C_in, *kernel) layout. With modes n and bond ranks R (Σ after the d_out modes):
    DOF = Σ_k R_{k−1} n_k R_k − Σ_{inner bonds} R_k², minus R_mid(R_mid+1)/2 for the identity spectrum. For SVDP this
    is r(d_out + d_in) − r² (learned) or r(d_out + d_in) − r(3r+1)/2 (identity). ``"free"`` counts as
    ``"normalized"`` (the latter has one direction, the common scale of S, that does not move W).
    """
    rank = check_rank(rank)
    check_spectrum(spectrum)
    out_modes, in_modes = split_modes(shape, method)
    modes = out_modes + in_modes
    ranks = tt_ranks(modes, rank)
    r_mid = ranks[len(out_modes)]
    if not modes:  # a 1×1 STTP weight: only Σ
        return 0 if spectrum == "identity" else 1
    dof = sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(modes))
    dof -= sum(R * R for R in ranks[1:-1])
    if spectrum == "identity":
        dof -= r_mid * (r_mid + 1) // 2
    return dof


def tt_svd(tensor: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1) with prescribed bond ranks.

    ``tensor`` has shape (n_1, …, n_D); returns cores (R_{k−1}, n_k, R_k), cores 1…D−1 left-orthonormal. The
    squared error is at most Σ_k Σ_{i>R_k} σ_i(unfolding_k)².
    """
    modes = list(tensor.shape)
    cores = []
    rest = tensor.reshape(1, -1)
    for k, n in enumerate(modes[:-1]):
        mat = rest.reshape(ranks[k] * n, -1)
        rk = ranks[k + 1]
        if rk == mat.shape[0] <= mat.shape[1]:
            # nothing to truncate: an identity core, the rest is the matrix itself (skips SVDs of very wide
            # unfoldings, which cost time and numel-sized temporaries)
            cores.append(torch.eye(rk, dtype=mat.dtype, device=mat.device).reshape(ranks[k], n, rk))
            rest = mat
            continue
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        cores.append(u[:, :rk].reshape(ranks[k], n, rk))
        rest = s[:rk, None] * vh[:rk]
    cores.append(rest.reshape(ranks[-2], modes[-1], 1))
    return cores


def contract_train(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores (…, R_{k−1}, n_k, R_k) into a matrix (…, R_0·n_1⋯n_D, R_D), row index row-major over the
    modes. Leading dimensions (…) are a batch of trains of one structure."""
    lead = cores[0].shape[:-3]
    out = cores[0].reshape(*lead, -1, cores[0].shape[-1])
    for core in cores[1:]:
        out = (out @ core.reshape(*lead, core.shape[-3], -1)).reshape(*lead, -1, core.shape[-1])
    return out


def contract_train_from_right(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores (…, R_{k−1}, n_k, R_k) into a matrix (…, R_0, n_1⋯n_D·R_D), starting at the right end.

    Same tensor as :func:`contract_train` (reshaped), cheaper when R_0 is large and the ranks shrink to the right:
    step k costs 2·R_{k−1}·n_k·R_k·(n_{k+1}⋯n_D·R_D) instead of carrying R_0 through every step.
    """
    lead = cores[-1].shape[:-3]
    out = cores[-1].reshape(*lead, cores[-1].shape[-3], -1)
    for core in reversed(cores[:-1]):
        out = (core.reshape(*lead, -1, core.shape[-1]) @ out).reshape(*lead, core.shape[-3], -1)
    return out

