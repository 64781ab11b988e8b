"""Orthonormal frames from Householder reflectors (LAPACK layout).

A frame Q ∈ St(n, r) (n ≥ r, QᵀQ = I_r) is the product of r reflectors applied to the truncated identity:

    Q = H₁ H₂ … H_r I_{n×r},   H_j = I − τ_j y_j y_jᵀ,   τ_j = 2 / ‖y_j‖²,

where y_j = e_j + h_j and h_j holds the free parameters below row j (paper Fig. 3a). Parameters are stored as a
dense (…, n, r) tensor in the LAPACK layout of ``geqrf``: column j keeps its free entries strictly below the
diagonal; the diagonal (an implicit 1) and the upper triangle are ignored.

Two forms:

* **full** — every strictly-lower entry is free: n·r − r(r+1)/2 degrees of freedom;
* **reduced** — only rows r…n−1 are free, so the leading r×r block of Q is upper triangular (Fig. 3b):
  n·r − r² degrees of freedom.

Sign convention. Zero parameters give Q = −I_{n×r} (each H_j then negates coordinate j). The inverse map
(:func:`frame_to_params`) follows LAPACK's numerically stable choice of reflector, so the frame it reproduces may
differ from the given one by column signs; those signs are returned (``frame(params) · diag(signs) = F``) and the
parametrizations absorb them into the spectrum or into the adjacent factor. :func:`frame_to_params_exact`
reproduces the frame itself without signs (used where no factor is left to absorb them).

The product is evaluated in the blocked "compact WY" form H₁…H_r = I − Y T Yᵀ with T⁻¹ = striu(YᵀY) + ½·diag(YᵀY)
(the UT transform), so forward and backward passes are GEMMs plus one small triangular solve (forming T). A single
frame is evaluated from its free block in place (Y never formed; Q written as its rows < r and ≥ r), a batch forms
Y once; both sum Yᵀ·G in the same order, so a frame has the same value alone or in a batch.

Rotations. The same form applies a product of r reflectors with *any* nonzero vectors y_j (columns of Y, d × r) to
a matrix without forming the d × d matrix H: :func:`householder_t` gives T, :func:`householder_ts_grouped` the T of
many Y at once (those of one shape in one batched call), and :func:`apply_householder` computes X·H = X − ((X·Y)·T)·Yᵀ
(or X·Hᵀ with ``T.mT``) in O(N·d·r), with a hand-written backward.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch

from .options import FRAME_INITS as INITS

__all__ = [
    "INITS",
    "frame_mask",
    "frame_dof",
    "householder_frame",
    "householder_frame_masked",
    "compact_wy",
    "WYConstants",
    "wy_constants",
    "triangular_inverse",
    "blocked_inverse_pays",
    "without_autocast",
    "without_autocast_on",
    "free_block_shape",
    "householder_frame_free",
    "householder_frame_batches",
    "householder_frames_grouped",
    "padded_householder_frames",
    "frame_flops",
    "frame_families",
    "frame_to_params",
    "frame_to_params_exact",
    "init_frame_params",
    "householder_t",
    "householder_ts_grouped",
    "apply_householder",
    "operand_dtype",
]

def _check_shape(n: int, r: int) -> None:
    if not (isinstance(n, int) and isinstance(r, int)) or n < 1 or r < 1 or r > n:
        raise ValueError(f"a frame needs integers n ≥ r ≥ 1, got n={n!r}, r={r!r}")


def frame_mask(n: int, r: int, reduced: bool = False, device=None, dtype=torch.bool) -> torch.Tensor:
    """Mask (n, r) of the free reflector parameters: strictly lower entries, and for ``reduced`` rows ≥ r only."""
    _check_shape(n, r)
    rows = torch.arange(n, device=device).unsqueeze(1)
    cols = torch.arange(r, device=device).unsqueeze(0)
    mask = rows > cols
    if reduced:
        mask = mask & (rows >= r)
    return mask.to(dtype)


def frame_dof(n: int, r: int, reduced: bool = False) -> int:
    """Degrees of freedom of a frame: n·r − r(r+1)/2 (full) or n·r − r² (reduced)."""
    _check_shape(n, r)
    return n * r - (r * r if reduced else r * (r + 1) // 2)


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def without_autocast(device: torch.device):
    """A context in which autocast is off on ``device``: frames and factors are computed in their own precision
    (float32 or float64) whatever autocast region encloses them; the layer's own ops then follow autocast."""
    if device.type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def without_autocast_on(devices):
    """:func:`without_autocast` on every device of ``devices`` at once."""
    with contextlib.ExitStack() as stack:
        for device in set(devices):
            stack.enter_context(without_autocast(device))
        yield


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class WYConstants(NamedTuple):
    """Constants of the compact WY product of (B, n, r) frames (see :func:`wy_constants`)."""

    eye: torch.Tensor             # (r, r): I_r, the leading block of I_{n×r} (the rest of I_{n×r} is zero)
    mask: torch.Tensor            # (r, r): 1 above the diagonal, ½ on it, 0 below: T⁻¹ = (YᵀY)∘mask (+ offset)
    offset: torch.Tensor | None   # (B, r, r): diag(pad), 1 for zero-padded columns; None without padding
    blocked: bool = False         # T by blocked inversion (batched products) instead of one triangular solve


