"""Data-aware conversion of a pretrained model: every selected layer projected in its whitened metric
(:mod:`torch_sttp.whitening`) and loaded into SVDP/STTP by ``convert(init="pretrained")``, optionally sequentially.

    >>> stats = torch_sttp.calibrate(model, batches, include=nn.Linear)
    >>> result = project_whitened(model, "svdp", plan, stats)             # converted in place
    >>> result.whitened_errors, torch_sttp.ranks.projection_errors(model)
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Collection, Mapping

import torch
from torch import nn

from .calibration import Calibration, calibrate, reestimate_batchnorm, sequential_statistics
from .layers import is_transposed_conv, matrix_to_weight, select_layers, weight_matrix
from .options import check_method, check_plan_method, check_rank, check_spectrum
from .parametrizations import SpectralParametrization
from .surgery import conversion, convert
from .whitening import (DAMPING, REFINE_ITERS, WhitenedProjector, check_output_scales, is_centered, layer_metric,
                        project_layer)

__all__ = ["WhitenedProjection", "project_whitened"]


@dataclass
class WhitenedProjection:
    """What :func:`project_whitened` did: per layer the :class:`LayerProjection` (without its weight), the relative
    weight error ‖W − Ŵ‖_F/‖W‖_F of the converted layer (``errors``, as :func:`torch_sttp.ranks.projection_errors`)
    and the relative whitened error of the converted layer (``whitened_errors``; for a spectrum other than
    "free" the records' losses are those of the converted weights too); the seconds spent projecting (statistics of a
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


class _ReleasingProjector:
    """``convert``'s projector (see :class:`WhitenedProjector`) that removes each layer from ``calibration`` once
    it is projected (:meth:`Calibration.release`: a statistic is freed with the last layer that refers to it)."""

    def __init__(self, projector: WhitenedProjector, calibration: Calibration):
        self.projector, self.calibration = projector, calibration

    def project_weight(self, name: str, module: nn.Module, method: str, rank: int, spectrum: str) -> torch.Tensor:
        weight = self.projector.project_weight(name, module, method, rank, spectrum)
        self.calibration.release([name])
        return weight


class _ScoringProjector:
    """``convert``'s projector (see :class:`WhitenedProjector`, which fills ``metrics``) that scores each layer once
    it is converted: its record's loss becomes that of the converted weight (the spectrum's constraint applied)
    against the dense W in the layer's metric. A layer is converted right after its projection, so it is scored when
    the next layer is asked for (and by :meth:`finish`): one metric is held at a time."""

    def __init__(self, projector, metrics: dict, records: dict, originals: dict):
        self.projector, self.metrics, self.records, self.originals = projector, metrics, records, originals
        self.pending: tuple[str, nn.Module] | None = None

    def project_weight(self, name: str, module: nn.Module, method: str, rank: int, spectrum: str) -> torch.Tensor:
        self.finish()
        weight = self.projector.project_weight(name, module, method, rank, spectrum)
        self.pending = (name, module)
        return weight

    def finish(self) -> None:
        if self.pending is not None:
            name, module = self.pending
            metric = self.metrics.pop(name)
            target = weight_matrix(module, self.originals[name]).detach().to(metric.gram.dtype)
            _score_converted(self.records[name], metric, target, module)
            self.pending = None


def _project(module: nn.Module, method: str, rank: int, metric, refine_iters: int, compare: bool):
    """Project one layer and write Ŵ into its dense weight; the returned record keeps no weight."""
    proj = project_layer(module, method, rank, metric, refine_iters, compare)
    _write(module, proj.weight)
    proj.weight = None
    return proj


def _score_converted(record, metric, target: torch.Tensor, module: nn.Module) -> None:
    """The record's loss becomes that of the layer's converted weight (the spectrum's constraint applied) against
    the same target in the same metric, so that ``whitened_errors`` describe the layer as converted."""
    with torch.no_grad():
        record.loss = metric.loss(target, weight_matrix(module).detach().to(target.dtype))


def _load_constrained(name: str, module: nn.Module, method: str, rank: int, spectrum: str) -> None:
    """Write into the dense weight the weight the converted layer will hold: Ŵ loaded into its parametrization
    (:meth:`~torch_sttp.parametrizations.SpectralParametrization.loaded`; ``convert`` then loads it unchanged)."""
    weight = module.weight.detach()
    p = SpectralParametrization(tuple(weight.shape), rank, method, spectrum, is_transposed_conv(module))
    try:
        _write(module, p.to(weight.device).loaded(weight))
    except ValueError as e:
        raise ValueError(f"layer {name!r} ({type(module).__name__}): {e}") from None


def _restore_padding_row(name: str, module: nn.Module, original: torch.Tensor, exact: dict) -> None:
    """For an Embedding with a ``padding_idx``: keep Ŵ in ``exact`` and put the original padding row back into the
    dense weight (the converted layer keeps that row fixed, see :func:`torch_sttp.parametrizations.parametrize`)."""
    row = module.padding_idx if isinstance(module, nn.Embedding) else None
    if row is None:
        return
    exact[name] = module.weight.detach().clone()
    with torch.no_grad():
        module.weight[row] = original[row]


class _StoredWeights:
    """``convert``'s projector that loads the kept Ŵ of some layers and every other layer's current weight."""

    def __init__(self, weights: dict):
        self.weights = weights

    def project_weight(self, name: str, module: nn.Module, method: str, rank: int, spectrum: str) -> torch.Tensor:
        return self.weights.get(name, module.weight.detach())


def _compensated_target(module, stats, name, metric, centered: bool) -> None:
    """Write W' = W·K·C⁻¹ into the dense weight (K = E[x x̂ᵀ] or its centred form, C the metric's damped
    statistic of x̂): ‖W·X − Ŵ·X̂‖² = ‖(W' − Ŵ)·L‖² + const, so the whitened projection of W' fits the reference
    outputs."""
    w = weight_matrix(module).detach().to(metric.gram.dtype)
    cross = (stats.cross_covariance(name) if centered else stats.cross_moment(name)).to(w)
    target = torch.linalg.solve(metric.gram, (w @ cross).mT).mT  # C symmetric
    _write(module, matrix_to_weight(module, target, module.weight.shape))


def _correct_bias(module, dense_weight, reference_mean, mean) -> bool:
    """b ← b + W·μ − Ŵ·μ̂ (W the dense weight, μ = E[x] of the reference inputs, μ̂ = E[x̂] of the layer's; μ = μ̂
    without a reference) for a layer with a bias and groups = 1: its output mean on the calibration data is then the
    dense layer's (on the reference inputs). Returns whether it corrected."""
    if getattr(module, "bias", None) is None or getattr(module, "groups", 1) != 1:
        return False
    with torch.no_grad():
        w = weight_matrix(module, dense_weight).double()
        delta = w @ reference_mean.to(w) - weight_matrix(module).double() @ mean.to(w)
        module.bias.add_(delta.to(module.bias))
    return True


def _fit_layer(name, module, method, rank, spectrum, metric, refine_iters, compare, original, exact):
    """One layer of a sequential run: Ŵ written into its dense weight (:func:`_project`), constrained by a spectrum
    other than "free" (:func:`_load_constrained`, the record scored on it), its padding row restored; returns the
    record."""
    target = weight_matrix(module).detach().to(metric.gram.dtype, copy=True) if spectrum != "free" else None
    proj = _project(module, method, rank, metric, refine_iters, compare)
    if target is not None:
        _load_constrained(name, module, method, rank, spectrum)
    _restore_padding_row(name, module, original, exact)
    if target is not None:  # W (W' when compensating) against the weight the layer will hold
        _score_converted(proj, metric, target, module)
    return proj


def _project_sequential(model, method, ranks, batches, options, refine_iters, progress, compare, originals,
                        spectrum, exact):
    """Project the layers of ``ranks`` group by group in forward order, each on statistics of the partly projected
    model (paired with the dense copy with ``compensate``), writing Ŵ into the dense weights (in place), correcting
    biases of centred layers (against ``originals``, the dense weights) and re-estimating batch norms after each
    group (``batchnorm``); returns ({name: LayerProjection}, seconds spent in the calibration passes, the
    bias-corrected layers). With a ``spectrum`` other than "free", the dense weight becomes the weight the converted
    layer will hold (:func:`_load_constrained`), so later groups see the converted model, and its record is scored
    on it. An Embedding's padding row is restored in its dense weight at once (the row the converted layer keeps),
    its exact Ŵ kept in ``exact``."""
    modules = dict(model.named_modules())
    damping, centered, scales, compensate, batchnorm = options
    reference = copy.deepcopy(model) if compensate else None
    out, calib_seconds, corrected = {}, 0.0, []
    t = time.perf_counter()
    for group, stats in sequential_statistics(model, batches, list(ranks), progress, bool(centered), reference):
        calib_seconds += time.perf_counter() - t
        own = stats.model if compensate else stats
        for name in group:
            module, center = modules[name], is_centered(name, centered)
            metric = layer_metric(own, name, module, damping, centered, scales)
            if compensate:
                _compensated_target(module, stats, name, metric, center)
            out[name] = _fit_layer(name, module, method, ranks[name], spectrum, metric, refine_iters, compare,
                                   originals[name], exact)
            if center and _correct_bias(module, originals[name], stats.reference_mean(name) if compensate else
                                        own.mean(name), own.mean(name)):
                corrected.append(name)
        t = time.perf_counter()
        if batchnorm:
            reestimate_batchnorm(model, batches)
    return out, calib_seconds, corrected


def _convert_sequential(model, method, ranks, spectrum, batches, options, refine_iters, progress, compare,
                        convert_kwargs):
    """Sequential projection then ``convert(init="pretrained")``; on an error the dense weights, the biases and the
    batch-norm statistics are restored. Returns (projections, calibration seconds, the dense weights, the
    bias-corrected layers)."""
    modules = dict(model.named_modules())
    originals = {n: modules[n].weight.detach().clone() for n in ranks}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.endswith((".bias", "running_mean", "running_var", "num_batches_tracked"))}
    try:
        exact: dict = {}
        layers, calib_seconds, corrected = _project_sequential(model, method, ranks, batches, options,
                                                               refine_iters, progress, compare, originals,
                                                               spectrum, exact)
        convert(model, method, ranks, spectrum, init="pretrained", progress=progress,
                calibration=_StoredWeights(exact) if exact else None, **convert_kwargs)
    except BaseException:
        for n, w in originals.items():
            if modules[n].weight is not None and tuple(modules[n].weight.shape) == tuple(w.shape):
                _write(modules[n], w)
        state = model.state_dict()
        with torch.no_grad():
            for k, v in saved.items():
                if k in state and state[k].shape == v.shape:
                    state[k].copy_(v)
        raise
    return layers, calib_seconds, originals, corrected


