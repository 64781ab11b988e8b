"""Plain ``torch.nn`` models for the experiments.

Contents
--------
* :class:`SNGANGenerator` / :class:`SNGANDiscriminator` -- the unconditional ResNet SNGAN pair with the
  presets ``32`` (CIFAR-10, 32x32) and ``48`` (STL-10 at 48x48), layer for layer as specified in
  ``architectures.md`` (the layer list, bias flags and BatchNorm placement fix the parameter counts used by the
  compression ratio of the paper).
* :class:`WideResNet` -- pre-activation Wide ResNet (depth ``6n + 4``), WRN-28-10 by default.
* :class:`CNN1d` -- a small 1-D convolutional classifier for mnist1d sequences of length 40.
* :class:`SmallCNN` -- a small 2-D convolutional classifier for 1-channel 28x28 / 32x32 digits.
* :data:`MODELS`, :func:`build_model` -- a name -> constructor registry.
* :func:`state_dict_numel` -- the number of values in a state dict, ``num_batches_tracked`` excluded.

All models take/return float tensors; shapes are documented on each ``forward``.  The discriminator returns
logits of shape ``(B,)``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SNGAN_PRESETS",
    "SNGANGenerator",
    "SNGANDiscriminator",
    "WideResNet",
    "CNN1d",
    "SmallCNN",
    "MODELS",
    "build_model",
    "state_dict_numel",
]


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def state_dict_numel(model: nn.Module) -> int:
    """Number of values stored in ``model.state_dict()``, skipping entries ending in ``num_batches_tracked``.

    Parameters and buffers (e.g. BatchNorm running statistics) are both counted, which is the convention
    of the compression ratio in the paper.
    """
    return int(
        sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    )


def _init_weight(module: nn.Module, gain: float) -> None:
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def _upsample2(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)


def _apply_spectral_norm(module: nn.Module) -> None:
    """Wrap every Conv2d / Linear weight in ``module`` with torch's spectral normalization parametrization."""
    from torch.nn.utils.parametrizations import spectral_norm

    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            spectral_norm(m)


# ----------------------------------------------------------------------------------------------------------------------
# SNGAN
# ----------------------------------------------------------------------------------------------------------------------

#: Preset hyper-parameters.  Channel widths are given as divisors of ``ngf`` / ``ndf``:
#: a generator block ``(a, b)`` maps ``ngf // a -> ngf // b``; ``d_first`` is the divisor of the optimized first
#: discriminator block's output width; a discriminator block ``(a, b, down)`` maps ``ndf // a -> ndf // b``.
SNGAN_PRESETS: Dict[int, dict] = {
    32: dict(
        nz=128,
        ngf=256,
        ndf=128,
        bottom_width=4,
        g_blocks=[(1, 1), (1, 1), (1, 1)],
        d_first=1,
        d_blocks=[(1, 1, True), (1, 1, False), (1, 1, False)],
        reduced_ndf=32,
    ),
    48: dict(
        nz=128,
        ngf=512,
        ndf=1024,
        bottom_width=6,
        g_blocks=[(1, 2), (2, 4), (4, 8)],
        d_first=16,
        d_blocks=[(16, 8, True), (8, 4, True), (4, 2, True), (2, 1, False)],
        reduced_ndf=64,
    ),
}


def _get_preset(preset: int) -> dict:
    if preset not in SNGAN_PRESETS:
        raise ValueError(f"unknown SNGAN preset {preset!r}; expected one of {sorted(SNGAN_PRESETS)}")
    return SNGAN_PRESETS[preset]


def _width(base: int, divisor: int, what: str) -> int:
    if base % divisor != 0 or base // divisor < 1:
        raise ValueError(f"{what}={base} must be a positive multiple of {divisor} for this preset")
    return base // divisor


