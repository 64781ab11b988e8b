"""The FLOP model of the forward paths of a converted layer, the choice among them, and the TT path's contraction
order.

A converted layer can run "dense" (materialise W, then the layer's own op), "lowrank" (x ↦ Vᵀx ↦ σ ↦ U without
forming W) or, for an STTP Linear, "tt" (contract the tensorised input with the cores). Each path is a
:class:`PathCost`: its estimated FLOPs for the input at hand and its number of operator calls; "auto" takes the
path of least FLOPs plus calls × a fixed per-call overhead (:func:`op_overhead_flops`, :func:`choose_path`), and
the layer records the FLOPs of the path it ran (what ``report`` shows).
"""
from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Sequence

import torch

from .frames import frame_flops
from .parametrizations import SpectralParametrization, TrainSide

__all__ = [
    "op_overhead_flops",
    "PathCost",
    "choose_path",
    "element_flops",
    "WeightPathCosts",
    "weight_path_costs",
    "batch_weight_products",
    "materialize_flops",
    "train_flops",
    "weight_path_flops",
    "linear_costs",
    "conv_costs",
    "embedding_costs",
    "conv_output_size",
    "conv_transpose_output_size",
    "has_tt_path",
    "tt_contraction",
    "tt_einsum_spec",
]


def op_overhead_flops(device: torch.device) -> float:
    """The fixed cost of one more kernel call, in FLOPs of work it could have done instead (about 20 µs at
    ~50 GFLOP/s on a CPU core; about 10 µs at tens of TFLOP/s on an accelerator). Keeps "auto" from choosing a
    path of many tiny contractions, such as the TT path at batch 1, when one small GEMM is faster."""
    return 1e6 if device.type == "cpu" else 1e8


def element_flops(device: torch.device) -> float:
    """What one pass over one tensor entry costs (reading and writing 4 bytes), in FLOPs of the same time: about
    20 on a CPU core (~10 GB/s against ~50 GFLOP/s), a small fraction on an accelerator (TB/s)."""
    return 20.0 if device.type == "cpu" else 0.1


class WeightPathCosts(NamedTuple):
    """The costs that shape the batched weight path (:class:`torch_sttp.weight_path.WeightPlan`), in FLOPs: one
    operator call, one compact-WY call (about 40 operator calls, forward and backward), one pass over one entry."""

    op: float
    frame_call: float
    element: float


def weight_path_costs(device: torch.device) -> WeightPathCosts:
    """:class:`WeightPathCosts` of ``device`` (from :func:`op_overhead_flops` and :func:`element_flops`)."""
    return WeightPathCosts(op_overhead_flops(device), 40 * op_overhead_flops(device), element_flops(device))


def batch_weight_products(layers: int, numel: int, costs: WeightPathCosts) -> bool:
    """Whether the weights of ``layers`` layers of one shape (``numel`` entries each) are formed as one batched
    product rather than layer by layer: batching saves about 6 operator calls per layer, but its backward stacks the
    layers' weight gradients, two more passes over every weight entry."""
    return layers > 1 and 6 * (layers - 1) * costs.op > 2 * layers * numel * costs.element


class PathCost(NamedTuple):
    """One forward path of a layer for one input: its FLOPs (weight formation included) and operator calls."""

    flops: float
    calls: int


def choose_path(requested: str, costs: Mapping[str, PathCost], device: torch.device) -> str:
    """The path to run: ``requested`` when it is available for this layer and input, for "auto" the least
    flops + calls·:func:`op_overhead_flops` on ``device``, and "dense" (always available) otherwise."""
    path = requested if requested in costs else ("dense" if requested != "auto" else "auto")
    if path != "auto":
        return path
    overhead = op_overhead_flops(device)
    return min(costs, key=lambda name: costs[name].flops + costs[name].calls * overhead)


def materialize_flops(p: SpectralParametrization) -> float:
    """FLOPs of forming W = (U·Σ)·Vᵀ: 2·R·d_out·d_in."""
    return 2.0 * p.r_mid * p.d_out * p.d_in


