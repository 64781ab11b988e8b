"""Adapter recipe: fine-tune a frozen pretrained model with SVDP/STTP adapters; checkpoints, exact resume, CSV/JSON
logs, the final adapters saved as ``adapter_config.json`` + ``adapter_model.safetensors``.

    sttp train adapt --config configs/adapt/text-delta-svdp.yaml
    sttp train adapt --task vision --kind rotation --rank 8 --lr 3e-3 --epochs 3
    python -m torch_sttp.experiments.adapt --task vision --kind principal --method sttp --rank 19 --steps 50

Settings: the built-in defaults (:data:`DEFAULTS`) < a YAML/JSON file (``--config``) < flags, resolved by
:func:`torch_sttp.experiments.runner.resolve_settings` and written to ``<out>/config.json``.

Tasks (:mod:`torch_sttp.experiments.adapt_tasks`)
    ``text``: all-MiniLM-L6-v2 with mean pooling and a new linear head classifies sentences of Python's bundled
    documentation by topic (20 topics); adapters on its 36 encoder Linear layers. ``vision``: the MNIST-5k SmallCNN
    trained on digits 0–4 (``pretrain_epochs``; cached under ``cache_dir``, default ``<out>``), adapted to digits
    5–9 with a new 5-way head. ``max_train`` / ``max_eval`` keep the first samples of the splits (quick runs).

Method
    :func:`torch_sttp.add_adapters` with ``kind`` (``principal``, ``delta``, ``rotation``), ``method`` (``svdp`` or
    ``sttp``; not used by rotations), ``rank`` (clamped per layer where it exceeds the layer's dimensions: listed in
    the summary), ``two_sided`` (rotations: H_out·W·H), the adapter's frames seeded with ``seed``; the head trains
    whole. AdamW (``lr``, ``weight_decay``) on the trainable parameters, ``schedule`` after ``warmup`` steps.

Training, outputs and resuming: as in the classification recipe (:mod:`torch_sttp.experiments.classify`), through
the shared runner. ``steps`` (or ``epochs``, the last incomplete batch of an epoch dropped); the sample order of
epoch e a fixed function of (seed, e). ``metrics.csv`` (:data:`METRIC_COLUMNS`: validation loss and accuracy every
``eval_every`` steps, default once per epoch), ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end,
``summary.json`` (:data:`SUMMARY_KEYS`: validation and test metrics, trainable and total parameters) and, once
complete, the adapters in ``<out>/adapter`` (:func:`torch_sttp.save_adapters`). Running the same command again
continues from the checkpoint and ends bit-identical to an uninterrupted run on the CPU; ``stop_at`` or
SIGINT/SIGTERM stop early with a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..options import ADAPTER_KINDS, METHODS
from .adapt_tasks import TASKS, adapter_targets, make_task
from .runner import (RUN_DEFAULTS, RUN_RESUMABLE, MetricsLog, RecipeRun, RunSummary, add_length_arguments,
                     add_run_arguments, check_bool, check_choice, check_device, check_integer, check_length,
                     check_number, check_rank_setting, check_resumable, epoch_order, jsonable, lr_factor, mix_seed,
                     num_threads, recipe_main, resolve_settings, save_state, select_device, steps_or_epochs, train_loop,
                     write_text)

__all__ = ["DEFAULTS", "METRIC_COLUMNS", "SUMMARY_KEYS", "RESUMABLE_CHANGES", "Summary",
           "add_adapt_arguments", "resolve_config", "run_name", "evaluate", "run_adapt", "summary_line", "main"]

SCHEDULES = ("constant", "linear", "cosine")

DEFAULTS: dict[str, Any] = {
    "task": "vision",
    "kind": "rotation",
    "method": "svdp",
    "rank": 8,
    "two_sided": False,
    "max_train": None,
    "max_eval": None,
    "pretrain_epochs": 4,
    "cache_dir": None,  # None: the run folder
    "steps": None,
    "epochs": 3,
    "batch": None,  # None: the task's (text 16, vision 32)
    "eval_batch": 128,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "schedule": "constant",
    "warmup": 0,
    **RUN_DEFAULTS,
}

#: Keys that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = RUN_RESUMABLE | {"cache_dir"}

METRIC_COLUMNS = ("step", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "elapsed_s")
SUMMARY_KEYS = ("status", "task", "kind", "method", "rank", "seed", "steps", "epochs", "val_accuracy", "val_loss",
                "test_accuracy", "test_loss", "train_loss", "trainable_params", "total_params", "adapter_params",
                "clamped", "wall_time_s", "out", "metrics_csv", "checkpoint", "adapter_dir", "config")

_CKPT, _CSV, _SUMMARY, _ADAPTER = "checkpoint.pt", "metrics.csv", "summary.json", "adapter"


class Summary(RunSummary):
    """The summary of a run (a dict, also written to ``summary.json``); ``int(summary)`` is the exit status."""


# ------------------------------------------------------------------------------------------------------------ config
def _help(text: str, key: str) -> str:
    return f"{text} (default: {DEFAULTS[key]!r})"


def add_adapt_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the recipe's options to ``parser``; options left out fall back to ``--config``, then :data:`DEFAULTS`."""
    S = argparse.SUPPRESS
    add_run_arguments(parser, DEFAULTS, "adapt", "seed of the head, frames and sample order")

    g = parser.add_argument_group("task and adapter")
    g.add_argument("--task", choices=TASKS, default=S, help=_help("text (MiniLM) or vision (SmallCNN)", "task"))
    g.add_argument("--kind", choices=ADAPTER_KINDS, default=S, help=_help("adapter kind", "kind"))
    g.add_argument("--method", choices=METHODS, default=S, help=_help("frames of principal/delta", "method"))
    g.add_argument("--rank", type=int, default=S, help=_help("adapter rank (reflectors of a rotation)", "rank"))
    g.add_argument("--two-sided", action=argparse.BooleanOptionalAction, default=S,
                   help=_help("rotation on both sides, H_out·W·H", "two_sided"))
    g.add_argument("--max-train", type=int, default=S, help="keep the first N training samples (default: all)")
    g.add_argument("--max-eval", type=int, default=S, help="keep the first N validation/test samples")
    g.add_argument("--pretrain-epochs", type=int, default=S, help=_help("vision: epochs on digits 0-4",
                                                                        "pretrain_epochs"))
    g.add_argument("--cache-dir", default=S, metavar="DIR", help="vision: folder of the pretrained CNN "
                   "(default: the run folder)")

    g = add_length_arguments(parser, DEFAULTS, "training batch size (default: the task's, 16 / 32)")
    g.add_argument("--lr", type=float, default=S, help=_help("AdamW learning rate", "lr"))
    g.add_argument("--weight-decay", type=float, default=S, help=_help("AdamW weight decay", "weight_decay"))
    g.add_argument("--schedule", choices=SCHEDULES, default=S, help=_help("learning-rate schedule", "schedule"))
    g.add_argument("--warmup", type=int, default=S, help=_help("linear warm-up steps", "warmup"))
    return parser


