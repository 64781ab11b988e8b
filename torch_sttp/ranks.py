"""Compressing trained models: rank selection under a parameter budget, and projection with error reports.

    >>> plan = select_ranks(model, 0.3, method="svdp")        # 30 % of the selected layers' dense parameters
    >>> plan.dof, plan.energy_retained, plan.strategy
    >>> project(model, "svdp", plan)                           # convert(init="pretrained") + per-layer errors
    >>> projection_errors(model)                               # {layer: ‖W − Ŵ‖_F / ‖W‖_F}

Every layer is looked at as a matrix W (d_out × d_in) in the (d_out, C_in, *kernel) layout (a ConvTranspose weight
with its first two axes swapped), as in :mod:`torch_sttp.tt`. Its *spectral energy* at rank r is the sum of its r
largest squared singular values, ‖W‖²_F at full rank. :func:`select_ranks` chooses one rank per layer so that the
total degrees of freedom (the exact :func:`torch_sttp.tt.count_dof`) stay within the budget and the retained energy
summed over layers is as large as it can make it.

Methods, and what their DOF count:

* ``"svdp"``, ``"sttp"``: :func:`~torch_sttp.tt.count_dof` of the parametrization (``spectrum`` matters);
* ``"svd"``: plain truncated SVD stored as two dense factors, r·(d_out + d_in) parameters. Its weights are those of
  SVDP with ``spectrum="free"``: project with ``method="svdp"`` and turn the layers into factor pairs with
  :func:`torch_sttp.surgery.to_factorized`.
"""
from __future__ import annotations

import heapq
import math
import numbers
import time
import warnings
from collections.abc import Mapping
from typing import Iterable, NamedTuple

import numpy as np
import torch
from torch import nn

from .frames import frame_to_params
from .layers import SUPPORTED_TYPES, check_has_values, layout_shape, select_layers, weight_matrix
from .options import (OBJECTIVES, RANK_METHODS, STRATEGIES, check_option, check_plan_method, check_plan_spectrum,
                      check_spectrum)
from .parametrizations import parametrization_tensors, spectral_parametrization
from .progress import progress_iter
from .surgery import conversion, convert, converted_layers
from .tt import count_dof, split_modes, tt_ranks
from .allocation import allocate_ranks, uniform_ranks
from .data_aware import project_whitened
from .whitening import truncation_candidates

__all__ = [
    "RANK_METHODS",
    "OBJECTIVES",
    "RankPlan",
    "LayerSpectrum",
    "compressible_layers",
    "layer_spectra",
    "method_dof",
    "select_ranks",
    "project",
    "projection_errors",
]



# ------------------------------------------------------------------------------------------------- helpers
def method_dof(shape, method: str, rank: int, spectrum: str = "free") -> int:
    """Free parameters of one layer of weight-layout ``shape`` (d_out, C_in, *kernel) at rank cap ``rank``.

    ``"svd"`` counts two dense factors, r·(d_out + d_in) with r = min(rank, d_out, d_in); ``"svdp"``/``"sttp"`` use
    :func:`torch_sttp.tt.count_dof`.
    """
    check_option("method", method, RANK_METHODS)
    if method == "svd":
        d_out, d_in = shape[0], math.prod(shape[1:])
        return min(rank, d_out, d_in) * (d_out + d_in)
    return count_dof(tuple(shape), method, rank, spectrum)


