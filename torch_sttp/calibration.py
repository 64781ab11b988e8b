"""Calibration statistics: what each layer of a model sees on real data, for data-aware compression.

    >>> stats = torch_sttp.calibrate(model, batches, include=nn.Linear)    # eval mode, no gradients
    >>> stats.moment("encoder.layer.0.attention.self.query")               # E[x xᵀ] (d_in × d_in, float64)
    >>> stats.shared("encoder.layer.0.attention.self.query")               # [query, key, value]: one statistic
    >>> stats.save("stats.safetensors"); Calibration.load("stats.safetensors")

A layer's weight is the matrix W (d_out × d_in) of :func:`torch_sttp.layers.weight_matrix`, and its output for one
input column x (one token, one output position of a convolution) is W·x. The statistic of a layer is the sum of x·xᵀ
over every such column in the calibration data together with the number of columns N, so that E[x xᵀ] = Σ x xᵀ / N
and, for any Ŵ, ‖(W − Ŵ)·X‖²_F / N = tr((W − Ŵ)·E[x xᵀ]·(W − Ŵ)ᵀ) (the metric of :mod:`torch_sttp.whitening`):

* **Linear**: x is the input vector; for an input (B, T, …, d_in) whose first two dims match the batch's
  ``attention_mask`` (B, T), positions where the mask is 0 (padding) are left out.
* **Conv1d/2d/3d**: x is an unfolded input patch (C_in/groups · ∏kernel, in the weight's (C_in, *kernel) order) at
  each output position, with the layer's own padding (and padding mode), stride and dilation; with groups > 1 every
  group's patches are pooled into one statistic (exact for groups = 1; for groups > 1 the metric asks each row to
  fit every group's inputs).
* **ConvTranspose1d/2d/3d**: its *adjoint view*. A transposed convolution is the ordinary convolution of the input
  with zeros inserted between samples (stride − 1 of them), padded by dilation·(k − 1) − padding on each side
  (plus output_padding at the end), with the kernel flipped. Unfolding that input and flipping the kernel index back
  gives, for every output position q, a patch z_q (C_in · ∏kernel) with y_q = W·z_q + b exactly, W the layout
  matrix (C_out/groups × C_in·∏kernel). The statistic is Σ_q z_q z_qᵀ with the blocks between different groups set
  to zero (group g's outputs read only group g's inputs), so ‖(W − Ŵ)·Z‖²_F is exactly the error of the layer's
  output, as for a convolution.
* **Embedding**: token counts (num_embeddings,): the input is a one-hot vector e_t and the output Wᵀe_t, so
  E[e eᵀ] is diagonal with the token frequencies; masked positions are left out as for Linear.

Layers fed by the very same tensor in a forward pass (query, key and value of an attention block) share one
statistic: it is computed and stored once, under the name of the first of them, and referenced by the others.
Sums are accumulated in float64 on the inputs' device.
"""
from __future__ import annotations

import contextlib
import json
import math
import weakref
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import open_safetensors
from .layers import KINDS, layer_kind, select_layers
from .progress import progress_iter
from .whitening import DAMPING, REFINE_ITERS, WhitenedProjector

__all__ = ["KINDS", "Calibration", "calibrate", "layer_kind", "patches", "transposed_patches", "save_calibration",
           "load_calibration", "forward_groups", "sequential_statistics", "layer_sensitivity", "run_batch",
           "pack_symmetric", "unpack_symmetric", "reestimate_batchnorm", "batchnorm_scales", "PairedStatistics",
           "paired_statistics"]

FORMAT_VERSION = 1
META_KEY = "torch_sttp_calibration"
COLUMN_SUM_PREFIX = "column_sum:"  # the file's name of a statistic's Σ x (calibrate(..., means=True))
CHUNK_ROWS = 1 << 13  # columns x per float64 update (bounds the temporary copies)


