"""Compression report of a model: per-layer DOF, ranks, modes, paths and FLOPs, and the paper's ratio Z (eq. 11).

    >>> torch_sttp.convert(model, "sttp", rank=64)
    >>> rep = torch_sttp.report(model, example_input=x)       # rep.z is Z in percent
    >>> print(rep)                                            # the per-layer table
    >>> torch_sttp.compression(model)                         # Z only
    >>> torch_sttp.count_model_dof(dense_model, "sttp", 64, "identity").z    # Z without converting anything

Z (paper eq. 11) compares the learned parameters with those of the dense model:

    Z = 100 · (Σ_ℓ DOF(W_ℓ) + C) / (Σ_ℓ numel(W_ℓ) + C),

summed over the reparameterized layers ℓ, where C counts every other number of the model's state dict: biases,
BatchNorm affine parameters and running statistics, the weights of layers left dense, other buffers.
``num_batches_tracked`` counters are not counted, nor are the SVDP/STTP tensors themselves (their free entries are the
DOF). A tensor that appears under several state-dict keys (tied weights) is counted once.

:func:`count_model_dof` applies the same arithmetic to a dense model, selecting layers exactly as
:func:`torch_sttp.convert` would, so a huge model (even one built on the ``meta`` device) is reported instantly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .adapters import active_adapter, adapter_info, adapter_names, adapter_state_dict, parameter_counts
from .layers import layout_shape, select_layers
from .modules import layer_state, original_class
from .options import check_method, check_ranks, check_spectrum
from .parametrizations import (fixed_row, is_parametrization_key, parametrization_tensors, spectral_parametrization,
                              tensor_key)
from .surgery import converted_layers, skipped_layers
from .tt import count_dof, split_modes, tt_ranks

__all__ = ["LayerRow", "SkippedRow", "AdapterRow", "CompressionReport", "report", "compression", "count_model_dof",
           "count_state_values"]


# ---------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class LayerRow:
    """One reparameterized (or, for :func:`count_model_dof`, to-be-reparameterized) layer.

    ``weight_shape`` is the layer's own weight shape; ``matrix_shape`` is (d_out, d_in) of W in the
    (d_out, C_in, *kernel) layout. ``out_modes``/``in_modes`` are the train's modes (for SVDP simply (d_out) and
    (d_in)); ``modes`` prints them as ``"out|in"``. ``tt_ranks`` are the bond ranks R_0…R_D and ``rank`` the
    effective middle rank min(r, d_out, d_in). ``ratio`` is dof / numel. ``path`` and ``flops_per_sample`` describe
    the forward path chosen on the layer's last call (None if it never ran).
    """

    name: str
    type: str
    method: str
    spectrum: str
    weight_shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    tt_ranks: tuple[int, ...]
    rank: int
    dof: int
    numel: int
    path: str | None = None
    flops_per_sample: float | None = None

    @property
    def modes(self) -> str:
        return _fmt_modes(self.out_modes) + "|" + _fmt_modes(self.in_modes)

    @property
    def ratio(self) -> float:
        return self.dof / self.numel if self.numel else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("weight_shape", "matrix_shape", "out_modes", "in_modes", "tt_ranks"):
            d[k] = list(d[k])
        d["modes"] = self.modes
        d["ratio"] = self.ratio
        return d


@dataclass(frozen=True)
class SkippedRow:
    """A supported layer that was left dense, with the reason (see :func:`torch_sttp.skipped_layers`)."""

    name: str
    type: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AdapterRow:
    """One named adapter of a model with adapters (:func:`torch_sttp.add_adapters`): its kind, frames (``method``;
    None for a rotation), rank, the number of layers it adapts, ``params`` (the entries of its tensors and of its
    trainable copies: what :func:`torch_sttp.save_adapters` writes) and whether it is the active adapter."""

    name: str
    kind: str
    method: str | None
    rank: int
    layers: int
    params: int
    active: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressionReport:
    """Result of :func:`report` / :func:`count_model_dof`.

    Attributes:
        layers: one :class:`LayerRow` per reparameterized layer, in module order.
        skipped: :class:`SkippedRow` of the layers left alone by :func:`torch_sttp.convert`.
        other: C, the number of all other state-dict values (biases, BatchNorm, dense layers, buffers).
        stored: values only the converted model stores, its embeddings' fixed padding rows: counted in Z's
            numerator, not in the dense model's denominator.
        source: ``"model"`` (read from a converted model) or ``"arithmetic"`` (:func:`count_model_dof`).
        adapters: :class:`AdapterRow` of each named adapter of a model with adapters.
        trainable_params, total_params: the model's parameter entries with ``requires_grad`` and all of them (each
            tensor once; :func:`torch_sttp.adapters.parameter_counts`); None for :func:`count_model_dof`.
    """

    layers: list[LayerRow] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    other: int = 0
    stored: int = 0
    source: str = "model"
    adapters: list[AdapterRow] = field(default_factory=list)
    trainable_params: int | None = None
    total_params: int | None = None

    @property
    def dof_total(self) -> int:
        return sum(row.dof for row in self.layers)

    @property
    def numel_total(self) -> int:
        return sum(row.numel for row in self.layers)

    @property
    def z(self) -> float:
        """Z in percent (paper eq. 11): (DOF + C + stored) / (numel + C); 100 for a model without reparameterized
        layers."""
        den = self.numel_total + self.other
        return 100.0 * (self.dof_total + self.other + self.stored) / den if den else 100.0

    @property
    def flops_per_sample(self) -> float | None:
        """Σ of the layers' forward FLOPs per sample on their last call (None if no layer has run)."""
        vals = [row.flops_per_sample for row in self.layers if row.flops_per_sample is not None]
        return float(sum(vals)) if vals else None

    def __float__(self) -> float:
        return self.z

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (``json.dumps(rep.to_dict())``)."""
        return {
            "z": self.z,
            "dof_total": self.dof_total,
            "numel_total": self.numel_total,
            "other": self.other,
            "stored": self.stored,
            "params_compressed": self.dof_total + self.other + self.stored,
            "params_dense": self.numel_total + self.other,
            "flops_per_sample": self.flops_per_sample,
            "source": self.source,
            "layers": [row.to_dict() for row in self.layers],
            "skipped": [row.to_dict() for row in self.skipped],
            "adapters": [row.to_dict() for row in self.adapters],
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
        }

    def summary(self) -> str:
        n = len(self.layers)
        stored = f" + padding rows {self.stored:,}" if self.stored else ""
        line = (f"Z = {self.z:.4g}%  (DOF {self.dof_total:,} + C {self.other:,}{stored}) / "
                f"(numel {self.numel_total:,} + C {self.other:,});  {n} layer{'s' * (n != 1)} reparameterized, "
                f"{len(self.skipped)} skipped")
        if self.flops_per_sample is not None:
            line += f";  {_fmt_flops(self.flops_per_sample)} FLOPs/sample in those layers"
        if self.total_params is not None:
            share = 100 * self.trainable_params / self.total_params if self.total_params else 0.0
            line += f";  parameters: {self.trainable_params:,} trainable of {self.total_params:,} ({share:.3g}%)"
        return line

    def __str__(self) -> str:
        header = ("layer", "type", "method", "spectrum", "weight", "matrix", "modes (out|in)", "TT ranks", "r",
                  "DOF", "numel", "DOF/numel", "path", "FLOPs/sample")
        right = {8, 9, 10, 11, 13}
        body = [
            (row.name or "<root>", row.type, row.method, row.spectrum, "x".join(map(str, row.weight_shape)),
             f"{row.matrix_shape[0]}x{row.matrix_shape[1]}", row.modes, ",".join(map(str, row.tt_ranks)),
             str(row.rank), f"{row.dof:,}", f"{row.numel:,}", f"{100 * row.ratio:.2f}%", row.path or "-",
             _fmt_flops(row.flops_per_sample) if row.flops_per_sample is not None else "-")
            for row in self.layers
        ]
        lines = []
        if body:
            widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

            def fmt(cells):
                return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

            lines += [fmt(header), "  ".join("-" * w for w in widths)]
            lines += [fmt(r) for r in body]
        elif not self.adapters:
            lines.append("no reparameterized layers" + (" (for a dense model, use torch_sttp.count_model_dof)"
                                                        if self.source == "model" else ""))
        if self.adapters:
            lines.append("adapters:")
            lines += [f"  {a.name}{' (active)' if a.active else ''}: {a.kind}"
                      f"{'' if a.method is None else ' ' + a.method} rank {a.rank} on {a.layers} layers, "
                      f"{a.params:,} parameters" for a in self.adapters]
        if self.skipped:
            lines.append("skipped:")
            w = max(len(s.name or "<root>") for s in self.skipped)
            lines += [f"  {(s.name or '<root>').ljust(w)}  {s.type}: {s.reason}" for s in self.skipped]
        lines.append(self.summary())
        return "\n".join(lines)


def _fmt_modes(modes: Sequence[int]) -> str:
    return "x".join(map(str, modes)) if modes else "-"


def _fmt_flops(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# -------------------------------------------------------------------------------------------------- helpers
def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def count_state_values(model: nn.Module, excluded=frozenset()) -> int:
    """Numbers in the state dict outside ``excluded`` keys and ``num_batches_tracked``; shared tensors once (eq. 11's
    count of a plain model, or its C with the reparameterized weights' keys excluded)."""
    seen: set[int] = set()
    total = 0
    for key, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor) or key.endswith("num_batches_tracked") or key in excluded:
            continue
        if id(value) in seen:
            continue
        if isinstance(value, nn.parameter.UninitializedTensorMixin):
            raise ValueError(f"{key!r} is not initialized yet (a lazy layer), so Z cannot count it; run one forward "
                             "pass of the model first")
        seen.add(id(value))
        total += value.numel()
    return total


