"""Rank allocation under a DOF budget from measured per-layer costs and losses.

Each layer l comes with candidate ranks r_{l,1} < r_{l,2} < …, their DOF c_{l,i} and the loss L_{l,i} its
projection incurs at that rank (for example the whitened truncation loss of :mod:`torch_sttp.whitening`).
:func:`allocate_ranks` picks one candidate per layer so that Σ_l c_l ≤ budget and Σ_l L_l is small:

    >>> ranks = allocate_ranks({"fc1": RankCandidates(ranks, dof, loss), ...}, budget=150_000, floor=0.5)

Nothing here knows about models or metrics; :func:`uniform_ranks` gives the common-rank plan it is compared with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = ["RankCandidates", "uniform_ranks", "floor_ranks", "allocate_ranks", "role", "plan_loss", "plan_dof"]


@dataclass(frozen=True)
class RankCandidates:
    """Candidate ranks of one layer (ascending), the DOF each costs and the loss each leaves."""

    ranks: tuple[int, ...]
    dof: tuple[int, ...]
    loss: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "dof", tuple(int(c) for c in self.dof))
        object.__setattr__(self, "loss", tuple(float(x) for x in self.loss))
        if not self.ranks or not (len(self.ranks) == len(self.dof) == len(self.loss)):
            raise ValueError(f"RankCandidates: ranks, dof and loss must be non-empty and of one length, got "
                             f"{len(self.ranks)}, {len(self.dof)}, {len(self.loss)}")
        if any(b <= a for a, b in zip(self.ranks, self.ranks[1:])) or self.ranks[0] < 1:
            raise ValueError(f"RankCandidates: ranks must be positive and strictly ascending, got {self.ranks[:8]}…")
        if any(not math.isfinite(x) for x in self.loss):
            raise ValueError("RankCandidates: losses must be finite")

    def index(self, rank: int) -> int:
        """Position of ``rank`` among the candidates."""
        return self.ranks.index(int(rank))

    def at_most(self, cap: int) -> int:
        """Position of the largest candidate rank ≤ cap (the smallest candidate if none is)."""
        return max(0, int(np.searchsorted(self.ranks, cap, side="right")) - 1)


def plan_dof(candidates: Mapping[str, RankCandidates], ranks: Mapping[str, int]) -> int:
    """Σ_l DOF of the plan ``ranks``."""
    return sum(c.dof[c.index(ranks[n])] for n, c in candidates.items())


def plan_loss(candidates: Mapping[str, RankCandidates], ranks: Mapping[str, int]) -> float:
    """Σ_l loss of the plan ``ranks``."""
    return sum(c.loss[c.index(ranks[n])] for n, c in candidates.items())


def uniform_ranks(candidates: Mapping[str, RankCandidates], budget: int) -> dict[str, int]:
    """The common-rank plan: the largest cap c with Σ_l DOF(largest candidate ≤ c) ≤ budget (each layer at its
    smallest candidate if even c = 1 does not fit)."""
    caps = sorted({r for c in candidates.values() for r in c.ranks})
    best = caps[0]
    for cap in caps:
        if sum(c.dof[c.at_most(cap)] for c in candidates.values()) <= budget:
            best = cap
    return {n: c.ranks[c.at_most(best)] for n, c in candidates.items()}


def floor_ranks(candidates: Mapping[str, RankCandidates], budget: int, floor: float) -> dict[str, int]:
    """Each layer's floor: the smallest candidate ≥ ⌈floor · u_l⌉, u_l its rank in :func:`uniform_ranks`."""
    uniform = uniform_ranks(candidates, budget)
    out = {}
    for n, c in candidates.items():
        want = max(1, math.ceil(floor * uniform[n]))
        i = int(np.searchsorted(c.ranks, want, side="left"))
        out[n] = c.ranks[min(i, c.index(uniform[n]))]
    return out


def _choose(tables, lam: float) -> list[int]:
    """Per layer, the candidate (from its floor on) minimising loss + λ·dof; ties go to the cheaper one."""
    return [lo + int(np.argmin(loss[lo:] + lam * dof[lo:])) for lo, dof, loss in tables]


def _lagrangian(tables, budget: int) -> list[int]:
    """The cheapest multiplier λ whose per-layer choices fit the budget (bisection): a plan on the lower convex
    hull of the loss–DOF trade-off."""
    pick = _choose(tables, 0.0)
    if sum(t[1][i] for t, i in zip(tables, pick)) <= budget:
        return pick
    lo, hi = 0.0, 1.0
    while sum(t[1][i] for t, i in zip(tables, _choose(tables, hi))) > budget and hi < 1e300:
        lo, hi = hi, hi * 16.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(t[1][i] for t, i in zip(tables, _choose(tables, mid))) > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return _choose(tables, hi)