class Calibration:
    """Per-layer input statistics (see the module docstring): float64 sums Σ x xᵀ (d_in × d_in, kept as their upper
    triangles), or token counts (num_embeddings,) for an Embedding, with their sample counts N; layers that share
    an input share one entry. ``sums`` holds full matrices, or with ``packed`` their :func:`pack_symmetric` form.

    ``names`` lists the layers in the order they first ran in the forward pass. ``column_sums`` (optional, from
    ``calibrate(..., means=True)``): Σ x (d_in,) per matrix statistic, for :meth:`mean` and :meth:`covariance`.
    """

    def __init__(self, layers: Mapping[str, tuple[str, str]], sums: Mapping[str, torch.Tensor],
                 samples: Mapping[str, int], packed: bool = False,
                 column_sums: Mapping[str, torch.Tensor] | None = None):
        self._layers = {n: (str(k), str(kind)) for n, (k, kind) in layers.items()}
        self._sums = {k: t if packed or t.dim() == 1 else pack_symmetric(t) for k, t in sums.items()}
        self._samples = {k: int(v) for k, v in samples.items()}
        self._column_sums = dict(column_sums or {})
        for key in self._column_sums:
            if key not in self._sums:
                raise ValueError(f"calibration: a column sum refers to a missing statistic {key!r}")
        for name, (key, kind) in self._layers.items():
            if key not in self._sums or key not in self._samples:
                raise ValueError(f"calibration: layer {name!r} refers to a missing statistic {key!r}")
            if kind not in KINDS:
                raise ValueError(f"calibration: layer {name!r} has an unknown kind {kind!r}")
        for key in self._sums:
            self._check_entry(key)

    def _check_entry(self, key: str) -> None:
        """A stored statistic is a vector (packed Σ x xᵀ of triangular length, or token counts), finite, with N ≥ 0."""
        names = [n for n, (k, _) in self._layers.items() if k == key] or [key]
        kind = self._layers[names[0]][1] if names[0] in self._layers else None
        stored, where = self._sums[key], f"calibration: layer {names[0]!r}"
        n = stored.numel()
        if stored.dim() != 1 or (kind != "embedding" and math.isqrt(8 * n + 1) ** 2 != 8 * n + 1):
            raise ValueError(f"{where}: its stored statistic of shape {tuple(stored.shape)} is not a packed "
                             "symmetric matrix (d(d + 1)/2 values) or a vector of token counts; calibrate again")
        if self._samples.get(key, 0) < 0:
            raise ValueError(f"{where}: a negative sample count {self._samples[key]}; calibrate again")
        for t in (stored, self._column_sums.get(key)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: its statistic has NaN or Inf entries (non-finite inputs in the "
                                 "calibration batches, or a damaged file); calibrate again on finite data")

    @property
    def names(self) -> list[str]:
        """Calibrated layers, in the order they first ran."""
        return list(self._layers)

    def __contains__(self, name: str) -> bool:
        return name in self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def _entry(self, name: str) -> tuple[str, str]:
        if name not in self._layers:
            raise KeyError(f"layer {name!r} has no calibration statistic (calibrated layers: "
                           f"{self.names[:4]}{'…' if len(self) > 4 else ''}); calibrate it, or leave it out")
        return self._layers[name]

    def key(self, name: str) -> str:
        """Name under which ``name``'s statistic is stored (the first layer that computed it)."""
        return self._entry(name)[0]

    def kind(self, name: str) -> str:
        """One of :data:`KINDS`."""
        return self._entry(name)[1]

    def shared(self, name: str) -> list[str]:
        """The layers (``name`` included, forward order) that share ``name``'s statistic."""
        key = self.key(name)
        return [n for n, (k, _) in self._layers.items() if k == key]

    def groups(self) -> list[list[str]]:
        """Layers grouped by shared statistic, groups in forward order."""
        seen: dict[str, list[str]] = {}
        for n, (k, _) in self._layers.items():
            seen.setdefault(k, []).append(n)
        return list(seen.values())

    def samples(self, name: str) -> int:
        """N, the number of input columns (tokens, output positions) summed."""
        return self._samples[self.key(name)]

    def total(self, name: str) -> torch.Tensor:
        """The raw float64 sum, a fresh tensor: Σ x xᵀ (d_in × d_in), or the token counts (num_embeddings,) of an
        Embedding. A matrix is stored as its upper triangle (:func:`pack_symmetric`): half the memory, exact."""
        stored = self._sums[self.key(name)]
        return stored.clone() if self.kind(name) == "embedding" else unpack_symmetric(stored)

    def moment(self, name: str) -> torch.Tensor:
        """E[x xᵀ] = Σ x xᵀ / N (d_in × d_in); for an Embedding its diagonal, the token frequencies."""
        n = self.samples(name)
        if n == 0:
            raise ValueError(f"layer {name!r} saw no input during calibration")
        total = self.total(name)
        return total.div_(n)

    @property
    def has_means(self) -> bool:
        """Whether the column sums Σ x were collected (``calibrate(..., means=True)``)."""
        return bool(self._column_sums)

    def mean(self, name: str) -> torch.Tensor:
        """E[x] = Σ x / N (d_in,), float64; needs ``calibrate(..., means=True)`` (not for an Embedding)."""
        key = self.key(name)
        if key not in self._column_sums:
            raise ValueError(f"layer {name!r}: no input mean in these statistics; calibrate with means=True "
                             "(Embedding layers have none)")
        n = self.samples(name)
        if n == 0:
            raise ValueError(f"layer {name!r} saw no input during calibration")
        return self._column_sums[key] / n

    def covariance(self, name: str) -> torch.Tensor:
        """E[(x − μ)(x − μ)ᵀ] = E[x xᵀ] − μ·μᵀ with μ = E[x] (d_in × d_in, float64); see :meth:`mean`."""
        mu = self.mean(name)
        return self.moment(name).sub_(torch.outer(mu, mu))

    def release(self, names) -> None:
        """Remove layers ``names`` from these statistics and free each stored statistic (with its column sums) that
        no remaining layer refers to: for a pipeline that has used them and wants the memory back. Raises KeyError
        (naming the layer) before changing anything if a name is not calibrated."""
        names = list(names)
        for name in names:
            self._entry(name)
        for name in names:
            del self._layers[name]
        kept = {key for key, _ in self._layers.values()}
        for key in [k for k in self._sums if k not in kept]:
            del self._sums[key], self._samples[key]
            self._column_sums.pop(key, None)

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics (each shared one counted once; column sums included)."""
        return sum(t.numel() * t.element_size() for t in [*self._sums.values(), *self._column_sums.values()])

    def projector(self, damping: float = DAMPING, refine_iters: int = REFINE_ITERS) -> WhitenedProjector:
        """The data-aware projection these statistics define (:class:`~torch_sttp.whitening.WhitenedProjector`),
        with its damping λ and STTP refinement iterations; pass it as ``convert(..., calibration=...)``."""
        return WhitenedProjector(self, damping, refine_iters)

    def project_weight(self, name: str, module: nn.Module, method: str, rank: int, spectrum: str) -> torch.Tensor:
        """``self.projector().project_weight(...)``: the whitened Ŵ of layer ``name`` (``module.weight``'s shape,
        float64), so that ``convert(model, ..., init="pretrained", calibration=stats)`` works with the defaults."""
        return self.projector().project_weight(name, module, method, rank, spectrum)

    def save(self, path) -> None:
        """Write the statistics to a safetensors file (tensors as they are; layers and counts in the metadata)."""
        from safetensors.torch import save_file

        meta = {"version": FORMAT_VERSION, "layers": {n: list(v) for n, v in self._layers.items()},
                "samples": self._samples, "column_sums": sorted(self._column_sums)}
        tensors = {k: t.detach().cpu().contiguous() for k, t in self._sums.items()}
        tensors.update({COLUMN_SUM_PREFIX + k: t.detach().cpu().contiguous() for k, t in self._column_sums.items()})
        save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a file written by :meth:`save` (bit-exact)."""
        with open_safetensors(path) as f:  # a damaged file: CheckpointError
            meta = (f.metadata() or {}).get(META_KEY)
            if meta is None:
                raise ValueError(f"{path}: not a torch-sttp calibration file (no {META_KEY!r} metadata); "
                                 "write one with torch_sttp.calibrate(...).save(path)")
            info = json.loads(meta)
            if info.get("version", 0) > FORMAT_VERSION:
                raise ValueError(f"{path}: calibration format {info.get('version')} is newer than this torch-sttp "
                                 f"reads ({FORMAT_VERSION}); upgrade torch-sttp")
            column_keys = set(info.get("column_sums", []))
            stored = {k: f.get_tensor(k) for k in f.keys()}
        columns = {k: stored.pop(COLUMN_SUM_PREFIX + k) for k in column_keys}
        try:
            return cls({n: tuple(v) for n, v in info["layers"].items()}, stored, info["samples"],
                       column_sums=columns)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return f"Calibration(layers={len(self)}, statistics={len(self._sums)}, MiB={self.nbytes / 2**20:.1f})"


def save_calibration(calibration: Calibration, path) -> None:
    """``calibration.save(path)``."""
    calibration.save(path)


def load_calibration(path) -> Calibration:
    """``Calibration.load(path)``."""
    return Calibration.load(path)


def _upper_mask(d: int, device=None) -> torch.Tensor:
    """The (d × d) boolean mask of the upper triangle, diagonal included (the packing order is its row-major order)."""
    return torch.ones(d, d, dtype=torch.bool, device=device).triu()


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (row by row) of a symmetric (d × d) matrix: d(d + 1)/2 values."""
    return matrix[_upper_mask(matrix.shape[0], matrix.device)]


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix of :func:`pack_symmetric`'s output (no temporaries beyond the d × d boolean mask)."""
    d = int((math.isqrt(8 * packed.numel() + 1) - 1) // 2)
    if d * (d + 1) // 2 != packed.numel():
        raise ValueError(f"a packed symmetric statistic needs a triangular number d(d + 1)/2 of values, got "
                         f"{packed.numel()}")
    upper = _upper_mask(d, packed.device)
    out = packed.new_zeros(d, d)
    out.masked_scatter_(upper, packed)
    out.mT.masked_scatter_(upper, packed)  # the lower triangle, column by column
    return out


# ------------------------------------------------------------------------------------------------- patches
def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _unfold(x: torch.Tensor, kernel, dilation, stride) -> torch.Tensor:
    """(B, C, *L) → (B, *out, C, *kernel): every window of an already padded input."""
    n = len(kernel)
    for d in range(n):
        span = dilation[d] * (kernel[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])[..., ::dilation[d]]
    # now (B, C, *out, *kernel)
    return x.movedim(1, 1 + n)


def _conv_padding(module: nn.Module, n: int) -> list[int]:
    """F.pad amounts (last spatial dim first) of a convolution's padding, "same" and "valid" included."""
    kernel, dilation = _tuple(module.kernel_size, n), _tuple(module.dilation, n)
    if module.padding == "valid":
        pads = [(0, 0)] * n
    elif module.padding == "same":
        total = [dilation[d] * (kernel[d] - 1) for d in range(n)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in _tuple(module.padding, n)]
    return [p for pair in reversed(pads) for p in pair]


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a Conv1d/2d/3d: (B·∏out·groups, C_in/groups·∏kernel), so that the layer's output at each
    position and group is W_g·patch (+ bias), columns in the weight's (C_in/groups, *kernel) order."""
    n = x.dim() - 2
    kernel, dilation, stride = _tuple(module.kernel_size, n), _tuple(module.dilation, n), _tuple(module.stride, n)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, _conv_padding(module, n), mode=mode)
    win = _unfold(x, kernel, dilation, stride)  # (B, *out, C, *kernel)
    g = module.groups
    win = win.reshape(*win.shape[:1 + n], g, -1)
    return win.reshape(-1, win.shape[-1])


def transposed_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Adjoint-view patches z_q of a ConvTranspose1d/2d/3d: (B·∏out, C_in·∏kernel) with y_q = W·z_q (+ bias) for
    groups = 1 (W the (C_out, C_in·∏kernel) layout matrix); see the module docstring. For groups > 1 the rows hold
    all groups' channels; :func:`calibrate` zeroes the blocks between groups."""
    n = x.dim() - 2
    kernel, dilation = _tuple(module.kernel_size, n), _tuple(module.dilation, n)
    stride, padding = _tuple(module.stride, n), _tuple(module.padding, n)
    out_pad = _tuple(module.output_padding, n)
    b, c, *size = x.shape
    stuffed = x.new_zeros(b, c, *[(s - 1) * st + 1 for s, st in zip(size, stride)])
    stuffed[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in stride)] = x
    pads = []
    for d in reversed(range(n)):
        edge = dilation[d] * (kernel[d] - 1) - padding[d]
        pads += [edge, edge + out_pad[d]]
    win = _unfold(F.pad(stuffed, pads), kernel, dilation, (1,) * n)  # (B, *out, C, *kernel)
    win = win.flip(list(range(win.dim() - n, win.dim())))
    return win.reshape(-1, c * math.prod(kernel))


