"""The frame planner: computes the factors (U, σ, Vᵀ) of all converted layers of a model in batched calls, and
owns the cache that hands them to the layers during a forward pass.

One :class:`FramePlanner` serves the converted layers of one model (:func:`torch_sttp.convert` creates it). In a
forward pass of the root model it stacks the free reflector blocks of every core of one frame shape into one
compact-WY call (:func:`torch_sttp.frames.householder_frame_batches`), contracts the trains of all layers of one
structure as one batch, and caches the result for the layers' forwards. A layer called outside a forward pass of
its root model computes its own factors.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from .frames import householder_frame_batches, householder_frame_free, padded_householder_frames, without_autocast
from .options import BATCHING, check_option
from .parametrizations import SpectralParametrization, parametrization_tensors, spectral_parametrization

__all__ = ["BATCHING", "Factors", "FramePlanner", "NonFiniteParameterError", "check_finite_parameters",
           "functorch_active", "member_parametrization", "member_tensors"]


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, …) is running: its tensors are wrappers without storage
    or version counters, so the planner's batched cache is bypassed."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def member_parametrization(module: nn.Module) -> SpectralParametrization | None:
    """The parametrization whose factors the planner computes for ``module``: the one on its weight, or what the
    module's own ``planner_parametrization()`` returns (modules that hold an SVDP/STTP factor elsewhere, such as
    adapters); None when the module has none (any more)."""
    own = getattr(module, "planner_parametrization", None)
    return own() if own is not None else spectral_parametrization(module)


def member_tensors(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The tensors (U reflectors, V reflectors[, S]) of :func:`member_parametrization`."""
    own = getattr(module, "planner_tensors", None)
    return own() if own is not None else parametrization_tensors(module)


class NonFiniteParameterError(FloatingPointError):
    """A converted layer's parameters hold NaN or inf (raised only with ``check_finite=True``)."""


class Factors(NamedTuple):
    """W = U·diag(σ)·Vᵀ: U (d_out, R), σ (R,) or None (identity spectrum), Vᵀ (R, d_in)."""

    u: torch.Tensor
    sigma: torch.Tensor | None
    vt: torch.Tensor


class _Entry(NamedTuple):
    """One layer's cached result: its factors, and where its frames lie in its group's batched frames."""

    factors: Factors
    u_frames: list  # (B, rows, cols) per U core of the layer's group
    v_frames: list
    index: int      # the layer's entry in the group batch


class _CoreBatch(NamedTuple):
    """The free blocks of core ``core`` of one side of every layer of a group: one (B, rows, cols) frame batch."""

    group: int
    side: int        # 0: U, 1: V
    blocks: list
    rows: int
    reduced: bool


class _Cache(NamedTuple):
    entries: dict     # id(layer) -> _Entry
    key: tuple        # the state the entries were computed from (see FramePlanner._state_key)