def train_flops(side: TrainSide) -> float:
    """Forward FLOPs of contracting one train side from its outer end (:func:`torch_sttp.tt.contract_train`, the
    order the weight path uses): step k ≥ 1 multiplies the partial product (n_0⋯n_{k−1}, R_k) by core k
    (R_k, n_k·R_{k+1}), 2·n_0⋯n_{k−1}·R_k·n_k·R_{k+1}; 0 for one core (SVDP). Its backward costs twice as much."""
    flops, rows = 0.0, 1
    for k, n in enumerate(side.modes):
        if k > 0:
            flops += 2.0 * rows * side.ranks[k] * n * side.ranks[k + 1]
        rows *= n
    return flops


def weight_path_flops(p: SpectralParametrization) -> tuple[float, float]:
    """(floor, weight path) FLOPs of forming one layer's W and its gradient, forward + backward, without padding.
    Floor: the three GEMMs any method needs, W = (U·Σ)·Vᵀ, ∂(U·Σ) = G·V and ∂Vᵀ = (U·Σ)ᵀ·G, 3·2·R·d_out·d_in.
    Weight path: the floor plus every core's frame (:func:`torch_sttp.frames.frame_flops`, forward + backward)
    and each side's train contraction, 3·:func:`train_flops` (forward + backward)."""
    floor = 3.0 * materialize_flops(p)
    sides = (p.u_side, p.v_side)
    frames = sum(frame_flops(n, r) for side in sides for n, r in side.frame_shapes)
    return floor, floor + frames + 3.0 * sum(train_flops(side) for side in sides)


def has_tt_path(method: str, out_modes: Sequence[int], in_modes: Sequence[int]) -> bool:
    """Whether a Linear layer with these modes (:func:`torch_sttp.tt.split_modes`) has the "tt" path: STTP with
    more than two modes in all (with two, the cores are U and Vᵀ themselves and "tt" is "lowrank")."""
    return method == "sttp" and len(out_modes) + len(in_modes) > 2


def linear_costs(p: SpectralParametrization, batch: int, weight_flops: float, tt: bool) -> dict[str, PathCost]:
    """Paths of y = x·Wᵀ for ``batch`` rows: dense (W formed at ``weight_flops``; 1 call), low-rank (3 calls) and,
    if ``tt``, the TT path (one call per pairwise contraction). Dense: 2·d_out·d_in·B; low-rank:
    2·R·(d_in + d_out)·B + R·B."""
    r = p.r_mid
    costs = {
        "dense": PathCost(2.0 * p.d_out * p.d_in * batch + weight_flops, 1),
        "lowrank": PathCost(2.0 * r * (p.d_in + p.d_out) * batch + r * batch, 3),
    }
    if tt:
        steps, flops = tt_contraction(tuple(p.in_modes), tuple(p.out_modes), tuple(p.ranks), p.has_spectrum,
                                      int(batch))
        costs["tt"] = PathCost(flops, len(steps))
    return costs


def conv_costs(p: SpectralParametrization, weight_flops: float, batch: int, in_spatial: int, out_spatial: int,
               transposed: bool, groups: int) -> dict[str, PathCost]:
    """Paths of a (transposed) convolution: dense 2·d_out·d_in·positions·B (1 call), where positions are the
    output positions of a convolution and the input positions of a transposed one; low-rank (ungrouped only) an
    r-filter convolution followed by a 1×1 one (2 calls, σ folded into the second)."""
    positions = in_spatial if transposed else out_spatial
    costs = {"dense": PathCost(2.0 * p.d_out * p.d_in * positions * batch + weight_flops, 1)}
    if groups == 1:
        costs["lowrank"] = PathCost(2.0 * p.r_mid * (p.d_in * positions + p.d_out * out_spatial) * batch, 2)
    return costs


