"""Export of converted models back to plain PyTorch layers.

    >>> torch_sttp.to_dense(model)          # each layer its plain class again, W materialised: same outputs
    >>> torch_sttp.to_factorized(model)     # each layer two plain low-rank layers (torch.export-able)

Both work in place and return the model; afterwards nothing of torch-sttp is left on it (layer classes, planner,
hooks), so the result saves and loads as any plain model.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from .modules import SpectralLayer, has_own_forward, original_class
from .parametrizations import fixed_row, parametrization_tensors, spectral_parametrization
from .surgery import conversion_hook_ids, converted_layers, detach_conversion

__all__ = ["to_dense", "to_factorized", "factorized_pair"]


def _finish(model: nn.Module) -> None:
    """Plain classes for layers whose parametrization was removed by hand, then the model's conversion record."""
    for module in model.modules():
        if isinstance(module, SpectralLayer) and not torch_parametrize.is_parametrized(module):
            module.detach_state()
            module.__class__ = original_class(module)
    detach_conversion(model)


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every SVDP/STTP weight by its materialised dense weight, restoring plain layer classes (in place).
    Each weight is an ``nn.Parameter`` that requires grad as the layer's tensors did (also under ``no_grad``)."""
    for _, module in converted_layers(model):
        _to_plain(module)
    _finish(model)
    return model


def _trains(module: nn.Module) -> bool:
    """Whether the converted weight of ``module`` trains (any of its parametrization tensors requires grad)."""
    return any(t.requires_grad for t in parametrization_tensors(module))