def __getattr__(name: str):
    if name == "layer_matrix":  # the name torch_sttp.layers.weight_matrix had here
        warnings.warn("torch_sttp.ranks.layer_matrix is deprecated; use torch_sttp.layers.weight_matrix",
                      DeprecationWarning, stacklevel=2)
        return weight_matrix
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compressible_layers(model: nn.Module, include=None, exclude=None, layers=None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers :func:`select_ranks` plans for, in ``model.named_modules()`` order.

    The same rules as :func:`torch_sttp.surgery.convert`: supported types (Linear, Conv, ConvTranspose, Embedding)
    selected by ``include``/``exclude`` (qualified-name globs or module types), leaving out tied weights,
    projections inside ``nn.MultiheadAttention``, non-floating-point weights, sparse embeddings and weights that are
    already parametrized. ``layers`` (qualified names) restricts the selection further.
    """
    if converted_layers(model):
        raise ValueError("model already has SVDP/STTP layers; plan ranks on the dense model "
                         "(torch_sttp.to_dense(model) first)")
    wanted = None if layers is None else list(layers)
    names = dict(model.named_modules())
    if wanted is not None:
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ValueError(f"layers not in the model: {unknown}")
    selected, skipped = select_layers(model, include, exclude)
    out = [(n, m) for n, m in selected if wanted is None or n in wanted]
    if wanted is not None:
        left_alone = {n for n, _, _ in skipped}
        refused = [n for n in wanted if not isinstance(names[n], SUPPORTED_TYPES) or n in left_alone]
        if refused:
            raise ValueError(f"layers cannot be converted (unsupported type, tied/shared weight, inside "
                             f"nn.MultiheadAttention, or not floating point): {refused}")
    if not out:
        raise ValueError("no layer selected; supported types are " + ", ".join(t.__name__ for t in SUPPORTED_TYPES))
    return out


class LayerSpectrum:
    """Singular values of one layer's weight matrix (and, for the TT bound, of its TT unfoldings).

    ``energy[r]`` (r = 0…min(d_out, d_in)) is the sum of the r largest squared singular values; ``tt_tail(r)``
    the squared TT-SVD error bound Σ_k Σ_{i ≥ R_k(r)} σ_i(unfolding_k)² with the STTP bond ranks R_k(r).
    """

    def __init__(self, name: str, shape: tuple[int, ...], sv: np.ndarray, unfolding_sv: list | None = None):
        self.name = name
        self.shape = shape
        self.d_out, self.d_in = shape[0], math.prod(shape[1:])
        self.sv = sv
        self.energy = np.concatenate([[0.0], np.cumsum(sv.astype(np.float64) ** 2)])
        self.total = float(self.energy[-1])
        self.unfolding_sv = unfolding_sv  # [(bond size cap min(left, right), σ (desc.))] for STTP

    @property
    def dense(self) -> int:
        return self.d_out * self.d_in

    @property
    def full_rank(self) -> int:
        return min(self.d_out, self.d_in)

    def svd_error(self, rank: int) -> float:
        """Relative Frobenius error of the rank-``rank`` truncated SVD (Eckart–Young)."""
        if self.total <= 0:
            return 0.0
        kept = self.energy[min(rank, len(self.energy) - 1)]
        return math.sqrt(max(0.0, 1.0 - kept / self.total))

    def tt_tails(self, ranks: np.ndarray) -> np.ndarray:
        """Squared TT-SVD error bound (absolute) for each rank cap in ``ranks``."""
        if self.unfolding_sv is None:
            raise ValueError(f"{self.name}: unfolding spectra were not computed (STTP only)")
        out = np.zeros(len(ranks), dtype=np.float64)
        for cap, sv in self.unfolding_sv:
            tail = np.concatenate([np.cumsum((sv.astype(np.float64) ** 2)[::-1])[::-1], [0.0]])
            keep = np.minimum(ranks, cap)
            out += tail[np.minimum(keep, len(sv))]
        return out

    def tt_error(self, rank: int) -> float:
        """TT-SVD upper bound on the relative error of the STTP projection at rank cap ``rank`` (clipped to 1)."""
        if self.total <= 0:
            return 0.0
        return min(1.0, math.sqrt(float(self.tt_tails(np.array([rank]))[0]) / self.total))


def _svdvals(mat: torch.Tensor) -> np.ndarray:
    """Singular values (descending) of a float64 matrix, as a fresh numpy array (no tensor storage kept alive)."""
    return np.array(torch.linalg.svdvals(mat).tolist(), dtype=np.float64)


def _unfolding_spectra(w: torch.Tensor, shape: tuple[int, ...], sv: np.ndarray) -> list:
    """[(bond cap, σ of the unfolding at that bond)] for the inner STTP bonds that can be truncated (cap > 1); the
    caps are the Holtz bound without a rank cap (:func:`torch_sttp.tt.tt_ranks`). ``w`` is the (d_out, d_in) matrix,
    ``sv`` its singular values (those of the d_out | d_in bond)."""
    out_modes, in_modes = split_modes(shape, "sttp")
    modes = out_modes + in_modes
    caps = tt_ranks(modes, math.prod(modes))
    unf, left = [], 1
    for k in range(1, len(modes)):
        left *= modes[k - 1]
        if caps[k] <= 1:
            continue  # a bond of size 1 is never truncated below its bound
        # the d_out | d_in bond is the matrix itself; the others are views of the same float64 copy
        unf.append((caps[k], sv if k == len(out_modes) else _svdvals(w.reshape(left, -1))))
    return unf


def layer_spectra(layers: Iterable[tuple[str, nn.Module]], unfoldings: bool = False) -> list[LayerSpectrum]:
    """Thin singular values (``torch.linalg.svdvals``, float64) of each layer's matrix W (d_out, d_in); with
    ``unfoldings`` also those of the STTP unfoldings whose bond can be truncated (needed for the TT-SVD bound)."""
    out = []
    with torch.no_grad():
        for name, module in layers:
            check_has_values(module, "a spectrum", name)
            shape = layout_shape(module)
            # one float64 copy per layer; the unfoldings are views of it (a copy per unfolding, interleaved with
            # the small results, fragments the heap: hundreds of MB of RSS on MiniLM)
            w = weight_matrix(module).detach().to(torch.float64).contiguous()
            sv = _svdvals(w)
            out.append(LayerSpectrum(name, shape, sv, _unfolding_spectra(w, shape, sv) if unfoldings else None))
            del w
    return out


# --------------------------------------------------------------------------------------------------- the plan
class RankPlan(Mapping):
    """A rank per layer (a ``Mapping`` that ``convert(model, rank=plan)`` accepts), with what it costs and keeps.

    Attributes:
        method, spectrum, objective, strategy: how it was made (``strategy`` is "greedy", "uniform" or — for a plan
            made with ``select_ranks(calibration=...)``, ``objective`` "whitened" — "loss").
        dof: total free parameters of the planned layers (never above ``budget``).
        budget: the DOF budget it was made for; ``dense``: the planned layers' dense weight parameters.
        energy_retained: Σ_layers (top-r squared singular values) / Σ_layers ‖W‖²_F.
        layer_dof: DOF per layer.
        predicted_error: per layer, relative Frobenius error ‖W − Ŵ‖_F/‖W‖_F predicted for the projection with
            ``spectrum="free"``: exact (Eckart–Young) for "svd" and "svdp"; for "sttp" the TT-SVD *upper bound*
            √(Σ_k Σ_{i≥R_k} σ_i(unfolding_k)²)/‖W‖_F clipped to 1 (the projection's actual error lies between
            ``svd_error`` and this).
        svd_error: per layer, the truncated-SVD error at the layer's middle rank (a lower bound for "sttp").
    """

    def __init__(self, ranks: Mapping[str, int], *, method: str, spectrum: str, objective: str, strategy: str,
                 dof: int, budget: int, dense: int, energy_retained: float, layer_dof: Mapping[str, int],
                 predicted_error: Mapping[str, float], svd_error: Mapping[str, float]):
        self._ranks = {k: int(v) for k, v in ranks.items()}
        self.method = method
        self.spectrum = spectrum
        self.objective = objective
        self.strategy = strategy
        self.dof = int(dof)
        self.budget = int(budget)
        self.dense = int(dense)
        self.energy_retained = float(energy_retained)
        self.layer_dof = dict(layer_dof)
        self.predicted_error = dict(predicted_error)
        self.svd_error = dict(svd_error)

    def __getitem__(self, key: str) -> int:
        return self._ranks[key]

    def __iter__(self):
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    @property
    def fraction(self) -> float:
        """dof / dense."""
        return self.dof / self.dense if self.dense else 0.0

    def to_dict(self) -> dict:
        """A JSON-serialisable description (ranks and all attributes)."""
        return {
            "ranks": dict(self._ranks), "method": self.method, "spectrum": self.spectrum,
            "objective": self.objective, "strategy": self.strategy, "dof": self.dof, "budget": self.budget,
            "dense": self.dense, "fraction": self.fraction, "energy_retained": self.energy_retained,
            "layer_dof": dict(self.layer_dof), "predicted_error": dict(self.predicted_error),
            "svd_error": dict(self.svd_error),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "RankPlan":
        return cls(d["ranks"], method=d["method"], spectrum=d["spectrum"], objective=d.get("objective", "svd"),
                   strategy=d["strategy"], dof=d["dof"], budget=d["budget"], dense=d["dense"],
                   energy_retained=d["energy_retained"], layer_dof=d["layer_dof"],
                   predicted_error=d["predicted_error"], svd_error=d["svd_error"])

    def summary(self) -> str:
        """A plain-text table: layer, rank, DOF, predicted error."""
        width = max([len(n) for n in self._ranks] + [5])
        lines = [f"{'layer':<{width}}  {'rank':>5}  {'dof':>9}  {'pred.err':>8}"]
        for n, r in self._ranks.items():
            lines.append(f"{n:<{width}}  {r:>5}  {self.layer_dof[n]:>9}  {self.predicted_error[n]:>8.4f}")
        proxy = " (SVD energy: inner TT bonds not counted; see pred.err)" if (self.method, self.objective) == (
            "sttp", "svd") else ""
        lines.append(f"{self.method}/{self.strategy}: dof {self.dof} of budget {self.budget} "
                     f"({self.fraction:.3f} of {self.dense} dense), energy retained {self.energy_retained:.4f}{proxy}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"RankPlan(method={self.method!r}, strategy={self.strategy!r}, layers={len(self)}, dof={self.dof}, "
                f"budget={self.budget}, fraction={self.fraction:.3f}, energy_retained={self.energy_retained:.4f})")


# --------------------------------------------------------------------------------------------- rank selection
def _budget_dof(budget, dense: int) -> int:
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a fraction in (0, 1] or a positive DOF count, got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"an integer budget is a DOF count and must be ≥ 1, got {budget}")
        return int(budget)
    if isinstance(budget, numbers.Real):
        b = float(budget)
        if not (0.0 < b <= 1.0) or math.isnan(b):
            raise ValueError(f"a float budget is a fraction of the dense parameters and must lie in (0, 1], got "
                             f"{budget!r}; pass an int for an absolute DOF count")
        return int(math.floor(b * dense))
    raise ValueError(f"budget must be a float in (0, 1] or an int DOF count, got {type(budget).__name__}")


def _best_jump(gain: np.ndarray, dof: np.ndarray, r: int, remaining: int):
    """Best (ratio, new rank, cost) of moving one layer from rank r to any r' > r within ``remaining`` DOF.

    ``gain``/``dof`` are indexed by rank (index 0 unused). Returns None when no jump with positive gain fits.
    """
    g = gain[r + 1:] - gain[r]
    c = dof[r + 1:] - dof[r]
    ok = (c <= remaining) & (g > 0)
    if not ok.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(c > 0, g / np.maximum(c, 1), np.inf)
    ratio = np.where(ok, ratio, -np.inf)
    best = ratio.max()
    # among equally good jumps take the longest (more energy for the same rate)
    idx = int(np.flatnonzero(ratio == best)[-1])
    return float(best), r + 1 + idx, int(c[idx])


def select_ranks(
    model: nn.Module,
    budget,
    method: str = "svdp",
    spectrum: str = "free",
    include=None,
    exclude=None,
    layers=None,
    objective: str = "svd",
    strategy: str = "auto",
    spectra: list[LayerSpectrum] | None = None,
    calibration=None,
    floor: float = 0.5,
    sensitivity: Mapping[str, float] | None = None,
) -> RankPlan:
    """Choose a rank per layer maximising the retained spectral energy within a DOF budget — or, with
    ``calibration``, minimising the measured whitened truncation loss.

    Args:
        budget: a float in (0, 1] — a fraction of the selected layers' dense weight parameters (Σ d_out·d_in;
            biases are not counted) — or an int, an absolute DOF count.
        method: ``"svdp"``, ``"sttp"`` or ``"svd"`` (two dense factors, r·(d_out + d_in) per layer).
        spectrum: the spectrum the layers will be converted with; it changes the DOF count (``"identity"`` has no
            S). Predicted errors assume ``"free"`` (the only spectrum whose projection keeps the weight's scale).
        include, exclude, layers: which layers (see :func:`compressible_layers`).
        objective: ``"svd"`` — the energy of layer l at rank r is the sum of its r largest squared singular values;
            ``"tt"`` (``method="sttp"`` only) — ‖W‖² minus the squared TT-SVD error bound, which also charges the
            truncation of the inner bonds of the train. For STTP, ``"svd"`` is a proxy that ignores the inner bonds:
            its ranks stop at min(d_out, d_in), where a lossless train may need more (a budget of 1.0 then leaves
            DOF unspent, and its energy reads 1 while the predicted errors do not); ``"tt"`` plans up to the
            Holtz bound.
        strategy: ``"auto"`` (the better of the greedy and the best uniform plan), ``"greedy"`` or ``"uniform"``.
        spectra: precomputed :func:`layer_spectra` of the same layers (to plan several budgets without new SVDs).
        calibration: a :class:`~torch_sttp.calibration.Calibration` of the selected layers: the loss-aware plan
            (``strategy="auto"`` and ``objective="svd"`` only). Each layer's loss at rank r is its relative whitened
            truncation loss ‖(W − Ŵ_r)·L‖²_F / ‖W·L‖²_F (the relative error² of its output on the calibration data;
            :func:`torch_sttp.whitening.truncation_candidates`): exact from the whitened spectrum for "svd"/"svdp",
            the measured loss of the whitened TT-SVD on a grid of about 16 rank caps for "sttp". The budget goes to
            the smallest total loss (:func:`torch_sttp.allocation.allocate_ranks`: a Lagrangian relaxation, the
            leftover to the best loss decrease per DOF, kept only if it beats the uniform plan's loss).
        floor: the loss-aware plan's per-layer floor: no layer gets a rank below ⌈floor · u_l⌉ (rounded up to a
            candidate), u_l its rank in the uniform plan of the same budget, so a small layer with a steep loss
            curve (a classifier) is never cut to rank 1; ``floor=0`` removes it (default 0.5, in [0, 1]).
        sensitivity: with ``calibration``, {layer: s_l} from :func:`torch_sttp.calibration.layer_sensitivity`
            (how far the model's output moves per unit of error in the layer's output): each layer's loss is then
            s_l·‖(W − Ŵ_r)·L‖²_F, the predicted change of the model's output, instead of the relative error, so
            layers of different roles and depths are weighed by what they do to the output.

    With ``calibration`` the plan's ``strategy`` is ``"loss"`` (``"uniform"`` when the common rank leaves the
    smaller loss) and its ``objective`` ``"whitened"``; its energy and error fields stay the data-free ones.
    The greedy allocation starts every layer at rank 1 and repeatedly applies the move — raising one layer's rank
    from r to any r' > r — with the largest energy gained per DOF spent that still fits the budget (looking at all
    r' rather than r + 1 matters: a layer's next singular value may be worth little while a few more are worth a
    lot, and SVDP's marginal DOF shrinks with r). The best uniform plan is the largest common rank cap that fits.
    Raises ``ValueError`` when the budget is below the all-rank-1 DOF (the message names that minimum).
    """
    _check_plan_options(method, spectrum, objective, strategy)
    if calibration is not None and (strategy != "auto" or objective != "svd"):
        raise ValueError(f"select_ranks(calibration=...) makes the loss-aware plan; leave strategy='auto' and "
                         f"objective='svd' (got {strategy!r}, {objective!r}), or drop calibration= for that plan")
    selected = compressible_layers(model, include, exclude, layers)
    if sensitivity is not None and calibration is None:
        raise ValueError("select_ranks(sensitivity=...) weighs the whitened losses: pass calibration= as well")
    missing = [n for n, _ in selected if calibration is not None and n not in calibration]
    if missing:
        raise ValueError(f"select_ranks: layers {missing[:4]} have no calibration statistic; calibrate them "
                         "(torch_sttp.calibrate(model, batches, include=...)) or leave them out (exclude=...)")
    missing = [n for n, _ in selected if sensitivity is not None and n not in sensitivity]
    if missing:
        raise ValueError(f"select_ranks: layers {missing[:4]} have no sensitivity; measure them "
                         "(torch_sttp.calibration.layer_sensitivity(model, batches, include=...)) or leave them out "
                         "(exclude=...)")
    spectra = _planned_spectra(selected, spectra, unfoldings=method == "sttp")
    dense = sum(s.dense for s in spectra)
    bdof = _budget_dof(budget, dense)
    if calibration is not None:
        return _loss_aware_plan(model, selected, spectra, calibration, bdof, dense, method, spectrum, floor,
                                sensitivity)
    tables = [_rank_table(s, method, spectrum, objective) for s in spectra]
    minimum = int(sum(t.dof[1] for t in tables))
    if bdof < minimum:
        raise ValueError(f"budget of {bdof} DOF is below the minimum {minimum} (every selected layer at rank 1, "
                         f"{minimum / dense:.4%} of {dense} dense parameters) for method={method!r}")
    candidates = []
    if strategy in ("auto", "greedy"):
        candidates.append(("greedy", _greedy_ranks(tables, bdof - minimum)))
    if strategy in ("auto", "uniform"):
        candidates.append(("uniform", _uniform_ranks(tables, bdof)))
    # the better by retained energy; on a tie the uniform plan (listed last) is kept only if strictly better
    name, ranks = candidates[0]
    for cand_name, cand_ranks in candidates[1:]:
        if _energy_of(tables, cand_ranks) > _energy_of(tables, ranks):
            name, ranks = cand_name, cand_ranks
    return _make_plan(spectra, tables, ranks, bdof, dense, method=method, spectrum=spectrum, objective=objective,
                      strategy=name)


def _loss_aware_plan(model, selected, spectra, calibration, bdof: int, dense: int, method: str, spectrum: str,
                     floor: float, sensitivity=None) -> RankPlan:
    """The plan of :func:`select_ranks` with ``calibration``: relative (or sensitivity-weighted) whitened
    truncation losses allocated by :func:`torch_sttp.allocation.allocate_ranks` with ``floor``."""
    names = [n for n, _ in selected]
    candidates = truncation_candidates(model, method, calibration, layers=names, spectrum=spectrum,
                                       normalize=sensitivity is None, weights=sensitivity)
    chosen = allocate_ranks(candidates, bdof, floor=floor)
    strategy = "uniform" if chosen == uniform_ranks(candidates, bdof) else "loss"
    objective = "tt" if method == "sttp" else "svd"  # the DOF tables only; energies stay data-free
    tables = [_rank_table(s, method, spectrum, objective) for s in spectra]
    return _make_plan(spectra, tables, [chosen[n] for n in names], bdof, dense, method=method, spectrum=spectrum,
                      objective="whitened", strategy=strategy)


class _RankTable(NamedTuple):
    """One layer's usable ranks 1…rmax, with its objective energy ``gain`` and DOF ``dof`` indexed by rank."""

    rmax: int
    gain: np.ndarray
    dof: np.ndarray


