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
    states, counters; written atomically and checksummed by :mod:`torch_sttp.checkpoint`, read with
    ``weights_only=True``, through :mod:`torch_sttp.experiments.runner`);
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
import json
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..options import INITS, SPECTRA
from .runner import (RUN_DEFAULTS, RUN_RESUMABLE, MetricsLog, RecipeRun, RunSummary, add_length_arguments,
                     add_run_arguments, check_bool, check_choice, check_device, check_integer, check_length,
                     check_number, check_rank_setting, check_resumable, epoch_order, explain_missing_data, jsonable,
                     lr_factor, mix_seed, num_threads, rank_literal, read_config_file, recipe_main, resolve_settings,
                     save_state, select_device, steps_or_epochs, train_loop, write_text)

__all__ = [
    "DEFAULTS",
    "METHODS",
    "MODELS",
    "DATASETS",
    "METRIC_COLUMNS",
    "SUMMARY_KEYS",
    "RESUMABLE_CHANGES",
    "Summary",
    "ArrayData",
    "add_classify_arguments",
    "resolve_config",
    "load_config_file",
    "run_name",
    "load_data",
    "build_model",
    "excluded_layers",
    "evaluate",
    "run_classify",
    "summary_line",
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
    "deterministic": False,
    **RUN_DEFAULTS,
}

#: Keys that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = RUN_RESUMABLE | {"data_root"}

METRIC_COLUMNS = ("step", "epoch", "lr", "train_loss", "train_acc", "penalty", "test_loss", "test_acc", "elapsed_s")
SUMMARY_KEYS = ("status", "method", "rank", "spectrum", "penalty", "penalty_weight", "dataset", "model", "seed",
                "steps", "epochs", "accuracy", "best_accuracy", "test_loss", "train_loss", "z", "dof",
                "dense_params", "trainable_params", "wall_time_s", "out", "metrics_csv", "checkpoint", "config")

_CKPT = "checkpoint.pt"
_CSV = "metrics.csv"
_SUMMARY = "summary.json"


class Summary(RunSummary):
    """The summary of a run (a dict, also written to ``summary.json``); ``int(summary)`` is the exit status."""


# ------------------------------------------------------------------------------------------------------------ config
def _help(text: str, key: str) -> str:
    return f"{text} (default: {DEFAULTS[key]!r})"


def add_classify_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the recipe's options to ``parser``. Options left out on the command line fall back to ``--config`` and
    then to :data:`DEFAULTS` (they are absent from the parsed namespace)."""
    S = argparse.SUPPRESS
    g = add_run_arguments(parser, DEFAULTS, "classify", "seed of init, sample order, augmentation")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=S,
                   help=_help("torch.use_deterministic_algorithms (for CUDA runs)", "deterministic"))

    g = parser.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default=S, help=_help("layer treatment", "method"))
    g.add_argument("--rank", type=rank_literal, default=S, help=_help("rank cap r of SVDP/STTP", "rank"))
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

    g = add_length_arguments(parser, DEFAULTS, _help("training batch size", "batch"))
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help=_help("optimizer", "optimizer"))
    g.add_argument("--lr", type=float, default=S, help=_help("peak learning rate", "lr"))
    g.add_argument("--momentum", type=float, default=S, help=_help("SGD momentum", "momentum"))
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S, help=_help("Nesterov", "nesterov"))
    g.add_argument("--weight-decay", type=float, default=S, help=_help("weight decay (see docs)", "weight_decay"))
    g.add_argument("--schedule", choices=SCHEDULES, default=S, help=_help("learning-rate schedule", "schedule"))
    g.add_argument("--warmup", type=int, default=S, help=_help("linear warm-up steps", "warmup"))
    return parser


#: Settings from a YAML/JSON file (see :func:`torch_sttp.experiments.runner.read_config_file`).
load_config_file = read_config_file


def resolve_config(args=None, **overrides) -> dict:
    """The full settings of a run: :data:`DEFAULTS` < ``config`` file < ``args`` (a namespace from
    :func:`add_classify_arguments` or a mapping) < ``overrides``. Unknown keys raise ``ValueError``."""
    cfg, config_file = resolve_settings(DEFAULTS, args, overrides, where="run_classify", apply=steps_or_epochs)
    if config_file:
        cfg["_config_file"] = config_file
    return _validate(cfg)


def _validate(cfg: dict) -> dict:
    """Check every setting before any work starts (names, types, ranges); ``wrn28-10`` is read as ``wrn``."""
    if cfg["model"] == "wrn28-10":
        cfg["model"] = "wrn"
    if cfg["penalty"] is None:
        cfg["penalty"] = "none"
    for key, allowed in (("method", METHODS), ("model", MODELS), ("dataset", DATASETS), ("penalty", PENALTIES),
                         ("schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("spectrum", SPECTRA),
                         ("init", INITS)):
        check_choice(cfg, key, allowed)
    check_length(cfg)
    check_rank_setting(cfg, "rank")
    for key, minimum, optional in (("batch", 1, False), ("eval_batch", 1, False), ("sr_every", 1, False),
                                   ("warmup", 0, False), ("seed", 0, False), ("data_seed", 0, False),
                                   ("depth", 4, False), ("widen", 1, False), ("width", 1, True),
                                   ("image_size", 1, True), ("threads", 1, True), ("eval_every", 1, True),
                                   ("checkpoint_every", 1, True), ("stop_at", 0, True)):
        check_integer(cfg, key, minimum, optional)
    check_number(cfg, "lr", 0, low_open=True)
    for key in ("momentum", "weight_decay", "penalty_weight"):
        check_number(cfg, key, 0)
    check_number(cfg, "dropout", 0, 1, high_open=True)
    for key in ("augment", "nesterov", "deterministic", "resume", "progress"):
        check_bool(cfg, key)
    check_device(cfg)
    if isinstance(cfg["exclude"], str):
        cfg["exclude"] = [cfg["exclude"]]
    if cfg["exclude"] is not None and not all(isinstance(e, str) for e in cfg["exclude"]):
        raise ValueError(f"exclude must be a list of layer-name globs, got {cfg['exclude']!r}")
    return cfg


def run_name(cfg: Mapping) -> str:
    """``<dataset>-<model>-<method>[-r<rank>]-s<seed>``: the default run folder's name."""
    name = f"{cfg['dataset']}-{cfg['model']}-{cfg['method']}"
    if cfg["method"] in ("svdp", "sttp"):
        name += f"-r{cfg['rank']}"
    return name + f"-s{cfg['seed']}"


