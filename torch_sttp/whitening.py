"""Data-aware projection of one layer's pretrained weight onto SVDP/STTP: the whitened metric, whitened truncation
and its losses (the model-level projection is :func:`torch_sttp.data_aware.project_whitened`).

With a layer's calibration statistic C = E[x xᵀ] (:mod:`torch_sttp.calibration`) and L its Cholesky factor
(L·Lᵀ = C), the error of the layer's output over the calibration data is

    ‖(W − Ŵ)·X‖²_F / N = tr((W − Ŵ)·C·(W − Ŵ)ᵀ) = ‖(W − Ŵ)·L‖²_F          (the *whitened loss*).

* **SVDP** (and plain two factors): with W·L = P·Σ·Qᵀ, Ŵ = P_rΣ_rQ_rᵀ·L⁻¹ is the exact minimiser over all matrices
  of rank ≤ r, and its loss is Σ_{i>r} σ_i² (each dropped singular value of W·L costs exactly its square).
* **STTP**: a TT-SVD in the whitened metric — the sweep over the d_out modes runs on W·L (left projections commute
  with the whitening, so each of these truncations is optimal in the metric), the d_in side is the TT-SVD of the
  unwhitened remainder — then a block step on the d_out cores (the exact optimum over all d_out-side factors given
  the d_in side, re-compressed into the train: :func:`row_block_update`) and L-BFGS steps on ‖(W − Ŵ)·L‖² over
  the cores. The result is the best, in the whitened metric, of the data-free TT-SVD, the whitened TT-SVD and the
  refined train: never worse than the data-free projection.
* **Embedding**: the metric weighs the rows, ‖diag(√f)·(W − Ŵ)‖_F with f the token frequencies; the same
  algorithms run on the transposed problem (the tensor with its modes reversed).

**Damping**: C is replaced by C + λ·mean(diag C)·I (λ = ``damping``, default :data:`DAMPING`), so L exists when
C is singular (fewer samples than inputs, dead inputs, a constant feature); directions the data never excites are
then fitted as in the data-free projection, with the small weight λ. A statistic that is all zero gives the
identity metric (data-free). Large λ tends to the data-free projection.

The projected Ŵ has rank ≤ r (SVDP) or TT ranks within the STTP bonds, so loading it with the parametrization's
``right_inverse`` (``convert(init="pretrained")``) is exact for the spectrum ``"free"``. With ``"normalized"`` the
layer keeps Ŵ/σ_max(Ŵ) and with ``"identity"`` Ŵ's singular values become 1, as for any dense weight, so the
whitened optimality holds only for ``"free"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Mapping

import numpy as np
import torch
from torch import nn

from .allocation import RankCandidates
from .layers import check_has_values, layer_kind, layout_shape, matrix_to_weight, select_layers, weight_matrix
from .options import RANK_METHODS, check_method, check_option, check_rank, check_spectrum
from .tt import contract_train, contract_train_from_right, count_dof, split_modes, tt_ranks, tt_svd

if TYPE_CHECKING:  # the statistics' container sits above this module (it offers :class:`WhitenedProjector`)
    from .calibration import Calibration

__all__ = ["DAMPING", "REFINE_ITERS", "Whitener", "LayerMetric", "layer_metric", "is_centered", "check_output_scales",
           "whitened_svd", "whitened_train", "row_block_update", "factored_loss", "refine_train", "LayerProjection",
           "project_layer", "WhitenedProjector", "truncation_candidates"]

DAMPING = 1e-3
REFINE_ITERS = 10


class Whitener:
    """The metric ‖E‖²_C = tr(E·C·Eᵀ) on the columns of a matrix E (…, d): C (d × d, symmetric positive definite,
    factor L lower triangular with L·Lᵀ = C) or a positive diagonal c (d,) (factor √c). ``factored=False`` holds C
    alone, for e·C and losses: L is then neither formed nor checked until it is used."""

    def __init__(self, gram: torch.Tensor, factored: bool = True):
        self.gram = gram
        self.diagonal = gram.dim() == 1
        self._factor = None
        fix = "the statistic is singular; use damping > 0 (layer_metric(..., damping=...))"
        if self.diagonal:
            if not bool((gram > 0).all()):
                raise ValueError(f"metric weights must be positive: {fix}")
            self._factor = gram.sqrt()
        elif factored:
            factor, info = torch.linalg.cholesky_ex(gram)
            if int(info) != 0:
                raise ValueError(f"metric is not positive definite: {fix}")
            self._factor = factor

    @property
    def factor(self) -> torch.Tensor:
        """L (lower triangular, L·Lᵀ = C), or √c for a diagonal metric."""
        if self._factor is None:
            self._factor = torch.linalg.cholesky(self.gram)
        return self._factor

    def without_factor(self) -> "Whitener":
        """The same metric holding C alone (L is computed again if it is used): for the steps that need only e·C
        and losses, so that L's d × d entries are freed."""
        return self if self.diagonal else Whitener(self.gram, factored=False)

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """m·L."""
        return m * self.factor if self.diagonal else m @ self.factor

    def solve(self, m: torch.Tensor) -> torch.Tensor:
        """m·L⁻¹."""
        if self.diagonal:
            return m / self.factor
        return torch.linalg.solve_triangular(self.factor, m, upper=False, left=False)

    def gram_apply(self, e: torch.Tensor) -> torch.Tensor:
        """e·C."""
        return e * self.gram if self.diagonal else e @ self.gram

    def loss(self, e: torch.Tensor) -> float:
        """tr(e·C·eᵀ) = ‖e·L‖²_F."""
        return float((e * self.gram_apply(e)).sum())

    def marginal(self, lead: int) -> "Whitener":
        """The metric on the trailing index t of columns (a, t), a < ``lead``: the partial trace Σ_a C[(a,·),(a,·)]
        / lead (the metric a column error that repeats for every a would see, cross-a correlations left out)."""
        if self.diagonal:
            return Whitener(self.gram.reshape(lead, -1).mean(0))
        trail = self.gram.shape[0] // lead
        return Whitener(self.gram.reshape(lead, trail, lead, trail).diagonal(dim1=0, dim2=2).mean(-1))


