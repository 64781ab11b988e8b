"""The layer classes of converted layers: ``SpectralLinear``, ``SpectralConv1d/2d/3d``,
``SpectralConvTranspose1d/2d/3d``, ``SpectralEmbedding``, and each layer's :class:`LayerState`.

:func:`torch_sttp.convert` gives a layer the spectral subclass of its class (``nn.Linear`` → ``SpectralLinear``);
``torch.nn.utils.parametrize`` then wraps that as ``ParametrizedSpectralLinear``. A spectral layer takes its factors
(U, σ, Vᵀ) from the model's :class:`~torch_sttp.planner.FramePlanner` and runs the forward path that
:mod:`torch_sttp.cost` finds cheapest: "dense" (materialise W), "lowrank" (x ↦ Vᵀx ↦ σ ↦ U; for convs an r-filter
convolution followed by a 1×1 one) or, for STTP Linear layers, "tt" (the input contracted with the TT cores).
A layer whose parametrization was removed behaves as its original class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cost
from .frames import without_autocast
from .layers import SUPPORTED_TYPES
from .planner import Factors, FramePlanner
from .parametrizations import fixed_row, parametrization_tensors, spectral_parametrization

__all__ = [
    "LayerState",
    "SpectralLayer",
    "SpectralLinear",
    "SpectralConv1d",
    "SpectralConv2d",
    "SpectralConv3d",
    "SpectralConvTranspose1d",
    "SpectralConvTranspose2d",
    "SpectralConvTranspose3d",
    "SpectralEmbedding",
    "spectral_class",
    "supported_base",
    "has_own_forward",
    "layer_state",
    "conv_function",
]


@dataclass
class LayerState:
    """Per-layer settings and observations of a converted layer (not part of its state_dict).

    ``path``: the requested forward path; ``last_path`` / ``last_flops_per_sample``: what the last forward ran.
    """

    name: str
    planner: FramePlanner
    path: str = "auto"
    last_path: str | None = None
    last_flops_per_sample: float | None = None
    load_hook: object = None  # the handle of the layer's dense-checkpoint load hook


def layer_state(module: nn.Module) -> LayerState | None:
    """The :class:`LayerState` of a converted layer, or None for any other module."""
    return module.__dict__.get("_sttp") if isinstance(module, SpectralLayer) else None


def conv_function(ndim: int, transposed: bool = False) -> Callable:
    """``F.conv{1,2,3}d`` or ``F.conv_transpose{1,2,3}d``."""
    if transposed:
        return {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[ndim]
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]


class SpectralLayer:
    """Mixin of the converted layer classes: factors from the planner, path choice, the materialised weight."""

    _sttp: LayerState

    def attach_state(self, state: LayerState) -> None:
        """Give the layer its settings (called once by :func:`torch_sttp.convert`)."""
        self.__dict__["_sttp"] = state

    def detach_state(self) -> LayerState | None:
        """Remove the layer's settings and its load hook (export and undo); returns them."""
        state = self.__dict__.pop("_sttp", None)
        if state is not None and state.load_hook is not None:
            state.load_hook.remove()
        return state

    def _sttp_active(self) -> bool:
        return "_sttp" in self.__dict__ and spectral_parametrization(self) is not None

    def spectral_factors(self) -> Factors:
        """(U, σ, Vᵀ) of this layer's weight, W = U·diag(σ)·Vᵀ, from the model's frame planner."""
        return self._sttp.planner.factors(self)

    sttp_factors = spectral_factors

    def spectral_weight(self) -> torch.Tensor:
        """This layer's weight tensor U·Σ·Vᵀ from the model's frame planner (in a forward pass of the model, the
        weights of all its layers of one shape are formed as one batched product), then any parametrization
        registered after the spectral one, such as an embedding's fixed padding row."""
        p = spectral_parametrization(self)
        w = self._sttp.planner.weight(self)
        chain = list(self.parametrizations["weight"])
        for later in chain[chain.index(p) + 1:]:
            w = later(w)
        return w

    def _choose(self, costs: dict[str, cost.PathCost], batch: int, device: torch.device) -> str:
        state = self._sttp
        path = cost.choose_path(state.path, costs, device)
        state.last_path = path
        state.last_flops_per_sample = costs[path].flops / max(batch, 1)
        return path

    def _weight_flops(self) -> float:
        """FLOPs of materialising W in this forward (none when the planner reuses held factors for inference)."""
        reused = self._sttp.planner.holds_reusable_factors
        return 0.0 if reused else cost.materialize_flops(spectral_parametrization(self))


