"""Model surgery: convert whole models to SVDP/STTP, compute their frames in batches, export them back.

    >>> model = torch_sttp.convert(model, method="sttp", rank=64)        # in place, returns the model
    >>> torch_sttp.to_dense(model)                                      # plain layers, same outputs
    >>> torch_sttp.to_factorized(model)                                 # two plain low-rank layers per layer

Each converted layer keeps its class's behaviour (it becomes a subclass, e.g. ``SpectralLinear`` of ``nn.Linear``,
then ``torch.nn.utils.parametrize`` makes it ``ParametrizedSpectralLinear``) and owns its parameters under
``<layer>.parametrizations.weight``. A :class:`FramePlanner` shared by the model's converted layers computes all
orthonormal frames of one shape in one batched call, and hands each layer its factors (U, σ, Vᵀ).
The forward pass then either materialises W ("dense"), or runs the low-rank product without forming W
("lowrank": x ↦ Vᵀx ↦ σ ↦ U; for convs an r-filter convolution followed by a 1×1 convolution), or — for STTP
Linear layers — contracts the input with the TT cores along an opt_einsum path, run as pairwise torch.einsum steps
("tt"); "auto" picks the cheapest by estimated FLOPs for the input at hand.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from .frames import householder_frame_batches, householder_frame_free, padded_householder_frames
from .layers import SUPPORTED_TYPES, select_layers
from .parametrizations import INITS, SpectralParametrization
from .parametrizations import register as register_spectral
from .tt import check_method, check_rank, check_spectrum

__all__ = [
    "SUPPORTED_TYPES",
    "PATHS",
    "FramePlanner",
    "NonFiniteParameterError",
    "convert",
    "converted_layers",
    "spectral_parametrization",
    "to_dense",
    "to_factorized",
    "skipped_layers",
]

PATHS = ("auto", "dense", "lowrank", "tt")
BATCHING = ("shape", "padded", "none")


# ------------------------------------------------------------------------------------------------- frame planner
class NonFiniteParameterError(FloatingPointError):
    """A converted layer's parameters hold NaN or inf (raised only with ``check_finite=True``)."""