def _damped(moment: torch.Tensor, damping: float) -> torch.Tensor:
    """C + λ·mean(diag C)·I (a vector moment: c + λ·mean(c)), computed in place in ``moment`` (a fresh tensor);
    the identity when C is zero."""
    diag = moment if moment.dim() == 1 else moment.diagonal()
    scale = float(diag.mean())
    if not scale > 0:
        return torch.ones_like(diag) if moment.dim() == 1 else torch.eye(len(diag), dtype=moment.dtype,
                                                                         device=moment.device)
    diag.add_(damping * scale)
    return moment


@dataclass
class LayerMetric:
    """A layer's whitened metric: ``gram`` is the damped E[x xᵀ] (or the centred covariance) on the d_in columns of W
    (d_in × d_in), or — with ``rows`` — the damped token frequencies on its d_out rows (an Embedding). ``scale``
    (d_out,), positive, weighs the rows: the metric is then ‖diag(g)·(W − Ŵ)·L‖_F (see :func:`layer_metric`)."""

    gram: torch.Tensor
    rows: bool = False
    scale: torch.Tensor | None = None

    @classmethod
    def identity(cls, d_in: int, dtype=torch.float64, device=None) -> "LayerMetric":
        """The data-free metric ‖W − Ŵ‖_F."""
        return cls(torch.ones(d_in, dtype=dtype, device=device))

    def whitener(self, out_modes=None) -> Whitener:
        """The :class:`Whitener` of the working matrix (see :meth:`working`)."""
        if not self.rows:
            return Whitener(self.gram)
        modes = list(out_modes) if out_modes else [len(self.gram)]
        return Whitener(self.gram.reshape(modes).permute(*reversed(range(len(modes)))).reshape(-1))

    def working(self, w: torch.Tensor, out_modes, in_modes) -> torch.Tensor:
        """The matrix the algorithms run on, the metric on its columns: W itself (diag(g)·W with a ``scale``), or
        for a row metric the tensor W (out_modes + in_modes) with its axes reversed, as a (d_in × d_out) matrix."""
        if not self.rows:
            return w if self.scale is None else w * self.scale[:, None]
        modes = list(out_modes) + list(in_modes)
        return w.reshape(modes).permute(*reversed(range(len(modes)))).reshape(w.shape[1], w.shape[0])

    def restore(self, m: torch.Tensor, out_modes, in_modes) -> torch.Tensor:
        """Inverse of :meth:`working`."""
        if not self.rows:
            return m if self.scale is None else m / self.scale[:, None]
        modes = list(out_modes) + list(in_modes)
        d_out = math.prod(out_modes)
        return m.reshape(modes[::-1]).permute(*reversed(range(len(modes)))).reshape(d_out, -1)

    def loss(self, w: torch.Tensor, approx: torch.Tensor) -> float:
        """‖diag(g)·(W − Ŵ)·L‖²_F (g = 1 without ``scale``; ‖diag(√f)(W − Ŵ)‖²_F for a row metric)."""
        e = (w - approx).to(self.gram.dtype)
        if self.scale is not None:
            e = e * self.scale[:, None]
        if self.rows:
            return float((e * e * self.gram[:, None]).sum())
        return Whitener(self.gram, factored=False).loss(e)