BLOCK = 16  # the diagonal blocks of a blocked triangular inverse


_BLOCKED_FASTER: dict = {}  # (r, threads) → whether the blocked inverse beat the batched solve on this CPU


def blocked_inverse_pays(r: int, device) -> bool:
    """Whether T = (T⁻¹)⁻¹ is better formed by :func:`triangular_inverse`'s blocked products than by one batched
    triangular solve. Only on a CPU for r = 16·2^k ≥ 32, and there it depends on the LAPACK build and the CPU
    (one machine's batched 64×64 solves ran at a fraction of its GEMM rate, another's were 3–10× faster than the
    blocked products): the first call for each (r, thread count) times both on a batch of 8 and keeps the
    answer for the process. Elsewhere, while compiling, and under a dispatch mode (which would see the timing
    runs), one solve — also the fewer operator calls."""
    if torch.device(device or "cpu").type != "cpu" or r < 2 * BLOCK or r % BLOCK or (r // BLOCK) & (r // BLOCK - 1):
        return False
    if torch.compiler.is_compiling():  # before reading the thread count, which dynamo cannot trace
        return False
    key = (r, torch.get_num_threads())
    if key not in _BLOCKED_FASTER:
        if torch._C._len_torch_dispatch_stack() > 0:
            return False
        _BLOCKED_FASTER[key] = _blocked_is_faster(r)
    return _BLOCKED_FASTER[key]


def _blocked_is_faster(r: int, batch: int = 8, runs: int = 5) -> bool:
    """Best of ``runs`` timings of both inverses of a (batch, r, r) triangular matrix; blocked only if clearly
    faster (by 20 %: otherwise the solve, with fewer calls)."""
    import time

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, r, r, generator=gen).triu(1) + r * torch.eye(r)
    best = {True: float("inf"), False: float("inf")}
    with torch.no_grad():
        for blocked in (True, False):
            triangular_inverse(a, blocked)  # warm-up
        for _ in range(runs):
            for blocked in (True, False):
                start = time.perf_counter()
                triangular_inverse(a, blocked)
                best[blocked] = min(best[blocked], time.perf_counter() - start)
    return best[True] < 0.8 * best[False]


def wy_constants(n: int, r: int, pad: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device=None, blocked: bool | None = None) -> WYConstants:
    """The constants :func:`compact_wy` needs for frames (B, n, r); ``pad`` (B, r) marks zero-padded columns (1).
    ``blocked``: form T by blocked inversion (default: :func:`blocked_inverse_pays`)."""
    eye = torch.eye(r, dtype=dtype, device=device)
    mask = torch.ones(r, r, dtype=dtype, device=device).triu(1) + 0.5 * eye
    offset = None if pad is None else torch.diag_embed(pad.to(dtype=dtype, device=device))
    return WYConstants(eye, mask, offset, blocked_inverse_pays(r, device) if blocked is None else blocked)


def triangular_inverse(a: torch.Tensor, blocked: bool = False) -> torch.Tensor:
    """A⁻¹ of upper triangular A (B, r, r): one batched triangular solve, or — ``blocked``, r = 16·2^k — solves of
    the 16×16 diagonal blocks and then, level by level, T₁₂ = −T₁₁·A₁₂·T₂₂ for all pairs of blocks at once."""
    b, r, _ = a.shape
    if not blocked:
        return torch.linalg.solve_triangular(a, torch.eye(r, dtype=a.dtype, device=a.device), upper=True, left=False)
    m, s = r // BLOCK, BLOCK
    diag = a.view(b, m, s, m, s).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, m, 16, 16)
    t = torch.linalg.solve_triangular(diag, torch.eye(s, dtype=a.dtype, device=a.device), upper=True, left=False)
    while s < r:
        m //= 2
        pairs = a.view(b, m, 2 * s, m, 2 * s).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, m, 2s, 2s)
        t11, t22 = t[:, 0::2], t[:, 1::2]
        new = a.new_zeros(b, m, 2 * s, 2 * s)
        new[..., :s, :s] = t11
        new[..., :s, s:] = torch.matmul(torch.matmul(t11, pairs[..., :s, s:]), t22).neg_()
        new[..., s:, s:] = t22
        t, s = new, 2 * s
    return t.view(b, r, r)


