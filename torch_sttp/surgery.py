"""Model surgery: :func:`convert` turns every selected layer of a model into an SVDP/STTP layer, in place, and
owns what it attaches to the model — one :class:`Conversion` record (the frame planner, its forward hooks, the
skipped layers, the options), reached through :func:`conversion`.

    >>> model = torch_sttp.convert(model, method="sttp", rank=64)        # in place, returns the model
    >>> torch_sttp.conversion(model).skipped                             # layers left alone, with reasons
    >>> torch_sttp.set_check_finite(model, True)                         # NaN/inf test before each frame pass
    >>> torch_sttp.to_dense(model)                                       # plain layers, same outputs

Each converted layer keeps its class's behaviour (it becomes a subclass, e.g. ``SpectralLinear`` of ``nn.Linear``,
see :mod:`torch_sttp.modules`), owns its parameters under ``<layer>.parametrizations.weight`` and takes its factors
from the model's :class:`~torch_sttp.planner.FramePlanner`. Export back to plain layers is :mod:`torch_sttp.export`
(``to_dense``, ``to_factorized``; re-exported here, as are the names that lived in this module before).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from .cost import has_tt_path
from .frames import without_autocast_on
from .layers import SUPPORTED_TYPES, conversion_blockers, layout_shape, select_layers
from .modules import LayerState, SpectralLayer, spectral_class
from .options import (BATCHING, PATHS, check_init, check_method, check_option, check_plan_method,
                      check_plan_spectrum, check_ranks, check_spectrum)
from .parametrizations import (FixedRow, config_key, decode_config, entry_key, is_parametrization_key,
                               parametrization_tensors, parametrize, spectral_parametrization, tensor_key)
from .planner import FramePlanner, NonFiniteParameterError
from .progress import progress_iter
from .tt import split_modes

__all__ = [
    "SUPPORTED_TYPES",
    "PATHS",
    "BATCHING",
    "Conversion",
    "cached",
    "FramePlanner",
    "NonFiniteParameterError",
    "convert",
    "conversion",
    "conversion_hook_ids",
    "converted_layers",
    "forward_pass",
    "load_converted",
    "set_check_finite",
    "skipped_layers",
    "spectral_parametrization",
]

_RECORD = "_sttp_conversion"


@dataclass
class Conversion:
    """What :func:`convert` attached to a model: its frame planner, the root forward hooks that run it, the layers
    left alone ``(name, type, reason)``, the options it was called with, and — for models projected from
    pretrained weights (:func:`torch_sttp.ranks.project`) — each layer's relative projection error and the time
    the projection took."""

    planner: FramePlanner
    options: dict
    skipped: list = field(default_factory=list)
    hooks: tuple = ()
    projection_errors: dict = field(default_factory=dict)
    projection_seconds: float | None = None

    def record_projection(self, errors: Mapping[str, float], seconds: float | None) -> None:
        """Store the per-layer relative errors ‖W − Ŵ‖_F / ‖W‖_F and the wall time of a projection."""
        self.projection_errors = dict(errors)
        self.projection_seconds = seconds


def conversion(model: nn.Module) -> Conversion | None:
    """The :class:`Conversion` record of a model converted by :func:`convert`, or None."""
    return model.__dict__.get(_RECORD)


def _require_conversion(model: nn.Module, what: str) -> Conversion:
    record = conversion(model)
    if record is None:
        raise ValueError(f"{what}: the model was not converted with torch_sttp.convert (call it on the model you "
                         "passed to convert)")
    return record


def set_check_finite(model: nn.Module, enabled: bool = True) -> None:
    """Test (or stop testing) a converted model's parameters for NaN/inf before each frame computation; a bad
    value raises :class:`NonFiniteParameterError` naming the layer. The test synchronises with the device."""
    _require_conversion(model, "set_check_finite").planner.check_finite = bool(enabled)


@contextlib.contextmanager
def cached(model: nn.Module):
    """Reuse the factors of a converted model across inference forward passes (the counterpart of
    ``torch.nn.utils.parametrize.cached()``): inside the context, passes without gradients compute the frames once
    and reuse them while the parameters are the same tensors at the same version counters. In-place changes
    through ``.data`` are not seen inside it; outside it, every forward pass follows the current parameter values,
    however they were changed. Passes with gradients are not affected."""
    with _require_conversion(model, "cached").planner.reuse_in_inference():
        yield


@contextlib.contextmanager
def forward_pass(model: nn.Module):
    """Run the enclosed code as inside one forward pass of ``model``: the frames of all converted layers are
    computed once, batched across layers, and each layer's :meth:`~torch_sttp.modules.SpectralLayer.spectral_factors`
    / ``spectral_weight()`` reads them (as a benchmark of the weight path needs)."""
    with _require_conversion(model, "forward_pass").planner.forward_pass():
        yield


def converted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every layer with an SVDP/STTP weight."""
    return [(n, m) for n, m in model.named_modules() if spectral_parametrization(m) is not None]