def layer_metric(calibration: Calibration | None, name: str, module: nn.Module, damping: float = DAMPING,
                 centered: bool | Collection[str] = False,
                 output_scale: torch.Tensor | Mapping[str, torch.Tensor] | None = None) -> LayerMetric:
    """The whitened metric of layer ``name`` from its calibration statistic (damped, see the module docstring);
    ``calibration=None`` gives the data-free metric. Raises ValueError when the statistic does not fit the layer.

    ``centered``: C is the covariance E[(x − μ)(x − μ)ᵀ] instead of E[x xᵀ] (needs ``calibrate(..., means=True)``),
    so the metric ignores the mean output error (W − Ŵ)·μ: right for a layer whose output mean is restored
    afterwards (a bias correction, a following batch norm re-estimated on the data). ``output_scale`` g (d_out,):
    the metric becomes ‖diag(g)·(W − Ŵ)·L‖_F, e.g. g = γ/√(σ² + ε) of a following batch norm
    (:func:`torch_sttp.calibration.batchnorm_scales`), so each output row counts as much as it does after the
    normalisation. |g| is used, floored at 10⁻⁶·max|g| (an invertible weighting); the SVDP optimum is then the
    truncated SVD of diag(g)·W·L mapped back, diag(g)⁻¹·P_rΣ_rQ_rᵀ·L⁻¹ (exact). STTP refuses a ``scale``: a row
    scaling of a tensor train is not a train of the same ranks. Both may be given for many layers at once:
    ``centered`` a collection of layer names, ``output_scale`` a mapping {name: g} (layers not in it: no scale)."""
    d_out, d_in = weight_matrix(module).shape
    centered = is_centered(name, centered)
    if isinstance(output_scale, Mapping):
        output_scale = output_scale.get(name)
    scale = _row_scale(name, output_scale, d_out, module.weight.device)
    if calibration is None:
        if centered:
            raise ValueError(f"layer {name!r}: a centred metric needs calibration statistics")
        metric = LayerMetric.identity(d_in, device=module.weight.device)
        metric.scale = scale
        return metric
    kind = layer_kind(module)
    check_has_values(module, "a data-aware projection", name)
    if name not in calibration:
        raise ValueError(f"layer {name!r} has no calibration statistic; calibrate the model with this layer "
                         "selected (torch_sttp.calibrate(model, batches, include=...))")
    if calibration.kind(name) != kind:
        raise ValueError(f"layer {name!r} is a {kind} layer but its statistic is of a {calibration.kind(name)} "
                         "layer; calibrate this model again")
    if kind == "embedding" and (centered or scale is not None):
        raise ValueError(f"layer {name!r}: an Embedding's metric has no centred or output-scaled form; leave "
                         "centered/output_scale out for it")
    moment = (calibration.covariance(name) if centered else calibration.moment(name)).to(device=module.weight.device)
    want = (d_out,) if kind == "embedding" else (d_in, d_in)
    if tuple(moment.shape) != want:
        raise ValueError(f"layer {name!r}: calibration statistic of shape {tuple(moment.shape)} does not fit its "
                         f"weight matrix ({d_out} × {d_in}, needs {want}); calibrate this model again")
    if not bool(torch.isfinite(moment).all()):
        raise ValueError(f"layer {name!r}: its calibration statistic has NaN or Inf entries (non-finite inputs in "
                         "the calibration batches, or a damaged statistics file); calibrate again on finite data")
    if not damping >= 0:
        raise ValueError(f"damping must be ≥ 0, got {damping!r}")
    return LayerMetric(_damped(moment, damping), rows=kind == "embedding", scale=scale)


def is_centered(name: str, centered: bool | Collection[str]) -> bool:
    """Whether layer ``name`` gets the centred metric under a ``centered`` setting (True/False or layer names)."""
    return centered if isinstance(centered, bool) else name in centered


def check_output_scales(modules: Mapping[str, nn.Module], method: str, output_scales) -> None:
    """Check the ``output_scales`` ({layer: g}) of the layers about to be projected (``modules``, by name) before
    any work: g of d_out finite values, not for an Embedding, no scale for "sttp". Scales of other layers are
    ignored (:func:`torch_sttp.calibration.batchnorm_scales` gives one for every layer that feeds a batch norm).
    Raises ValueError naming the layer."""
    for name, g in (output_scales or {}).items():
        if name not in modules:
            continue
        module = modules[name]
        if layer_kind(module) == "embedding":
            raise ValueError(f"layer {name!r}: an Embedding's metric has no output-scaled form; leave its "
                             "output_scale out")
        _row_scale(name, g, weight_matrix(module).shape[0], module.weight.device)
        _check_scale(method, g, name)


def _row_scale(name: str, scale, d_out: int, device) -> torch.Tensor | None:
    """|g| floored at 10⁻⁶·max|g| (float64, d_out), or None."""
    if scale is None:
        return None
    g = torch.as_tensor(scale, dtype=torch.float64, device=device).abs().reshape(-1)
    if g.numel() != d_out or not bool(torch.isfinite(g).all()) or not float(g.max()) > 0:
        raise ValueError(f"layer {name!r}: output_scale needs {d_out} finite values, not all zero (one per output "
                         f"row of its {d_out}-row weight matrix), got {tuple(torch.as_tensor(scale).shape)}")
    return g.clamp_min(1e-6 * float(g.max()))


