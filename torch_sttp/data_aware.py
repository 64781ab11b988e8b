"""Data-aware conversion of a pretrained model: every selected layer projected in its whitened metric
(:mod:`torch_sttp.whitening`) and loaded into SVDP/STTP by ``convert(init="pretrained")``, optionally sequentially.

    >>> stats = torch_sttp.calibrate(model, batches, include=nn.Linear)
    >>> result = project_whitened(model, "svdp", plan, stats)             # converted in place
    >>> result.whitened_errors, torch_sttp.ranks.projection_errors(model)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Collection, Mapping

import torch
from torch import nn

from .calibration import Calibration, calibrate, sequential_statistics
from .layers import select_layers, weight_matrix
from .options import check_method, check_rank, check_spectrum
from .surgery import conversion, convert
from .whitening import DAMPING, REFINE_ITERS, WhitenedProjector, layer_metric, project_layer

__all__ = ["WhitenedProjection", "project_whitened"]


@dataclass
class WhitenedProjection:
    """What :func:`project_whitened` did: per layer the :class:`LayerProjection` (without its weight), the relative
    weight error ‖W − Ŵ‖_F/‖W‖_F of the converted layer (``errors``, as :func:`torch_sttp.ranks.projection_errors`)
    and the relative whitened error (``whitened_errors``); the seconds spent projecting (statistics of a
    sequential run included) and, for a sequential run, in its calibration passes; the layers whose bias was
    corrected (``centered``, see :func:`project_whitened`)."""

    layers: dict
    errors: dict
    whitened_errors: dict
    seconds: float
    calibration_seconds: float = 0.0
    bias_corrected: list = field(default_factory=list)


def _rank_map(model: nn.Module, rank, include, exclude) -> dict[str, int]:
    if isinstance(rank, Mapping):
        selected, _ = select_layers(model, None, None, dict(rank))
        return {n: int(rank[n]) for n, _ in selected}
    check_rank(rank)
    selected, _ = select_layers(model, include, exclude)
    return {n: rank for n, _ in selected}


def _write(module: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))


def _project(module: nn.Module, method: str, rank: int, metric, refine_iters: int, compare: bool):
    """Project one layer and write Ŵ into its dense weight; the returned record keeps no weight."""
    proj = project_layer(module, method, rank, metric, refine_iters, compare)
    _write(module, proj.weight)
    proj.weight = None
    return proj


def _project_sequential(model, method, ranks, batches, metric_options, refine_iters, progress, compare):
    """Project the layers of ``ranks`` group by group in forward order, each on statistics of the partly projected
    model, writing Ŵ into the dense weights (in place); returns ({name: LayerProjection}, seconds spent in the
    calibration passes, {name: E[x]} of the centred layers)."""
    modules = dict(model.named_modules())
    damping, centered, scales = metric_options
    out, calib_seconds, means = {}, 0.0, {}
    t = time.perf_counter()
    for group, stats in sequential_statistics(model, batches, list(ranks), progress=progress, means=bool(centered)):
        calib_seconds += time.perf_counter() - t
        for name in group:
            metric = layer_metric(stats, name, modules[name], damping, centered, scales)
            out[name] = _project(modules[name], method, ranks[name], metric, refine_iters, compare)
            if _is_centered(name, centered):
                means[name] = stats.mean(name)
        t = time.perf_counter()
    return out, calib_seconds, means


def _is_centered(name: str, centered) -> bool:
    return centered if isinstance(centered, bool) else name in centered


def _correct_biases(modules, originals, means) -> list[str]:
    """b ← b + (W − Ŵ)·E[x] for each layer of ``means`` with a bias (groups = 1): its output mean on the
    calibration data is then the dense layer's. Returns the corrected layers."""
    done = []
    with torch.no_grad():
        for name, mu in means.items():
            module = modules[name]
            if getattr(module, "bias", None) is None or getattr(module, "groups", 1) != 1:
                continue
            w = weight_matrix(module, originals[name]).double()
            delta = (w - weight_matrix(module).double()) @ mu.to(w)
            module.bias.add_(delta.to(module.bias))
            done.append(name)
    return done


def _convert_sequential(model, method, ranks, spectrum, batches, metric_options, refine_iters, progress, compare,
                        convert_kwargs):
    """Sequential projection then ``convert(init="pretrained")``; the dense weights are restored on an error.
    Returns (projections, calibration seconds, the dense weights, the centred layers' input means)."""
    modules = dict(model.named_modules())
    originals = {n: modules[n].weight.detach().clone() for n in ranks}
    try:
        layers, calib_seconds, means = _project_sequential(model, method, ranks, batches, metric_options,
                                                           refine_iters, progress, compare)
        convert(model, method, ranks, spectrum, init="pretrained", progress=progress, **convert_kwargs)
    except BaseException:
        for n, w in originals.items():
            if modules[n].weight is not None and tuple(modules[n].weight.shape) == tuple(w.shape):
                _write(modules[n], w)
        raise
    return layers, calib_seconds, originals, means