def embedding_costs(p: SpectralParametrization, weight_flops: float, lookups: int,
                    lowrank: bool = True) -> dict[str, PathCost]:
    """Paths of looking up ``lookups`` rows: dense (W formed, then one lookup) or low-rank (2·R·dim per row; a
    lookup in U, σ, the product with Vᵀ: 3 calls)."""
    costs = {"dense": PathCost(weight_flops, 1)}
    if lowrank:
        costs["lowrank"] = PathCost(2.0 * p.r_mid * p.d_in * lookups, 3)
    return costs


def conv_output_size(spatial: Sequence[int], conv) -> list[int]:
    """Output spatial size of ``conv`` (an ``nn.ConvNd``) for an input of spatial size ``spatial``."""
    out = []
    for i, n in enumerate(spatial):
        if isinstance(conv.padding, str):
            if conv.padding == "same":
                out.append(n)
                continue
            pad = 0
        else:
            pad = conv.padding[i]
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        out.append((n + 2 * pad - d * (k - 1) - 1) // s + 1)
    return out


def conv_transpose_output_size(spatial: Sequence[int], conv, output_padding: Sequence[int]) -> list[int]:
    """Output spatial size of ``conv`` (an ``nn.ConvTransposeNd``) for an input of spatial size ``spatial``."""
    return [(n - 1) * conv.stride[i] - 2 * conv.padding[i] + conv.dilation[i] * (conv.kernel_size[i] - 1)
            + output_padding[i] + 1 for i, n in enumerate(spatial)]


def _constant_result(fn):
    """Mark ``fn`` as returning a constant under torch.compile (evaluated while tracing, not traced).

    This is the flag ``torch.compiler.assume_constant_result`` sets; calling that function instead would import
    torch._dynamo (about 2 s) with every ``import torch_sttp``. A test checks that both set the same flag.
    """
    fn._dynamo_marked_constant = True
    return fn


@_constant_result
def tt_contraction(in_modes: tuple, out_modes: tuple, ranks: tuple, has_spectrum: bool, batch: int):
    """opt_einsum's contraction order for the TT path as ((operand positions, pairwise equation), …), and its cost.

    Positions index the current operand list; each step pops those operands in order and appends its result
    (opt_einsum's own convention), so the steps run with ``torch.einsum`` alone — no opt_einsum at run time,
    and nothing that torch.compile cannot trace.
    """
    return _tt_contraction_cached(in_modes, out_modes, ranks, has_spectrum, batch)


@functools.lru_cache(maxsize=512)
def _tt_contraction_cached(in_modes: tuple, out_modes: tuple, ranks: tuple, has_spectrum: bool, batch: int):
    import opt_einsum

    shapes, subscripts = tt_einsum_spec(in_modes, out_modes, ranks, has_spectrum, batch)
    _, info = opt_einsum.contract_path(subscripts, *shapes, shapes=True, optimize="auto")
    steps = tuple((tuple(step[0]), step[2]) for step in info.contraction_list)
    return steps, float(info.opt_cost)


def tt_einsum_spec(in_modes, out_modes, ranks, has_spectrum: bool, batch: int):
    """Operand shapes and einsum subscripts of y[b, out…] = x[b, in…]·V cores·σ·U cores."""
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    b = next(letters)
    in_idx = [next(letters) for _ in in_modes]
    out_idx = [next(letters) for _ in out_modes]
    bond = [next(letters) for _ in ranks]
    n_out = len(out_modes)
    shapes, terms = [(batch, *in_modes)], [b + "".join(in_idx)]
    for j, n in enumerate(in_modes):  # V core for mode n_out + j in the original orientation
        k = n_out + j
        shapes.append((ranks[k], n, ranks[k + 1]))
        terms.append(bond[k] + in_idx[j] + bond[k + 1])
    if has_spectrum:
        shapes.append((ranks[n_out],))
        terms.append(bond[n_out])
    for k, n in enumerate(out_modes):
        shapes.append((ranks[k], n, ranks[k + 1]))
        terms.append(bond[k] + out_idx[k] + bond[k + 1])
    # the outer bonds have size 1; they are summed away
    return shapes, ",".join(terms) + "->" + b + "".join(out_idx)
