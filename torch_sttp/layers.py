"""Which layers can carry an SVDP/STTP weight, how their weights are viewed as matrices, and layer selection.

Shared by model surgery, the compression report, the spectral tools and rank selection, so that every one of them
selects the same layers with the same ``include``/``exclude`` patterns and skips the same ones for the same reasons.
"""
from __future__ import annotations

import fnmatch
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from .options import check_ranks
from .tt import layout_view, transposed_layout_shape

__all__ = ["SUPPORTED_TYPES", "KINDS", "layer_kind", "layout_shape", "weight_matrix", "matrix_to_weight",
           "is_transposed_conv", "as_patterns", "matches", "select_layers", "conversion_blockers",
           "check_has_values"]

SUPPORTED_TYPES = (
    nn.Linear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding,
)


KINDS = ("linear", "conv", "conv_transpose", "embedding")


def layer_kind(module: nn.Module) -> str:
    """"linear", "conv", "conv_transpose" or "embedding" for a supported layer (see :data:`KINDS`)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_transposed_conv(module):
        return "conv_transpose"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    raise ValueError(f"{type(module).__name__} has no calibration statistic; supported: Linear, Conv1/2/3d, "
                     "ConvTranspose1/2/3d, Embedding")


def check_has_values(module: nn.Module, what: str, name: str) -> None:
    """Raise ValueError when a parameter or buffer of layer ``name`` is on the meta device: ``what`` (e.g. "a
    spectrum") needs values, a meta tensor has none."""
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise ValueError(f"layer {name!r} is on the meta device and has no values, which {what} needs; load the "
                         "pretrained weights first (model.to_empty(device=...), then load_state_dict)")


def layout_shape(module: nn.Module, shape=None) -> tuple[int, ...]:
    """The weight shape in the (d_out, C_in, *kernel) layout: a transposed conv's first two axes swapped."""
    return transposed_layout_shape(module.weight.shape if shape is None else shape, is_transposed_conv(module))


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight as the matrix W (d_out, d_in) of the paper (d_in = C_in·∏kernel)."""
    weight = layout_view(module.weight if weight is None else weight, is_transposed_conv(module))
    return weight.reshape(weight.shape[0], -1)


def matrix_to_weight(module: nn.Module, matrix: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: the weight tensor of ``shape`` (the layer's own weight shape)."""
    transposed = is_transposed_conv(module)
    return layout_view(matrix.reshape(transposed_layout_shape(shape, transposed)), transposed)


def is_transposed_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a transposed convolution (its weight is (C_in, C_out, *kernel))."""
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def as_patterns(x) -> list:
    """``include``/``exclude`` argument as a list of globs and module types."""
    if x is None:
        return []
    if isinstance(x, (str, type)):
        return [x]
    return list(x)


def matches(name: str, module: nn.Module | None, patterns) -> bool:
    """Whether a qualified name matches a glob, or the module an type, of ``patterns``."""
    for pat in patterns:
        if isinstance(pat, type):
            if isinstance(module, pat):
                return True
        elif fnmatch.fnmatchcase(name, pat):
            return True
    return False


_WEIGHT_HOOKS = {
    "SpectralNorm": "torch.nn.utils.remove_spectral_norm(layer)",
    "WeightNorm": "torch.nn.utils.remove_weight_norm(layer)",
}

_UNSUPPORTED_TYPES = {
    nn.MultiheadAttention: "packed in_proj_weight is not a supported layer",
    nn.RNNBase: "recurrent layer (LSTM / GRU / RNN): its gate weights are not a supported layer",
}


def _weight_hook_reason(module: nn.Module) -> str | None:
    """Why a weight recomputed by an old-style hook (``nn.utils.spectral_norm`` / ``weight_norm``) is left alone."""
    for hook in module._forward_pre_hooks.values():
        fix = _WEIGHT_HOOKS.get(type(hook).__name__)
        if fix is not None:
            return (f"weight is recomputed by the hook-based {type(hook).__name__} on every forward; remove it first "
                    f"with {fix}")
    return None


def _skip_reason(name: str, module: nn.Module, shared: set[int], parents: dict[str, nn.Module]) -> str | None:
    if torch_parametrize.is_parametrized(module, "weight"):
        return "weight already has another parametrization"
    if isinstance(parents.get(name), nn.MultiheadAttention):
        return "projection inside nn.MultiheadAttention (its packed in_proj_weight is used directly)"
    hooked = _weight_hook_reason(module)
    if hooked:
        return hooked
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "weight is not initialized yet (a lazy layer): run one forward pass before converting"
    if not isinstance(weight, torch.Tensor):
        return "no weight tensor"
    if weight.numel() == 0:
        return f"weight of shape {tuple(weight.shape)} is empty"
    if id(weight) in shared:
        return "weight is tied/shared with another module"
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not floating point"
    if isinstance(module, nn.Embedding) and module.sparse:
        return "sparse embedding gradients are not supported"
    return None


def _readable_weight_reason(module: nn.Module) -> str | None:
    """Why a supported layer's weight cannot be read as a matrix W (None if it can): parametrized weights (an
    SVDP/STTP weight, ``spectral_norm``) are read through ``module.weight``."""
    if torch_parametrize.is_parametrized(module, "weight"):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return "no initialized weight tensor"
    if weight.numel() == 0:
        return f"weight of shape {tuple(weight.shape)} is empty"
    if not weight.is_floating_point() or weight.dim() < 2:
        return f"weight ({weight.dtype}, {weight.dim()}-d) is not a floating-point matrix"
    return None


def _check_patterns(modules: list[tuple[str, nn.Module]], includes: list, excludes: list) -> None:
    """Every include/exclude pattern must match at least one module of the model."""
    for kind, patterns in (("include", includes), ("exclude", excludes)):
        for pat in patterns:
            if not any(matches(n, m, [pat]) for n, m in modules):
                what = pat.__name__ if isinstance(pat, type) else repr(pat)
                raise ValueError(f"{kind} pattern {what} matches no module; names look like "
                                 f"{[n for n, _ in modules[1:4]]}")


def _check_rank_map(modules: list[tuple[str, nn.Module]], rank_map: Mapping[str, int]) -> None:
    """A rank mapping names supported layers of the model, each with a valid rank."""
    names = dict(modules)
    unknown = [n for n in rank_map if n not in names]
    if unknown:
        raise ValueError(f"rank mapping names layers not in the model: {unknown}")
    unsupported = [n for n in rank_map if not isinstance(names[n], SUPPORTED_TYPES)]
    if unsupported:
        raise ValueError("rank mapping names modules that are not supported layers: "
                         + ", ".join(f"{n!r} ({type(names[n]).__name__})" for n in unsupported))
    check_ranks(rank_map)


def conversion_blockers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, reason) of every module of ``model`` whose class declares ``conversion_blocked``, a string saying why
    a model holding it cannot be converted and what to do (adapter layers: converting the layer they wrap would lose
    what they add). Name "" is the model itself."""
    return [(name, reason) for name, module in model.named_modules()
            if isinstance(reason := getattr(type(module), "conversion_blocked", None), str)]