def _check_plan_options(method: str, spectrum: str, objective: str, strategy: str) -> None:
    check_option("method", method, RANK_METHODS)
    check_spectrum(spectrum)
    check_option("objective", objective)
    if objective == "tt" and method != "sttp":
        raise ValueError("objective='tt' (the TT-SVD bound) only applies to method='sttp'")
    check_option("strategy", strategy)


def _planned_spectra(selected, spectra: list[LayerSpectrum] | None, unfoldings: bool) -> list[LayerSpectrum]:
    """The spectra of the selected layers, in their order: computed now, or picked from precomputed ones."""
    if spectra is None:
        return layer_spectra(selected, unfoldings=unfoldings)
    by_name = {s.name: s for s in spectra}
    missing = [n for n, _ in selected if n not in by_name]
    if missing:
        raise ValueError(f"spectra do not cover the selected layers {missing[:3]}…")
    spectra = [by_name[n] for n, _ in selected]
    if unfoldings and any(s.unfolding_sv is None for s in spectra):
        raise ValueError("method='sttp' needs spectra computed with unfoldings=True")
    return spectra


def _rank_table(s: LayerSpectrum, method: str, spectrum: str, objective: str) -> _RankTable:
    """Objective energy and DOF of one layer at every usable rank. ``"svd"``: ranks up to min(d_out, d_in), energy
    the top-r squared singular values; ``"tt"``: ranks up to the largest Holtz bound of the train, energy ‖W‖²
    minus the squared TT-SVD error bound."""
    if objective == "tt":
        modes = sum(split_modes(s.shape, "sttp"), [])
        rmax = max(tt_ranks(modes, math.prod(modes)))
        gain = s.total - s.tt_tails(np.arange(0, rmax + 1))
        gain[0] = -np.inf
    else:
        rmax = s.full_rank
        gain = s.energy[: rmax + 1].copy()
    dof = np.zeros(rmax + 1, dtype=np.int64)
    for r in range(1, rmax + 1):
        dof[r] = method_dof(s.shape, method, r, spectrum)
    return _RankTable(rmax, gain, dof)


