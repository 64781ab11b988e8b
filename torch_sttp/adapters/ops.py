"""How each layer type an adapter can wrap is computed: its weight as the matrix W (d_out, d_in), its own op run
with another weight, a low-rank update's contribution U·diag(σ)·Vᵀx, and a rotated layer W' = H_out·W·H.

Layer types: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any kernel, stride, padding, padding mode, dilation and groups),
``nn.Embedding`` (rows are embeddings: d_out = num_embeddings, d_in = embedding_dim) and transformers' ``Conv1D``
(GPT-2 style, weight (d_in, d_out), y = x·W + b; looked up only when ``transformers`` is already imported). The
matrix view is the one of :func:`torch_sttp.layers.weight_matrix`: W (d_out, C_in/groups·∏kernel) for a conv.

Rotations never form H (d × d): :func:`torch_sttp.frames.apply_householder` applies the compact-WY form either to
the layer input, x ↦ x·Hᵀ before the layer (Linear, Conv1D), to the looked-up rows (Embedding), or to the weight,
W ↦ W·H (convolutions, and Linear when that is cheaper, see :meth:`LayerOps.rotation_costs`); a Linear (or Conv1D)
can also run W·H as the frozen layer plus a rank-r correction, x·Wᵀ − ((x·Y)·Tᵀ)·(W·Y)ᵀ (:func:`rotated_linear`).
"""
from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..cost import element_flops
from ..frames import apply_householder, operand_dtype, without_autocast
from ..layers import is_transposed_conv
from ..modules import conv_function

__all__ = ["Rotation", "LayerOps", "LinearOps", "Conv1DOps", "ConvOps", "EmbeddingOps", "layer_ops", "conv1d_class",
           "rotated_matrix", "rotated_linear", "SUPPORTED_NAMES", "is_weight_layer"]

SUPPORTED_NAMES = "Linear, Conv1d/2d/3d, Embedding, transformers Conv1D"


class Rotation(NamedTuple):
    """H = I − Y·T·Yᵀ on the input side (Y (d_in, r), T (r, r)) and optionally H_out on the output side."""

    y_in: torch.Tensor
    t_in: torch.Tensor
    y_out: torch.Tensor | None = None
    t_out: torch.Tensor | None = None


