"""Reading the spectra of a model's layers: singular values, per-layer statistics, convolution operator norms.

    >>> sv = inspection.singular_values(model)            # {layer name: σ descending}, forward order
    >>> inspection.spectral_stats(model)["lipschitz_proxy"]

Every layer is seen through its matrix W ∈ R^{d_out × d_in} (:func:`torch_sttp.layers.weight_matrix`): Linear
(out, in); ConvNd (C_out, C_in/groups·∏kernel); ConvTransposeNd with its first two weight axes swapped,
(C_out/groups, C_in·∏kernel); Embedding (num, dim). For an SVDP/STTP layer the singular values are read from Σ
exactly (|σ|, no SVD): U and V are orthonormal, so σ(W) = |diag Σ| (r of them; the remaining min(d_out, d_in) − r
singular values of W are zero). For dense layers they come from ``torch.linalg.svdvals`` of W. Everything is device-
and dtype-agnostic (float32/float64, CPU/CUDA). Layers are selected as everywhere in the package, by
:func:`torch_sttp.layers.select_layers` (``inspect=True``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .layers import select_layers, weight_matrix
from .modules import conv_function
from .parametrizations import fixed_row, parametrization_tensors, spectral_parametrization

__all__ = ["spectral_layers", "layer_singular_values", "singular_values", "snapshot_spectra", "spectral_stats",
           "conv_operator_norm"]


def spectral_layers(model: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every supported layer whose weight reads as a matrix — dense or SVDP/STTP — selected by
    ``include``/``exclude`` (names, globs or module types), in ``named_modules`` order."""
    return select_layers(model, include, exclude, inspect=True)[0]


def layer_singular_values(layer: nn.Module) -> torch.Tensor:
    """σ(W) of one layer, descending, 1-D (k,), differentiable: |Σ| for an SVDP/STTP layer (k = r, exact),
    ``svdvals(W)`` of the (d_out, d_in) matrix otherwise (k = min(d_out, d_in)).

    A converted Embedding with ``padding_idx`` uses U·Σ·Vᵀ with its padding row replaced by the fixed row, so its
    σ are not |Σ|: they are the r largest ``svdvals`` of the weight it uses (all of them when the fixed row is zero,
    whose rank is then ≤ r)."""
    p = spectral_parametrization(layer)
    if p is not None and fixed_row(layer) is not None:
        return torch.linalg.svdvals(weight_matrix(layer, layer.weight))[: p.r_mid]
    if p is not None:
        return p.singular_values(*parametrization_tensors(layer))
    return torch.linalg.svdvals(weight_matrix(layer, layer.weight))