def resolve_config(args=None, **overrides) -> dict:
    """The full settings of a run: :data:`DEFAULTS` < ``config`` file < ``args`` < ``overrides``; checked."""
    cfg, config_file = resolve_settings(DEFAULTS, args, overrides, where="run_adapt", apply=steps_or_epochs)
    if config_file:
        cfg["_config_file"] = config_file
    return _validate(cfg)


def _validate(cfg: dict) -> dict:
    """Check every setting before any work starts (names, types, ranges)."""
    for key, allowed in (("task", TASKS), ("kind", ADAPTER_KINDS), ("method", METHODS), ("schedule", SCHEDULES)):
        check_choice(cfg, key, allowed)
    check_length(cfg)
    check_rank_setting(cfg, "rank")
    if not isinstance(cfg["rank"], int):
        raise ValueError(f"rank must be an integer for adapters, got {cfg['rank']!r} (flag --rank, config key rank)")
    if cfg["kind"] == "rotation" and cfg["rank"] % 2:
        raise ValueError(f"a rotation adapter needs an even rank (reflectors in equal pairs make H = I at init), "
                         f"got {cfg['rank']}; use --rank {cfg['rank'] + 1} (config key rank)")
    for key, minimum, optional in (("batch", 1, True), ("eval_batch", 1, False), ("warmup", 0, False),
                                   ("seed", 0, False), ("max_train", 1, True), ("max_eval", 1, True),
                                   ("pretrain_epochs", 1, False), ("threads", 1, True), ("eval_every", 1, True),
                                   ("checkpoint_every", 1, True), ("stop_at", 0, True)):
        check_integer(cfg, key, minimum, optional)
    check_number(cfg, "lr", 0, low_open=True)
    check_number(cfg, "weight_decay", 0)
    for key in ("two_sided", "resume", "progress"):
        check_bool(cfg, key)
    if cfg["two_sided"] and cfg["kind"] != "rotation":
        raise ValueError(f"two_sided applies to rotation adapters only, not {cfg['kind']!r} "
                         "(flag --two-sided, config key two_sided)")
    if cfg["kind"] == "rotation" and cfg["method"] != "svdp":
        raise ValueError(f"method {cfg['method']!r} does not apply to rotation adapters (Householder reflectors); "
                         "drop --method (config key method)")
    check_device(cfg)
    return cfg


