"""The adapters' own tensors and their math: :class:`SpectralUpdate` (kinds "principal" and "delta", an SVDP/STTP
update ΔW = U·diag(s)·Vᵀ with orthonormal U, V), :class:`RotationUpdate` (kind "rotation", W' = H_out·W·H with H a
product of Householder reflectors) and the :class:`ReflectorPlanner` that computes the compact-WY factors T of every
rotation of a model in batched calls.

A :class:`SpectralUpdate` is a member of the model's :class:`~torch_sttp.planner.FramePlanner`: it names its
parametrization (:meth:`SpectralUpdate.planner_parametrization`, an SVDP/STTP with the free spectrum over the layer's
(d_out, C_in, *kernel) layout) and its tensors (:meth:`SpectralUpdate.planner_tensors`), and the planner hands back
its factors (U, σ, Vᵀ), batched by shape with every other member, once per forward pass of the root model.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..frames import householder_t, householder_ts_grouped
from ..parametrizations import SpectralParametrization
from ..planner import Factors

__all__ = ["SpectralUpdate", "RotationUpdate", "ReflectorPlanner", "paired_reflectors", "full_precision",
           "begin_forward_in_full_precision"]


def full_precision():
    """A context without autocast (on the device type where it is on), for computing frames in the parameters'
    precision: under bf16 autocast their products would lose orthogonality and the triangular solves have no
    bf16 kernel. The layers' own products still run under the caller's autocast."""
    for device_type in ("cpu", "cuda"):
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def begin_forward_in_full_precision(planner, *args, **kwargs) -> None:
    """``planner.begin_forward`` (a root forward pre-hook) under :func:`full_precision`."""
    with full_precision():
        planner.begin_forward(*args, **kwargs)


class SpectralUpdate(nn.Module):
    """W' = W + U(θ)·diag(s)·V(θ)ᵀ ("delta", s = 0 at init) or W' = W_res + U(θ)·diag(s)·V(θ)ᵀ ("principal").

    For "principal", (U₀, s₀, V₀) are the factors at (θ₀, s₀), the rank-r projection of the pretrained W, kept as
    frozen buffers ``initial_u`` (d_out, R), ``initial_spectrum`` (R,), ``initial_vt`` (R, d_in); W_res =
    W − U₀·diag(s₀)·V₀ᵀ is never stored (W itself is never changed): ΔW = U·diag(s)·Vᵀ − U₀·diag(s₀)·V₀ᵀ is applied
    as (U·diag(s) − U₀·diag(s₀))·Vᵀ + U₀·diag(s₀)·(Vᵀ − V₀ᵀ) (:meth:`low_rank`), whose factors are differences: exactly
    zero at init, and small while the adapter stays near it, so that no large cancelling products are rounded.

    Parameters: ``u_reflectors``, ``v_reflectors`` (flat free reflector blocks, see
    :class:`~torch_sttp.parametrizations.TrainSide`) and ``spectrum`` s (R,).
    """

    def __init__(self, kind: str, parametrization: SpectralParametrization, tensors: tuple[torch.Tensor, ...]):
        super().__init__()
        if kind not in ("principal", "delta"):
            raise ValueError(f"SpectralUpdate kind must be 'principal' or 'delta', got {kind!r}")
        self.kind = kind
        object.__setattr__(self, "parametrization", parametrization)  # shapes only: not a submodule, no state
        u, v, s = tensors
        self.u_reflectors = nn.Parameter(u)
        self.v_reflectors = nn.Parameter(v)
        self.spectrum = nn.Parameter(s)
        if kind == "principal":
            p = parametrization
            self.register_buffer("initial_u", u.new_zeros(p.d_out, p.r_mid))
            self.register_buffer("initial_spectrum", s.new_zeros(p.r_mid))
            self.register_buffer("initial_vt", v.new_zeros(p.r_mid, p.d_in))
        self.enabled = True

    @property
    def rank(self) -> int:
        return self.parametrization.r_mid

    def planner_parametrization(self) -> SpectralParametrization | None:
        """The parametrization the frame planner computes factors for (None while this adapter is not active)."""
        return self.parametrization if self.enabled else None

    def planner_tensors(self) -> tuple[torch.Tensor, ...]:
        """(U reflectors, V reflectors, S) for the frame planner."""
        return (self.u_reflectors, self.v_reflectors, self.spectrum)

    def set_initial(self, factors: Factors) -> None:
        """Store the factors at init as (U₀, s₀, V₀ᵀ) ("principal"); computed by the frame planner exactly as in
        training, so that ΔW is exactly zero at init."""
        with torch.no_grad():
            self.initial_u.copy_(factors.u)
            self.initial_spectrum.copy_(factors.sigma)
            self.initial_vt.copy_(factors.vt)

    def low_rank(self, factors: Factors) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """ΔW = A·diag(σ)·B as (A (d_out, R'), σ (R',) or None, B (R', d_in)): (U, s, Vᵀ) for "delta"; for
        "principal", R' = 2R, A = [U·diag(s) − U₀·diag(s₀), U₀·diag(s₀)], B = [Vᵀ; Vᵀ − V₀ᵀ]."""
        if self.kind == "delta":
            return factors.u, factors.sigma, factors.vt
        dtype = factors.u.dtype  # the buffers' own dtype unless the factors are computed in another
        u0s0 = self.initial_u.to(dtype) * self.initial_spectrum.to(dtype)
        left = torch.cat([factors.u * factors.sigma - u0s0, u0s0], dim=-1)
        return left, None, torch.cat([factors.vt, factors.vt - self.initial_vt.to(dtype)], dim=-2)

    def delta_matrix(self, factors: Factors) -> torch.Tensor:
        """ΔW (d_out, d_in) from :meth:`low_rank` (exactly zero at init)."""
        left, sigma, right = self.low_rank(factors)
        return (left if sigma is None else left * sigma) @ right


def paired_reflectors(d: int, r: int, generator: torch.Generator | None = None, dtype=torch.float32,
                      device=None) -> torch.Tensor:
    """Y (d, r) whose columns come in equal pairs y_{2k} = y_{2k+1} = q_k, q orthonormal (QR of a Gaussian): the
    product of its r reflectors is the identity (each pair cancels), and the r/2 directions are random."""
    if r % 2 or r < 2 or r > d:
        raise ValueError(f"paired reflectors need an even r with 2 ≤ r ≤ d, got d={d}, r={r}")
    gauss = torch.randn(d, r // 2, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(gauss).Q
    return q.repeat_interleave(2, dim=1).to(dtype=dtype, device=device)


class RotationUpdate(nn.Module):
    """W' = H_out·W·H: H = H₁…H_r, H_j = I − 2·y_j y_jᵀ/‖y_j‖² on the input space (``reflectors_in`` (d_in, r)),
    and for a two-sided rotation H_out on the output space (``reflectors_out`` (d_out, r_out)); both the identity at
    init (reflectors in equal pairs). H is orthogonal for any nonzero y_j, so W's singular values are kept."""

    def __init__(self, d_in: int, rank: int, d_out: int | None = None, rank_out: int = 0,
                 generator: torch.Generator | None = None, dtype=torch.float32, device=None):
        super().__init__()
        self.kind = "rotation"
        self.reflectors_in = nn.Parameter(paired_reflectors(d_in, rank, generator, dtype, device))
        self.reflectors_out = None
        if rank_out:
            self.reflectors_out = nn.Parameter(paired_reflectors(d_out, rank_out, generator, dtype, device))
        self.enabled = True

    @property
    def rank(self) -> int:
        return self.reflectors_in.shape[-1]

    def reflectors(self) -> tuple[torch.Tensor, ...]:
        """The reflector matrices Y: (input side[, output side])."""
        return (self.reflectors_in,) if self.reflectors_out is None else (self.reflectors_in, self.reflectors_out)

    def planner_reflectors(self) -> tuple[torch.Tensor, ...]:
        """The reflector matrices whose T the reflector planner computes (none while this adapter is not active)."""
        return self.reflectors() if self.enabled else ()


class ReflectorPlanner:
    """T factors of the compact-WY form of every active :class:`RotationUpdate` of a model, the Y of one shape
    (dtype, device) stacked into one call (:func:`~torch_sttp.frames.householder_ts_grouped`).

    When recording gradients, they are computed once in the root model's forward pre-hook (outside any
    activation-checkpointing segment) and used during that forward pass only; a rotation called outside a forward
    pass of the root model, without gradients, or while traced by ``torch.compile`` computes its own T.
    """

    def __init__(self) -> None:
        self.members: list[RotationUpdate] = []
        self._cache: dict | None = None
        self._depth = 0
        self._computations = 0

    @property
    def computations(self) -> int:
        """How many batched computations of all members' T factors have run (a read-only counter)."""
        return self._computations

    def add(self, member: RotationUpdate) -> None:
        """Batch ``member``'s T factors with the others' from the next pass on."""
        self.members.append(member)

    def remove(self, member: RotationUpdate) -> None:
        """Stop batching ``member`` (nothing if it is not a member)."""
        self.members = [m for m in self.members if m is not member]

    def begin_forward(self, *_args, **_kwargs) -> None:
        """Root forward pre-hook: when recording gradients, every active member's T factors for this pass."""
        self._depth += 1
        self._cache = None
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            active = [(m, m.planner_reflectors()) for m in self.members]
            ys = [y for _, group in active for y in group]
            if ys:
                self._computations += 1
                ts = iter(householder_ts_grouped(ys))
                self._cache = {id(m): tuple(next(ts) for _ in group) for m, group in active}

    def end_forward(self, *_args, **_kwargs) -> None:
        """Root forward hook (also called on errors): the pass is over, its factors are dropped."""
        self._depth = max(self._depth - 1, 0)
        if not self._depth:
            self._cache = None

    def t_factors(self, member: RotationUpdate) -> tuple[torch.Tensor, ...]:
        """T of each of ``member``'s reflector matrices (input side first)."""
        if (self._cache is not None and self._depth and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and id(member) in self._cache):
            return self._cache[id(member)]
        ys = member.reflectors()
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            return tuple(householder_t(y) for y in ys)
        # inside a backward pass: the recomputation of an activation-checkpointing segment, whose original forward
        # read T from the pre-hook; these stand in for it without saving tensors through the checkpoint's hooks
        with torch.autograd.graph.saved_tensors_hooks(_detached, _same):
            return tuple(householder_t(y) for y in ys)


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t