def skipped_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """(name, type, reason) of modules that :func:`convert` leaves alone."""
    record = conversion(model)
    return list(record.skipped) if record is not None else []


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
    calibration=None,
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
        path: forward path, ``"auto"`` (cheapest estimated FLOPs), ``"dense"``, ``"lowrank"`` or ``"tt"``. ``"tt"``
            (the input contracted with the cores) exists for STTP Linear layers whose d_out, d_in factor into more
            than two modes: it needs ``method="sttp"`` and at least one such layer among the selected ones; the
            other layers run ``"dense"``. ``layer_state(layer).last_path`` says what each layer ran.
        batching: how frames are batched across layers (see :class:`~torch_sttp.planner.FramePlanner`).
        check_finite: test the parameters for NaN/inf before each frame computation (one fused check) and raise
            :class:`NonFiniteParameterError` naming the first bad layer. Off by default; switch it on or off later
            with :func:`set_check_finite`.
        calibration: with ``init="pretrained"``, data-aware projection. Any object with a method
            ``project_weight(name, module, method, rank, spectrum) -> Tensor`` (the layer's weight shape): each
            layer is loaded from the Ŵ it returns instead of from its current weight, which is left untouched.
            ``torch_sttp.calibrate(...)``'s :class:`~torch_sttp.calibration.Calibration` is one (Ŵ minimises
            ‖(W − Ŵ)·X‖_F on its data), ``stats.projector(damping=…, refine_iters=…)`` another with other settings.
            The spectrum is applied to Ŵ as to any dense weight: ``"free"`` keeps Ŵ exactly, ``"normalized"``
            keeps Ŵ/σ_max(Ŵ), ``"identity"`` gives Ŵ's singular values the value 1 (the whitened optimality holds
            for ``"free"`` only).

    Unsupported modules (tied weights, ``nn.MultiheadAttention`` projections, sparse embeddings, …) are left alone
    and listed by :func:`skipped_layers` and in the report. On any error nothing is converted.
    """
    options = _check_options(model, method, rank, spectrum, init, path, batching)
    _check_calibration(calibration, init)
    rank_map = options["rank"] if isinstance(options["rank"], dict) else None
    selected, skipped = select_layers(model, include, exclude, rank_map)
    if not selected:
        raise ValueError(_nothing_selected(skipped))
    _refuse_blocked(model, selected)
    _check_tt_path(method, path, selected)
    planner = FramePlanner(batching, check_finite)
    # projections in the weights' own precision, even inside autocast
    with without_autocast_on(t.device for _, m in selected for t in m.parameters(recurse=False)):
        _convert_layers(selected, planner, options, rank_map, alpha, generator, progress, calibration)
    hooks = (model.register_forward_pre_hook(planner.begin_forward),
             model.register_forward_hook(planner.end_forward, always_call=True))
    options.update(include=include, exclude=exclude, alpha=alpha)
    model.__dict__[_RECORD] = Conversion(planner, options, skipped, hooks)
    return model


def load_converted(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                   **convert_kwargs) -> nn.Module:
    """Load a converted model's ``state_dict`` (e.g. ``safetensors.torch.load_file(path)``) into the dense ``model``
    it was made from: the layers are converted with the settings recorded in the state_dict (method, spectrum and
    each layer's rank), then the tensors are loaded. Returns ``model``; its outputs equal the saved model's.

    ``convert_kwargs`` go to :func:`convert` (``path``, ``batching``, ``check_finite``).
    """
    configs = {}
    suffix = "." + config_key("")
    for key, value in state_dict.items():
        if key.endswith(suffix) or key == config_key(""):
            configs[key[: -len(suffix)] if key != config_key("") else ""] = decode_config(value)
    if not configs:
        if isinstance(state_dict.get("state_dict"), Mapping):
            raise ValueError("load_converted: this is a checkpoint that holds a state_dict under 'state_dict' (as "
                             "`sttp compress` writes a .pt), not a state_dict; pass torch.load(path)['state_dict']")
        raise ValueError("load_converted: the state_dict holds no SVDP/STTP layer; load it with "
                         "model.load_state_dict instead")
    settings = {(c["method"], c["spectrum"]) for c in configs.values()}
    if len(settings) > 1:
        raise ValueError(f"load_converted: the state_dict mixes methods/spectra {sorted(settings)}; convert the "
                         "model layer group by layer group with torch_sttp.convert, then load_state_dict")
    (method, spectrum), = settings
    convert(model, method, {name: c["rank"] for name, c in configs.items()}, spectrum, init="identity",
            **convert_kwargs)
    model.load_state_dict(state_dict, strict=strict)
    return model


def _check_options(model, method, rank, spectrum, init, path, batching) -> dict:
    """Every option of :func:`convert` validated before anything changes; returns them as a dict."""
    check_method(method)
    check_spectrum(spectrum)
    check_init(init)
    check_option("path", path)
    check_option("batching", batching)
    check_plan_method(rank, method)
    check_plan_spectrum(rank, spectrum)
    if converted_layers(model):
        names = ", ".join(n or "<root>" for n, _ in converted_layers(model)[:3])
        raise ValueError(f"model is already converted (e.g. {names}); call torch_sttp.to_dense(model) first")
    return {"method": method, "rank": check_ranks(rank), "spectrum": spectrum, "init": init, "path": path,
            "batching": batching}


def _check_calibration(calibration, init: str) -> None:
    if calibration is None:
        return
    if init != "pretrained":
        raise ValueError(f"calibration= projects the pretrained weights; convert with init='pretrained' (got "
                         f"init={init!r}), or drop calibration=")
    if not callable(getattr(calibration, "project_weight", None)):
        raise ValueError(f"calibration= must offer project_weight(name, module, method, rank, spectrum) (a "
                         f"torch_sttp.Calibration from torch_sttp.calibrate), got a {type(calibration).__name__}")


def _check_tt_path(method: str, path: str, selected) -> None:
    """``path="tt"`` must reach at least one layer that has a TT path (see :func:`convert`)."""
    if path != "tt":
        return
    if method != "sttp":
        raise ValueError("path='tt' contracts the input with STTP cores; it needs method='sttp' (with svdp use "
                         "'lowrank' or 'auto')")
    if not any(isinstance(m, nn.Linear) and has_tt_path(method, *split_modes(layout_shape(m), method))
               for _, m in selected):
        names = ", ".join(repr(n) for n, _ in selected[:3]) + (", …" if len(selected) > 3 else "")
        raise ValueError(f"path='tt' applies to STTP Linear layers whose d_out, d_in factor into more than two "
                         f"modes; none of the selected layers ({names}) is one: use 'auto' or 'lowrank'")


def _refuse_blocked(model: nn.Module, selected) -> None:
    """A selected layer inside a module that declares ``conversion_blocked`` (an adapter layer) is an error."""
    blockers = conversion_blockers(model)
    inside = [(name, outer, reason) for name, _ in selected for outer, reason in blockers
              if not outer or name == outer or name.startswith(outer + ".")]
    if inside:
        name, outer, reason = inside[0]
        more = f" ({len(inside)} such layers)" if len(inside) > 1 else ""
        raise ValueError(f"cannot convert layer {name!r}: it is inside {outer or '<root>'!r}, which {reason}{more}")


def _nothing_selected(skipped) -> str:
    """The error when no layer can be converted: the skipped layers' reasons first (at most 5), then the hint."""
    shown = "; ".join(f"{name!r} ({kind}): {reason}" for name, kind, reason in skipped[:5])
    more = f"; … ({len(skipped)} skipped in all)" if len(skipped) > 5 else ""
    detail = f" (skipped: {shown}{more})" if skipped else ""
    return (f"no layer was selected for conversion{detail}; check include/exclude/rank, supported types are "
            + ", ".join(t.__name__ for t in SUPPORTED_TYPES))


def _convert_layers(selected, planner: FramePlanner, options: dict, rank_map, alpha, generator, progress,
                    calibration=None) -> None:
    """Parametrize each selected layer (all or nothing: on any error the converted ones are restored); with
    ``calibration`` each layer is loaded from ``calibration.project_weight(...)``."""
    done: list[tuple[nn.Module, type, dict]] = []
    iterator = progress_iter(selected, progress, "convert", "layer")
    try:
        for name, module in iterator:
            r = rank_map[name] if rank_map is not None else options["rank"]
            pretrained = None
            if calibration is not None:  # its errors name the layer
                pretrained = calibration.project_weight(name, module, options["method"], r, options["spectrum"])
            original_cls, original_params = module.__class__, dict(module._parameters)
            module.__class__ = spectral_class(original_cls)
            done.append((module, original_cls, original_params))
            try:
                parametrize(module, options["method"], r, options["spectrum"], options["init"], alpha,
                            generator=generator, pretrained=pretrained)
            except ValueError as e:
                raise ValueError(f"layer {name!r} ({original_cls.__name__}): {e}") from None
            hook = module._register_load_state_dict_pre_hook(_load_dense_weight_hook, with_module=True)
            module.attach_state(LayerState(name=name, planner=planner, path=options["path"], load_hook=hook))
            planner.add(module, name)
    except BaseException:
        for module, cls, params in reversed(done):
            _restore(module, cls, params)
        raise


def _restore(module: nn.Module, cls: type, params: dict[str, torch.nn.Parameter]) -> None:
    """Undo a partial conversion: the original class and parameters (same objects, same order)."""
    if torch_parametrize.is_parametrized(module, "weight"):
        torch_parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module._parameters.clear()
    module._parameters.update(params)
    if isinstance(module, SpectralLayer):
        module.detach_state()
    module.__class__ = cls


def _load_dense_weight_hook(module, state_dict, prefix, *args) -> None:
    """Loading a dense checkpoint into a converted layer goes through ``right_inverse``."""
    key = prefix + "weight"
    if key not in state_dict or spectral_parametrization(module) is None:
        return
    if any(is_parametrization_key(prefix, k) for k in state_dict):
        return
    dense = state_dict.pop(key)
    p = spectral_parametrization(module)
    tensors = p.right_inverse(dense.to(parametrization_tensors(module)[0].dtype))
    for i, t in enumerate(tensors):
        state_dict[tensor_key(prefix, i)] = t
    state_dict[config_key(prefix)] = p.get_extra_state()
    for i, later in enumerate(module.parametrizations["weight"]):
        if isinstance(later, FixedRow):  # a dense embedding's padding row becomes the fixed row
            state_dict[entry_key(prefix, i, "row")] = dense[later.index].to(later.row.dtype)


def conversion_hook_ids(model: nn.Module) -> set[int]:
    """The ids (keys in the module's hook dicts) of the forward hooks :func:`convert` attached to ``model``."""
    record = model.__dict__.get(_RECORD)
    return {handle.id for handle in record.hooks} if record is not None else set()


def detach_conversion(model: nn.Module) -> None:
    """Remove what :func:`convert` attached to ``model`` (its record and forward hooks); the layers are left as they
    are. Used by :mod:`torch_sttp.export` once every converted layer has been exported."""
    record = model.__dict__.pop(_RECORD, None)
    if record is not None:
        for handle in record.hooks:
            handle.remove()


# names that lived in this module before the layer classes and export moved out
_MOVED = {"to_dense": "export", "to_factorized": "export", "SpectralLinear": "modules",
          "SpectralConv1d": "modules", "SpectralConv2d": "modules", "SpectralConv3d": "modules",
          "SpectralConvTranspose1d": "modules", "SpectralConvTranspose2d": "modules",
          "SpectralConvTranspose3d": "modules", "SpectralEmbedding": "modules"}


def __getattr__(name: str):
    if name in _MOVED:  # deprecated: export sits above this module, so only old user code may reach it here
        import importlib
        import warnings

        warnings.warn(f"torch_sttp.surgery.{name} is deprecated; use torch_sttp.{_MOVED[name]}.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
