"""Adapters on a whole model: :func:`add_adapters` and the lifecycle around it (active adapter, disabling, merge,
unload, delete), and the one :class:`AdapterRecord` that owns what adapters attach to a model (the planners, their
root forward hooks, each adapter's :class:`AdapterInfo`, the parameters' original ``requires_grad`` flags), reached
through :func:`adapter_record`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..layers import as_patterns, matches
from ..options import check_method, check_option, check_rank
from ..parametrizations import SpectralParametrization
from ..planner import FramePlanner
from .layer import AdapterLayer, TrainableCopies
from .ops import SUPPORTED_NAMES, is_weight_layer, layer_ops
from .updates import ReflectorPlanner, RotationUpdate, SpectralUpdate, begin_forward_in_full_precision

__all__ = ["AdapterInfo", "LayerInfo", "AdapterRecord", "ParameterCounts", "add_adapters", "adapter_record",
           "adapter_info", "adapter_names", "active_adapter", "set_active_adapter", "adapters_disabled",
           "merge_adapters", "unload_adapters", "delete_adapter", "adapter_layers", "trainable_copies",
           "parameter_counts",
           "add_adapters_to_layers", "targetable_modules"]

_RECORD = "_sttp_adapters"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class LayerInfo:
    """One adapted layer: its type, weight shape, and the rank used (clamped to its dimensions)."""

    type: str
    weight_shape: tuple
    rank: int
    rank_out: int = 0


@dataclass
class AdapterInfo:
    """What :func:`add_adapters` did for one adapter name: its settings, the adapted layers, the ranks clamped to a
    layer's dimensions ``(layer, requested, used)``, the targeted modules left alone ``(name, type, reason)`` and
    the modules trained whole (``trainable``)."""

    name: str
    kind: str
    method: str
    rank: int
    two_sided: bool
    seed: int
    target: list
    exclude: list
    trainable: list
    layers: dict = field(default_factory=dict)
    clamped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


@dataclass
class AdapterRecord:
    """What adapters attach to a model (one object under one attribute)."""

    frame_planner: FramePlanner
    reflector_planner: ReflectorPlanner
    hooks: tuple
    requires_grad: list  # (parameter, flag) of every parameter before the first adapter
    infos: dict = field(default_factory=dict)
    active: str | None = None
    disabled: bool = False


class ParameterCounts(NamedTuple):
    """Trainable (``requires_grad``) and total parameter entries of a model, each tensor counted once."""

    trainable: int
    total: int


class _Target(NamedTuple):
    name: str
    module: nn.Module   # the module at ``name`` now: the base layer, or its AdapterLayer
    base: nn.Module
    ops: object


def adapter_record(model: nn.Module) -> AdapterRecord | None:
    """The :class:`AdapterRecord` of a model with adapters, or None."""
    return model.__dict__.get(_RECORD)


def _require(model: nn.Module, what: str) -> AdapterRecord:
    record = adapter_record(model)
    if record is None:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's wrapper
        if isinstance(inner, nn.Module) and adapter_record(inner) is not None:
            raise ValueError(f"{what}: this is torch.compile's wrapper, which holds no adapters itself; pass the "
                             "uncompiled model (compiled._orig_mod, or the model you compiled)")
        raise ValueError(f"{what}: the model has no adapters (add them with torch_sttp.add_adapters(model, ...))")
    return record


def _require_name(record: AdapterRecord, name: str | None, what: str) -> str:
    name = record.active if name is None else name
    if name not in record.infos:
        raise ValueError(f"{what}: no adapter named {name!r}; the model has {sorted(record.infos)}")
    return name


# ------------------------------------------------------------------------------------------------- add
def add_adapters(model: nn.Module, kind: str, method: str = "svdp", rank: int = 8, target=None, exclude=None,
                 name: str = "default", trainable=(), two_sided: bool = False, seed: int = 0) -> nn.Module:
    """Add an adapter named ``name`` to every targeted layer of ``model`` (in place) and make it the active one;
    every other parameter is frozen except those of the modules named in ``trainable``; returns ``model``.

    Kinds (W is a layer's weight as the matrix (d_out, d_in), d_in = C_in·∏kernel for a conv):

    * ``"principal"`` — W' = W_res + U(θ)·Σ·V(θ)ᵀ, (θ₀, Σ₀) the rank-r projection of W (truncated SVD for
      ``method="svdp"``, TT-SVD for ``"sttp"``), W_res = W − U(θ₀)Σ₀V(θ₀)ᵀ frozen; U, V, Σ train.
    * ``"delta"`` — W' = W + U·diag(s)·Vᵀ, s = 0 and U, V random orthonormal frames (QR of a Gaussian) at init.
    * ``"rotation"`` — W' = W·H (``two_sided``: H_out·W·H), H a product of ``rank`` Householder reflectors, the
      identity at init (reflectors in equal pairs: ``rank`` must be even); ``method`` does not apply (only its
      default is accepted).

    The outputs equal the pretrained model's at init. ``target`` / ``exclude``: globs on qualified names (a pattern
    without a dot also matches as a last-name suffix: ``"query"`` matches ``"encoder.layer.0.attention.self.query"``)
    or layer types, a pattern that matches a container standing for the weight layers inside it; by default every
    supported layer (Linear, Conv1d/2d/3d, Embedding, transformers Conv1D). Ranks
    above a layer's dimensions are clamped (:attr:`AdapterInfo.clamped`); targeted modules that cannot carry an
    adapter are listed in :attr:`AdapterInfo.skipped` (:func:`adapter_info`). ``trainable``: names of modules trained
    whole under this adapter (PEFT's ``modules_to_save``, e.g. a new classifier head), each a copy of the original.
    ``seed`` seeds the random frames and reflectors.
    """
    settings = _check_settings(model, kind, method, rank, name, two_sided, seed)
    return _add(model, settings, target, exclude, trainable, exact=None, initialize=True)


def add_adapters_to_layers(model: nn.Module, layers, kind: str, method: str = "svdp", rank: int = 8,
                           name: str = "default", trainable=(), two_sided: bool = False, seed: int = 0,
                           initialize: bool = True) -> nn.Module:
    """:func:`add_adapters` on exactly the layers named in ``layers`` (qualified names, no patterns);
    ``initialize=False`` skips the projection of "principal" (for tensors about to be loaded)."""
    settings = _check_settings(model, kind, method, rank, name, two_sided, seed)
    known = {n for n, _, _ in targetable_modules(model)}
    unknown = [n for n in layers if n not in known]
    if unknown:
        raise ValueError(f"layers {unknown} are not in the model (its modules are named like "
                         f"{sorted(known - {''})[:6]})")
    return _add(model, settings, None, None, trainable, exact=set(layers), initialize=initialize)


def _check_settings(model, kind, method, rank, name, two_sided, seed) -> dict:
    check_option("adapter kind", kind)
    check_method(method)
    check_rank(rank)
    if kind == "rotation" and rank % 2:
        use = f"{rank + 1}" if rank == 1 else f"{rank - 1} or {rank + 1}"
        raise ValueError(f"rotation adapters start at the identity with reflectors in equal pairs, so rank must be "
                         f"even; got rank={rank} (use {use})")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"adapter name must be a non-empty string of letters, digits, '_' or '-', got {name!r}")
    record = adapter_record(model)
    if record is not None and name in record.infos:
        raise ValueError(f"the model already has an adapter named {name!r}; choose another name, or remove it first "
                         f"with torch_sttp.adapters.delete_adapter(model, {name!r})")
    if kind != "rotation" and two_sided:
        raise ValueError(f"two_sided applies to rotation adapters only, not to kind {kind!r}")
    if kind == "rotation" and method != "svdp":
        raise ValueError(f"method={method!r} does not apply to rotation adapters (Householder reflectors, no SVDP/STTP "
                         "factors); leave method at its default")
    return {"name": name, "kind": kind, "method": method, "rank": rank, "two_sided": bool(two_sided),
            "seed": int(seed)}


def _add(model, settings: dict, target, exclude, trainable, exact, initialize: bool) -> nn.Module:
    _check_one_root(model)
    trainable_names = _trainable_names(model, trainable) if exact is None else _exact_names(model, trainable)
    selected, skipped = _select(model, target, exclude, trainable_names, exact)
    if exact is not None and skipped:
        n, kind, why = skipped[0]
        raise ValueError(f"layer {n!r} ({kind}) cannot carry the adapter: {why}")
    on_meta = [n for n in [t.name for t in selected] + trainable_names
               if any(q.is_meta for q in model.get_submodule(n).parameters())]
    if on_meta:
        raise ValueError(f"module {on_meta[0]!r} has its weights on the meta device; adapters start from the "
                         "pretrained weights, so load them first (model.to_empty(device=...) and "
                         "load_state_dict), then add the adapters")
    if settings["kind"] == "rotation":  # a pair of reflectors needs an input space of dimension ≥ 2
        narrow = [t for t in selected if t.ops.matrix(t.base).shape[1] < 2]
        skipped += [(t.name, type(t.base).__name__, "input dimension 1 leaves no room for a pair of reflectors")
                    for t in narrow]
        selected = [t for t in selected if t not in narrow]
    if not selected:
        detail = "; ".join(f"{n!r}: {why}" for n, _, why in skipped[:5])
        raise ValueError("no layer can carry the adapter" + (f" (skipped: {detail})" if detail else "")
                         + f"; supported layers: {SUPPORTED_NAMES}")
    generator = torch.Generator().manual_seed(settings["seed"])
    info = AdapterInfo(target=_pattern_names(target), exclude=_pattern_names(exclude), trainable=trainable_names,
                       skipped=skipped, **settings)
    built = [_build(t, settings, generator, initialize, info) for t in selected]
    record = adapter_record(model) or _attach_record(model)
    for t, adapter in zip(selected, built):
        _install(model, record, t, settings["name"], adapter)
    for module_name in trainable_names:
        _install_copy(model, module_name, settings["name"])
    record.infos[settings["name"]] = info
    set_active_adapter(model, settings["name"])
    if settings["kind"] == "principal" and initialize:
        with torch.no_grad(), record.frame_planner.forward_pass():
            for adapter in built:
                adapter.set_initial(record.frame_planner.factors(adapter))
    return model


def _pattern_names(patterns) -> list[str]:
    return [p.__name__ if isinstance(p, type) else str(p) for p in as_patterns(patterns)]


def _build(t: _Target, settings: dict, generator, initialize: bool, info: AdapterInfo) -> nn.Module:
    """A layer's adapter module (nothing in the model changes); records its ranks in ``info``."""
    weight = t.base.weight
    rank, kind = settings["rank"], settings["kind"]
    matrix = t.ops.matrix(t.base)
    d_out, d_in = matrix.shape
    if kind == "rotation":
        r_in = min(rank, d_in - d_in % 2)
        r_out = min(rank, d_out - d_out % 2) if settings["two_sided"] else 0
        for used in (r_in,) + ((r_out,) if settings["two_sided"] else ()):
            if used < rank:
                info.clamped.append((t.name, rank, used))
        info.layers[t.name] = LayerInfo(t.ops.name, tuple(weight.shape), r_in, r_out)
        return RotationUpdate(d_in, r_in, d_out, r_out, generator, weight.dtype, weight.device)
    layout = t.ops.layout_shape(t.base)
    p = SpectralParametrization(layout, rank, settings["method"], "free")
    if p.r_mid < rank:
        info.clamped.append((t.name, rank, p.r_mid))
    info.layers[t.name] = LayerInfo(t.ops.name, tuple(weight.shape), p.r_mid)
    if kind == "principal" and initialize:
        tensors = p.right_inverse(matrix.detach().reshape(layout))
    else:
        u, v, s = p.initial_parameters("random", generator=generator, dtype=weight.dtype, device=weight.device)
        tensors = (u, v, torch.zeros_like(s))
    return SpectralUpdate(kind, p, tuple(x.to(dtype=weight.dtype, device=weight.device) for x in tensors))


def _attach_record(model: nn.Module) -> AdapterRecord:
    """A new record with its planners and root hooks; every parameter frozen (flags kept for unload)."""
    frames, reflectors = FramePlanner("shape"), ReflectorPlanner()
    hooks = (model.register_forward_pre_hook(functools.partial(begin_forward_in_full_precision, frames)),
             model.register_forward_pre_hook(functools.partial(begin_forward_in_full_precision, reflectors)),
             model.register_forward_hook(frames.end_forward, always_call=True),
             model.register_forward_hook(reflectors.end_forward, always_call=True))
    params = list(model.parameters())
    record = AdapterRecord(frames, reflectors, hooks, [(p, p.requires_grad) for p in params])
    for p in params:
        p.requires_grad_(False)
    model.__dict__[_RECORD] = record
    return record


def _install(model: nn.Module, record: AdapterRecord, t: _Target, name: str, adapter: nn.Module) -> None:
    layer = t.module
    if not isinstance(layer, AdapterLayer):
        layer = AdapterLayer(t.base, t.ops, record.frame_planner, record.reflector_planner)
        model.set_submodule(t.name, layer)
    layer.adapters[name] = adapter
    if isinstance(adapter, SpectralUpdate):
        record.frame_planner.add(adapter, f"{t.name} (adapter {name!r})")
    else:
        record.reflector_planner.add(adapter)


def _install_copy(model: nn.Module, module_name: str, name: str) -> None:
    holder = model.get_submodule(module_name)
    if not isinstance(holder, TrainableCopies):
        holder = TrainableCopies(holder)
        model.set_submodule(module_name, holder)
    holder.copies[name] = copy.deepcopy(holder.original)


# ------------------------------------------------------------------------------------------------ selection
def targetable_modules(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(qualified name, module at that name, the module a pattern sees) for every module: adapter layers and trainable
    copies stand for the module they wrap, and nothing inside them is listed."""
    out = []

    def walk(prefix: str, module: nn.Module) -> None:
        seen = module.base_layer if isinstance(module, AdapterLayer) else (
            module.original if isinstance(module, TrainableCopies) else module)
        out.append((prefix, module, seen))
        if seen is module:
            for child_name, child in module.named_children():
                walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", model)
    return out


def _matches(name: str, module: nn.Module, patterns) -> bool:
    suffixes = [f"*.{p}" for p in patterns if isinstance(p, str) and "." not in p]
    return matches(name, module, patterns) or matches(name, module, suffixes)


def _check_patterns(named, what: str, patterns) -> None:
    for pat in patterns:
        if not any(_matches(n, seen, [pat]) for n, _, seen in named):
            supported = [n for n, _, seen in named if n and layer_ops(seen)[0] is not None]
            shown = supported[:12] + ([f"… ({len(supported)} in all)"] if len(supported) > 12 else [])
            label = pat.__name__ if isinstance(pat, type) else repr(pat)
            if what == "trainable":  # any module can be trained whole
                modules = [n for n, _, _ in named if n and "." not in n]
                raise ValueError(f"trainable pattern {label} matches no module; the model's top-level modules are "
                                 f"{modules[:12]}")
            raise ValueError(f"{what} pattern {label} matches no module; the layers that can carry adapters are "
                             f"{shown}")


def _trainable_names(model: nn.Module, trainable) -> list[str]:
    named = targetable_modules(model)
    patterns = as_patterns(trainable)
    _check_patterns(named, "trainable", patterns)
    names = [n for n, _, seen in named if n and patterns and _matches(n, seen, patterns)]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    _check_no_adapter_layers(model, names)
    return names


def _exact_names(model: nn.Module, names) -> list[str]:
    known = {n for n, _, _ in targetable_modules(model)}
    unknown = [n for n in as_patterns(names) if n not in known]
    if unknown:
        raise ValueError(f"trainable modules {unknown} are not in the model")
    names = list(as_patterns(names))
    _check_no_adapter_layers(model, names)
    return names


def _check_no_adapter_layers(model: nn.Module, names: list[str]) -> None:
    """Refuse trainable modules that hold adapter layers (of any adapter)."""
    for n in names:
        module = model.get_submodule(n)
        if isinstance(module, AdapterLayer) or any(isinstance(m, AdapterLayer) for m in module.modules()):
            raise ValueError(f"trainable module {n!r} holds adapter layers; a module trained whole cannot also "
                             "carry adapters (train it under another adapter name, or unload first)")


def _check_one_root(model: nn.Module) -> None:
    """Refuse a model whose submodules carry adapters recorded elsewhere: on a submodule of their own (a record
    there), or of an enclosing model (adapter layers here, no record)."""
    own = adapter_record(model) is not None
    inner = [n for n, m in model.named_modules() if n and adapter_record(m) is not None]
    if inner and own:
        raise ValueError(f"submodule {inner[0]!r} has adapters of its own (added on it directly); add every "
                         f"adapter on one root: unload those of {inner[0]!r} first, or keep adding to it")
    if inner:
        raise ValueError(f"submodule {inner[0]!r} already has adapters (added with add_adapters(model.{inner[0]}, "
                         f"...)); add every adapter on one root: keep adding to {inner[0]!r}, or unload its adapters "
                         "and add them all on this model")
    held = [n for n, m in model.named_modules() if isinstance(m, (AdapterLayer, TrainableCopies))]
    if held and not own:
        raise ValueError(f"module {held[0]!r} carries adapters of an enclosing model; add adapters on that model "
                         "(the one add_adapters was called on)")


def _select(model, target, exclude, trainable_names: list[str], exact) -> tuple[list[_Target], list]:
    """The layers to adapt, and the targeted modules left alone (name, type, reason)."""
    named = targetable_modules(model)
    targets, excludes = as_patterns(target), as_patterns(exclude)
    _check_patterns(named, "target", targets)
    _check_patterns(named, "exclude", excludes)
    counts: dict[int, int] = {}
    for _, _, seen in named:
        for p in seen.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    # a container matched by a target (exclude) pattern stands for the weight layers inside it
    containers = _containers(named, targets) if exact is None else []
    left_out = _containers(named, excludes)
    selected, skipped = [], []
    for n, module, seen in named:
        inside = any(n.startswith(c + ".") for c in containers)
        picked = n in exact if exact is not None else (_matches(n, seen, targets) or inside if targets else True)
        if not picked or (excludes and _matches(n, seen, excludes)) or any(n.startswith(c + ".") for c in left_out):
            continue
        ops, reason = layer_ops(seen)
        if ops is None and not is_weight_layer(seen) and (exact is None and not targets or inside):
            continue  # by default (and inside a targeted container) only weight layers are considered
        if ops is None and _is_container(seen):
            continue  # a container matched by a pattern: its layers are considered one by one (above)
        if reason is None and isinstance(module, TrainableCopies):
            owners = sorted(module.copies)
            reason = (f"trained whole under adapter{'s' if len(owners) > 1 else ''} {', '.join(map(repr, owners))} "
                      "(trainable), so it cannot also carry an adapter")
        reason = reason or _placement_reason(n, named, seen, counts, trainable_names)
        if reason:
            skipped.append((n or "<root>", type(seen).__name__, reason))
        else:
            selected.append(_Target(n, module, seen, ops))
    return selected, skipped


def _is_container(module: nn.Module) -> bool:
    """A module with children that is not itself a weight layer."""
    return next(module.children(), None) is not None and not is_weight_layer(module)


def _containers(named, patterns) -> list[str]:
    """Names of the containers that ``patterns`` match."""
    return [n for n, _, seen in named if n and patterns and _matches(n, seen, patterns) and _is_container(seen)]


def _placement_reason(name: str, named, module: nn.Module, counts: dict, trainable_names) -> str | None:
    if not name:
        return "the root module cannot be replaced by an adapter layer; wrap it in a container"
    if any(name == t or name.startswith(t + ".") for t in trainable_names):
        return "inside a module listed in trainable (it is trained whole)"
    parent = next((seen for n, _, seen in named if n == name.rpartition(".")[0]), None)
    if isinstance(parent, nn.MultiheadAttention):
        return "projection inside nn.MultiheadAttention (it reads the weight directly)"
    if any(counts.get(id(p), 0) > 1 for p in module.parameters(recurse=False)):
        return "weight is tied/shared with another module"
    if sum(1 for _, _, seen in named if seen is module) > 1:
        return "the module appears under several names"
    return None


# ------------------------------------------------------------------------------------------------ lifecycle
def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(qualified name, :class:`AdapterLayer`) of every adapted layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def trainable_copies(model: nn.Module) -> list[tuple[str, TrainableCopies]]:
    """(qualified name, :class:`TrainableCopies`) of every module trained whole under the adapters."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableCopies)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    record = adapter_record(model)
    return list(record.infos) if record is not None else []


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter that runs (None without adapters)."""
    record = adapter_record(model)
    return record.active if record is not None else None


def adapter_info(model: nn.Module, name: str | None = None) -> AdapterInfo:
    """The :class:`AdapterInfo` of adapter ``name`` (default: the active one)."""
    record = _require(model, "adapter_info")
    return record.infos[_require_name(record, name, "adapter_info")]


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Run adapter ``name`` from now on: its parameters (and its trainable copies) train, the other adapters'
    are frozen."""
    record = _require(model, "set_active_adapter")
    record.active = _require_name(record, name, "set_active_adapter")
    _push_state(model, record)


def _push_state(model: nn.Module, record: AdapterRecord, flags: bool = True) -> None:
    """Hand the record's active name (None while disabled) to every adapter layer, adapter and trainable copy;
    with ``flags``, the active adapter's tensors train and the others' are frozen (not when only disabling, which
    leaves tensors the user froze by hand as they are)."""
    running = None if record.disabled else record.active
    for _, layer in adapter_layers(model):
        layer.active = running
        for n, adapter in layer.adapters.items():
            adapter.enabled = n == running
            if flags:
                adapter.requires_grad_(n == record.active)
    for _, holder in trainable_copies(model):
        holder.active = running
        for n, module in holder.copies.items():
            if flags:
                module.requires_grad_(n == record.active)
    record.frame_planner.invalidate()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within this context the model computes its base outputs (no adapter runs; trainable modules are the
    originals), e.g. for the reference model of preference tuning."""
    record = _require(model, "adapters_disabled")
    previous = record.disabled
    record.disabled = True
    _push_state(model, record, flags=False)
    try:
        yield model
    finally:
        record.disabled = previous
        _push_state(model, record, flags=False)


def unload_adapters(model: nn.Module) -> nn.Module:
    """Remove every adapter: the original layers and modules come back (the same objects, weights untouched) with
    their original ``requires_grad`` flags; returns ``model``."""
    record = _require(model, "unload_adapters")
    for n, layer in adapter_layers(model):
        model.set_submodule(n, layer.base_layer)
    for n, holder in trainable_copies(model):
        model.set_submodule(n, holder.original)
    _detach_record(model, record)
    return model


def _detach_record(model: nn.Module, record: AdapterRecord) -> None:
    for handle in record.hooks:
        handle.remove()
    for p, flag in record.requires_grad:
        p.requires_grad_(flag)
    model.__dict__.pop(_RECORD, None)


def merge_adapters(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter ``name`` (default: the active one) into plain layers: each adapted layer gets its original
    class back with the weight W' (a new parameter; the pretrained tensor is not modified), its trainable modules
    become the adapter's copies, and every adapter is removed; returns ``model``.

    Raises ValueError naming the layer, with the model unchanged, when an adapted weight is not finite.
    """
    record = _require(model, "merge_adapters")
    name = _require_name(record, name, "merge_adapters")
    merged = {}
    with torch.no_grad():
        for n, layer in adapter_layers(model):
            if name in layer.adapters:
                weight = layer.adapted_weight(name)
                tensors = [weight] + list(layer.adapters[name].state_dict().values())
                if not all(bool(torch.isfinite(t).all()) for t in tensors):
                    raise ValueError(f"layer {n!r}: adapter {name!r} holds NaN or inf (in its tensors or the weight "
                                     "they give, e.g. after a diverged step); nothing was merged — restore a good "
                                     "checkpoint of the adapter")
                merged[n] = weight
    trained = {n: holder.copies[name] for n, holder in trainable_copies(model) if name in holder.copies}
    flags = {id(p): flag for p, flag in record.requires_grad}
    unload_adapters(model)
    for n, weight in merged.items():
        layer = model.get_submodule(n)
        layer.weight = nn.Parameter(weight, requires_grad=flags.get(id(layer.weight), True))
    for n, module in trained.items():
        original = model.get_submodule(n)
        for p, q in zip(module.parameters(), original.parameters()):
            p.requires_grad_(q.requires_grad)
        model.set_submodule(n, module)
    return model


def delete_adapter(model: nn.Module, name: str, activate: str | None = None) -> nn.Module:
    """Remove adapter ``name``; layers left without adapters get their base layer back, and without any adapter
    the model is as :func:`unload_adapters` leaves it. The active adapter stays active; if it was ``name``,
    ``activate`` (default: the first one left) becomes active."""
    record = _require(model, "delete_adapter")
    name = _require_name(record, name, "delete_adapter")
    for n, layer in adapter_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            (record.frame_planner if isinstance(adapter, SpectralUpdate) else record.reflector_planner).remove(adapter)
            del layer.adapters[name]
        if not len(layer.adapters):
            model.set_submodule(n, layer.base_layer)
    for n, holder in trainable_copies(model):
        if name in holder.copies:
            del holder.copies[name]
        if not len(holder.copies):
            model.set_submodule(n, holder.original)
    del record.infos[name]
    if not record.infos:
        _detach_record(model, record)
        return model
    if record.active not in record.infos:
        record.active = activate if activate in record.infos else next(iter(record.infos))
    _push_state(model, record)
    return model


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable and total parameter entries of ``model`` (shared tensors counted once). Raises ValueError naming
    the first parameter of a lazy layer that is not initialised yet."""
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedTensorMixin):
            raise ValueError(f"{name!r} is not initialized yet (a lazy layer), so it cannot be counted; run one "
                             "forward pass of the model first")
    params = list(model.parameters())
    return ParameterCounts(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))

