"""SNGAN training recipe of the paper's GAN experiments (Sec. 4, Tables 1-2, Fig. 5), from CPU-sized runs to full scale.

    python -m torch_sttp.experiments.gan --config configs/gan/mnist5k-cpu-reduced-sttp-c.yaml --seed 1
    python -m torch_sttp.experiments.gan --dataset cifar10 --data-root ~/data --d sttp-r --out runs/cifar-sttp-r

Recipe (Miyato et al. 2018 as used by the paper): unconditional ResNet SNGAN (presets 32 / 48 of
:mod:`torch_sttp.experiments.models`), hinge loss, Adam with betas (0, 0.9), learning rate 2e-4 decayed linearly to
zero over the run, ``n_dis`` discriminator updates per generator update, one batch of real images per discriminator
update (real and fake images go through D in one forward pass).

Discriminator variants (``--d``):

* ``sn`` -- spectral normalization of every Conv2d/Linear layer (torch's ``spectral_norm``, one power iteration);
* ``sr`` -- spectral regularization (Liu et al. 2019) applied on top of SN, :func:`torch_sttp.spectral.apply_spectral_regularization`;
* ``svdp-c``/``sttp-c`` -- SVDP/STTP with the identity spectrum; ``-l`` the learned normalized spectrum
  (Sigma = S/||S||_inf); ``-r`` learned normalized spectrum plus the D-optimal penalty (eq. 10) with weight
  ``--penalty-weight`` added to the discriminator loss (:func:`torch_sttp.spectral.penalty`, mean over all
  singular values of -log(sigma/sigma_max));
* ``plain`` -- no constraint.

The generator is dense by default (``--g plain``); ``--g svdp-r`` etc. converts it too, with ``noise_to_conv`` kept
dense as in the paper.  The reduced discriminators of Table 1 are ``--d-reduce 4`` (preset 32) / ``16`` (preset 48):
every D width divided by that factor.

Outputs in ``--out``: ``config.yaml`` (the resolved settings), ``metrics.csv`` (losses, learning rate, seconds per
step, D spectrum statistics, periodic cheap evaluations), ``checkpoint.pt`` (written atomically and checksummed
by :mod:`torch_sttp.checkpoint` every ``--ckpt-every`` generator steps and at the end: models, optimizers,
schedulers, SR state, all RNG states and the data sampler state, so an interrupted run resumes bit-identically on
CPU; read with ``weights_only=True``, so a planted file with pickled code is refused without running it),
``summary.json`` (final metrics, compression Z, wall time), ``samples.png``, ``spectra_D.png`` (Fig. 5 style),
``spectra_D_history.png`` and ``generator.pt``.

Settings come from defaults < ``--config`` file (YAML or JSON, keys as the long flags with ``_``) < command-line flags.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import atomic_write, set_rng_state
from ..options import INITS
from .runner import (MetricsLog, RunSummary, check_bool, check_choice, check_device, check_integer, check_number,
                     check_rank_setting, check_resumable, explain_missing_data, load_state, num_threads, progress_bar,
                     rank_literal, read_config_file, recipe_main, resolve_settings, save_state, select_device,
                     write_text)

__all__ = ["DEFAULTS", "D_VARIANTS", "G_VARIANTS", "add_gan_arguments", "resolve_config", "run_gan", "summary_line",
           "main",
           "build_models", "summarize_runs", "plot_curves",
           "plot_samples_montage", "CSV_FIELDS"]

D_VARIANTS = ("sn", "sr", "svdp-c", "svdp-l", "svdp-r", "sttp-c", "sttp-l", "sttp-r", "plain")
G_VARIANTS = ("plain", "svdp-c", "svdp-l", "svdp-r", "sttp-c", "sttp-l", "sttp-r")
DATASETS = ("mnist5k", "cifar10", "stl10")

#: Every setting with its default; ``None`` means "derived" (see :func:`resolve_config`).
DEFAULTS: Dict[str, Any] = dict(
    config=None,
    # data
    dataset="mnist5k",
    data_root=None,
    image_size=None,  # 32 for mnist5k / cifar10, 48 for stl10
    data_split=None,  # train for mnist5k / cifar10, unlabeled for stl10
    # models
    preset=None,  # 32, or 48 for stl10
    nz=128,
    ngf=None,  # preset default (256 / 512)
    ndf=None,  # preset default (128 / 1024)
    d_reduce=1,
    d="sn",
    g="plain",
    d_rank=64,
    g_rank=64,
    init="noisy_identity",
    penalty_weight=1.0,
    penalty_kind="d_optimal",
    sr_every=1,
    # optimization
    steps=100000,
    n_dis=5,
    batch_size=64,
    lr=2e-4,
    beta1=0.0,
    beta2=0.9,
    lr_decay="linear",
    # run
    seed=0,
    device="auto",
    threads=None,
    out=None,
    ckpt_every=1000,
    log_every=100,
    spectra_every=None,  # default: log_every
    eval_every=0,
    eval_every_samples=500,
    stop_after=None,
    resume=True,
    progress=True,
    # final evaluation
    metrics="modes,kid,fid,is",
    eval_samples=1000,
    inception_samples=None,  # default: eval_samples
    inception_weights=None,
    inception_batch=50,
    cache_dir=None,  # default: <out>/cache
    classifier_epochs=4,
    min_share=0.02,
    eval_only=False,
)

#: Settings that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {
    "config", "device", "threads", "out", "ckpt_every", "stop_after", "resume", "progress", "metrics",
    "eval_samples", "inception_samples", "inception_weights", "inception_batch", "cache_dir", "classifier_epochs",
    "min_share", "eval_only", "data_root",
}

CSV_FIELDS = [
    "step", "d_loss", "g_loss", "d_real", "d_fake", "penalty", "lr", "sec_per_step", "wall_time",
    "d_sigma_min", "d_sigma_max", "d_stable_rank_mean",
    "modes_classes_covered", "modes_kl_uniform", "cfid", "ckid",
]


# ----------------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------------


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _h(text: str, key: str) -> str:
    return f"{text} (default: {DEFAULTS[key]})"


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=S, help=_h("training images", "dataset"))
    g.add_argument("--data-root", default=S, metavar="DIR",
                   help="folder with the CIFAR-10 / STL-10 binary distributions (default: $TORCH_STTP_DATA or ./data)")
    g.add_argument("--image-size", type=int, default=S, help="image side (default: 32, or 48 for stl10)")
    g.add_argument("--data-split", default=S, help="split to train on (default: train, or unlabeled for stl10)")
    g = parser.add_argument_group("models")
    g.add_argument("--preset", type=int, choices=(32, 48), default=S, help="SNGAN preset (default: 32, 48 for stl10)")
    g.add_argument("--nz", type=int, default=S, help=_h("latent size", "nz"))
    g.add_argument("--ngf", type=int, default=S, help="generator base width (default: preset's, 256 / 512)")
    g.add_argument("--ndf", type=int, default=S, help="discriminator base width (default: preset's, 128 / 1024)")
    g.add_argument("--d-reduce", type=int, default=S,
                   help=_h("divide every D width by this (Table 1: 4 for preset 32, 16 for preset 48)", "d_reduce"))
    g.add_argument("--d", choices=D_VARIANTS, default=S, help=_h("discriminator variant", "d"))
    g.add_argument("--g", choices=G_VARIANTS, default=S, help=_h("generator variant (noise_to_conv stays dense)", "g"))
    g.add_argument("--d-rank", type=rank_literal, default=S, help=_h("rank cap r of SVDP/STTP in D", "d_rank"))
    g.add_argument("--g-rank", type=rank_literal, default=S, help=_h("rank cap r of SVDP/STTP in G", "g_rank"))
    g.add_argument("--init", default=S, help=_h("frame initialization of SVDP/STTP", "init"))
    g.add_argument("--penalty-weight", type=float, default=S,
                   help=_h("weight of the -R spectral penalty", "penalty_weight"))
    g.add_argument("--penalty-kind", choices=("d_optimal", "divergence"), default=S,
                   help=_h("spectral penalty of the -R variants", "penalty_kind"))
    g.add_argument("--sr-every", type=int, default=S, help=_h("SR compensation period in D updates", "sr_every"))


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = parser.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=S, help=_h("generator updates", "steps"))
    g.add_argument("--n-dis", type=int, default=S, help=_h("discriminator updates per generator update", "n_dis"))
    g.add_argument("--batch-size", type=int, default=S, help=_h("batch size", "batch_size"))
    g.add_argument("--lr", type=float, default=S, help=_h("Adam learning rate of G and D", "lr"))
    g.add_argument("--beta1", type=float, default=S, help=_h("Adam beta1", "beta1"))
    g.add_argument("--beta2", type=float, default=S, help=_h("Adam beta2", "beta2"))
    g.add_argument("--lr-decay", choices=("linear", "none"), default=S, help=_h("learning-rate schedule", "lr_decay"))
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=S, help=_h("seed of models, noise and data order", "seed"))
    g.add_argument("--device", default=S, help=_h("cpu, cuda, cuda:N or auto", "device"))
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads (default: torch's)")
    g.add_argument("--out", default=S, metavar="DIR", help="output folder (default: runs/gan/<dataset>-<d>-s<seed>)")
    g.add_argument("--ckpt-every", type=int, default=S, help=_h("checkpoint period in generator steps", "ckpt_every"))
    g.add_argument("--log-every", type=int, default=S, help=_h("CSV logging period in generator steps", "log_every"))
    g.add_argument("--spectra-every", type=int, default=S, help="D spectrum snapshot period (default: --log-every)")
    g.add_argument("--eval-every", type=int, default=S,
                   help=_h("period of the cheap mode-coverage evaluation during training (0: off)", "eval_every"))
    g.add_argument("--eval-every-samples", type=int, default=S,
                   help=_h("samples of that evaluation", "eval_every_samples"))
    g.add_argument("--stop-after", type=int, default=S,
                   help="stop (as if interrupted, no extra checkpoint) after this generator step; rerun to resume")
    g.add_argument("--resume", type=_bool, default=S, help=_h("resume from <out>/checkpoint.pt if present", "resume"))
    g.add_argument("--no-resume", dest="resume", action="store_false", default=S, help="start from scratch")
    g.add_argument("--progress", type=_bool, default=S, help=_h("tqdm progress bars", "progress"))
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = parser.add_argument_group("evaluation")
    g.add_argument("--metrics", default=S,
                   help=_h("final metrics, comma separated from modes, kid, fid, is (or 'none')", "metrics"))
    g.add_argument("--eval-samples", type=int, default=S,
                   help=_h("generated samples of the final evaluation", "eval_samples"))
    g.add_argument("--inception-samples", type=int, default=S,
                   help="generated and real samples for Inception KID/FID/IS (default: --eval-samples)")
    g.add_argument("--inception-weights", default=S, metavar="FILE",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth; enables IS (else 'unavailable')")
    g.add_argument("--inception-batch", type=int, default=S, help=_h("Inception batch size", "inception_batch"))
    g.add_argument("--cache-dir", default=S, metavar="DIR",
                   help="real-feature and classifier cache (default: <out>/cache)")
    g.add_argument("--classifier-epochs", type=int, default=S,
                   help=_h("epochs of the mode-coverage classifier", "classifier_epochs"))
    g.add_argument("--min-share", type=float, default=S,
                   help=_h("share of samples for a class to count as covered", "min_share"))
    g.add_argument("--eval-only", action="store_true", default=S,
                   help="do not train: evaluate the run in --out (its checkpoint) and update summary.json")


def add_gan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the GAN recipe's flags to ``parser`` (every default is ``SUPPRESS``: unset flags leave config values)."""
    g = parser.add_argument_group("config")
    g.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help="YAML or JSON file of settings; flags override it")
    _add_model_arguments(parser)
    _add_training_arguments(parser)
    _add_evaluation_arguments(parser)
    return parser