def _run_example(model: nn.Module, example_input) -> None:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for m, training in flags:
            m.training = training


def _adapter_rows(model: nn.Module) -> list[AdapterRow]:
    active = active_adapter(model)
    rows = []
    for name in adapter_names(model):
        info = adapter_info(model, name)
        params = sum(t.numel() for t in adapter_state_dict(model, name).values())
        rows.append(AdapterRow(name, info.kind, None if info.kind == "rotation" else info.method, info.rank,
                               len(info.layers), params, name == active))
    return rows


# ---------------------------------------------------------------------------------------------------- API
def report(model: nn.Module, example_input=None, print_table: bool = False) -> CompressionReport:
    """Per-layer compression report of a converted model and its Z (paper eq. 11).

    Args:
        model: a model converted with :func:`torch_sttp.convert` (layers parametrized one by one with
            :func:`torch_sttp.parametrize` are reported too, without path information).
        example_input: optional input (a tensor, a tuple of positional arguments or a dict of keyword arguments);
            one forward pass is run under ``torch.no_grad()`` in eval mode so that each layer records its chosen
            path and FLOPs per sample. The training flags of all modules are restored afterwards.
        print_table: also print the table (``str(report)``); off by default — the report is returned, and
            ``print(report(model))`` prints it once.

    The report also counts the model's trainable and total parameters, and lists the adapters of a model with
    adapters (:class:`AdapterRow`).
    """
    if example_input is not None:
        _run_example(model, example_input)
    rows, excluded, stored = [], set(), 0
    keys = list(model.state_dict(keep_vars=True))
    for name, module in converted_layers(model):
        p = spectral_parametrization(module)
        prefix = _prefix(name)
        row = fixed_row(module)  # an embedding's padding row: stored by the converted model only
        stored += row.numel() if row is not None else 0
        excluded.update(tensor_key(prefix, i) for i in range(len(parametrization_tensors(module))))
        excluded.update(k for k in keys if is_parametrization_key(prefix, k)
                        and k.endswith("._extra_state"))  # the configuration (a uint8 JSON tensor), not numbers
        state = layer_state(module)
        rows.append(LayerRow(
            name=name,
            type=original_class(module).__name__,
            method=p.method,
            spectrum=p.spectrum,
            weight_shape=tuple(p.weight_shape),
            matrix_shape=(p.d_out, p.d_in),
            out_modes=tuple(p.out_modes),
            in_modes=tuple(p.in_modes),
            tt_ranks=tuple(p.ranks),
            rank=p.r_mid,
            dof=int(p.dof),
            numel=math.prod(p.weight_shape),
            path=getattr(state, "last_path", None),
            flops_per_sample=getattr(state, "last_flops_per_sample", None),
        ))
    skipped = [SkippedRow(*s) for s in skipped_layers(model)]
    other = count_state_values(model, excluded)  # first: it names an uninitialised lazy parameter
    counts = parameter_counts(model)
    rep = CompressionReport(rows, skipped, other - stored, stored=stored, source="model",
                            adapters=_adapter_rows(model), trainable_params=counts.trainable,
                            total_params=counts.total)
    if print_table:
        print(rep)
    return rep