# -------------------------------------------------------------------------------------------------------------- data
class ArrayData:
    """A data set held as tensors: ``x`` (float32, or uint8 images scaled to [-1, 1] on access) and ``y`` (int64)."""

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

    def example(self) -> torch.Tensor:
        """The first input (float), to size a model: ``(C, H, W)`` images or ``(1, L)`` sequences."""
        return self.x[0].float() if self.uint8 else self.x[0]

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x[idx], y[idx])`` on ``device``."""
        x = self.x[idx]
        if self.uint8:
            x = x.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
        return x.to(device), self.y[idx].to(device)


def load_data(cfg: Mapping) -> tuple[ArrayData, ArrayData]:
    """The (train, test) sets of ``cfg["dataset"]``; a data set whose files are missing raises
    :class:`~torch_sttp.experiments.data.DatasetFilesNotFoundError` saying where to put them."""
    from .data import get_dataset

    name = cfg["dataset"]
    kw: dict[str, Any] = {}
    if name in ("mnist5k", "digits8x8", "mnist1d"):
        kw["seed"] = int(cfg["data_seed"])
    if name == "mnist5k" and cfg["image_size"] is not None:
        kw["image_size"] = int(cfg["image_size"])
    with explain_missing_data(name, cfg["data_root"]):
        train = get_dataset(name, "train", root=cfg["data_root"], **kw)
        test = get_dataset(name, "test", root=cfg["data_root"], **kw)
    return ArrayData(train), ArrayData(test)


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


# ------------------------------------------------------------------------------------------------------------- model
def build_model(cfg: Mapping, sample_x: torch.Tensor) -> nn.Module:
    """The dense model ``cfg["model"]`` sized for inputs like ``sample_x`` (10 classes)."""
    from .models import build_model as build

    name, shape = cfg["model"], tuple(sample_x.shape)
    width = {"width": int(cfg["width"])} if cfg["width"] else {}
    if name == "cnn1d":
        if sample_x.dim() not in (1, 2) or (sample_x.dim() == 2 and shape[0] != 1):
            raise ValueError(f"cnn1d needs sequences (1, L), dataset {cfg['dataset']} gives {shape}")
        return build("cnn1d", num_classes=10, length=int(shape[-1]), **width)
    if sample_x.dim() != 3:
        raise ValueError(f"{name} needs images (C, H, W), dataset {cfg['dataset']} gives {shape}")
    if name == "small-cnn":
        return build("small-cnn", num_classes=10, in_channels=int(shape[0]), **width)
    return build("wrn28-10", depth=int(cfg["depth"]), widen=int(cfg["widen"]), num_classes=10,
                 in_channels=int(sample_x.shape[0]), dropout=float(cfg["dropout"]))


def excluded_layers(cfg: Mapping) -> list:
    """The qualified-name globs kept dense: ``cfg["exclude"]``, by default the model's first convolution."""
    return list(cfg["exclude"]) if cfg["exclude"] is not None else [FIRST_LAYER[cfg["model"]]]