def load_config_file(path) -> dict:
    """Settings from a ``.yaml``/``.yml`` or ``.json`` mapping (``-`` in keys read as ``_``); unknown names raise."""
    return read_config_file(path, known=DEFAULTS)


def resolve_config(args=None, **overrides) -> dict:
    """Defaults < config file < ``args`` (argparse Namespace or mapping) < ``overrides``; derived values filled."""
    cfg, config_file = resolve_settings(DEFAULTS, args, overrides, where="run_gan")
    cfg["config"] = config_file
    return _validate(cfg)


#: The splits each dataset offers.
DATA_SPLITS = {"mnist5k": ("train", "test"), "cifar10": ("train", "test"), "stl10": ("train", "test", "unlabeled")}


def _validate(cfg: dict) -> dict:
    """Check every setting before any work starts (names, types, ranges) and fill the derived ones."""
    check_choice(cfg, "dataset", DATASETS)
    ds = cfg["dataset"]
    for key, default in (("preset", 48 if ds == "stl10" else 32), ("image_size", 48 if ds == "stl10" else 32),
                         ("data_split", "unlabeled" if ds == "stl10" else "train")):
        if cfg[key] is None:
            cfg[key] = default
    check_choice(cfg, "data_split", DATA_SPLITS[ds])
    for key, choices in (("d", D_VARIANTS), ("g", G_VARIANTS)):
        cfg[key] = str(cfg[key]).lower()
        check_choice(cfg, key, choices)
    for key, choices in (("preset", (32, 48)), ("init", INITS), ("penalty_kind", ("d_optimal", "divergence")),
                         ("lr_decay", ("linear", "none"))):
        check_choice(cfg, key, choices)
    for key in ("d_rank", "g_rank"):
        check_rank_setting(cfg, key)
    for key, minimum, optional in (
            ("steps", 1, False), ("n_dis", 1, False), ("batch_size", 1, False), ("d_reduce", 1, False),
            ("sr_every", 1, False), ("log_every", 1, False), ("nz", 1, False), ("image_size", 1, False),
            ("ngf", 1, True), ("ndf", 1, True), ("seed", 0, False), ("threads", 1, True), ("ckpt_every", 0, False),
            ("spectra_every", 1, True), ("eval_every", 0, False), ("eval_every_samples", 1, False),
            ("stop_after", 0, True), ("eval_samples", 1, False), ("inception_samples", 1, True),
            ("inception_batch", 1, False), ("classifier_epochs", 1, False)):
        check_integer(cfg, key, minimum, optional)
    check_number(cfg, "lr", 0, low_open=True)
    for key in ("beta1", "beta2"):
        check_number(cfg, key, 0, 1, high_open=True)
    check_number(cfg, "penalty_weight", 0)
    check_number(cfg, "min_share", 0, 1)
    for key in ("resume", "progress", "eval_only"):
        try:
            cfg[key] = _bool(cfg[key])
        except argparse.ArgumentTypeError:
            check_bool(cfg, key)
    check_device(cfg)
    cfg["metrics"] = _metrics(cfg["metrics"])
    return _fill_derived(cfg)