def _energy_of(tables: list[_RankTable], ranks: list[int]) -> float:
    return float(sum(t.gain[r] for t, r in zip(tables, ranks)))


def _greedy_ranks(tables: list[_RankTable], remaining: int) -> list[int]:
    """From rank 1 everywhere, repeatedly the jump with the best energy per DOF that fits in ``remaining`` DOF."""
    ranks = [1] * len(tables)
    heap: list = []

    def push(i: int) -> None:  # layer i's best jump from its current rank, if one fits
        jump = _best_jump(tables[i].gain, tables[i].dof, ranks[i], remaining)
        if jump is not None:
            heapq.heappush(heap, (-jump[0], i, ranks[i], jump[1], jump[2]))

    for i in range(len(tables)):
        push(i)
    while heap:
        _, i, r_at, target, cost = heapq.heappop(heap)
        if r_at != ranks[i] or cost > remaining:  # stale, or no longer affordable: recompute
            push(i)
            continue
        ranks[i] = target
        remaining -= cost
        push(i)
    return ranks


def _uniform_ranks(tables: list[_RankTable], bdof: int) -> list[int]:
    """The largest common rank cap whose total DOF fits in ``bdof`` (totals are not always monotone in the cap)."""
    caps = np.arange(1, max(t.rmax for t in tables) + 1)
    totals = sum(t.dof[np.minimum(caps, t.rmax)] for t in tables)
    fits = np.flatnonzero(totals <= bdof)
    best = int(caps[fits[-1]]) if len(fits) else 1
    return [min(best, t.rmax) for t in tables]


