"""The frame planner: computes the factors (U, σ, Vᵀ) of all converted layers of a model in batched calls, and
owns the cache that hands them to the layers during a forward pass.

One :class:`FramePlanner` serves the converted layers of one model (:func:`torch_sttp.convert` creates it). In a
forward pass of the root model it computes every layer's factors through the batched weight path
(:mod:`torch_sttp.weight_path`: the frames of all cores in a few padded compact-WY calls, the trains of all layers
as batched chains, the weights of one shape as one product) and caches the result for the layers' forwards. The
plan of that computation (its index maps) is built once per set of layers, dtype and device. A layer called outside
a forward pass of its root model computes its own factors.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from .cost import weight_path_costs
from .frames import without_autocast, without_autocast_on
from .options import BATCHING, check_option
from .parametrizations import SpectralParametrization, parametrization_tensors, spectral_parametrization
from .weight_path import WeightPlan, bypassing_saved_tensor_hooks, structure_key

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


class _Cache(NamedTuple):
    entries: dict     # id(layer) -> (result, the layer's index in it)
    key: tuple        # the state the entries were computed from (see FramePlanner._state_key)


class _OwnResult:
    """One layer's frames and factors computed on their own (``batching="none"``), in the interface of
    :class:`~torch_sttp.weight_path.WeightPathResult` (index 0)."""

    def __init__(self, p: SpectralParametrization, tensors: tuple) -> None:
        self.p = p
        self._frames = p.frames(*tensors[:2])
        self._factors = p.factors_from_frames(*self._frames, tensors[:2], tensors[2] if len(tensors) > 2 else None)
        self._weight = None

    def factors(self, _i: int) -> tuple:
        return self._factors

    def frames(self, _i: int) -> tuple[list, list]:
        return self._frames

    def weight(self, _i: int) -> torch.Tensor:
        if self._weight is None:
            self._weight = self.p.weight_from_factors(*self._factors)
        return self._weight


class FramePlanner:
    """Computes the factors (U, σ, Vᵀ) of every converted layer of a model, frames batched across layers.

    ``batching``: ``"shape"`` groups the frames of the model into a few families of similar shapes, one padded
    compact-WY call each (the family split weighs padding against per-call overhead, see
    :func:`torch_sttp.cost.weight_path_costs`); ``"padded"`` pads every frame of the model to one shape and makes a
    single call; ``"none"`` computes each layer on its own, as a layer called outside a forward pass does.

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
        self._plans: dict = {}  # structure key -> WeightPlan (constants of the batched weight path)
        self._forward_id = 0
        self._depth = 0
        self._computations = 0
        self._reuse = 0  # depth of reuse_in_inference() contexts

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None  # recorded graphs cannot be copied; recomputed on demand
        state["_plans"] = {}  # rebuilt on demand (for the copy's device and dtype)
        # a copy (pickle) made inside cached() or during a forward pass is not inside them: it starts idle
        state["_reuse"] = state["_depth"] = 0
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
        """Make ``module`` (a converted layer, or any module with ``planner_parametrization()`` /
        ``planner_tensors()``) a member, named ``name`` in errors; the next pass plans anew."""
        self.layers.append(module)
        self.names[id(module)] = name
        self._members_changed()

    def remove(self, module: nn.Module) -> None:
        """Stop computing ``module``'s factors (nothing if it is not a member); the next pass plans anew."""
        self.layers = [m for m in self.layers if m is not module]
        self.names.pop(id(module), None)
        self._members_changed()

    def invalidate(self, *_args, **_kwargs) -> None:
        """Drop the cached factors: the next request computes them anew."""
        self._cache = None

    def _members_changed(self) -> None:
        self._plans = {}
        self.invalidate()

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
            return self._standalone(module, "factors")
        result, i = self._entry(module)
        return Factors(*result.factors(i))

    def frames(self, module: nn.Module) -> tuple[list, list]:
        """The frames of ``module``'s U and V cores (lists, outer end → Σ), from the same cache as :meth:`factors`."""
        if self._own_graph():
            return self._standalone(module, "frames")
        result, i = self._entry(module)
        return result.frames(i)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """``module``'s weight W = U·Σ·Vᵀ in its layer's layout (before any later parametrization), in the
        parameters' precision. In a pass, the weights of all layers of one shape are formed together on the first
        request (one batched product)."""
        if self._own_graph():
            return self._standalone(module, "weight")
        result, i = self._entry(module)
        return result.weight(i)

    def _own_graph(self) -> bool:
        """Whether a layer computes its own factors: when traced (torch.compile) or transformed (torch.func), and
        when called outside a forward pass of the root model (unless inference reuse is on)."""
        if torch.compiler.is_compiling() or functorch_active():
            return True
        return not self._depth and not (self._reuse and not torch.is_grad_enabled())

    def _standalone(self, module: nn.Module, what: str):
        """The layer's own factors, frames or weight, in a graph of their own."""
        if self.check_finite and not torch.compiler.is_compiling():
            check_finite_parameters([module], self.names)
        p, tensors = member_parametrization(module), member_tensors(module)

        def compute():
            if what == "frames":
                return p.frames(*tensors[:2])
            factors = Factors(*p.factors(*tensors))
            if what == "factors":
                return factors
            with without_autocast(tensors[0].device):
                return p.weight_from_factors(*factors)

        if torch.compiler.is_compiling() or functorch_active():
            return compute()
        if torch._C._current_graph_task_id() != -1:
            # inside a backward pass: the recomputation of an activation-checkpointing segment. These factors
            # stand in for the ones computed before the segment; saving their tensors through the checkpoint's
            # hooks would add entries that the original forward never saved.
            with torch.autograd.graph.saved_tensors_hooks(_detached, _same):
                return compute()
        # a forward: factors computed inside a checkpointed segment (the layer called outside a pass of its root
        # model) keep their saved tensors in the graph, so that the segment saves what its recomputation saves
        with bypassing_saved_tensor_hooks():
            return compute()

    def _entry(self, module: nn.Module) -> tuple:
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
    def _compute(self) -> dict[int, tuple]:
        """Factors of every active layer: one batched weight path per dtype and device (or each layer on its own
        for ``batching="none"``)."""
        self._computations += 1
        layers = self._active_layers()
        if self.check_finite:
            check_finite_parameters(layers, self.names)
        entries = {}
        # factors in the parameters' precision, even under autocast
        with without_autocast_on(member_tensors(m)[0].device for m in layers):
            if self.batching == "none":
                for m in layers:
                    entries[id(m)] = (_OwnResult(member_parametrization(m), member_tensors(m)), 0)
                return entries
            groups: dict = {}
            for m in layers:
                t = member_tensors(m)[0]
                groups.setdefault((t.dtype, t.device), []).append(m)
            for (dtype, device), members in groups.items():
                result = self._plan(members, dtype, device).run([member_tensors(m) for m in members])
                entries.update({id(m): (result, i) for i, m in enumerate(members)})
        return entries

    def _plan(self, members: list[nn.Module], dtype: torch.dtype, device: torch.device) -> WeightPlan:
        """The :class:`~torch_sttp.weight_path.WeightPlan` of these members, built once for their structures."""
        params = [member_parametrization(m) for m in members]
        key = (dtype, device, tuple(structure_key(p) for p in params))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 8:  # plans of member sets no longer in use
                self._plans.clear()
            costs = weight_path_costs(torch.device(device))
            plan = self._plans[key] = WeightPlan(params, dtype, device, costs, one_family=self.batching == "padded")
        return plan


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