# ------------------------------------------------------------------------------------------------ algorithms
def whitened_svd(matrix: torch.Tensor, whitener: Whitener, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M̂, σ): M̂ = P_rΣ_rQ_rᵀ·L⁻¹ from the SVD M·L = PΣQᵀ — the rank-``rank`` matrix minimising ‖(M − M̂)·L‖_F —
    and all singular values σ of M·L (descending; the loss of M̂ is Σ_{i>r} σ_i²). ``matrix`` (m × d)."""
    p, s, qh = torch.linalg.svd(whitener.apply(matrix), full_matrices=False)
    r = min(rank, len(s))
    return whitener.solve((p[:, :r] * s[:r]) @ qh[:r]), s


def whitened_train(matrix: torch.Tensor, row_modes, col_modes, ranks, whitener: Whitener,
                   whitened: torch.Tensor | None = None) -> list[torch.Tensor]:
    """TT cores (R_{k−1}, n_k, R_k) over ``row_modes + col_modes`` with bond ranks ``ranks`` (a TT-SVD in the
    whitened metric). ``matrix`` is (∏row_modes × ∏col_modes), the metric on its columns; ``whitened``: M·L when
    the caller has it (several ranks of one matrix).

    Row-mode bonds: the TT-SVD sweep runs on M·L (a projection from the left commutes with the whitening, so each
    truncation is the optimal one in the metric given the previous ones). Column-mode bond k (its left part holds
    the first k column modes, index a, its right part the rest, index t): the remainder is whitened on t by the
    Cholesky factor of the partial trace Σ_a C[(a,·),(a,·)] (:meth:`Whitener.marginal`), truncated, unwhitened.
    """
    row_modes, col_modes = list(row_modes), list(col_modes)
    if not col_modes:
        return tt_svd(matrix.reshape(row_modes or [1]), ranks if row_modes else [1, 1])
    k, d_cols = len(row_modes), matrix.shape[1]
    whitened = whitener.apply(matrix) if whitened is None else whitened
    left = tt_svd(whitened.reshape(row_modes + [d_cols]), list(ranks[:k + 1]) + [1])
    del whitened
    rest = whitener.solve(left[-1].reshape(ranks[k], d_cols))
    cores, lead = left[:-1], 1
    for j, n in enumerate(col_modes[:-1]):
        lead *= n
        mat = rest.reshape(ranks[k + j] * n, d_cols // lead)
        trailing = whitener.marginal(lead)
        p, s, qh = torch.linalg.svd(trailing.apply(mat), full_matrices=False)
        r = ranks[k + j + 1]
        cores.append(p[:, :r].reshape(ranks[k + j], n, r))
        rest = trailing.solve(s[:r, None] * qh[:r])
    cores.append(rest.reshape(ranks[-2], col_modes[-1], 1))
    return cores


def _train_matrix(cores, shape, split: int) -> torch.Tensor:
    """The (rows × cols) matrix of a train whose first ``split`` cores carry the row modes: (row cores contracted
    from the left) · (column cores contracted from the right), the cheap order for both sides."""
    one = torch.ones(1, 1, dtype=cores[0].dtype, device=cores[0].device)
    left = contract_train(cores[:split]) if split else one
    right = contract_train_from_right(cores[split:]) if split < len(cores) else one
    return (left @ right).reshape(shape)


def row_block_update(cores, matrix: torch.Tensor, whitener: Whitener, split: int) -> list[torch.Tensor]:
    """One block step on the row cores: with the train A·B (A = the first ``split`` cores contracted, d_rows × R;
    B = the rest, R × d_cols) and B fixed, the best A over all matrices is A* = M·C·Bᵀ·G⁻¹ (G = B·C·Bᵀ), and for any
    A, ‖(M − A·B)·L‖² = ‖(M − A*·B)·L‖² + ‖(A* − A)·N‖²_F with N·Nᵀ = G; the row cores are then the TT-SVD of A*·N
    over the row modes (quasi-optimal in that metric), the factor left over (R × R) times N⁻¹ is folded into the
    first column core. Returns ``cores`` itself when there is no row or no column core, or G is singular."""
    if not 0 < split < len(cores):
        return cores
    r = cores[split].shape[0]
    row_modes = [c.shape[1] for c in cores[:split]]
    b = contract_train_from_right(cores[split:]).reshape(r, -1)
    cb = whitener.gram_apply(b)  # B·C (C symmetric)
    factor, info = torch.linalg.cholesky_ex(cb @ b.mT)
    if int(info) != 0:
        return cores
    target = torch.linalg.solve_triangular(factor, (matrix @ cb.mT).mT, upper=False).mT  # A*·N = M·C·Bᵀ·N⁻ᵀ
    ranks = [c.shape[0] for c in cores[:split]] + [r]
    rows = tt_svd(target.reshape(row_modes + [r]), ranks + [1])
    fold = torch.linalg.solve_triangular(factor, rows[-1].reshape(r, r), upper=False, left=False)  # T·N⁻¹
    first = torch.einsum("ab,bnc->anc", fold, cores[split])
    return rows[:-1] + [first] + list(cores[split + 1:])


class _FactoredLoss(torch.autograd.Function):
    """tr(M·C·Mᵀ) − 2·⟨A, (M·C)·Bᵀ⟩ + ⟨AᵀA, B·C·Bᵀ⟩ with the gradients written out, so that B·C is formed once
    per evaluation (autograd would form (·)·C again for ∂/∂B):
    ∂/∂A = 2·(A·S − (M·C)·Bᵀ), ∂/∂B = 2·((AᵀA)·(B·C) − Aᵀ·(M·C)), S = B·C·Bᵀ."""

    @staticmethod
    def forward(ctx, left, right, whitener, matrix_gram, energy):
        right_gram = whitener.gram_apply(right)
        projected = matrix_gram @ right.mT
        small = right_gram @ right.mT
        gram_left = left.mT @ left
        ctx.save_for_backward(left, right_gram, projected, small, gram_left, matrix_gram)
        return energy - 2.0 * (left * projected).sum() + (gram_left * small).sum()

    @staticmethod
    def backward(ctx, grad):
        left, right_gram, projected, small, gram_left, matrix_gram = ctx.saved_tensors
        grad_left = (2.0 * grad) * (left @ small - projected)
        grad_right = (2.0 * grad) * (gram_left @ right_gram - left.mT @ matrix_gram)
        return grad_left, grad_right, None, None, None


def factored_loss(left: torch.Tensor, right: torch.Tensor, whitener: Whitener, matrix_gram: torch.Tensor,
                  energy: float) -> torch.Tensor:
    """‖(M − A·B)·L‖²_F = tr(M·C·Mᵀ) − 2·⟨A, (M·C)·Bᵀ⟩ + ⟨AᵀA, B·C·Bᵀ⟩ for A = ``left`` (m × R) and B = ``right``
    (R × d), from ``matrix_gram`` = M·C (m × d, :meth:`Whitener.gram_apply`) and ``energy`` = tr(M·C·Mᵀ).
    Differentiable in A and B. One evaluation with its gradient costs R·d² + 3·m·R·d multiply-adds (B·C once),
    where weighing the error M − A·B costs m·d² + 3·m·R·d."""
    return _FactoredLoss.apply(left, right, whitener, matrix_gram, energy)


def _train_objective(params, matrix: torch.Tensor, whitener: Whitener, split: int, matrix_gram: torch.Tensor,
                     energy: float) -> torch.Tensor:
    """‖(M − train)·L‖²_F as a differentiable function of the cores; through the middle bond when there is one."""
    if 0 < split < len(params):
        left = contract_train(params[:split]).reshape(matrix.shape[0], -1)
        right = contract_train_from_right(params[split:]).reshape(left.shape[1], -1)
        return factored_loss(left, right, whitener, matrix_gram, energy)
    err = matrix - _train_matrix(params, matrix.shape, split)
    return (err * whitener.gram_apply(err)).sum()


def _train_loss(cores, matrix: torch.Tensor, whitener: Whitener, split: int, matrix_gram: torch.Tensor,
                energy: float) -> float:
    """‖(M − train)·L‖²_F through the middle bond (for comparing candidates; it loses the digits of the energy that
    the loss does not have, so a reported loss is computed from the error itself)."""
    with torch.no_grad():
        return float(_train_objective(cores, matrix, whitener, split, matrix_gram, energy))


def _two_loop(grad: torch.Tensor, pairs: list) -> torch.Tensor:
    """The L-BFGS direction −H·∇f from the stored pairs (s, y, 1/yᵀs), oldest first (steepest descent without
    pairs); one new vector."""
    q = grad.neg()
    alphas = []
    for s, y, rho in reversed(pairs):
        alphas.append(rho * float(s @ q))
        q.add_(y, alpha=-alphas[-1])
    if pairs:
        s, y, _ = pairs[-1]
        q.mul_(float(s @ y) / float(y @ y))
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        q.add_(s, alpha=a - rho * float(y @ q))
    return q


def _lbfgs(evaluate, x: torch.Tensor, iters: int, tolerance: float, history: int = 3) -> float:
    """Minimise f over the flat vector ``x`` in place and return f(x); ``evaluate(x)`` gives (f, ∇f). L-BFGS: the
    two-loop recursion over the last ``history`` pairs (s, y) (a pair with yᵀs ≤ 0 is not stored), a backtracking
    line search on the Armijo condition f(x + t·d) ≤ f(x) + 10⁻⁴·t·∇fᵀd (t = 1, halved; the first step
    min(1, 1/‖∇f‖₁)); stops after ``iters`` iterations or ⌈1.25·iters⌉ evaluations, once an iteration lowers f by
    less than ``tolerance``, or when no step lowers it (x then stays). Holds x, two gradients, the direction and
    2·``history`` vectors."""
    f, grad = evaluate(x)
    pairs: list = []
    evals, budget = 1, math.ceil(1.25 * iters)
    for _ in range(iters):
        direction = _two_loop(grad, pairs)
        slope = float(grad @ direction)
        if not slope < 0:
            break
        t = 1.0 if pairs else min(1.0, 1.0 / max(float(grad.abs().sum()), 1e-300))
        x.add_(direction, alpha=t)
        while True:  # backtrack: halve t until the Armijo condition holds or the budget is spent
            f_new, grad_new = evaluate(x)
            evals += 1
            accepted = f_new <= f + 1e-4 * t * slope
            if accepted or evals >= budget:
                break
            x.add_(direction, alpha=-t / 2)
            t /= 2
        if not accepted:
            x.add_(direction, alpha=-t)
            break
        step, change = direction.mul_(t), grad.neg_().add_(grad_new)  # s and y, in the old buffers
        curvature = float(change @ step)
        if curvature > 0:
            pairs = (pairs + [(step, change, 1.0 / curvature)])[-history:]
        gain, f, grad = f - f_new, f_new, grad_new
        if gain < tolerance or evals >= budget:
            break
    return f


def refine_train(cores, matrix: torch.Tensor, whitener: Whitener, split: int, iters: int = REFINE_ITERS,
                 tolerance: float = 1e-6, block: bool = True,
                 matrix_gram: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Cores after one :func:`row_block_update` (``block``; kept only if it lowers the loss) and then up to
    ``iters`` L-BFGS iterations (history 3, backtracking Armijo line search) on ‖(M − train)·L‖²_F / ‖M·L‖²_F,
    stopping once an iteration gains less than ``tolerance`` of that relative loss. The loss is evaluated through
    the middle bond (:func:`factored_loss` with the train's two halves A·B), never forming the m × d error; the
    cores are one flat vector, so the optimiser holds about ten copies of the train's size. The first ``split``
    cores carry the row modes. ``matrix_gram``: M·C when the caller has it."""
    matrix_gram = whitener.gram_apply(matrix) if matrix_gram is None else matrix_gram
    energy = float((matrix * matrix_gram).sum())
    if block:
        updated = row_block_update(cores, matrix, whitener, split)
        if updated is not cores and (_train_loss(updated, matrix, whitener, split, matrix_gram, energy)
                                     < _train_loss(cores, matrix, whitener, split, matrix_gram, energy)):
            cores = updated
    shapes = [c.shape for c in cores]
    sizes = [s.numel() for s in shapes]

    def unflatten(x):
        return [v.view(s) for v, s in zip(x.split(sizes), shapes)]

    flat = torch.cat([c.reshape(-1) for c in cores]) if cores else matrix.new_zeros(0)
    if iters > 0 and cores:
        scale = 1.0 / max(energy, 1e-300)

        def evaluate(x):
            leaf = x.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = _train_objective(unflatten(leaf), matrix, whitener, split, matrix_gram, energy) * scale
                grad, = torch.autograd.grad(loss, leaf)
            return float(loss.detach()), grad

        _lbfgs(evaluate, flat, iters, tolerance)
    return unflatten(flat)