def _split_product(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Yᵀ·G (B, r, c) for Y (B, n, r), G (B, n, c), summed as rows < r plus rows ≥ r: the order in which
    :class:`_FrameFromBlock` sums it (its Y is two pieces), so that a frame has the same value alone or in a batch."""
    r = y.shape[-1]
    return _two_part_product(y[..., :r, :], y[..., r:, :], g[..., :r, :], g[..., r:, :])


def _two_part_product(y_top, y_bottom, g_top, g_bottom) -> torch.Tensor:
    """Yᵀ·G from the row pieces of Y and G, summed as top plus bottom (the one order both frame paths use)."""
    return torch.baddbmm(torch.bmm(y_top.mT, g_top), y_bottom.mT, g_bottom)


def _wy_factors(y: torch.Tensor, eye: torch.Tensor, mask: torch.Tensor, offset: torch.Tensor | None,
                blocked: bool = False):
    """(T, X) of the compact WY form for unit lower-trapezoidal Y (B, n, r): T = (T⁻¹)⁻¹ with
    T⁻¹ = striu(YᵀY) + ½·diag(YᵀY) (+ 1 on the diagonal of zero-padded columns, which decouples them from the
    real ones), and X = T·Y_topᵀ. T is formed once (:func:`triangular_inverse`); X, and the backward, are batched
    products."""
    r = y.shape[-1]
    gram = _split_product(y, y)
    t_inv = gram * mask if offset is None else torch.addcmul(offset, gram, mask)
    t = triangular_inverse(t_inv, blocked and not torch.is_grad_enabled())
    return t, torch.bmm(t, y[..., :r, :].mT)


class _CompactWY(torch.autograd.Function):
    """Q = I_{n×r} − Y·T·Y_topᵀ for unit lower-trapezoidal Y (B, n, r), with a hand-written backward.

    Written in the ``setup_context`` form with a generated vmap rule, so that it composes with ``torch.func``
    (grad, vmap, jacrev). The outputs T and X are saved for the backward; callers use the first output only.
    The backward is six batched products (about 15 operator calls), no triangular solve.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, eye: torch.Tensor, mask: torch.Tensor, offset: torch.Tensor | None, blocked: bool):
        t, x = _wy_factors(y, eye, mask, offset, blocked)
        q = torch.bmm(y, x).neg_()
        q[..., : eye.shape[-1], :] += eye  # I_{n×r} − Y·X without an (n, r) identity
        return q, t, x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (y, eye, mask, offset, _), (_, t, x) = inputs, output
        ctx.mark_non_differentiable(t, x)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, t, x, eye, mask, offset)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, _grad_t=None, _grad_x=None):
        if grad_q is None:
            return None, None, None, None, None
        y, t, x, eye, mask, offset = ctx.saved_tensors
        grad_q = grad_q.contiguous()  # an expanded ∂Q (from a sum) would send the batched products to a slow path
        double = torch.is_grad_enabled()
        if double:  # double backward: rebuild the factors inside the graph
            t, x = _wy_factors(y, eye, mask, offset)
        r = y.shape[-1]
        xt = x.mT
        h = torch.bmm(t.mT, _split_product(y, grad_q))  # −∂/∂(Y_topᵀ)
        grad_gram = torch.bmm(h, xt) * mask
        if double:
            grad_y = torch.baddbmm(torch.bmm(y, grad_gram + grad_gram.mT), grad_q, xt, alpha=-1)
            return torch.cat([grad_y[..., :r, :] - h.mT, grad_y[..., r:, :]], dim=-2), None, None, None, None
        grad_y = torch.bmm(y, grad_gram + grad_gram.mT).baddbmm_(grad_q, xt, alpha=-1)  # one (n, r) tensor
        grad_y[..., :r, :] -= h.mT
        return grad_y, None, None, None, None


def _unit_top(block: torch.Tensor, eye: torch.Tensor, reduced: bool) -> torch.Tensor:
    """Y's leading r×r block (B, r, r) from a free block: I_r (reduced) or the unit-lower part of its first r rows."""
    r = block.shape[-1]
    if reduced:
        return eye.expand(block.shape[0], r, r)
    return block[..., :r, :].tril(-1) + eye


def _bottom(block: torch.Tensor, reduced: bool) -> torch.Tensor:
    """Y's rows r…n−1 (B, n − r, r): the free block itself (reduced) or its rows from r on (a view)."""
    return block if reduced else block[..., block.shape[-1]:, :]


def _stacked_y(block: torch.Tensor, eye: torch.Tensor, reduced: bool) -> torch.Tensor:
    """Y = [top; bottom] (B, n, r) of free blocks, formed (plain differentiable ops)."""
    return torch.cat([_unit_top(block, eye, reduced), _bottom(block, reduced)], dim=-2)


def _block_gradient(grad_y: torch.Tensor, r: int, reduced: bool) -> torch.Tensor:
    """∂block from ∂Y (B, n, r), plain differentiable ops: rows ≥ r (reduced), or the strictly lower part of rows
    < r above rows ≥ r (full)."""
    if reduced:
        return grad_y[..., r:, :]
    return torch.cat([grad_y[..., :r, :].tril(-1), grad_y[..., r:, :]], dim=-2)


