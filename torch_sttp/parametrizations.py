"""SVDP and STTP parametrizations: W = U·Σ·Vᵀ with U, V orthonormal frames built from Householder reflectors.

A :class:`SpectralParametrization` maps its own tensors (reflectors of the U side, reflectors of the V side and,
for a learned spectrum, the vector S) to a layer's weight; it plugs into :mod:`torch.nn.utils.parametrize`:

    >>> layer = torch.nn.Linear(256, 128)
    >>> torch_sttp.parametrize(layer, "sttp", rank=16)          # or register_parametrization by hand
    >>> layer.weight                                             # materialised from the parameters
    >>> torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")   # export a dense layer

* U and V are tensor trains whose cores have orthonormal matricizations (paper Prop. 1); SVDP is the one-core case.
  All cores except the two adjacent to Σ use the reduced Householder form (Prop. 2); with the identity spectrum the
  last U core is reduced too (§3.2).
* Spectrum: ``"identity"`` Σ = I; ``"normalized"`` Σ = diag(S/‖S‖∞), so σ_max(W) = 1; ``"free"`` Σ = diag(S).
  Singular values are |Sᵢ|: S may carry signs.
* Storage: each side's reflectors are one flat tensor, the free blocks of its cores one after the other (a full
  frame's (n, r) LAPACK layout, or rows r…n−1 of a reduced one; :func:`~torch_sttp.frames.free_block_shape`), so
  memory follows the DOF; frames of equal shape are computed in one batched call.
  :attr:`SpectralParametrization.dof` counts only the entries that move W (the ignored upper triangles of full
  frames are stored but inert).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from .frames import (
    frame_dof,
    frame_to_params,
    frame_to_params_exact,
    free_block_shape,
    householder_frame_free,
    householder_frames_grouped,
    init_frame_params,
    without_autocast,
)
from .layers import is_transposed_conv
from .options import FRAME_INITS, INITS, check_init, check_method, check_rank, check_spectrum
from .tt import (
    contract_train,
    contract_train_from_right,
    layout_view,
    split_modes,
    transposed_layout_shape,
    tt_ranks,
    tt_svd,
)

__all__ = ["SpectralParametrization", "TrainSide", "SVDP", "STTP", "FixedRow", "parametrize", "register", "svdp", "sttp", "INITS",
           "FORMAT_VERSION", "spectral_parametrization", "parametrization_tensors", "encode_config", "decode_config",
           "tensor_key", "config_key", "entry_key", "is_parametrization_key", "fixed_row"]

FORMAT_VERSION = 2  # 1: reflectors stored padded, one (L, N, R) tensor per side; 2: flat free blocks


@dataclass(frozen=True)
class TrainSide:
    """One side (U or V) of the train, listed from its outer end towards Σ.

    Core k has shape (ranks[k], modes[k], ranks[k+1]); its matricization (ranks[k]·modes[k]) × ranks[k+1] is an
    orthonormal frame, reduced where ``reduced[k]``.
    """

    modes: tuple[int, ...]
    ranks: tuple[int, ...]
    reduced: tuple[bool, ...]

    @property
    def frame_shapes(self) -> list[tuple[int, int]]:
        return [(self.ranks[k] * n, self.ranks[k + 1]) for k, n in enumerate(self.modes)]

    @property
    def block_shapes(self) -> list[tuple[int, int]]:
        """Shapes of the stored free blocks, one per core (see :func:`~torch_sttp.frames.free_block_shape`)."""
        return [free_block_shape(n, r, red) for (n, r), red in zip(self.frame_shapes, self.reduced)]

    @property
    def numel(self) -> int:
        """Length of the side's flat parameter tensor."""
        return sum(a * b for a, b in self.block_shapes)

    @property
    def dof(self) -> int:
        return sum(frame_dof(n, r, red) for (n, r), red in zip(self.frame_shapes, self.reduced))

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        """(L, N, R) of the format-1 padded storage (read when loading old checkpoints)."""
        shapes = self.frame_shapes
        if not shapes:
            return (0, 1, 1)
        return (len(shapes), max(s[0] for s in shapes), max(s[1] for s in shapes))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the free blocks of a flat parameter tensor (numel,)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"reflector tensor of shape {tuple(flat.shape)} does not fit this train side: "
                             f"expected ({self.numel},) (free blocks {self.block_shapes})")
        sizes = [a * b for a, b in self.block_shapes]
        return [piece.view(shape) for piece, shape in zip(flat.split(sizes), self.block_shapes)]

    def free_block(self, k: int, layout: torch.Tensor) -> torch.Tensor:
        """The stored block of core k from its (n, r) LAPACK layout."""
        return layout[self.frame_shapes[k][1]:] if self.reduced[k] else layout

    def pack(self, layouts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Flat parameter tensor from the cores' (n, r) LAPACK layouts."""
        if not layouts:
            return torch.zeros(0)
        return torch.cat([self.free_block(k, t).reshape(-1) for k, t in enumerate(layouts)])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Flat parameters from the format-1 padded (L, N, R) tensor."""
        return self.pack([padded[k, :n, :r] for k, (n, r) in enumerate(self.frame_shapes)]).to(padded)


def _unit_factor(empty_params: torch.Tensor) -> torch.Tensor:
    """The (…, 1, 1) factor of a side without cores: 1 + Σ(its reflectors, an empty tensor), so that the empty
    parameter is part of the graph and receives its (empty) gradient."""
    return (empty_params.sum(-1) + 1.0)[..., None, None]


class WarnOnce:
    """Warnings given once per process and key (e.g. once per spectrum for lossy loads); ``reset()`` forgets."""

    def __init__(self) -> None:
        self.given: set = set()

    def warn(self, key, message: str, stacklevel: int = 4) -> None:
        """Warn with ``message`` the first time ``key`` is seen, and never again for it."""
        if key not in self.given:
            self.given.add(key)
            warnings.warn(message, stacklevel=stacklevel)

    def reset(self) -> None:
        """Forget which warnings were given (each warns once more)."""
        self.given.clear()


spectrum_warnings = WarnOnce()  # dense weights loaded into a non-free spectrum lose their scale or spectrum


def _triangularizing_rotation(top: torch.Tensor) -> torch.Tensor:
    """Orthogonal G (r×r) with top·G upper triangular (an RQ decomposition of the r×r block ``top``)."""
    r = top.shape[-1]
    if r == 1:
        return torch.ones(1, 1, dtype=top.dtype, device=top.device)
    q, _ = torch.linalg.qr(top.flip(0).mT)
    return q.flip(-1)


class SpectralParametrization(nn.Module):
    """Map (U reflectors, V reflectors[, S]) ↦ W = U·Σ·Vᵀ reshaped to a layer's weight.

    Args:
        weight_shape: the layer's weight shape — (d_out, C_in, *kernel) for Linear, Conv and Embedding (rows are
            embeddings); for ConvTranspose pass ``transposed=True`` and its own weight shape (C_in, C_out, *kernel).
        rank: r, a cap: the middle rank is min(r, d_out, d_in), bond ranks follow the Holtz bound.
        method: ``"svdp"`` or ``"sttp"``.
        spectrum: ``"identity"``, ``"normalized"`` or ``"free"``.
        eps: lower clamp of ‖S‖∞ for the normalized spectrum.
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        rank: int,
        method: str = "sttp",
        spectrum: str = "normalized",
        transposed: bool = False,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.method = check_method(method)
        self.spectrum = check_spectrum(spectrum)
        self.rank = check_rank(rank)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.transposed = bool(transposed)
        if self.transposed and len(self.weight_shape) < 3:
            raise ValueError(f"transposed=True needs a conv weight (C_in, C_out, *kernel), got {self.weight_shape}")
        shape = self.layout_shape
        self.out_modes, self.in_modes = split_modes(shape, method)
        modes = self.out_modes + self.in_modes
        self.ranks = tt_ranks(modes, rank)
        d_out_cores = len(self.out_modes)
        self.r_mid = self.ranks[d_out_cores]
        self.d_out, self.d_in = shape[0], math.prod(shape[1:])
        self.eps = eps
        u_ranks = tuple(self.ranks[: d_out_cores + 1])
        v_ranks = tuple(reversed(self.ranks[d_out_cores:]))
        n_u, n_v = len(self.out_modes), len(self.in_modes)
        self.u_side = TrainSide(
            tuple(self.out_modes), u_ranks, tuple([True] * (n_u - 1) + [spectrum == "identity"] * (n_u > 0))
        )
        self.v_side = TrainSide(tuple(reversed(self.in_modes)), v_ranks, tuple([True] * (n_v - 1) + [False] * (n_v > 0)))
        self._initial: tuple[torch.Tensor, ...] | None = None

    # ----------------------------------------------------------------------------------------------- shapes, DOF
    @property
    def layout_shape(self) -> tuple[int, ...]:
        """The weight in the (d_out, C_in, *kernel) layout (a transposed conv's first two axes swapped)."""
        return transposed_layout_shape(self.weight_shape, self.transposed)

    @property
    def has_spectrum(self) -> bool:
        return self.spectrum != "identity"

    @property
    def dof(self) -> int:
        """Free parameters that move W (equals :func:`torch_sttp.tt.count_dof`)."""
        return self.u_side.dof + self.v_side.dof + (self.r_mid if self.has_spectrum else 0)

    def extra_repr(self) -> str:
        return (f"method={self.method}, rank={self.rank}, spectrum={self.spectrum}, weight_shape={self.weight_shape}, "
                f"modes={self.out_modes}|{self.in_modes}, ranks={self.ranks}, dof={self.dof}")

    # -------------------------------------------------------------------------------------------------- forward
    def train_cores(self, u_frames: Sequence[torch.Tensor], v_frames: Sequence[torch.Tensor]):
        """Cores of U and of V in the train's own orientation (…, R_{k−1}, n_k, R_k), from the sides' frames.

        U cores (outer end → Σ) are read from frames with rows (R_{k−1}, n_k); V cores (Σ → outer end) from frames
        with rows (n_k, R_outer), so that zero parameters give the truncated identity on both sides. Frames may
        carry leading batch dimensions (…), one train per batch entry.
        """
        u_side, v_side = self.u_side, self.v_side
        cores_u = [f.reshape(*f.shape[:-2], u_side.ranks[k], u_side.modes[k], u_side.ranks[k + 1])
                   for k, f in enumerate(u_frames)]
        cores_v = [f.reshape(*f.shape[:-2], v_side.modes[k], v_side.ranks[k], v_side.ranks[k + 1]).movedim(-1, -3)
                   for k, f in enumerate(v_frames)]
        return cores_u, cores_v[::-1]

    def factors_from_frames(self, u_frames, v_frames, side_params: Sequence[torch.Tensor], s=None):
        """(U, σ, Vᵀ) from precomputed frames of both sides' cores (see :meth:`factors`).

        ``side_params`` are the sides' flat reflector tensors (U, V; only a side without cores reads its). With a leading batch dimension B on the frames
        (B, rows, cols), the reflectors (B, numel) and S (B, R), the factors come batched: U (B, d_out, R), σ (B, R),
        Vᵀ (B, R, d_in) — B layers of one structure. A side without cores (a dimension of 1) is the constant 1,
        tied to its (empty) reflector tensor so that every parameter takes part in the graph (DDP needs that).
        """
        cores_u, cores_v = self.train_cores(u_frames, v_frames)
        u = contract_train(cores_u) if cores_u else _unit_factor(side_params[0])
        if len(v_frames) == 1:  # one V core (SVDP): Vᵀ copied row-major (its weight GEMMs run up to 2× faster)
            vt = v_frames[0].mT.contiguous()
        else:  # from the outer end, where the ranks are small (R_Σ is not carried through every step)
            vt = contract_train_from_right(cores_v) if cores_v else _unit_factor(side_params[1])
        return u, self.sigma(s), vt

    def sigma(self, s: torch.Tensor | None) -> torch.Tensor | None:
        """Σ's diagonal from S (…, R) (None for the identity spectrum)."""
        if s is None:
            return None
        if self.spectrum == "normalized":
            return s / s.abs().amax(-1, keepdim=True).clamp_min(self.eps)
        return s

    def factors(self, u_params: torch.Tensor, v_params: torch.Tensor, s: torch.Tensor | None = None):
        """(U (d_out, R), σ (R,) or None, Vᵀ (R, d_in)) with W = U·diag(σ)·Vᵀ, computed in the parameters' own
        precision even inside an autocast region."""
        with without_autocast(u_params.device):
            return self.factors_from_frames(*self.frames(u_params, v_params), (u_params, v_params), s)

    def frames(self, u_params: torch.Tensor, v_params: torch.Tensor) -> tuple[list, list]:
        """Frames of every core of U and of V (lists, outer end → Σ), cores of one shape in one batched call."""
        sides = (self.u_side, self.v_side)
        blocks = [b for side, t in zip(sides, (u_params, v_params)) for b in side.split(t)]
        rows = [n for side in sides for n, _ in side.frame_shapes]
        frames = householder_frames_grouped(blocks, rows, self.u_side.reduced + self.v_side.reduced)
        n_u = len(self.u_side.modes)
        return frames[:n_u], frames[n_u:]

    def weight_from_factors(self, u, sigma, vt) -> torch.Tensor:
        """The layer's weight tensor W = (U·diag σ)·Vᵀ from U (d_out, R), σ (R,) or None (Σ = I) and Vᵀ (R, d_in),
        in the layer's own layout (Linear (d_out, d_in), conv (C_out, C_in/groups, *k), transposed conv with its
        first two axes swapped back)."""
        return layout_view(((u if sigma is None else u * sigma) @ vt).reshape(self.layout_shape), self.transposed)

    def matrix(self, u_params, v_params, s=None) -> torch.Tensor:
        """W as a (d_out, d_in) matrix."""
        u, sigma, vt = self.factors(u_params, v_params, s)
        return (u if sigma is None else u * sigma) @ vt

    def forward(self, u_params: torch.Tensor, v_params: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """W = U(θ_U)·Σ(S)·V(θ_V)ᵀ from the flat free blocks of each side and S (R,) or None, in the layer's weight
        layout (see :meth:`weight_from_factors`)."""
        return self.weight_from_factors(*self.factors(u_params, v_params, s))

    def loaded(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight this parametrization holds once ``weight`` (its weight shape) is loaded into it,
        forward(right_inverse(weight)), in ``weight``'s dtype: the best approximation in this form, then the
        spectrum's constraint (for ``"normalized"`` scaled by 1/σ_max, for ``"identity"`` unit singular values).
        Loading the result again gives it back (up to rounding)."""
        with torch.no_grad():
            return self(*self.right_inverse(weight)).to(weight.dtype)

    def singular_values(self, u_params, v_params, s=None) -> torch.Tensor:
        """Singular values of W, descending, shape (R,) (exact: |Σ|, no SVD; ones for the identity spectrum)."""
        sigma = self.sigma(s)
        if sigma is None:
            return torch.ones(self.r_mid, dtype=u_params.dtype, device=u_params.device)
        return sigma.abs().sort(descending=True).values

    # ---------------------------------------------------------------------------------------------- initialise
    def initial_parameters(
        self,
        init: str = "noisy_identity",
        alpha: float = 1e-4,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> tuple[torch.Tensor, ...]:
        """Fresh (U reflectors, V reflectors[, S]) for ``init`` in ("identity", "random", "noisy_identity").

        On the ``meta`` device nothing is computed: the tensors have the right shapes and no values (fill them with
        ``to_empty`` and ``load_state_dict``)."""
        if init not in FRAME_INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        if torch.device(device or "cpu").type == "meta":
            sizes = [self.u_side.numel, self.v_side.numel] + ([self.r_mid] if self.has_spectrum else [])
            return tuple(torch.empty(n, dtype=dtype, device="meta") for n in sizes)
        out = []
        for side in (self.u_side, self.v_side):
            layouts = [init_frame_params(n, r, init, red, alpha=alpha, generator=generator, dtype=dtype, device=device)
                       for (n, r), red in zip(side.frame_shapes, side.reduced)]
            out.append(side.pack(layouts).to(dtype=dtype, device=device))
        if self.has_spectrum:
            out.append(torch.ones(self.r_mid, dtype=dtype, device=device))
        return tuple(out)

    # ------------------------------------------------------------------------------------------- right inverse
    @contextlib.contextmanager
    def initial_values(self, tensors: tuple[torch.Tensor, ...] | None):
        """Within this context, the first :meth:`right_inverse` call (the one ``register_parametrization`` makes)
        returns ``tensors`` instead of projecting the current weight; None projects it (``init="pretrained"``)."""
        self._initial = tensors
        try:
            yield self
        finally:
            self._initial = None

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Parameters whose W is the best approximation of ``weight`` in this parametrization.

        SVDP: the truncated SVD (Eckart–Young). STTP: TT-SVD of the weight reshaped to the modes, brought to the
        paper's form (orthonormal cores on both sides of Σ). Exact for ``"free"``; with ``"normalized"`` the loaded
        weight comes back scaled by 1/σ_max, and with ``"identity"`` its singular values become 1.
        """
        if self._initial is not None:
            initial, self._initial = self._initial, None
            return initial
        self._check_weight(weight)
        if self.spectrum != "free":
            what = "scaled by 1/σ_max" if self.spectrum == "normalized" else "given unit singular values"
            zero = not bool(weight.any())  # no σ_max to divide by
            if zero:
                what = ("zero, which this spectrum cannot hold (its largest singular value is 1): the layer starts "
                        "with unit singular values")
            spectrum_warnings.warn((self.spectrum, zero), f"loading a dense weight into the {self.spectrum!r} "
                                   f"spectrum: the weight is {what}; use spectrum='free' to keep its scale")
        dtype, device = weight.dtype, weight.device
        w = layout_view(weight.detach().to(torch.float64), self.transposed)
        modes = self.out_modes + self.in_modes
        if not modes:  # a 1×1 STTP weight
            return self._finish(torch.zeros(0), torch.zeros(0), w.reshape(1), dtype, device)
        u_cores, s, v_cores = self._paper_form(w.reshape(modes))
        return self._finish(*self._params_from_cores(u_cores, s, v_cores), dtype, device)

    def _check_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"right_inverse: weight of shape {tuple(weight.shape)} does not match this "
                             f"parametrization's weight shape {self.weight_shape}")
        if not torch.isfinite(weight).all():
            raise ValueError(f"right_inverse: weight of shape {self.weight_shape} has NaN or inf entries; "
                             "fix the weight before loading it")

    def _paper_form(self, tensor: torch.Tensor):
        """TT-SVD of the weight tensor (modes …), brought to U cores · diag(s) · V cores with every core orthonormal:
        V cores right-orthonormalised towards Σ, then an SVD of the last U core. Returns (U cores in the train's
        orientation, s, V cores as (n, R_outer, R_inner), listed from the outer end)."""
        modes = self.out_modes + self.in_modes
        cores = tt_svd(tensor, self.ranks)
        n_out, n_cores = len(self.out_modes), len(modes)
        middle = None
        for k in range(n_cores - 1, n_out - 1, -1):  # right-orthonormalise the V cores
            rl, n, rr = cores[k].shape
            q, r = torch.linalg.qr(cores[k].reshape(rl, n * rr).mT)
            cores[k] = q.mT.reshape(rl, n, rr)
            if k > 0:
                cores[k - 1] = cores[k - 1] @ r.mT
            else:
                middle = r.mT
        if n_out:
            last = cores[n_out - 1]
            p, s, qh = torch.linalg.svd(last.reshape(-1, last.shape[-1]), full_matrices=False)
            cores[n_out - 1] = p.reshape(last.shape[0], last.shape[1], -1)
            if n_out < n_cores:
                cores[n_out] = torch.einsum("ab,bic->aic", qh, cores[n_out])
            else:
                s = s * qh.reshape(-1)
        else:
            s = middle.reshape(1)
        return cores[:n_out], s, [c.permute(1, 2, 0) for c in reversed(cores[n_out:])]

    def _params_from_cores(self, u_cores: list, s: torch.Tensor, v_cores: list):
        """(U reflectors, V reflectors, S) of orthonormal cores around s; signs and gauges are absorbed into S (or,
        for the identity spectrum, into the frames next to Σ)."""
        identity = self.spectrum == "identity"
        if identity:  # unit singular values; signs of S move into a frame
            signs = torch.where(s < 0, -1.0, 1.0).to(s.dtype)
            if v_cores:
                v_cores[-1] = v_cores[-1] * signs
            else:
                u_cores[-1] = u_cores[-1] * signs
            s = torch.ones_like(s)
        u_params, carry_u = self._cores_to_params(u_cores, self.u_side, identity and not v_cores, "ab,bic->aic")
        if identity:
            if v_cores:
                v_cores[-1] = v_cores[-1] @ carry_u.mT
                self._match_square_orientation(u_params, v_cores)
        else:
            s = s * carry_u.diagonal()
        v_params, carry_v = self._cores_to_params(v_cores, self.v_side, identity, "ab,ibc->iac")
        if not identity:
            s = s * carry_v.diagonal()
        if self.spectrum == "normalized":  # scale invariant: store S with ‖S‖∞ = 1 (a zero weight gets S = 1)
            top = s.abs().max()
            s = s / top if top > 0 else torch.ones_like(s)
        return u_params, v_params, s

    def _match_square_orientation(self, u_params: torch.Tensor, v_cores: list[torch.Tensor]) -> None:
        """Make the V frame next to Σ reachable when it is square (identity spectrum only, in place).

        A square full-form frame of r reflectors has determinant (−1)^r. If the target has the other sign, one
        column of both the last U frame and that V frame is negated: U·Vᵀ = (U·D)(V·D)ᵀ, D = diag(±1). The column
        whose U pivot is largest is chosen, so that the flipped U frame stays well inside the reduced chart.
        """
        rows, cols = self.v_side.frame_shapes[-1]
        if rows != cols:
            return
        if torch.linalg.det(v_cores[-1].reshape(rows, cols)) * (-1) ** cols > 0:
            return
        u_rows, u_cols = self.u_side.frame_shapes[-1] if self.u_side.modes else (0, 0)
        if u_rows == u_cols:
            warnings.warn(f"weight of shape {self.weight_shape}: with the identity spectrum and square factors the "
                          "parametrization covers one orientation only; the loaded weight has its last singular "
                          "direction negated", stacklevel=3)
            return
        k = len(self.u_side.modes) - 1
        block = self.u_side.split(u_params)[k]
        u_frame = householder_frame_free(block, u_rows, reduced=True)
        flip = torch.ones(u_cols, dtype=u_params.dtype)
        flip[int(torch.argmax(u_frame.diagonal()))] = -1.0
        block.copy_(self.u_side.free_block(k, frame_to_params_exact(u_frame * flip, reduced=True)))
        v_cores[-1] = v_cores[-1] * flip

    def _finish(self, u_params, v_params, s, dtype, device) -> tuple[torch.Tensor, ...]:
        out = [u_params.to(dtype=dtype, device=device), v_params.to(dtype=dtype, device=device)]
        if self.has_spectrum:
            out.append(s.to(dtype=dtype, device=device))
        return tuple(out)

    @staticmethod
    def _cores_to_params(cores: list[torch.Tensor], side: TrainSide, exact_last: bool, push: str):
        """Reflectors of orthonormal cores; gauges (reduced form) and column signs are pushed towards Σ.

        Each core is laid out as its frame's rows then columns; ``push`` is the einsum applying a carried
        (R × R) factor to the next core's outer rank index. Returns the flat parameters and the (R_Σ × R_Σ)
        factor C left over at Σ: side = frames · C.
        """
        layouts = []
        carry = None
        for k, core in enumerate(cores):
            if carry is not None:
                core = torch.einsum(push, carry, core)
            rows, cols = side.frame_shapes[k]
            frame = core.reshape(rows, cols)
            rotation = None
            if side.reduced[k]:
                rotation = _triangularizing_rotation(frame[:cols])
                frame = frame @ rotation
            if exact_last and k == len(cores) - 1:
                p, signs = frame_to_params_exact(frame, side.reduced[k]), torch.ones(cols, dtype=frame.dtype)
            else:
                p, signs = frame_to_params(frame, side.reduced[k])
            layouts.append(p)
            carry = torch.diag(signs) if rotation is None else signs[:, None] * rotation.mT
        if carry is None:
            carry = torch.ones(1, 1, dtype=torch.float64)
        return side.pack(layouts).to(torch.float64), carry

    # ------------------------------------------------------------------------------------ checkpoint metadata
    def config(self) -> dict:
        """What rebuilds this parametrization from a state_dict: format version, method, rank, spectrum, shapes and
        train layout (stored as the ``_extra_state`` at :func:`config_key`)."""
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "rank": self.rank,
            "spectrum": self.spectrum,
            "weight_shape": list(self.weight_shape),
            "transposed": self.transposed,
            "modes": [list(self.out_modes), list(self.in_modes)],
        }

    def get_extra_state(self) -> torch.Tensor:
        """The configuration as a uint8 tensor of its JSON text (see :func:`encode_config`), so that state_dicts
        hold tensors only (safetensors, ``save_pretrained``)."""
        return encode_config(self.config())

    def set_extra_state(self, state) -> None:
        pass  # checked in _load_from_state_dict, where the layer's name is known

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"
        if key in state_dict:
            theirs, ours = decode_config(state_dict[key]), self.config()
            if not isinstance(theirs, dict) or theirs.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"{_layer_name(prefix)}: checkpoint written by a newer torch-sttp "
                                 f"(format {theirs!r}); upgrade torch-sttp to load it")
            diff = {k: (theirs.get(k), v) for k, v in ours.items() if k != "format_version" and theirs.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: checkpoint {a!r} vs layer {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"{_layer_name(prefix)}: checkpoint was made with another parametrization "
                                 f"({detail}); convert the model with the checkpoint's settings before loading, "
                                 f"or load a dense checkpoint instead")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def encode_config(config: dict) -> torch.Tensor:
    """A configuration dict as a 1-D uint8 tensor holding its JSON text (what ``_extra_state`` stores)."""
    return torch.tensor(list(json.dumps(config, sort_keys=True).encode()), dtype=torch.uint8)


def decode_config(state) -> dict | object:
    """The configuration stored as ``_extra_state``: a uint8 JSON tensor, or the plain dict of checkpoints written
    before torch-sttp stored it as a tensor; anything else is returned as it is."""
    if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1:
        try:
            return json.loads(bytes(state.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return state
    return state


def _layer_name(prefix: str) -> str:
    name = prefix.split(".parametrizations.")[0]
    return f"layer {name!r}" if name else "layer"


class SVDP(SpectralParametrization):
    """SVD parametrization W = U·Σ·Vᵀ, U ∈ St(d_out, r), V ∈ St(d_in, r) (paper §3.1–3.2)."""

    def __init__(self, weight_shape, rank, spectrum="normalized", transposed=False, eps=1e-12):
        super().__init__(weight_shape, rank, "svdp", spectrum, transposed, eps)


class STTP(SpectralParametrization):
    """Spectral tensor-train parametrization: U and V are tensor trains over the prime modes (paper §3.3)."""

    def __init__(self, weight_shape, rank, spectrum="normalized", transposed=False, eps=1e-12):
        super().__init__(weight_shape, rank, "sttp", spectrum, transposed, eps)


def spectral_parametrization(module: nn.Module, tensor_name: str = "weight") -> SpectralParametrization | None:
    """The :class:`SpectralParametrization` on ``module.<tensor_name>``, or None."""
    if not torch_parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, SpectralParametrization):
            return p
    return None


def fixed_row(module: nn.Module, tensor_name: str = "weight") -> torch.Tensor | None:
    """The fixed padding row (dim,) a converted embedding keeps (:class:`FixedRow`), or None: then W = U·Σ·Vᵀ;
    with it, row ``padding_idx`` of W is this row instead."""
    if not torch_parametrize.is_parametrized(module, tensor_name):
        return None
    return next((q.row for q in module.parametrizations[tensor_name] if isinstance(q, FixedRow)), None)


def entry_key(prefix: str, index: int, name: str) -> str:
    """State-dict key of ``name`` (a buffer or ``_extra_state``) of entry ``index`` of a parametrized weight, for a
    layer whose keys start with ``prefix`` ("" or "block.0.")."""
    return f"{prefix}parametrizations.weight.{index}.{name}"


def config_key(prefix: str) -> str:
    """State-dict key of a converted layer's configuration: the ``_extra_state`` of its
    :class:`SpectralParametrization`, which :func:`parametrize` registers first (entry 0)."""
    return entry_key(prefix, 0, "_extra_state")


def tensor_key(prefix: str, i: int) -> str:
    """State-dict key of tensor ``i`` of :func:`parametrization_tensors` (0: U reflectors, 1: V, 2: S)."""
    return f"{prefix}parametrizations.weight.original{i}"


def is_parametrization_key(prefix: str, key: str) -> bool:
    """Whether ``key`` belongs to the parametrized weight of the layer at ``prefix`` (its tensors, buffers or
    configuration)."""
    return key.startswith(f"{prefix}parametrizations.weight.")


def parametrization_tensors(module: nn.Module, tensor_name: str = "weight") -> tuple[torch.Tensor, ...]:
    """The tensors a parametrized ``module.<tensor_name>`` is computed from: (U reflectors, V reflectors[, S]).

    They are ``module.parametrizations.<tensor_name>.original0, original1[, original2]`` (flat free blocks of
    each side, see :class:`TrainSide`; S for learned spectra only), the layer's trainable parameters.
    """
    plist = module.parametrizations[tensor_name]
    return tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))


