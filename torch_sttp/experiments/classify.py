"""Classification recipe: train a dense, SN, SR, SVDP or STTP classifier; checkpoints, exact resume, CSV/JSON logs.

    sttp train classify --dataset mnist1d --model cnn1d --method sttp --rank 8 --epochs 10
    sttp train classify --config configs/classify/wrn28-10-cifar10.yaml --data-root ~/data --rank 32
    python -m torch_sttp.experiments.classify --dataset digits8x8 --method svdp --rank 4 --steps 200

Settings come from three layers, later ones winning: the built-in defaults (:data:`DEFAULTS`), a YAML or JSON file
given with ``--config`` (keys are the option names, ``-`` or ``_``), and the flags given on the command line. The
resolved settings are written to ``<out>/config.json``.

Methods
    ``dense`` plain layers; ``sn`` spectral normalization of the selected layers; ``sr`` SN plus spectral
    regularization (dynamic spectrum compensation every ``sr_every`` steps); ``svdp`` / ``sttp`` the layers are
    reparameterized with rank cap ``rank`` and spectrum ``spectrum`` (``identity``, ``normalized`` — learned, with
    σ_max = 1 — or ``free``). ``penalty`` adds ``penalty_weight`` × a spectral regularizer (``d_optimal``: −mean log σ̂,
    paper eq. 10; ``divergence``) to the loss. By default the first convolution of the model is kept dense
    (``exclude``), as in the paper's WRN experiment; ``exclude: []`` converts every supported layer.

Training
    ``steps`` (or ``epochs``, converted to steps with the last incomplete batch of an epoch dropped) optimizer steps
    of SGD (momentum, optional Nesterov) or Adam; the learning rate follows ``schedule`` (``linear`` decay to 0 at the
    last step as in the paper, ``cosine`` or ``constant``) after ``warmup`` linear warm-up steps. ``weight_decay``
    applies to biases, normalization layers and layers left dense; it is never applied to the Householder reflectors
    nor to a normalized (scale-invariant) spectrum (paper supplement §9), and applied to a ``free`` spectrum.
    The sample order of epoch e is a fixed function of (seed, e), and augmentation (``augment``: random crop with
    4-pixel padding and horizontal flip, for images) of (seed, step), so the data stream needs no saved state.

Outputs under ``out`` (default ``runs/classify/<dataset>-<model>-<method>[-r<rank>]-s<seed>``)
    ``config.json``; ``metrics.csv`` (one row every ``eval_every`` steps and at the end: :data:`METRIC_COLUMNS`);
    ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end (model, optimizer, scheduler, SR state, RNG
    states, counters; written to a temporary file then ``os.replace``-d, read with ``torch.load(weights_only=True)``);
    ``summary.json`` at the end (:data:`SUMMARY_KEYS`).

Resuming
    Run the same command again: a run whose ``out`` holds a checkpoint continues from it (``--no-resume`` starts
    over) and, on CPU, ends bit-identical to an uninterrupted run — parameters, optimizer state and logged metrics.
    The settings that define the run must match the checkpoint's (``steps``/``epochs`` may grow; with the default
    linear or cosine schedule that changes the learning-rate curve from the checkpoint on, a warning says so).
    ``stop_at`` ends a run early at that step, checkpointed, as an interruption would; SIGINT/SIGTERM also stop
    after the current step with a checkpoint (a second SIGINT aborts at once).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write

__all__ = [
    "DEFAULTS",
    "METHODS",
    "MODELS",
    "DATASETS",
    "METRIC_COLUMNS",
    "SUMMARY_KEYS",
    "Summary",
    "add_classify_arguments",
    "resolve_config",
    "load_config_file",
    "run_classify",
    "main",
]

METHODS = ("dense", "sn", "sr", "svdp", "sttp")
MODELS = ("small-cnn", "cnn1d", "wrn")
DATASETS = ("mnist5k", "mnist1d", "digits8x8", "cifar10")
PENALTIES = ("none", "d_optimal", "divergence")
SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("sgd", "adam")

#: The first convolution of each model, kept dense by default.
FIRST_LAYER = {"small-cnn": "conv1", "cnn1d": "conv1", "wrn": "conv_in"}

DEFAULTS: dict[str, Any] = {
    "method": "dense",
    "rank": 8,
    "spectrum": "normalized",
    "init": "noisy_identity",
    "exclude": None,  # None: the model's first convolution (FIRST_LAYER); [] converts every supported layer
    "penalty": "none",
    "penalty_weight": 0.0,
    "sr_every": 1,
    "dataset": "digits8x8",
    "data_root": None,
    "data_seed": 0,
    "image_size": None,
    "augment": False,
    "model": "small-cnn",
    "width": None,
    "depth": 28,
    "widen": 10,
    "dropout": 0.0,
    "steps": None,
    "epochs": 10,
    "batch": 64,
    "eval_batch": 500,
    "optimizer": "adam",
    "lr": 3e-3,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "linear",
    "warmup": 0,
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "deterministic": False,
    "out": None,
    "eval_every": None,  # None: once per epoch
    "checkpoint_every": None,  # None: once per epoch
    "resume": True,
    "stop_at": None,
    "progress": True,
}

#: Keys that may differ between a checkpoint and the run resuming it.
_RESUMABLE_CHANGES = {"steps", "epochs", "device", "threads", "out", "eval_every", "checkpoint_every", "resume",
                      "stop_at", "progress", "data_root", "eval_batch"}

METRIC_COLUMNS = ("step", "epoch", "lr", "train_loss", "train_acc", "penalty", "test_loss", "test_acc", "elapsed_s")
SUMMARY_KEYS = ("status", "method", "rank", "spectrum", "penalty", "penalty_weight", "dataset", "model", "seed",
                "steps", "epochs", "accuracy", "best_accuracy", "test_loss", "train_loss", "z", "dof",
                "dense_params", "trainable_params", "wall_time_s", "out", "metrics_csv", "checkpoint", "config")

_CKPT = "checkpoint.pt"
_CSV = "metrics.csv"
_SUMMARY = "summary.json"
_CONFIG = "config.json"


class Summary(dict):
    """The summary of a run (a dict, also written to ``summary.json``); ``int(summary)`` is the exit status."""

    def __int__(self) -> int:
        return int(self.get("exit_code", 0))


# ------------------------------------------------------------------------------------------------------------ config
def _help(text: str, key: str) -> str:
    return f"{text} (default: {DEFAULTS[key]!r})"


def add_classify_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the recipe's options to ``parser``. Options left out on the command line fall back to ``--config`` and
    then to :data:`DEFAULTS` (they are absent from the parsed namespace)."""
    S = argparse.SUPPRESS
    g = parser.add_argument_group("run")
    g.add_argument("--config", default=S, metavar="FILE", help="YAML or JSON file of settings; flags override it")
    g.add_argument("--out", default=S, metavar="DIR", help="output folder (default: runs/classify/<name>)")
    g.add_argument("--seed", type=int, default=S, help=_help("seed of init, sample order, augmentation", "seed"))
    g.add_argument("--device", default=S, help=_help("cpu, cuda, cuda:N or auto", "device"))
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=S,
                   help=_help("torch.use_deterministic_algorithms (for CUDA runs)", "deterministic"))
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=S,
                   help=_help("continue from <out>/checkpoint.pt when present", "resume"))
    g.add_argument("--stop-at", type=int, default=S, metavar="STEP",
                   help="stop (checkpointed, resumable) once this global step is reached")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help=_help("tqdm bar", "progress"))
    g.add_argument("--eval-every", type=int, default=S, metavar="STEPS", help="evaluate/log every N steps "
                   "(default: once per epoch)")
    g.add_argument("--checkpoint-every", type=int, default=S, metavar="STEPS", help="checkpoint every N steps "
                   "(default: once per epoch)")

    g = parser.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default=S, help=_help("layer treatment", "method"))
    g.add_argument("--rank", type=int, default=S, help=_help("rank cap r of SVDP/STTP", "rank"))
    g.add_argument("--spectrum", choices=("identity", "normalized", "free"), default=S,
                   help=_help("SVDP/STTP spectrum", "spectrum"))
    g.add_argument("--init", choices=("noisy_identity", "identity", "random", "pretrained"), default=S,
                   help=_help("SVDP/STTP frame init", "init"))
    g.add_argument("--exclude", nargs="*", default=S, metavar="GLOB",
                   help="layers kept dense (qualified-name globs; default: the model's first convolution; "
                        "give the flag with no value to convert all)")
    g.add_argument("--penalty", choices=PENALTIES, default=S, help=_help("spectral penalty", "penalty"))
    g.add_argument("--penalty-weight", type=float, default=S, help=_help("weight of the penalty", "penalty_weight"))
    g.add_argument("--sr-every", type=int, default=S, help=_help("SR compensation period in steps", "sr_every"))

    g = parser.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default=S, help=_help("data set", "dataset"))
    g.add_argument("--data-root", default=S, metavar="DIR",
                   help="folder holding cifar-10-batches-bin (default: $TORCH_STTP_DATA or ./data)")
    g.add_argument("--data-seed", type=int, default=S, help=_help("seed of the train/test split", "data_seed"))
    g.add_argument("--image-size", type=int, default=S, help="mnist5k image size, 28 or 32 (default: 28)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=S,
                   help=_help("random crop (pad 4) + horizontal flip of images", "augment"))
    g.add_argument("--model", choices=MODELS + ("wrn28-10",), default=S, help=_help("architecture", "model"))
    g.add_argument("--width", type=int, default=S, help="base width of small-cnn (16) / cnn1d (32)")
    g.add_argument("--depth", type=int, default=S, help=_help("WRN depth (6n+4)", "depth"))
    g.add_argument("--widen", type=int, default=S, help=_help("WRN widening factor", "widen"))
    g.add_argument("--dropout", type=float, default=S, help=_help("WRN dropout", "dropout"))

    g = parser.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=S, help="optimizer steps (overrides epochs)")
    g.add_argument("--epochs", type=float, default=S, help=_help("epochs, if steps is not given", "epochs"))
    g.add_argument("--batch", type=int, default=S, help=_help("training batch size", "batch"))
    g.add_argument("--eval-batch", type=int, default=S, help=_help("evaluation batch size", "eval_batch"))
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help=_help("optimizer", "optimizer"))
    g.add_argument("--lr", type=float, default=S, help=_help("peak learning rate", "lr"))
    g.add_argument("--momentum", type=float, default=S, help=_help("SGD momentum", "momentum"))
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S, help=_help("Nesterov", "nesterov"))
    g.add_argument("--weight-decay", type=float, default=S, help=_help("weight decay (see docs)", "weight_decay"))
    g.add_argument("--schedule", choices=SCHEDULES, default=S, help=_help("learning-rate schedule", "schedule"))
    g.add_argument("--warmup", type=int, default=S, help=_help("linear warm-up steps", "warmup"))
    return parser