def project_whitened(model: nn.Module, method: str, rank, calibration: Calibration | None = None, *,
                     batches=None, sequential: bool = False, spectrum: str = "free", include=None, exclude=None,
                     damping: float = DAMPING, refine_iters: int = REFINE_ITERS, compare: bool = False,
                     centered: bool | Collection[str] = False, output_scales: Mapping[str, torch.Tensor] | None = None,
                     compensate: bool = False, batchnorm: bool = False, release_statistics: bool = False,
                     progress: bool = False, **convert_kwargs) -> WhitenedProjection:
    """Convert ``model`` (in place) with data-aware projections of its pretrained weights.

    ``rank`` is a cap for every selected layer (``include``/``exclude``) or a mapping {layer: rank} such as a
    :class:`~torch_sttp.ranks.RankPlan`. Each layer's Ŵ minimises ‖(W − Ŵ)·X‖_F on the calibration data
    (:func:`project_layer`) and is loaded exactly into the ``method`` ("svdp"/"sttp") form by
    ``convert(init="pretrained")`` (for spectra other than ``"free"``, see
    :meth:`~torch_sttp.whitening.WhitenedProjector.project_weight`). For such a spectrum
    the records' losses and ``whitened_errors`` are those of the converted weights (their ``tt_svd_loss``,
    ``bound`` and ``data_free_loss`` still describe the unconstrained Ŵ); a sequential run puts each constrained
    weight in place before it collects the next group's statistics, so later layers are fitted on the inputs of
    the layers as converted.

    Non-sequential: ``calibration`` holds the statistics of every projected layer (computed from ``batches`` when
    None). ``sequential=True``: layers are projected in forward order, group by group (layers sharing an input
    together), each group's statistics collected from ``batches`` (a list) on the model whose earlier layers are
    already projected (:func:`torch_sttp.calibration.sequential_statistics`), so each layer is fitted in the metric
    of the inputs it will receive (to absorb earlier errors, add ``compensate``, below); non-sequential,
    ``convert(..., calibration=WhitenedProjector(...))`` loads each Ŵ without writing
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

    Sequential only: ``compensate`` makes each layer fit the *dense* model's outputs from the inputs it now gets,
    Ŵ = argmin ‖W·X − Ŵ·X̂‖_F (X its inputs in a dense copy of the model, X̂ in the partly projected one,
    :func:`torch_sttp.calibration.paired_statistics`): the whitened projection of W' = W·K·C⁻¹ (K = E[x x̂ᵀ], C the
    damped E[x̂ x̂ᵀ]; both centred with ``centered``, and the bias correction then b ← b + W·μ − Ŵ·μ̂), so later
    layers absorb the errors of earlier ones — without it each layer fits W·X̂, the dense layer on the perturbed
    inputs. It keeps one copy of the model; Embedding layers are refused. ``batchnorm`` re-estimates every batch norm on ``batches`` after each
    group (:func:`~torch_sttp.calibration.reestimate_batchnorm`), so that the next group's inputs are normalised
    with current statistics; the model leaves with re-estimated batch norms. On an error, weights, biases and
    batch-norm statistics are restored.

    Non-sequential only: ``release_statistics`` removes each layer from ``calibration`` as soon as it is projected
    (:meth:`~torch_sttp.calibration.Calibration.release`: a statistic is freed with the last layer that refers to
    it; layers not projected keep theirs), so that the peak memory holds the statistics not yet used instead of
    all of them. The projected layers are then gone from ``calibration``, also after an error (the dense weights
    are still restored).
    """
    check_method(method)
    check_spectrum(spectrum)
    check_plan_method(rank, method)
    if "init" in convert_kwargs:
        raise ValueError("project_whitened always converts with init='pretrained'")
    ranks = _rank_map(model, rank, include, exclude)
    modules = dict(model.named_modules())
    check_output_scales({n: modules[n] for n in ranks}, method, output_scales)
    if sequential or calibration is None:
        if batches is None:
            raise ValueError("project_whitened needs calibration statistics or batches (sequential=True needs "
                             "batches)")
        if calibration is None and not sequential:
            calibration = calibrate(model, batches, layers=list(ranks), progress=progress, means=bool(centered))
    if centered and not sequential and not calibration.has_means:
        raise ValueError("project_whitened(centered=...) needs the input means: calibrate with means=True")
    t0 = time.perf_counter()
    if release_statistics and sequential:
        raise ValueError("project_whitened: release_statistics frees the statistics of a non-sequential projection; "
                         "a sequential one collects its own per group (leave release_statistics out)")
    if (compensate or batchnorm) and not sequential:
        raise ValueError("project_whitened: compensate and batchnorm work layer by layer; pass sequential=True (or "
                         "call torch_sttp.calibration.reestimate_batchnorm after a non-sequential projection)")
    scored = spectrum != "free"  # the spectrum changes Ŵ: score the converted weights
    if sequential:
        options = (damping, centered, output_scales, compensate, batchnorm)
        layers, calib_seconds, originals, corrected = _convert_sequential(model, method, ranks, spectrum, batches,
                                                                          options, refine_iters, progress, compare,
                                                                          convert_kwargs)
    else:
        missing = [n for n in ranks if n not in calibration]
        if missing:
            raise ValueError(f"layers {missing[:4]} have no calibration statistic; calibrate them (include=...)")
        originals = {n: modules[n].weight for n in ranks}  # convert leaves them untouched: no copies
        means = {n: calibration.mean(n) for n in ranks if is_centered(n, centered)}
        layers, calib_seconds = {}, 0.0
        metrics = {} if scored else None
        projector = WhitenedProjector(calibration, damping, refine_iters, compare, layers, centered, output_scales,
                                      metrics)
        if release_statistics:
            projector = _ReleasingProjector(projector, calibration)
        if scored:
            projector = _ScoringProjector(projector, metrics, layers, originals)
        convert(model, method, ranks, spectrum, init="pretrained", progress=progress, calibration=projector,
                **convert_kwargs)
        if scored:
            projector.finish()
        corrected = [n for n, mu in means.items() if _correct_bias(modules[n], originals[n], mu, mu)]
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