def _apply_method(model: nn.Module, cfg: Mapping):
    """Reparameterize / normalize ``model`` in place; returns the SR regularizer or None."""
    method, exclude = cfg["method"], excluded_layers(cfg) or None
    if method in ("svdp", "sttp"):
        from ..surgery import convert

        gen = torch.Generator().manual_seed(mix_seed(cfg["seed"], 2))
        convert(model, method=method, rank=cfg["rank"], spectrum=cfg["spectrum"], init=cfg["init"],
                exclude=exclude, generator=gen)
    elif method == "sn":
        from ..spectral import apply_spectral_norm

        apply_spectral_norm(model, exclude=exclude)
    elif method == "sr":
        from ..spectral import apply_spectral_regularization

        return apply_spectral_regularization(model, every=int(cfg["sr_every"]), exclude=exclude)
    return None


def _make_optimizer(model: nn.Module, cfg: Mapping) -> torch.optim.Optimizer:
    """SGD or Adam over :func:`torch_sttp.spectral.param_groups`: ``weight_decay`` on everything but the reflectors
    and a normalized spectrum."""
    from ..spectral import param_groups

    groups = param_groups(model, weight_decay=float(cfg["weight_decay"]))
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                               nesterov=bool(cfg["nesterov"]) and float(cfg["momentum"]) > 0)
    return torch.optim.Adam(groups, lr=float(cfg["lr"]))


def _model_counts(model: nn.Module, cfg: Mapping, dense_params: int) -> tuple[float, int]:
    """(Z in percent, parameter count in the paper's convention) of the trained model."""
    if cfg["method"] in ("svdp", "sttp"):
        from ..report import report

        rep = report(model, print_table=False).to_dict()
        return float(rep["z"]), int(rep["params_compressed"])
    return 100.0, dense_params


# ------------------------------------------------------------------------------------------ checkpoints of 1637de1
_LEGACY_UNDECAYED = ("reflectors", "spectrum_normalized")