# ----------------------------------------------------------------------------------------------- collection
class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every selected layer has seen its input."""


def _signature(module: nn.Module, kind: str) -> tuple:
    """What makes two layers fed by the same tensor have the same statistic."""
    if kind == "linear":
        return (kind, module.in_features)
    if kind == "embedding":
        return (kind, module.num_embeddings)
    return (kind, type(module).__name__, tuple(module.weight.shape), module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, getattr(module, "padding_mode", None),
            getattr(module, "output_padding", None))


def _unmasked(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The positions of a batch-first (B, T, …) ``x`` that the (B, T) ``mask`` keeps, (N, …); ``x`` itself when
    its leading axes are not (B, T). A sequence-first (T, B, …) ``x`` is refused when the mask leaves anything out
    (B ≠ T; with B = T the layouts look the same, so the mask's convention is batch-first)."""
    if mask is None:
        return x
    lead, want = tuple(x.shape[:2]), tuple(mask.shape)
    if lead == want:
        return x[mask.to(device=x.device, dtype=torch.bool)]
    if lead == want[::-1] and not bool(mask.all()):
        raise ValueError(f"layer {name!r}: its tensor is sequence-first {tuple(x.shape)}, but the batch's "
                         f"attention_mask {want} applies to batch-first (B, T, …) tensors only; use a batch-first "
                         "model, or leave attention_mask out of the batches")
    return x