class SpectralLinear(SpectralLayer, nn.Linear):
    """``nn.Linear`` whose weight is W = U·Σ·Vᵀ (see :func:`torch_sttp.convert`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x·Wᵀ + b for x (*, d_in), y (*, d_out), by the cheapest path: W formed ("dense"), ((x·V)·Σ)·Uᵀ
        ("lowrank"), or the input tensorised and contracted with the cores ("tt", STTP)."""
        if not self._sttp_active():
            return super().forward(x)
        p = spectral_parametrization(self)
        batch = x.numel() // max(x.shape[-1], 1)
        tt = cost.has_tt_path(p.method, p.out_modes, p.in_modes) and self._sttp.path in ("auto", "tt")
        path = self._choose(cost.linear_costs(p, batch, self._weight_flops(), tt), batch, x.device)
        if path == "dense":
            return F.linear(x, self.spectral_weight(), self.bias)
        if path == "tt":
            return self._tt_forward(x, batch)
        u, sigma, vt = self.spectral_factors()
        h = x @ vt.mT
        if sigma is not None:
            h = h * sigma
        return F.linear(h, u, self.bias)

    def _tt_forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """y = the tensorised input contracted with the cores of V, Σ and U (supplement §6, Fig. 8)."""
        p = spectral_parametrization(self)
        steps, _ = cost.tt_contraction(tuple(p.in_modes), tuple(p.out_modes), tuple(p.ranks), p.has_spectrum,
                                       int(batch))
        cores_u, cores_v = p.train_cores(*self._sttp.planner.frames(self))
        sigma = p.sigma(parametrization_tensors(self)[2]) if p.has_spectrum else None
        operands = [x.reshape(batch, *p.in_modes)] + cores_v + ([sigma] if sigma is not None else []) + cores_u
        for positions, equation in steps:  # pairwise einsums along the opt_einsum path: plain torch ops
            picked = [operands.pop(i) for i in positions]
            operands.append(torch.einsum(equation, *picked))
        y = operands[0].reshape(*x.shape[:-1], p.d_out)
        return y if self.bias is None else y + self.bias


class _SpectralConv(SpectralLayer):
    """Forward of converted (transposed) convolutions: dense, or an r-filter convolution then a 1×1 one."""

    def _run(self, x: torch.Tensor, out_spatial: int, first: Callable, dense: Callable) -> torch.Tensor:
        p = spectral_parametrization(self)
        nd = len(self.kernel_size)
        batch = x.shape[0] if x.dim() == nd + 2 else 1
        in_spatial = math.prod(x.shape[-nd:])
        costs = cost.conv_costs(p, self._weight_flops(), batch, in_spatial, out_spatial, self.transposed,
                                self.groups)
        if self._choose(costs, batch, x.device) == "dense":
            return dense(self.spectral_weight())
        u, sigma, vt = self.spectral_factors()
        h = first(vt.reshape(p.r_mid, self.in_channels, *self.kernel_size))
        mix = (u if sigma is None else u * sigma).reshape(p.d_out, p.r_mid, *([1] * nd))
        return conv_function(nd)(h, mix, self.bias)


class _SpectralConvNd(_SpectralConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._sttp_active():
            return super().forward(x)
        nd = len(self.kernel_size)
        out_spatial = math.prod(cost.conv_output_size(x.shape[-nd:], self))
        return self._run(x, out_spatial, lambda filters: self._conv_forward(x, filters, None),
                         lambda w: self._conv_forward(x, w, self.bias))


class _SpectralConvTransposeNd(_SpectralConv):
    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if not self._sttp_active():
            return super().forward(x, output_size)
        nd = len(self.kernel_size)
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, nd,
                                              self.dilation)
        out_spatial = math.prod(cost.conv_transpose_output_size(x.shape[-nd:], self, output_padding))
        fn = conv_function(nd, transposed=True)

        def first(filters):  # r filters in the transposed layout (C_in, r, *kernel)
            return fn(x, filters.transpose(0, 1), None, self.stride, self.padding, output_padding, 1, self.dilation)

        def dense(w):
            return fn(x, w, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation)

        return self._run(x, out_spatial, first, dense)


class SpectralConv1d(_SpectralConvNd, nn.Conv1d):
    """``nn.Conv1d`` with an SVDP/STTP weight."""


class SpectralConv2d(_SpectralConvNd, nn.Conv2d):
    """``nn.Conv2d`` with an SVDP/STTP weight."""


class SpectralConv3d(_SpectralConvNd, nn.Conv3d):
    """``nn.Conv3d`` with an SVDP/STTP weight."""