def _reverse_train(cores) -> list[torch.Tensor]:
    """The train of the tensor with its axes reversed."""
    return [c.permute(2, 1, 0) for c in reversed(cores)]


@dataclass
class LayerProjection:
    """One layer's data-aware projection: ``weight`` (the layer's weight shape, float64) and, in the whitened
    metric, its ``loss`` ‖(W − Ŵ)·L‖²_F, the ``energy`` ‖W·L‖²_F, the loss of the data-free projection at the same
    rank (``data_free_loss``), the rank-R optimum over all matrices (``bound``, R the middle rank) and for STTP the
    loss of the whitened TT-SVD before refinement (``tt_svd_loss``) and which candidate won (``source``); NaN
    where not computed (``compare=False``)."""

    weight: torch.Tensor
    loss: float
    energy: float
    data_free_loss: float
    bound: float
    tt_svd_loss: float | None = None
    source: str = "whitened"

    @property
    def relative_error(self) -> float:
        """√(loss / energy): the relative error of the layer's output on the calibration data."""
        return math.sqrt(self.loss / self.energy) if self.energy > 0 else 0.0


def _svd_projection(w: torch.Tensor, rank: int, metric: LayerMetric, compare: bool) -> LayerProjection:
    m = metric.working(w, [w.shape[0]], [w.shape[1]])
    whitener = metric.whitener()
    approx, s = whitened_svd(m, whitener, rank)
    r = min(rank, len(s))
    loss = float((s[r:] ** 2).sum())
    data_free = math.nan
    if compare:
        u, s0, vh = torch.linalg.svd(w, full_matrices=False)
        data_free = metric.loss(w, (u[:, :r] * s0[:r]) @ vh[:r])
    w_hat = metric.restore(approx, [w.shape[0]], [w.shape[1]])
    return LayerProjection(w_hat, loss, float((s ** 2).sum()), data_free, loss)