def _fill(tables, pick: list[int], remaining: int) -> list[int]:
    """Spend what is left: repeatedly the upgrade (one layer, to any larger candidate) with the largest loss
    decrease per DOF that still fits."""
    pick = list(pick)
    while True:
        best = None
        for k, (_, dof, loss) in enumerate(tables):
            i = pick[k]
            cost, gain = dof[i + 1:] - dof[i], loss[i] - loss[i + 1:]
            ok = (cost <= remaining) & (gain > 0)
            if not ok.any():
                continue
            rate = np.where(ok, gain / np.maximum(cost, 1), -np.inf)
            j = int(np.argmax(rate))
            if best is None or rate[j] > best[0]:
                best = (rate[j], k, i + 1 + j)
        if best is None:
            return pick
        _, k, j = best
        remaining -= int(tables[k][1][j] - tables[k][1][pick[k]])
        pick[k] = j


def _allocate(candidates: Mapping[str, RankCandidates], budget: int, floor: float) -> dict[str, int]:
    """:func:`allocate_ranks` for one group (no leftover fill across groups)."""
    names = list(candidates)
    floors = floor_ranks(candidates, budget, floor)
    if plan_dof(candidates, floors) > budget:
        floors = {n: c.ranks[0] for n, c in candidates.items()}
    tables = _tables(candidates, floors)
    pick = _lagrangian(tables, budget)
    pick = _fill(tables, pick, budget - int(sum(t[1][i] for t, i in zip(tables, pick))))
    plan = {n: candidates[n].ranks[i] for n, i in zip(names, pick)}
    uniform = uniform_ranks(candidates, budget)
    if plan_dof(candidates, uniform) <= budget and plan_loss(candidates, uniform) < plan_loss(candidates, plan):
        return uniform
    return plan


def _tables(candidates: Mapping[str, RankCandidates], floors: Mapping[str, int]):
    return [(c.index(floors[n]), np.asarray(c.dof, dtype=np.float64), np.asarray(c.loss, dtype=np.float64))
            for n, c in candidates.items()]


def role(name: str) -> str:
    """A layer's role in a stack of repeated blocks: its name with the numeric parts replaced by "*"
    ("encoder.layer.3.attention.self.query" → "encoder.layer.*.attention.self.query")."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def allocate_ranks(candidates: Mapping[str, RankCandidates], budget: int, floor: float = 0.5,
                   groups: Mapping[str, str] | None = None) -> dict[str, int]:
    """Ranks minimising Σ_l loss_l within Σ_l dof_l ≤ ``budget`` (an int DOF count), no layer below its floor.

    The floor: every layer keeps at least ⌈``floor`` · u_l⌉ (rounded up to a candidate), where u_l is its rank in the
    uniform plan of the same budget (:func:`uniform_ranks`); ``floor=0.5`` means no layer gets less than half the
    rank a common rank would give it, so a small layer with a steep loss curve (a classifier) is never cut to
    rank 1 because its neighbours are cheaper per unit of loss. ``floor=0`` removes it (rank ≥ the first candidate).

    ``groups`` ({layer: group label}, e.g. :func:`role` of each name) allocates within groups only: each group gets
    the DOF its layers have in the uniform plan plus its share (by that DOF) of what the uniform plan leaves
    unused, so losses are compared only between layers of one kind (the same projection at different depths)
    and never across kinds whose losses are in different units; what the groups leave unspent then goes to the
    best loss decrease per DOF overall.

    Method: a Lagrangian relaxation (each layer independently minimises loss + λ·dof above its floor, λ found by
    bisection as the smallest multiplier that fits), then the leftover budget goes to the best loss decrease per
    DOF; the result is compared with the uniform plan and the one with the smaller total loss is kept.
    Raises ValueError when even the smallest candidates exceed the budget.
    """
    if not candidates:
        raise ValueError("allocate_ranks: no layers")
    if not (0.0 <= floor <= 1.0):
        raise ValueError(f"allocate_ranks: floor must lie in [0, 1], got {floor!r}")
    minimum = sum(c.dof[0] for c in candidates.values())
    if minimum > budget:
        raise ValueError(f"allocate_ranks: a budget of {budget} DOF is below the minimum {minimum} (every layer at "
                         "its smallest candidate rank)")
    if groups is None:
        return _allocate(candidates, budget, floor)
    missing = [n for n in candidates if n not in groups]
    if missing:
        raise ValueError(f"allocate_ranks: groups do not name layers {missing[:4]}")
    uniform = uniform_ranks(candidates, budget)
    used = plan_dof(candidates, uniform)
    plan: dict[str, int] = {}
    for label in dict.fromkeys(groups[n] for n in candidates):
        members = {n: c for n, c in candidates.items() if groups[n] == label}
        share = plan_dof(members, uniform)
        plan.update(_allocate(members, share + int((budget - used) * share / max(used, 1)), floor))
    tables = _tables(candidates, plan)
    pick = _fill(tables, [t[0] for t in tables], budget - plan_dof(candidates, plan))
    return {n: c.ranks[i] for (n, c), i in zip(candidates.items(), pick)}