def load_config_file(path) -> dict:
    """Settings from a ``.yaml``/``.yml`` or ``.json`` file (a mapping; ``-`` in keys read as ``_``)."""
    path = Path(path).expanduser()
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is in the experiments extra
            raise ImportError("reading a YAML config needs pyyaml (pip install pyyaml), or use a .json file") from e
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_keys(settings: Mapping, where: str) -> None:
    unknown = sorted(k for k in set(settings) - set(DEFAULTS) if not str(k).startswith("_"))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; valid: {sorted(DEFAULTS)}")


def _layer(cfg: dict, settings: Mapping) -> None:
    """Put one layer of settings on top of ``cfg``; a layer that sets steps (epochs) clears epochs (steps)."""
    settings = dict(settings)
    if settings.get("steps") is not None and settings.get("epochs") is not None:
        raise ValueError("give either steps or epochs, not both")
    if settings.get("steps") is not None:
        cfg["epochs"] = None
    if settings.get("epochs") is not None:
        cfg["steps"] = None
    cfg.update(settings)


def resolve_config(args=None, **overrides) -> dict:
    """The full settings of a run: :data:`DEFAULTS` < ``config`` file < ``args`` (a namespace from
    :func:`add_classify_arguments` or a mapping) < ``overrides``. Unknown keys raise ``ValueError``."""
    if args is None:
        given = {}
    elif isinstance(args, argparse.Namespace):
        given = dict(vars(args))
    else:
        given = dict(args)
    given = {str(k).replace("-", "_"): v for k, v in given.items()}
    given.update({k.replace("-", "_"): v for k, v in overrides.items()})
    config_path = given.pop("config", None)
    # keys the CLI adds around the recipe (subcommand names, the handler) are not settings
    for k in ("func", "command", "recipe"):
        given.pop(k, None)
    if not isinstance(args, argparse.Namespace):
        _check_keys(given, "run_classify")
    else:
        given = {k: v for k, v in given.items() if k in DEFAULTS}
    cfg = dict(DEFAULTS)
    if config_path:
        file_settings = load_config_file(config_path)
        _check_keys(file_settings, f"config file {config_path}")
        _layer(cfg, file_settings)
        cfg["_config_file"] = str(config_path)
    _layer(cfg, given)
    return _validate(cfg)