def _sttp_projection(w: torch.Tensor, shape, rank: int, metric: LayerMetric, iters: int,
                     compare: bool) -> LayerProjection:
    out_modes, in_modes = split_modes(shape, "sttp")
    modes = out_modes + in_modes
    ranks = tt_ranks(modes, rank)
    if ranks == tt_ranks(modes, math.prod(modes)):  # no bond is truncated: exact
        return LayerProjection(w.clone(), 0.0, metric.loss(w, torch.zeros_like(w)), 0.0, 0.0, 0.0, "exact")
    m = metric.working(w, out_modes, in_modes)
    whitener = metric.whitener(out_modes)
    bound = math.nan
    if compare:
        bound = float((torch.linalg.svdvals(whitener.apply(m))[ranks[len(out_modes)]:] ** 2).sum())
    data_free = tt_svd(w.reshape(modes), ranks)
    if metric.rows:
        data_free, row_modes, col_modes, ranks = _reverse_train(data_free), in_modes[::-1], out_modes[::-1], ranks[::-1]
    else:
        row_modes, col_modes = out_modes, in_modes
    split = len(row_modes)
    trains = {"data_free": data_free, "whitened": whitened_train(m, row_modes, col_modes, ranks, whitener)}
    whitener = whitener.without_factor()  # from here on C alone: free L
    m_gram = whitener.gram_apply(m)
    energy = float((m * m_gram).sum())  # ‖W·L‖²: the working matrix carries the metric's scale or row weights
    losses = {k: _train_loss(c, m, whitener, split, m_gram, energy) for k, c in trains.items()}
    start = min(losses, key=losses.get)
    trains = {start: trains[start]}  # the other start's loss is kept, its cores are not needed again
    trains["refined"] = refine_train(trains[start], m, whitener, split, iters, matrix_gram=m_gram)
    losses["refined"] = _train_loss(trains["refined"], m, whitener, split, m_gram, energy)
    best = min(trains, key=losses.get)
    approx = _train_matrix(trains[best], m.shape, split)
    loss = whitener.loss(m - approx)
    return LayerProjection(metric.restore(approx, out_modes, in_modes), loss, energy, losses["data_free"], bound,
                           losses["whitened"], best)