def project_whitened(model: nn.Module, method: str, rank, calibration: Calibration | None = None, *,
                     batches=None, sequential: bool = False, spectrum: str = "free", include=None, exclude=None,
                     damping: float = DAMPING, refine_iters: int = REFINE_ITERS, compare: bool = False,
                     centered: bool | Collection[str] = False, output_scales: Mapping[str, torch.Tensor] | None = None,
                     progress: bool = False, **convert_kwargs) -> WhitenedProjection:
    """Convert ``model`` (in place) with data-aware projections of its pretrained weights.

    ``rank`` is a cap for every selected layer (``include``/``exclude``) or a mapping {layer: rank} such as a
    :class:`~torch_sttp.ranks.RankPlan`. Each layer's Ŵ minimises ‖(W − Ŵ)·X‖_F on the calibration data
    (:func:`project_layer`) and is loaded exactly into the ``method`` ("svdp"/"sttp") form by
    ``convert(init="pretrained")`` (see the module docstring for spectra other than ``"free"``).

    Non-sequential: ``calibration`` holds the statistics of every projected layer (computed from ``batches`` when
    None). ``sequential=True``: layers are projected in forward order, group by group (layers sharing an input
    together), each group's statistics collected from ``batches`` (a list) on the model whose earlier layers are
    already projected (:func:`torch_sttp.calibration.sequential_statistics`), so later layers absorb the errors of
    earlier ones; non-sequential, ``convert(..., calibration=WhitenedProjector(...))`` loads each Ŵ without writing
    it into (or copying) the dense weights. On an error the dense weights are restored. The relative weight errors
    are recorded on the conversion record, as :func:`torch_sttp.ranks.project` does. ``compare`` also measures, per layer, the
    data-free projection's loss and the rank-R bound in the whitened metric (see :func:`project_layer`; extra SVDs).

    ``centered`` (True or layer names) and ``output_scales`` ({layer: g}, e.g.
    :func:`torch_sttp.calibration.batchnorm_scales`) choose the metric of :func:`layer_metric`: the centred one
    needs statistics with means (``calibrate(..., means=True)``; computed so when ``calibration`` is None) and
    ignores the output mean error (W − Ŵ)·E[x], which is then removed where the layer has a bias (groups = 1):
    b ← b + (W − Ŵ)·E[x] (``bias_corrected``). Centre only layers whose output mean is so restored, or that feed a
    batch norm whose statistics are re-estimated afterwards
    (:func:`torch_sttp.calibration.reestimate_batchnorm`).
    """
    check_method(method)
    check_spectrum(spectrum)
    if "init" in convert_kwargs:
        raise ValueError("project_whitened always converts with init='pretrained'")
    ranks = _rank_map(model, rank, include, exclude)
    if sequential or calibration is None:
        if batches is None:
            raise ValueError("project_whitened needs calibration statistics or batches (sequential=True needs "
                             "batches)")
        if calibration is None and not sequential:
            calibration = calibrate(model, batches, layers=list(ranks), progress=progress, means=bool(centered))
    if centered and not sequential and not calibration.has_means:
        raise ValueError("project_whitened(centered=...) needs the input means: calibrate with means=True")
    modules = dict(model.named_modules())
    t0 = time.perf_counter()
    options = (damping, centered, output_scales)
    if sequential:
        layers, calib_seconds, originals, means = _convert_sequential(model, method, ranks, spectrum, batches, options,
                                                                      refine_iters, progress, compare, convert_kwargs)
    else:
        missing = [n for n in ranks if n not in calibration]
        if missing:
            raise ValueError(f"layers {missing[:4]} have no calibration statistic; calibrate them (include=...)")
        originals = {n: modules[n].weight for n in ranks}  # convert leaves them untouched: no copies
        layers, calib_seconds = {}, 0.0
        projector = WhitenedProjector(calibration, damping, refine_iters, compare, layers, centered, output_scales)
        convert(model, method, ranks, spectrum, init="pretrained", progress=progress, calibration=projector,
                **convert_kwargs)
        means = {n: calibration.mean(n) for n in ranks if _is_centered(n, centered)}
    corrected = _correct_biases(modules, originals, means)
    seconds = time.perf_counter() - t0
    errors = {}
    with torch.no_grad():
        for n, w in originals.items():
            norm = float(torch.linalg.vector_norm(w.double()))
            diff = float(torch.linalg.vector_norm(w.double() - modules[n].weight.detach().double()))
            errors[n] = diff / norm if norm > 0 else diff
    conversion(model).record_projection(errors, seconds)
    return WhitenedProjection(layers, errors, {n: p.relative_error for n, p in layers.items()}, seconds,
                              calib_seconds, corrected)