def _make_plan(spectra: list[LayerSpectrum], tables: list[_RankTable], ranks: list[int], bdof: int, dense: int,
               **how) -> RankPlan:
    """The :class:`RankPlan` of ``ranks``: DOF, retained energy, predicted and truncated-SVD errors per layer."""
    layer_dof = {s.name: int(t.dof[r]) for s, t, r in zip(spectra, tables, ranks)}
    total_dof = sum(layer_dof.values())
    assert total_dof <= bdof, (total_dof, bdof)
    svd_err = {s.name: s.svd_error(min(r, s.full_rank)) for s, r in zip(spectra, ranks)}
    if how["method"] == "sttp":
        pred = {s.name: s.tt_error(r) for s, r in zip(spectra, ranks)}
    else:
        pred = dict(svd_err)
    total_energy = sum(s.total for s in spectra)
    kept = sum(float(s.energy[min(r, s.full_rank)]) for s, r in zip(spectra, ranks))
    return RankPlan({s.name: r for s, r in zip(spectra, ranks)}, dof=total_dof, budget=bdof, dense=dense,
                    energy_retained=kept / total_energy if total_energy > 0 else 1.0, layer_dof=layer_dof,
                    predicted_error=pred, svd_error=svd_err, **how)


# ------------------------------------------------------------------------------------------------- projection
def _relative_error(dense: torch.Tensor, approx: torch.Tensor) -> float:
    d = dense.detach().to(torch.float64)
    a = approx.detach().to(torch.float64)
    norm = torch.linalg.vector_norm(d)
    diff = torch.linalg.vector_norm(d - a)
    return float(diff / norm) if norm > 0 else float(diff)


