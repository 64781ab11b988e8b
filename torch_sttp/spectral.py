"""The spectral toolbox in one namespace: what a model's spectra are, how to regularize them, the dense baselines,
and figures. Each concept lives in its own module; this one re-exports their public names.

    >>> sv = spectral.singular_values(model)              # {layer name: σ descending}, forward order
    >>> loss = task_loss + 1e-2 * spectral.penalty(model, "d_optimal")
    >>> opt = torch.optim.Adam(spectral.param_groups(model, weight_decay=1e-4), lr=2e-4)
    >>> spectral.plot_spectra(model, "spectra.png", top_k=32)

* :mod:`torch_sttp.inspection` — singular values (exact |Σ| for SVDP/STTP layers, ``svdvals`` for dense ones),
  per-layer statistics, convolution operator norms;
* :mod:`torch_sttp.penalties` — the D-optimal and divergence penalties, the L2 penalty on learned spectra,
  optimizer parameter groups and their check;
* :mod:`torch_sttp.baselines` — spectral normalization (SN) and spectral regularization (SR) of dense layers;
* :mod:`torch_sttp.plots` — one function per figure.
"""
from __future__ import annotations

from .baselines import SpectralRegularizer, apply_spectral_norm, apply_spectral_regularization, dense_layers, sr_target
from .inspection import (
    conv_operator_norm,
    layer_singular_values,
    singular_values,
    snapshot_spectra,
    spectral_layers,
    spectral_stats,
)
from .penalties import (
    PENALTIES,
    check_optimizer,
    d_optimal_penalty,
    divergence_penalty,
    param_groups,
    penalty,
    sigma_l2_penalty,
)
from .plots import SpectraFigure, SpectraPlot, plot_layer_spectra, plot_spectra, plot_spectra_history

__all__ = [
    "singular_values",
    "snapshot_spectra",
    "spectral_stats",
    "conv_operator_norm",
    "layer_singular_values",
    "spectral_layers",
    "penalty",
    "d_optimal_penalty",
    "divergence_penalty",
    "sigma_l2_penalty",
    "param_groups",
    "check_optimizer",
    "apply_spectral_norm",
    "SpectralRegularizer",
    "apply_spectral_regularization",
    "dense_layers",
    "sr_target",
    "plot_spectra",
    "plot_layer_spectra",
    "plot_spectra_history",
    "SpectraFigure",
    "SpectraPlot",
    "PENALTIES",
]