def _conversion_skip_reasons(model: nn.Module, modules: list[tuple[str, nn.Module]]):
    """``reason(name, module)``: why :func:`torch_sttp.convert` leaves a supported layer alone (None: it converts)."""
    counts: dict[int, int] = {}
    for m in model.modules():
        for t in m.parameters(recurse=False):
            counts[id(t)] = counts.get(id(t), 0) + 1
    shared = {k for k, c in counts.items() if c > 1}
    parents = {f"{pname}.{cname}" if pname else cname: parent
               for pname, parent in modules for cname, _ in parent.named_children()}
    return lambda name, module: _skip_reason(name, module, shared, parents)


def select_layers(model: nn.Module, include=None, exclude=None, rank_map: Mapping[str, int] | None = None,
                  inspect: bool = False):
    """Supported layers of ``model`` selected by ``include``/``exclude`` (globs or types) and, if given, the keys of
    ``rank_map``; returns ``(selected, skipped)`` with selected = [(name, layer)] in ``named_modules`` order and
    skipped = [(name, type name, reason)] for supported layers left out.

    By default (``inspect=False``) the layers :func:`torch_sttp.convert` reparameterizes: tied weights,
    MultiheadAttention projections, already-parametrized weights, … are skipped. With ``inspect=True`` (the spectral
    tools) every supported layer whose weight reads as a matrix W: dense layers (tied, inside MultiheadAttention or
    under another parametrization such as ``spectral_norm`` included) and SVDP/STTP layers; only layers without an
    initialized floating-point weight matrix are skipped.

    Raises ValueError for a pattern that matches no module and for a rank mapping naming unknown or unsupported
    modules or holding an invalid rank.
    """
    includes, excludes = as_patterns(include), as_patterns(exclude)
    modules = list(model.named_modules())
    _check_patterns(modules, includes, excludes)
    if rank_map is not None:
        _check_rank_map(modules, rank_map)
    reason_of = ((lambda name, module: _readable_weight_reason(module)) if inspect
                 else _conversion_skip_reasons(model, modules))
    selected, skipped = [], []
    for name, module in modules:
        if not isinstance(module, SUPPORTED_TYPES):
            reason = None if inspect else _unsupported_reason(module)
            if reason and not (excludes and matches(name, module, excludes)):
                _refuse_if_named(name, module, reason, includes, rank_map)
                skipped.append((name, type(module).__name__, reason))
            continue
        if includes and not matches(name, module, includes):
            continue
        if excludes and matches(name, module, excludes):
            continue
        if rank_map is not None and name not in rank_map:
            continue
        reason = reason_of(name, module)
        if reason:
            _refuse_if_named(name, module, reason, includes, rank_map)
            skipped.append((name, type(module).__name__, reason))
            continue
        selected.append((name, module))
    if rank_map is not None:
        _refuse_filtered(rank_map, selected, skipped, includes, excludes)
    return selected, skipped


def _refuse_filtered(rank_map: Mapping[str, int], selected, skipped, includes, excludes) -> None:
    """A layer given a rank (a rank mapping or plan) that include/exclude leave out is refused, not dropped."""
    kept = {n for n, _ in selected} | {n for n, _, _ in skipped}
    dropped = [n for n in rank_map if n not in kept]
    if dropped:
        by = " and ".join(f"{w}={list(map(str, p))}" for w, p in (("include", includes), ("exclude", excludes)) if p)
        raise ValueError(f"layer {dropped[0]!r} has a rank in the mapping (or plan), but the patterns ({by}) leave "
                         "it out; drop it from the mapping, or from the patterns")


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a module with weights of its own that is not a supported layer is listed as skipped (None: not listed)."""
    for kind, reason in _UNSUPPORTED_TYPES.items():
        if isinstance(module, kind):
            return reason
    return None


def _refuse_if_named(name: str, module: nn.Module, reason: str, includes: list, rank_map) -> None:
    """A layer that ``include`` names exactly (no glob) or that a rank mapping lists cannot be skipped silently."""
    if name in [p for p in includes if isinstance(p, str)] or (rank_map is not None and name in rank_map):
        raise ValueError(f"layer {name!r} ({type(module).__name__}) was named for conversion but cannot be "
                         f"converted: {reason}")