class FramePlanner:
    """Computes the factors (U, σ, Vᵀ) of every converted layer of a model, frames batched across layers.

    ``batching``: ``"shape"`` stacks the reflectors of all frames of one shape into one call; ``"padded"``
    pads every frame of the model to one shape and makes a single call; ``"none"`` computes each frame alone.

    Results are reused only within one forward pass of the root model (a graph is never shared between two passes,
    and parameters changed between passes in any way — optimizer steps, ``.data``, ``copy_``, ``load_state_dict``,
    ``torch._foreach_*`` — are always seen); a converted layer called outside a forward pass of the root model
    computes its own factors. Reuse across inference passes is opt-in (:meth:`reuse_in_inference`, public as
    :func:`torch_sttp.cached`). Layers whose parametrization was removed (``remove_parametrizations``) are ignored.

    ``check_finite`` (off by default) tests all parameters for NaN/inf before the frames are computed — one fused
    test on the concatenated parameters, a single host synchronisation per computation — and raises
    :class:`NonFiniteParameterError` naming the first bad layer, instead of letting a NaN spread through a batched
    frame computation into every layer.
    """

    def __init__(self, batching: str = "shape", check_finite: bool = False) -> None:
        self.batching = check_option("batching", batching)
        self.check_finite = check_finite
        self.layers: list[nn.Module] = []
        self.names: dict[int, str] = {}
        self._cache: _Cache | None = None
        self._forward_id = 0
        self._depth = 0
        self._computations = 0
        self._reuse = 0  # depth of reuse_in_inference() contexts

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None  # recorded graphs cannot be copied; recomputed on demand
        return state

    def __deepcopy__(self, memo):
        import copy

        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        state = self.__getstate__()
        layers = state.pop("layers")
        names = state.pop("names")
        new.__dict__.update(copy.deepcopy(state, memo))
        new.layers = [copy.deepcopy(m, memo) for m in layers]
        new.names = {id(n): names[id(o)] for o, n in zip(layers, new.layers)}
        return new

    # ------------------------------------------------------------------------------------------------ members
    def add(self, module: nn.Module, name: str = "") -> None:
        self.layers.append(module)
        self.names[id(module)] = name
        self.invalidate()

    def remove(self, module: nn.Module) -> None:
        self.layers = [m for m in self.layers if m is not module]
        self.names.pop(id(module), None)
        self.invalidate()

    def invalidate(self, *_args, **_kwargs) -> None:
        """Drop the cached factors: the next request computes them anew."""
        self._cache = None

    @property
    def holds_reusable_factors(self) -> bool:
        """Whether the next inference lookup can reuse held factors (inside :meth:`reuse_in_inference`)."""
        return self._reuse > 0 and self._cache is not None and not torch.is_grad_enabled()

    @property
    def computations(self) -> int:
        """How many times the factors of all layers have been computed (a read-only counter)."""
        return self._computations

    def _active_layers(self) -> list[nn.Module]:
        return [m for m in self.layers if member_parametrization(m) is not None]

    # ----------------------------------------------------------------------------------------- forward passes
    def begin_forward(self, *_args, **_kwargs) -> None:
        """Root forward pre-hook: a new pass begins (recorded graphs are never reused across passes).

        When recording gradients, every layer's factors are computed here, before the model's own code runs, so
        that they lie outside any activation-checkpointing segment of the model.
        """
        self._forward_id += 1
        self._depth += 1
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not functorch_active() and self.layers:
            try:
                self._cache = _Cache(self._compute(), self._state_key())
            except BaseException:
                self._depth -= 1
                raise

    def end_forward(self, *_args, **_kwargs) -> None:
        """Root forward hook (also called on errors): the pass is over."""
        self._depth = max(self._depth - 1, 0)

    @contextlib.contextmanager
    def reuse_in_inference(self):
        """Within this context, factors computed without gradients are reused across forward passes until a
        parameter is replaced or changed in place through autograd-visible ops (its version counter). Changes
        through ``.data`` are invisible to it: leave the context (or call :meth:`invalidate`) after them. Outside
        this context factors are reused only within one forward pass of the root model."""
        self._reuse += 1
        self.invalidate()
        try:
            yield self
        finally:
            self._reuse -= 1
            self.invalidate()

    @contextlib.contextmanager
    def forward_pass(self):
        """Run the enclosed code as inside one forward pass of the root model: frames are computed afresh, in
        batches across layers, and every layer's factors come from that one computation."""
        self.invalidate()
        self.begin_forward()
        try:
            yield self
        finally:
            self.end_forward()

    # ------------------------------------------------------------------------------------------------ lookups
    def factors(self, module: nn.Module) -> Factors:
        """(U, σ, Vᵀ) of ``module``, computing (and caching) all layers' factors when needed."""
        if self._own_graph():
            return self._standalone(module, frames=False)
        return self._entry(module).factors

    def frames(self, module: nn.Module) -> tuple[list, list]:
        """The frames of ``module``'s U and V cores (lists, outer end → Σ), from the same cache as :meth:`factors`."""
        if self._own_graph():
            return self._standalone(module, frames=True)
        entry = self._entry(module)
        return [q[entry.index] for q in entry.u_frames], [q[entry.index] for q in entry.v_frames]

    def _own_graph(self) -> bool:
        """Whether a layer computes its own factors: when traced (torch.compile) or transformed (torch.func), and
        when called outside a forward pass of the root model (unless inference reuse is on)."""
        if torch.compiler.is_compiling() or functorch_active():
            return True
        return not self._depth and not (self._reuse and not torch.is_grad_enabled())

    def _standalone(self, module: nn.Module, frames: bool):
        """The layer's own factors (or frames), in a graph of their own."""
        if self.check_finite and not torch.compiler.is_compiling():
            check_finite_parameters([module], self.names)
        p, tensors = member_parametrization(module), member_tensors(module)
        compute = (lambda: p.frames(*tensors[:2])) if frames else (lambda: Factors(*p.factors(*tensors)))
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            # inside a backward pass: the recomputation of an activation-checkpointing segment. These factors
            # stand in for the ones computed before the segment; saving their tensors through the checkpoint's
            # hooks would add entries that the original forward never saved.
            with torch.autograd.graph.saved_tensors_hooks(_detached, _same):
                return compute()
        return compute()

    def _entry(self, module: nn.Module) -> _Entry:
        key = self._state_key()
        if self._cache is None or key != self._cache.key or id(module) not in self._cache.entries:
            self._cache = _Cache(self._compute(), key)
        return self._cache.entries[id(module)]

    def _state_key(self) -> tuple:
        """What the held factors must have been computed for: this forward pass, or — reusing in inference — the
        same parameter tensors (identity, storage, dtype, device) at the same versions."""
        grad = torch.is_grad_enabled()
        if grad or not self._reuse:
            return ("pass", self._forward_id, grad)
        tensors = [t for m in self._active_layers() for t in member_tensors(m)]
        versions = tuple(t._version for t in tensors)
        ids = tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in tensors)
        return ("reuse", versions, ids)

    # ------------------------------------------------------------------------------------------- computation
    def _compute(self) -> dict[int, _Entry]:
        """Factors of every active layer: frames batched by shape, trains of one structure contracted together."""
        self._computations += 1
        layers = self._active_layers()
        if self.check_finite:
            check_finite_parameters(layers, self.names)
        groups = self._groups(layers)
        batches = self._core_batches(groups)
        entries = {}
        with contextlib.ExitStack() as stack:  # factors in the parameters' precision, even under autocast
            for device in {member_tensors(m)[0].device for m in layers}:
                stack.enter_context(without_autocast(device))
            frames_by_side: dict[tuple[int, int], list] = {}
            for batch, q in zip(batches, self._frames(batches)):
                frames_by_side.setdefault((batch.group, batch.side), []).append(q)
            for g, members in enumerate(groups):
                u_frames, v_frames = frames_by_side.get((g, 0), []), frames_by_side.get((g, 1), [])
                for j, (m, f) in enumerate(zip(members, _group_factors(members, u_frames, v_frames))):
                    entries[id(m)] = _Entry(f, u_frames, v_frames, j)
        return entries

    def _groups(self, layers: list[nn.Module]) -> list[list[nn.Module]]:
        """Layers of one structure (and dtype, device) form a group whose trains are contracted as one batch."""
        groups: dict = {}
        for i, m in enumerate(layers):
            p = member_parametrization(m)
            t = member_tensors(m)[0]
            key = (i,) if self.batching != "shape" else (p.u_side, p.v_side, p.d_out, p.d_in, p.spectrum, p.eps,
                                                          t.dtype, t.device)
            groups.setdefault(key, []).append(m)
        return list(groups.values())

    @staticmethod
    def _core_batches(groups: list[list[nn.Module]]) -> list[_CoreBatch]:
        """One batch of free blocks per group, side and core."""
        batches = []
        for g, members in enumerate(groups):
            p = member_parametrization(members[0])
            for side_index, side in enumerate((p.u_side, p.v_side)):
                member_blocks = [side.split(member_tensors(m)[side_index]) for m in members]
                for k, (rows, _) in enumerate(side.frame_shapes):
                    batches.append(_CoreBatch(g, side_index, [b[k] for b in member_blocks], rows, side.reduced[k]))
        return batches

    def _frames(self, batches: list[_CoreBatch]) -> list[torch.Tensor]:
        """Frames (B, rows, cols) of every core batch, computed as ``batching`` says."""
        if self.batching == "none":
            return [torch.stack([householder_frame_free(b, c.rows, c.reduced) for b in c.blocks]) for c in batches]
        if self.batching == "padded":
            flat = [(b, c.reduced) for c in batches for b in c.blocks]
            layouts = [torch.cat([b.new_zeros(b.shape[-1], b.shape[-1]), b]) if red else b for b, red in flat]
            out = iter(padded_householder_frames(layouts, [red for _, red in flat]))
            return [torch.stack([next(out) for _ in c.blocks]) for c in batches]
        return householder_frame_batches([c.blocks for c in batches], [c.rows for c in batches],
                                         [c.reduced for c in batches])