def project(
    model: nn.Module,
    method: str = "svdp",
    rank_or_plan=64,
    spectrum: str = "free",
    progress: bool = False,
    randomized: bool = False,
    include=None,
    exclude=None,
    oversample: int = 10,
    niter: int = 2,
    calibration=None,
    sequential: bool = False,
    batches=None,
    release_statistics: bool = False,
    **convert_kwargs,
) -> nn.Module:
    """Convert ``model`` with projected pretrained weights and record each layer's approximation error.

    Runs :func:`torch_sttp.surgery.convert` with ``init="pretrained"`` (truncated SVD / TT-SVD) and records
    ``{layer: ‖W − Ŵ‖_F / ‖W‖_F}`` — W the dense weight before conversion, Ŵ the converted layer's weight — and the
    time taken in the model's conversion record (``torch_sttp.conversion(model).record_projection``; read the errors
    with :func:`projection_errors`). Returns ``model`` (converted in place). ``rank_or_plan`` is an int rank cap or a mapping such as a :class:`RankPlan` (a plan made for
    ``"svd"`` is projected with ``method="svdp"``: same weights).

    ``randomized=True`` (SVDP with the "free" or "normalized" spectrum) replaces the exact SVD by
    ``torch.svd_lowrank`` with ``oversample`` extra columns and ``niter`` power iterations, in float32, for layers
    where the rank is small next to min(d_out, d_in) (others get an exact thin SVD): the layers are converted with
    identity frames and their reflectors are then set from the computed factors. Errors are measured all the same.
    With a non-"free" spectrum the recorded error includes the change of scale (normalized) or of singular values
    (identity) that the projection makes.

    **Data-aware** (``calibration`` — a :class:`~torch_sttp.calibration.Calibration` of the projected layers —,
    ``batches`` alone (the statistics are computed from them), or ``sequential=True`` with ``batches``, a list):
    each layer's Ŵ minimises ‖(W − Ŵ)·X‖_F on the calibration data instead of ‖W − Ŵ‖_F, through
    :func:`torch_sttp.data_aware.project_whitened` (sequential: layers in forward order, each group of layers
    calibrated on the already projected model). The same record is written (relative weight errors, seconds);
    ``randomized`` does not apply. ``release_statistics`` frees each layer's statistic in ``calibration`` once it
    is projected (see :func:`~torch_sttp.data_aware.project_whitened`; the calibration is consumed).
    """
    _check_projection(method, rank_or_plan, spectrum, randomized, convert_kwargs)
    if calibration is not None or batches is not None or sequential:
        if randomized:
            raise ValueError("randomized=True is data-free; drop it to project with calibration/batches/sequential")
        if sequential and calibration is not None:
            raise ValueError("sequential=True collects each layer's statistics from batches on the partly projected "
                             "model; pass batches=[...] and drop calibration=")
        rank = dict(rank_or_plan) if isinstance(rank_or_plan, Mapping) else rank_or_plan
        project_whitened(model, method, rank, calibration, batches=batches, sequential=sequential,
                         spectrum=spectrum, include=include, exclude=exclude, progress=progress,
                         release_statistics=release_statistics, **convert_kwargs)
        return model
    if release_statistics:
        raise ValueError("release_statistics frees calibration statistics; a data-free projection has none (pass "
                         "calibration= or drop release_statistics)")
    originals = {name: m.weight for name, m in model.named_modules()
                 if isinstance(m, SUPPORTED_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)}
    rank = dict(rank_or_plan) if isinstance(rank_or_plan, Mapping) else rank_or_plan
    t0 = time.perf_counter()
    if randomized:
        convert(model, method, rank, spectrum, init="identity", include=include, exclude=exclude,
                progress=False, **convert_kwargs)
        _project_randomized(model, originals, oversample, niter, progress)
    else:
        convert(model, method, rank, spectrum, init="pretrained", include=include, exclude=exclude,
                progress=progress, **convert_kwargs)
    seconds = time.perf_counter() - t0
    errors = {}
    with torch.no_grad():
        for name, module in converted_layers(model):
            errors[name] = _relative_error(originals.pop(name), module.weight)
    originals.clear()
    conversion(model).record_projection(errors, seconds)
    return model