def _validate(cfg: dict) -> dict:
    if cfg["model"] == "wrn28-10":
        cfg["model"] = "wrn"
    for key, allowed in (("method", METHODS), ("model", MODELS), ("dataset", DATASETS), ("penalty", PENALTIES),
                         ("schedule", SCHEDULES), ("optimizer", OPTIMIZERS),
                         ("spectrum", ("identity", "normalized", "free"))):
        if cfg[key] not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {cfg[key]!r}")
    if cfg["penalty"] is None:
        cfg["penalty"] = "none"
    if cfg["steps"] is None and cfg["epochs"] is None:
        raise ValueError("give steps or epochs")
    if cfg["steps"] is not None and int(cfg["steps"]) < 1:
        raise ValueError(f"steps must be ≥ 1, got {cfg['steps']}")
    if cfg["epochs"] is not None and float(cfg["epochs"]) <= 0:
        raise ValueError(f"epochs must be > 0, got {cfg['epochs']}")
    if int(cfg["rank"]) < 1:
        raise ValueError(f"rank must be ≥ 1, got {cfg['rank']}")
    if int(cfg["batch"]) < 1:
        raise ValueError(f"batch must be ≥ 1, got {cfg['batch']}")
    if isinstance(cfg["exclude"], str):
        cfg["exclude"] = [cfg["exclude"]]
    return cfg