class GenBlock(nn.Module):
    """Generator residual block (always upsamples by 2).

    ``BN(in) -> ReLU -> up x2 -> Conv3x3(in->out) -> BN(out) -> ReLU -> Conv3x3(out->out)`` plus the shortcut
    ``up x2 -> Conv1x1(in->out)``; all convolutions have biases.

    Shape: ``(B, in, H, W) -> (B, out, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample_mode: str = "bilinear"):
        super().__init__()
        self.upsample_mode = upsample_mode
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=True)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, padding=0, bias=True)
        _init_weight(self.conv1, math.sqrt(2.0))
        _init_weight(self.conv2, math.sqrt(2.0))
        _init_weight(self.shortcut, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(x))
        h = _upsample2(h, self.upsample_mode)
        h = self.conv1(h)
        h = self.conv2(F.relu(self.bn2(h)))
        return h + self.shortcut(_upsample2(x, self.upsample_mode))


class SNGANGenerator(nn.Module):
    """Unconditional ResNet SNGAN generator.

    Args:
        preset: ``32`` (CIFAR-10: nz 128, ngf 256, bottom 4, blocks 256->256 x3) or ``48`` (STL-10 48x48: nz 128,
            ngf 512, bottom 6, blocks 512->256->128->64).
        nz: latent size (preset default if ``None``).
        ngf: base generator width; block widths are ``ngf // divisor`` as in the preset (e.g. ``ngf=32`` gives a
            CPU-sized model).
        bottom_width: spatial size right after ``noise_to_conv``; the output is ``bottom_width * 2**num_blocks``.
        channels: number of output image channels (3 for RGB, 1 for grayscale).
        image_size: alternative to ``bottom_width``: the desired output size (must be divisible by
            ``2**num_blocks``, i.e. 8 for both presets).
        upsample_mode: interpolation used for the x2 upsampling (``"bilinear"`` by default, or ``"nearest"``).

    Layers: ``noise_to_conv`` Linear(nz -> bottom^2 * ngf, bias) -> blocks -> ``final_bn`` BN -> ReLU ->
    ``final_conv`` Conv3x3(last width -> channels, bias) -> tanh.  The attribute name ``noise_to_conv`` is kept
    stable so it can be excluded from reparameterization by name.

    Shape: ``forward(z)`` with ``z`` of shape ``(B, nz)`` returns images ``(B, channels, S, S)`` with values in
    ``[-1, 1]``, ``S = bottom_width * 2**num_blocks`` (32 for preset 32, 48 for preset 48).
    """

    def __init__(
        self,
        preset: int = 32,
        nz: Optional[int] = None,
        ngf: Optional[int] = None,
        bottom_width: Optional[int] = None,
        channels: int = 3,
        image_size: Optional[int] = None,
        upsample_mode: str = "bilinear",
    ):
        super().__init__()
        cfg = _get_preset(preset)
        self.preset = preset
        self.nz = int(nz if nz is not None else cfg["nz"])
        self.ngf = int(ngf if ngf is not None else cfg["ngf"])
        self.channels = int(channels)
        num_blocks = len(cfg["g_blocks"])
        scale = 2**num_blocks
        if image_size is not None:
            if image_size % scale != 0:
                raise ValueError(f"image_size={image_size} must be divisible by {scale}")
            if bottom_width is not None and bottom_width * scale != image_size:
                raise ValueError("bottom_width and image_size are inconsistent")
            bottom_width = image_size // scale
        self.bottom_width = int(bottom_width if bottom_width is not None else cfg["bottom_width"])
        self.image_size = self.bottom_width * scale

        widths: List[Tuple[int, int]] = [
            (_width(self.ngf, a, "ngf"), _width(self.ngf, b, "ngf")) for a, b in cfg["g_blocks"]
        ]
        self.first_width = widths[0][0]
        self.noise_to_conv = nn.Linear(self.nz, self.bottom_width**2 * self.first_width, bias=True)
        self.blocks = nn.ModuleList([GenBlock(i, o, upsample_mode) for i, o in widths])
        last = widths[-1][1]
        self.final_bn = nn.BatchNorm2d(last)
        self.final_conv = nn.Conv2d(last, self.channels, 3, padding=1, bias=True)
        _init_weight(self.noise_to_conv, 1.0)
        _init_weight(self.final_conv, 1.0)

    def sample_noise(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Standard normal latent codes of shape ``(batch_size, nz)``."""
        if device is None:
            device = self.noise_to_conv.weight.device
        return torch.randn(batch_size, self.nz, device=device, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z``: ``(B, nz)`` -> images ``(B, channels, S, S)`` in ``[-1, 1]``."""
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"expected z of shape (B, {self.nz}), got {tuple(z.shape)}")
        h = self.noise_to_conv(z).view(z.shape[0], self.first_width, self.bottom_width, self.bottom_width)
        for block in self.blocks:
            h = block(h)
        h = F.relu(self.final_bn(h))
        return torch.tanh(self.final_conv(h))


class OptimizedDisBlock(nn.Module):
    """First ("optimized") discriminator block.

    ``Conv3x3(in->out) -> ReLU -> Conv3x3(out->out) -> avgpool 2`` plus the shortcut
    ``avgpool 2 -> Conv1x1(in->out)``; all convolutions have biases.

    Shape: ``(B, in, H, W) -> (B, out, H/2, W/2)``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=True)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, padding=0, bias=True)
        _init_weight(self.conv1, math.sqrt(2.0))
        _init_weight(self.conv2, math.sqrt(2.0))
        _init_weight(self.shortcut, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        h = F.avg_pool2d(h, 2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class DisBlock(nn.Module):
    """Discriminator residual block.

    ``ReLU -> Conv3x3(in->in) -> ReLU -> Conv3x3(in->out) [-> avgpool 2]``; the shortcut is
    ``Conv1x1(in->out) [-> avgpool 2]`` when ``in != out`` or downsampling, identity otherwise.  All convolutions
    have biases.

    Shape: ``(B, in, H, W) -> (B, out, H', W')`` with ``H' = H/2`` when ``downsample`` else ``H``.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample = bool(downsample)
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True)
        _init_weight(self.conv1, math.sqrt(2.0))
        _init_weight(self.conv2, math.sqrt(2.0))
        if in_channels != out_channels or self.downsample:
            self.shortcut: Optional[nn.Conv2d] = nn.Conv2d(in_channels, out_channels, 1, padding=0, bias=True)
            _init_weight(self.shortcut, 1.0)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        s = x if self.shortcut is None else self.shortcut(x)
        if self.downsample:
            h = F.avg_pool2d(h, 2)
            s = F.avg_pool2d(s, 2)
        return h + s


class SNGANDiscriminator(nn.Module):
    """Unconditional ResNet SNGAN discriminator.

    Args:
        preset: ``32`` (ndf 128: 3->128 optimized block, then 128->128 down, 128->128, 128->128) or ``48``
            (ndf 1024: 3->64 optimized block, then 64->128 down, 128->256 down, 256->512 down, 512->1024).
        ndf: base width overriding the preset; widths are ``ndf // divisor``.  The reduced discriminators of the
            paper's Table 1 are ``ndf=32`` (preset 32) and ``ndf=64`` (preset 48, widths 4, 8, 16, 32, 64).
        channels: number of input image channels.
        spectral_norm: if ``True``, wrap every Conv2d/Linear weight with torch's spectral normalization (a plain
            SNGAN baseline).  Off by default; the parameter counts refer to the plain model.

    Layers: optimized block -> blocks -> ReLU -> sum over spatial positions -> ``fc`` Linear(last width -> 1,
    no bias).

    Shape: ``forward(x)`` with ``x`` of shape ``(B, channels, H, W)`` returns logits of shape ``(B,)``.  Any
    ``H, W`` divisible by ``2**num_downsamplings`` works (the spatial sum makes the head size-agnostic).
    """

    def __init__(self, preset: int = 32, ndf: Optional[int] = None, channels: int = 3, spectral_norm: bool = False):
        super().__init__()
        cfg = _get_preset(preset)
        self.preset = preset
        self.ndf = int(ndf if ndf is not None else cfg["ndf"])
        self.channels = int(channels)
        first = _width(self.ndf, cfg["d_first"], "ndf")
        self.first_block = OptimizedDisBlock(self.channels, first)
        blocks = []
        for a, b, down in cfg["d_blocks"]:
            blocks.append(DisBlock(_width(self.ndf, a, "ndf"), _width(self.ndf, b, "ndf"), down))
        self.blocks = nn.ModuleList(blocks)
        self.last_width = _width(self.ndf, cfg["d_blocks"][-1][1], "ndf")
        self.fc = nn.Linear(self.last_width, 1, bias=False)
        _init_weight(self.fc, 1.0)
        if spectral_norm:
            _apply_spectral_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, channels, H, W)`` -> logits ``(B,)``."""
        h = self.first_block(x)
        for block in self.blocks:
            h = block(h)
        h = F.relu(h).sum(dim=(2, 3))
        return self.fc(h).squeeze(1)


# ----------------------------------------------------------------------------------------------------------------------
# Wide ResNet
# ----------------------------------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation wide block.

    ``BN(in) -> ReLU -> Conv3x3(in->w, bias) -> dropout -> BN(w) -> ReLU -> Conv3x3(w->w, stride s, bias)``;
    shortcut ``Conv1x1(in->w, stride s, bias)`` (applied to the pre-activated input) when ``s != 1`` or
    ``in != w``, identity otherwise.

    Shape: ``(B, in, H, W) -> (B, w, H/s, W/s)``.
    """

    def __init__(self, in_channels: int, width: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=True)
        if stride != 1 or in_channels != width:
            self.shortcut: Optional[nn.Conv2d] = nn.Conv2d(in_channels, width, 1, stride=stride, bias=True)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        h = self.conv1(a)
        h = self.dropout(h)
        h = self.conv2(F.relu(self.bn2(h)))
        s = x if self.shortcut is None else self.shortcut(a)
        return h + s


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet ``WRN-depth-widen``.

    Args:
        depth: ``6n + 4`` (28 -> 4 blocks per group; 10 -> 1 block per group for a tiny variant).
        widen: width multiplier; group widths are ``16*widen, 32*widen, 64*widen``.
        num_classes: number of output logits.
        in_channels: number of input image channels.
        dropout: dropout probability between the two convolutions of each block.

    Layers: ``conv_in`` Conv3x3(in_channels -> 16, bias) -> three groups (the first block of groups 2 and 3 has
    stride 2) -> ``bn_out`` BN -> ReLU -> global average pool -> ``fc`` Linear(64*widen -> num_classes, bias).
    WRN-28-10 has 36 507 242 state-dict values (``num_batches_tracked`` excluded).

    Shape: ``(B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        self.depth, self.widen = depth, widen
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv_in = nn.Conv2d(in_channels, 16, 3, padding=1, bias=True)
        groups = []
        c = 16
        for g, w in enumerate(widths):
            blocks = []
            for i in range(n):
                stride = 2 if (g > 0 and i == 0) else 1
                blocks.append(WideBasicBlock(c, w, stride, dropout))
                c = w
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn_out = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_channels, H, W)`` -> logits ``(B, num_classes)``."""
        h = self.groups(self.conv_in(x))
        h = F.relu(self.bn_out(h))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(h)


# ----------------------------------------------------------------------------------------------------------------------
# Small classifiers
# ----------------------------------------------------------------------------------------------------------------------


class CNN1d(nn.Module):
    """Small 1-D CNN for mnist1d (sequences of length 40, 10 classes).

    ``Conv1d(1->w, k5) -> ReLU -> 3 x [Conv1d(w->w, k3, stride 2) -> ReLU] -> flatten -> Linear``; about 11k
    parameters for ``width=32``, ``length=40``.

    Args:
        num_classes: number of output logits.
        length: input sequence length.
        width: number of channels of every convolution.

    Shape: ``(B, length)`` or ``(B, 1, length)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, length: int = 40, width: int = 32):
        super().__init__()
        self.length = length
        self.conv1 = nn.Conv1d(1, width, 5, padding=2)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        out_len = length
        for _ in range(3):
            out_len = (out_len - 1) // 2 + 1
        self.fc = nn.Linear(width * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, L)`` or ``(B, 1, L)`` -> logits ``(B, num_classes)``."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        h = F.relu(self.conv4(h))
        return self.fc(h.flatten(1))


class SmallCNN(nn.Module):
    """Small 2-D CNN for single-channel digits (28x28 or 32x32), 10 classes.

    ``3 x [Conv3x3 -> BN -> ReLU]`` with widths ``w, 2w, 4w`` and 2x max pooling after the first two, then
    adaptive average pooling to 2x2 and ``Linear(16w -> num_classes)``; about 25k values for ``width=16``.

    Args:
        num_classes: number of output logits.
        in_channels: number of input channels.
        width: base width ``w``.

    Shape: ``(B, in_channels, H, W)`` (H, W >= 8) -> logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_channels, H, W)`` -> logits ``(B, num_classes)``."""
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        h = F.relu(self.bn3(self.conv3(h)))
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.fc(h)


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------


def _sngan_g(preset: int) -> Callable[..., nn.Module]:
    def make(**kwargs) -> nn.Module:
        return SNGANGenerator(preset=preset, **kwargs)

    make.__doc__ = f"SNGAN generator, preset {preset}."
    return make


def _sngan_d(preset: int, reduced: bool) -> Callable[..., nn.Module]:
    def make(**kwargs) -> nn.Module:
        if reduced:
            kwargs.setdefault("ndf", SNGAN_PRESETS[preset]["reduced_ndf"])
        return SNGANDiscriminator(preset=preset, **kwargs)

    make.__doc__ = f"SNGAN discriminator, preset {preset}" + (
        f", reduced (ndf={SNGAN_PRESETS[preset]['reduced_ndf']})." if reduced else "."
    )
    return make


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def make(**kwargs) -> nn.Module:
        kwargs.setdefault("depth", depth)
        kwargs.setdefault("widen", widen)
        return WideResNet(**kwargs)

    make.__doc__ = f"Wide ResNet {depth}-{widen} (depth/widen overridable)."
    return make


#: Name -> constructor; every constructor accepts the keyword arguments of the underlying class.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "sngan32-g": _sngan_g(32),
    "sngan32-d": _sngan_d(32, reduced=False),
    "sngan32-d-reduced": _sngan_d(32, reduced=True),
    "sngan48-g": _sngan_g(48),
    "sngan48-d": _sngan_d(48, reduced=False),
    "sngan48-d-reduced": _sngan_d(48, reduced=True),
    "wrn28-10": _wrn(28, 10),
    "cnn1d": CNN1d,
    "small-cnn": SmallCNN,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate a registered model, e.g. ``build_model("sngan32-d", ndf=16)``.

    Names: ``sngan32-g``, ``sngan32-d``, ``sngan32-d-reduced``, ``sngan48-g``, ``sngan48-d``,
    ``sngan48-d-reduced``, ``wrn28-10``, ``cnn1d``, ``small-cnn``.  Keyword arguments are forwarded to the
    model's constructor (they override preset defaults).
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}") from None
    return factory(**kwargs)