def _columns(name: str, module: nn.Module, kind: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input columns x of one call: (N, d_in) floats, or (N,) token indices for an Embedding. A (B, T)
    ``mask`` leaves out the masked positions of a batch-first (B, T, …) input."""
    if kind in ("linear", "embedding"):
        if x.dim() >= 2 + (kind == "linear"):
            x = _unmasked(name, x, mask)
        return x.reshape(-1) if kind == "embedding" else x.reshape(-1, x.shape[-1])
    return patches(module, x) if kind == "conv" else transposed_patches(module, x)


def _accumulate(total: torch.Tensor, module: nn.Module, kind: str, cols: torch.Tensor, upper: torch.Tensor) -> None:
    """Add one call's Σ x xᵀ (float64 products) to the packed float64 sum ``total``; ``upper`` is the (d × d)
    upper-triangle mask."""
    if kind == "embedding":
        total += torch.bincount(cols.reshape(-1), minlength=total.numel()).to(total)
        return
    gram = None
    for chunk in cols.split(CHUNK_ROWS):
        chunk = chunk.to(torch.float64)
        gram = chunk.mT @ chunk if gram is None else gram.addmm_(chunk.mT, chunk)
    if kind == "conv_transpose" and module.groups > 1:  # group g's outputs read only group g's channels
        k = math.prod(_tuple(module.kernel_size, module.weight.dim() - 2))
        block = module.in_channels // module.groups * k
        group = torch.arange(gram.shape[0], device=gram.device) // block
        gram.masked_fill_(group[:, None] != group[None, :], 0.0)
    total += gram[upper]


class _Collector:
    """Forward pre-hooks that accumulate each selected layer's statistic, sharing it between layers fed by the same
    tensor (tracked with weak references, so that no input is kept alive)."""

    def __init__(self, selected: list[tuple[str, nn.Module]], stop_early: bool, measure: bool = True,
                 means: bool = False):
        self.selected = selected
        self.stop_early = stop_early
        self.measure = measure
        self.means = means
        self.column_sums: dict[str, torch.Tensor] = {}
        self.kinds = {name: layer_kind(m) for name, m in selected}
        self.layers: dict[str, tuple[str, str]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self.masks: dict = {}  # (d, device) -> upper-triangle mask
        self.mask = None
        self.seen: list = []  # this batch: (weakref to an input, signature, key)
        self.calls: dict[str, list[int]] = {}  # this batch: layer -> indices into seen
        self.handles = [m.register_forward_pre_hook(self._hook(name, m)) for name, m in selected]

    def begin(self, mask, batch_index: int = 0) -> None:
        self.mask, self.seen, self.calls, self.batch_index = mask, [], {}, batch_index

    def _check_finite(self) -> None:
        """Once per batch: the statistics it added to are finite."""
        keys: dict[str, str] = {}
        for name in self.calls:  # forward order: the first layer that reads a statistic names it
            keys.setdefault(self.layers[name][0], name)
        for key, name in keys.items():
            sums = [self.sums.get(key)] + [self.column_sums.get(key)]
            if not all(t is None or bool(torch.isfinite(t).all()) for t in sums):
                raise ValueError(f"calibrate: layer {name!r} got NaN or Inf inputs in batch {self.batch_index} "
                                 "(counting from 0); its statistic would be meaningless. Check that batch (and the "
                                 "layers before this one)")

    def _hook(self, name: str, module: nn.Module):
        def hook(_module, args):
            self._observe(name, module, args)
            if self.stop_early and len(self.calls) == len(self.selected):
                raise _StopForward
        return hook

    def _observe(self, name: str, module: nn.Module, args) -> None:
        kind = self.kinds[name]
        if kind == "conv_transpose" and len(args) > 1 and args[1] is not None:
            raise ValueError(f"layer {name!r}: calibration of a ConvTranspose called with output_size is not "
                             "supported; call it without output_size (set output_padding instead)")
        x, sig = args[0], _signature(module, kind)
        known = self.layers.get(name, (None,))[0]
        index = next((i for i, (ref, s, k) in enumerate(self.seen)
                      if ref() is x and s == sig and known in (None, k)), None)
        if known is None:
            self.layers[name] = (self.seen[index][2] if index is not None else name, kind)
        key = self.layers[name][0]
        if index is None:
            if self.measure:
                if x.is_meta:
                    raise ValueError(f"calibrate: layer {name!r} got an input on the meta device, which has no "
                                     "values; load the model's weights and feed real batches")
                self._add(key, module, kind, _columns(name, module, kind, x.detach(), self.mask), x.device)
            self.seen.append((weakref.ref(x), sig, key))
            index = len(self.seen) - 1
        self.calls.setdefault(name, []).append(index)

    def _add(self, key: str, module: nn.Module, kind: str, cols: torch.Tensor, device) -> None:
        d = module.num_embeddings if kind == "embedding" else cols.shape[-1]
        if key not in self.sums:
            self.sums[key] = torch.zeros(d if kind == "embedding" else d * (d + 1) // 2, dtype=torch.float64,
                                         device=device)
            self.samples[key] = 0
        if kind != "embedding" and (d, device) not in self.masks:
            self.masks[(d, device)] = _upper_mask(d, device)
        _accumulate(self.sums[key], module, kind, cols, self.masks.get((d, device)))
        self.samples[key] += int(cols.shape[0])
        if self.means and kind != "embedding" and not (kind == "conv_transpose" and module.groups > 1):
            total = self.column_sums.setdefault(key, torch.zeros(d, dtype=torch.float64, device=device))
            for chunk in cols.split(CHUNK_ROWS):
                total += chunk.to(torch.float64).sum(0)

    def end(self, batch_index: int) -> None:
        """Check that this batch's inputs were finite and that layers sharing a statistic were fed the same tensors."""
        if self.measure:
            self._check_finite()
        by_key: dict[str, tuple[str, list[int]]] = {}
        for name, calls in self.calls.items():
            key = self.layers[name][0]
            first = by_key.setdefault(key, (name, calls))
            if first[1] != calls:
                raise ValueError(f"layers {first[0]!r} and {name!r} shared their input in an earlier batch but not in "
                                 f"batch {batch_index}; calibrate them separately (include=...)")

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _attention_mask(batch) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) else None
    return None