def _check_projection(method: str, rank_or_plan, spectrum: str, randomized: bool, convert_kwargs: Mapping) -> None:
    """The arguments of :func:`project` that ``convert`` does not check itself."""
    check_plan_method(rank_or_plan, method)
    check_plan_spectrum(rank_or_plan, spectrum)  # before the plan becomes a plain rank mapping for convert
    if randomized:
        if method != "svdp":
            raise ValueError("randomized=True is implemented for method='svdp' only")
        if spectrum == "identity":
            raise ValueError("randomized=True needs spectrum 'free' or 'normalized'")
    if "init" in convert_kwargs:
        raise ValueError("project always converts with init='pretrained' (or its randomized equivalent)")


def _project_randomized(model: nn.Module, originals: Mapping[str, torch.Tensor], oversample: int, niter: int,
                        progress: bool) -> None:
    """Set every converted SVDP layer of ``model`` from a (randomized) truncated SVD of its dense weight."""
    layers = progress_iter(converted_layers(model), progress, "project (randomized)", "layer")
    for name, module in layers:
        _set_svdp_from_svd(module, originals[name], oversample, niter)


def _set_svdp_from_svd(module: nn.Module, dense: torch.Tensor, oversample: int, niter: int) -> None:
    """Reflectors and S of an SVDP layer from a (randomized) truncated SVD of its dense weight ``dense``."""
    p = spectral_parametrization(module)
    w = weight_matrix(module, dense.detach()).to(torch.float32)
    r = p.r_mid
    q = r + oversample
    if q < min(p.d_out, p.d_in) // 2:
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.mT
    u, s, v = u[:, :r], s[:r], v[:, :r]
    u_params, su = frame_to_params(u)
    v_params, sv = frame_to_params(v)
    o0, o1, o2 = parametrization_tensors(module)
    with torch.no_grad():
        o0.copy_(p.u_side.pack([u_params]).to(o0.dtype))
        o1.copy_(p.v_side.pack([v_params]).to(o1.dtype))
        o2.copy_((s * su * sv).to(o2.dtype))


def projection_errors(model: nn.Module, originals: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Per converted layer, ‖W − Ŵ‖_F / ‖W‖_F.

    With ``originals`` — the dense weights, either ``{layer name: weight}`` or a dense ``state_dict`` (keys
    ``"<layer>.weight"``) — the errors are computed now from the converted model; without, the errors recorded by
    :func:`project` are returned.
    """
    if originals is None:
        record = conversion(model)
        errors = record.projection_errors if record is not None and record.projection_seconds is not None else None
        if errors is None:
            raise ValueError("no projection errors recorded on this model: convert it with torch_sttp.ranks.project, "
                             "or pass the dense weights (originals={name: weight} or a dense state_dict)")
        return dict(errors)
    out = {}
    with torch.no_grad():
        for name, module in converted_layers(model):
            w = originals.get(name)
            if w is None:
                w = originals.get(f"{name}.weight" if name else "weight")
            if w is None:
                raise ValueError(f"no dense weight given for layer {name!r}")
            out[name] = _relative_error(w, module.weight)
    return out