def compression(model: nn.Module) -> float:
    """Z of a converted model in percent (paper eq. 11); see :func:`report`."""
    return report(model, print_table=False).z


def count_model_dof(
    dense_model: nn.Module,
    method: str = "sttp",
    rank: int | Mapping[str, int] = 64,
    spectrum: str = "normalized",
    include=None,
    exclude=None,
) -> CompressionReport:
    """Z of ``dense_model`` as if it were converted with these settings — arithmetic only, nothing is converted.

    Layers are selected as in :func:`torch_sttp.convert` (same ``include``/``exclude`` globs or types, ``rank`` a
    cap or a {layer name: rank} mapping, same skipped layers), and each one's DOF is :func:`torch_sttp.count_dof`
    of its weight in the (d_out, C_in, *kernel) layout (a ConvTranspose weight with its first two axes swapped).
    Returns a :class:`CompressionReport` (``.z`` is Z, ``float(rep)`` too); it equals :func:`report` of the
    converted model, apart from paths and FLOPs. Works on models built on the ``meta`` device.
    """
    check_method(method)
    check_spectrum(spectrum)
    if converted_layers(dense_model):
        raise ValueError("count_model_dof needs a dense model, this one is already converted; use "
                         "torch_sttp.report(model) for it")
    rank = check_ranks(rank)
    rank_map = rank if isinstance(rank, dict) else None
    selected, left_alone = select_layers(dense_model, include, exclude, rank_map)
    skipped = [SkippedRow(*row) for row in left_alone]
    rows, excluded = [], set()
    for name, module in selected:
        r = rank_map[name] if rank_map is not None else rank
        layout = layout_shape(module)
        out_modes, in_modes = split_modes(layout, method)
        ranks = tt_ranks(out_modes + in_modes, r)
        rows.append(LayerRow(
            name=name,
            type=type(module).__name__,
            method=method,
            spectrum=spectrum,
            weight_shape=tuple(int(s) for s in module.weight.shape),
            matrix_shape=(layout[0], math.prod(layout[1:])),
            out_modes=tuple(out_modes),
            in_modes=tuple(in_modes),
            tt_ranks=tuple(ranks),
            rank=ranks[len(out_modes)],
            dof=count_dof(layout, method, r, spectrum),
            numel=module.weight.numel(),
        ))
        excluded.add(_prefix(name) + "weight")
    # a converted embedding with padding_idx stores its fixed padding row (FixedRow): dim numbers
    fixed_rows = sum(m.embedding_dim for _, m in selected if isinstance(m, nn.Embedding) and m.padding_idx is not None)
    return CompressionReport(rows, skipped, count_state_values(dense_model, excluded), stored=fixed_rows,
                             source="arithmetic")