def _metrics(value) -> list:
    """The final metrics: a comma-separated string or a list, from modes, kid, fid, is ('none': no metric)."""
    if isinstance(value, str):
        value = [m.strip().lower() for m in value.split(",") if m.strip() and m.strip() != "none"]
    value = [str(m).lower() for m in (value or [])]
    bad = sorted(set(value) - {"modes", "kid", "fid", "is"})
    if bad:
        raise ValueError(f"unknown metrics {bad}; choose from modes, kid, fid, is, or none (flag --metrics)")
    return value


def _fill_derived(cfg: dict) -> dict:
    """The settings whose default depends on others: spectra_every, out, cache_dir, inception_samples."""
    if cfg["spectra_every"] is None:
        cfg["spectra_every"] = cfg["log_every"]
    if cfg["out"] is None:
        name = f"{cfg['dataset']}-p{cfg['preset']}-d{cfg['d']}" + \
            (f"-r{cfg['d_reduce']}" if cfg["d_reduce"] > 1 else "")
        name += (f"-g{cfg['g']}" if cfg["g"] != "plain" else "") + f"-s{cfg['seed']}"
        cfg["out"] = str(Path("runs") / "gan" / name)
    if cfg["cache_dir"] is None:
        cfg["cache_dir"] = str(Path(cfg["out"]) / "cache")
    if cfg["inception_samples"] is None:
        cfg["inception_samples"] = cfg["eval_samples"]
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