def _run_name(cfg: Mapping) -> str:
    name = f"{cfg['dataset']}-{cfg['model']}-{cfg['method']}"
    if cfg["method"] in ("svdp", "sttp"):
        name += f"-r{cfg['rank']}"
    return name + f"-s{cfg['seed']}"


# -------------------------------------------------------------------------------------------------------------- data
class _Data:
    """A data set held as tensors: ``x`` (float32, or uint8 images scaled on access) and ``y`` (int64)."""

    def __init__(self, dataset) -> None:
        if hasattr(dataset, "tensors"):
            self.x, self.y = dataset.tensors[0], dataset.tensors[1]
            self.uint8 = False
        elif hasattr(dataset, "images") and hasattr(dataset, "labels"):
            self.x, self.y = dataset.images, dataset.labels
            self.uint8 = True
        else:
            items = [dataset[i] for i in range(len(dataset))]
            self.x = torch.stack([torch.as_tensor(a) for a, _ in items])
            self.y = torch.as_tensor([int(b) for _, b in items], dtype=torch.int64)
            self.uint8 = False

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[idx]
        if self.uint8:
            x = x.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
        return x.to(device), self.y[idx].to(device)


def _load_data(cfg: Mapping) -> tuple[_Data, _Data]:
    from .data import DatasetFilesNotFoundError, get_dataset

    name = cfg["dataset"]
    kw: dict[str, Any] = {}
    if name in ("mnist5k", "digits8x8", "mnist1d"):
        kw["seed"] = int(cfg["data_seed"])
    if name == "mnist5k" and cfg["image_size"] is not None:
        kw["image_size"] = int(cfg["image_size"])
    try:
        train = get_dataset(name, "train", root=cfg["data_root"], **kw)
        test = get_dataset(name, "test", root=cfg["data_root"], **kw)
    except DatasetFilesNotFoundError as e:
        where = cfg["data_root"] or os.environ.get("TORCH_STTP_DATA") or "./data"
        raise DatasetFilesNotFoundError(
            f"dataset {name!r} is not available locally (looked under {str(where)!r}). Put the files there, or "
            f"point --data-root (config key data_root, or $TORCH_STTP_DATA) at the folder that holds them. "
            f"Details: {e}", getattr(e, "filename", None)) from None
    return _Data(train), _Data(test)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4 zero-padded pixels (in the [-1, 1] scale: padding −1) and random horizontal flip."""
    b, c, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)[None]
    cols = ox[:, None] + torch.arange(w, device=x.device)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), for per-epoch / per-step generators."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 1, epoch)))


# ------------------------------------------------------------------------------------------------------------- model
def _build_model(cfg: Mapping, sample_x: torch.Tensor) -> nn.Module:
    from .models import build_model

    name = cfg["model"]
    if name == "small-cnn":
        if sample_x.dim() != 3:
            raise ValueError(f"small-cnn needs images (C, H, W), dataset {cfg['dataset']} gives {tuple(sample_x.shape)}")
        kw = {"in_channels": int(sample_x.shape[0])}
        if cfg["width"]:
            kw["width"] = int(cfg["width"])
        return build_model("small-cnn", num_classes=10, **kw)
    if name == "cnn1d":
        if sample_x.dim() not in (1, 2) or (sample_x.dim() == 2 and sample_x.shape[0] != 1):
            raise ValueError(f"cnn1d needs sequences (1, L), dataset {cfg['dataset']} gives {tuple(sample_x.shape)}")
        kw = {"length": int(sample_x.shape[-1])}
        if cfg["width"]:
            kw["width"] = int(cfg["width"])
        return build_model("cnn1d", num_classes=10, **kw)
    if sample_x.dim() != 3:
        raise ValueError(f"wrn needs images (C, H, W), dataset {cfg['dataset']} gives {tuple(sample_x.shape)}")
    return build_model("wrn28-10", depth=int(cfg["depth"]), widen=int(cfg["widen"]), num_classes=10,
                       in_channels=int(sample_x.shape[0]), dropout=float(cfg["dropout"]))


def _exclude(cfg: Mapping) -> list:
    return list(cfg["exclude"]) if cfg["exclude"] is not None else [FIRST_LAYER[cfg["model"]]]


def _apply_method(model: nn.Module, cfg: Mapping):
    """Reparameterize / normalize ``model`` in place; returns the SR regularizer or None."""
    method, exclude = cfg["method"], _exclude(cfg) or None
    if method in ("svdp", "sttp"):
        from ..surgery import convert

        gen = torch.Generator().manual_seed(_mix(cfg["seed"], 2))
        convert(model, method=method, rank=int(cfg["rank"]), spectrum=cfg["spectrum"], init=cfg["init"],
                exclude=exclude, generator=gen)
    elif method == "sn":
        from ..spectral import apply_spectral_norm

        apply_spectral_norm(model, exclude=exclude)
    elif method == "sr":
        from ..spectral import apply_spectral_regularization

        return apply_spectral_regularization(model, every=int(cfg["sr_every"]), exclude=exclude)
    return None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on reflectors nor on a normalized/identity spectrum; ``weight_decay`` on everything else."""
    from ..surgery import converted_layers, spectral_parametrization

    spectral_ids, free_ids = set(), set()
    for _, m in converted_layers(model):
        plist = m.parametrizations["weight"]
        p = spectral_parametrization(m)
        for pname, t in plist.named_parameters(recurse=False):
            spectral_ids.add(id(t))
            if pname == "original2" and getattr(p, "spectrum", None) == "free":
                free_ids.add(id(t))
    decay, no_decay, seen = [], [], set()
    for t in model.parameters():
        if id(t) in seen or not t.requires_grad:
            continue
        seen.add(id(t))
        (no_decay if id(t) in spectral_ids and id(t) not in free_ids else decay).append(t)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _make_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    groups = _param_groups(model, float(cfg["weight_decay"]))
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                               nesterov=bool(cfg["nesterov"]) and float(cfg["momentum"]) > 0)
    return torch.optim.Adam(groups, lr=float(cfg["lr"]))