def project_layer(module: nn.Module, method: str, rank: int, metric: LayerMetric,
                  refine_iters: int = REFINE_ITERS, compare: bool = True) -> LayerProjection:
    """The data-aware projection of one layer's weight at rank cap ``rank`` (``method`` "svdp" or "sttp"; the
    weights of two plain factors are those of "svdp"); see the module docstring. Without ``compare`` the
    informative ``bound`` (and for SVDP ``data_free_loss``) are NaN, saving an SVD each."""
    check_method(method)
    check_rank(rank)
    _check_scale(method, metric.scale)
    w = weight_matrix(module).detach().to(metric.gram.dtype)
    if method == "svdp":
        proj = _svd_projection(w, rank, metric, compare)
    else:
        proj = _sttp_projection(w, layout_shape(module), rank, metric, refine_iters, compare)
    proj.weight = matrix_to_weight(module, proj.weight, module.weight.shape)
    return proj


def _check_scale(method: str, scale, name: str | None = None) -> None:
    """Refuse an output scale for "sttp" (naming layer ``name`` when given)."""
    if method == "sttp" and scale is not None:
        where = f"layer {name!r}: " if name is not None else ""
        raise ValueError(f"{where}method 'sttp' does not take an output_scale (a row scaling of a tensor train is not "
                         "a train of the same ranks); use it with 'svdp' or 'svd', or leave it out")


@dataclass(frozen=True)
class WhitenedProjector:
    """The data-aware weight of a layer for ``convert(..., init="pretrained", calibration=...)``: an object with
    :meth:`project_weight` is what :func:`torch_sttp.convert` asks for each layer's Ŵ before loading it into the
    parametrization (convert knows nothing about statistics or metrics). ``Calibration.projector(damping=…,
    refine_iters=…)`` makes one; a :class:`~torch_sttp.calibration.Calibration` itself is one with the defaults.
    ``centered`` and ``output_scales`` are those of :func:`layer_metric` (a bool or layer names; {name: g}).
    With a ``metrics`` dict, each layer's :class:`LayerMetric` is kept there under its name (to score the converted
    weight afterwards)."""

    calibration: "Calibration"
    damping: float = DAMPING
    refine_iters: int = REFINE_ITERS
    compare: bool = False
    record: dict | None = None
    centered: bool | Collection[str] = False
    output_scales: Mapping[str, torch.Tensor] | None = None
    metrics: dict | None = None

    def project_weight(self, name: str, module: nn.Module, method: str, rank: int, spectrum: str) -> torch.Tensor:
        """Ŵ (``module.weight``'s shape, float64) minimising ‖(W − Ŵ)·L‖_F at rank cap ``rank`` (:func:`project_layer`
        in the metric of layer ``name``, with ``compare``). ``spectrum`` does not change Ŵ: the parametrization then
        loads it as it loads any dense weight (exact for ``"free"``; scaled by 1/σ_max(Ŵ) for ``"normalized"``; unit
        singular values for ``"identity"``). With a ``record`` dict, its :class:`LayerProjection` (without the
        weight) is stored there under ``name``."""
        check_spectrum(spectrum)
        metric = layer_metric(self.calibration, name, module, self.damping, self.centered, self.output_scales)
        with torch.no_grad():
            proj = project_layer(module, method, rank, metric, self.refine_iters, self.compare)
        weight, proj.weight = proj.weight, None
        if self.record is not None:
            self.record[name] = proj
        if self.metrics is not None:
            self.metrics[name] = metric
        return weight