def _group_factors(members: list[nn.Module], u_frames: list, v_frames: list) -> list[Factors]:
    """Factors of the layers of one group from the group's batched frames (one batched contraction per side)."""
    p: SpectralParametrization = member_parametrization(members[0])
    tensors = [member_tensors(m) for m in members]
    s = torch.stack([t[2] for t in tensors]) if len(tensors[0]) > 2 else None
    # reflectors are needed only for a side without cores (its constant factor is tied to the empty tensor)
    sides = [None if side.modes else torch.stack([t[i] for t in tensors])
             for i, side in enumerate((p.u_side, p.v_side))]
    u, sigma, vt = p.factors_from_frames(u_frames, v_frames, sides, s)
    sigmas = sigma.unbind(0) if sigma is not None else [None] * len(members)
    return [Factors(ui, si, vti) for ui, si, vti in zip(u.unbind(0), sigmas, vt.unbind(0))]


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


_TENSOR_NAMES = ("U reflectors (original0)", "V reflectors (original1)", "spectrum S (original2)")


def check_finite_parameters(layers: list[nn.Module], names: dict[int, str] | None = None) -> None:
    """Raise :class:`NonFiniteParameterError` naming the first layer whose parameters hold NaN or inf.

    One fused test on all parameters (a single host synchronisation); the per-layer search runs only on failure.
    """
    tensors = [t.detach().reshape(-1) for m in layers for t in member_tensors(m)]
    if not tensors or bool(torch.isfinite(torch.cat([t.to(torch.float32) for t in tensors])).all()):
        return
    for m in layers:
        for i, t in enumerate(member_tensors(m)):
            if not bool(torch.isfinite(t).all()):
                name = (names or {}).get(id(m), type(m).__name__)
                raise NonFiniteParameterError(
                    f"layer {name!r}: {_TENSOR_NAMES[i]} hold NaN or inf ({int((~torch.isfinite(t)).sum())} of "
                    f"{t.numel()} entries), e.g. after an exploding loss; lower the learning rate or clip gradients, "
                    "and restore the last good checkpoint")