def parametrize(
    module: nn.Module,
    method: str = "sttp",
    rank: int = 64,
    spectrum: str = "normalized",
    init: str = "noisy_identity",
    alpha: float = 1e-4,
    tensor_name: str = "weight",
    generator: torch.Generator | None = None,
    pretrained: torch.Tensor | None = None,
) -> SpectralParametrization:
    """Register an SVDP/STTP parametrization on ``module.<tensor_name>`` and return it.

    ``init="pretrained"`` projects the current weight (:meth:`SpectralParametrization.right_inverse`), or the dense
    tensor ``pretrained`` (the weight's shape) when given, leaving the current weight's values untouched (an
    Embedding's ``padding_idx`` row stays the current weight's row, the given tensor's only on the meta device); the
    other inits ("identity", "random", "noisy_identity" with noise scale ``alpha``) start the frames afresh with S = 1.
    The parameters appear as ``module.parametrizations.<tensor_name>.original0`` (U reflectors), ``original1``
    (V reflectors) and ``original2`` (S, learned spectra only). :func:`torch_sttp.convert` builds every layer's
    parametrization through this function.
    """
    check_init(init)
    if torch_parametrize.is_parametrized(module, tensor_name):
        raise ValueError(f"{type(module).__name__}.{tensor_name} is already parametrized; remove it first with "
                         f"torch.nn.utils.parametrize.remove_parametrizations(module, {tensor_name!r})")
    weight = getattr(module, tensor_name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {tensor_name!r} to parametrize")
    if weight.dim() < 2:
        raise ValueError(f"{type(module).__name__}.{tensor_name} has shape {tuple(weight.shape)}: a low-rank weight "
                         "needs at least two dimensions (d_out, C_in, *kernel), as in Linear, Conv, ConvTranspose and "
                         "Embedding layers")
    p = SpectralParametrization(tuple(weight.shape), rank, method, spectrum, tensor_name == "weight" and is_transposed_conv(module))
    p.to(weight.device)
    initial = None
    if pretrained is not None and init != "pretrained":
        raise ValueError(f"parametrize: a pretrained tensor is only used with init='pretrained', got init={init!r}")
    if init != "pretrained":
        initial = p.initial_parameters(init, alpha, generator, weight.dtype, weight.device)
    elif pretrained is not None:
        if tuple(pretrained.shape) != tuple(weight.shape):
            raise ValueError(f"parametrize: pretrained tensor of shape {tuple(pretrained.shape)} does not match "
                             f"{type(module).__name__}.{tensor_name} {tuple(weight.shape)}")
        projected = pretrained.detach().to(dtype=weight.dtype, device=weight.device)
        initial = p.right_inverse(projected)
        if weight.is_meta:  # no values of its own: the fixed padding row below comes from the given tensor
            weight = projected
    elif weight.is_meta:
        raise ValueError(f"init='pretrained' projects the current weight of {type(module).__name__}.{tensor_name}, "
                         "but it is on the meta device and has no values; load the pretrained weights first "
                         "(model.to_empty(device=...) and load_state_dict), or convert with another init and load a "
                         "converted state_dict")
    with p.initial_values(initial):
        register(module, tensor_name, p)
    if tensor_name == "weight" and isinstance(module, nn.Embedding) and module.padding_idx is not None:
        row = weight.detach()[module.padding_idx].clone() if init == "pretrained" else weight.new_zeros(weight.shape[1])
        fixed = FixedRow(module.padding_idx, row, bounded=spectrum != "free")
        fixed.warn_if_unbounded(row)
        torch_parametrize.register_parametrization(module, tensor_name, fixed)
    return p


class FixedRow(nn.Module):
    """Parametrization W ↦ W with row ``index`` replaced by the buffer ``row`` (an embedding's padding row).

    ``nn.Embedding`` keeps its ``padding_idx`` row fixed: it never receives a gradient. In W = U·Σ·Vᵀ that row moves
    with Σ and V, so a converted embedding stores the row it had at conversion (zeros for a fresh init, the
    pretrained row for ``init="pretrained"``) and puts it back after the spectral parametrization.
    """

    def __init__(self, index: int, row: torch.Tensor, bounded: bool = False) -> None:
        super().__init__()
        self.index = int(index)
        self.bounded = bool(bounded)  # below a normalized or identity spectrum, whose σ_max = 1 the row can break
        self.register_buffer("row", row)

    def warn_if_unbounded(self, row: torch.Tensor) -> None:
        """Warn (once per process) when a nonzero row is kept below a spectrum that bounds σ_max(W) by 1: the row
        lies outside the spectrum, so W's σ_max may exceed 1 (up to about √(1 + ‖row‖²))."""
        if self.bounded and not row.is_meta and bool(row.any()):
            spectrum_warnings.warn("padding-row", f"an Embedding's padding row (index {self.index}) is kept as it "
                                   f"is and never trains, outside the spectrum: with this nonzero row (norm "
                                   f"{float(row.norm()):.3g}) the weight's largest singular value can exceed 1; "
                                   "zero the row before converting (nn.Embedding initialises it to zero) or use "
                                   "spectrum='free'", stacklevel=5)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (num_embeddings, dim) with row ``index`` replaced by the fixed row (no gradient reaches it)."""
        mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
        mask[self.index] = True
        return torch.where(mask, self.row.to(weight.dtype), weight)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Setting a dense weight takes its padding row as the fixed row."""
        with torch.no_grad():
            self.row.copy_(weight[self.index])
        self.warn_if_unbounded(self.row)
        return weight

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        state_dict.setdefault(prefix + "row", self.row)  # checkpoints of 1637de1 had no fixed row: keep this one
        super()._load_from_state_dict(state_dict, prefix, *args)


def register(module: nn.Module, tensor_name: str, p: SpectralParametrization) -> None:
    """``register_parametrization(module, tensor_name, p)``, plus a load hook that reads format-1 checkpoints
    (reflectors stored padded as one (L, N, R) tensor per side) into the flat storage."""
    torch_parametrize.register_parametrization(module, tensor_name, p)
    plist = module.parametrizations[tensor_name]
    plist._register_load_state_dict_pre_hook(functools.partial(_upgrade_padded_reflectors, plist, p))


def _upgrade_padded_reflectors(plist, p: SpectralParametrization, state_dict, prefix, *_args) -> None:
    index = next((i for i, q in enumerate(plist) if q is p), None)
    extra = decode_config(state_dict.get(f"{prefix}{index}._extra_state"))
    if not (isinstance(extra, dict) and extra.get("format_version") == 1):
        return
    for name, side in (("original0", p.u_side), ("original1", p.v_side)):
        t = state_dict.get(prefix + name)
        if isinstance(t, torch.Tensor) and tuple(t.shape) == side.padded_shape:
            state_dict[prefix + name] = side.unpad(t)


def svdp(module: nn.Module, rank: int = 64, spectrum: str = "normalized", init: str = "noisy_identity",
         **kwargs) -> SpectralParametrization:
    """Make ``module.weight`` W = U·Σ·Vᵀ, in place, with U, V orthonormal frames from Householder reflectors (SVDP) and rank cap ``rank``;
    the functional twin of :func:`parametrize` with ``method="svdp"`` (the class of the returned parametrization is
    :class:`SVDP`). W keeps the layer's weight shape; see :func:`parametrize` for the arguments."""
    return parametrize(module, "svdp", rank, spectrum, init, **kwargs)


def sttp(module: nn.Module, rank: int = 64, spectrum: str = "normalized", init: str = "noisy_identity",
         **kwargs) -> SpectralParametrization:
    """Make ``module.weight`` W = U·Σ·Vᵀ, in place, with U, V tensor trains of orthonormal cores (STTP) and rank cap ``rank``;
    the functional twin of :func:`parametrize` with ``method="sttp"`` (the class of the returned parametrization is
    :class:`STTP`). W keeps the layer's weight shape; see :func:`parametrize` for the arguments."""
    return parametrize(module, "sttp", rank, spectrum, init, **kwargs)