def singular_values(model_or_layer: nn.Module, layers=None, grad: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """{layer name: σ (k,) descending} for every supported layer, in ``named_modules`` (forward) order.

    SVDP/STTP layers: σ = sort(|diag Σ|) from the parametrization (k = r, exact, no SVD; a converted Embedding with
    ``padding_idx``: the SVD of the weight it uses, see :func:`layer_singular_values`); dense Linear, ConvNd,
    ConvTransposeNd, Embedding: σ = svdvals(W) (k = min(d_out, d_in)). A single layer comes back under the name ``""``.

    Args:
        layers: names, globs (``"features.*"``) or module types selecting layers (default: all supported), as
            ``include`` of :func:`torch_sttp.convert`.
        grad: keep the autograd graph (default: detached values computed under ``torch.no_grad``).

    Dense layers are read through ``layer.weight``: under ``spectral_norm`` in training mode that access runs the
    power iteration (updating its vectors), as a forward pass would.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for name, m in spectral_layers(model_or_layer, layers):
            s = layer_singular_values(m)
            out[name] = s if grad else s.detach()
    return out


def snapshot_spectra(model: nn.Module, layers=None) -> "OrderedDict[str, torch.Tensor]":
    """A CPU copy of :func:`singular_values` for logging spectra during training ({name: σ (k,)})."""
    return OrderedDict((n, s.detach().to("cpu", copy=True)) for n, s in singular_values(model, layers).items())


def spectral_stats(model: nn.Module, layers=None) -> dict:
    """Per-layer spectral statistics and the Lipschitz proxy of eq. (1).

    Returns ``{"layers": {name: {"sigma_max", "sigma_min", "stable_rank", "rank"}}, "lipschitz_proxy": float}`` with
    stable rank ‖W‖²_F / σ²_max = Σᵢσᵢ² / σ²_max, and lipschitz_proxy = ∏_ℓ σ_max(W_ℓ) over the selected layers.
    The product bounds the Lipschitz constant of a feed-forward chain of Linear layers and 1-Lipschitz activations;
    for convolutions σ_max of the kernel matrix is only a proxy of the layer's operator norm (paper, footnote 1) — use
    :func:`conv_operator_norm` for the exact value at a given input size.
    """
    per_layer = {}
    proxy = 1.0
    for name, s in singular_values(model, layers).items():
        s64 = s.double()
        smax = float(s64.max()) if s64.numel() else 0.0
        per_layer[name] = {
            "sigma_max": smax,
            "sigma_min": float(s64.min()) if s64.numel() else 0.0,
            "stable_rank": float((s64 ** 2).sum() / smax ** 2) if smax > 0 else 0.0,
            "rank": int(s64.numel()),
        }
        proxy *= smax
    return {"layers": per_layer, "lipschitz_proxy": proxy if per_layer else float("nan")}


def _conv_input_shape(conv: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """(C_in, S₁, …, S_N) from (S₁, …, S_N), (C_in, S₁, …, S_N) or (B, C_in, S₁, …, S_N)."""
    if not isinstance(conv, nn.modules.conv._ConvNd):
        raise TypeError(f"conv_operator_norm needs a convolution layer, got {type(conv).__name__}")
    nd = len(conv.kernel_size)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == nd:
        shape = (conv.in_channels, *shape)
    elif len(shape) == nd + 2:
        shape = shape[1:]
    elif len(shape) != nd + 1:
        raise ValueError(f"input_shape {tuple(input_shape)} does not fit a {nd}-d convolution")
    if shape[0] != conv.in_channels:
        raise ValueError(f"input_shape has {shape[0]} channels, the layer expects {conv.in_channels}")
    return shape


def _linear_map(conv: nn.Module, weight: torch.Tensor):
    """x ↦ conv(x) without bias, with the layer's stride, padding (and mode), dilation, groups, output padding."""
    if conv.transposed:
        fn = conv_function(len(conv.kernel_size), transposed=True)
        return lambda x: fn(x, weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups,
                            conv.dilation)
    return lambda x: conv._conv_forward(x, weight, None)


def conv_operator_norm(
    conv: nn.Module,
    input_shape: Sequence[int],
    iters: int = 1000,
    tol: float = 1e-8,
    block: int = 8,
    generator: torch.Generator | None = None,
) -> float:
    """Exact ℓ2 operator norm ‖x ↦ conv(x)‖ (bias excluded) of a convolution on inputs of a given size.

    A is the layer's linear map (its stride, padding, padding mode, dilation, groups, output padding) on inputs
    (C_in, S₁, …, S_N), Aᵀ its adjoint, applied as the vector–Jacobian product of A. Block power iteration on AᵀA
    with Rayleigh–Ritz: X (n × b, orthonormal) ← qr(AᵀA X); σ = √λ_max((AX)ᵀ(AX)) — a lower bound of σ_max(A)
    increasing to it at rate (σ_{b+1}/σ₁)^{2k} (``block=1`` is plain power iteration). Stops once
    |σ_k − σ_{k−1}| ≤ tol·σ_k (tol at least 4 × the dtype's machine epsilon), or after ``iters`` steps.

    Args:
        conv: an ``nn.ConvNd`` or ``nn.ConvTransposeNd`` (dense or converted).
        input_shape: the spatial size (S₁, …, S_N), or (C_in, S₁, …, S_N), or (B, C_in, S₁, …, S_N) (B ignored).
        block: b, the number of vectors iterated together (a batch of b inputs).
    Returns a float. It can exceed σ_max of the kernel matrix W (C_out × C_in·∏kernel) that :func:`spectral_stats`
    reports (paper, footnote 1).
    """
    shape = _conv_input_shape(conv, input_shape)
    with torch.no_grad():
        weight = conv.weight.detach()
    apply = _linear_map(conv, weight)
    n = math.prod(shape)
    b = max(1, min(int(block), n))

    def orthonormal(g: torch.Tensor) -> torch.Tensor:  # (b, *shape) → rows orthonormal in R^n
        q, _ = torch.linalg.qr(g.reshape(b, n).mT)
        return q.mT.reshape(b, *shape)

    tol = max(float(tol), 4 * torch.finfo(weight.dtype).eps)  # below rounding, σ_k jitters instead of settling
    x = torch.randn((b, *shape), generator=generator, dtype=torch.float64).to(dtype=weight.dtype, device=weight.device)
    x = orthonormal(x)
    sigma, prev = 0.0, None
    with torch.enable_grad():
        for _ in range(max(int(iters), 1)):
            x = x.detach().requires_grad_(True)
            y = apply(x)
            yf = y.detach().reshape(b, -1)
            sigma = float(torch.linalg.eigvalsh(yf @ yf.mT)[-1].clamp_min(0).sqrt())
            if sigma == 0.0:
                return 0.0
            if prev is not None and abs(sigma - prev) <= tol * sigma:
                break
            prev = sigma
            (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())  # AᵀA X, one input per batch row
            x = orthonormal(g.detach())
    return sigma