class FramePlanner:
    """Computes the factors (U, σ, Vᵀ) of every converted layer of a model, frames batched across layers.

    ``batching``: ``"shape"`` stacks the reflectors of all frames of one shape into one call; ``"padded"``
    pads every frame of the model to one shape and makes a single call; ``"none"`` computes each frame alone.

    Results are reused only while valid: the parameters are the same tensors (storage, dtype, device) with unchanged
    version counters, the grad mode is the same, and — when gradients are being recorded — within one forward pass
    of the root model (a graph is never shared between two forward passes, so any sequence of forward and backward
    passes is safe; a converted layer called outside a forward pass of the root model computes its own factors).
    In inference (no grad) they stay cached until a parameter changes. Layers whose parametrization was removed
    (``remove_parametrizations``) are ignored.

    ``check_finite`` (off by default) tests all parameters for NaN/inf before the frames are computed — one fused
    test on the concatenated parameters, a single host synchronisation per computation — and raises
    :class:`NonFiniteParameterError` naming the first bad layer, instead of letting a NaN spread through a batched
    frame computation into every layer.
    """

    def __init__(self, batching: str = "shape", check_finite: bool = False) -> None:
        if batching not in BATCHING:
            raise ValueError(f"unknown batching {batching!r}; choose one of {BATCHING}")
        self.batching = batching
        self.check_finite = check_finite
        self.layers: list[nn.Module] = []
        self._cache: dict[int, tuple] | None = None
        self._key = None
        self._forward_id = 0
        self._depth = 0
        self._groups = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"], state["_key"] = None, None  # recorded graphs cannot be copied; recomputed on demand
        return state

    def add(self, module: nn.Module) -> None:
        self.layers.append(module)
        self.invalidate()
        self._groups = None

    def remove(self, module: nn.Module) -> None:
        self.layers = [m for m in self.layers if m is not module]
        self.invalidate()
        self._groups = None

    def invalidate(self, *_args, **_kwargs) -> None:
        self._cache, self._key = None, None

    def new_forward(self, *_args, **_kwargs) -> None:
        """Root forward pre-hook: a new pass begins (recorded graphs are never reused across passes).

        When recording gradients, every layer's factors are computed here, before the model's own code runs, so
        that they lie outside any activation-checkpointing segment of the model.
        """
        self._forward_id += 1
        self._depth += 1
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.layers:
            try:
                self._cache, self._key = self._compute(), self._state_key()
            except BaseException:
                self._depth -= 1
                raise

    def end_forward(self, *_args, **_kwargs) -> None:
        """Root forward hook (also called on errors): the pass is over."""
        self._depth = max(self._depth - 1, 0)

    def _active_layers(self) -> list[nn.Module]:
        return [m for m in self.layers if spectral_parametrization(m) is not None]

    def _state_key(self):
        grad = torch.is_grad_enabled()
        tensors = [t for m in self._active_layers() for t in _originals(m)]
        versions = tuple(t._version for t in tensors)
        ids = tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in tensors)
        return (grad, self._forward_id if grad else None, versions, ids)

    def factors(self, module: nn.Module):
        """(U, σ, Vᵀ) of ``module``, computing (and caching) all layers' factors when needed."""
        return self._lookup(module, frames=False)

    def frames(self, module: nn.Module) -> tuple[list, list]:
        """The frames of ``module``'s U and V cores (lists, outer end → Σ), from the same cache as :meth:`factors`."""
        return self._lookup(module, frames=True)

    def _lookup(self, module: nn.Module, frames: bool):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and not self._depth):
            # traced, or a layer called outside a forward pass of the root model while recording gradients:
            # the layer's own factors, in a graph of their own
            if self.check_finite and not torch.compiler.is_compiling():
                _raise_if_not_finite([module])
            p, originals = spectral_parametrization(module), _originals(module)
            compute = (lambda: p.frames(*originals[:2])) if frames else (lambda: p.factors(*originals))
            if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
                # inside a backward pass: the recomputation of an activation-checkpointing segment. These factors
                # stand in for the ones computed before the segment; saving their tensors through the checkpoint's
                # hooks would add entries that the original forward never saved.
                with torch.autograd.graph.saved_tensors_hooks(_detached, _same):
                    return compute()
            return compute()
        key = self._state_key()
        if self._cache is None or key != self._key or id(module) not in self._cache:
            self._cache = self._compute()
            self._key = key
        factors, (group_frames, j) = self._cache[id(module)]
        if not frames:
            return factors
        return [q[j] for q in group_frames[0]], [q[j] for q in group_frames[1]]

    def _compute(self) -> dict[int, tuple]:
        layers = self._active_layers()
        if self.check_finite:
            _raise_if_not_finite(layers)
        # layers of one structure (and dtype, device) form a group whose trains are contracted as one batch
        groups: dict = {}
        for i, m in enumerate(layers):
            p = spectral_parametrization(m)
            t = _originals(m)[0]
            key = (i,) if self.batching != "shape" else (p.u_side, p.v_side, p.d_out, p.d_in, p.spectrum, p.eps,
                                                          t.dtype, t.device)
            groups.setdefault(key, []).append(i)
        # one core batch (B, free rows, cols) per group, side and core: (group, side, k, member blocks, rows, reduced)
        core_batches = []
        for g, members in enumerate(groups.values()):
            p = spectral_parametrization(layers[members[0]])
            for side_index, side in enumerate((p.u_side, p.v_side)):
                member_blocks = [side.split(_originals(layers[i])[side_index]) for i in members]
                for k, (rows, _) in enumerate(side.frame_shapes):
                    core_batches.append((g, side_index, [b[k] for b in member_blocks], rows, side.reduced[k]))
        frames = self._frames(core_batches)
        group_frames: dict = {}
        for (g, side_index, *_), q in zip(core_batches, frames):
            group_frames.setdefault((g, side_index), []).append(q)
        result = {}
        for g, members in enumerate(groups.values()):
            p = spectral_parametrization(layers[members[0]])
            originals = [_originals(layers[i]) for i in members]
            s = torch.stack([o[2] for o in originals]) if len(originals[0]) > 2 else None
            u, sigma, vt = p.factors_from_frames(group_frames.get((g, 0), []), group_frames.get((g, 1), []),
                                                 originals[0][0], s, batch=(len(members),))
            sigmas = sigma.unbind(0) if sigma is not None else [None] * len(members)
            frames_of_group = (group_frames.get((g, 0), []), group_frames.get((g, 1), []))
            for j, (i, ui, si, vti) in enumerate(zip(members, u.unbind(0), sigmas, vt.unbind(0))):
                result[id(layers[i])] = ((ui, si, vti), (frames_of_group, j))
        return result

    def _frames(self, core_batches) -> list[torch.Tensor]:
        """Frames (B, rows, cols) of every core batch, computed as ``batching`` says."""
        if self.batching == "none":
            return [torch.stack([householder_frame_free(b, n, red) for b in blocks])
                    for _, _, blocks, n, red in core_batches]
        if self.batching == "padded":
            flat = [(b, red) for _, _, blocks, _, red in core_batches for b in blocks]
            layouts = [torch.cat([b.new_zeros(b.shape[-1], b.shape[-1]), b]) if red else b for b, red in flat]
            out = iter(padded_householder_frames(layouts, [red for _, red in flat]))
            return [torch.stack([next(out) for _ in blocks]) for _, _, blocks, _, _ in core_batches]
        # "shape": all core batches of one frame shape stacked into a single compact-WY call
        return householder_frame_batches([blocks for _, _, blocks, _, _ in core_batches],
                                         [n for _, _, _, n, _ in core_batches],
                                         [red for *_, red in core_batches])


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _raise_if_not_finite(layers: list[nn.Module]) -> None:
    tensors = [t.detach().reshape(-1) for m in layers for t in _originals(m)]
    if not tensors or bool(torch.isfinite(torch.cat([t.to(torch.float32) for t in tensors])).all()):
        return
    names = ("U reflectors (original0)", "V reflectors (original1)", "spectrum S (original2)")
    for m in layers:
        for i, t in enumerate(_originals(m)):
            if not bool(torch.isfinite(t).all()):
                name = m._sttp.name if "_sttp" in m.__dict__ else type(m).__name__
                raise NonFiniteParameterError(
                    f"layer {name!r}: {names[i]} hold NaN or inf ({int((~torch.isfinite(t)).sum())} of {t.numel()} "
                    "entries), e.g. after an exploding loss; lower the learning rate or clip gradients, and restore "
                    "the last good checkpoint")