class ImageSource:
    """Training images with a resumable, seeded shuffling batch sampler (epochs of random permutations).

    In-memory datasets (mnist5k, CIFAR-10 uint8) are indexed directly; STL-10 is decoded per batch from its
    memory map.  ``state_dict()`` holds the generator state, the current permutation and the position in it.
    """

    def __init__(self, cfg: Mapping, seed: int):
        from .data import get_dataset, load_mnist5k

        ds, size = cfg["dataset"], cfg["image_size"]
        with explain_missing_data(ds, cfg["data_root"]):
            if ds == "mnist5k":
                self.dataset = load_mnist5k(image_size=size, split=cfg["data_split"])
            elif ds == "stl10":
                self.dataset = get_dataset("stl10", cfg["data_split"], cfg["data_root"], image_size=size)
            else:
                self.dataset = get_dataset(ds, cfg["data_split"], cfg["data_root"])
        self.n = len(self.dataset)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.pos = 0
        self.epoch = 0
        first = self.get(torch.arange(1))
        self.channels = int(first.shape[1])
        if first.shape[-1] != size:
            raise ValueError(f"{ds} images are {tuple(first.shape[-2:])}, expected {size}x{size}")

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        ds = self.dataset
        if hasattr(ds, "tensors"):
            return ds.tensors[0][idx]
        if hasattr(ds, "images") and getattr(ds.images, "dtype", None) == torch.uint8:
            return ds.images[idx].to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
        if hasattr(ds, "get_batch"):
            order = torch.argsort(idx)
            x, _ = ds.get_batch(idx[order].numpy())
            out = torch.empty_like(x)
            out[order] = x
            return out
        return torch.stack([ds[int(i)][0] for i in idx])

    def next(self, batch_size: int) -> torch.Tensor:
        if self.pos + batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
            self.epoch += 1
        idx = self.perm[self.pos:self.pos + batch_size]
        self.pos += batch_size
        return self.get(idx)

    def fixed(self, num: int, seed: int = 0) -> torch.Tensor:
        """``num`` real images of a fixed random subset (for FID/KID references)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.n, generator=g)[: min(num, self.n)]
        return torch.cat([self.get(c) for c in torch.split(idx, 1000)])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def _split_variant(variant: str):
    method, suffix = variant.split("-")
    spectrum = {"c": "identity", "l": "normalized", "r": "normalized"}[suffix]
    return method, spectrum, suffix == "r"


def build_models(cfg: Mapping, channels: int):
    """``(G, D, sr)`` built on the CPU from the settings (seeded by the caller); ``sr`` is the SR regularizer or None."""
    from .. import spectral
    from ..surgery import convert
    from .models import SNGAN_PRESETS, SNGANDiscriminator, SNGANGenerator

    preset = SNGAN_PRESETS[cfg["preset"]]
    ndf = int(cfg["ndf"] if cfg["ndf"] is not None else preset["ndf"])
    if ndf % cfg["d_reduce"]:
        raise ValueError(f"ndf={ndf} is not divisible by d_reduce={cfg['d_reduce']}")
    ndf //= cfg["d_reduce"]
    G = SNGANGenerator(cfg["preset"], nz=cfg["nz"], ngf=cfg["ngf"], channels=channels, image_size=cfg["image_size"])
    D = SNGANDiscriminator(cfg["preset"], ndf=ndf, channels=channels)
    sr = None
    if cfg["d"] == "sn":
        spectral.apply_spectral_norm(D)
    elif cfg["d"] == "sr":
        sr = spectral.apply_spectral_regularization(D, every=cfg["sr_every"], spectral_norm=True)
    elif cfg["d"] != "plain":
        method, spectrum, _ = _split_variant(cfg["d"])
        convert(D, method=method, rank=cfg["d_rank"], spectrum=spectrum, init=cfg["init"])
    if cfg["g"] != "plain":
        method, spectrum, _ = _split_variant(cfg["g"])
        convert(G, method=method, rank=cfg["g_rank"], spectrum=spectrum, init=cfg["init"], exclude=["noise_to_conv"])
    return G, D, sr


def _z(model: nn.Module) -> float:
    from ..surgery import converted_layers

    if not converted_layers(model):
        return 100.0
    from ..report import compression

    return float(compression(model))


@torch.no_grad()
def _spectra(model: nn.Module):
    """Snapshot {layer: sigma} in eval mode (no SN power iteration is triggered)."""
    from .. import spectral

    was = model.training
    model.eval()
    try:
        return spectral.snapshot_spectra(model)
    finally:
        model.train(was)


def _spectra_stats(snapshot: Mapping[str, torch.Tensor]) -> dict:
    mins, maxs, srs = [], [], []
    for s in snapshot.values():
        s = s.double()
        if s.numel() == 0 or float(s.max()) <= 0:
            continue
        mins.append(float(s.min() / s.max()))
        maxs.append(float(s.max()))
        srs.append(float((s ** 2).sum() / s.max() ** 2))
    if not mins:
        return {}
    return {"d_sigma_min": min(mins), "d_sigma_max": max(maxs), "d_stable_rank_mean": float(np.mean(srs))}


# ----------------------------------------------------------------------------------------------------------------------
# Run folder files
# ----------------------------------------------------------------------------------------------------------------------


def _dump_config(cfg: Mapping) -> str:
    try:
        import yaml

        return yaml.safe_dump(dict(cfg), sort_keys=False)
    except ImportError:  # pragma: no cover
        return json.dumps(dict(cfg), indent=2)


def _save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    import matplotlib.image

    x = ((images.clamp(-1, 1) + 1) / 2).cpu().numpy()
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = np.ones((rows * (h + 2) + 2, nrow * (w + 2) + 2, 3), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        img = np.repeat(x[i], 3, 0) if c == 1 else x[i]
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = img.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), grid)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def _hinge_d(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def _make_optimizers(cfg: Mapping, G: nn.Module, D: nn.Module, start_factor_steps: int):
    betas = (float(cfg["beta1"]), float(cfg["beta2"]))
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg["lr"], betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg["lr"], betas=betas)
    total = int(start_factor_steps)
    if cfg["lr_decay"] == "linear":
        def factor(step: int) -> float:
            return max(0.0, 1.0 - step / total)
    else:
        def factor(step: int) -> float:
            return 1.0
    sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
    sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, factor)
    return opt_g, opt_d, sch_g, sch_d


def reference_data_key(cfg: Mapping) -> dict:
    """Cache key of the real images that FID/KID compare against: ``ImageSource.fixed(n)`` of this dataset."""
    return dict(dataset=cfg["dataset"], split=cfg["data_split"], size=cfg["image_size"], seed=0)


class _Evaluator:
    """``evaluator(G, metrics, num, n_inception) -> dict``: the generator metrics, with the mode-coverage classifier
    and the Inception network loaded on first use."""

    def __init__(self, cfg: Mapping, source: ImageSource, device, channels: int):
        self.cfg, self.source, self.device, self.channels = cfg, source, device, channels
        self.data_key = reference_data_key(cfg)
        self.clf, self.clf_info, self.inception = None, None, None

    def classifier(self):
        """The mode-coverage classifier (trained once, cached), or None when it cannot be had."""
        from . import metrics as M

        cfg = self.cfg
        if self.clf_info is None:  # for stl10's unlabeled split, the labelled train split trains the classifier
            try:
                self.clf, self.clf_info = M.get_classifier(
                    cfg["dataset"], cfg["data_root"], cfg["image_size"], self.channels, cfg["cache_dir"], self.device,
                    epochs=cfg["classifier_epochs"], progress=cfg["progress"])
            except (OSError, ValueError) as e:
                self.clf, self.clf_info = None, {"error": str(e)}
        return self.clf

    def __call__(self, G, which: Sequence[str], num: int, n_inception: Optional[int] = None) -> dict:
        from . import metrics as M

        cfg = self.cfg
        clf = self.classifier() if "modes" in which else None
        if any(m in which for m in ("kid", "fid", "is")) and M.fid_helper_available() and self.inception is None:
            self.inception = M.InceptionFeatures(self.device, batch_size=cfg["inception_batch"],
                                                 inception_weights=cfg["inception_weights"], progress=cfg["progress"])
        res = M.evaluate_generator(
            G, self.source.fixed, self.data_key, metrics=which, num_samples=num, inception_samples=n_inception,
            cache_dir=cfg["cache_dir"], device=self.device, classifier=clf, inception=self.inception,
            min_share=cfg["min_share"], progress=cfg["progress"])
        if clf is not None:
            res["classifier_test_accuracy"] = self.clf_info.get("test_accuracy")
        return res


def _regularized(variant: str) -> bool:
    """Whether a ``-r`` variant adds the spectral penalty to its network's loss."""
    return "-" in variant and _split_variant(variant)[2]


