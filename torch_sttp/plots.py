"""Figures of singular values, one function per figure, written headless (an Agg canvas; pyplot's global state is
untouched; matplotlib is imported only when a figure is drawn).

    >>> plots.plot_layer_spectra(model, "spectra.png", top_k=32)          # the paper's Fig. 5: σ per layer
    >>> plots.plot_spectra_history(snapshots, "history.png")              # σ_max and σ_min/σ_max over training

Each figure function returns a :class:`SpectraFigure`: the path written and the data drawn. :func:`plot_spectra`
is the older single entry point: it picks the figure from its input and returns a :class:`SpectraPlot`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .inspection import snapshot_spectra
from .layers import as_patterns, matches

__all__ = ["SpectraFigure", "plot_layer_spectra", "plot_spectra_history", "plot_spectra", "SpectraPlot"]


@dataclass(frozen=True)
class SpectraFigure:
    """A written figure: ``path`` (the file, as a string), ``matrix`` (the heat map's data, a numpy array),
    ``layers`` (the heat map's layer names: its columns for the spectra figure, its rows for the history) and
    ``steps`` (the history's steps; None for the spectra figure)."""

    path: str
    matrix: np.ndarray
    layers: list
    steps: list | None = None


# ------------------------------------------------------------------------------------------------------- canvas
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")


def _log_norm(values: np.ndarray, widen: bool = False):
    """A LogNorm over the finite positive entries of ``values`` (None if there are none)."""
    from matplotlib.colors import LogNorm

    positive = values[np.isfinite(values) & (values > 0)]
    if not positive.size:
        return None
    high = max(positive.max(), positive.min() * (1 + 1e-9)) if widen else positive.max()
    return LogNorm(vmin=positive.min(), vmax=high)


def _label(name: str) -> str:
    return name or "<root>"


# ------------------------------------------------------------------------------------------- spectra per layer
def _spectra_matrix(snapshot: Mapping[str, torch.Tensor], top_k: int, normalize: bool):
    """M (k × L): column j the top-k σ of layer j descending (÷ σ_max if ``normalize``), NaN past its rank; and
    (min σ of all layers, min σ in the shown slice, max σ), raw."""
    spectra = [s.detach().double().cpu().flatten().sort(descending=True).values for s in snapshot.values()]
    k = max(1, min(int(top_k), max(s.numel() for s in spectra)))
    mat = np.full((k, len(spectra)), np.nan)
    all_min, shown_min, all_max = math.inf, math.inf, 0.0
    for j, s in enumerate(spectra):
        if s.numel() == 0:
            continue
        top = s[:k]
        smax = float(s[0])
        all_min, all_max = min(all_min, float(s[-1])), max(all_max, smax)
        shown_min = min(shown_min, float(top[-1]))
        vals = top / smax if (normalize and smax > 0) else top
        mat[: top.numel(), j] = vals.numpy()
    return mat, (all_min, shown_min, all_max)


def plot_layer_spectra(
    model_or_snapshot,
    path,
    top_k: int = 32,
    title: str | None = None,
    layers=None,
    normalize: bool = True,
    dpi: int = 100,
) -> SpectraFigure:
    """Heat map of singular values per layer, like the paper's Fig. 5.

    M (top_k × L): one column per layer in forward order, row i the i-th largest singular value, σᵢ/σ_max when
    ``normalize`` (raw σ on a log color scale otherwise); rows past a layer's rank are blank. Annotated with the
    smallest σ of all layers, the smallest σ in the shown slice and the largest σ (raw values).

    Args:
        model_or_snapshot: a model (its :func:`~torch_sttp.inspection.snapshot_spectra`, selected by ``layers``)
            or one snapshot {layer: σ}.
    Returns a :class:`SpectraFigure` whose ``matrix`` is M.
    """
    snapshot = snapshot_spectra(model_or_snapshot, layers) if isinstance(model_or_snapshot, nn.Module) \
        else model_or_snapshot
    names = list(snapshot.keys())
    if not names:
        raise ValueError("plot_layer_spectra: no layers to plot")
    mat, (all_min, shown_min, all_max) = _spectra_matrix(snapshot, top_k, normalize)
    fig = _new_figure(max(5.5, 0.35 * len(names) + 2.5), max(3.0, 0.12 * mat.shape[0] + 2.0))
    ax = fig.add_subplot(1, 1, 1)
    if normalize:
        im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", interpolation="nearest", cmap=_colormap("viridis"),
                       vmin=0.0, vmax=1.0)
    else:
        im = ax.imshow(np.ma.masked_where(~(np.isfinite(mat) & (mat > 0)), mat), aspect="auto",
                       interpolation="nearest", cmap=_colormap("viridis"), norm=_log_norm(mat))
    fig.colorbar(im, ax=ax, label="σᵢ / σ_max" if normalize else "σᵢ")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_label(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("singular value index i")
    ax.set_xlabel("layer (forward order)")
    note = f"min σ = {all_min:.3g}   min σ (shown) = {shown_min:.3g}   max σ = {all_max:.3g}"
    ax.set_title((title + "\n" if title else "") + note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return SpectraFigure(str(path), mat, names)


# ------------------------------------------------------------------------------------------ spectra over time
def _history_items(snapshots) -> list[tuple]:
    """[(step, snapshot)] sorted by step from {step: snapshot}, or in order from a list of snapshots (steps 0, 1, …)
    or of (step, snapshot) pairs."""
    if isinstance(snapshots, Mapping):
        if not all(isinstance(v, Mapping) for v in snapshots.values()):
            raise TypeError("plot_spectra_history: {step: snapshot} needs {layer: σ} mappings as values")
        return sorted(snapshots.items(), key=lambda kv: kv[0])
    items = []
    for i, entry in enumerate(snapshots):
        if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Mapping):
            items.append((entry[0], entry[1]))
        elif isinstance(entry, Mapping):
            items.append((i, entry))
        else:
            raise TypeError("plot_spectra_history: each snapshot must be a {layer: σ} mapping or a (step, mapping) "
                            "pair")
    return items


def _history_matrices(items: list[tuple], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """σ_max and σ_min/σ_max, layers × steps (NaN where a layer is missing or empty)."""
    smax = np.full((len(names), len(items)), np.nan)
    ratio = np.full((len(names), len(items)), np.nan)
    for t, (_, snap) in enumerate(items):
        for j, n in enumerate(names):
            s = snap.get(n)
            if s is None or s.numel() == 0:
                continue
            s = s.detach().double().cpu().flatten()
            hi, lo = float(s.max()), float(s.min())
            smax[j, t] = hi
            ratio[j, t] = lo / hi if hi > 0 else np.nan
    return smax, ratio


def _history_layers(items: list[tuple], layers) -> list[str]:
    """Layer names in order of first appearance, filtered by the globs of ``layers``."""
    names: list[str] = []
    for _, snap in items:
        names += [n for n in snap if n not in names]
    if layers is not None:
        names = [n for n in names if matches(n, None, as_patterns(layers))]
    if not names:
        raise ValueError("plot_spectra_history: no layers to plot")
    return names


def plot_spectra_history(snapshots, path, title: str | None = None, layers=None, dpi: int = 100) -> SpectraFigure:
    """The evolution of singular values over training: σ_max per layer vs step (top), and a heat map of
    σ_min/σ_max, layers × steps (bottom, log color scale).

    Args:
        snapshots: a list of snapshots {layer: σ} (steps 0, 1, …), a list of (step, snapshot) pairs, or
            {step: snapshot}.
        layers: globs keeping only some of the layers.
    Returns a :class:`SpectraFigure` whose ``matrix`` is σ_min/σ_max (layers × steps).
    """
    items = _history_items(snapshots)
    if not items:
        raise ValueError("plot_spectra_history: no snapshots to plot")
    steps = [s for s, _ in items]
    names = _history_layers(items, layers)
    smax, ratio = _history_matrices(items, names)
    fig = _new_figure(max(5.0, 0.08 * len(steps) + 4.0), max(5.0, 0.25 * len(names) + 4.0))
    ax1 = fig.add_subplot(2, 1, 1)
    for j, n in enumerate(names):
        ax1.plot(steps, smax[j], marker="." if len(steps) < 50 else None, label=_label(n))
    if np.nanmin(smax) > 0:
        ax1.set_yscale("log")
    ax1.set_ylabel("σ_max")
    ax1.set_xlabel("step")
    if len(names) <= 12:
        ax1.legend(fontsize=6, ncol=2)
    ax1.set_title(title or "spectra over training", fontsize=9)
    ax2 = fig.add_subplot(2, 1, 2)
    shown = np.ma.masked_where(~(np.isfinite(ratio) & (ratio > 0)), ratio)
    im = ax2.imshow(shown, aspect="auto", interpolation="nearest", cmap=_colormap("magma"),
                    norm=_log_norm(ratio, widen=True))
    fig.colorbar(im, ax=ax2, label="σ_min / σ_max")
    ax2.set_yticks(range(len(names)))
    ax2.set_yticklabels([_label(n) for n in names], fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax2.set_xticks(ticks)
    ax2.set_xticklabels([str(steps[i]) for i in ticks], fontsize=7)
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return SpectraFigure(str(path), ratio, names, steps)


# --------------------------------------------------------------------------------------- the older entry point
class SpectraPlot(str):
    """What :func:`plot_spectra` returns: the path of the written figure (a ``str``) with the
    :class:`SpectraFigure` fields as attributes — ``matrix``, ``layers``, ``steps`` — and ``kind`` (``"spectra"``
    or ``"history"``). New code should call the figure functions and use their :class:`SpectraFigure`."""

    matrix = None
    layers: list = []
    steps = None
    kind = "spectra"


def _snapshot_kind(obj) -> str:
    if isinstance(obj, nn.Module):
        return "spectra"
    if isinstance(obj, Mapping):
        values = list(obj.values())
        if values and all(isinstance(v, torch.Tensor) for v in values):
            return "spectra"
        if values and all(isinstance(v, Mapping) for v in values):
            return "history"
        if not values:
            raise ValueError("plot_spectra: empty input")
    if isinstance(obj, (list, tuple)):
        return "history"
    raise TypeError("plot_spectra expects a model, a snapshot {layer: σ}, a list of snapshots or {step: snapshot}")


def plot_spectra(model_or_snapshots, path, top_k: int = 32, title: str | None = None, layers=None,
                 normalize: bool = True, dpi: int = 100) -> SpectraPlot:
    """Draw :func:`plot_layer_spectra` for a model or one snapshot {layer: σ}, :func:`plot_spectra_history` for a
    list of snapshots, a list of (step, snapshot) pairs or {step: snapshot} (``top_k`` and ``normalize`` apply to
    the former only). Returns ``path`` as a :class:`SpectraPlot` whose ``matrix`` holds the heat-map data.
    """
    kind = _snapshot_kind(model_or_snapshots)
    if kind == "spectra":
        figure = plot_layer_spectra(model_or_snapshots, path, top_k, title, layers, normalize, dpi)
    else:
        figure = plot_spectra_history(model_or_snapshots, path, title, layers, dpi)
    out = SpectraPlot(figure.path)
    out.matrix, out.layers, out.steps, out.kind = figure.matrix, figure.layers, figure.steps, kind
    return out