def _lr_factor(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        return 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return factor


def _model_counts(model: nn.Module, cfg: Mapping, dense_params: int) -> tuple[float, int]:
    """(Z in percent, parameter count in the paper's convention) of the trained model."""
    if cfg["method"] in ("svdp", "sttp"):
        from ..report import report

        rep = report(model, print_table=False).to_dict()
        return float(rep["z"]), int(rep["params_compressed"])
    return 100.0, dense_params


# ----------------------------------------------------------------------------------------------------- checkpoints
def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "state": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(cfg: Mapping) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _check_resume(saved: Mapping, cfg: Mapping, path: Path) -> None:
    diffs = [k for k in DEFAULTS if k not in _RESUMABLE_CHANGES and saved.get(k) != _jsonable(cfg).get(k)]
    if diffs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {cfg.get(k)!r}" for k in diffs)
        raise ValueError(f"{path} was written by a run with other settings ({detail}); use another --out, "
                         "--no-resume to start over, or the checkpoint's settings")


# --------------------------------------------------------------------------------------------------- CSV / signals
def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(f):
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in METRIC_COLUMNS})
        f.write(buf.getvalue().encode())
    atomic_write(path, write)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
        f.flush()


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (main thread only)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - e.g. embedded interpreters
                    pass
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step with a checkpoint (SIGINT again aborts)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@contextmanager
def _num_threads(n):
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