def run_batch(model: nn.Module, batch):
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _select(model: nn.Module, include, exclude, layers) -> list[tuple[str, nn.Module]]:
    selected, skipped = select_layers(model, include, exclude)
    if layers is None:
        return selected
    wanted = list(layers)
    chosen = [(n, m) for n, m in selected if n in set(wanted)]
    if len(chosen) < len(set(wanted)):
        reasons = {n: r for n, _, r in skipped}
        bad = [f"{n!r} ({reasons.get(n, 'not a supported layer of the model, or left out by include/exclude')})"
               for n in wanted if n not in dict(chosen)]
        raise ValueError("calibrate: cannot calibrate " + ", ".join(bad[:4]))
    return chosen


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode for the block; every module's training flag restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _collect(model: nn.Module, batches: Iterable, include, exclude, layers, progress: bool, stop_early: bool,
             measure: bool, means: bool = False) -> _Collector:
    """Run the batches with the hooks of a :class:`_Collector` on the selected layers (eval mode, no gradients,
    training flags restored)."""
    selected = _select(model, include, exclude, layers)
    if not selected:
        raise ValueError("calibrate: no layer selected; check include/exclude (supported: Linear, Conv1/2/3d, "
                         "ConvTranspose1/2/3d, Embedding; converted layers are calibrated on the dense model)")
    collector = _Collector(selected, stop_early, measure, means)
    iterator = progress_iter(batches, progress, "calibrate", "batch")
    try:
        with _eval_mode(model), torch.no_grad():
            for i, batch in enumerate(iterator):
                collector.begin(_attention_mask(batch), i)
                try:
                    run_batch(model, batch)
                except _StopForward:
                    pass
                collector.end(i)
    finally:
        collector.close()
    missing = [n for n, _ in selected if n not in collector.layers]
    if missing:
        raise ValueError(f"calibrate: layers {missing[:4]} never ran on the batches; exclude them or check the "
                         "batches")
    return collector