def _originals(module: nn.Module) -> tuple[torch.Tensor, ...]:
    plist = module.parametrizations["weight"]
    return tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))


def spectral_parametrization(module: nn.Module) -> SpectralParametrization | None:
    """The :class:`SpectralParametrization` on ``module.weight``, or None."""
    if not torch_parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, SpectralParametrization):
            return p
    return None


# ------------------------------------------------------------------------------------------ spectral layer classes
@dataclass
class LayerState:
    """Per-layer settings and observations of a converted layer (not part of its state_dict)."""

    name: str
    planner: FramePlanner
    path: str = "auto"
    last_path: str | None = None
    last_flops_per_sample: float | None = None
    load_hook: object = None


class _SpectralMixin:
    """Forward of a converted layer: factors from the planner, then the dense, low-rank or TT path."""

    _sttp: LayerState

    def _sttp_active(self) -> bool:
        return "_sttp" in self.__dict__ and spectral_parametrization(self) is not None

    def sttp_factors(self):
        return self._sttp.planner.factors(self)

    def _sttp_choose(self, costs: Mapping[str, float], batch: int) -> str:
        state = self._sttp
        path = state.path if state.path in costs else ("dense" if state.path != "auto" else "auto")
        if path == "auto":
            path = min(costs, key=costs.get)
        state.last_path = path
        state.last_flops_per_sample = costs[path] / max(batch, 1)
        return path

    def _sttp_dense_weight(self):
        p = spectral_parametrization(self)
        return p.weight_from_factors(*self.sttp_factors())

    def _materialize_flops(self) -> float:
        p = spectral_parametrization(self)
        cached = not torch.is_grad_enabled() and self._sttp.planner._cache is not None
        return 0.0 if cached else 2.0 * p.r_mid * p.d_out * p.d_in