class _Clock:
    """Wall time of a training session: its start, and the time and step of the last logged row."""

    def __init__(self, step: int) -> None:
        self.start = self.last = time.time()
        self.last_step = step


class _GanRun:
    """One GAN run: its settings, data, G and D with their optimizers and schedules, counters and run folder."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.out = Path(cfg["out"])
        self.device = select_device(cfg["device"])
        self.ckpt_path = self.out / "checkpoint.pt"
        saved = self._read_checkpoint()
        self._build()  # data and models before the folder: their errors leave nothing behind
        self.out.mkdir(parents=True, exist_ok=True)
        self.step, self.wall_before, self.history = 0, 0.0, []
        self.resumed = saved is not None
        if saved is not None:
            self._restore(saved)
        if not cfg["eval_only"]:
            write_text(self.out / "config.yaml", _dump_config(cfg))
        self.z_d, self.z_g = _z(self.D), _z(self.G)
        self.evaluate = _Evaluator(cfg, self.source, self.device, self.source.channels)

    def _read_checkpoint(self) -> Optional[dict]:
        cfg = self.cfg
        if (cfg["resume"] or cfg["eval_only"]) and self.ckpt_path.is_file():
            saved = load_state(self.ckpt_path)
            check_resumable(saved["config"], cfg, [k for k in DEFAULTS if k not in RESUMABLE_CHANGES],
                            self.ckpt_path)
            return saved
        if cfg["eval_only"]:
            raise FileNotFoundError(f"--eval-only: no checkpoint in {self.out}")
        return None

    def _build(self) -> None:
        """Seed, then build the data sampler, G, D, the optimizers, schedules and the noise generator."""
        cfg = self.cfg
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"] % (2**32))
        random.seed(cfg["seed"])
        self.source = ImageSource(cfg, seed=cfg["seed"] + 1)
        self.G, self.D, self.sr = build_models(cfg, self.source.channels)
        self.G.to(self.device)
        self.D.to(self.device)
        self.opt_g, self.opt_d, self.sch_g, self.sch_d = _make_optimizers(cfg, self.G, self.D, cfg["steps"])
        self.noise = torch.Generator().manual_seed(cfg["seed"] + 2)
        self.d_reg, self.g_reg = _regularized(cfg["d"]), _regularized(cfg["g"])
        # the -R penalty regularizes the learned spectra (paper §5): the converted layers only, not the layers a
        # recipe keeps dense (G's noise_to_conv), whose σ would need an SVD every step
        from ..surgery import converted_layers

        self.d_penalized = [n for n, _ in converted_layers(self.D)] if self.d_reg else []
        self.g_penalized = [n for n, _ in converted_layers(self.G)] if self.g_reg else []

    def _restore(self, saved: Mapping) -> None:
        for name, obj in (("G", self.G), ("D", self.D), ("opt_g", self.opt_g), ("opt_d", self.opt_d),
                          ("sch_g", self.sch_g), ("sch_d", self.sch_d), ("source", self.source)):
            obj.load_state_dict(saved[name])
        if self.sr is not None and saved.get("sr") is not None:
            self.sr.load_state_dict(saved["sr"])
        self.noise.set_state(saved["noise_gen"])
        set_rng_state(saved["rng"])
        self.step = int(saved["step"])
        self.wall_before = float(saved.get("wall_time", 0.0))
        self.history = list(saved.get("history", []))

    def save(self, wall: float) -> None:
        """Checkpoint: G, D, optimizers, schedules, SR state, data sampler, noise and RNG states, D's spectra."""
        save_state(self.ckpt_path, version=1, step=self.step, config=dict(self.cfg), G=self.G.state_dict(),
                   D=self.D.state_dict(), opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(),
                   sch_g=self.sch_g.state_dict(), sch_d=self.sch_d.state_dict(),
                   sr=self.sr.state_dict() if self.sr is not None else None, source=self.source.state_dict(),
                   noise_gen=self.noise.get_state(), wall_time=wall, history=self.history)

    # ---------------------------------------------------------------------------------------------- the steps
    def d_step(self, acc: dict) -> float:
        """One D update: hinge loss on a real batch and a batch of G's samples (one forward), plus the spectral
        penalty for a ``-r`` D; returns the hinge loss."""
        cfg, bs = self.cfg, self.cfg["batch_size"]
        real = self.source.next(bs).to(self.device, non_blocking=True)
        z = torch.randn(bs, cfg["nz"], generator=self.noise).to(self.device)
        with torch.no_grad():
            fake = self.G(z)
        logits = self.D(torch.cat([real, fake]))
        d_loss = _hinge_d(logits[:bs], logits[bs:])
        pen = None
        total = d_loss
        if self.d_reg:
            from .. import spectral

            pen = spectral.penalty(self.D, cfg["penalty_kind"], layers=self.d_penalized)
            total = d_loss + cfg["penalty_weight"] * pen
        self.opt_d.zero_grad(set_to_none=True)
        total.backward()
        self.opt_d.step()
        if self.sr is not None:
            self.sr.step()
        acc["d_loss"] += float(d_loss.detach())
        acc["d_real"] += float(logits[:bs].detach().mean())
        acc["d_fake"] += float(logits[bs:].detach().mean())
        acc["penalty"] += float(pen.detach()) if pen is not None else 0.0
        return float(d_loss.detach())

    def g_step(self, acc: dict) -> float:
        """One G update (−D(G(z)), plus the spectral penalty for a ``-r`` G), then both schedules step; returns the
        generator loss. D's gradients from this step are stale; they are zeroed before the next D update."""
        cfg = self.cfg
        z = torch.randn(cfg["batch_size"], cfg["nz"], generator=self.noise).to(self.device)
        g_loss = -self.D(self.G(z)).mean()
        g_total = g_loss
        if self.g_reg:
            from .. import spectral

            g_total = g_loss + cfg["penalty_weight"] * spectral.penalty(self.G, cfg["penalty_kind"],
                                                                        layers=self.g_penalized)
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward()
        self.opt_g.step()
        self.sch_g.step()
        self.sch_d.step()
        self.step += 1
        acc["g_loss"] += float(g_loss.detach())
        acc["n"] += 1
        return float(g_loss.detach())

    def log_row(self, acc: dict, clock: _Clock) -> dict:
        """The losses averaged since the last row, the learning rate and the timings; resets ``acc``."""
        cfg, now = self.cfg, time.time()
        k = max(acc["n"], 1)
        row = {"step": self.step, "d_loss": acc["d_loss"] / (k * cfg["n_dis"]), "g_loss": acc["g_loss"] / k,
               "d_real": acc["d_real"] / (k * cfg["n_dis"]), "d_fake": acc["d_fake"] / (k * cfg["n_dis"]),
               "penalty": acc["penalty"] / (k * cfg["n_dis"]), "lr": self.opt_g.param_groups[0]["lr"],
               "sec_per_step": (now - clock.last) / max(self.step - clock.last_step, 1),
               "wall_time": self.wall_before + now - clock.start}
        clock.last, clock.last_step = now, self.step
        for key in acc:
            acc[key] = 0.0
        return row

    def periodic(self, acc: dict, clock: _Clock) -> Optional[dict]:
        """After a G step: the log row, D's spectrum snapshot and the cheap evaluation, each on its period; returns
        the row to log (or None)."""
        cfg, step, last = self.cfg, self.step, self.step == self.cfg["steps"]
        row = self.log_row(acc, clock) if step % cfg["log_every"] == 0 or last else None
        if step % cfg["spectra_every"] == 0 or last:
            snap = _spectra(self.D)
            self.history.append((step, snap))
            if row is not None:
                row.update(_spectra_stats(snap))
        if cfg["eval_every"] and step % cfg["eval_every"] == 0:
            res = self.evaluate(self.G, ["modes"], cfg["eval_every_samples"])
            row = row or {"step": step}
            row.update({k: res.get(k, "") for k in ("modes_classes_covered", "modes_kl_uniform", "cfid", "ckid")})
            clock.last = time.time()  # seconds per step measure training only
        return row

    def train(self) -> str:
        """Train to ``steps`` generator updates, each after ``n_dis`` D updates, with the periodic rows, snapshots,
        evaluations and checkpoints; returns "stopped" when ``stop_after`` ended it early, else "finished"."""
        cfg = self.cfg
        log = MetricsLog(self.out / "metrics.csv", CSV_FIELDS, lineterminator="\r\n")
        log.start(keep_until=self.step if self.resumed else None)
        if self.step == 0:
            self.history.append((0, _spectra(self.D)))
        acc = {"d_loss": 0.0, "g_loss": 0.0, "d_real": 0.0, "d_fake": 0.0, "penalty": 0.0, "n": 0}
        bar = progress_bar(bool(cfg["progress"]), cfg["steps"], self.step, f"gan {cfg['d']}")
        clock = _Clock(self.step)
        self.G.train()
        self.D.train()
        try:
            while self.step < cfg["steps"]:
                for _ in range(cfg["n_dis"]):
                    d_loss = self.d_step(acc)
                g_loss = self.g_step(acc)
                if bar is not None:
                    bar.update(1)
                    if self.step % max(1, min(cfg["log_every"], 10)) == 0:
                        bar.set_postfix(d=f"{d_loss:.3f}", g=f"{g_loss:.3f}")
                row = self.periodic(acc, clock)
                if row is not None:
                    log.append(row)
                if (cfg["ckpt_every"] > 0 and self.step % cfg["ckpt_every"] == 0) or self.step == cfg["steps"]:
                    self.save(self.wall_before + time.time() - clock.start)
                if cfg["stop_after"] is not None and int(cfg["stop_after"]) <= self.step < cfg["steps"]:
                    return "stopped"
        finally:
            if bar is not None:
                bar.close()
        self.wall_before += time.time() - clock.start
        return "finished"

    # ------------------------------------------------------------------------------------------------ the end
    def _plot_spectra(self, final) -> dict:
        """``spectra_D.png`` and ``spectra_D_history.png``; a plotting error is returned, never raised."""
        from .. import spectral

        cfg = self.cfg
        try:
            title = f"D {cfg['d']} (seed {cfg['seed']}, step {self.step})"
            spectral.plot_spectra(final, self.out / "spectra_D.png", top_k=32, title=title)
            if len(self.history) > 1:
                spectral.plot_spectra(list(self.history), self.out / "spectra_D_history.png",
                                      title=f"D {cfg['d']} spectra over training")
        except Exception as e:  # plotting must never lose a finished run
            return {"plot_error": repr(e)}
        return {}

    def finish(self, status: str) -> dict:
        """The final evaluation and artifacts: ``summary.json``, the spectra plots, ``samples.png`` and
        ``generator.pt``; returns the summary."""
        from .metrics import sample_images

        cfg, G, D = self.cfg, self.G, self.D
        summary_path = self.out / "summary.json"
        summary = json.loads(summary_path.read_text()) if (cfg["eval_only"] and summary_path.is_file()) else {}
        t_eval = time.time()
        summary.update({
            "status": "partial" if self.step < cfg["steps"] else status, "step": self.step, "steps": cfg["steps"],
            "d": cfg["d"], "g": cfg["g"], "seed": cfg["seed"], "dataset": cfg["dataset"], "z_d": self.z_d,
            "z_g": self.z_g, "d_params": int(sum(p.numel() for p in D.parameters())),
            "g_params": int(sum(p.numel() for p in G.parameters())), "train_wall_time": self.wall_before,
            "device": str(self.device), "torch_threads": torch.get_num_threads(), "out": str(self.out),
        })
        final = _spectra(D)
        summary.update({f"final_{k}": v for k, v in _spectra_stats(final).items()})
        summary.update(self._plot_spectra(final))
        _save_grid(sample_images(G, 64, seed=777, device=self.device), self.out / "samples.png")
        if cfg["metrics"]:
            summary.update(self.evaluate(G, cfg["metrics"], cfg["eval_samples"], cfg["inception_samples"]))
        summary["eval_wall_time"] = time.time() - t_eval
        atomic_write(self.out / "generator.pt", lambda f: torch.save({"G": G.state_dict(), "config": cfg}, f))
        write_text(summary_path, json.dumps(summary, indent=2, default=float) + "\n")
        return summary


