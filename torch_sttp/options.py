"""The option vocabulary of torch-sttp and its validation, in one place.

Every public entry point (``parametrize``, ``convert``, ``count_dof``, rank selection, the recipes and the CLI)
checks its options with these functions, so a bad value gets the same message wherever it is passed:

    >>> check_option("spectrum", "normalised")
    ValueError: unknown spectrum 'normalised'; choose one of ('identity', 'normalized', 'free')
"""
from __future__ import annotations

import operator
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
    "check_option",
    "check_method",
    "check_spectrum",
    "check_init",
    "check_rank",
    "check_ranks",
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


def check_option(name: str, value, choices=None):
    """``value`` if it is one of ``CHOICES[name]`` (or of ``choices``, a vocabulary of this module such as
    ``RANK_METHODS``, reported under ``name``), else a ValueError listing the choices."""
    choices = CHOICES[name] if choices is None else choices
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    return value


def check_method(method: str) -> str:
    return check_option("method", method)


def check_spectrum(spectrum: str) -> str:
    return check_option("spectrum", spectrum)


def check_init(init: str) -> str:
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
