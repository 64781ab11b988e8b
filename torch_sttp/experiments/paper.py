"""The paper's published compression ratios Z (eq. 11, Tables 1-3) as data, and their reproduction.

Every setting names a model of :mod:`torch_sttp.experiments.models`, the layers reparameterized, the spectrum and
the rank cap r; the published Z is kept as printed, so the tolerance is one unit of its last printed digit.

* Discriminator settings reparameterize every Conv2d and Linear layer of D.
* The generator setting (Table 3, G) keeps ``noise_to_conv`` dense.
* "-C" is the identity spectrum; "-L" / "-R" learn the spectrum (normalized, σ_max = 1); a learned spectrum adds r
  DOF per layer, whichever normalization is used.
* BatchNorm parameters and running statistics, biases and dense layers count in C.

Z is computed by arithmetic (:func:`torch_sttp.report.count_model_dof` on a model built on the ``meta`` device), so
the whole table takes well under a second. Run ``python -m torch_sttp.experiments.paper`` to print it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Sequence

import torch

from ..report import count_model_dof
from .models import build_model

__all__ = ["PaperSetting", "ReproRow", "PAPER_SETTINGS", "reproduce_compression", "format_rows"]


@dataclass(frozen=True)
class PaperSetting:
    """One published Z value.

    ``published`` is the number exactly as printed in the paper (a string, to keep its precision).
    ``model`` and ``model_kwargs`` go to :func:`torch_sttp.experiments.models.build_model`; ``include`` /
    ``exclude`` select the reparameterized layers as in :func:`torch_sttp.convert`.
    """

    setting: str
    table: str
    model: str
    method: str
    spectrum: str
    rank: int
    published: str
    model_kwargs: dict = field(default_factory=dict)
    include: tuple = ()
    exclude: tuple = ()

    @property
    def value(self) -> float:
        return float(self.published)

    @property
    def tolerance(self) -> float:
        """One unit of the last printed digit (0.1 for "93.1", 0.01 for "3.24")."""
        return float(Decimal(1).scaleb(Decimal(self.published).as_tuple().exponent))


@dataclass(frozen=True)
class ReproRow:
    setting: str
    method: str
    published: float
    ours: float
    within_tolerance: bool
    tolerance: float
    printed: str


def _pair(table, setting, model, spectrum, rank, svdp, sttp, **kw) -> list[PaperSetting]:
    return [PaperSetting(setting, table, model, method, spectrum, rank, value, **kw)
            for method, value in (("svdp", svdp), ("sttp", sttp))]


_G_EXCLUDE = ("noise_to_conv",)

#: Published Z values of Tables 1-3; the "-L/-R" settings learn a normalized spectrum.
PAPER_SETTINGS: tuple[PaperSetting, ...] = tuple(
    _pair("Table 1", "SNGAN-32 reduced D (ndf 32), identity spectrum, r=64", "sngan32-d-reduced",
          "identity", 64, "93.1", "87.7")
    + _pair("Table 1", "SNGAN-48 reduced D (ndf 64), identity spectrum, r=64", "sngan48-d-reduced",
            "identity", 64, "89.4", "74.1")
    + _pair("Table 2", "SNGAN-32 D, -C, r=64", "sngan32-d", "identity", 64, "51.7", "16.7")
    + _pair("Table 2", "SNGAN-32 D, -L/-R, r=64", "sngan32-d", "normalized", 64, "53.3", "18.3")
    + _pair("Table 2", "SNGAN-48 D, -C, r=64", "sngan48-d", "identity", 64, "14.2", "3.24")
    + _pair("Table 2", "SNGAN-48 D, -L/-R, r=64", "sngan48-d", "normalized", 64, "14.5", "3.51")
    + _pair("Table 3", "SNGAN-32 D, -R, r=32", "sngan32-d", "normalized", 32, "27.71", "6.44")
    + _pair("Table 3", "SNGAN-32 D, -R, r=64", "sngan32-d", "normalized", 64, "53.36", "18.33")
    + _pair("Table 3", "SNGAN-32 G (noise_to_conv dense), -R, r=32", "sngan32-g", "normalized", 32,
            "25.14", "14.61", exclude=_G_EXCLUDE)
    + _pair("Table 3", "SNGAN-32 G (noise_to_conv dense), -R, r=64", "sngan32-g", "normalized", 64,
            "37.13", "18.82", exclude=_G_EXCLUDE)
)


def compute_z(setting: PaperSetting) -> float:
    """Our Z for one setting (arithmetic on a model built on the ``meta`` device: no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(setting.model, **setting.model_kwargs)
    rep = count_model_dof(model, setting.method, setting.rank, setting.spectrum,
                          include=list(setting.include) or None, exclude=list(setting.exclude) or None)
    return rep.z


def reproduce_compression(settings: Sequence[PaperSetting] | None = None) -> list[ReproRow]:
    """(setting, method, published, ours, within_tolerance, …) for every published value (default: all)."""
    rows = []
    cache: dict[tuple, float] = {}
    for s in PAPER_SETTINGS if settings is None else settings:
        key = (s.model, tuple(sorted(s.model_kwargs.items())), s.method, s.spectrum, s.rank, s.include, s.exclude)
        if key not in cache:
            cache[key] = compute_z(s)
        ours = cache[key]
        # a small slack absorbs the binary representation of the printed decimal
        ok = abs(ours - s.value) <= s.tolerance * (1 + 1e-9)
        rows.append(ReproRow(f"{s.table}, {s.setting}", s.method, s.value, ours, ok, s.tolerance, s.published))
    return rows


def format_rows(rows: Sequence[ReproRow]) -> str:
    """A text table of :func:`reproduce_compression` rows."""
    head = ("setting", "method", "published", "ours", "ok")
    body = [(r.setting, r.method.upper(), r.printed, f"{r.ours:.4f}", "yes" if r.within_tolerance else "NO")
            for r in rows]
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(x)) for x in [head, *body]]
    lines.insert(1, "  ".join("-" * n for n in w))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_rows(reproduce_compression()))