def run_gan(args=None, **overrides) -> dict:
    """Train (or resume, or only evaluate) one GAN run; returns the summary dict (also written to summary.json).

    ``args``: an argparse Namespace from a parser set up with :func:`add_gan_arguments`, or a mapping of settings.
    With ``stop_after`` set, returns ``{"status": "stopped", "step": ...}`` after that step (no extra checkpoint).
    """
    cfg = resolve_config(args, **overrides)
    with num_threads(cfg["threads"]):
        run = _GanRun(cfg)
        first, status = run.step, "finished"
        if not cfg["eval_only"] and run.step < cfg["steps"]:
            status = run.train()
        if status == "stopped":
            summary = RunSummary(status="stopped", step=run.step, out=str(run.out))
        else:
            summary = RunSummary(run.finish(status))
    summary.trained_steps, summary.total_steps = run.step - first, cfg["steps"]
    return summary


#: Final metrics named in the summary line, when the run computed them.
_LINE_METRICS = (("modes_classes_covered", "classes covered", "{:g}"), ("cfid", "cFID", "{:.2f}"),
                 ("kid", "KID", "{:.4f}"), ("fid", "FID", "{:.2f}"), ("is", "IS", "{:.2f}"))


def summary_line(summary: Mapping) -> str:
    """One line closing a run: its status and steps, the final metrics it has, and its folder."""
    steps = f"{summary['step']}/{getattr(summary, 'total_steps', summary.get('steps'))} generator steps"
    if summary["status"] == "stopped":
        return (f"gan: stopped after {steps} (resumes from the last checkpoint when run again); run folder "
                f"{summary['out']}")
    if summary["status"] == "finished" and getattr(summary, "trained_steps", 1) == 0:
        head = f"already complete ({steps}; nothing left to train, evaluated again)"
    else:
        head = f"{summary['status']} after {steps}"
    parts = [f"Z_D {summary['z_d']:.1f} %"]
    if isinstance(summary.get("final_d_sigma_min"), float):
        parts.append(f"min sigma/sigma_max of D {summary['final_d_sigma_min']:.3f}")
    parts += [f"{label} {fmt.format(summary[key])}" for key, label, fmt in _LINE_METRICS
              if isinstance(summary.get(key), (int, float))]
    return f"gan {summary['d']}: {head}: {', '.join(parts)}; run folder {summary['out']}"