def calibrate(model: nn.Module, batches: Iterable, include=None, exclude=None, progress: bool = False,
              stop_early: bool = False, layers: Iterable[str] | None = None, means: bool = False) -> Calibration:
    """Stream ``batches`` through ``model`` (eval mode, no gradients) and return each selected layer's statistic.

    Args:
        batches: tensors (``model(x)``), tuples (``model(*b)``) or dicts (``model(**b)``, e.g. tokenizer outputs; an
            ``attention_mask`` entry (B, T) leaves padded positions out of the statistics of Linear and Embedding
            layers whose inputs are batch-first (B, T, …); a sequence-first (T, B, …) input is refused).
        include / exclude: layer selection as in :func:`torch_sttp.convert` (:func:`torch_sttp.layers.select_layers`).
        progress: a progress bar over the batches.
        stop_early: end each forward pass as soon as every selected layer has seen its input (when only some
            early layers are calibrated; assumes each selected layer runs once per forward).
        layers: qualified names; only these layers (each must be selectable) are calibrated.
        means: also sum the columns, Σ x, for :meth:`Calibration.mean` / :meth:`Calibration.covariance` (the centred
            metric of :func:`torch_sttp.whitening.layer_metric`); d_in more values per statistic (none for an
            Embedding or a grouped ConvTranspose).

    Every module's training flag is restored afterwards. Raises ValueError (naming the layer) if no layer is
    selected, if a selected layer never runs, if its inputs hold NaN or Inf or are on the meta device, or if layers
    that shared an input stop sharing it in a later batch.
    """
    c = _collect(model, batches, include, exclude, layers, progress, stop_early, measure=True, means=means)
    return Calibration(c.layers, c.sums, c.samples, packed=True, column_sums=c.column_sums)


def forward_groups(model: nn.Module, batch, include=None, exclude=None, layers=None) -> list[list[str]]:
    """The selected layers grouped by shared input (as :meth:`Calibration.groups`), groups in the order they run,
    from one forward pass of ``batch``; no statistic is computed."""
    c = _collect(model, [batch], include, exclude, layers, False, False, measure=False)
    groups: dict[str, list[str]] = {}
    for name, (key, _) in c.layers.items():
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def sequential_statistics(model: nn.Module, batches, names: Iterable[str], progress: bool = False,
                          means: bool = False, reference: nn.Module | None = None):
    """For sequential compression: yields ``(group, statistics)`` for each group of layers fed by the same input,
    in forward order, computing each group's statistics on the model *as it is when the group's turn comes*.

    The caller compresses the layers of ``group`` (in place, keeping their names) before asking for the next group,
    so that each later layer is calibrated on the outputs of the already compressed ones. ``batches`` must be
    re-iterable (a list); the order and the groups come from one forward pass of the first batch; each group then
    costs one pass over ``batches`` stopped after the group's layers (``stop_early``); ``means`` as in
    :func:`calibrate`. With a ``reference`` model (a dense copy), each group's statistics are instead its
    :func:`paired_statistics` against it (full passes of both models).
    """
    names = list(names)
    if iter(batches) is batches:
        raise ValueError("sequential compression needs re-iterable batches (a list), not a one-shot iterator")
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("sequential compression: no batch given")
    for group in forward_groups(model, first, layers=names):
        if reference is not None:
            yield group, paired_statistics(reference, model, batches, group)
        else:
            yield group, calibrate(model, batches, layers=group, progress=progress, stop_early=True, means=means)


class PairedStatistics:
    """Statistics of the same layers in two models fed the same data: x the input of a layer in the ``reference``
    model, x̂ its input in the (partly compressed) model. ``model`` is the :class:`Calibration` of x̂ (with means);
    :meth:`cross_moment` E[x x̂ᵀ], :meth:`cross_covariance` E[(x − μ)(x̂ − μ̂)ᵀ] and :meth:`reference_mean` μ = E[x]
    come from the float64 sums ``cross`` (Σ x x̂ᵀ) and ``reference_sums`` (Σ x)."""

    def __init__(self, model: Calibration, cross: Mapping[str, torch.Tensor],
                 reference_sums: Mapping[str, torch.Tensor]):
        self.model, self.cross, self.reference_sums = model, dict(cross), dict(reference_sums)

    def cross_moment(self, name: str) -> torch.Tensor:
        """E[x x̂ᵀ] (d_in × d_in)."""
        return self.cross[name] / self.model.samples(name)

    def reference_mean(self, name: str) -> torch.Tensor:
        """μ = E[x] (d_in,)."""
        return self.reference_sums[name] / self.model.samples(name)

    def cross_covariance(self, name: str) -> torch.Tensor:
        """E[x x̂ᵀ] − μ·μ̂ᵀ."""
        return self.cross_moment(name) - torch.outer(self.reference_mean(name), self.model.mean(name))