def rotated_matrix(matrix: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """H_out·W·H for W (d_out, d_in): W·H = W − ((W·Y)·T)·Yᵀ, then H_out·(W·H) = ((W·H)ᵀ·H_outᵀ)ᵀ; O(d_out·d_in·r)."""
    out = apply_householder(matrix, rot.y_in, rot.t_in)
    if rot.y_out is not None:
        out = apply_householder(out.mT, rot.y_out, rot.t_out.mT).mT
    return out


class _RotatedLinear(torch.autograd.Function):
    """y = x·Wᵀ + b − C·Qᵀ with P = x·Y, C = P·Tᵀ, Q = W·Y, for x (N, d_in), W (d_out, d_in), b (d_out,) or None,
    Y (d_in, r), T (r, r); hand-written backward with G = ∂y, A = (G·Q)·T: ∂x = G·W − A·Yᵀ (in place on G·W),
    ∂Y = −(xᵀ·A + Wᵀ·(Gᵀ·C)), ∂T = −(G·Q)ᵀ·P, ∂W = Gᵀ·x − (Gᵀ·C)·Yᵀ, ∂b = Σ_rows G; only the gradients asked for
    are formed (no G·W for an input that needs none)."""

    @staticmethod
    def forward(ctx, x, w, b, y, t):
        p = x @ y
        c = p @ t.mT
        q = w @ y
        ctx.save_for_backward(x, w, y, t, p, c, q)
        return F.linear(x, w, b).addmm_(c, q.mT, alpha=-1)

    @staticmethod
    def backward(ctx, g):
        x, w, y, t, p, c, q = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: the products inside the graph
            p = x @ y
            c = p @ t.mT
            q = w @ y
        need_x, need_w, need_b, need_y, need_t = ctx.needs_input_grad
        gq = g @ q
        a = gq @ t if need_x or need_y else None
        gc = g.mT @ c if need_y or need_w else None
        grad_x = (g @ w).addmm_(a, y.mT, alpha=-1) if need_x else None
        grad_w = (g.mT @ x).addmm_(gc, y.mT, alpha=-1) if need_w else None
        grad_b = g.sum(0) if need_b else None
        grad_y = (x.mT @ a).addmm_(w.mT, gc).neg_() if need_y else None
        grad_t = (gq.mT @ p).neg_() if need_t else None
        return grad_x, grad_w, grad_b, grad_y, grad_t


def rotated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """x·(W·H)ᵀ + b for H = I − Y·T·Yᵀ, without forming W·H or x·Hᵀ: x·Wᵀ + b − ((x·Y)·Tᵀ)·(W·Y)ᵀ, the frozen layer
    plus a rank-r correction; O(N·r·(d_in + d_out) + d_out·d_in·r), no new (N, d_in) tensor, forward or backward.

    ``x`` (…, d_in), ``weight`` W (d_out, d_in), ``bias`` (d_out,) or None, ``y`` (d_in, r), ``t`` (r, r) →
    (…, d_out). Runs in the common dtype of the operands (under autocast: the autocast dtype, as the layer's matmul
    would); differentiable in every operand (twice).
    """
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in or y.shape[-2] != d_in or t.shape != (y.shape[-1],) * 2 or y.dim() != 2:
        raise ValueError(f"rotated_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, y {tuple(y.shape)}, "
                         f"t {tuple(t.shape)} do not fit; expected x (…, d_in), weight (d_out, d_in), y (d_in, r), "
                         "t (r, r)")
    work = operand_dtype(x.device, x, weight, y, t)
    with without_autocast(x.device):
        b = None if bias is None else bias.to(work)
        out = _RotatedLinear.apply(x.reshape(-1, d_in).to(work), weight.to(work), b, y.to(work), t.to(work))
    return out.reshape(*x.shape[:-1], d_out)


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` class if ``transformers.pytorch_utils`` is imported (a model using it has imported
    it), else None: adapters never import transformers themselves."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


class LayerOps:
    """The computations of one layer type (stateless; every method takes the base layer)."""

    name = "layer"

    def layout_shape(self, layer: nn.Module) -> tuple[int, ...]:
        """The weight shape in the (d_out, C_in, *kernel) layout of the parametrizations."""
        return tuple(layer.weight.shape)

    def matrix(self, layer: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W (d_out, d_in) from the layer's weight (or ``weight`` of the same shape), a view."""
        w = layer.weight if weight is None else weight
        return w.reshape(w.shape[0], -1)

    def to_weight(self, layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`matrix`: a tensor of the layer's weight shape."""
        return matrix.reshape(layer.weight.shape)

    def run(self, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The layer's own op on ``x`` with ``weight`` (the layer's weight shape) instead of its weight; with the
        layer's bias unless ``bias=False``."""
        raise NotImplementedError

    def lowrank(self, layer: nn.Module, x: torch.Tensor, u, sigma, vt) -> torch.Tensor | None:
        """(U·diag(σ)·Vᵀ) applied as the layer applies W (no bias; σ None: U·Vᵀ), or None when only the weight
        path exists."""
        raise NotImplementedError

    def rotation_costs(self, layer: nn.Module, x: torch.Tensor, rot: Rotation) -> dict[str, float]:
        """Estimated FLOPs of the rotation paths available for this input: "weight" (form H_out·W·H, then the
        layer's op; when training, the frozen layer then also forms the dense gradient of W') and, where the layer
        allows it, "input" (x·Hᵀ before the layer, the output rotated by H_out after it) and "lowrank" (the frozen
        layer plus a rank-r correction, :func:`rotated_linear`)."""
        return {"weight": 0.0}

    def rotate(self, layer: nn.Module, x: torch.Tensor, rot: Rotation, path: str) -> torch.Tensor:
        """The layer's output with W' = H_out·W·H, along ``path``."""
        return self.run(layer, x, self.to_weight(layer, rotated_matrix(self.matrix(layer), rot)))


class LinearOps(LayerOps):
    """``nn.Linear``: y = x·Wᵀ + b."""

    name = "Linear"

    def run(self, layer, x, weight, bias=True):
        return F.linear(x, weight, layer.bias if bias else None)

    def lowrank(self, layer, x, u, sigma, vt):
        return F.linear(_scaled(F.linear(x, vt), sigma), u)

    def rotation_costs(self, layer, x, rot):
        """FLOPs of "input" (x·Hᵀ, then the layer), "lowrank" (:func:`rotated_linear`) and "weight". Training
        counts three passes of each product; the input path's x·Hᵀ and its gradient are new (rows, d_in) tensors
        (two passes each, at :func:`~torch_sttp.cost.element_flops`), and its frozen layer forms G·W even where x
        needs no gradient."""
        d_out, d_in = self.matrix(layer).shape
        rows = x.numel() // max(d_in, 1)
        r_in, r_out = rot.y_in.shape[-1], 0 if rot.y_out is None else rot.y_out.shape[-1]
        grad = torch.is_grad_enabled()
        passes = 3.0 if grad else 1.0  # forward, and the backward's two products per forward product
        out_side = passes * 4.0 * rows * d_out * r_out
        dense_grad = 2.0 * rows * d_out * d_in if grad else 0.0
        copies = (4.0 if grad else 2.0) * rows * d_in * element_flops(x.device)
        frozen_grad = dense_grad if not x.requires_grad else 0.0
        return {"input": passes * 4.0 * rows * d_in * r_in + out_side + copies + frozen_grad,
                "lowrank": passes * 2.0 * rows * r_in * (d_in + d_out) + out_side
                + (2.0 if grad else 1.0) * 2.0 * d_out * d_in * r_in,  # W·Y, and Wᵀ·(Gᵀ·C) in the backward
                "weight": passes * 4.0 * d_out * d_in * (r_in + r_out) + dense_grad}

    def rotate(self, layer, x, rot, path):
        if path == "weight":
            return super().rotate(layer, x, rot, path)
        one_sided = rot.y_out is None
        if path == "lowrank":
            out = rotated_linear(x, self.matrix(layer), layer.bias if one_sided else None, rot.y_in, rot.t_in)
        else:
            out = self.run(layer, apply_householder(x, rot.y_in, rot.t_in.mT), layer.weight, bias=one_sided)
        if one_sided:
            return out
        out = apply_householder(out, rot.y_out, rot.t_out.mT)  # H_out on the output side
        return out if layer.bias is None else out + layer.bias


class Conv1DOps(LinearOps):
    """transformers' ``Conv1D``: weight (d_in, d_out), y = x·W + b; its matrix view is Wᵀ."""

    name = "Conv1D"

    def layout_shape(self, layer):
        return tuple(layer.weight.shape[::-1])

    def matrix(self, layer, weight=None):
        return (layer.weight if weight is None else weight).mT

    def to_weight(self, layer, matrix):
        return matrix.mT

    def run(self, layer, x, weight, bias=True):
        return F.linear(x, weight.mT, layer.bias if bias else None)


class ConvOps(LayerOps):
    """``nn.Conv1d/2d/3d``: any kernel, stride, padding (and padding mode), dilation; groups through the weight."""

    name = "Conv"

    def run(self, layer, x, weight, bias=True):
        return _conv(layer, x, weight, layer.bias if bias else None)

    def lowrank(self, layer, x, u, sigma, vt):
        if layer.groups != 1:
            return None  # r filters cannot follow the group structure: the caller forms W + ΔW
        nd = len(layer.kernel_size)
        r = vt.shape[0]
        h = _conv(layer, x, vt.reshape(r, layer.in_channels, *layer.kernel_size), None)
        h = h if sigma is None else h * sigma.reshape(r, *([1] * nd))
        return conv_function(nd)(h, u.reshape(u.shape[0], r, *([1] * nd)))


class EmbeddingOps(LayerOps):
    """``nn.Embedding``: rows W[idx]; the padding row keeps its pretrained value under every adapter."""

    name = "Embedding"

    def run(self, layer, x, weight, bias=True):
        return F.embedding(x, weight, layer.padding_idx, None, layer.norm_type, layer.scale_grad_by_freq, False)

    def lowrank(self, layer, x, u, sigma, vt):
        rows = _scaled(F.embedding(x, u, None, None, 2.0, layer.scale_grad_by_freq), sigma) @ vt
        return rows if layer.padding_idx is None else rows * (x != layer.padding_idx).unsqueeze(-1).to(rows.dtype)

    def rotate(self, layer, x, rot, path):
        rows = self.run(layer, x, layer.weight)
        out = rows
        if rot.y_out is not None:  # (H_out·W)[idx] = W[idx] − (Y_out[idx]·T_out)·(Y_outᵀ·W)
            coeff = F.embedding(x, rot.y_out) @ rot.t_out
            out = out - coeff @ (rot.y_out.mT @ layer.weight)
        out = apply_householder(out, rot.y_in, rot.t_in)
        if layer.padding_idx is None:
            return out
        return torch.where((x == layer.padding_idx).unsqueeze(-1), rows.to(out.dtype), out)

    def keep_padding_row(self, layer, merged: torch.Tensor) -> torch.Tensor:
        """A merged weight with the padding row put back to its pretrained value."""
        if layer.padding_idx is None:
            return merged
        keep = torch.zeros(merged.shape[0], 1, dtype=torch.bool, device=merged.device)
        keep[layer.padding_idx] = True
        return torch.where(keep, layer.weight.to(merged.dtype), merged)


def _scaled(h: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    return h if sigma is None else h * sigma


def _conv_pads(layer: nn.Module) -> list[int]:
    """F.pad amounts (last spatial dimension first) that the layer's padding stands for."""
    nd = len(layer.kernel_size)
    if layer.padding == "valid":
        return [0] * (2 * nd)
    pads = []
    for i in reversed(range(nd)):
        if layer.padding == "same":
            total = layer.dilation[i] * (layer.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [layer.padding[i]] * 2
    return pads


def _conv(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """The layer's convolution (stride, padding and its mode, dilation, groups) with another weight."""
    groups = layer.groups
    fn = conv_function(len(layer.kernel_size))
    if layer.padding_mode == "zeros":
        return fn(x, weight, bias, layer.stride, layer.padding, layer.dilation, groups)
    padded = F.pad(x, _conv_pads(layer), mode=layer.padding_mode)
    return fn(padded, weight, bias, layer.stride, 0, layer.dilation, groups)


_OPS = {nn.Linear: LinearOps(), nn.Conv1d: ConvOps(), nn.Conv2d: ConvOps(), nn.Conv3d: ConvOps(),
        nn.Embedding: EmbeddingOps()}
_CONV1D_OPS = Conv1DOps()


def _supported_base(module: nn.Module) -> type | None:
    conv1d = conv1d_class()
    bases = list(_OPS) + ([conv1d] if conv1d is not None else [])
    return next((b for b in bases if isinstance(module, b)), None)


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer a user would expect to carry an adapter (an instance of a supported type, or a
    transposed convolution): when one cannot, it is listed as skipped with the reason even under the default
    target."""
    return _supported_base(module) is not None or is_transposed_conv(module)


def layer_ops(module: nn.Module) -> tuple[LayerOps | None, str | None]:
    """(the ops of ``module``'s layer type, None) or (None, why it cannot carry an adapter)."""
    base = _supported_base(module)
    if base is None:
        if is_transposed_conv(module):
            return None, "transposed convolutions are not supported by adapters"
        return None, f"{type(module).__name__} is not a layer type adapters support ({SUPPORTED_NAMES})"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return None, ("weight has a parametrization (e.g. a converted SVDP/STTP layer); export it with "
                      "torch_sttp.to_dense first")
    if type(module).forward is not base.forward:
        return None, (f"{type(module).__name__} overrides {base.__name__}.forward; the adapted op would not be the "
                      "one it runs")
    ops = _OPS.get(base, _CONV1D_OPS)
    reason = _weight_reason(module, ops)
    return (None, reason) if reason else (ops, None)


def _weight_reason(module: nn.Module, ops: LayerOps) -> str | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return "no initialised weight tensor"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if isinstance(ops, EmbeddingOps):
        if module.sparse:
            return "sparse embedding gradients are not supported"
        if module.max_norm is not None:
            return "max_norm renormalises the embedding weight in place; the base weight must stay untouched"
    if min(weight.shape) < 1 or math.prod(weight.shape) == 0:
        return f"weight of shape {tuple(weight.shape)} is empty"
    return None