def run_name(cfg: Mapping) -> str:
    """``<task>-<kind>[-<method>]-r<rank>-s<seed>``: the default run folder's name."""
    method = "" if cfg["kind"] == "rotation" else f"-{cfg['method']}"
    return f"{cfg['task']}-{cfg['kind']}{method}-r{cfg['rank']}-s{cfg['seed']}"


# ----------------------------------------------------------------------------------------------------- the steps
@torch.no_grad()
def evaluate(model: nn.Module, task, split: str, batch: int, device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``split`` of ``task`` in eval mode, ``batch`` at a time."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, task.size(split)
    for start in range(0, n, batch):
        inputs, y = task.batch(split, torch.arange(start, min(n, start + batch)))
        logits = model(**{k: v.to(device) for k, v in inputs.items()})
        y = y.to(device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return loss_sum / n, correct / n


def _empty_window() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "batches": 0}


class _Run(RecipeRun):
    """One adapter run: its settings, task, adapted model, optimizer and schedule, counters and run folder."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.device = select_device(cfg["device"])
        self.out = Path(cfg["out"] or Path("runs") / "adapt" / run_name(cfg)).expanduser()
        cfg["out"] = str(self.out)
        self.ckpt_path, self.summary_path = self.out / _CKPT, self.out / _SUMMARY
        self.log = MetricsLog(self.out / _CSV, METRIC_COLUMNS)
        cache = Path(cfg["cache_dir"]).expanduser() if cfg["cache_dir"] else self.out
        self.task = make_task(cfg["task"], cache, int(cfg["pretrain_epochs"]), cfg["max_train"], cfg["max_eval"])
        self.plan_steps(self.task.size("train"), int(cfg["batch"] or self.task.batch_size))
        self._build()
        self.step, self.elapsed = 0, 0.0
        self.window, self.last_row = _empty_window(), {}
        self.skip_time()

    def _build(self) -> None:
        """The pretrained model with a new head (seeded), its adapters, AdamW and the schedule."""
        from ..adapters import add_adapters, adapter_info

        cfg, seed = self.cfg, int(self.cfg["seed"])
        self.model = self.task.make_model(mix_seed(seed, 0))
        add_adapters(self.model, cfg["kind"], cfg["method"], rank=int(cfg["rank"]), trainable="head",
                     two_sided=bool(cfg["two_sided"]), seed=mix_seed(seed, 2), **adapter_targets(cfg["task"]))
        self.info = adapter_info(self.model)
        self.model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))
        factor = lr_factor(cfg["schedule"], int(cfg["warmup"]), self.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def restore(self, state: dict) -> None:
        """Load a checkpoint's state (settings checked) and drop the log rows written after it."""
        check_resumable(state["config"], self.cfg, [k for k in DEFAULTS if k not in RESUMABLE_CHANGES],
                        self.ckpt_path)
        self.restore_training(state)

    def save(self) -> None:
        """Checkpoint: model (base and adapters), optimizer, schedule, counters, settings and the RNG states."""
        save_state(self.ckpt_path, version=1, step=self.step, total_steps=self.total, elapsed=self.elapsed,
                   window=dict(self.window), config=jsonable(self.cfg), model=self.model.state_dict(),
                   optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())

    def train_step(self) -> float:
        """One AdamW step on the next batch of the fixed sample order; returns its loss."""
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        order = epoch_order(int(self.cfg["seed"]), epoch, self.task.size("train"))
        inputs, y = self.task.batch("train", order[offset * self.batch:(offset + 1) * self.batch])
        y = y.to(self.device)
        logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return self.count_step(loss, logits, y)

    def log_row(self) -> dict:
        """Validate and append a row of the metrics since the last row to ``metrics.csv``."""
        val_loss, val_acc = evaluate(self.model, self.task, "val", int(self.cfg["eval_batch"]), self.device)
        w = self.window
        row = {"step": self.step, "epoch": f"{self.step / self.steps_per_epoch:.4f}",
               "lr": f"{self.optimizer.param_groups[0]['lr']:.6g}",
               "train_loss": f"{w['loss'] / w['batches']:.6f}" if w["batches"] else "",
               "train_acc": f"{w['correct'] / w['seen']:.6f}" if w["seen"] else "",
               "val_loss": f"{val_loss:.6f}", "val_acc": f"{val_acc:.6f}", "elapsed_s": f"{self.elapsed:.2f}"}
        self.log.append(row)
        self.window, self.last_row = _empty_window(), row
        return row


# ------------------------------------------------------------------------------------------------------- the end
def _final_metrics(run: _Run) -> dict:
    """Validation (from the last row when it is the current step) and test metrics of the model now."""
    last, batch = run.last_row, int(run.cfg["eval_batch"])
    if last and int(last["step"]) == run.step:
        val_loss, val_acc = float(last["val_loss"]), float(last["val_acc"])
    else:
        val_loss, val_acc = evaluate(run.model, run.task, "val", batch, run.device)
    test_loss, test_acc = evaluate(run.model, run.task, "test", batch, run.device)
    return {"val_accuracy": val_acc, "val_loss": val_loss, "test_accuracy": test_acc, "test_loss": test_loss,
            "train_loss": float(last["train_loss"]) if last and last.get("train_loss") else None}


def _summarize(run: _Run, status: str, signal_name: str | None) -> Summary:
    """The run's :class:`Summary`; a finished run also writes ``summary.json`` and its adapters."""
    from ..adapters import adapter_state_dict, parameter_counts, save_adapters

    cfg = run.cfg
    if run.step == run.total and (not run.last_row or int(run.last_row["step"]) != run.total):
        run.log_row()  # a finished run resumed from its final checkpoint whose CSV lost the last row
    counts = parameter_counts(run.model)
    finished = status != "interrupted"
    adapter_dir = save_adapters(run.model, run.out / _ADAPTER) if status == "complete" else None
    summary = Summary(
        status=status, task=cfg["task"], kind=cfg["kind"], method=None if cfg["kind"] == "rotation" else
        cfg["method"], rank=int(cfg["rank"]), seed=int(cfg["seed"]), steps=run.step,
        epochs=run.step / run.steps_per_epoch, **_final_metrics(run), trainable_params=counts.trainable,
        total_params=counts.total, adapter_params=sum(t.numel() for t in adapter_state_dict(run.model).values()),
        clamped=[list(c) for c in run.info.clamped], wall_time_s=run.elapsed, out=str(run.out),
        metrics_csv=str(run.log.path), checkpoint=str(run.ckpt_path),
        adapter_dir=str(adapter_dir) if adapter_dir else None, config=jsonable(cfg))
    summary.set_exit_code(signal_name)
    if finished:
        write_text(run.summary_path, json.dumps(dict(summary), indent=2) + "\n")
    return summary


def run_adapt(args=None, **overrides) -> Summary:
    """Train (or resume) one adapter run; returns its summary (also written to ``<out>/summary.json``).

    ``args``: a namespace from :func:`add_adapt_arguments`, a mapping of settings, or None; keyword arguments
    override both (``run_adapt(config="configs/adapt/vision-rotation.yaml", seed=3)``). See the module docstring.
    """
    cfg = resolve_config(args, **overrides)
    with num_threads(cfg["threads"]):
        run = _Run(cfg)  # task and model first: their errors leave no folder
        run.start()
        first = run.step
        status, signal_name = train_loop(run, run_name(cfg), metric="val_acc")
        summary = _summarize(run, status, signal_name)
    summary.trained_steps, summary.total_steps = run.step - first, run.total
    return summary


def summary_line(summary: Summary) -> str:
    """One line closing a run: its status, steps, validation/test accuracy, parameters and its folder."""
    saved = f"adapters in {summary['adapter_dir']}; " if summary["adapter_dir"] else ""
    return (f"adapt {run_name(summary)}: {summary.head()}: val accuracy {summary['val_accuracy']:.4f}, "
            f"test accuracy {summary['test_accuracy']:.4f}, {summary['trainable_params']} trainable of "
            f"{summary['total_params']} parameters; {saved}run folder {summary['out']}")


def main(argv=None) -> int:
    """``python -m torch_sttp.experiments.adapt``: train one run, print its summary line."""
    return recipe_main(argv, "python -m torch_sttp.experiments.adapt", __doc__.splitlines()[0],
                       add_adapt_arguments, run_adapt, summary_line)


if __name__ == "__main__":
    sys.exit(main())
