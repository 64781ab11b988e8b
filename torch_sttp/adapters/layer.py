"""The modules that take a layer's place in an adapted model: :class:`AdapterLayer` (a frozen base layer and its
named adapters, PEFT's tuner layer) and :class:`TrainableCopies` (a module trained whole under each adapter, PEFT's
``modules_to_save``). Neither ever changes the module it wraps.
"""
from __future__ import annotations

import torch
from torch import nn

from ..frames import householder_t
from ..options import check_option
from ..planner import Factors, FramePlanner
from .ops import EmbeddingOps, LayerOps, Rotation, rotated_matrix
from .updates import ReflectorPlanner, RotationUpdate, SpectralUpdate, full_precision

__all__ = ["AdapterLayer", "TrainableCopies"]


class _Delegating(nn.Module):
    """Attributes a wrapper lacks are read from the wrapped module (``layer.weight``, ``in_features``, …)."""

    _wrapped = "base_layer"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._wrapped:
                raise
            return getattr(super().__getattr__(self._wrapped), name)


class AdapterLayer(_Delegating):
    """A frozen ``base_layer`` with adapters by name (``adapters``); ``active`` names the one that runs.

    Forward: base(x) + ΔW·x for a :class:`SpectralUpdate` (x ↦ Vᵀx ↦ σ ↦ U, for a conv an R-filter
    convolution then a 1×1 one; a grouped conv runs with W + ΔW), the layer with W' = H_out·W·H for a
    :class:`RotationUpdate`, and base(x) when no adapter is active. ``path`` ("auto", "input", "lowrank",
    "weight") picks how a rotation is applied where several ways exist (Linear, Conv1D): to the input, as the frozen
    layer plus a rank-r correction x·Wᵀ − ((x·Y)·Tᵀ)·(W·Y)ᵀ, or to the weight; "auto" takes the cheapest by
    :meth:`~torch_sttp.adapters.ops.LayerOps.rotation_costs`. ``last_path`` is what the last forward ran.
    """

    conversion_blocked = ("carries adapters; merge them into the weights first (torch_sttp.merge_adapters) or "
                          "remove them (torch_sttp.unload_adapters), then convert")

    def __init__(self, base_layer: nn.Module, ops: LayerOps, frame_planner: FramePlanner,
                 reflector_planner: ReflectorPlanner):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.ops = ops
        self.frame_planner = frame_planner
        self.reflector_planner = reflector_planner
        self.active: str | None = None
        self._path = "auto"
        self.last_path: str | None = None

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path = check_option("rotation path", value)

    def active_adapter(self) -> nn.Module | None:
        """The active adapter's update module, or None (adapters disabled, or no adapter under the active name)."""
        return self.adapters[self.active] if self.active is not None and self.active in self.adapters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's output with the active adapter's weight: W₀ + U·diag(s)·Vᵀ (principal: W_res + U·Σ·Vᵀ)
        or the rotated W·H; the wrapped layer itself when no adapter is active. Shapes are the wrapped layer's."""
        adapter = self.active_adapter()
        if adapter is None:
            self.last_path = "base"
            return self.base_layer(x)
        if isinstance(adapter, RotationUpdate):
            return self._rotated(x, adapter)
        return self._updated(x, adapter)

    def _updated(self, x: torch.Tensor, adapter: SpectralUpdate) -> torch.Tensor:
        base, ops = self.base_layer, self.ops
        with full_precision():
            factors = self.frame_planner.factors(adapter)
        update = ops.lowrank(base, x, *adapter.low_rank(factors))
        if update is None:  # no low-rank path (grouped conv): the layer's op with W + ΔW
            self.last_path = "weight"
            return ops.run(base, x, base.weight + ops.to_weight(base, adapter.delta_matrix(factors)))
        self.last_path = "lowrank"
        return base(x) + update

    def _rotated(self, x: torch.Tensor, adapter: RotationUpdate) -> torch.Tensor:
        ys = adapter.reflectors()
        with full_precision():
            ts = self.reflector_planner.t_factors(adapter)
        rot = Rotation(ys[0], ts[0], *((ys[1], ts[1]) if len(ys) > 1 else ()))
        costs = self.ops.rotation_costs(self.base_layer, x, rot)
        path = self._path if self._path in costs else min(costs, key=costs.get)
        self.last_path = path
        return self.ops.rotate(self.base_layer, x, rot, path)

    def adapted_weight(self, name: str) -> torch.Tensor:
        """The base layer's weight under adapter ``name`` (its own shape and dtype): W + ΔW, or H_out·W·H; computed
        on its own, outside the planners. The factors (or T) are computed as in training, in the parameters' dtype,
        and their products and sums in float64, rounded once, so that the merged weight is the adapted layer's."""
        adapter, base, ops = self.adapters[name], self.base_layer, self.ops
        wide = torch.float64
        matrix = ops.matrix(base)
        if isinstance(adapter, RotationUpdate):
            ys = adapter.reflectors()
            ts = [householder_t(y).to(wide) for y in ys]
            rot = Rotation(ys[0].to(wide), ts[0], *((ys[1].to(wide), ts[1]) if len(ys) > 1 else ()))
            matrix = rotated_matrix(matrix.to(wide), rot)
        else:
            factors = Factors(*adapter.parametrization.factors(*adapter.planner_tensors()))
            wide_factors = Factors(*(f.to(wide) for f in factors))
            matrix = matrix.to(wide) + adapter.delta_matrix(wide_factors)
        weight = ops.to_weight(base, matrix.to(base.weight.dtype))
        if isinstance(ops, EmbeddingOps):
            weight = ops.keep_padding_row(base, weight)
        return weight.contiguous()

    def extra_repr(self) -> str:
        return f"active={self.active!r}, path={self._path!r}"


class TrainableCopies(_Delegating):
    """``original`` (kept as it was) and one trainable copy per adapter name (``copies``); runs the active
    adapter's copy, and the original when the active adapter has none or adapters are disabled."""

    _wrapped = "original"
    conversion_blocked = ("holds the trainable copies of an adapted model (add_adapters(trainable=...)); merge the "
                          "adapters first (torch_sttp.merge_adapters) or remove them (torch_sttp.unload_adapters), "
                          "then convert")

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None

    def forward(self, *args, **kwargs):
        """The active adapter's trainable copy applied to the arguments, or the original module."""
        module = self.copies[self.active] if self.active is not None and self.active in self.copies else self.original
        return module(*args, **kwargs)