# ------------------------------------------------------------------------------------------- rank candidates
def _method_dof(shape, method: str, rank: int, spectrum: str) -> int:
    if method == "svd":  # two plain factors: r·(d_out + d_in)
        d_out, d_in = shape[0], math.prod(shape[1:])
        return min(rank, d_out, d_in) * (d_out + d_in)
    return count_dof(tuple(shape), method, rank, spectrum)


def _rank_grid(rmax: int, size: int) -> list[int]:
    """About ``size`` ranks in 1…rmax: half spaced evenly, half geometrically (dense at small ranks)."""
    grid = np.concatenate([np.linspace(1, rmax, max(2, size - size // 2)), np.geomspace(1, rmax, max(2, size // 2))])
    return sorted({int(round(r)) for r in grid} | {rmax})


def _svd_curve(w: torch.Tensor, metric: LayerMetric) -> np.ndarray:
    """Whitened loss at every rank 0…min(d_out, d_in): the tail sums of the squared whitened singular values."""
    m = metric.working(w, [w.shape[0]], [w.shape[1]])
    s = torch.linalg.svdvals(metric.whitener().apply(m)).double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])
    return np.concatenate([tail.cpu().numpy(), [0.0]])


def _sttp_curve(w: torch.Tensor, shape, metric: LayerMetric, ranks: list[int]) -> list[float]:
    """Measured whitened loss of the whitened TT-SVD (no refinement) at each rank cap of ``ranks``."""
    out_modes, in_modes = split_modes(shape, "sttp")
    modes = out_modes + in_modes
    m = metric.working(w, out_modes, in_modes)
    whitener = metric.whitener(out_modes)
    rows, cols = (in_modes[::-1], out_modes[::-1]) if metric.rows else (out_modes, in_modes)
    whitened = whitener.apply(m)  # M·L, shared by every rank
    losses = []
    for r in ranks:
        bonds = tt_ranks(modes, r)
        bonds = bonds[::-1] if metric.rows else bonds
        train = whitened_train(m, rows, cols, bonds, whitener, whitened)
        error = whitener.apply(_train_matrix(train, m.shape, len(rows))).sub_(whitened)  # (M̂ − M)·L
        losses.append(float(torch.linalg.vector_norm(error)) ** 2)
    return losses


def truncation_candidates(model: nn.Module, method: str, calibration: Calibration | None = None, include=None,
                          exclude=None, layers=None, spectrum: str = "free", damping: float = DAMPING,
                          normalize: bool = False, weights: Mapping[str, float] | None = None,
                          grid: int = 16, centered: bool | Collection[str] = False,
                          output_scales: Mapping[str, torch.Tensor] | None = None) -> dict[str, RankCandidates]:
    """Per layer, candidate ranks with their DOF and measured whitened truncation loss, for
    :func:`torch_sttp.allocation.allocate_ranks`.

    ``method`` "svd" (two plain factors, r·(d_out + d_in) DOF) or "svdp": every rank 1…min(d_out, d_in), loss
    Σ_{i>r} σ_i² of the whitened spectrum (exact). "sttp": about ``grid`` rank caps up to the largest bond, loss
    of the whitened TT-SVD measured at each (an upper bound on the refined projection's loss); DOF by
    :func:`torch_sttp.tt.count_dof`. Losses are per calibration sample, in the units of the layer's output;
    ``normalize`` divides each layer's losses by its ‖W·L‖²_F (relative output error²), ``weights`` ({layer:
    factor}, e.g. :func:`torch_sttp.calibration.layer_sensitivity`) multiplies them. ``calibration=None``: the
    data-free metric (losses are then the Frobenius truncation errors). ``layers`` (names) restricts the selection.
    ``centered`` / ``output_scales``: the metric of :func:`layer_metric` (an output scale not for "sttp").
    """
    check_option("method", method, RANK_METHODS)
    check_spectrum(spectrum)
    selected, _ = select_layers(model, include, exclude)
    if layers is not None:
        wanted = set(layers)
        selected = [(n, m) for n, m in selected if n in wanted]
    out = {}
    with torch.no_grad():
        for name, module in selected:
            metric = layer_metric(calibration, name, module, damping, centered, output_scales)
            _check_scale(method, metric.scale)
            w = weight_matrix(module).detach().to(metric.gram.dtype)
            shape = layout_shape(module)
            if method == "sttp":
                modes = sum(split_modes(shape, "sttp"), [])
                ranks = _rank_grid(max(tt_ranks(modes, math.prod(modes))), grid)
                losses = _sttp_curve(w, shape, metric, ranks)
            else:
                curve = _svd_curve(w, metric)
                ranks = list(range(1, len(curve)))
                losses = list(curve[1:])
            total = metric.loss(w, torch.zeros_like(w)) if normalize else 1.0
            factor = (1.0 / total if total > 0 else 0.0) * (1.0 if weights is None else float(weights[name]))
            out[name] = RankCandidates(tuple(ranks), tuple(_method_dof(shape, method, r, spectrum) for r in ranks),
                                       tuple(x * factor for x in losses))
    return out