def _upgrade_legacy_groups(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Re-index the optimizer and scheduler states of a checkpoint written before the recipe used
    :func:`torch_sttp.spectral.param_groups`, in place.

    Those checkpoints have two unnamed groups: the decayed parameters, then the reflectors and normalized spectra,
    each in ``model.parameters()`` order. Each parameter's state moves to its index in ``optimizer``'s groups."""
    saved = state["optimizer"]
    if all("name" in g for g in saved["param_groups"]):
        return
    undecayed = {id(p) for g in optimizer.param_groups if g["name"] in _LEGACY_UNDECAYED for p in g["params"]}
    params = [p for p in model.parameters() if p.requires_grad]
    old = [p for p in params if id(p) not in undecayed] + [p for p in params if id(p) in undecayed]
    new_index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    to_new = {i: new_index[id(p)] for i, p in enumerate(old)}
    old_group = {to_new[i]: k for k, g in enumerate(saved["param_groups"]) for i in g["params"]}
    groups, sources = [], []
    for g in optimizer.param_groups:
        indices = [new_index[id(p)] for p in g["params"]]
        sources.append(old_group[indices[0]])
        groups.append({**saved["param_groups"][sources[-1]], "params": indices, "weight_decay": g["weight_decay"],
                       "name": g["name"]})
    state["optimizer"] = {"state": {to_new[i]: v for i, v in saved["state"].items()}, "param_groups": groups}
    sched = dict(state["scheduler"])
    for key in ("base_lrs", "_last_lr"):
        sched[key] = [sched[key][k] for k in sources]
    sched["lr_lambdas"] = [None] * len(groups)
    state["scheduler"] = sched


# ----------------------------------------------------------------------------------------------------------- train
@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayData, batch: int, device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data`` in eval mode, ``batch`` samples at a time."""
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


def _empty_window() -> dict:
    return {"loss": 0.0, "penalty": 0.0, "correct": 0, "seen": 0, "batches": 0}


class _Run(RecipeRun):
    """One classification run: its settings, data, model, optimizer and schedule, counters and run folder."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.device = select_device(cfg["device"])
        if cfg["deterministic"]:
            torch.use_deterministic_algorithms(True)
        self.out = Path(cfg["out"] or Path("runs") / "classify" / run_name(cfg)).expanduser()
        cfg["out"] = str(self.out)
        self.ckpt_path, self.summary_path = self.out / _CKPT, self.out / _SUMMARY
        self.log = MetricsLog(self.out / _CSV, METRIC_COLUMNS)
        self.train_data, self.test_data = load_data(cfg)  # data and model first: their errors leave no folder
        self.plan_steps(len(self.train_data), int(cfg["batch"]))
        self._build()
        self.step, self.elapsed, self.best_acc = 0, 0.0, None
        self.window, self.last_row = _empty_window(), {}
        self.skip_time()

    def _build(self) -> None:
        """Seed, then build the model, its method, the optimizer and the schedule (in this order: the numbers)."""
        from .models import state_dict_numel

        cfg, seed = self.cfg, int(self.cfg["seed"])
        torch.manual_seed(mix_seed(seed, 0))
        np.random.seed(mix_seed(seed, 3) % (2 ** 32))
        random.seed(mix_seed(seed, 4))
        self.model = build_model(cfg, self.train_data.example())
        self.dense_params = state_dict_numel(self.model)
        self.regularizer = _apply_method(self.model, cfg)
        self.model.to(self.device)
        self.optimizer = _make_optimizer(self.model, cfg)
        factor = lr_factor(cfg["schedule"], int(cfg["warmup"]), self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        use_penalty = cfg["penalty"] != "none" and float(cfg["penalty_weight"]) != 0.0
        self.penalty_kind = cfg["penalty"] if use_penalty else None

    # ------------------------------------------------------------------------------------------------- resume
    def restore(self, state: dict) -> None:
        """Load a checkpoint's state (settings checked) and drop the log rows written after it."""
        cfg = self.cfg
        check_resumable(state["config"], cfg, [k for k in DEFAULTS if k not in RESUMABLE_CHANGES], self.ckpt_path)
        if state["total_steps"] != self.total and cfg["schedule"] != "constant":
            warnings.warn(f"resuming a {state['total_steps']}-step run as a {self.total}-step run: the "
                          f"{cfg['schedule']} learning-rate schedule is stretched from the checkpoint on",
                          UserWarning, stacklevel=4)
        _upgrade_legacy_groups(state, self.model, self.optimizer)
        self.restore_training(state)
        if self.regularizer is not None and state.get("regularizer") is not None:
            self.regularizer.load_state_dict(state["regularizer"])
        self.best_acc = state["best_acc"]

    def save(self) -> None:
        """Checkpoint: model, optimizer, schedule, SR state, counters, settings and the RNG states."""
        save_state(self.ckpt_path, version=1, step=self.step, total_steps=self.total, elapsed=self.elapsed,
                   best_acc=self.best_acc, window=dict(self.window), config=jsonable(self.cfg),
                   model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                   scheduler=self.scheduler.state_dict(),
                   regularizer=self.regularizer.state_dict() if self.regularizer is not None else None)

    # ---------------------------------------------------------------------------------------------- the steps
    def train_step(self) -> float:
        """One optimizer step on the next batch of the fixed sample order; returns its loss."""
        cfg, seed = self.cfg, int(self.cfg["seed"])
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        idx = epoch_order(seed, epoch, len(self.train_data))[offset * self.batch:(offset + 1) * self.batch]
        x, y = self.train_data.batch(idx, self.device)
        if cfg["augment"] and x.dim() == 4:
            x = _augment(x, torch.Generator().manual_seed(mix_seed(seed, 5, self.step)))
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        total_loss = loss
        if self.penalty_kind is not None:
            from ..spectral import penalty

            pen = penalty(self.model, self.penalty_kind)
            total_loss = loss + float(cfg["penalty_weight"]) * pen
            self.window["penalty"] += float(pen.detach())
        self.optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.regularizer is not None:
            self.regularizer.step()
        return self.count_step(loss, logits, y)

    def log_row(self) -> dict:
        """Evaluate on the test set and append a row of the metrics since the last row to ``metrics.csv``."""
        test_loss, test_acc = evaluate(self.model, self.test_data, int(self.cfg["eval_batch"]), self.device)
        self.best_acc = test_acc if self.best_acc is None else max(self.best_acc, test_acc)
        w = self.window
        b = max(1, w["batches"])
        row = {
            "step": self.step,
            "epoch": f"{self.step / self.steps_per_epoch:.4f}",
            "lr": f"{self.optimizer.param_groups[0]['lr']:.6g}",
            "train_loss": f"{w['loss'] / b:.6f}" if w["batches"] else "",
            "train_acc": f"{w['correct'] / w['seen']:.6f}" if w["seen"] else "",
            "penalty": f"{w['penalty'] / b:.6f}" if w["batches"] and self.penalty_kind else "",
            "test_loss": f"{test_loss:.6f}",
            "test_acc": f"{test_acc:.6f}",
            "elapsed_s": f"{self.elapsed:.2f}",
        }
        self.log.append(row)
        self.window, self.last_row = _empty_window(), row
        return row


def _summarize(run: _Run, status: str, signal_name: str | None) -> Summary:
    """The run's :class:`Summary` (written to ``summary.json`` unless the run was interrupted)."""
    cfg = run.cfg
    if run.step == run.total and (not run.last_row or int(run.last_row["step"]) != run.total):
        run.log_row()  # a finished run resumed from its final checkpoint whose CSV lost the last row
    z, dof = _model_counts(run.model, cfg, run.dense_params)
    last = run.last_row
    if last and int(last["step"]) == run.step:
        test_loss, test_acc = float(last["test_loss"]), float(last["test_acc"])
    else:
        test_loss, test_acc = evaluate(run.model, run.test_data, int(cfg["eval_batch"]), run.device)
    low_rank = cfg["method"] in ("svdp", "sttp")
    summary = Summary(
        status=status, method=cfg["method"], rank=int(cfg["rank"]) if low_rank else None,
        spectrum=cfg["spectrum"] if low_rank else None, penalty=cfg["penalty"],
        penalty_weight=float(cfg["penalty_weight"]), dataset=cfg["dataset"], model=cfg["model"],
        seed=int(cfg["seed"]), steps=run.step, epochs=run.step / run.steps_per_epoch, accuracy=test_acc,
        best_accuracy=run.best_acc, test_loss=test_loss,
        train_loss=float(last["train_loss"]) if last and last.get("train_loss") else None, z=z, dof=dof,
        dense_params=run.dense_params,
        trainable_params=sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        wall_time_s=run.elapsed, out=str(run.out), metrics_csv=str(run.log.path), checkpoint=str(run.ckpt_path),
        config=jsonable(cfg),
    )
    summary.set_exit_code(signal_name)
    if status != "interrupted":
        write_text(run.summary_path, json.dumps(dict(summary), indent=2) + "\n")
    return summary


def run_classify(args=None, **overrides) -> Summary:
    """Train (or resume) one classification run; returns its summary (also written to ``<out>/summary.json``).

    ``args``: a namespace from :func:`add_classify_arguments`, a mapping of settings, or None; keyword arguments
    override both (e.g. ``run_classify(config="run.yaml", seed=3)``). See the module docstring.
    """
    cfg = resolve_config(args, **overrides)
    with num_threads(cfg["threads"]):
        run = _Run(cfg)
        run.start()
        first = run.step
        status, signal_name = train_loop(run, run_name(cfg))
        summary = _summarize(run, status, signal_name)
    summary.trained_steps, summary.total_steps = run.step - first, run.total
    return summary


def summary_line(summary: Summary) -> str:
    """One line closing a run: its status, steps, final test metrics and compression, and its folder."""
    return (f"classify {summary['method']}: {summary.head()}: test accuracy {summary['accuracy']:.4f}, test loss "
            f"{summary['test_loss']:.4f}, Z {summary['z']:.2f} % ({summary['dof']} of {summary['dense_params']} "
            f"parameters); run folder {summary['out']}")


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    """``python -m torch_sttp.experiments.classify``: train one run, print a JSON line of its summary."""
    keys = ("status", "method", "rank", "dataset", "model", "seed", "steps", "accuracy", "z", "dof", "wall_time_s",
            "out")
    return recipe_main(argv, "python -m torch_sttp.experiments.classify", __doc__.splitlines()[0],
                       add_classify_arguments, run_classify, lambda summary: json.dumps({k: summary[k] for k in keys}))


if __name__ == "__main__":
    sys.exit(main())