class _UnitLowerY(torch.autograd.Function):
    """Y = [top; bottom] (B, n, r) of free blocks (see :func:`_unit_top`); its backward is one copy of ∂Y (the
    rows < r of a full block keep their strictly lower entries), not the zero-filled slices of ``cat``'s."""

    @staticmethod
    def forward(block, eye, reduced: bool):
        return _stacked_y(block, eye, reduced)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.reduced, ctx.r = inputs[2], inputs[0].shape[-1]

    @staticmethod
    def backward(ctx, grad_y):
        r = ctx.r
        if ctx.reduced or torch.is_grad_enabled():
            return _block_gradient(grad_y, r, ctx.reduced), None, None
        grad = grad_y.clone()
        grad[..., :r, :].tril_(-1)
        return grad, None, None


class _FrameFromBlock(torch.autograd.Function):
    """Q = I_{n×r} − Y·T·Y_topᵀ of one frame (a batch of 1) straight from its free block (:func:`free_block_shape`):
    Y = [top; bottom] is never formed, the (n, r) products read the block in place and write the two halves of
    Q (and of ∂block) directly, so forward and backward each allocate one (n, r) tensor. The products and the
    backward are those of :class:`_CompactWY`. Not for torch.func transforms (callers form Y there)."""

    @staticmethod
    def forward(block, eye, mask, reduced: bool, blocked: bool):
        top, bottom = _unit_top(block, eye, reduced), _bottom(block, reduced)
        gram = _two_part_product(top, bottom, top, bottom)
        t = triangular_inverse(gram * mask, blocked)
        x = torch.bmm(t, top.mT)
        r = block.shape[-1]
        q = block.new_empty(1, r + bottom.shape[-2], r)
        torch.bmm(top, x, out=q[:, :r]).neg_().add_(eye)
        torch.bmm(bottom, x, out=q[:, r:]).neg_()
        return q, t, x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (block, eye, mask, reduced, _), (_, t, x) = inputs, output
        ctx.mark_non_differentiable(t, x)
        ctx.set_materialize_grads(False)
        ctx.reduced = reduced
        ctx.save_for_backward(block, t, x, eye, mask)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, _grad_t=None, _grad_x=None):
        if grad_q is None:
            return None, None, None, None, None
        block, t, x, eye, mask = ctx.saved_tensors
        grad_q = grad_q.contiguous()  # as in _CompactWY
        reduced, r = ctx.reduced, block.shape[-1]
        top, bottom = _unit_top(block, eye, reduced), _bottom(block, reduced)
        if torch.is_grad_enabled():  # double backward: through Y, formed inside the graph
            y = _stacked_y(block, eye, reduced)
            grad_y, = torch.autograd.grad(_CompactWY.apply(y, eye, mask, None, False)[0], y, grad_q,
                                          create_graph=True)
            return _block_gradient(grad_y, r, reduced), None, None, None, None
        g_top, g_bottom, xt = grad_q[:, :r], grad_q[:, r:], x.mT
        h = torch.bmm(t.mT, _two_part_product(top, bottom, g_top, g_bottom))  # −∂/∂(Y_topᵀ)
        grad_gram = torch.bmm(h, xt) * mask
        sym = grad_gram + grad_gram.mT
        if reduced:
            return torch.bmm(bottom, sym).baddbmm_(g_bottom, xt, alpha=-1), None, None, None, None
        grad = torch.empty_like(block)
        torch.bmm(top, sym, out=grad[:, :r]).baddbmm_(g_top, xt, alpha=-1).sub_(h.mT).tril_(-1)  # strictly lower
        torch.bmm(bottom, sym, out=grad[:, r:]).baddbmm_(g_bottom, xt, alpha=-1)
        return grad, None, None, None, None


def compact_wy(y: torch.Tensor, pad: torch.Tensor | None = None,
               constants: WYConstants | None = None) -> torch.Tensor:
    """Q = H₁…H_r I_{n×r} = I_{n×r} − Y·T·Y_topᵀ for unit lower-trapezoidal Y (B, n, r) → (B, n, r).

    ``pad`` (B, r): 1 for columns that are zero padding (their Y column is zero), 0 for real ones. Padding is
    exactly inert: zero rows of Y give zero rows of Q, and padded columns do not touch the real columns of Q.
    ``constants`` (:func:`wy_constants`, built once by callers that repeat the call) replaces ``pad``.
    """
    if constants is None:
        constants = wy_constants(y.shape[-2], y.shape[-1], pad, y.dtype, y.device)
    if constants.blocked and torch._C._functorch.peek_interpreter_stack() is not None:
        constants = constants._replace(blocked=False)  # in-place block assembly does not vmap: one solve
    return _CompactWY.apply(y, *constants)[0]


