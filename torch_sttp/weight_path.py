"""The batched weight path: the factors (U, σ, Vᵀ) and the weights of many SVDP/STTP layers in a few calls.

A :class:`WeightPlan` is built once for a list of parametrizations (whose tensors share one dtype and device) and
holds the constants of the computation — index maps, padding masks; :meth:`WeightPlan.run` evaluates it on the
layers' tensors (U reflectors, V reflectors[, S] each). Its number of operator calls grows with the number of
distinct layer structures, not with the number of cores or layers:

1. **frames** — frames are grouped into *families* of frame shapes, zero-padded to a common (n, r)
   (:func:`~torch_sttp.frames.frame_families` weighs padding FLOPs against calls); each family is one compact-WY
   call, its padded rows and columns exactly inert. A family's Y batch is gathered from the parameters (one gather
   for all families, whose backward is the inverse gather, not a scatter), except where the family is read in
   place (below) and holds whole reflector tensors of one form (sides of one core): then it is formed from them;
2. **trains** — the cores are taken from the frames straight into the operand layout of batched contractions:
   the frames of an unpadded family whose steps read them slot for slot (U cores, first V cores, no rank padding)
   are split into their operands (views; a first V core is transposed once), all others are gathered, by one
   gather. The trains of one side are contracted from
   their outer end as a *forest*: layers whose modes begin alike share the steps of that common beginning (one
   ``bmm`` per step for all of them; U sides of d_out = 64, 128 and 256 share their first six steps), bond ranks
   zero-padded to the largest in the step. Modes are never padded (intermediate sizes are products of modes);
3. **Σ** — the spectra of all layers are gathered into one zero-padded batch and normalised in one go;
4. **weights** — on request, the weights of all layers of one shape are one batched product (U·Σ)·Vᵀ (or, where a
   stack of their gradients would cost more than the calls it saves, one product per layer); a layer is never
   padded to another shape.

A side without cores (a dimension of 1) is the constant 1, an output of the parameter gather, which has every
gathered tensor as an input, empty ones included. So a parameter takes part in the graph whenever a factor
computed with it is used; the tensors of a layer whose factors go unused in a step get no gradient when nothing
else shares their batched computation (as the unused weight of a dense layer: DDP then needs
``find_unused_parameters=True``, as it would for the dense model). The padded computation equals the layer-by-layer one
(:meth:`~torch_sttp.parametrizations.SpectralParametrization.factors`) up to rounding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .cost import WeightPathCosts, batch_weight_products
from .frames import (WYConstants, compact_wy, frame_families, free_block_shape, householder_frame_free,
                     without_autocast, wy_constants)
from .parametrizations import SpectralParametrization

__all__ = ["WeightPlan", "WeightPathResult", "structure_key", "compute_dtype", "bypassing_saved_tensor_hooks"]

_END = float("inf")  # sorts a train that ends after a step behind those that go on


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision frames are computed in: the parameters' own for float32/float64, float32 otherwise."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def structure_key(p: SpectralParametrization) -> tuple:
    """What a plan depends on in one parametrization (its sides, weight layout and spectrum)."""
    return (p.u_side, p.v_side, p.layout_shape, p.transposed, p.spectrum, p.eps, p.r_mid)


@dataclass(frozen=True)
class _Family:
    """A batch of ``count`` frames zero-padded to (n, r), computed by one compact-WY call."""

    count: int
    n: int
    r: int
    constants: WYConstants


@dataclass(frozen=True)
class _Step:
    """One contraction step of one side (0: U, 1: V) for a batch of trains: their core at ``depth`` (from the outer
    end) of size ``mode``, for ``members`` (plan indices, batch order), ranks zero-padded to ``rank_in`` (towards
    the outer end) and ``rank_out``.

    The input is piece ``piece`` of step ``parent``'s output (a first core is its own partial product, times
    ``sign`` where dropped cores were −1); the output is split into ``split``: the batches of the following steps,
    then the trains that end here, which form block ``block``."""

    side: int
    depth: int
    mode: int
    members: tuple[int, ...]
    rank_in: int
    rank_out: int
    parent: int | None
    piece: int
    split: tuple[int, ...]
    block: int | None
    sign: torch.Tensor | None


@dataclass(frozen=True)
class _Block:
    """The finished trains of one side and one mode sequence: U (B, d, R) or Vᵀ (B, R, d), R = ``rank``, members
    ordered by weight shape (``shape_sizes`` consecutive members per shape in ``shapes``); ``sigma_rows``: their
    rows in the Σ batch (a (start, count) range or an index) (U blocks with a learned spectrum)."""

    side: int
    members: tuple[int, ...]
    rank: int
    shapes: tuple[int, ...]
    shape_sizes: tuple[int, ...]
    sigma_rows: tuple[int, int] | torch.Tensor | None


@dataclass(frozen=True)
class _Shape:
    """The layers of one weight shape and where their factors lie: (block, piece) per side, or None for a side
    without cores; ``sigma_rows`` their rows in the Σ batch, ``rank`` their padded middle rank; ``batched``: their
    weights are formed as one product (else layer by layer)."""

    members: tuple[int, ...]
    layout: tuple[int, ...]
    transposed: bool
    rank: int
    u: tuple[int, int] | None
    v: tuple[int, int] | None
    sigma_rows: tuple[int, int] | torch.Tensor | None
    batched: bool  # weights formed as one batched product (else layer by layer)


class WeightPlan:
    """The constants of the batched weight path for a list of parametrizations (see the module docstring).

    ``costs`` (:func:`torch_sttp.cost.weight_path_costs`) decide how frames are grouped into padded families
    (:func:`~torch_sttp.frames.frame_families`; ``one_family`` pads every frame into a single one) and whether the
    weights of one shape are formed as one batched product (:func:`torch_sttp.cost.batch_weight_products`).
    ``dtype``/``device``: those of the layers' tensors.
    """

    def __init__(self, params: Sequence[SpectralParametrization], dtype: torch.dtype, device: torch.device,
                 costs: WeightPathCosts, one_family: bool = False) -> None:
        self.params = list(params)
        self.dtype, self.device = dtype, torch.device(device)
        self.work = compute_dtype(dtype)
        self.costs = costs
        frames = self._frame_list()
        self.sigma_members = [i for i, p in enumerate(self.params) if p.has_spectrum]
        self.sigma_rank = max((self.params[i].r_mid for i in self.sigma_members), default=0)
        self.shape_of = self._shape_ids()
        groups = self._groups(frames, one_family)
        self.steps, self.blocks, step_cores = [], [], []
        for side in (0, 1):
            self._grow(side, step_cores)
        groups = self._read_order(frames, groups, step_cores)
        self._order_spectra()
        offsets, total, y_index = self._place_families(frames, groups, step_cores)
        self.shapes, self.member_shape = self._shapes()
        unit = torch.tensor([self.one_slot])  # the constant 1 of a side without cores, tied to the gathered tensors
        self.param_gather = self._gather_maps(torch.cat([y_index, self._sigma_index(offsets), unit]), total)
        core_index = [self._core_index(cores, step) for cores, step, d in zip(step_cores, self.steps, self.step_direct)
                      if not d]
        self.operand_sizes = tuple(math.prod(t.shape) for t in core_index)
        self.gathered_steps = [s for s, direct in enumerate(self.step_direct) if not direct]
        self.param_sizes = tuple(self.y_sizes + ([len(self.sigma_members) * self.sigma_rank] if self.sigma_members
                                                 else []) + [1])  # the parameter gather's pieces: Y, Σ, the unit
        core = torch.cat([t.reshape(-1) for t in core_index]) if core_index else torch.zeros(0, dtype=torch.long)
        self.core_gather = self._gather_maps(core, self.frames_numel)
        self.zero_one = torch.tensor([0.0, 1.0], dtype=dtype, device=self.device)
        self.zero = torch.zeros(1, dtype=dtype, device=self.device)
        self.sigma_scale = self._sigma_scale()

    def _place_families(self, frames, groups, step_cores):
        """Where each family's frames come from and go to: ``direct`` (read in place by its steps, else gathered),
        ``formed_reduced`` (formed from whole tensors in place: their form; else None, Y gathered), the tensors the
        parameter gather reads; returns their offsets, their total size and the Y gather index."""
        self.direct = self._direct_families(frames, groups, step_cores)
        self.formed_reduced = self._formed_families(frames, groups)
        self.formed_blocks = [[frames[j][:2] for j in members] if formed is not None else []
                              for formed, (_, _, members) in zip(self.formed_reduced, groups)]
        offsets, total = self._tensor_offsets({key for blocks in self.formed_blocks for key in blocks})
        self.gather_sources = [(i, t) for i, row in enumerate(offsets) for t, o in enumerate(row) if o is not None]
        self.zero_slot, self.one_slot = total, total + 1
        self.families, y_index, self.frame_address = self._families(frames, groups, offsets)
        self.y_sizes = [f.count * f.n * f.r for f, formed in zip(self.families, self.formed_reduced) if formed is None]
        self.frames_numel = sum(f.count * f.n * f.r for d, f in zip(self.direct, self.families) if not d)
        self.direct_steps = [[s for s, cores in enumerate(step_cores) if self._family_of(cores) == f] if d else []
                             for f, d in enumerate(self.direct)]
        self.step_direct = [self.direct[self._family_of(cores)] for cores in step_cores]
        return offsets, total, y_index

    def _gather_maps(self, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, inverse) of a gather from ``size`` source entries (then constants), on the plan's device; int32
        where they fit (a CPU gather reads them ~20 % faster)."""
        inverse = _inverse(index, size)
        small = max(size + 2, index.numel() + 1) < 2 ** 31
        return tuple(t.to(self.device, torch.int32 if small else torch.long) for t in (index, inverse))

    def _rows(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------------------------- frames, building
    def _tensor_offsets(self, skipped: set) -> tuple[list[list[int | None]], int]:
        """Offsets of each member's tensors (U reflectors, V reflectors[, S]) in the concatenation of those the
        parameter gather reads (None for the ``skipped`` (member, tensor) pairs), and its size."""
        offsets, total = [], 0
        for i, p in enumerate(self.params):
            sizes = [p.u_side.numel, p.v_side.numel] + ([p.r_mid] if p.has_spectrum else [])
            offsets.append([])
            for t, size in enumerate(sizes):
                offsets[-1].append(None if (i, t) in skipped else total)
                total += 0 if (i, t) in skipped else size
        return offsets, total

    def _frame_list(self) -> list[tuple]:
        """(member, side, core, rows, cols, reduced, offset of its free block in its tensor) of every core."""
        frames = []
        for i, p in enumerate(self.params):
            for side_index, side in enumerate((p.u_side, p.v_side)):
                start = 0
                for k, ((rows, cols), red) in enumerate(zip(side.frame_shapes, side.reduced)):
                    frames.append((i, side_index, k, rows, cols, red, start))
                    a, b = side.block_shapes[k]
                    start += a * b
        return frames

    def _groups(self, frames, one_family: bool) -> list[tuple[int, int, list[int]]]:
        """Families as (n, r, frame indices); sets ``group_of``, each frame's family."""
        shapes = [(f[3], f[4]) for f in frames]
        if not frames:
            groups = []
        elif one_family:
            groups = [(max(n for n, _ in shapes), max(r for _, r in shapes), list(range(len(frames))))]
        else:
            groups = frame_families(shapes, self.costs.frame_call, self.costs.element)
        self.group_of = {frames[j][:3]: g for g, (_, _, members) in enumerate(groups) for j in members}
        return groups

    @staticmethod
    def _read_order(frames, groups, step_cores) -> list[tuple[int, int, list[int]]]:
        """The families with their frames in the order the steps read them (a step's cores consecutive, steps in
        plan order)."""
        read = {key: n for n, key in enumerate(key for cores in step_cores for key in cores)}
        return [(n, r, sorted(members, key=lambda j: read.get(frames[j][:3], len(read)))) for n, r, members in groups]

    def _direct_families(self, frames, groups, step_cores) -> list[bool]:
        """Whether each family's frames are, slot for slot, the operands of whole steps, so that they are split into
        those operands (views of U cores, one transposing copy of first V cores) rather than gathered: unpadded
        frames of U cores or of first V cores, with the ranks their step pads to."""
        shape = {f[:3]: (f[3], f[4]) for f in frames}

        def viewable(cores, step) -> bool:
            n, r, _ = groups[self.group_of[cores[0]]]
            return (step.side == 0 or step.parent is None) and all(
                self.group_of[key] == self.group_of[cores[0]] and shape[key] == (n, r)
                and tuple(self._side(key[0], key[1]).ranks[key[2]:key[2] + 2]) == (step.rank_in, step.rank_out)
                for key in cores)

        step_of = {key: s for s, cores in enumerate(step_cores) for key in cores}
        ok = [viewable(cores, step) for cores, step in zip(step_cores, self.steps)]
        return [all(frames[j][:3] in step_of and ok[step_of[frames[j][:3]]] for j in members)
                for _, _, members in groups]

    def _formed_families(self, frames, groups) -> list[bool | None]:
        """For each family whose frames are formed from their parameters in place (no gather: a direct family of
        whole reflector tensors, sides of one core, all of one form) whether that form is the reduced one; None
        for the families whose Y is gathered."""
        formed = []
        for direct, (_, _, members) in zip(self.direct, groups):
            whole = all(len(self._side(*frames[j][:2]).frame_shapes) == 1 for j in members)
            forms = {frames[j][5] for j in members}
            formed.append(forms.pop() if direct and whole and len(forms) == 1 else None)
        return formed

    def _family_of(self, cores) -> int:
        return self.group_of[cores[0]]

    def _families(self, frames, groups, offsets):
        """Families of frames, the Y gather index (families not formed in place), and each frame's (family, slot,
        address among the gathered frames (None in a direct family), row stride)."""
        families, pieces, address, base = [], [], {}, 0
        for g, (n_f, r_f, members) in enumerate(groups):
            pad = torch.zeros(len(members), r_f)
            for slot, j in enumerate(members):
                i, side, k, rows, cols, red, start = frames[j]
                if self.formed_reduced[g] is None:
                    pieces.append(self._y_index(rows, cols, red, offsets[i][side] + start, n_f, r_f))
                pad[slot, cols:] = 1.0
                address[(i, side, k)] = (g, slot, None if self.direct[g] else base + slot * n_f * r_f, r_f)
            # one triangular solve per family: fewer calls, and at these batch sizes its cost does not matter
            constants = wy_constants(n_f, r_f, pad if bool(pad.any()) else None, self.work, self.device, False)
            families.append(_Family(len(members), n_f, r_f, constants))
            if not self.direct[g]:
                base += len(members) * n_f * r_f
        index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        return families, index, address

    def _y_index(self, n: int, r: int, reduced: bool, start: int, n_pad: int, r_pad: int) -> torch.Tensor:
        """Gather index of one frame's Y (unit diagonal, free entries below it), zero-padded to (n_pad, r_pad)."""
        rows = torch.arange(n_pad).unsqueeze(1)
        cols = torch.arange(r_pad).unsqueeze(0)
        real = (rows < n) & (cols < r)
        if reduced:  # the free block holds rows r…n−1
            free = real & (rows >= r)
            entry = start + (rows - r) * r + cols
        else:  # the free block is the (n, r) LAPACK layout, strictly lower entries used
            free = real & (rows > cols)
            entry = start + rows * r + cols
        index = torch.where(free, entry, torch.full_like(entry, self.zero_slot))
        index = torch.where(real & (rows == cols), torch.full_like(entry, self.one_slot), index)
        return index.reshape(-1)

    def _sigma_index(self, offsets) -> torch.Tensor:
        """Gather index of every learned spectrum into one zero-padded (L, R̂) batch (plan order)."""
        rank = self.sigma_rank
        return torch.tensor([offsets[i][2] + c if c < self.params[i].r_mid else self.zero_slot
                             for i in self.sigma_members for c in range(rank)], dtype=torch.long)

    def _sigma_scale(self):
        """How Σ is formed from S: None (as it is), a float (S/max(‖S‖∞, eps) for every row), or per-row
        (eps (L, 1), normalised (L, 1)) constants for a mix of spectra."""
        rows = [self.params[i] for i in self.sigma_members]
        normalized = [p.spectrum == "normalized" for p in rows]
        if not any(normalized):
            return None
        eps = {p.eps for p in rows}
        if all(normalized) and len(eps) == 1:
            return eps.pop()
        return (torch.tensor([[p.eps] for p in rows], dtype=self.dtype, device=self.device),
                torch.tensor([[n] for n in normalized], device=self.device))

    # -------------------------------------------------------------------------------------- trains, building
    def _shape_ids(self) -> list[int]:
        """Each member's weight-shape group (members of one layout, orientation, spectrum and mode sequences)."""
        ids: dict = {}
        return [ids.setdefault((p.layout_shape, p.transposed, p.spectrum, p.eps, p.u_side.modes, p.v_side.modes),
                               len(ids)) for p in self.params]

    def _side(self, i: int, side: int):
        p = self.params[i]
        return p.u_side if side == 0 else p.v_side

    def _skipped(self, i: int, side: int) -> int:
        """Outer cores left out of the forest: 1×1 frames of mode 1 (a 1×1 kernel), each the constant −1."""
        modes = self._side(i, side).modes
        k = 0
        while k < len(modes) - 1 and modes[k] == 1:
            k += 1
        return k

    def _modes(self, i: int, side: int) -> tuple:
        return self._side(i, side).modes[self._skipped(i, side):]

    def _grow(self, side: int, step_cores: list) -> None:
        """The steps and blocks of one side's forest (trains ordered so that every step's batch is contiguous)."""
        members = [i for i in range(len(self.params)) if self._side(i, side).modes]
        members.sort(key=lambda i: (self._modes(i, side) + (_END,), self.shape_of[i], i))
        self._branch(side, members, 0, None, 0, 1, step_cores)

    def _branch(self, side: int, members: list[int], depth: int, parent, piece: int, rank_in: int,
                step_cores: list) -> list[int]:
        """Steps for forest depth ``depth`` of ``members`` (all with more cores), one per distinct
        :meth:`_run_key` (the mode; for sides of one core also their family); returns the sizes of their
        batches."""
        runs: dict = {}
        for i in members:
            runs.setdefault(self._run_key(i, side, depth), []).append(i)
        sizes = []
        for (mode, _), run in runs.items():
            index = len(self.steps)
            cores = [self._skipped(i, side) + depth for i in run]
            rank_out = max(self._side(i, side).ranks[k + 1] for i, k in zip(run, cores))
            self.steps.append(None)  # reserved: steps are listed parents first
            step_cores.append([(i, side, k) for i, k in zip(run, cores)])
            going = [i for i in run if len(self._modes(i, side)) > depth + 1]
            ended = [i for i in run if len(self._modes(i, side)) == depth + 1]
            split = self._branch(side, going, depth + 1, index, 0, rank_out, step_cores) if going else []
            block = None
            if ended:
                block = len(self.blocks)
                self.blocks.append(self._block(side, ended, rank_out))
                split = split + [len(ended)]
            sign = None
            if depth == 0 and any(self._skipped(i, side) % 2 for i in run):
                sign = torch.tensor([-1.0 if self._skipped(i, side) % 2 else 1.0 for i in run], dtype=self.dtype,
                                    device=self.device).view(-1, 1, 1)
            self.steps[index] = _Step(side, depth, mode, tuple(run), rank_in, rank_out, parent, piece,
                                      tuple(split), block, sign)
            sizes.append(len(run))
            piece += 1
        return sizes

    def _run_key(self, i: int, side: int, depth: int) -> tuple[int, int]:
        """What the cores of one step share: their mode, and for sides of one core the family that holds the frames
        of all layers of i's weight shape, if one does (so that an unpadded family is read in place, see
        ``_direct_families``; such a step has no product to share, and a shape's factors stay in one block)."""
        modes = self._modes(i, side)
        if len(modes) > 1:
            return modes[depth], -1
        families = {self.group_of[(j, side, self._skipped(j, side))] for j, s in enumerate(self.shape_of)
                    if s == self.shape_of[i]}
        return modes[depth], families.pop() if len(families) == 1 else -1

    def _block(self, side: int, ended: list[int], rank: int) -> _Block:
        shapes = sorted(set(self.shape_of[i] for i in ended))
        sizes = tuple(sum(self.shape_of[i] == s for i in ended) for s in shapes)
        return _Block(side, tuple(ended), rank, tuple(shapes), sizes, None)  # sigma_rows: see _order_spectra

    def _order_spectra(self) -> None:
        """The Σ batch in the order of the U blocks, so that a block's (and a shape's) rows are one range, read as a
        view; then each U block's ``sigma_rows``."""
        in_blocks = [i for b in self.blocks if b.side == 0 for i in b.members if self.params[i].has_spectrum]
        rest = [i for i in self.sigma_members if i not in set(in_blocks)]
        self.sigma_members = in_blocks + rest
        self.blocks = [dataclasses.replace(b, sigma_rows=self._sigma_rows(b.members))
                       if b.side == 0 and self.params[b.members[0]].has_spectrum else b for b in self.blocks]

    def _sigma_rows(self, members) -> tuple[int, int] | torch.Tensor:
        """Rows of ``members`` in the Σ batch: (start, count) where they are one ascending range, else an index."""
        rows = [self.sigma_members.index(i) for i in members]
        return (rows[0], len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else self._rows(rows)

    def _core_index(self, cores, step: _Step) -> torch.Tensor:
        """Gather index of one step's operand (B, rows, cols) from the gathered frames."""
        return torch.stack([self._core_entry(i, side, k, step.rank_in, step.rank_out) for i, side, k in cores])

    def _core_entry(self, i: int, side: int, k: int, rank_in: int, rank_out: int) -> torch.Tensor:
        """Gather index of core k of member i's side as a step operand, ranks zero-padded to (rank_in, rank_out).

        U core (R_{k−1}, n_k, R_k) from its frame (R_{k−1}·n_k, R_k): operand (R̃_{k−1}, n_k·R̃_k). V core from its
        frame (n_k·R_k, R_{k+1}) (rows: mode, then the outer rank): operand (R̃_{k+1}·n_k, R̃_k).
        """
        s = self._side(i, side)
        n, (_, _, base, stride) = s.modes[k], self.frame_address[(i, side, k)]
        outer, inner = s.ranks[k], s.ranks[k + 1]
        m = torch.arange(n).view(1, -1, 1)
        if side == 0:
            a, c = torch.arange(rank_in).view(-1, 1, 1), torch.arange(rank_out).view(1, 1, -1)
            entry, shape = base + (a * n + m) * stride + c, (rank_in, n * rank_out)
        else:
            c, a = torch.arange(rank_out).view(-1, 1, 1), torch.arange(rank_in).view(1, 1, -1)
            entry, shape = base + (m * outer + a) * stride + c, (rank_out * n, rank_in)
        valid = (a < outer) & (c < inner)
        return torch.where(valid, entry, torch.full_like(entry, self.frames_numel)).reshape(shape)

    def _shapes(self):
        """Weight-shape groups (members ascending, as inside their blocks) and each member's (group, position)."""
        where = {(b.side, s): (n, piece) for n, b in enumerate(self.blocks) for piece, s in enumerate(b.shapes)}
        shapes, member_shape = [], {}
        for s in range(max(self.shape_of, default=-1) + 1):
            members = [i for i, t in enumerate(self.shape_of) if t == s]
            p = self.params[members[0]]
            rows = self._sigma_rows(members) if p.has_spectrum else None
            for j, i in enumerate(members):
                member_shape[i] = (s, j)
            batched = batch_weight_products(len(members), p.d_out * p.d_in, self.costs)
            shapes.append(_Shape(tuple(members), p.layout_shape, p.transposed,
                                 max(self.params[i].r_mid for i in members), where.get((0, s)), where.get((1, s)),
                                 rows, batched))
        return shapes, member_shape

    # ----------------------------------------------------------------------------------------------- running
    def run(self, tensors: Sequence[Sequence[torch.Tensor]]) -> WeightPathResult:
        """Frames, trains and Σ of every member from its tensors (U reflectors, V reflectors[, S])."""
        sources = [tensors[i][t] for i, t in self.gather_sources]
        with without_autocast(self.device):
            pieces = _Gather.apply(*self.param_gather, self.zero_one, self.param_sizes, *sources)
            frames = self._frames(pieces[:len(self.y_sizes)], tensors)
            blocks = self._contract(self._operands(frames))
            sigma = None
            if self.sigma_members:
                sigma = self._sigma(pieces[len(self.y_sizes)].view(len(self.sigma_members), self.sigma_rank))
        return WeightPathResult(self, pieces[-1], frames, blocks, sigma)

    def _frames(self, ys: Sequence[torch.Tensor], tensors) -> list[torch.Tensor]:
        """Every family's frames (count, n, r), one compact-WY call each: from its gathered Y, or from its
        members' reflector tensors in place."""
        ys, frames = iter(ys), []
        for g, (f, reduced) in enumerate(zip(self.families, self.formed_reduced)):
            if reduced is None:
                frames.append(compact_wy(next(ys).view(f.count, f.n, f.r).to(self.work), constants=f.constants))
                continue
            blocks = [_flat(tensors[i][side]) for i, side in self.formed_blocks[g]]
            block = (torch.cat(blocks) if len(blocks) > 1 else blocks[0]).to(self.work)
            block = block.view(f.count, *free_block_shape(f.n, f.r, reduced))
            frames.append(householder_frame_free(block, f.n, reduced, f.constants))
        return frames

    def _operands(self, frames: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every step's cores (B, rows, cols): split from a direct family's frames, or gathered, in one call, from
        the other families'."""
        out: list = [None] * len(self.steps)
        for f, steps in enumerate(self.direct_steps):
            if steps:
                q = frames[f].to(self.dtype)
                chunks = q.split([len(self.steps[s].members) for s in steps]) if len(steps) > 1 else (q,)
                for s, chunk in zip(steps, chunks):
                    out[s] = self._direct_operand(self.steps[s], chunk)
        if self.gathered_steps:  # in the parameters' precision: one cast per family, half the bytes in bfloat16
            sources = [q.to(self.dtype) for q, direct in zip(frames, self.direct) if not direct]
            pieces = _Gather.apply(*self.core_gather, self.zero, self.operand_sizes, *sources)
            for s, piece in zip(self.gathered_steps, pieces):
                out[s] = piece.view(self._operand_shape(self.steps[s]))
        return out

    @staticmethod
    def _direct_operand(step: _Step, q: torch.Tensor) -> torch.Tensor:
        """A step's operand from its unpadded frames q (B, rows, cols): U (B, R_in, n·R_out), a view (a first U core:
        q itself); a first V core (B, R, n), one transposing copy (Vᵀ row-major: the GEMMs of W = (U·Σ)·Vᵀ and its
        gradients run 1.3–2× faster on a CPU than with a transposed view)."""
        if step.side == 1:
            return q.mT.contiguous()
        return q if step.parent is None else q.view(len(step.members), step.rank_in, -1)

    @staticmethod
    def _operand_shape(step: _Step) -> tuple[int, ...]:
        b = len(step.members)
        if step.parent is None:  # a first core is its own partial product: U (B, n, R), V (B, R, n)
            return (b, step.mode, step.rank_out) if step.side == 0 else (b, step.rank_out, step.mode)
        return (b, step.rank_in, -1) if step.side == 0 else (b, -1, step.rank_in)

    def _contract(self, operands: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every block's U (B, d_out, R) or Vᵀ (B, R, d_in): the forests' steps, one ``bmm`` each."""
        outputs: list = [None] * len(self.steps)
        blocks: list = [None] * len(self.blocks)
        for s, (step, op) in enumerate(zip(self.steps, operands)):
            b = len(step.members)
            if step.parent is None:
                m = op if step.sign is None else op * step.sign
            elif step.side == 0:  # M (B, P, R_in) · core (B, R_in, n·R_out) → (B, P·n, R_out)
                m = torch.bmm(outputs[step.parent][step.piece], op).view(b, -1, step.rank_out)
            else:  # core (B, R_out·n, R_in) · M (B, R_in, P) → (B, R_out, n·P)
                m = torch.bmm(op, outputs[step.parent][step.piece]).view(b, step.rank_out, -1)
            outputs[s] = m.split(step.split) if len(step.split) > 1 else (m,)
            if step.block is not None:
                blocks[step.block] = outputs[s][-1]
        return blocks

    def _sigma(self, s: torch.Tensor) -> torch.Tensor:
        """Σ's diagonals (L, R̂) of every member with a learned spectrum (zero-padded, normalised where asked)."""
        if self.sigma_scale is None:
            return s
        if isinstance(self.sigma_scale, float):
            return s / s.abs().amax(-1, keepdim=True).clamp_min(self.sigma_scale)
        eps, normalized = self.sigma_scale
        scale = torch.maximum(s.abs().amax(-1, keepdim=True), eps)
        return s / torch.where(normalized, scale, torch.ones_like(scale))


def _inverse(index: torch.Tensor, size: int) -> torch.Tensor:
    """For a gather ``out = src[index]``, src = (``size`` source entries, then constant slots, read many times and
    without a gradient): where each source entry went (its position in ``out``), or ``len(out)`` for entries never
    read. Every source entry must be read at most once."""
    inverse = torch.full((size,), index.numel(), dtype=torch.long)
    real = index < size
    targets = index[real]
    if targets.unique().numel() != targets.numel():
        raise AssertionError("weight path: a gather reads a source entry twice")
    inverse[targets] = torch.arange(index.numel())[real]
    return inverse


class _Gather(torch.autograd.Function):
    """pieces = [sources…, constants][index] split into ``sizes`` (1-D), where every source entry is read at most
    once: the sources are concatenated inside, and the backward is the inverse gather
    ∂sources = [∂pieces…, 0][inverse], split into the sources' shapes (a gather again, no scatter-add, and one
    concatenation however many pieces and sources)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(index: torch.Tensor, inverse: torch.Tensor, constants: torch.Tensor, sizes: tuple[int, ...],
                *sources: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = torch.cat([_flat(t) for t in sources] + [constants])
        return flat.index_select(0, index).split(sizes)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.sizes = inputs[3]
        ctx.shapes = [t.shape for t in inputs[4:]]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        (inverse,) = ctx.saved_tensors
        like = next((g for g in grads if g is not None), None)
        if like is None:
            return (None,) * (4 + len(ctx.shapes))
        flat = [like.new_zeros(n) if g is None else _flat(g) for g, n in zip(grads, ctx.sizes)]
        sources = torch.cat(flat + [like.new_zeros(1)]).index_select(0, inverse)
        sources = sources.split([math.prod(shape) for shape in ctx.shapes])
        return (None, None, None, None) + tuple(g if len(shape) == 1 else g.view(shape)
                                                for g, shape in zip(sources, ctx.shapes))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 1 else t.reshape(-1)


def _rows_of(t: torch.Tensor, rows: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """Rows of t: a (start, count) range as a view, or an index."""
    return t.narrow(0, *rows) if isinstance(rows, tuple) else t.index_select(0, rows)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _narrow(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The first ``size`` entries of ``t`` along ``dim`` (``t`` itself when it has no more)."""
    return t if t.shape[dim] == size else t.narrow(dim, 0, size)


# whether saved-tensor hooks (an activation checkpoint, offloading) are active; when they are, the lazily formed
# parts of the weight path bypass them (private in PyTorch: without it, they always do)
_HOOKS_SEEN = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def bypassing_saved_tensor_hooks():
    """A context in which the tensors autograd saves are kept by the graph itself, not by enclosing saved-tensor
    hooks (an activation checkpoint, offloading); a no-op when none are active (the check is PyTorch-private:
    without it, always the bypass)."""
    if _HOOKS_SEEN is None or _HOOKS_SEEN(False) is not None:
        return torch.autograd.graph.saved_tensors_hooks(_same, _same)
    return contextlib.nullcontext()


class WeightPathResult:
    """What :meth:`WeightPlan.run` computed, handed out per member (its index in the plan).

    Per-member factors and frames are views of the batched results; the weights of one shape group are formed
    (one ``bmm``) on the first request of any of its members. Everything computed after :meth:`WeightPlan.run`
    runs inside the layers' forwards: its saved tensors are kept by the autograd graph itself, not by an enclosing
    activation checkpoint (whose recomputation forms a layer's factors on their own, see the planner).
    """

    def __init__(self, plan: WeightPlan, one: torch.Tensor, frames: list[torch.Tensor], blocks: list[torch.Tensor],
                 sigma: torch.Tensor | None) -> None:
        self.plan = plan
        self._one, self._frames, self._blocks, self._sigma = one, frames, blocks, sigma
        self._memo: dict = {}

    def _lazy(self, key, compute):
        """``compute()`` once, its saved tensors kept by the graph, in the parameters' precision."""
        if key not in self._memo:
            with bypassing_saved_tensor_hooks(), without_autocast(self.plan.device):
                self._memo[key] = compute()
        return self._memo[key]

    def _unit(self, b: int) -> torch.Tensor:
        """The factor of a side without cores, 1, tied to the gathered tensors: (b, 1, 1)."""
        return self._one.view(1, 1, 1).expand(b, 1, 1)

    def _block_pieces(self, b: int, scaled: bool) -> tuple:
        """Block b split by weight shape; U·diag(σ) instead of U for ``scaled``."""
        block = self.plan.blocks[b]

        def compute():
            t = self._blocks[b]
            if scaled:
                sigma = _rows_of(self._sigma, block.sigma_rows)
                t = t * _narrow(sigma, 1, block.rank).unsqueeze(1)
            return t.split(block.shape_sizes) if len(block.shape_sizes) > 1 else (t,)

        return self._lazy(("block", b, scaled), compute)

    def _shape_side(self, g: int, side: int, scaled: bool = False) -> torch.Tensor:
        """U (B, d_out, R) (U·diag(σ) for ``scaled``) or Vᵀ (B, R, d_in) of shape group g, R its padded rank."""
        shape = self.plan.shapes[g]
        b = len(shape.members)
        where = shape.u if side == 0 else shape.v
        if where is None:
            unit = self._unit(b)
            if not scaled:
                return unit
            return self._lazy(("unit-sigma", g), lambda: unit * self._shape_sigma(g).unsqueeze(1))
        return _narrow(self._block_pieces(where[0], scaled)[where[1]], 2 if side == 0 else 1, shape.rank)

    def _shape_sigma(self, g: int) -> torch.Tensor:
        shape = self.plan.shapes[g]
        return self._lazy(("sigma", g), lambda: _narrow(_rows_of(self._sigma, shape.sigma_rows), 1, shape.rank))

    def _pieces(self, key, tensor_fn) -> tuple:
        return self._lazy(("unbind", key), lambda: tensor_fn().unbind(0))

    def factors(self, i: int) -> tuple:
        """(U (d_out, R), σ (R,) or None, Vᵀ (R, d_in)) of member i, R its own middle rank."""
        g, j = self.plan.member_shape[i]
        r = self.plan.params[i].r_mid
        u = self._pieces(("u", g), lambda: self._shape_side(g, 0))[j]
        vt = self._pieces(("v", g), lambda: self._shape_side(g, 1))[j]
        sigma = None
        if self._sigma is not None and self.plan.params[i].has_spectrum:
            sigma = _narrow(self._pieces("sigma", lambda: self._sigma)[self.plan.sigma_members.index(i)], 0, r)
        return _narrow(u, 1, r), sigma, _narrow(vt, 0, r)

    def frames(self, i: int) -> tuple[list, list]:
        """The frames of member i's U and V cores (outer end → Σ), unpadded."""
        p = self.plan.params[i]
        out: tuple[list, list] = ([], [])
        for side_index, side in enumerate((p.u_side, p.v_side)):
            for k, (rows, cols) in enumerate(side.frame_shapes):
                f, slot, _, _ = self.plan.frame_address[(i, side_index, k)]
                q = self._pieces(("frames", f), lambda f=f: self._frames[f])[slot]
                out[side_index].append(q[:rows, :cols])
        return out

    def weight(self, i: int) -> torch.Tensor:
        """Member i's weight tensor (its layer's own layout): (U·Σ)·Vᵀ, from its shape group's batched product or
        formed on its own (see :func:`torch_sttp.cost.batch_weight_products`)."""
        g, j = self.plan.member_shape[i]
        shape = self.plan.shapes[g]
        if shape.batched or len(shape.members) == 1:
            return self._lazy(("weights", g), lambda: self._shape_weights(g))[j]
        return self._lazy(("weight", i), lambda: self._layer_weight(g, j))

    def _shape_weights(self, g: int) -> tuple:
        shape = self.plan.shapes[g]
        us = self._shape_side(g, 0, scaled=shape.sigma_rows is not None)
        w = torch.bmm(us, self._shape_side(g, 1))
        if len(shape.members) == 1:  # a view, no unbind (whose backward would copy the gradient)
            w = w.view(shape.layout)
            return (w.transpose(0, 1) if shape.transposed else w,)
        w = w.view(len(shape.members), *shape.layout)
        return (w.transpose(1, 2) if shape.transposed else w).unbind(0)

    def _layer_weight(self, g: int, j: int) -> torch.Tensor:
        shape = self.plan.shapes[g]
        us = self._pieces(("us", g), lambda: self._shape_side(g, 0, scaled=shape.sigma_rows is not None))[j]
        w = torch.mm(us, self._pieces(("v", g), lambda: self._shape_side(g, 1))[j]).view(shape.layout)
        return w.transpose(0, 1) if shape.transposed else w