def _to_plain(module: nn.Module) -> None:
    """Materialise ``module``'s weight as a parameter (trainable as its tensors were) and give it back its
    original class."""
    base, cls, trains = original_class(module), module.__class__, _trains(module)
    # remove_parametrizations edits the class in place, and copy.deepcopy shares that class between a model and
    # its copies: work on a private class so that exporting a copy leaves the original model intact
    module.__class__ = type(cls.__name__, cls.__bases__,
                            {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
    torch_parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    # torch leaves a weight that does not require grad (frozen tensors, or under no_grad) as a buffer
    weight = module.weight.detach()
    del module.weight
    module.weight = nn.Parameter(weight, requires_grad=trains)
    if isinstance(module, SpectralLayer):
        module.detach_state()
    module.__class__ = base


def _exports_dense(module: nn.Module) -> bool:
    """Whether ``module`` keeps its own object when exported (dense): a subclass of a torch layer with a forward of
    its own (it may do more than the layer's) or a module with forward or backward hooks, which a new pair of
    layers would drop."""
    own = conversion_hook_ids(module)  # a converted root holds the planner's hooks
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return has_own_forward(original_class(module)) or any(key not in own for h in hooks for key in h)


def factorized_pair(module: nn.Module) -> nn.Sequential | None:
    """Two plain layers computing what the converted ``module`` computes — (first, second) with W = second ∘ first:
    Linear(d_in→r)·Linear(r→d_out), r-filter conv·1×1 conv, Embedding(·, r)·Linear(r→dim) — or None where no such
    pair exists (grouped convs, max_norm / scale_grad_by_freq embeddings)."""
    p = spectral_parametrization(module)
    with torch.no_grad():
        u, sigma, vt = p.factors(*parametrization_tensors(module))
        us = u if sigma is None else u * sigma
    kw = {"dtype": us.dtype, "device": us.device}
    if isinstance(module, nn.Linear):
        pair = _linear_pair(module, p.r_mid, us, vt, kw)
    elif isinstance(module, nn.Embedding):
        pair = _embedding_pair(module, p.r_mid, us, vt, kw)
    elif isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        pair = _conv_pair(module, p.r_mid, us, vt, kw)
    else:
        return None
    if pair is not None and getattr(module, "bias", None) is not None:
        pair[1].bias.data.copy_(module.bias.detach())
    return pair


def _linear_pair(module: nn.Linear, r: int, us, vt, kw) -> nn.Sequential:
    first = nn.Linear(module.in_features, r, bias=False, **kw)
    second = nn.Linear(r, module.out_features, bias=module.bias is not None, **kw)
    first.weight.data.copy_(vt)
    second.weight.data.copy_(us)
    return nn.Sequential(first, second)


def _embedding_pair(module: nn.Embedding, r: int, us, vt, kw) -> nn.Sequential | None:
    """Embedding(·, r) · Linear(r → dim); with ``padding_idx`` only when the fixed padding row is zero (a zero row of
    the first factor keeps it so, and receives no gradient), else None (the layer is exported dense)."""
    if module.max_norm is not None or module.scale_grad_by_freq:
        return None
    if module.padding_idx is not None:
        if bool(fixed_row(module).any()):
            return None
    first = nn.Embedding(module.num_embeddings, r, padding_idx=module.padding_idx, **kw)
    second = nn.Linear(r, module.embedding_dim, bias=False, **kw)
    first.weight.data.copy_(us)
    if module.padding_idx is not None:
        first.weight.data[module.padding_idx] = 0
    second.weight.data.copy_(vt.mT)
    return nn.Sequential(first, second)


def _conv_pair(module: nn.modules.conv._ConvNd, r: int, us, vt, kw) -> nn.Sequential:
    nd = len(module.kernel_size)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    filters = vt.reshape(r, module.in_channels, *module.kernel_size)
    if module.transposed:
        tcls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
        first = tcls(module.in_channels, r, module.kernel_size, module.stride, module.padding,
                     module.output_padding, 1, False, module.dilation, **kw)
        first.weight.data.copy_(filters.transpose(0, 1))
    else:
        first = conv_cls(module.in_channels, r, module.kernel_size, module.stride, module.padding,
                         module.dilation, 1, False, module.padding_mode, **kw)
        first.weight.data.copy_(filters)
    second = conv_cls(r, module.out_channels, 1, bias=module.bias is not None, **kw)
    second.weight.data.copy_(us.reshape(module.out_channels, r, *([1] * nd)))
    return nn.Sequential(first, second)


def to_factorized(model: nn.Module) -> nn.Module:
    """Replace each converted layer by two plain low-rank layers (in place where possible; returns the model).

    Linear → Linear(d_in→r) · Linear(r→d_out); Conv → r-filter conv · 1×1 conv; ConvTranspose → r-channel
    transposed conv · 1×1 conv; Embedding → Embedding(·, r) · Linear(r→dim). Grouped convs, max_norm embeddings and
    embeddings whose fixed padding row is not zero become dense layers, and so do subclasses of the torch layers
    with a forward of their own and layers with hooks (each keeps its own object, whose forward and hooks a new
    pair would drop). A layer held under several names is replaced at all of them. The pairs keep the layer's
    ``requires_grad`` flags and training mode. The result holds only plain modules (``torch.export``-able); a transposed conv's pair takes no
    ``output_size`` (call it with the input alone, or export that layer with :func:`to_dense`).
    """
    pairs = [(name, module, None if _exports_dense(module) else factorized_pair(module))
             for name, module in converted_layers(model)]
    for name, module, pair in pairs:
        if pair is None:
            _to_plain(module)
            continue
        _match_state(pair, module)
        if name == "":
            _finish(model)
            return pair
        for alias in [n for n, m in model.named_modules(remove_duplicate=False) if m is module]:
            parent_name, _, child = alias.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, pair)
    _finish(model)
    return model


def _match_state(pair: nn.Sequential, module: nn.Module) -> None:
    """The pair trains as the converted layer did (its weight factors as its tensors, its bias as its bias) and is
    in the same training/eval mode."""
    trains = _trains(module)
    for layer in pair:
        layer.weight.requires_grad_(trains)
    if getattr(module, "bias", None) is not None:
        pair[1].bias.requires_grad_(module.bias.requires_grad)
    pair.train(module.training)