class SpectralLinear(_SpectralMixin, nn.Linear):
    """``nn.Linear`` whose weight is W = U·Σ·Vᵀ (see :func:`convert`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._sttp_active():
            return super().forward(x)
        p = spectral_parametrization(self)
        batch = x.numel() // max(x.shape[-1], 1)
        r = p.r_mid
        overhead = _op_overhead_flops(x.device)
        costs = {
            "dense": 2.0 * p.d_out * p.d_in * batch + self._materialize_flops() + overhead,
            "lowrank": 2.0 * r * (p.d_in + p.d_out) * batch + r * batch + 3 * overhead,
        }
        if p.method == "sttp" and len(p.out_modes) + len(p.in_modes) > 2 and self._sttp.path in ("auto", "tt"):
            steps, flops = self._tt_plan(p, batch)
            costs["tt"] = flops + len(steps) * overhead
        path = self._sttp_choose(costs, batch)
        if path == "dense":
            return F.linear(x, self._sttp_dense_weight(), self.bias)
        if path == "tt":
            return self._tt_forward(p, x, batch)
        u, sigma, vt = self.sttp_factors()
        h = x @ vt.mT
        if sigma is not None:
            h = h * sigma
        return F.linear(h, u, self.bias)

    # ---- TT path: y = contraction of the tensorised input with the cores of V, Σ and U (supplement §6, Fig. 8)
    def _tt_plan(self, p: SpectralParametrization, batch: int):
        """(contraction steps, estimated FLOPs) of the TT path for ``batch`` inputs (cached per structure)."""
        return _tt_contraction(tuple(p.in_modes), tuple(p.out_modes), tuple(p.ranks), p.has_spectrum, int(batch))

    def _tt_forward(self, p: SpectralParametrization, x: torch.Tensor, batch: int) -> torch.Tensor:
        steps, _ = self._tt_plan(p, batch)
        cores_u, sigma, cores_v = _tt_cores(self, p)
        xt = x.reshape(batch, *p.in_modes)
        operands = [xt] + cores_v + ([sigma] if sigma is not None else []) + cores_u
        for positions, equation in steps:  # pairwise einsums along the opt_einsum path: plain torch ops
            picked = [operands.pop(i) for i in positions]
            operands.append(torch.einsum(equation, *picked))
        y = operands[0].reshape(*x.shape[:-1], p.d_out)
        return y if self.bias is None else y + self.bias


def _op_overhead_flops(device: torch.device) -> float:
    """The fixed cost of one more kernel call, in FLOPs of work it could have done instead (about 20 µs at
    ~50 GFLOP/s on a CPU core; about 10 µs at tens of TFLOP/s on an accelerator). Keeps "auto" from choosing a
    path of many tiny contractions, such as the TT path at batch 1, when one small GEMM is faster."""
    return 1e6 if device.type == "cpu" else 1e8


def _constant_result(fn):
    """Mark ``fn`` as returning a constant under torch.compile (evaluated while tracing, not traced)."""
    mark = getattr(torch.compiler, "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_constant_result
def _tt_contraction(in_modes: tuple, out_modes: tuple, ranks: tuple, has_spectrum: bool, batch: int):
    """opt_einsum's contraction order for the TT path as ((operand positions, pairwise equation), …), and its cost.

    Positions index the current operand list; each step pops those operands in order and appends its result
    (opt_einsum's own convention), so the steps run with ``torch.einsum`` alone — no opt_einsum at run time,
    and nothing that torch.compile cannot trace.
    """
    return _tt_contraction_cached(in_modes, out_modes, ranks, has_spectrum, batch)


@functools.lru_cache(maxsize=512)
def _tt_contraction_cached(in_modes: tuple, out_modes: tuple, ranks: tuple, has_spectrum: bool, batch: int):
    import opt_einsum

    shapes, subscripts = _tt_einsum_spec(in_modes, out_modes, ranks, has_spectrum, batch)
    _, info = opt_einsum.contract_path(subscripts, *shapes, shapes=True, optimize="auto")
    steps = tuple((tuple(step[0]), step[2]) for step in info.contraction_list)
    return steps, float(info.opt_cost)


def _tt_einsum_spec(in_modes, out_modes, ranks, has_spectrum: bool, batch: int):
    """Operand shapes and einsum subscripts of y[b, out…] = x[b, in…]·V cores·σ·U cores."""
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    b = next(letters)
    in_idx = [next(letters) for _ in in_modes]
    out_idx = [next(letters) for _ in out_modes]
    bond = [next(letters) for _ in ranks]
    n_out = len(out_modes)
    shapes, terms = [(batch, *in_modes)], [b + "".join(in_idx)]
    for j, n in enumerate(in_modes):  # V core for mode n_out + j in the original orientation
        k = n_out + j
        shapes.append((ranks[k], n, ranks[k + 1]))
        terms.append(bond[k] + in_idx[j] + bond[k + 1])
    if has_spectrum:
        shapes.append((ranks[n_out],))
        terms.append(bond[n_out])
    for k, n in enumerate(out_modes):
        shapes.append((ranks[k], n, ranks[k + 1]))
        terms.append(bond[k] + out_idx[k] + bond[k + 1])
    # the outer bonds have size 1; they are summed away
    return shapes, ",".join(terms) + "->" + b + "".join(out_idx)


def _tt_cores(module, p: SpectralParametrization):
    """Cores of U, σ, and cores of V, all in the train's orientation (R_{k−1}, n_k, R_k)."""
    originals = _originals(module)
    cores_u, cores_v = p.train_cores(*module._sttp.planner.frames(module))
    sigma = p.sigma(originals[2]) if p.has_spectrum else None
    return cores_u, sigma, cores_v


def _conv_fn(ndim: int, transposed: bool = False) -> Callable:
    if transposed:
        return {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[ndim]
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]


class _SpectralConvMixin(_SpectralMixin):
    def _conv_costs(self, p: SpectralParametrization, out_spatial: int, batch: int, in_spatial: int):
        k = math.prod(self.kernel_size)
        r = p.r_mid
        dense = 2.0 * p.d_out * p.d_in * (out_spatial if not self.transposed else in_spatial) * batch
        costs = {"dense": dense + self._materialize_flops()}
        if self.groups == 1:
            if self.transposed:
                costs["lowrank"] = 2.0 * r * p.d_in * in_spatial * batch + 2.0 * r * p.d_out * out_spatial * batch
            else:
                costs["lowrank"] = 2.0 * r * p.d_in * out_spatial * batch + 2.0 * r * p.d_out * out_spatial * batch
        del k
        return costs


class _SpectralConvNd(_SpectralConvMixin):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._sttp_active():
            return super().forward(x)
        p = spectral_parametrization(self)
        nd = len(self.kernel_size)
        batch = x.shape[0] if x.dim() == nd + 2 else 1
        in_spatial = math.prod(x.shape[-nd:])
        out_spatial = math.prod(_conv_out_size(x.shape[-nd:], self))
        path = self._sttp_choose(self._conv_costs(p, out_spatial, batch, in_spatial), batch)
        if path == "dense":
            return self._conv_forward(x, self._sttp_dense_weight(), self.bias)
        u, sigma, vt = self.sttp_factors()
        first = vt.reshape(p.r_mid, self.in_channels, *self.kernel_size)
        h = self._conv_forward(x, first, None)
        mix = (u if sigma is None else u * sigma).reshape(p.d_out, p.r_mid, *([1] * nd))
        return _conv_fn(nd)(h, mix, self.bias)


def _conv_out_size(spatial, conv) -> list[int]:
    out = []
    for i, n in enumerate(spatial):
        if isinstance(conv.padding, str):
            if conv.padding == "same":
                out.append(n)
                continue
            pad = 0
        else:
            pad = conv.padding[i]
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        out.append((n + 2 * pad - d * (k - 1) - 1) // s + 1)
    return out


class _SpectralConvTransposeNd(_SpectralConvMixin):
    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if not self._sttp_active():
            return super().forward(x, output_size)
        p = spectral_parametrization(self)
        nd = len(self.kernel_size)
        batch = x.shape[0] if x.dim() == nd + 2 else 1
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, nd,
                                              self.dilation)
        in_spatial = math.prod(x.shape[-nd:])
        out_spatial = math.prod(
            (x.shape[-nd + i] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (self.kernel_size[i] - 1)
            + output_padding[i] + 1 for i in range(nd))
        path = self._sttp_choose(self._conv_costs(p, out_spatial, batch, in_spatial), batch)
        fn = _conv_fn(nd, transposed=True)
        if path == "dense":
            return fn(x, self._sttp_dense_weight(), self.bias, self.stride, self.padding, output_padding,
                      self.groups, self.dilation)
        u, sigma, vt = self.sttp_factors()
        first = vt.reshape(p.r_mid, self.in_channels, *self.kernel_size).transpose(0, 1)
        h = fn(x, first, None, self.stride, self.padding, output_padding, 1, self.dilation)
        mix = (u if sigma is None else u * sigma).reshape(p.d_out, p.r_mid, *([1] * nd))
        return _conv_fn(nd)(h, mix, self.bias)


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


class SpectralEmbedding(_SpectralMixin, nn.Embedding):
    """``nn.Embedding`` with an SVDP/STTP weight; rows are looked up without forming W ("lowrank").

    ``padding_idx`` rows receive no gradient; ``max_norm`` rescales the looked-up rows out of place (the
    parameters are never modified), with the rescaling factor treated as a constant.
    """

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if not self._sttp_active():
            return super().forward(idx)
        p = spectral_parametrization(self)
        n = idx.numel()
        costs = {"dense": self._materialize_flops(), "lowrank": 2.0 * p.r_mid * p.d_in * n}
        if self.scale_grad_by_freq:
            costs.pop("lowrank")
        path = self._sttp_choose(costs, n)
        if path == "dense":
            w = self._sttp_dense_weight()
            rows = F.embedding(idx, w, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)
        else:
            u, sigma, vt = self.sttp_factors()
            coeff = F.embedding(idx, u, self.padding_idx)
            rows = (coeff if sigma is None else coeff * sigma) @ vt
            if self.padding_idx is not None:  # σ and Vᵀ are shared by all rows: cut the padding rows' gradient
                rows = torch.where((idx == self.padding_idx).unsqueeze(-1), rows.detach(), rows)
        if self.max_norm is not None:
            norms = torch.linalg.vector_norm(rows.detach(), ord=self.norm_type, dim=-1, keepdim=True)
            scale = torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7), torch.ones_like(norms))
            rows = rows * scale
        return rows