def householder_frame_masked(params: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Frames from reflector parameters with an explicit mask of free entries.

    ``params``: (…, n, r); ``mask``: broadcastable to it, 1 where a parameter is free, 0 elsewhere (a padded
    frame has zeros outside its own block). Returns Q (…, n, r) = H₁…H_r I_{n×r}. Half precision inputs are
    computed in float32 and cast back.
    """
    n, r = params.shape[-2:]
    if r > n:
        raise ValueError(f"reflector parameters of shape {tuple(params.shape)}: need n ≥ r in (…, n, r)")
    out_dtype = params.dtype
    work = _compute_dtype(out_dtype)
    batch_shape = params.shape[:-2]
    with without_autocast(params.device):
        eye = torch.eye(n, r, dtype=work, device=params.device)
        y = torch.addcmul(eye, params.to(work), mask.to(work))
        q = compact_wy(y.reshape(-1, n, r))
    return q.reshape(*batch_shape, n, r).to(out_dtype)


def householder_frame(params: torch.Tensor, reduced: bool = False) -> torch.Tensor:
    """Frame Q = H₁…H_r I_{n×r} ∈ St(n, r) from reflector parameters (…, n, r) in the LAPACK layout.

    ``reduced`` ignores rows < r of the parameters, giving a frame whose leading r×r block is upper triangular.
    """
    n, r = params.shape[-2:]
    _check_shape(n, r)
    return householder_frame_free(params[..., r:, :] if reduced else params, n, reduced)


def free_block_shape(n: int, r: int, reduced: bool = False) -> tuple[int, int]:
    """Shape of the block of the LAPACK layout that holds a frame's free parameters: (n, r), or (n − r, r) reduced.

    A reduced frame ignores rows < r of the layout, so only rows r…n−1 need storing; a full frame keeps the whole
    (n, r) layout (its upper triangle, r(r+1)/2 entries, is ignored).
    """
    _check_shape(n, r)
    return (n - r, r) if reduced else (n, r)


def _exporting() -> bool:
    """Whether torch.export is tracing (``torch.compiler.is_exporting``, absent before torch 2.5: False)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


def householder_frame_free(block: torch.Tensor, n: int, reduced: bool = False,
                           constants: WYConstants | None = None) -> torch.Tensor:
    """Frame Q (…, n, r) from the free block of its reflectors (see :func:`free_block_shape`).

    Full form: ``block`` is the (…, n, r) LAPACK layout, strictly-lower entries used. Reduced form: ``block`` is
    (…, n − r, r), rows r…n−1 of the layout, so that Y = [I_r; block]. Equals ``householder_frame`` of the layout.
    ``constants``: :func:`wy_constants` of (n, r) without padding, in the compute precision, for callers that
    repeat the call.
    """
    r = block.shape[-1]
    if tuple(block.shape[-2:]) != free_block_shape(n, r, reduced):
        raise ValueError(f"free reflector block of shape {tuple(block.shape)} does not fit a "
                         f"{'reduced' if reduced else 'full'} frame of shape ({n}, {r}): expected "
                         f"(…, {free_block_shape(n, r, reduced)[0]}, {r})")
    out_dtype = block.dtype
    work = _compute_dtype(out_dtype)
    batch_shape = block.shape[:-2]
    with without_autocast(block.device):
        b = block.to(work).reshape(math.prod(batch_shape), *block.shape[-2:])
        if constants is None:
            constants = wy_constants(n, r, dtype=work, device=block.device)
        if torch._C._functorch.peek_interpreter_stack() is not None or _exporting():
            # torch.func and torch.export: plain differentiable ops (no writes into views of an output)
            q = compact_wy(_stacked_y(b, constants.eye, reduced), constants=constants)
        elif b.shape[0] == 1:
            q = _FrameFromBlock.apply(b, constants.eye, constants.mask, reduced, constants.blocked)[0]
        else:  # a batch: Y formed once (Q's halves would not be contiguous views), then one compact-WY call
            q = compact_wy(_UnitLowerY.apply(b, constants.eye, reduced), constants=constants)
    return q.reshape(*batch_shape, n, r).to(out_dtype)


def householder_frame_batches(block_batches: Sequence[Sequence[torch.Tensor]], rows: Sequence[int],
                              reduced: Sequence[bool]) -> list[torch.Tensor]:
    """Frames of batches of free blocks (see :func:`householder_frame_free`), one compact-WY call per distinct shape.

    ``block_batches[p]`` holds B_p free blocks of one shape, each the free block of a frame with ``rows[p]`` rows,
    reduced where ``reduced[p]``. All blocks of one (shape, form, dtype, device) are stacked into a single batched
    call (paper supplement §7); returns one (B_p, rows[p], r_p) tensor per batch, in the input order.
    """
    if not len(block_batches) == len(rows) == len(reduced):
        raise ValueError(f"householder_frame_batches: {len(block_batches)} block batches, {len(rows)} row counts and "
                         f"{len(reduced)} reduced flags; pass one of each per batch")
    groups: dict = {}
    for i, (blocks, n, red) in enumerate(zip(block_batches, rows, reduced)):
        b = blocks[0]
        if any(x.shape != b.shape for x in blocks):
            raise ValueError(f"householder_frame_batches: batch {i} mixes block shapes "
                             f"{sorted({tuple(x.shape) for x in blocks})}; a batch holds blocks of one shape")
        groups.setdefault((tuple(b.shape), n, bool(red), b.dtype, b.device), []).append(i)
    out: list = [None] * len(block_batches)
    for (_, n, red, _, _), members in groups.items():
        if len(members) == 1 and len(block_batches[members[0]]) == 1:
            out[members[0]] = householder_frame_free(block_batches[members[0]][0], n, red).unsqueeze(0)
            continue
        stacked = torch.stack([b for i in members for b in block_batches[i]])
        pieces = householder_frame_free(stacked, n, red).split([len(block_batches[i]) for i in members])
        for i, q in zip(members, pieces):
            out[i] = q
    return out


def householder_frames_grouped(blocks: Sequence[torch.Tensor], rows: Sequence[int],
                               reduced: Sequence[bool]) -> list[torch.Tensor]:
    """Frames (rows[p], r_p) of many free blocks, blocks of one shape in one batched call.

    The one-block-per-frame form of :func:`householder_frame_batches`.
    """
    if not len(blocks) == len(rows) == len(reduced):
        raise ValueError(f"householder_frames_grouped: {len(blocks)} blocks, {len(rows)} row counts and "
                         f"{len(reduced)} reduced flags; pass one of each per frame")
    return [q[0] for q in householder_frame_batches([[b] for b in blocks], rows, reduced)]


def padded_householder_frames(
    params: Sequence[torch.Tensor], reduced: Sequence[bool] | bool = False
) -> list[torch.Tensor]:
    """Frames of different shapes in one batched call (paper supplement §7, Fig. 9).

    Each ``params[p]`` is (n_p, r_p). They are zero-padded into a (P, max n, max r) batch; the reflectors of the
    padding are inert for the leading n_p × r_p block, which is returned for each p and equals
    ``householder_frame(params[p], reduced[p])``.
    """
    if isinstance(reduced, bool):
        reduced = [reduced] * len(params)
    if len(reduced) != len(params):
        raise ValueError(f"padded_householder_frames: {len(params)} parameter tensors but {len(reduced)} reduced "
                         "flags; pass one flag per tensor or a single bool")
    if len(params) == 0:
        return []
    n_max = max(p.shape[-2] for p in params)
    r_max = max(p.shape[-1] for p in params)
    ref = params[0]
    batch = ref.new_zeros((len(params), n_max, r_max))
    mask = torch.zeros((len(params), n_max, r_max), dtype=ref.dtype, device=ref.device)
    for i, (p, red) in enumerate(zip(params, reduced)):
        n, r = p.shape[-2:]
        batch[i, :n, :r] = p
        mask[i, :n, :r] = frame_mask(n, r, red, device=ref.device, dtype=ref.dtype)
    q = householder_frame_masked(batch, mask)
    return [q[i, : p.shape[-2], : p.shape[-1]] for i, p in enumerate(params)]


FRAME_PASSES = 20  # memory passes over an (n, r) frame in its forward + backward (gathers, copies, products)


def frame_flops(n: int, r: int, element_flops: float = 0.0) -> float:
    """Cost of one (n, r) frame, forward + backward, in FLOPs: ≈ 10·n·r² (five n×r×r products) + 3·r³ (the r×r
    solve and products), plus :data:`FRAME_PASSES` passes over its n·r entries at ``element_flops`` each (what
    moving one entry costs, in FLOPs of the same time)."""
    return 10.0 * n * r * r + 3.0 * r**3 + FRAME_PASSES * element_flops * n * r


def frame_families(shapes: Sequence[tuple[int, int]], call_flops: float,
                   element_flops: float = 0.0) -> list[tuple[int, int, list[int]]]:
    """Group frames of shapes (n_p, r_p) into families, each computed by one compact-WY call on frames zero-padded
    to the family's (max n, max r).

    Two families merge while the cost their padding adds (:func:`frame_flops` of the padded shape minus that of the
    real shapes, ``element_flops`` per entry moved) stays below ``call_flops``, what one more call costs (its fixed
    per-call overhead, in FLOPs); the cheapest merge is made first. Returns ``(N, R, indices into shapes)`` per
    family, largest first.
    """
    distinct: dict[tuple[int, int], list[int]] = {}
    for i, (n, r) in enumerate(shapes):
        _check_shape(int(n), int(r))
        distinct.setdefault((int(n), int(r)), []).append(i)
    fams = [[n, r, members, len(members) * frame_flops(n, r, element_flops)] for (n, r), members in distinct.items()]

    def merged_cost(a, b) -> float:
        return (len(a[2]) + len(b[2])) * frame_flops(max(a[0], b[0]), max(a[1], b[1]), element_flops)

    while len(fams) > 1:
        extra, i, j = min((merged_cost(a, b) - a[3] - b[3], i, j) for i, a in enumerate(fams)
                          for j, b in enumerate(fams) if i < j)
        if extra >= call_flops:
            break
        a, b = fams[i], fams.pop(j)
        fams[i] = [max(a[0], b[0]), max(a[1], b[1]), sorted(a[2] + b[2]), merged_cost(a, b)]
    fams.sort(key=lambda f: -f[3])
    return [(n, r, members) for n, r, members, _ in fams]


def _column_signs(frame: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """s with frame · diag(s) closest to target: the sign of each diagonal entry of frameᵀ·target."""
    d = (frame * target).sum(dim=-2)
    return torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))


