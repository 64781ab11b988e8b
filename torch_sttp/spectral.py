"""Spectra of a model's layers: inspection, spectral regularizers, optimizer groups, SN/SR baselines and plots.

    >>> sv = spectral.singular_values(model)              # {layer name: σ descending}, forward order
    >>> loss = task_loss + 1e-2 * spectral.penalty(model, "d_optimal")
    >>> opt = torch.optim.Adam(spectral.param_groups(model, weight_decay=1e-4), lr=2e-4)
    >>> spectral.plot_spectra(model, "spectra.png", top_k=32)

Every layer is seen through its matrix W ∈ R^{d_out × d_in}: Linear (out, in); ConvNd (C_out, C_in/groups·∏kernel);
ConvTransposeNd with its first two weight axes swapped, (C_out/groups, C_in·∏kernel); Embedding (num, dim).
For an SVDP/STTP layer the singular values are read from Σ exactly (|σ|, no SVD): U and V are orthonormal, so
σ(W) = |diag Σ| (r of them; the remaining min(d_out, d_in) − r singular values of W are zero). For dense layers they
come from ``torch.linalg.svdvals`` of W. Everything is device- and dtype-agnostic (float32/float64, CPU/CUDA).
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from .layers import SUPPORTED_TYPES, as_patterns, matches, weight_matrix
from .parametrizations import parametrization_tensors as _originals
from .surgery import converted_layers, spectral_parametrization

__all__ = [
    "singular_values",
    "snapshot_spectra",
    "spectral_stats",
    "conv_operator_norm",
    "penalty",
    "d_optimal_penalty",
    "divergence_penalty",
    "sigma_l2_penalty",
    "param_groups",
    "check_optimizer",
    "apply_spectral_norm",
    "SpectralRegularizer",
    "apply_spectral_regularization",
    "plot_spectra",
    "SpectraPlot",
    "PENALTIES",
]

PENALTIES = ("d_optimal", "divergence")


# ------------------------------------------------------------------------------------------------ layer selection
def _has_weight(module: nn.Module) -> bool:
    if torch_parametrize.is_parametrized(module, "weight"):
        return True
    w = getattr(module, "weight", None)
    return (isinstance(w, torch.Tensor) and not isinstance(w, nn.parameter.UninitializedParameter)
            and w.is_floating_point() and w.dim() >= 2)


def _select(model: nn.Module, include=None, exclude=None, dense_only: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, layer) of supported layers in ``named_modules`` order; ``include``/``exclude`` are names, globs or
    module types. A string pattern that matches no supported layer is an error."""
    includes, excludes = as_patterns(include), as_patterns(exclude)
    candidates = []
    for name, m in model.named_modules():
        if spectral_parametrization(m) is not None:
            if not dense_only:
                candidates.append((name, m))
        elif isinstance(m, SUPPORTED_TYPES) and _has_weight(m):
            candidates.append((name, m))
    for pat in includes + excludes:
        if isinstance(pat, str) and not any(fnmatch.fnmatchcase(n, pat) for n, _ in candidates):
            raise ValueError(f"layer pattern {pat!r} matches no supported layer; names look like "
                             f"{[n for n, _ in candidates[:4]]}")
    out = []
    for name, m in candidates:
        if includes and not matches(name, m, includes):
            continue
        if excludes and matches(name, m, excludes):
            continue
        out.append((name, m))
    return out


