"""Spectral regularization during training: loss penalties on the singular values, and optimizer parameter groups
that decay each kind of SVDP/STTP tensor appropriately.

    >>> loss = task_loss + 1e-2 * penalties.penalty(model, "d_optimal")
    >>> opt = torch.optim.Adam(penalties.param_groups(model, weight_decay=1e-4), lr=2e-4)
    >>> penalties.check_optimizer(opt, model)          # warns about decayed reflectors, missing parameters

The penalties act on σ̂ = σ/σ_max of each selected layer, read exactly from Σ for SVDP/STTP layers and by
``svdvals`` for dense ones (:func:`torch_sttp.inspection.singular_values`), so they are differentiable w.r.t. S
or W. The penalty kinds are ``torch_sttp.options.PENALTIES``.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .inspection import singular_values, spectral_layers
from .options import PENALTIES, check_option
from .parametrizations import parametrization_tensors, spectral_parametrization
from .surgery import converted_layers

__all__ = ["PENALTIES", "penalty", "d_optimal_penalty", "divergence_penalty", "sigma_l2_penalty", "param_groups",
           "check_optimizer"]


# ---------------------------------------------------------------------------------------------------- penalties
def _normalized_sigmas(model: nn.Module, layers, eps: float) -> list[torch.Tensor]:
    """Per selected layer σ/σ_max (descending, differentiable), σ_max clamped below by ``eps``."""
    return [s / s[0].clamp_min(eps) for s in singular_values(model, layers, grad=True).values() if s.numel()]


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
    check_option("penalty kind", kind)
    if kind == "d_optimal":
        value = d_optimal_penalty(model, layers, eps)
    else:
        value = divergence_penalty(model, layers, a, eps)
    return value * weight if weight != 1.0 else value


def sigma_l2_penalty(model: nn.Module, layers=None, weight: float = 1.0) -> torch.Tensor:
    """L2 penalty on the learned spectra: ``weight`` × Σ_ℓ Σᵢ σᵢ(W_ℓ)² over SVDP/STTP layers with a learned spectrum.

    σ is the layer's actual spectrum — S/‖S‖∞ for ``"normalized"``, S for ``"free"`` — so the value is Σ_ℓ ‖W_ℓ‖²_F:
    the Frobenius regularization of supplement §9, which weight decay on a scale-invariant S does not give.
    """
    terms = []
    for _, m in spectral_layers(model, layers):
        p = spectral_parametrization(m)
        if p is None or not p.has_spectrum:
            continue
        sigma = p.sigma(parametrization_tensors(m)[2])
        terms.append((sigma ** 2).sum())
    if not terms:
        return _zero(model)
    dtype, device = _common(terms)
    total = torch.stack([t.to(dtype=dtype, device=device) for t in terms]).sum()
    return total * weight if weight != 1.0 else total


# --------------------------------------------------------------------------------------------- optimizer groups
def _spectral_params(model: nn.Module):
    """(reflectors, [(S, spectrum kind, layer name)]) of the converted layers, unique by identity."""
    reflectors, spectra, seen = [], [], set()
    for name, m in converted_layers(model):
        p = spectral_parametrization(m)
        originals = parametrization_tensors(m)
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