SUMMARY_COLUMNS = [
    ("z_d", "Z_D %", 1, 1.0), ("modes_classes_covered", "classes", 1, 1.0), ("modes_kl_uniform", "KL(p‖U)", 3, 1.0),
    ("cfid", "cFID", 2, 1.0), ("ckid", "cKIDx100", 2, 100.0), ("fid", "FID", 1, 1.0), ("kid", "KIDx100", 2, 100.0),
    ("final_d_sigma_min", "min sigma/sigma_max (D)", 3, 1.0), ("final_d_stable_rank_mean", "mean stable rank (D)", 2, 1.0),
    ("train_wall_time", "train s", 0, 1.0),
]


INCEPTION_KEYS = ("fid", "kid", "is")


def summarize_runs(root, inception_samples: Optional[int] = None) -> str:
    """Markdown table (mean +- std over seeds) of every finished run below ``root`` (``*/summary.json``).

    Runs are grouped by (discriminator reduction, variant, generator variant, steps); ``n`` is the number of seeds.
    With ``inception_samples``, Inception metrics (FID, KID, IS) come only from runs evaluated on that many samples,
    and the column ``n (Inception)`` counts them; values on other sample counts are never averaged in.
    """
    groups: Dict[tuple, list] = {}
    for path in sorted(Path(root).glob("*/summary.json")):
        s = json.loads(path.read_text())
        cfg_path = path.parent / "config.yaml"
        reduce = 1
        if cfg_path.is_file():
            import yaml

            reduce = int((yaml.safe_load(cfg_path.read_text()) or {}).get("d_reduce", 1))
        key = (reduce, s.get("d"), s.get("g"), s.get("steps"))
        groups.setdefault(key, []).append(s)
    head = ["D", "variant", "G", "steps", "n"] + [c[1] for c in SUMMARY_COLUMNS]
    if inception_samples is not None:
        head.insert(5, f"n (Inception, {inception_samples} samples)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (reduce, d, g, steps), runs in sorted(groups.items(), key=lambda kv: (-kv[0][0], str(kv[0][1]))):
        cells = [f"reduced /{reduce}" if reduce > 1 else "full", str(d).upper(), str(g), str(steps), str(len(runs))]
        scored = runs
        if inception_samples is not None:
            scored = [r for r in runs if r.get("inception_samples") == inception_samples
                      and isinstance(r.get("kid", r.get("fid")), (int, float))]
            cells.append(str(len(scored)))
        for key, _, digits, scale in SUMMARY_COLUMNS:
            source = scored if key in INCEPTION_KEYS else runs
            vals = [float(r[key]) * scale for r in source if isinstance(r.get(key), (int, float))]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.{digits}f}")
            else:
                cells.append(f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(root, path, keys: Sequence[str] = ("d_sigma_min", "modes_classes_covered", "cfid", "g_loss"),
                title: Optional[str] = None) -> str:
    """Training curves of the runs below ``root`` (``*/metrics.csv``), mean over seeds per variant, one panel per key.

    Returns ``path``.  Variants are labelled like the tables (``reduced /4 SN``, ``full STTP-R``...).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves: Dict[str, Dict[str, Dict[int, list]]] = {}
    for csv_path in sorted(Path(root).glob("*/metrics.csv")):
        summary = csv_path.parent / "summary.json"
        cfg_path = csv_path.parent / "config.yaml"
        if not summary.is_file() or not cfg_path.is_file():
            continue
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        label = ("reduced /%d " % cfg["d_reduce"] if int(cfg.get("d_reduce", 1)) > 1 else "full ") + str(cfg["d"]).upper()
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                for key in keys:
                    if row.get(key) not in (None, ""):
                        curves.setdefault(label, {}).setdefault(key, {}).setdefault(int(row["step"]), []).append(
                            float(row[key]))
    fig = Figure(figsize=(4.2 * len(keys), 3.6))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for label in sorted(curves):
            pts = curves[label].get(key)
            if not pts:
                continue
            steps = sorted(pts)
            style = "--" if label.startswith("reduced") else "-"
            ax.plot(steps, [float(np.mean(pts[s])) for s in steps], style, marker="." if len(steps) < 8 else None,
                    label=label, linewidth=1.2)
        ax.set_xlabel("generator step")
        ax.set_title(key, fontsize=9)
        if key in ("d_sigma_min",):
            ax.set_yscale("log")
        if i == 0:
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    return str(path)


def plot_samples_montage(run_dirs: Sequence, labels: Sequence[str], path, columns: int = 4, num: int = 16) -> str:
    """One figure with the first ``num`` images of each run's ``samples.png`` grid, titled by ``labels``."""
    import matplotlib.image
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = (len(run_dirs) + columns - 1) // columns
    fig = Figure(figsize=(2.2 * columns, 2.4 * rows))
    FigureCanvasAgg(fig)
    for i, (d, label) in enumerate(zip(run_dirs, labels)):
        ax = fig.add_subplot(rows, columns, i + 1)
        img = matplotlib.image.imread(str(Path(d) / "samples.png"))
        side = int(round(math.sqrt(num)))
        cell = (img.shape[1] - 2) // 8  # samples.png is an 8-wide grid with 2-pixel borders
        ax.imshow(img[: 2 + side * cell, : 2 + side * cell])
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--summarize"]:
        summary = argparse.ArgumentParser(prog="python -m torch_sttp.experiments.gan --summarize",
                                          description="markdown tables of the finished runs below ROOT")
        summary.add_argument("root")
        summary.add_argument("--plot", default=None, help="also plot the training curves to this PNG")
        summary.add_argument("--inception-samples", type=int, default=None,
                             help="take FID/KID/IS only from runs evaluated on this many samples")
        opts = summary.parse_args(argv[1:])
        print(summarize_runs(opts.root, opts.inception_samples))
        if opts.plot:
            plot_curves(opts.root, opts.plot)
        return 0
    return recipe_main(argv, "python -m torch_sttp.experiments.gan", __doc__.split("\n\n")[0], add_gan_arguments,
                       run_gan, _result_line, epilog=SUMMARIZE_HELP, exit_code=lambda _result: 0)


SUMMARIZE_HELP = ("Also: --summarize ROOT [--plot CURVES.png] [--inception-samples N] prints a markdown table of the "
                  "finished runs below ROOT (and plots their training curves).")


def _result_line(res: dict) -> str:
    keys = ["status", "step", "z_d", "modes_classes_covered", "modes_kl_uniform", "cfid", "kid", "fid", "is"]
    return json.dumps({k: res[k] for k in keys if k in res}, default=float)


if __name__ == "__main__":
    sys.exit(main())