class SpectralConvTranspose1d(_SpectralConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with an SVDP/STTP weight."""


class SpectralConvTranspose2d(_SpectralConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with an SVDP/STTP weight."""


class SpectralConvTranspose3d(_SpectralConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with an SVDP/STTP weight."""


class SpectralEmbedding(SpectralLayer, nn.Embedding):
    """``nn.Embedding`` with an SVDP/STTP weight; rows are looked up without forming W ("lowrank").

    The ``padding_idx`` row is the fixed row stored at conversion (:class:`~torch_sttp.parametrizations.FixedRow`)
    and receives no gradient; ``max_norm`` rescales the looked-up rows out of place (the parameters are never
    modified), with the rescaling factor treated as a constant.
    """

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows W[idx] of shape (*idx.shape, dim): U[idx]·Σ·Vᵀ ("lowrank") or looked up in W formed ("dense")."""
        if not self._sttp_active():
            return super().forward(idx)
        p = spectral_parametrization(self)
        if (self.num_embeddings, self.embedding_dim) != tuple(p.weight_shape):
            raise ValueError(f"this converted Embedding says {self.num_embeddings} × {self.embedding_dim} but its "
                             f"SVDP/STTP weight is {p.weight_shape[0]} × {p.weight_shape[1]}: a converted layer "
                             "cannot be resized in place (e.g. by resize_token_embeddings); resize the dense model "
                             "before converting, or torch_sttp.to_dense(model), resize, and convert again")
        n = idx.numel()
        costs = cost.embedding_costs(p, self._weight_flops(), n, lowrank=not self.scale_grad_by_freq)
        if self._choose(costs, n, idx.device) == "dense":
            rows = F.embedding(idx, self.spectral_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq,
                               False)
        else:
            rows = self._lowrank_rows(idx)
        return rows if self.max_norm is None else self._renormed(rows)

    def _lowrank_rows(self, idx: torch.Tensor) -> torch.Tensor:
        u, sigma, vt = self.spectral_factors()
        coeff = F.embedding(idx, u, self.padding_idx)
        with without_autocast(idx.device):  # a lookup, as nn.Embedding's: rows in the weight's dtype under autocast
            rows = (coeff if sigma is None else coeff * sigma) @ vt
        if self.padding_idx is not None:  # the fixed padding row; σ and Vᵀ get no gradient from it
            rows = torch.where((idx == self.padding_idx).unsqueeze(-1), fixed_row(self).to(rows.dtype), rows)
        return rows

    def _renormed(self, rows: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(rows.detach(), ord=self.norm_type, dim=-1, keepdim=True)
        scale = torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), torch.ones_like(norms))
        return rows * scale


_SPECTRAL_CLASS = {
    nn.Linear: SpectralLinear,
    nn.Conv1d: SpectralConv1d, nn.Conv2d: SpectralConv2d, nn.Conv3d: SpectralConv3d,
    nn.ConvTranspose1d: SpectralConvTranspose1d, nn.ConvTranspose2d: SpectralConvTranspose2d,
    nn.ConvTranspose3d: SpectralConvTranspose3d,
    nn.Embedding: SpectralEmbedding,
}


def supported_base(cls: type) -> type | None:
    """The supported torch layer class ``cls`` derives from (``cls`` itself for one of them), or None."""
    return next((base for base in SUPPORTED_TYPES if issubclass(cls, base)), None)


def has_own_forward(cls: type) -> bool:
    """Whether a subclass of a supported layer overrides the layer's ``forward``."""
    return cls.forward is not supported_base(cls).forward


def spectral_class(cls: type) -> type:
    """The spectral subclass for a layer class (exact supported types, or a dynamic subclass for subclasses)."""
    if cls in _SPECTRAL_CLASS:
        return _SPECTRAL_CLASS[cls]
    base = supported_base(cls)
    if base is None:
        raise TypeError(f"{cls.__name__} is not supported")
    # a subclass's own forward is kept (it sees the materialised weight); otherwise the spectral forward runs
    bases = (SpectralLayer, cls) if has_own_forward(cls) else (_SPECTRAL_CLASS[base], cls)
    new = type(f"Spectral{cls.__name__}", bases, {"__module__": __name__})
    _SPECTRAL_CLASS[cls] = new
    return new


def original_class(module: nn.Module) -> type:
    """The class a converted layer had before :func:`torch_sttp.convert` (``nn.Conv2d`` for a
    ``ParametrizedSpectralConv2d``); any other module's own class (or its class before parametrization)."""
    from torch.nn.utils.parametrize import type_before_parametrizations

    cls = type_before_parametrizations(module)
    if issubclass(cls, SpectralLayer):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, SpectralLayer))
    return cls
