"""The option vocabulary of torch-sttp and its validation, in one place.

Every public entry point (``parametrize``, ``convert``, ``count_dof``, rank selection, the recipes and the CLI)
checks its options with these functions, so a bad value gets the same message wherever it is passed:

    >>> check_option("spectrum", "normalised")
    ValueError: unknown spectrum 'normalised'; choose one of ('identity', 'normalized', 'free')
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping

__all__ = [
    "METHODS",
    "SPECTRA",
    "FRAME_INITS",
    "INITS",
    "PATHS",
    "BATCHING",
    "CHOICES",
    "RANK_METHODS",
    "OBJECTIVES",
    "STRATEGIES",
    "PENALTIES",
    "ADAPTER_KINDS",
    "ROTATION_PATHS",
    "check_option",
    "check_method",
    "check_spectrum",
    "check_init",
    "check_rank",
    "check_ranks",
    "check_plan_method",
    "check_plan_spectrum",
]

METHODS = ("svdp", "sttp")
SPECTRA = ("identity", "normalized", "free")
FRAME_INITS = ("identity", "random", "noisy_identity")
INITS = FRAME_INITS + ("pretrained",)
PATHS = ("auto", "dense", "lowrank", "tt")
BATCHING = ("shape", "padded", "none")

CHOICES = {"method": METHODS, "spectrum": SPECTRA, "init": INITS, "path": PATHS, "batching": BATCHING}

# the tools' vocabulary: rank selection (``"svd"`` plans two dense factors) and the spectral penalties
RANK_METHODS = ("svd",) + METHODS
OBJECTIVES = ("svd", "tt")
STRATEGIES = ("auto", "greedy", "uniform")
PENALTIES = ("d_optimal", "divergence")
CHOICES.update({"objective": OBJECTIVES, "strategy": STRATEGIES, "penalty kind": PENALTIES})

# the adapters' vocabulary: the update kinds and how a rotation adapter is applied
ADAPTER_KINDS = ("principal", "delta", "rotation")
ROTATION_PATHS = ("auto", "input", "lowrank", "weight")
CHOICES.update({"adapter kind": ADAPTER_KINDS, "rotation path": ROTATION_PATHS})


def check_option(name: str, value, choices=None):
    """``value`` if it is one of ``CHOICES[name]`` (or of ``choices``, a vocabulary of this module such as
    ``RANK_METHODS``, reported under ``name``), else a ValueError listing the choices."""
    choices = CHOICES[name] if choices is None else choices
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    return value


def check_method(method: str) -> str:
    """``method`` if it is one of ``METHODS`` ("svdp", "sttp"), else a ValueError listing them."""
    return check_option("method", method)


def check_spectrum(spectrum: str) -> str:
    """``spectrum`` if it is one of ``SPECTRA``, else a ValueError listing them."""
    return check_option("spectrum", spectrum)


def check_init(init: str) -> str:
    """``init`` if it is one of ``INITS`` (frame inits and "pretrained"), else a ValueError listing them."""
    return check_option("init", init)


def check_rank(rank) -> int:
    """A rank hyperparameter as a Python int: any positive integer scalar (``int``, ``numpy.int64``, a 0-d integer
    tensor — whatever ``operator.index`` accepts); floats are refused, 4.0 included, as are booleans."""
    try:
        value = operator.index(rank) if not isinstance(rank, bool) else None
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}; pass e.g. rank=64")
    return value


def check_plan_method(rank, method: str) -> None:
    """A rank mapping that records the method it was planned for (a :class:`~torch_sttp.ranks.RankPlan`'s
    ``method``: its ranks fit the budget in that method's DOF) is used with that method only; a plan for ``"svd"``
    (two dense factors) projects with ``"svdp"`` (same weights). Anything else is a ValueError."""
    planned = getattr(rank, "method", None) if isinstance(rank, Mapping) else None
    if planned is None or planned == method or (planned == "svd" and method == "svdp"):
        return
    use = "svdp" if planned == "svd" else planned
    raise ValueError(f"the plan was made for method={planned!r} (its ranks fit the budget in that method's DOF); "
                     f"use it with method={use!r}, or plan again with select_ranks(..., method={method!r})")


def check_plan_spectrum(rank, spectrum: str) -> None:
    """Warn when a rank mapping that records the spectrum it was planned for (a
    :class:`~torch_sttp.ranks.RankPlan`'s ``spectrum``) is used with one that counts other DOF ("identity" against
    "free"/"normalized"): the converted model then exceeds the budget (a plan for ``"identity"`` has no S to count)
    or leaves part of it unused."""
    planned = getattr(rank, "spectrum", None) if isinstance(rank, Mapping) else None
    if planned in (None, spectrum) or getattr(rank, "method", None) == "svd" or "identity" not in (planned, spectrum):
        return  # "free" and "normalized" count the same DOF
    effect = ("exceeds the budget by the S of every layer" if planned == "identity" else
              "leaves the S of every layer unspent")
    warnings.warn(f"the plan counted DOF for spectrum={planned!r}; converting with spectrum={spectrum!r} {effect} "
                  f"(plan with select_ranks(..., spectrum={spectrum!r}) to fit the budget)", stacklevel=4)


def check_ranks(rank):
    """``rank`` as :func:`convert` takes it: one cap (an int, see :func:`check_rank`) or a mapping from layer name
    to rank, each checked (the error names the layer)."""
    if not isinstance(rank, Mapping):
        return check_rank(rank)
    out = {}
    for name, r in rank.items():
        try:
            out[name] = check_rank(r)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    return out