def frame_to_params(matrix: torch.Tensor, reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reflector parameters of the orthonormal factor of ``matrix`` (…, n, r), by Householder QR (``geqrf``).

    Returns ``(params, signs)`` with ``householder_frame(params, reduced) · diag(signs) = Q``, where
    ``matrix = Q·R`` with R's diagonal positive (for an orthonormal ``matrix``, Q is the matrix itself).
    ``signs`` is (…, r) with entries ±1. For ``reduced``, the leading r×r block of ``matrix`` must be upper
    triangular (a frame in St_U(n, r)); entries that would break the reduced form are ignored.
    """
    n, r = matrix.shape[-2:]
    _check_shape(n, r)
    work = _compute_dtype(matrix.dtype)
    a = matrix.detach().to(work)
    if not torch.isfinite(a).all():
        raise ValueError(f"frame_to_params: matrix of shape {tuple(matrix.shape)} has NaN or inf entries")
    qr, _tau = torch.geqrf(a)
    params = qr * frame_mask(n, r, reduced, device=a.device, dtype=work)
    frame = householder_frame(params, reduced)
    q_positive = torch.linalg.qr(a).Q
    q_positive = q_positive * _column_signs(q_positive, a).unsqueeze(-2)  # make diag(R) > 0
    signs = _column_signs(frame, q_positive)
    return params.to(matrix.dtype), signs.to(matrix.dtype)


def frame_to_params_exact(frame: torch.Tensor, reduced: bool = False) -> torch.Tensor:
    """Reflector parameters that reproduce an orthonormal ``frame`` (…, n, r) exactly, with no column signs.

    Each reflector maps the current column x onto +‖x‖·e_j; the first entry of y_j = x − ‖x‖e_j is formed as
    −‖x_tail‖²/(x_j + ‖x‖) when x_j > 0 (Parlett) so no cancellation occurs. Parameters grow without bound as a
    column approaches +e_j (the one direction this chart cannot reach). A square frame (n = r) of r reflectors has
    determinant (−1)^r: a square orthogonal matrix of the other sign is not reachable, and its last column comes
    back negated.
    """
    n, r = frame.shape[-2:]
    _check_shape(n, r)
    work = torch.float64
    a = frame.detach().to(work).clone()
    params = torch.zeros_like(a)
    for j in range(r):
        x = a[..., j:, j]
        alpha = x[..., 0]
        tail_sq = (x[..., 1:] ** 2).sum(-1)
        norm = torch.sqrt(alpha**2 + tail_sq)
        v0 = torch.where(alpha > 0, -tail_sq / (alpha + norm).clamp_min(torch.finfo(work).tiny), alpha - norm)
        v0 = torch.where(v0 == 0, torch.full_like(v0, -torch.finfo(work).tiny), v0)
        v = x / v0.unsqueeze(-1)
        v[..., 0] = 1.0
        if reduced:
            v[..., 1 : max(r - j, 1)] = 0.0
        tau = 2.0 / (v**2).sum(-1)
        params[..., j + 1 :, j] = v[..., 1:]
        block = a[..., j:, j:]
        a[..., j:, j:] = block - tau[..., None, None] * v.unsqueeze(-1) * (v.unsqueeze(-2) @ block)
    return params.to(frame.dtype)


def init_frame_params(
    n: int,
    r: int,
    init: str = "noisy_identity",
    reduced: bool = False,
    batch: Sequence[int] = (),
    alpha: float = 1e-4,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Initial reflector parameters (*batch, n, r) for a frame in St(n, r) (St_U for ``reduced``).

    * ``"identity"`` — zeros: the frame −I_{n×r};
    * ``"random"`` — reflectors of QR(N), N i.i.d. standard normal (Haar-distributed frame up to column signs);
    * ``"noisy_identity"`` — reflectors of QR(I_{n×r} + α·N); parameters are O(α) (paper supplement §9).
    """
    _check_shape(n, r)
    if init not in INITS:
        raise ValueError(f"unknown frame init {init!r}; choose one of {INITS}")
    shape = (*batch, n, r)
    if init == "identity":
        return torch.zeros(shape, dtype=dtype, device=device)
    noise = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
    base = noise if init == "random" else torch.eye(n, r, dtype=torch.float64, device=device) + alpha * noise
    if reduced:
        top = base[..., :r, :].triu()
        base = torch.cat([top, base[..., r:, :]], dim=-2)
    params, _ = frame_to_params(base, reduced)
    return params.to(dtype)


# ------------------------------------------------------------------------------------------------------ rotations
def operand_dtype(device: torch.device, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``tensors`` on ``device`` runs in: the autocast dtype where autocast is on for the
    device's type, else the promoted dtype of the tensors."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def householder_t(y: torch.Tensor) -> torch.Tensor:
    """T (…, r, r), upper triangular, of H = H₁…H_r = I − Y·T·Yᵀ with H_j = I − 2·y_j y_jᵀ/‖y_j‖².

    ``y``: (…, d, r), columns y_j any nonzero vectors. T⁻¹ = striu(YᵀY) + ½·diag(YᵀY) (the UT transform); T is
    computed in float32 or float64 (outside autocast) and returned in ``y``'s dtype; differentiable.
    """
    work = _compute_dtype(y.dtype)
    with without_autocast(y.device):
        yw = y.to(work)
        gram = yw.mT @ yw
        t_inv = gram.triu(1) + torch.diag_embed(0.5 * gram.diagonal(dim1=-2, dim2=-1))
        eye = torch.eye(y.shape[-1], dtype=work, device=y.device).expand_as(t_inv)
        t = torch.linalg.solve_triangular(t_inv, eye, upper=True)
    return t.to(y.dtype)


def householder_ts_grouped(ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`householder_t` of many reflector matrices Y_p (d_p, r_p): those of one (shape, dtype, device) are
    stacked into one batched call. Returns one T_p (r_p, r_p) per input, in the input order."""
    groups: dict = {}
    for i, y in enumerate(ys):
        groups.setdefault((tuple(y.shape), y.dtype, y.device), []).append(i)
    out: list = [None] * len(ys)
    for members in groups.values():
        ts = householder_t(torch.stack([ys[i] for i in members])) if len(members) > 1 else None
        for j, i in enumerate(members):
            out[i] = ts[j] if ts is not None else householder_t(ys[i])
    return out


def _minus_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x − a·bᵀ for matrices (addmm) or batches of them (baddbmm)."""
    if x.dim() == 2:
        return torch.addmm(x, a, b.mT, alpha=-1)
    return torch.baddbmm(x, a, b.mT, alpha=-1)


class _ApplyWY(torch.autograd.Function):
    """Z = X − ((X·Y)·S)·Yᵀ for X (…, N, d), Y (…, d, r), S (…, r, r) of equal batch shape, hand-written backward:
    ∂X = G − ((G·Y)·Sᵀ)·Yᵀ, ∂Y = −(Xᵀ·(G·Y·Sᵀ) + Gᵀ·(X·Y·S)), ∂S = −(X·Y)ᵀ·(G·Y)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        p = x @ y
        ctx.save_for_backward(x, y, s, p)
        return _minus_product(x, p @ s, y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, y, s, p = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: X·Y inside the graph
            p = x @ y
        gy = g @ y
        a = gy @ s.mT
        grad_x = _minus_product(g, a, y)
        grad_y = -(x.mT @ a + g.mT @ (p @ s))
        grad_s = -(p.mT @ gy)
        return grad_x, grad_y, grad_s


def apply_householder(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """X·H = X − ((X·Y)·T)·Yᵀ for H = I − Y·T·Yᵀ (:func:`householder_t`), without forming H: O(N·d·r).

    ``x``: (…, d) with ``y`` (d, r) and ``t`` (r, r); or a batch x (B, N, d), y (B, d, r), t (B, r, r). Pass
    ``t.mT`` for X·Hᵀ; for H·M use ``apply_householder(M.mT, y, t.mT).mT``. ``t`` defaults to ``householder_t(y)``.
    Runs in the common dtype of the operands (under autocast: the autocast dtype, as a matmul would) and returns
    that dtype; differentiable in x, y and t (twice).
    """
    if t is None:
        t = householder_t(y)
    batched = y.dim() == 3
    if y.dim() not in (2, 3) or x.shape[-1] != y.shape[-2] or t.shape[-2:] != (y.shape[-1],) * 2 or (
            batched and (x.dim() != 3 or x.shape[0] != y.shape[0] or t.shape[:-2] != y.shape[:1])):
        raise ValueError(f"apply_householder: x {tuple(x.shape)}, y {tuple(y.shape)}, t {tuple(t.shape)} do not fit; "
                         "expected x (…, d), y (d, r), t (r, r) or x (B, N, d), y (B, d, r), t (B, r, r)")
    device = x.device
    work = operand_dtype(device, x, y, t)
    with without_autocast(device):
        if batched:
            return _ApplyWY.apply(x.to(work), y.to(work), t.to(work))
        flat = x.reshape(-1, x.shape[-1]).to(work)
        return _ApplyWY.apply(flat, y.to(work), t.to(work)).reshape(x.shape)