def _from_matrix(module: nn.Module, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_to_matrix` for a weight of ``shape``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return matrix.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    return matrix.reshape(shape)


def _layer_sigma(module: nn.Module) -> torch.Tensor:
    """σ(W) descending, 1-D, differentiable: |Σ| for SVDP/STTP layers (r values), svdvals(W) otherwise."""
    p = spectral_parametrization(module)
    if p is not None:
        return p.singular_values(*_originals(module))
    return torch.linalg.svdvals(weight_matrix(module, module.weight))


# ------------------------------------------------------------------------------------------------------ inspection
def singular_values(model_or_layer: nn.Module, layers=None, grad: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """{layer name: σ (k,) descending} for every supported layer, in ``named_modules`` (forward) order.

    SVDP/STTP layers: σ = sort(|diag Σ|) from the parametrization (k = r, exact, no SVD); dense Linear, ConvNd,
    ConvTransposeNd, Embedding: σ = svdvals(W) (k = min(d_out, d_in)). A single layer comes back under the name ``""``.

    Args:
        layers: names, globs (``"features.*"``) or module types selecting layers (default: all supported).
        grad: keep the autograd graph (default: detached values computed under ``torch.no_grad``).

    Dense layers are read through ``layer.weight``: under ``spectral_norm`` in training mode that access runs the
    power iteration (updating its vectors), as a forward pass would.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for name, m in _select(model_or_layer, layers):
            s = _layer_sigma(m)
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
    with torch.no_grad():
        weight = conv.weight.detach()
    if conv.transposed:
        fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
              3: torch.nn.functional.conv_transpose3d}[nd]

        def apply(x):
            return fn(x, weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
    else:
        def apply(x):
            return conv._conv_forward(x, weight, None)

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


# ---------------------------------------------------------------------------------------------------- regularizers
def _normalized_sigmas(model: nn.Module, layers, eps: float) -> list[torch.Tensor]:
    """Per selected layer σ/σ_max (descending, differentiable), σ_max clamped below by ``eps``."""
    out = []
    for _, m in _select(model, layers):
        s = _layer_sigma(m)
        if s.numel() == 0:
            continue
        out.append(s / s[0].clamp_min(eps))
    return out


def _common(tensors: list[torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype, tensors[0].device


def _zero(model: nn.Module) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    return torch.zeros((), dtype=p.dtype if p is not None else torch.get_default_dtype(),
                       device=p.device if p is not None else None)


def d_optimal_penalty(model: nn.Module, layers=None, eps: float = 1e-6) -> torch.Tensor:
    """D-optimal regularizer (paper eq. 10, Jiang et al.): mean over all σ̂ᵢ of all selected layers of −log σ̂ᵢ.

    σ̂ = σ/σ_max per layer; −log max(σ̂ᵢ, eps) keeps the value (≤ −log eps) and the gradient finite as σ → 0
    (σ̂ᵢ below eps get no gradient). Returns a scalar tensor.
    """
    sig = _normalized_sigmas(model, layers, eps)
    if not sig:
        return _zero(model)
    dtype, device = _common(sig)
    allv = torch.cat([s.to(dtype=dtype, device=device) for s in sig])
    return -torch.log(allv.clamp_min(eps)).mean()


def divergence_penalty(model: nn.Module, layers=None, a: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """Divergence regularizer: per layer, with σ̂ descending, mean over i of (1 − σ̂_{i+1})²/a² − log(σ̂ᵢ − σ̂_{i+1}),
    averaged over the selected layers with more than one singular value.

    σ̂ = σ/σ_max per layer; the gaps σ̂ᵢ − σ̂_{i+1} are clamped below by ``eps`` (finite value and gradient; equal
    singular values contribute the constant −log eps). Returns a scalar tensor.
    """
    sig = [s for s in _normalized_sigmas(model, layers, eps) if s.numel() > 1]
    if not sig:
        return _zero(model)
    dtype, device = _common(sig)
    terms = []
    for s in sig:
        s = s.to(dtype=dtype, device=device)
        gap = (s[:-1] - s[1:]).clamp_min(eps)
        terms.append(((1 - s[1:]) ** 2 / a ** 2 - torch.log(gap)).mean())
    return torch.stack(terms).mean()


def penalty(
    model: nn.Module,
    kind: str = "d_optimal",
    layers=None,
    a: float = 0.1,
    eps: float = 1e-6,
    weight: float = 1.0,
) -> torch.Tensor:
    """``weight`` × a spectral regularizer on the normalized singular values σ̂ = σ/σ_max of the selected layers.

    ``kind="d_optimal"``: mean −log σ̂ᵢ over all singular values of all layers (eq. 10);
    ``kind="divergence"``: mean over layers of mean_i [(1 − σ̂_{i+1})²/a² − log(σ̂ᵢ − σ̂_{i+1})].
    SVDP/STTP layers use their exact σ from S (differentiable w.r.t. S; the identity spectrum is constant and adds
    its constant value with zero gradient); dense layers use svdvals(W) (differentiable w.r.t. W). Values below
    ``eps`` are clamped, so value and gradient stay finite as σ → 0. Returns a scalar tensor to add to the loss.
    """
    if kind == "d_optimal":
        value = d_optimal_penalty(model, layers, eps)
    elif kind == "divergence":
        value = divergence_penalty(model, layers, a, eps)
    else:
        raise ValueError(f"unknown penalty kind {kind!r}; choose one of {PENALTIES}")
    return value * weight if weight != 1.0 else value


def sigma_l2_penalty(model: nn.Module, layers=None, weight: float = 1.0) -> torch.Tensor:
    """L2 penalty on the learned spectra: ``weight`` × Σ_ℓ Σᵢ σᵢ(W_ℓ)² over SVDP/STTP layers with a learned spectrum.

    σ is the layer's actual spectrum — S/‖S‖∞ for ``"normalized"``, S for ``"free"`` — so the value is Σ_ℓ ‖W_ℓ‖²_F:
    the Frobenius regularization of supplement §9, which weight decay on a scale-invariant S does not give.
    """
    terms = []
    for _, m in _select(model, layers):
        p = spectral_parametrization(m)
        if p is None or not p.has_spectrum:
            continue
        sigma = p.sigma(_originals(m)[2])
        terms.append((sigma ** 2).sum())
    if not terms:
        return _zero(model)
    dtype, device = _common(terms)
    total = torch.stack([t.to(dtype=dtype, device=device) for t in terms]).sum()
    return total * weight if weight != 1.0 else total


# ------------------------------------------------------------------------------------------------ optimizer groups
def _spectral_params(model: nn.Module):
    """(reflectors, [(S, spectrum kind, layer name)]) of the converted layers, unique by identity."""
    reflectors, spectra, seen = [], [], set()
    for name, m in converted_layers(model):
        p = spectral_parametrization(m)
        originals = _originals(m)
        for t in originals[:2]:
            if id(t) not in seen and isinstance(t, nn.Parameter):
                seen.add(id(t))
                reflectors.append((t, name))
        if len(originals) > 2 and id(originals[2]) not in seen and isinstance(originals[2], nn.Parameter):
            seen.add(id(originals[2]))
            spectra.append((originals[2], p.spectrum, name))
    return reflectors, spectra


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    reflector_weight_decay: float = 0.0,
    spectrum_weight_decay: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups for a converted model: reflectors, singular values, everything else.

    * ``"reflectors"`` (``original0``/``original1``): ``reflector_weight_decay``, 0 by default — decaying reflectors
      shrinks them towards the truncated identity, i.e. promotes a truncated diagonal W (supplement §9).
    * ``"spectrum"`` (``original2`` = S): by default ``weight_decay`` for the ``"free"`` spectrum (then it is the
      Frobenius decay of W) and 0 for ``"normalized"``. An explicit non-zero ``spectrum_weight_decay`` is applied to
      all S, with a UserWarning when some layers have the scale-invariant normalized spectrum (Σ = S/‖S‖∞ does not
      change when S shrinks); use :func:`sigma_l2_penalty` there instead.
    * ``"other"`` (biases, norms, unconverted layers): ``weight_decay``.

    Each group is a dict ``{"params": [...], "weight_decay": float, "name": str}``; empty groups are left out. Pass
    the list to any ``torch.optim`` optimizer.
    """
    reflectors, spectra = _spectral_params(model)
    special = {id(t) for t, _ in reflectors} | {id(t) for t, _, _ in spectra}
    other, seen = [], set()
    for t in model.parameters():
        if id(t) in special or id(t) in seen:
            continue
        seen.add(id(t))
        other.append(t)
    groups = []
    if reflectors:
        groups.append({"params": [t for t, _ in reflectors], "weight_decay": float(reflector_weight_decay),
                       "name": "reflectors"})
    if spectra:
        if spectrum_weight_decay is None:
            free = [t for t, kind, _ in spectra if kind == "free"]
            fixed = [t for t, kind, _ in spectra if kind != "free"]
            if free:
                groups.append({"params": free, "weight_decay": float(weight_decay), "name": "spectrum"})
            if fixed:
                groups.append({"params": fixed, "weight_decay": 0.0, "name": "spectrum_normalized"})
        else:
            normalized = [name for _, kind, name in spectra if kind == "normalized"]
            if spectrum_weight_decay != 0 and normalized:
                warnings.warn(
                    f"weight decay {spectrum_weight_decay} on S of layers with the 'normalized' spectrum "
                    f"({', '.join(normalized[:3])}{', …' if len(normalized) > 3 else ''}): Σ = S/‖S‖∞ is scale "
                    "invariant, so decaying S does not regularize W; add "
                    "torch_sttp.spectral.sigma_l2_penalty(model) to the loss instead", UserWarning, stacklevel=2)
            groups.append({"params": [t for t, _, _ in spectra], "weight_decay": float(spectrum_weight_decay),
                           "name": "spectrum"})
    if other:
        groups.append({"params": other, "weight_decay": float(weight_decay), "name": "other"})
    return groups


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Warn (UserWarning) about optimizer settings that do not suit a converted model; returns the messages.

    Flags: non-zero weight decay on reflectors (e.g. ``AdamW(model.parameters())``, whose default decay is 0.01) —
    it promotes a truncated diagonal W (supplement §9); non-zero weight decay on a normalized (scale-invariant) S;
    converted-layer parameters missing from the optimizer (e.g. it was built before :func:`torch_sttp.convert`).
    """
    reflectors, spectra = _spectral_params(model)
    where = {}
    for group in optimizer.param_groups:
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        for t in group["params"]:
            where[id(t)] = wd
    messages = []
    decayed = sorted({name for t, name in reflectors if where.get(id(t), 0.0) != 0.0})
    if decayed:
        wds = sorted({where[id(t)] for t, _ in reflectors if where.get(id(t), 0.0) != 0.0})
        messages.append(
            f"the optimizer applies weight decay {wds} to the Householder reflectors of {len(decayed)} converted "
            f"layer(s) (e.g. {decayed[0]!r}); this promotes a truncated diagonal structure in W rather than a small "
            "‖W‖_F (supplement §9). Build the optimizer from torch_sttp.spectral.param_groups(model, weight_decay=…)")
    decayed_s = sorted({name for t, kind, name in spectra if kind == "normalized" and where.get(id(t), 0.0) != 0.0})
    if decayed_s:
        messages.append(
            f"the optimizer applies weight decay to the normalized (scale-invariant) spectrum S of {len(decayed_s)} "
            f"layer(s) (e.g. {decayed_s[0]!r}); it does not regularize W — use torch_sttp.spectral.sigma_l2_penalty")
    missing = sorted({name for t, name in reflectors if id(t) not in where and t.requires_grad}
                     | {name for t, _, name in spectra if id(t) not in where and t.requires_grad})
    if missing:
        messages.append(
            f"{len(missing)} converted layer(s) (e.g. {missing[0]!r}) have parameters the optimizer does not hold; "
            "was it created before torch_sttp.convert? Create the optimizer after converting the model")
    for msg in messages:
        warnings.warn(msg, UserWarning, stacklevel=2)
    return messages


# --------------------------------------------------------------------------------------------- dense baselines: SN
def _dense_layers(model: nn.Module, include, exclude) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in _select(model, include, exclude, dense_only=True)]


def apply_spectral_norm(
    model: nn.Module,
    include=None,
    exclude=None,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> nn.Module:
    """Spectral normalization (Miyato et al. 2018) of every selected dense layer, in place; returns ``model``.

    W ← W / σ̃_max(W) via ``torch.nn.utils.parametrizations.spectral_norm`` (σ̃ from ``n_power_iterations`` power
    iterations per training-mode forward; ConvTranspose uses its dim 1 as output). Selects Linear, ConvNd,
    ConvTransposeNd and Embedding layers whose weight is not parametrized yet, filtered by ``include``/``exclude``
    (names, globs or types). SVDP/STTP layers are left alone.
    """
    selected = [(n, m) for n, m in _dense_layers(model, include, exclude)
                if not torch_parametrize.is_parametrized(m, "weight")]
    if not selected:
        raise ValueError("apply_spectral_norm: no dense supported layer without a weight parametrization selected")
    for _, m in selected:
        torch.nn.utils.parametrizations.spectral_norm(m, "weight", n_power_iterations=n_power_iterations, eps=eps)
    return model


# --------------------------------------------------------------------------------------------- dense baselines: SR
def _sr_target(module: nn.Module) -> torch.Tensor:
    """The tensor SR rewrites: the weight, or the unconstrained original under a single-tensor parametrization
    (e.g. spectral_norm — its normalized spectrum is that of the original)."""
    if torch_parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        if not hasattr(plist, "original"):
            raise ValueError(f"{type(module).__name__}: SR needs a single-tensor weight parametrization")
        return plist.original
    return module.weight


class SpectralRegularizer:
    """Spectral regularization (SR, Liu et al. 2019) by dynamic spectral compensation of dense layers.

    Interpretation implemented here. Per layer, with W = U diag(σ) Vᵀ (σ descending) and σ̂ = σ/σ_max, each call of
    :meth:`step` updates the running maximum over time m ← max(m, σ̂) (elementwise by index i; m is descending and
    m₁ = 1), and every ``every``-th call rewrites W in place as W ← U diag(σ') Vᵀ with σ'ᵢ = max(σᵢ, mᵢ·σ_max).
    So right after a compensation no normalized singular value lies below its running maximum, σ_max and the
    singular vectors are unchanged (the spectral norm, hence SN's normalization, is preserved), and the spectrum
    can no longer collapse: values that dropped since their peak are lifted back. Calls that do not compensate
    only read the weights. Under ``spectral_norm`` (the SR-GAN setting: SR is applied on top of SN), the
    unconstrained ``original`` is compensated.

    Args:
        model: the model; its dense Linear/ConvNd/ConvTransposeNd/Embedding layers are selected (SVDP/STTP layers are
            skipped), filtered by ``include``/``exclude`` (names, globs or types).
        every: compensate every N calls of :meth:`step` (N ≥ 1); the running maximum is tracked at every call.
    The per-step SVD costs O(d_out·d_in·min(d_out, d_in)) per layer.
    """

    def __init__(self, model: nn.Module, every: int = 1, include=None, exclude=None) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.every = int(every)
        self.layers = _dense_layers(model, include, exclude)
        if not self.layers:
            raise ValueError("SpectralRegularizer: no dense supported layer selected")
        for _, m in self.layers:
            _sr_target(m)
        self.running_max: dict[str, torch.Tensor] = {}
        self.num_steps = 0
        self._hook = None

    @torch.no_grad()
    def step(self) -> bool:
        """Track the normalized spectra; compensate every ``every`` calls. Returns True when it compensated."""
        self.num_steps += 1
        compensate = self.num_steps % self.every == 0
        for name, m in self.layers:
            target = _sr_target(m)
            mat = weight_matrix(m, target.detach())
            if compensate:
                u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            else:
                s = torch.linalg.svdvals(mat)
            smax = s[0]
            normalized = s / smax.clamp_min(torch.finfo(s.dtype).tiny)
            prev = self.running_max.get(name)
            if prev is not None and prev.shape == normalized.shape:
                running = torch.maximum(prev.to(normalized), normalized)
            else:
                running = normalized.clone()
            self.running_max[name] = running
            if compensate and bool(smax > 0):
                new = torch.maximum(s, running * smax)
                if not torch.equal(new, s):
                    w = (u * new) @ vh
                    target.copy_(_from_matrix(m, w, target.shape))
        return compensate

    def attach(self, optimizer: torch.optim.Optimizer) -> "SpectralRegularizer":
        """Call :meth:`step` after every ``optimizer.step()`` (a step post-hook); returns self."""
        self.detach()
        self._hook = optimizer.register_step_post_hook(lambda *_args, **_kwargs: self.step())
        return self

    def detach(self) -> None:
        """Remove the optimizer hook installed by :meth:`attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict:
        return {"every": self.every, "num_steps": self.num_steps,
                "running_max": {k: v.detach().cpu().clone() for k, v in self.running_max.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.every = int(state["every"])
        self.num_steps = int(state["num_steps"])
        devices = {n: _sr_target(m).device for n, m in self.layers}
        self.running_max = {k: v.to(devices.get(k, v.device)) for k, v in state["running_max"].items()}


def apply_spectral_regularization(
    model: nn.Module,
    every: int = 1,
    include=None,
    exclude=None,
    spectral_norm: bool = True,
    n_power_iterations: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
) -> SpectralRegularizer:
    """One call to set up the SR baseline: spectral normalization (optional, on by default as in SR-GANs) and a
    :class:`SpectralRegularizer` compensating every ``every`` steps. With ``optimizer`` its :meth:`step` runs after
    each ``optimizer.step()``; otherwise call ``reg.step()`` yourself after each update."""
    if spectral_norm:
        for _, m in _dense_layers(model, include, exclude):
            if not torch_parametrize.is_parametrized(m, "weight"):
                torch.nn.utils.parametrizations.spectral_norm(m, "weight", n_power_iterations=n_power_iterations)
    reg = SpectralRegularizer(model, every=every, include=include, exclude=exclude)
    if optimizer is not None:
        reg.attach(optimizer)
    return reg


# ----------------------------------------------------------------------------------------------------------- plots
class SpectraPlot(str):
    """The path of a written figure (a ``str``) that also carries what was drawn.

    Attributes: ``matrix`` (numpy array drawn as the heat map), ``layers`` (column/row names), ``steps`` (history
    plots), ``kind`` (``"spectra"`` or ``"history"``).
    """

    matrix = None
    layers: list = []
    steps = None
    kind = "spectra"


def _snapshot_kind(obj) -> str:
    if isinstance(obj, nn.Module):
        return "module"
    if isinstance(obj, Mapping):
        values = list(obj.values())
        if values and all(isinstance(v, torch.Tensor) for v in values):
            return "snapshot"
        if values and all(isinstance(v, Mapping) for v in values):
            return "history"
        if not values:
            raise ValueError("plot_spectra: empty input")
    if isinstance(obj, (list, tuple)):
        return "history"
    raise TypeError("plot_spectra expects a model, a snapshot {layer: σ}, a list of snapshots or {step: snapshot}")


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")


def plot_spectra(
    model_or_snapshots,
    path,
    top_k: int = 32,
    title: str | None = None,
    layers=None,
    normalize: bool = True,
    dpi: int = 100,
) -> SpectraPlot:
    """Plot singular values like the paper's Fig. 5 (one model) or their evolution over training (snapshots).

    * A model or one snapshot {layer: σ}: a heat map M (top_k × L), one column per layer in forward order, row i the
      i-th largest singular value, σᵢ/σ_max when ``normalize`` (raw σ on a log color scale otherwise); rows past a
      layer's rank are blank. Annotated with the smallest σ of all layers, the smallest σ in the shown slice and the
      largest σ (raw values).
    * A list of snapshots (steps 0, 1, …), a list of (step, snapshot) pairs, or {step: snapshot}: σ_max per layer vs
      step (top), and a heat map of σ_min/σ_max, layers × steps (bottom).

    The figure is written headless (Agg canvas; pyplot's global state is untouched). Returns ``path`` as a
    :class:`SpectraPlot` whose ``matrix`` holds the heat-map data.
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    kind = _snapshot_kind(model_or_snapshots)
    if kind == "module":
        snapshot = snapshot_spectra(model_or_snapshots, layers)
        kind = "snapshot"
    else:
        snapshot = model_or_snapshots
    if kind == "snapshot":
        names = list(snapshot.keys())
        if not names:
            raise ValueError("plot_spectra: no layers to plot")
        spectra = [snapshot[n].detach().double().cpu().flatten().sort(descending=True).values for n in names]
        k = max(1, min(int(top_k), max(s.numel() for s in spectra)))
        mat = np.full((k, len(names)), np.nan)
        all_min, shown_min, all_max = math.inf, math.inf, 0.0
        for j, s in enumerate(spectra):
            if s.numel() == 0:
                continue
            top = s[:k]
            smax = float(s[0])
            all_min, all_max = min(all_min, float(s[-1])), max(all_max, smax)
            shown_min = min(shown_min, float(top[-1]))
            vals = top / smax if (normalize and smax > 0) else top
            mat[: top.numel(), j] = vals.numpy()
        fig = _new_figure(max(5.5, 0.35 * len(names) + 2.5), max(3.0, 0.12 * k + 2.0))
        ax = fig.add_subplot(1, 1, 1)
        data = np.ma.masked_invalid(mat)
        if normalize:
            im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_colormap("viridis"), vmin=0.0, vmax=1.0)
        else:
            positive = mat[np.isfinite(mat) & (mat > 0)]
            norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
            im = ax.imshow(np.ma.masked_where(~(np.isfinite(mat) & (mat > 0)), mat), aspect="auto",
                           interpolation="nearest", cmap=_colormap("viridis"), norm=norm)
        fig.colorbar(im, ax=ax, label="σᵢ / σ_max" if normalize else "σᵢ")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n or "<root>" for n in names], rotation=90, fontsize=7)
        ax.set_ylabel("singular value index i")
        ax.set_xlabel("layer (forward order)")
        note = f"min σ = {all_min:.3g}   min σ (shown) = {shown_min:.3g}   max σ = {all_max:.3g}"
        ax.set_title((title + "\n" if title else "") + note, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        out = SpectraPlot(str(path))
        out.matrix, out.layers, out.steps, out.kind = mat, names, None, "spectra"
        return out

    # history
    if isinstance(model_or_snapshots, Mapping):
        items = sorted(model_or_snapshots.items(), key=lambda kv: kv[0])
    else:
        items = []
        for i, entry in enumerate(model_or_snapshots):
            if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Mapping):
                items.append((entry[0], entry[1]))
            elif isinstance(entry, Mapping):
                items.append((i, entry))
            else:
                raise TypeError("plot_spectra: each snapshot must be a {layer: σ} mapping or a (step, mapping) pair")
    if not items:
        raise ValueError("plot_spectra: no snapshots to plot")
    steps = [s for s, _ in items]
    names: list[str] = []
    for _, snap in items:
        for n in snap:
            if n not in names:
                names.append(n)
    if layers is not None:
        pats = as_patterns(layers)
        names = [n for n in names if any(isinstance(p, str) and fnmatch.fnmatchcase(n, p) for p in pats)]
    if not names:
        raise ValueError("plot_spectra: no layers to plot")
    smax = np.full((len(names), len(steps)), np.nan)
    ratio = np.full((len(names), len(steps)), np.nan)
    for t, (_, snap) in enumerate(items):
        for j, n in enumerate(names):
            s = snap.get(n)
            if s is None or s.numel() == 0:
                continue
            s = s.detach().double().cpu().flatten()
            hi, lo = float(s.max()), float(s.min())
            smax[j, t] = hi
            ratio[j, t] = lo / hi if hi > 0 else np.nan
    fig = _new_figure(max(5.0, 0.08 * len(steps) + 4.0), max(5.0, 0.25 * len(names) + 4.0))
    ax1 = fig.add_subplot(2, 1, 1)
    for j, n in enumerate(names):
        ax1.plot(steps, smax[j], marker="." if len(steps) < 50 else None, label=n or "<root>")
    if np.nanmin(smax) > 0:
        ax1.set_yscale("log")
    ax1.set_ylabel("σ_max")
    ax1.set_xlabel("step")
    if len(names) <= 12:
        ax1.legend(fontsize=6, ncol=2)
    ax1.set_title(title or "spectra over training", fontsize=9)
    ax2 = fig.add_subplot(2, 1, 2)
    shown = np.ma.masked_where(~(np.isfinite(ratio) & (ratio > 0)), ratio)
    positive = ratio[np.isfinite(ratio) & (ratio > 0)]
    norm = None
    if positive.size:
        norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * (1 + 1e-9)))
    im = ax2.imshow(shown, aspect="auto", interpolation="nearest", cmap=_colormap("magma"), norm=norm)
    fig.colorbar(im, ax=ax2, label="σ_min / σ_max")
    ax2.set_yticks(range(len(names)))
    ax2.set_yticklabels([n or "<root>" for n in names], fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax2.set_xticks(ticks)
    ax2.set_xticklabels([str(steps[i]) for i in ticks], fontsize=7)
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    out = SpectraPlot(str(path))
    out.matrix, out.layers, out.steps, out.kind = ratio, names, steps, "history"
    return out