# ----------------------------------------------------------------------------------------------------------- train
@torch.no_grad()
def _evaluate(model: nn.Module, data: _Data, batch: int, device) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    n = len(data)
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch))
        x, y = data.batch(idx, device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return loss_sum / n, correct / n


def run_classify(args=None, **overrides) -> Summary:
    """Train (or resume) one classification run; returns its summary (also written to ``<out>/summary.json``).

    ``args``: a namespace from :func:`add_classify_arguments`, a mapping of settings, or None; keyword arguments
    override both (e.g. ``run_classify(config="run.yaml", seed=3)``). See the module docstring.
    """
    cfg = resolve_config(args, **overrides)
    with _num_threads(cfg["threads"]):
        return _run(cfg)


def _run(cfg: dict) -> Summary:
    device = _device(cfg["device"])
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    out = Path(cfg["out"] or Path("runs") / "classify" / _run_name(cfg)).expanduser()
    cfg["out"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, csv_path, summary_path = out / _CKPT, out / _CSV, out / _SUMMARY

    train_data, test_data = _load_data(cfg)
    n_train = len(train_data)
    batch = min(int(cfg["batch"]), n_train)
    steps_per_epoch = max(1, n_train // batch)
    total = int(cfg["steps"]) if cfg["steps"] is not None else max(1, round(float(cfg["epochs"]) * steps_per_epoch))
    eval_every = int(cfg["eval_every"] or steps_per_epoch)
    ckpt_every = int(cfg["checkpoint_every"] or steps_per_epoch)
    stop_at = min(total, int(cfg["stop_at"])) if cfg["stop_at"] is not None else total

    seed = int(cfg["seed"])
    torch.manual_seed(_mix(seed, 0))
    np.random.seed(_mix(seed, 3) % (2 ** 32))
    random.seed(_mix(seed, 4))
    model = _build_model(cfg, train_data.x[0] if not train_data.uint8 else train_data.x[0].float())
    from .models import state_dict_numel

    dense_params = state_dict_numel(model)
    regularizer = _apply_method(model, cfg)
    model.to(device)
    optimizer = _make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg["schedule"], int(cfg["warmup"]), total))
    penalty_fn = None
    if cfg["penalty"] != "none" and float(cfg["penalty_weight"]) != 0.0:
        from ..spectral import penalty as spectral_penalty

        def penalty_fn(m):
            return spectral_penalty(m, cfg["penalty"])

    step, elapsed, best_acc = 0, 0.0, None
    window = {"loss": 0.0, "penalty": 0.0, "correct": 0, "seen": 0, "batches": 0}
    resumed = False
    if cfg["resume"] and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_resume(state["config"], cfg, ckpt_path)
        if state["total_steps"] != total and cfg["schedule"] != "constant":
            warnings.warn(f"resuming a {state['total_steps']}-step run as a {total}-step run: the {cfg['schedule']} "
                          "learning-rate schedule is stretched from the checkpoint on", UserWarning, stacklevel=2)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if regularizer is not None and state.get("regularizer") is not None:
            regularizer.load_state_dict(state["regularizer"])
        step, elapsed, best_acc = int(state["step"]), float(state["elapsed"]), state["best_acc"]
        window = dict(state["window"])
        _set_rng_state(state["rng"])
        # rows logged after the checkpoint belong to the lost part of the interrupted run
        _write_csv(csv_path, [r for r in _read_csv(csv_path) if int(r["step"]) <= step])
        resumed = True
    else:
        if csv_path.exists():
            csv_path.unlink()
        if summary_path.exists():
            summary_path.unlink()
    _atomic_write_text(out / _CONFIG, json.dumps(_jsonable(cfg), indent=2) + "\n")

    def save_checkpoint() -> None:
        state = {
            "version": 1,
            "step": step,
            "total_steps": total,
            "elapsed": elapsed,
            "best_acc": best_acc,
            "window": dict(window),
            "config": _jsonable(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "regularizer": regularizer.state_dict() if regularizer is not None else None,
            "rng": _rng_state(),
        }
        atomic_write(ckpt_path, lambda f: torch.save(state, f))

    last_row: dict = {}
    rows = _read_csv(csv_path) if resumed else []
    if rows:
        last_row = rows[-1]

    def log_row() -> dict:
        nonlocal best_acc
        test_loss, test_acc = _evaluate(model, test_data, int(cfg["eval_batch"]), device)
        best_acc = test_acc if best_acc is None else max(best_acc, test_acc)
        b = max(1, window["batches"])
        row = {
            "step": step,
            "epoch": f"{step / steps_per_epoch:.4f}",
            "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
            "train_loss": f"{window['loss'] / b:.6f}" if window["batches"] else "",
            "train_acc": f"{window['correct'] / window['seen']:.6f}" if window["seen"] else "",
            "penalty": f"{window['penalty'] / b:.6f}" if window["batches"] and penalty_fn else "",
            "test_loss": f"{test_loss:.6f}",
            "test_acc": f"{test_acc:.6f}",
            "elapsed_s": f"{elapsed:.2f}",
        }
        _append_csv(csv_path, row)
        window.update(loss=0.0, penalty=0.0, correct=0, seen=0, batches=0)
        return row

    bar = None
    if cfg["progress"] and step < stop_at:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop_at, initial=step, desc=_run_name(cfg), unit="step", leave=True, dynamic_ncols=True)
    model.train()
    status = "complete"
    with _StopFlag() as stop:
        t0 = time.perf_counter()
        while step < stop_at:
            epoch, offset = divmod(step, steps_per_epoch)
            order = _epoch_order(seed, epoch, n_train)
            idx = order[offset * batch:(offset + 1) * batch]
            x, y = train_data.batch(idx, device)
            if cfg["augment"] and x.dim() == 4:
                x = _augment(x, torch.Generator().manual_seed(_mix(seed, 5, step)))
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            total_loss = loss
            if penalty_fn is not None:
                pen = penalty_fn(model)
                total_loss = loss + float(cfg["penalty_weight"]) * pen
                window["penalty"] += float(pen.detach())
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            optimizer.step()
            scheduler.step()
            if regularizer is not None:
                regularizer.step()
            step += 1
            window["loss"] += float(loss.detach())
            window["correct"] += int((logits.detach().argmax(1) == y).sum())
            window["seen"] += int(y.shape[0])
            window["batches"] += 1
            if not math.isfinite(float(loss.detach())):
                status = "diverged"
            now = time.perf_counter()
            elapsed += now - t0
            t0 = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}",
                                acc=last_row.get("test_acc", "-")[:6] if last_row else "-")
            stopping = stop.requested is not None or step == stop_at or status == "diverged"
            if step % eval_every == 0 or step == total:
                last_row = log_row()
                now = time.perf_counter()
                elapsed += now - t0
                t0 = now
            if step % ckpt_every == 0 or step == total or stopping:
                save_checkpoint()
                t0 = time.perf_counter()  # writing the checkpoint is not counted
            if stopping:
                break
    if bar is not None:
        bar.close()
    if status == "complete" and step < total:
        status = "interrupted"

    if step == total and (not last_row or int(last_row["step"]) != total):
        last_row = log_row()  # a finished run resumed from its final checkpoint whose CSV lost the last row
    z, dof = _model_counts(model, cfg, dense_params)
    test_loss, test_acc = (float(last_row["test_loss"]), float(last_row["test_acc"])) if last_row and \
        int(last_row["step"]) == step else _evaluate(model, test_data, int(cfg["eval_batch"]), device)
    summary = Summary(
        status=status,
        method=cfg["method"],
        rank=int(cfg["rank"]) if cfg["method"] in ("svdp", "sttp") else None,
        spectrum=cfg["spectrum"] if cfg["method"] in ("svdp", "sttp") else None,
        penalty=cfg["penalty"],
        penalty_weight=float(cfg["penalty_weight"]),
        dataset=cfg["dataset"],
        model=cfg["model"],
        seed=seed,
        steps=step,
        epochs=step / steps_per_epoch,
        accuracy=test_acc,
        best_accuracy=best_acc,
        test_loss=test_loss,
        train_loss=float(last_row["train_loss"]) if last_row and last_row.get("train_loss") else None,
        z=z,
        dof=dof,
        dense_params=dense_params,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        wall_time_s=elapsed,
        out=str(out),
        metrics_csv=str(csv_path),
        checkpoint=str(ckpt_path),
        config=_jsonable(cfg),
    )
    if status == "interrupted":
        summary["exit_code"] = 130 if stop.requested else 0
    elif status == "diverged":
        summary["exit_code"] = 1
    if status != "interrupted":
        _atomic_write_text(summary_path, json.dumps(dict(summary), indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_sttp.experiments.classify",
                                     description=__doc__.splitlines()[0])
    add_classify_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run_classify(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    brief = {k: summary[k] for k in ("status", "method", "rank", "dataset", "model", "seed", "steps", "accuracy",
                                     "z", "dof", "wall_time_s", "out")}
    print(json.dumps(brief))
    return int(summary)


if __name__ == "__main__":
    sys.exit(main())
