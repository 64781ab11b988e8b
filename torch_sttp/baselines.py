"""Dense-layer baselines the paper compares against: spectral normalization (SN, Miyato et al. 2018) and spectral
regularization by dynamic spectral compensation (SR, Liu et al. 2019).

    >>> baselines.apply_spectral_norm(D)                                   # W ← W / σ̃_max(W), in place
    >>> reg = baselines.apply_spectral_regularization(D, every=1, optimizer=opt)   # SN + SR after each step

Both act on dense Linear, ConvNd, ConvTransposeNd and Embedding layers (SVDP/STTP layers are left alone), selected
by :func:`torch_sttp.layers.select_layers` and viewed as matrices by :func:`torch_sttp.layers.weight_matrix`.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from .inspection import spectral_layers
from .layers import matrix_to_weight, weight_matrix
from .parametrizations import spectral_parametrization

__all__ = ["dense_layers", "sr_target", "apply_spectral_norm", "SpectralRegularizer", "apply_spectral_regularization"]


def dense_layers(model: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the selected supported layers that are not SVDP/STTP layers (their weight may carry
    another parametrization, such as ``spectral_norm``), in ``named_modules`` order."""
    return [(n, m) for n, m in spectral_layers(model, include, exclude) if spectral_parametrization(m) is None]


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
    if not _spectral_normalize(dense_layers(model, include, exclude), n_power_iterations, eps):
        raise ValueError("apply_spectral_norm: no dense supported layer without a weight parametrization selected")
    return model


def _spectral_normalize(layers: list[tuple[str, nn.Module]], n_power_iterations: int, eps: float = 1e-12) -> int:
    """``spectral_norm`` on each layer whose weight has no parametrization yet; returns how many were normalized."""
    todo = [m for _, m in layers if not torch_parametrize.is_parametrized(m, "weight")]
    for m in todo:
        torch.nn.utils.parametrizations.spectral_norm(m, "weight", n_power_iterations=n_power_iterations, eps=eps)
    return len(todo)


def sr_target(module: nn.Module) -> torch.Tensor:
    """The tensor SR reads and rewrites for a dense layer: its weight, or the unconstrained ``original`` under a
    single-tensor weight parametrization such as ``spectral_norm`` (whose normalized spectrum is the original's),
    of the weight's own shape. A ValueError for a weight under a multi-tensor parametrization."""
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
        self.layers = dense_layers(model, include, exclude)
        if not self.layers:
            raise ValueError("SpectralRegularizer: no dense supported layer selected")
        for _, m in self.layers:
            sr_target(m)
        self.running_max: dict[str, torch.Tensor] = {}
        self.num_steps = 0
        self._hook = None

    @torch.no_grad()
    def step(self) -> bool:
        """Track the normalized spectra; compensate every ``every`` calls. Returns True when it compensated."""
        self.num_steps += 1
        compensate = self.num_steps % self.every == 0
        for name, m in self.layers:
            target = sr_target(m)
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
                    target.copy_(matrix_to_weight(m, w, target.shape))
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
        """``{"every", "num_steps", "running_max": {layer: m (k,) on the CPU}}``, for checkpoints."""
        return {"every": self.every, "num_steps": self.num_steps,
                "running_max": {k: v.detach().cpu().clone() for k, v in self.running_max.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s values; each running maximum moves to its layer's device."""
        self.every = int(state["every"])
        self.num_steps = int(state["num_steps"])
        devices = {n: sr_target(m).device for n, m in self.layers}
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
        _spectral_normalize(dense_layers(model, include, exclude), n_power_iterations)
    reg = SpectralRegularizer(model, every=every, include=include, exclude=exclude)
    if optimizer is not None:
        reg.attach(optimizer)
    return reg