_SPECTRAL_CLASS = {
    nn.Linear: SpectralLinear,
    nn.Conv1d: SpectralConv1d, nn.Conv2d: SpectralConv2d, nn.Conv3d: SpectralConv3d,
    nn.ConvTranspose1d: SpectralConvTranspose1d, nn.ConvTranspose2d: SpectralConvTranspose2d,
    nn.ConvTranspose3d: SpectralConvTranspose3d,
    nn.Embedding: SpectralEmbedding,
}


def _spectral_class(cls: type) -> type:
    """The spectral subclass for a layer class (exact supported types, or a dynamic subclass for subclasses)."""
    if cls in _SPECTRAL_CLASS:
        return _SPECTRAL_CLASS[cls]
    for base in SUPPORTED_TYPES:
        if issubclass(cls, base):
            # a subclass's own forward is kept (it sees the materialised weight); otherwise the spectral forward runs
            bases = (_SpectralMixin, cls) if cls.forward is not base.forward else (_SPECTRAL_CLASS[base], cls)
            new = type(f"Spectral{cls.__name__}", bases, {"__module__": __name__})
            _SPECTRAL_CLASS[cls] = new
            return new
    raise TypeError(f"{cls.__name__} is not supported")


# ---------------------------------------------------------------------------------------------------- convert
def converted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every layer with an SVDP/STTP weight."""
    return [(n, m) for n, m in model.named_modules() if spectral_parametrization(m) is not None]


def skipped_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """(name, type, reason) of modules that :func:`convert` leaves alone."""
    return list(getattr(model, "_sttp_skipped", []))


def convert(
    model: nn.Module,
    method: str = "sttp",
    rank: int | Mapping[str, int] = 64,
    spectrum: str = "normalized",
    init: str = "noisy_identity",
    include=None,
    exclude=None,
    alpha: float = 1e-4,
    path: str = "auto",
    batching: str = "shape",
    check_finite: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> nn.Module:
    """Reparameterize, in place, every supported layer selected in ``model``; returns ``model``.

    Args:
        method: ``"sttp"`` or ``"svdp"``.
        rank: a cap r for every layer, or a mapping from qualified layer name to rank (only those layers).
        spectrum: ``"identity"``, ``"normalized"`` (σ_max = 1) or ``"free"``.
        init: ``"noisy_identity"`` (α = ``alpha``), ``"identity"``, ``"random"``, or ``"pretrained"`` (project the
            current weights: truncated SVD / TT-SVD).
        include / exclude: qualified-name globs (``"features.*"``) or module types selecting layers; by default every
            supported layer (Linear, Conv1/2/3d, ConvTranspose1/2/3d, Embedding) is included.
        path: forward path, ``"auto"`` (cheapest estimated FLOPs), ``"dense"``, ``"lowrank"`` or ``"tt"``.
        batching: how frames are batched across layers (see :class:`FramePlanner`).
        check_finite: test the parameters for NaN/inf before each frame computation (one fused check) and raise
            :class:`NonFiniteParameterError` naming the first bad layer. Off by default; switch it on or off later
            with ``model._sttp_planner.check_finite = …``.

    Unsupported modules (tied weights, ``nn.MultiheadAttention`` projections, sparse embeddings, …) are left alone
    and listed by :func:`skipped_layers` and in the report. On any error nothing is converted.
    """
    check_method(method)
    check_spectrum(spectrum)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    if batching not in BATCHING:
        raise ValueError(f"unknown batching {batching!r}; choose one of {BATCHING}")
    if converted_layers(model):
        names = ", ".join(n or "<root>" for n, _ in converted_layers(model)[:3])
        raise ValueError(f"model is already converted (e.g. {names}); call torch_sttp.to_dense(model) first")
    rank_map = dict(rank) if isinstance(rank, Mapping) else None
    if rank_map is None:
        check_rank(rank)
    selected, skipped = select_layers(model, include, exclude, rank_map)
    if not selected:
        raise ValueError("no layer was selected for conversion; check include/exclude/rank, supported types are "
                         + ", ".join(t.__name__ for t in SUPPORTED_TYPES))

    planner = FramePlanner(batching, check_finite)
    done: list[tuple[nn.Module, type, dict]] = []
    iterator = selected
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(selected, desc="convert", unit="layer")
    try:
        for name, module in iterator:
            r = rank_map[name] if rank_map is not None else rank
            original_cls, original_params = module.__class__, dict(module._parameters)
            module.__class__ = _spectral_class(original_cls)
            done.append((module, original_cls, original_params))
            weight = module.weight
            p = SpectralParametrization(tuple(weight.shape), r, method, spectrum,
                                        isinstance(module, nn.modules.conv._ConvTransposeNd))
            p.to(weight.device)
            if init != "pretrained":
                p._pending = p.initial_parameters(init, alpha, generator, weight.dtype, weight.device)
            try:
                register_spectral(module, "weight", p)
            except ValueError as e:
                raise ValueError(f"layer {name!r} ({original_cls.__name__}): {e}") from None
            module._sttp = LayerState(name=name, planner=planner, path=path)
            planner.add(module)
    except BaseException:
        for module, cls, params in reversed(done):
            _restore(module, cls, params)
        raise
    model._sttp_hook = (model.register_forward_pre_hook(planner.new_forward),
                        model.register_forward_hook(planner.end_forward, always_call=True))
    model._sttp_planner = planner
    model._sttp_skipped = skipped
    for _, module, in selected:
        module._sttp.load_hook = module._register_load_state_dict_pre_hook(_load_dense_weight_hook, with_module=True)
    return model


def _restore(module: nn.Module, cls: type, params: dict[str, torch.nn.Parameter]) -> None:
    """Undo a partial conversion: the original class and parameters (same objects, same order)."""
    if torch_parametrize.is_parametrized(module, "weight"):
        torch_parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module._parameters.clear()
    module._parameters.update(params)
    module.__class__ = cls
    module.__dict__.pop("_sttp", None)


def _load_dense_weight_hook(module, state_dict, prefix, *args) -> None:
    """Loading a dense checkpoint into a converted layer goes through ``right_inverse``."""
    key = prefix + "weight"
    if key not in state_dict or spectral_parametrization(module) is None:
        return
    if any(k.startswith(prefix + "parametrizations.weight.") for k in state_dict):
        return
    dense = state_dict.pop(key)
    p = spectral_parametrization(module)
    originals = p.right_inverse(dense.to(_originals(module)[0].dtype))
    for i, t in enumerate(originals):
        state_dict[f"{prefix}parametrizations.weight.original{i}"] = t
    state_dict[f"{prefix}parametrizations.weight.0._extra_state"] = p.config()


def _base_class(module: nn.Module) -> type:
    cls = module.__class__
    while cls.__name__.startswith("Parametrized") or issubclass(cls, _SpectralMixin):
        if issubclass(cls, _SpectralMixin) and not cls.__name__.startswith("Parametrized"):
            return next(b for b in cls.__mro__[1:] if not issubclass(b, _SpectralMixin))
        cls = cls.__bases__[0]
    return cls


def _drop_state(module: nn.Module) -> None:
    state = module.__dict__.pop("_sttp", None)
    if state is not None and state.load_hook is not None:
        state.load_hook.remove()


def _detach_planner(model: nn.Module) -> None:
    _unwrap_removed(model)
    for handle in model.__dict__.pop("_sttp_hook", ()):
        handle.remove()
    model.__dict__.pop("_sttp_planner", None)


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every SVDP/STTP weight by its materialised dense weight, restoring plain layer classes (in place)."""
    for _, module in converted_layers(model):
        _to_plain(module)
    _detach_planner(model)
    return model