def paired_statistics(reference: nn.Module, model: nn.Module, batches, names: Iterable[str]) -> PairedStatistics:
    """Stream ``batches`` through ``reference`` and ``model`` (eval mode, no gradients, flags restored) and sum, for
    each layer of ``names`` (present in both under the same name, called in the same order), Σ x x̂ᵀ, Σ x̂ x̂ᵀ, Σ x
    and Σ x̂ over the input columns (as :func:`calibrate`; masked positions left out). Embedding and grouped
    ConvTranspose layers are refused (their inputs are not compared column by column)."""
    names = list(names)
    pairs = [(n, reference.get_submodule(n), model.get_submodule(n)) for n in names]
    for n, _, m in pairs:
        kind = layer_kind(m)
        if kind == "embedding" or (kind == "conv_transpose" and m.groups > 1):
            raise ValueError(f"layer {n!r}: paired statistics are not defined for a {kind} layer"
                             + (" with groups > 1" if kind == "conv_transpose" else "") + "; leave it out")
    sums = {n: {} for n in names}
    for batch in batches:
        mask = _attention_mask(batch)
        cols = [_batch_columns(net, [(n, mod) for n, mod, _ in pairs] if net is reference
                               else [(n, mod) for n, _, mod in pairs], batch, mask) for net in (reference, model)]
        for n in names:
            if not cols[0][n] or not cols[1][n]:
                continue
            x, y = torch.cat(cols[0][n]).double(), torch.cat(cols[1][n]).double()
            if x.shape != y.shape:
                raise ValueError(f"layer {n!r} saw inputs of shape {tuple(x.shape)} in the reference and "
                                 f"{tuple(y.shape)} in the model; pair models of the same architecture")
            for key, value in (("xy", x.mT @ y), ("yy", y.mT @ y), ("x", x.sum(0)), ("y", y.sum(0)),
                               ("n", x.shape[0])):
                sums[n][key] = sums[n].get(key, 0) + value
            if not bool(torch.isfinite(sums[n]["xy"]).all() and torch.isfinite(sums[n]["x"]).all()):
                raise ValueError(f"paired_statistics: layer {n!r} got NaN or Inf inputs in the reference model; "
                                 "check the batches")
    missing = [n for n in names if not sums[n]]
    if missing:
        raise ValueError(f"paired_statistics: layers {missing[:4]} never ran on the batches")
    stats = Calibration({n: (n, layer_kind(m)) for n, _, m in pairs}, {n: sums[n]["yy"] for n in names},
                        {n: sums[n]["n"] for n in names}, column_sums={n: sums[n]["y"] for n in names})
    return PairedStatistics(stats, {n: sums[n]["xy"] for n in names}, {n: sums[n]["x"] for n in names})


def _batch_columns(net: nn.Module, layers, batch, mask) -> dict[str, list[torch.Tensor]]:
    """The input columns of each of ``layers`` ((name, module) of ``net``) in one forward pass of ``batch``."""
    found: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}

    def observe(name, module, args):
        found[name].append(_columns(name, module, layer_kind(module), args[0].detach(), mask))
    _first_calls(net, layers, batch, observe=observe)
    return found


def _output_tensor(output) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``last_hidden_state``, or the first tensor of a
    tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"layer_sensitivity: cannot find a tensor in a {type(output).__name__} model output")


def layer_sensitivity(model: nn.Module, batches: Iterable, include=None, exclude=None, layers=None,
                      seed: int = 0) -> dict[str, float]:
    """How much the model's output moves per unit of error in each selected layer's output.

    s_l = E_t ‖J_{l,t}‖²_F / d_out, J_{l,t} the Jacobian of the model's output (its tensor, see distillation's
    ``first_tensor``) with respect to layer l's output at input column t (a token, an output position): one
    backward pass per batch of vᵀ·output with v ~ N(0, I) (Hutchinson: E‖Jᵀv‖² = ‖J‖²_F), in eval mode. An
    error δ of layer l's output that is spread evenly over its d_out outputs moves the model's output by about
    s_l·‖δ‖², so s_l·‖(W − Ŵ)·L‖²_F makes the whitened losses of different layers comparable. Masked positions
    are left out as in :func:`calibrate`; training flags are restored, parameter gradients are left untouched.
    Each batch takes one forward and backward pass, so the peak memory is that of a training step at the batch's
    size: pass smaller batches to bound it (the estimate is per column, so the batch size does not change it).
    Each layer's output gradient is reduced to its sum of squares as the backward pass produces it (a tensor hook;
    the pass differentiates with respect to one scalar leaf added to every selected output), so no layer's gradient
    outlives its step of the backward pass; a layer called more than once per forward counts every call. Raises
    ValueError naming the layers whose output gradients are NaN or Inf (a NaN input the Jacobian ignores, e.g.
    through a ReLU's zero slope, goes unnoticed: the Jacobian is what this measures).
    """
    selected = _select(model, include, exclude, layers)
    kinds = {n: layer_kind(m) for n, m in selected}
    generator = torch.Generator().manual_seed(seed)
    totals = {n: 0.0 for n, _ in selected}
    counts = {n: 0 for n, _ in selected}
    mask: list = [None]
    leaf = torch.zeros((), requires_grad=True)  # on every hooked output's path: one backward reaches them all

    def hook_for(name):
        def consume(g):  # each output gradient is reduced as backward produces it, then freed
            total, columns = _squared_gradient_sum(name, g, mask[0], kinds[name])
            totals[name] += total
            counts[name] += columns

        def hook(_module, _args, out):
            out = out + leaf.to(dtype=out.dtype, device=out.device)
            out.register_hook(consume)
            return out
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in selected]
    try:
        with _eval_mode(model):
            for batch in batches:
                mask[0] = _attention_mask(batch)
                with torch.enable_grad():
                    out = _output_tensor(run_batch(model, batch))
                    probe = torch.randn(out.shape, generator=generator).to(out)
                    torch.autograd.grad((out * probe).sum(), [leaf], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    bad = [n for n, t in totals.items() if not math.isfinite(t)]
    if bad:
        raise ValueError(f"layer_sensitivity: layers {bad[:4]} got NaN or Inf output gradients (non-finite inputs or "
                         "outputs on these batches); check the batches")
    return {n: totals[n] / counts[n] if counts[n] else 0.0 for n in totals}


def _squared_gradient_sum(name: str, g: torch.Tensor, mask, kind: str) -> tuple[float, int]:
    """(Σ‖g_t‖² / d_out, the number of columns) of one layer's output gradient ``g``, one column g_t per token or
    output position (masked positions left out)."""
    if kind in ("linear", "embedding") and g.dim() >= 3:  # as in calibrate: the mask is per token
        g = _unmasked(name, g, mask)
    if kind in ("conv", "conv_transpose"):
        g = g.movedim(1, -1)  # channels last: one column per output position
    cols = g.reshape(-1, g.shape[-1])
    return float((cols.double() ** 2).sum()) / cols.shape[1], cols.shape[0]


# ------------------------------------------------------------------------------------------------ batch norm
def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Batch-norm layers that keep running statistics."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _first_calls(model: nn.Module, modules: list[tuple[str, nn.Module]], batch, observe=None) -> list[str]:
    """Names of ``modules`` in the order they first run on ``batch`` (eval mode, no gradients, flags restored);
    ``observe(name, module, args)`` is called on every call (a forward pre-hook)."""
    order: list[str] = []

    def hook_for(name, module):
        def hook(_module, args):
            if name not in order:
                order.append(name)
            if observe is not None:
                observe(name, module, args)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in modules]
    try:
        with _eval_mode(model), torch.no_grad():
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