def _unwrap_removed(model: nn.Module) -> None:
    """Plain classes for converted layers whose parametrization was removed by hand (``remove_parametrizations``)."""
    for module in model.modules():
        if isinstance(module, _SpectralMixin) and not torch_parametrize.is_parametrized(module):
            module.__class__ = _base_class(module)
            _drop_state(module)


def _to_plain(module: nn.Module) -> None:
    """Materialise ``module``'s weight and give it back its original class."""
    base, cls = _base_class(module), module.__class__
    # remove_parametrizations edits the class in place, and copy.deepcopy shares that class between a model and
    # its copies: work on a private class so that exporting a copy leaves the original model intact
    module.__class__ = type(cls.__name__, cls.__bases__,
                            {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
    torch_parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module.__class__ = base
    _drop_state(module)


def _factorized_pair(module: nn.Module) -> nn.Module | None:
    p = spectral_parametrization(module)
    with torch.no_grad():
        u, sigma, vt = p.factors(*_originals(module))
        us = u if sigma is None else u * sigma
    r = p.r_mid
    dtype, device = us.dtype, us.device
    kw = {"dtype": dtype, "device": device}
    bias = module.bias is not None if hasattr(module, "bias") else False
    if isinstance(module, nn.Linear):
        first = nn.Linear(p.d_in, r, bias=False, **kw)
        second = nn.Linear(r, p.d_out, bias=bias, **kw)
        first.weight.data.copy_(vt)
        second.weight.data.copy_(us)
    elif isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq:
            return None
        first = nn.Embedding(module.num_embeddings, r, padding_idx=module.padding_idx, **kw)
        second = nn.Linear(r, p.d_in, bias=False, **kw)
        first.weight.data.copy_(us)
        second.weight.data.copy_(vt.mT)
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.groups != 1:
            return None
        nd = len(module.kernel_size)
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        if module.transposed:
            tcls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
            first = tcls(module.in_channels, r, module.kernel_size, module.stride, module.padding,
                         module.output_padding, 1, False, module.dilation, **kw)
            first.weight.data.copy_(vt.reshape(r, module.in_channels, *module.kernel_size).transpose(0, 1))
        else:
            first = conv_cls(module.in_channels, r, module.kernel_size, module.stride, module.padding,
                             module.dilation, 1, False, module.padding_mode, **kw)
            first.weight.data.copy_(vt.reshape(r, module.in_channels, *module.kernel_size))
        second = conv_cls(r, module.out_channels, 1, bias=bias, **kw)
        second.weight.data.copy_(us.reshape(module.out_channels, r, *([1] * nd)))
    else:
        return None
    if bias:
        second.bias.data.copy_(module.bias.detach())
    return nn.Sequential(first, second)


def to_factorized(model: nn.Module) -> nn.Module:
    """Replace each converted layer by two plain low-rank layers (in place where possible; returns the model).

    Linear → Linear(d_in→r) · Linear(r→d_out); Conv → r-filter conv · 1×1 conv; ConvTranspose → r-channel
    transposed conv · 1×1 conv; Embedding → Embedding(·, r) · Linear(r→dim). Grouped convs and max_norm embeddings
    become dense layers. The result holds only plain modules (``torch.export``-able).
    """
    pairs = []
    for name, module in converted_layers(model):
        pairs.append((name, module, _factorized_pair(module)))
    for name, module, pair in pairs:
        if pair is None:
            _to_plain(module)
            continue
        if name == "":
            _detach_planner(model)
            return pair
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, pair)
    _detach_planner(model)
    return model