def reestimate_batchnorm(model: nn.Module, batches, include=None) -> dict[str, int]:
    """Set every batch norm's running statistics to the exact ones of its inputs on ``batches`` (no gradient step).

    For each BatchNorm1d/2d/3d with running statistics (``include``: qualified names, default all), in forward
    order: running_mean ← E[x_c] and running_var ← Σ (x_c − E[x_c])² / (N − 1) (PyTorch's unbiased convention),
    over every sample and position x_c of channel c seen in all batches, accumulated in float64; each layer's
    inputs are those of the model whose earlier batch norms are already re-estimated. After compressing the layers
    before a batch norm, this restores the normalisation the trained model had (a layer followed by a
    re-estimated batch norm is blind to per-channel shifts of its output). ``batches`` must be re-iterable (one
    pass per batch norm); eval mode, training flags restored. Returns {name: N}. On an error (non-finite inputs,
    too little data) every batch norm keeps the statistics it had.
    """
    if iter(batches) is batches:
        raise ValueError("reestimate_batchnorm needs re-iterable batches (a list), not a one-shot iterator")
    norms = [(n, m) for n, m in _batchnorms(model) if include is None or n in set(include)]
    first = next(iter(batches), None)
    if first is None or not norms:
        raise ValueError("reestimate_batchnorm: " + ("no batch given" if first is None else
                                                      "the model has no batch norm with running statistics"))
    modules = dict(norms)
    saved = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms}
    try:
        return _reestimate(model, norms, modules, first, batches)
    except BaseException:
        with torch.no_grad():
            for n, (mean, var) in saved.items():
                modules[n].running_mean.copy_(mean)
                modules[n].running_var.copy_(var)
        raise


def _reestimate(model, norms, modules, first, batches) -> dict[str, int]:
    counts = {}
    for name in _first_calls(model, norms, first):
        sums = {}

        def observe(_name, module, args, sums=sums):
            x = args[0].detach().to(torch.float64).movedim(1, -1).reshape(-1, module.num_features)
            sums["n"] = sums.get("n", 0) + x.shape[0]
            sums["s"] = sums.get("s", 0) + x.sum(0)
            sums["q"] = sums.get("q", 0) + (x * x).sum(0)
        for batch in batches:
            _first_calls(model, [(name, modules[name])], batch, observe=observe)
        n, mean = sums["n"], sums["s"] / sums["n"]
        if n < 2:
            raise ValueError(f"reestimate_batchnorm: layer {name!r} saw {n} value per channel; give more data")
        var = (sums["q"] - n * mean * mean).clamp_min(0) / (n - 1)
        if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ValueError(f"reestimate_batchnorm: layer {name!r} got NaN or Inf inputs; check the batches (and "
                             "the layers before it); every batch norm keeps its statistics")
        bn = modules[name]
        with torch.no_grad():
            bn.running_mean.copy_(mean.to(bn.running_mean))
            bn.running_var.copy_(var.to(bn.running_var))
        counts[name] = n
    return counts


def batchnorm_scales(model: nn.Module, batch, layers=None) -> dict[str, torch.Tensor]:
    """g = |γ| / √(running_var + ε) (d_out,), float64, for each selected layer (``layers``: names; default every
    supported one) whose output is the very input of a batch norm in one forward pass of ``batch``.

    The error of such a layer after the normalisation (in eval mode) is diag(g)·(W − Ŵ)·X: ``output_scale`` of
    :func:`torch_sttp.whitening.layer_metric` makes it the metric (γ = 1 without affine parameters)."""
    selected = _select(model, None, None, layers)
    outputs: list = []  # (weak reference to a selected layer's output, its name): no output is kept alive
    followers: dict[str, nn.Module] = {}

    def match(_name, module, args):
        source = next((n for ref, n in outputs if ref() is args[0]), None)
        if source is not None:
            followers.setdefault(source, module)
    hooks = [m.register_forward_hook(lambda _m, _a, out, n=n: outputs.append((weakref.ref(out), n)))
             for n, m in selected]
    try:
        _first_calls(model, _batchnorms(model), batch, observe=match)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, bn in followers.items():
        gamma = bn.weight.detach().abs().double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
        out[name] = gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    return out
